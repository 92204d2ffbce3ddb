"""``Run``: a submitted run seen from the host, and ``Run.get_context()`` inside a training script.

Importing this module costs only the standard library (Python >= 3.8 syntax): training scripts
import it inside images that have no dockyard installed. Everything a host-side method needs is
imported inside that method.
"""

from __future__ import annotations

import sys
import time

TYPE_CHECKING = False  # not `from typing import ...`: keep the in-run import path minimal

if TYPE_CHECKING:  # pragma: no cover
    from typing import Any, Callable

    from ._workflow import Experiment, Workspace
    from .runs import RunFolder, RunRecord, RunStatus, RunStore

__all__ = ["Run"]

_TAIL_LINES = 30
# How often a waiter looks at the store: quickly at first (short runs end within a second), then
# less (a long run does not need its end noticed within milliseconds). Each look is one
# `PRAGMA data_version` on an open connection: the row is read only when a commit happened.
_FIRST_POLL_S = 0.005
_LAST_POLL_S = 0.05
# A waiter checks this often that an agent still follows the run (it may have been killed).
_REVIVE_EVERY_S = 2.0


def _to_stderr(line: str) -> None:
    sys.stderr.write(line)
    sys.stderr.flush()


class Run:
    """A run of an experiment (Azure ML's ``Run``).

    In a training script, ``Run.get_context()`` returns the context to log metrics with. On the
    host, ``experiment.submit(config)`` returns a ``Run`` to follow.
    """

    def __init__(self, experiment: Experiment, run_id: str) -> None:
        self.experiment = experiment
        self.id = run_id

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        from ._azure_only import not_here  # an Azure-only name gets the clear error, a typo an AttributeError

        raise not_here("Run", name)

    def get_environment(self) -> Any:
        """The environment the run was submitted with (Azure's ``Run.get_environment``)."""
        from ._environment import Environment

        return Environment.from_dict(self._record().environment)

    def __repr__(self) -> str:
        return "Run(experiment={!r}, id={!r}, status={!r})".format(self.experiment.name, self.id, self.get_status())

    # -- inside a run ---------------------------------------------------------------------------

    @classmethod
    def get_context(cls, allow_offline: bool = True) -> Any:
        """The current run's logger: metrics reach the run store when the script runs under
        dockyard; elsewhere an offline run prints them."""
        from ._runcontext import get_context

        return get_context(allow_offline=allow_offline)

    # -- on the host ----------------------------------------------------------------------------

    @staticmethod
    def get(workspace: Workspace, run_id: str) -> Run:
        """The run ``run_id`` of ``workspace`` (Azure ML's ``Run.get``).

        Raises:
            RunNotFound: the workspace has no such run.
        """
        return workspace.get_run(run_id)

    def _store(self) -> RunStore:
        return self.experiment.workspace.store

    def _record(self) -> RunRecord:
        return self._store().get(self.id)

    def _folder(self) -> RunFolder:
        return self._store().folder_of(self.id)

    @property
    def status(self) -> RunStatus:
        """The status now (same as :meth:`get_status`)."""
        return self.get_status()

    def get_status(self) -> RunStatus:
        """``Queued``, ``Running``, ``Completed``, ``Failed`` or ``Canceled`` (a ``str``)."""
        return self._store().status_of(self.id)

    def get_details(self) -> dict[str, Any]:
        """Status, times, script, target, image, exit code and (for failures) the log tail."""
        r = self._record()
        iso = lambda t: time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t)) if t else None
        folder = r.folder
        details = {
            "runId": r.id,
            "experiment": r.experiment,
            "status": str(r.status),
            "target": r.compute,
            "script": r.script,
            "arguments": list(r.arguments),
            "image": r.image,
            "exitCode": r.exit_code,
            "submittedTimeUtc": iso(r.created),
            "startTimeUtc": iso(r.started),
            "endTimeUtc": iso(r.ended),
            "logFiles": {"logs/std.log": str(folder.log)},
        }
        if r.status in (r.status.FAILED, r.status.CANCELED):
            details["error"] = {"message": r.reason, "exitCode": r.exit_code, "logTail": folder.log_tail(_TAIL_LINES)}
        return details

    def to_json(self, *, metrics: bool = True) -> dict[str, Any]:
        """The run as ``dockyard run --json`` and ``dockyard runs show --json`` print it:
        ``{"id", "status", "exit_code", "image", "gpus", "metrics": {name: [values]}, …}``."""
        r = self._record()
        doc: dict[str, Any] = {
            "id": r.id,
            "status": str(r.status),
            "exit_code": r.exit_code,
            "image": r.image,
            "gpus": list(r.gpus),
        }
        if metrics:
            doc["metrics"] = self._store().metrics(r.id)
        doc.update({
            "experiment": r.experiment,
            "script": r.script,
            "compute": r.compute,
            "reason": r.reason,
            "created": r.created,
            "started": r.started,
            "ended": r.ended,
            "display_name": r.display_name or r.id,
            "tags": self.get_tags(),
            "properties": dict(r.properties),
        })
        return doc

    # -- tags, properties, display name ---------------------------------------------------------

    def get_tags(self) -> dict[str, str]:
        """Tags given at submit or set here, then those the script set (``run.tag`` in the run)."""
        store = self._store()
        return {**store.get(self.id).tags, **store.tags_logged(self.id)}

    @property
    def tags(self) -> dict[str, str]:
        return self.get_tags()

    def tag(self, key: str, value: Any = None) -> None:
        """Set one tag (``value`` None: a tag with no value, as Azure ML)."""
        from ._workflow import _check_tags

        self._store().merge_json(self.id, "tags", _check_tags({key: value}))

    def set_tags(self, tags: Any) -> None:
        """Set several tags: a dict, or a list of names (tags without values)."""
        from ._workflow import _check_tags

        as_dict = tags if isinstance(tags, dict) else {name: None for name in tags}
        self._store().merge_json(self.id, "tags", _check_tags(as_dict))

    @property
    def properties(self) -> dict[str, str]:
        """Azure ML's properties: set once with :meth:`add_properties`, never changed."""
        return dict(self._record().properties)

    def get_properties(self) -> dict[str, str]:
        return self.properties

    def add_properties(self, properties: dict[str, Any]) -> None:
        """Add properties; one that is already set keeps its value and must not be given another.

        Raises:
            InputError: a property would change.
        """
        from ._workflow import _check_tags
        from .errors import InputError

        new = _check_tags(properties)
        current = self._record().properties
        changed = sorted(k for k, v in new.items() if k in current and current[k] != v)
        if changed:
            raise InputError(f"run {self.id}: properties cannot change once set: {', '.join(changed)}",
                             hint="use tags for values that change (run.tag(key, value))")
        self._store().merge_json(self.id, "properties", new, keep_existing=True)

    @property
    def display_name(self) -> str:
        """A name for people (default: the run id); settable."""
        return self._record().display_name or self.id

    @display_name.setter
    def display_name(self, value: str) -> None:
        self._store().update(self.id, display_name=str(value))

    def get_metrics(self, name: str | None = None) -> dict[str, Any]:
        """Metrics as Azure ML returns them: a value logged once is a scalar, more often a list."""
        found = self._store().metrics(self.id)
        shaped = {k: (v[0] if len(v) == 1 else v) for k, v in found.items()}
        return shaped if name is None else {name: shaped[name]} if name in shaped else {}

    def cancel(self) -> None:
        """Cancel the run (a queued run at once; a running one is stopped by the agent)."""
        self._store().request_cancel(self.id)

    def wait_for_completion(self, show_output: bool = False, wait_post_processing: bool = False,
                            raise_on_error: bool = True) -> dict[str, Any]:
        """Block until the run ends; with ``show_output`` stream its output live.

        Ctrl-C detaches: the run goes on (follow it with ``dockyard runs logs -f ID``).

        Raises:
            RunFailed: the run Failed and ``raise_on_error`` (exit code and log tail attached).
        """
        out = sys.stdout

        def text(chunk: str) -> None:
            out.write(chunk)
            out.flush()

        self.experiment.workspace.wake_agent()  # a killed agent must not leave us waiting forever
        try:
            status = self.follow(show_output, text=text, log=lambda data: text(data.decode("utf-8", "replace")),
                                 note=_to_stderr if show_output else None)
        except KeyboardInterrupt:
            text("\ndetached from {}; it keeps running (dockyard runs logs -f {})\n".format(self.id, self.id))
            return self.get_details()
        details = self.get_details()
        if raise_on_error and status == status.FAILED:
            from .errors import RunFailed

            record = self._record()
            raise RunFailed(
                "run {} failed: {}".format(self.id, record.reason or "exit code {}".format(record.exit_code)),
                run_id=self.id,
                exit_code_of_run=record.exit_code,
                log_tail=self._folder().log_tail(_TAIL_LINES),
            )
        return details

    def follow(self, show_output: bool, *, text: Callable[[str], None], log: Callable[[bytes], None],
               offset: int = 0, header: bool = True, revive: bool = True,
               note: Callable[[str], None] | None = None) -> RunStatus:
        """Wait for the end (dockyard's own; :meth:`wait_for_completion` is built on it).

        With ``show_output``, the run's output from byte ``offset`` goes to ``log`` as it is
        written, framed by Azure ML's header (unless ``header`` is False) and summary, which go to
        ``text``. ``note`` hears what the run waits for, each time it changes ("Queued: waiting for
        the Docker Engine: …"). ``revive`` restarts a killed agent while waiting. Returns the final
        status.

        One store connection and the log file's size are watched: a look is one ``PRAGMA
        data_version`` (the row is read only after a commit) and one ``stat``.
        """
        store = self._store()
        folder = self._folder()
        started = revived = time.monotonic()
        version = None
        status = None
        said = ""
        if show_output and header:
            text("RunId: {}\n".format(self.id))
        while True:
            now = store.data_version()
            if now != version:  # something was committed since the last look
                version = now
                if note is None:
                    status = store.status_of(self.id)
                else:
                    record = store.get(self.id)
                    status = record.status
                    waits = record.reason if not status.final else ""
                    if waits != said:
                        said = waits
                        if waits:
                            note("{}: {}\n".format(status, waits))
            if show_output and folder.log_size() > offset:
                chunk = folder.read_log(offset)
                offset += len(chunk)
                log(chunk)
            if status is not None and status.final:
                break
            if revive and time.monotonic() - revived > _REVIVE_EVERY_S:
                self.experiment.workspace.wake_agent()
                revived = time.monotonic()
            time.sleep(min(_LAST_POLL_S, _FIRST_POLL_S + (time.monotonic() - started) / 100))
        if show_output:
            chunk = folder.read_log(offset)
            if chunk:
                log(chunk)
            text("\nExecution Summary\n=================\nRunId: {}\nStatus: {}\n".format(self.id, status))
        return status

    def get_file_names(self) -> list[str]:
        """Files the run produced: ``outputs/…`` and ``logs/std.log``."""
        return self._folder().file_names()

    def _file_path(self, name: str) -> Any:
        path = self._folder().path_of(name)
        if path is None:
            from .errors import InputError

            raise InputError("run {} has no file {!r}".format(self.id, name), hint="see run.get_file_names()")
        return path

    def download_file(self, name: str, output_file_path: Any = None, _validate_checksum: bool = False) -> str:
        """Copy one of :meth:`get_file_names` to ``output_file_path`` (default: its base name here).

        A path ending in ``/`` or naming an existing folder is a folder to copy into; missing parent
        folders are made. The copy is written aside and renamed: a reader never sees half a file.
        """
        import os
        import shutil
        from pathlib import Path

        source = self._file_path(name)
        text = os.fspath(output_file_path) if output_file_path else Path(name).name
        target = Path(text)
        if text.endswith(("/", os.sep)) or target.is_dir():
            target = target / Path(name).name
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f".{target.name}.partial{os.getpid()}")
        shutil.copyfile(source, partial)
        os.replace(partial, target)
        return str(target)

    def download_files(self, prefix: str = "outputs", output_directory: Any = None, output_paths: Any = None,
                       batch_size: int = 100) -> list[str]:
        """Copy every file under ``prefix`` into ``output_directory`` (default: here), keeping paths."""
        from pathlib import Path

        base = Path(output_directory or ".")
        done = []
        for name in self.get_file_names():
            if name.startswith(prefix):
                target = base / name
                target.parent.mkdir(parents=True, exist_ok=True)
                done.append(self.download_file(name, target))
        return done
