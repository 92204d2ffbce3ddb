"""``Run``: a submitted run seen from the host, and ``Run.get_context()`` inside a training script.

Importing this module costs only the standard library (Python >= 3.8 syntax): training scripts
import it inside images that have no dockyard installed. Everything a host-side method needs is
imported inside that method.
"""

from __future__ import annotations

import os
import sys
import time

__all__ = ["Run"]

_TAIL_LINES = 30


class Run:
    """A run of an experiment (Azure ML's ``Run``).

    In a training script, ``Run.get_context()`` returns the context to log metrics with. On the
    host, ``experiment.submit(config)`` returns a ``Run`` to follow.
    """

    def __init__(self, experiment, run_id):  # type: ignore[no-untyped-def]
        self.experiment = experiment
        self.id = run_id

    def __repr__(self):  # type: ignore[no-untyped-def]
        return "Run(experiment={!r}, id={!r}, status={!r})".format(self.experiment.name, self.id, self.get_status())

    # -- inside a run ---------------------------------------------------------------------------

    @classmethod
    def get_context(cls, allow_offline=True):  # type: ignore[no-untyped-def]
        """The current run's logger: metrics reach the run store when the script runs under
        dockyard; elsewhere an offline run prints them."""
        from ._runcontext import get_context

        return get_context(allow_offline=allow_offline)

    # -- on the host ----------------------------------------------------------------------------

    def _store(self):  # type: ignore[no-untyped-def]
        return self.experiment.workspace._store()

    def _record(self):  # type: ignore[no-untyped-def]
        return self._store().get(self.id)

    def get_status(self):  # type: ignore[no-untyped-def]
        """``Queued``, ``Running``, ``Completed``, ``Failed`` or ``Canceled``."""
        return self._record().status

    def _log_path(self):  # type: ignore[no-untyped-def]
        from pathlib import Path

        return Path(self._record().run_dir) / "meta" / "std.log"

    def _log_tail(self, lines=_TAIL_LINES):  # type: ignore[no-untyped-def]
        path = self._log_path()
        if not path.exists():
            return ""
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - 64 * 1024))
            data = fh.read().decode("utf-8", errors="replace")
        return "\n".join(data.splitlines()[-lines:])

    def get_details(self):  # type: ignore[no-untyped-def]
        """Status, times, script, target, image, exit code and (for failures) the log tail."""
        r = self._record()
        iso = lambda t: time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t)) if t else None  # noqa: E731
        details = {
            "runId": r.id,
            "experiment": r.experiment,
            "status": r.status,
            "target": r.compute,
            "script": r.script,
            "arguments": list(r.arguments),
            "image": r.image,
            "exitCode": r.exit_code,
            "submittedTimeUtc": iso(r.created),
            "startTimeUtc": iso(r.started),
            "endTimeUtc": iso(r.ended),
            "logFiles": {"logs/std.log": str(self._log_path())},
        }
        if r.status in ("Failed", "Canceled"):
            details["error"] = {"message": r.reason, "exitCode": r.exit_code, "logTail": self._log_tail()}
        return details

    def get_metrics(self, name=None):  # type: ignore[no-untyped-def]
        """Metrics as Azure ML returns them: a value logged once is a scalar, more often a list."""
        found = self._store().metrics(self.id)
        shaped = {k: (v[0] if len(v) == 1 else v) for k, v in found.items()}
        return shaped if name is None else {name: shaped[name]} if name in shaped else {}

    def cancel(self):  # type: ignore[no-untyped-def]
        """Cancel the run (a queued run at once; a running one is stopped by the agent)."""
        self._store().request_cancel(self.id)

    def wait_for_completion(self, show_output=False, wait_post_processing=False, raise_on_error=True):  # type: ignore[no-untyped-def]
        """Block until the run ends; with ``show_output`` stream its output live.

        Ctrl-C detaches: the run goes on (follow it with ``dockyard runs logs -f ID``).

        Raises:
            RunFailed: the run Failed and ``raise_on_error`` (exit code and log tail attached).
        """
        from ._runstore import FINAL

        offset = 0
        out = sys.stdout
        self.experiment.workspace._revive_agent()  # a killed agent must not leave us waiting forever
        try:
            if show_output:
                out.write("RunId: {}\n".format(self.id))
                out.flush()
            while True:
                record = self._record()
                if show_output:
                    offset = self._stream(offset, out)
                if record.status in FINAL:
                    if show_output:
                        offset = self._stream(offset, out)
                        out.write("\nExecution Summary\n=================\nRunId: {}\nStatus: {}\n".format(self.id, record.status))
                        out.flush()
                    break
                time.sleep(0.03)  # one indexed SQLite read: cheap enough to notice the end quickly
        except KeyboardInterrupt:
            out.write("\ndetached from {}; it keeps running (dockyard runs logs -f {})\n".format(self.id, self.id))
            out.flush()
            return self.get_details()
        details = self.get_details()
        if raise_on_error and record.status == "Failed":
            from .errors import RunFailed

            raise RunFailed(
                "run {} failed: {}".format(self.id, record.reason or "exit code {}".format(record.exit_code)),
                run_id=self.id,
                exit_code_of_run=record.exit_code,
                log_tail=self._log_tail(),
            )
        return details

    def _stream(self, offset, out):  # type: ignore[no-untyped-def]
        path = self._log_path()
        if not path.exists():
            return offset
        with open(path, "rb") as fh:
            fh.seek(offset)
            chunk = fh.read()
        if chunk:
            out.write(chunk.decode("utf-8", errors="replace"))
            out.flush()
        return offset + len(chunk)

    def get_file_names(self):  # type: ignore[no-untyped-def]
        """Files the run produced: ``outputs/…`` and ``logs/std.log``."""
        from pathlib import Path

        run_dir = Path(self._record().run_dir)
        names = sorted("outputs/" + p.relative_to(run_dir / "outputs").as_posix()
                       for p in (run_dir / "outputs").rglob("*") if p.is_file())
        if (run_dir / "meta" / "std.log").exists():
            names.append("logs/std.log")
        return names

    def _file_path(self, name):  # type: ignore[no-untyped-def]
        from pathlib import Path

        from .errors import InputError

        run_dir = Path(self._record().run_dir)
        if name == "logs/std.log":
            return run_dir / "meta" / "std.log"
        if name not in self.get_file_names():
            raise InputError("run {} has no file {!r}".format(self.id, name), hint="see run.get_file_names()")
        return run_dir / name

    def download_file(self, name, output_file_path=None, _validate_checksum=False):  # type: ignore[no-untyped-def]
        """Copy one of :meth:`get_file_names` to ``output_file_path`` (default: its base name here)."""
        import shutil
        from pathlib import Path

        source = self._file_path(name)
        target = Path(output_file_path) if output_file_path else Path(Path(name).name)
        if target.is_dir():
            target = target / Path(name).name
        shutil.copyfile(source, target)
        return str(target)

    def download_files(self, prefix="outputs", output_directory=None, output_paths=None, batch_size=100):  # type: ignore[no-untyped-def]
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
