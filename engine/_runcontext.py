"""The in-run API: what a training script calls inside a dockyard run, and the host's reader.

Inside a run::

    from dockyard._runcontext import get_context   # later: from dockyard import Run
    run = get_context()                              # later: Run.get_context()
    run.log("accuracy", 0.9)

This module runs inside *any* image with Python >= 3.8 and nothing installed: dockyard mounts
its own package directory read-only at ``/opt/dockyard/lib/dockyard`` and sets
``PYTHONPATH=/opt/dockyard/lib``. So it (and ``dockyard/__init__.py``) must stay Python 3.8
syntax and library, and import only the standard library — a unit test parses both with
``feature_version=(3, 8)`` and runs them under a real 3.8 where one is installed; an engine test
proves a container imports nothing else.

The channel from a run to the host is two environment variables:

- ``DOCKYARD_RUN_ID``: the run id. Unset (or empty) means offline: the script was started by
  hand, not by dockyard.
- ``DOCKYARD_METRICS_FILE``: a file the host reads (bind-mounted into the container).
- ``DOCKYARD_EXPERIMENT`` (optional): the experiment's name.

Each call appends JSON lines to the metrics file, one per metric or tag::

    {"t": 1718000000.25, "kind": "log", "name": "accuracy", "value": 0.9}

``t`` is Unix time (float seconds); ``kind`` is one of ``log``, ``log_list``, ``log_row``,
``log_table``, ``tag``; ``value`` is a JSON scalar (``log``), a list of scalars (``log_list``),
an object of scalars (``log_row``), an object of lists of scalars (``log_table``) or a string
(``tag``). ``log(..., step=N)`` adds an optional integer ``"step"`` field. Readers must ignore
fields and kinds they do not know (fields are added, never renamed).

Every line of one call is written with a single ``os.write`` on a descriptor opened with
``O_APPEND``: on a local Linux file system (a bind mount is one) the kernel appends the whole
buffer at the end of the file in one step, so lines from several processes and threads never
interleave. Nothing is fsynced: a line is in the page cache, visible to the host, as soon as
``os.write`` returns.

Values: ``int``, ``float``, ``str`` and ``bool``; objects with an ``.item()`` method (numpy and
torch scalars) are converted through it, without importing numpy. Non-finite floats are written
as the strings ``"NaN"``, ``"Infinity"`` and ``"-Infinity"`` — a diverged loss must not crash a
training run, and the file stays strict JSON that any parser (and ``--json`` output) accepts;
``float(value)`` turns those strings back into floats. Anything else (``None``, bytes, a list
given to ``log``) raises ``TypeError``. Names (metrics, tags, row and table columns) must be
non-blank strings of at most 255 characters, else ``ValueError``.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time

TYPE_CHECKING = False  # not `from typing import ...`: keep the in-run import path minimal
if TYPE_CHECKING:  # pragma: no cover
    from typing import Iterable, Mapping

__all__ = [
    "ENV_EXPERIMENT",
    "ENV_INPUT_DATASETS",
    "ENV_METRICS_FILE",
    "ENV_RUN_ID",
    "KINDS",
    "MAX_NAME_LENGTH",
    "OfflineRun",
    "RunContext",
    "SubmittedRun",
    "fold_records",
    "get_context",
    "read_metric_lines",
    "read_metrics",
    "read_tags",
]

ENV_RUN_ID = "DOCKYARD_RUN_ID"
ENV_METRICS_FILE = "DOCKYARD_METRICS_FILE"
ENV_EXPERIMENT = "DOCKYARD_EXPERIMENT"
ENV_INPUT_DATASETS = "DOCKYARD_INPUT_DATASETS"
MAX_NAME_LENGTH = 255
KINDS = ("log", "log_list", "log_row", "log_table", "tag")

_OFFLINE_EXPERIMENT = "offline"
_NON_FINITE = {"nan": "NaN", "inf": "Infinity", "-inf": "-Infinity"}


# --- values -----------------------------------------------------------------------------------


def _check_name(name: object, what: str) -> str:
    if not isinstance(name, str):
        raise ValueError(f"{what} must be a str, not {type(name).__name__} ({name!r})")
    if not name.strip():
        raise ValueError(f"{what} must not be empty or blank (got {name!r})")
    if len(name) > MAX_NAME_LENGTH:
        raise ValueError(
            f"{what} is {len(name)} characters long; the limit is {MAX_NAME_LENGTH} (got {name[:40]!r}...)"
        )
    return str(name)


_NOT_SCALAR = object()


def _native_scalar(value: object) -> object:
    """A JSON scalar for value, or a sentinel (``_NOT_SCALAR``) when it is not one."""
    if isinstance(value, bool):  # before int: bool is an int
        return bool(value)
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")):
            return _NON_FINITE[repr(float(value))]
        return float(value)
    if isinstance(value, str):
        return str(value)
    return _NOT_SCALAR



def _scalar(value: object, what: str) -> object:
    """Validate and convert one metric value (see the module docstring)."""
    native = _native_scalar(value)
    if native is not _NOT_SCALAR:
        return native
    item = getattr(value, "item", None)
    if callable(item) and not isinstance(value, (list, tuple, dict, set, bytes, bytearray)):
        try:
            converted = item()
        except Exception as exc:  # e.g. numpy: "can only convert an array of size 1"
            raise TypeError(
                f"{what}: {type(value).__name__}.item() failed ({exc}); log one number per call, "
                "or use log_list for a sequence"
            ) from exc
        native = _native_scalar(converted)
        if native is not _NOT_SCALAR:
            return native
        raise TypeError(
            f"{what}: {type(value).__name__}.item() gave {type(converted).__name__}, "
            "not a number, str or bool"
        )
    hint = "; use log_list for a sequence" if isinstance(value, (list, tuple)) else ""
    raise TypeError(
        f"{what} must be a number, str or bool (or a numpy-style scalar with .item()), "
        f"not {type(value).__name__}{hint}"
    )


def _scalar_list(values: object, what: str) -> list:
    if isinstance(values, (str, bytes, bytearray, dict)) or not hasattr(values, "__iter__"):
        raise TypeError(f"{what} must be a list (or another iterable) of values, not {type(values).__name__}")
    return [_scalar(v, f"{what}, item {i}") for i, v in enumerate(values)]  # type: ignore[attr-defined]


# --- runs -------------------------------------------------------------------------------------


class RunContext:
    """What ``get_context()`` returns: the shared API of a submitted and an offline run.

    Method names and signatures follow Azure ML SDK v1's ``Run`` (``description`` is accepted
    and ignored), so a training script runs unchanged.
    """

    def __init__(self, run_id: str, experiment: str) -> None:
        self._id = run_id
        self._experiment = _ExperimentName(experiment)
        self._lock = threading.Lock()
        self._metrics: dict = {}
        self._tags: dict = {}

    @property
    def id(self) -> str:
        """The run id (``OfflineRun_<uuid>`` offline)."""
        return self._id

    @property
    def experiment(self) -> _ExperimentName:
        """The experiment's name: a ``str`` that also has ``.name`` (Azure's ``run.experiment.name``)."""
        return self._experiment

    @property
    def input_datasets(self) -> dict:
        """The run's datasets by name: the path each is at (Azure's ``run.input_datasets``; {} offline)."""
        raw = os.environ.get(ENV_INPUT_DATASETS, "")
        if not raw:
            return {}
        try:
            found = json.loads(raw)
        except ValueError:
            return {}
        return dict(found) if isinstance(found, dict) else {}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(id={self._id!r}, experiment={str(self._experiment)!r})"

    # Azure's Run is a context manager that completes the run; here the host decides the status.
    def __enter__(self) -> RunContext:
        return self

    def __exit__(self, *exc_info: object) -> None:
        return None

    # --- metrics ---

    def log(self, name: str, value: object, description: str = "", step: int | None = None) -> None:
        """Log one value of metric ``name`` (call again to add more values, e.g. once per epoch).

        Args:
            name: the metric's name.
            value: a number, str or bool, or a numpy/torch scalar (``.item()``); NaN and
                infinities are recorded as ``"NaN"``, ``"Infinity"``, ``"-Infinity"``.
            description: ignored (Azure compatibility).
            step: an optional integer step, recorded with the value.

        Raises:
            ValueError: a bad name.
            TypeError: a value that is not a scalar (use ``log_list`` for a sequence).
        """
        record = self._record("log", _check_name(name, "metric name"), _scalar(value, f"metric {name!r}"))
        if step is not None:
            converted = _scalar(step, f"step of metric {name!r}")  # numpy ints too
            if isinstance(converted, bool) or not isinstance(converted, int):
                raise TypeError(f"step of metric {name!r} must be an int, not {type(step).__name__}")
            record["step"] = converted
        self._emit([record])

    def log_list(self, name: str, value: Iterable[object], description: str = "") -> None:
        """Log a list of values of metric ``name`` at once (they extend its values).

        Raises:
            ValueError: a bad name.
            TypeError: not an iterable of scalars.
        """
        name = _check_name(name, "metric name")
        self._emit([self._record("log_list", name, _scalar_list(value, f"metric {name!r}"))])

    def log_row(self, name: str, description: str | None = None, **kwargs: object) -> None:
        """Log one row of table ``name``: ``run.log_row("roc", fpr=0.1, tpr=0.8)``.

        Raises:
            ValueError: a bad table or column name.
            TypeError: a column value that is not a scalar.
        """
        name = _check_name(name, "table name")
        row = {}
        for column, value in kwargs.items():
            row[_check_name(column, f"column name of {name!r}")] = _scalar(value, f"table {name!r}, column {column!r}")
        self._emit([self._record("log_row", name, row)])

    def log_table(self, name: str, value: Mapping[str, Iterable[object]], description: str = "") -> None:
        """Log table ``name`` as a dict of columns: ``{"epoch": [1, 2], "loss": [0.5, 0.3]}``.

        Raises:
            ValueError: a bad table or column name.
            TypeError: not a dict of lists of scalars.
        """
        name = _check_name(name, "table name")
        if not isinstance(value, dict):
            raise TypeError(f"table {name!r} must be a dict of column name -> list of values, not {type(value).__name__}")
        table = {}
        for column, values in value.items():
            column = _check_name(column, f"column name of {name!r}")
            table[column] = _scalar_list(values, f"table {name!r}, column {column!r}")
        self._emit([self._record("log_table", name, table)])

    def get_metrics(self, name: str | None = None, recursive: bool = False, run_type: object = None,
                    populate: bool = False) -> dict:
        """What this process logged so far: ``{name: [values...]}``, like ``read_metrics``.

        Unlike Azure, a metric logged once is still a one-item list (the shape of
        ``dockyard runs show --json``). ``log_list`` extends the list; ``log_row`` and
        ``log_table`` append a dict. The other arguments are ignored (Azure compatibility).
        """
        with self._lock:
            metrics = {k: [_copy(v) for v in vs] for k, vs in self._metrics.items()}
        if name is not None:
            return {name: metrics[name]} if name in metrics else {}
        return metrics

    # --- tags ---

    def tag(self, key: str, value: object = None) -> None:
        """Tag the run: ``key`` -> ``value`` (a scalar, stored as its ``str``; ``None`` -> ``""``).

        Raises:
            ValueError: a bad key.
            TypeError: a value that is not a scalar.
        """
        self._emit([self._tag_record(key, value)])

    def set_tags(self, tags: Mapping[str, object] | Iterable[str]) -> None:
        """Set several tags at once: a dict, or an iterable of keys (each tagged ``""``).

        Raises:
            ValueError: a bad key.
            TypeError: a value that is not a scalar.
        """
        items = tags.items() if isinstance(tags, dict) else ((key, None) for key in tags)
        records = [self._tag_record(key, value) for key, value in items]
        if records:
            self._emit(records)

    def get_tags(self) -> dict:
        """The tags this process set: ``{key: value}`` (the last value of each key)."""
        with self._lock:
            return dict(self._tags)

    # --- status and files ---

    def complete(self, _set_status: bool = True) -> None:
        """No-op: the host decides a run's status from its exit code."""

    def fail(self, error_details: object = None, error_code: object = None, _set_status: bool = True) -> None:
        """No-op: the host decides a run's status from its exit code (exit non-zero to fail)."""

    def flush(self, timeout_seconds: int = 300) -> None:
        """No-op: every line reaches the metrics file before its call returns."""

    def upload_file(self, name: str, path_or_stream: object, datastore_name: object = None) -> str:
        """Copy a file (a path or a binary stream) into ``./outputs/<name>``; return that path.

        dockyard collects the working directory's ``outputs/`` when the run ends, so this is
        the same as writing the file there. A leading ``outputs/`` in ``name`` is dropped
        (Azure scripts write ``run.upload_file("outputs/model.pkl", ...)``); uploading a file
        onto itself is a no-op.

        Raises:
            ValueError: ``name`` is absolute, empty, or leaves ``outputs/`` (``..``).
            OSError: the source cannot be read or the destination written.
        """
        dest = _output_path(name)
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        if hasattr(path_or_stream, "read"):
            import shutil

            with open(dest, "wb") as out:
                shutil.copyfileobj(path_or_stream, out)  # type: ignore[arg-type]
            return dest
        src = os.fspath(path_or_stream)  # type: ignore[call-overload]
        if os.path.exists(dest) and os.path.samefile(src, dest):
            return dest
        import shutil

        shutil.copyfile(src, dest)
        return dest

    def upload_files(self, names: Iterable[str], paths: Iterable[object], return_artifacts: bool = False,
                     timeout_seconds: object = None, datastore_name: object = None) -> list:
        """``upload_file`` for each (name, path) pair; returns the destination paths.

        Raises:
            ValueError: the two lists differ in length, or a bad name.
        """
        names, paths = list(names), list(paths)
        if len(names) != len(paths):
            raise ValueError(f"upload_files: {len(names)} names but {len(paths)} paths")
        return [self.upload_file(n, p) for n, p in zip(names, paths)]

    def upload_folder(self, name: str, path: object, datastore_name: object = None) -> str:
        """Copy a directory tree into ``./outputs/<name>`` (merging with what is there).

        Uploading ``outputs`` (or a folder holding the destination) into itself copies each file
        once, never into its own copy: files already in place are left as they are.

        Raises:
            ValueError: a bad name.
            OSError: the copy failed.
        """
        import shutil

        dest = _output_dir(name)
        src = os.path.realpath(os.fspath(path))  # type: ignore[call-overload]
        real_dest = os.path.realpath(dest)
        # The file list is taken before copying: a destination inside the source is not walked.
        files = []
        for folder, dirs, names in os.walk(src):
            dirs[:] = [d for d in dirs if os.path.realpath(os.path.join(folder, d)) != real_dest]
            files += [os.path.join(folder, n) for n in names]
        for file in files:
            target = os.path.join(dest, os.path.relpath(file, src))
            if os.path.exists(target) and os.path.samefile(file, target):
                continue
            os.makedirs(os.path.dirname(target), exist_ok=True)
            shutil.copy2(file, target)
        os.makedirs(dest, exist_ok=True)
        return dest

    def log_image(self, name: str, path: object = None, plot: object = None, description: str = "") -> str:
        """Keep an image with the run: the file at ``path``, or ``plot`` (a matplotlib figure or
        ``pyplot``) saved as PNG, as ``outputs/images/<name>.<ext>`` (listed by ``runs show``).

        Raises:
            ValueError: neither or both of ``path`` and ``plot``.
        """
        if (path is None) == (plot is None):
            raise ValueError("log_image needs exactly one of path= (an image file) or plot= (a matplotlib figure)")
        safe = "".join(c if c.isalnum() or c in "._-" else "_" for c in _check_name(name, "image name"))
        if plot is not None:
            dest = _output_path("images/{}.png".format(safe))
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            plot.savefig(dest)  # type: ignore[attr-defined]
            return dest
        ext = os.path.splitext(os.fspath(path))[1] or ".png"  # type: ignore[call-overload]
        return self.upload_file("images/{}{}".format(safe, ext), path)

    def __getattr__(self, name: str) -> object:
        alternative = _AZURE_ONLY.get(name)
        if alternative is None or name.startswith("_"):
            raise AttributeError("{!r} object has no attribute {!r}".format(type(self).__name__, name))
        raise NotImplementedError("Run.{} is Azure ML's and dockyard does not have it: {}".format(name, alternative))

    # --- internals ---

    def _record(self, kind: str, name: str, value: object) -> dict:
        return {"t": time.time(), "kind": kind, "name": name, "value": value}

    def _tag_record(self, key: object, value: object) -> dict:
        key = _check_name(key, "tag key")
        text = "" if value is None else str(_scalar(value, f"tag {key!r}"))
        return self._record("tag", key, text)  # type: ignore[arg-type]

    def _remember(self, records: list) -> None:
        """Fold records into this process's view (caller holds the lock)."""
        fold_records(records, self._metrics, self._tags)

    def _emit(self, records: list) -> None:  # pragma: no cover - abstract
        raise NotImplementedError


class SubmittedRun(RunContext):
    """The run context inside a dockyard run: every call appends JSON lines to the metrics file.

    The file is opened once, ``O_WRONLY | O_APPEND | O_CREAT``, when the object is made.

    Raises:
        OSError: the metrics file cannot be opened (made) for appending.
    """

    def __init__(self, run_id: str, metrics_file: str, experiment: str = "") -> None:
        super().__init__(run_id, experiment)
        self.metrics_file = os.fspath(metrics_file)
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
        self._fd = os.open(self.metrics_file, flags, 0o666)

    def _emit(self, records: list) -> None:
        data = "".join(json.dumps(r, separators=(",", ":"), allow_nan=False) + "\n" for r in records).encode()
        with self._lock:
            # One write per call: O_APPEND puts the whole buffer at the end of the file at once.
            written = os.write(self._fd, data)
            while written < len(data):  # a short write (disk full, a signal): finish what we can
                written += os.write(self._fd, data[written:])
            self._remember(records)


class OfflineRun(RunContext):
    """The run context outside dockyard: log calls print ``name: value`` and are kept in memory.

    (Azure's offline run does nothing; printing lets a local run show its metrics.) Tags are
    kept, not printed.
    """

    def __init__(self, experiment: str | None = None) -> None:
        import uuid

        super().__init__(f"OfflineRun_{uuid.uuid4()}", experiment or _OFFLINE_EXPERIMENT)

    def _emit(self, records: list) -> None:
        with self._lock:
            self._remember(records)
        for r in records:
            if r["kind"] == "tag":
                continue
            value = r["value"]
            shown = json.dumps(value) if isinstance(value, (list, dict)) else str(value)
            print(f"{r['name']}: {shown}", file=sys.stdout)


class _ExperimentName(str):
    """The experiment's name as a ``str`` that also answers ``.name``."""

    @property
    def name(self) -> str:
        return str(self)


# Azure ML v1 Run methods a ported script may call that have no meaning on one machine, with
# what to do instead (shown in the NotImplementedError, instead of an AttributeError).
_AZURE_ONLY = {
    "register_model": "a model is a file: save it under outputs/ (run.upload_file) and fetch it with "
                      "run.download_file('outputs/…') or `dockyard runs show ID`",
    "get_secret": "there is no key vault: pass the value through the environment's environment_variables",
    "get_secrets": "there is no key vault: pass values through the environment's environment_variables",
    "submit_child": "child runs are not supported: submit another run with Experiment.submit",
    "child_run": "child runs are not supported: log with a prefix (run.log('fold1/acc', …)) or submit runs",
    "get_children": "child runs are not supported: list runs with Experiment.get_runs()",
    "log_accuracy_table": "log the table with run.log_table(name, {...})",
    "log_residuals": "log the values with run.log_list(name, [...])",
    "log_confusion_matrix": "log the matrix with run.log_table(name, {...}) or run.log_image(name, plot=fig)",
    "log_predictions": "log the values with run.log_table(name, {...})",
    "restore_snapshot": "the snapshot is the run's work folder: `dockyard runs show ID` names it",
}


def _copy(value: object) -> object:
    if isinstance(value, dict):
        return {k: list(v) if isinstance(v, list) else v for k, v in value.items()}
    return value


def _output_dir(name: object) -> str:
    """Like :func:`_output_path`, for a folder: ``"outputs"`` itself is allowed."""
    if isinstance(name, str) and [p for p in name.replace("\\", "/").split("/") if p not in ("", ".")] == ["outputs"]:
        return os.path.join(os.getcwd(), "outputs")
    return _output_path(name)


def _output_path(name: object) -> str:
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"an upload name must be a non-empty relative path, not {name!r}")
    if os.path.isabs(name) or name.startswith(("/", "\\")):
        raise ValueError(f"an upload name must be relative to outputs/, not absolute: {name!r}")
    parts = [p for p in name.replace("\\", "/").split("/") if p not in ("", ".")]
    if parts and parts[0] == "outputs":
        parts = parts[1:]
    if not parts or ".." in parts:
        raise ValueError(f"an upload name must name a file inside outputs/ (no '..'): {name!r}")
    return os.path.join(os.getcwd(), "outputs", *parts)


# --- the context ------------------------------------------------------------------------------

_context: RunContext | None = None
_context_pid = -1
_context_lock = threading.Lock()


def get_context(allow_offline: bool = True, used_for_context_manager: bool = False, **kwargs: object) -> RunContext:
    """The current run: a ``SubmittedRun`` under dockyard, else an ``OfflineRun``.

    Made once per process from the environment (``DOCKYARD_RUN_ID``, ``DOCKYARD_METRICS_FILE``,
    ``DOCKYARD_EXPERIMENT``) and cached; a forked child makes its own. Other arguments are
    ignored (Azure compatibility).

    Raises:
        RuntimeError: ``allow_offline=False`` and the script is not running under dockyard, or
            ``DOCKYARD_RUN_ID`` is set without ``DOCKYARD_METRICS_FILE``.
        OSError: the metrics file cannot be opened.
    """
    global _context, _context_pid
    with _context_lock:
        if _context is None or _context_pid != os.getpid():
            _context = _from_environ(os.environ)
            _context_pid = os.getpid()
        context = _context
    if not allow_offline and isinstance(context, OfflineRun):
        raise RuntimeError(
            f"get_context(allow_offline=False): this script is not running under dockyard "
            f"({ENV_RUN_ID} is not set). Submit it with dockyard (Experiment.submit or `dockyard run`), "
            "or allow an offline run, which prints its metrics"
        )
    return context


def _from_environ(environ: Mapping[str, str]) -> RunContext:
    run_id = environ.get(ENV_RUN_ID, "")
    experiment = environ.get(ENV_EXPERIMENT, "")
    if not run_id:
        return OfflineRun(experiment or None)
    metrics_file = environ.get(ENV_METRICS_FILE, "")
    if not metrics_file:
        raise RuntimeError(
            f"{ENV_RUN_ID}={run_id!r} is set but {ENV_METRICS_FILE} is not: dockyard sets both; "
            f"unset {ENV_RUN_ID} to run offline"
        )
    return SubmittedRun(run_id, metrics_file, experiment)


def _reset_context() -> None:
    """Forget the cached context (tests)."""
    global _context, _context_pid
    with _context_lock:
        _context, _context_pid = None, -1


# --- the host side ----------------------------------------------------------------------------


def read_metric_lines(path: str | os.PathLike, offset: int = 0) -> tuple:
    """The complete records after byte ``offset``, and the offset just past the last of them.

    For incremental ingestion: call again with the returned offset to get only what was
    appended since. A last line without its newline (being written, or torn by a killed run)
    is left for later; a complete line that is not a record (garbage after a torn write) is
    skipped. A missing file has no records yet.

    Returns:
        ``(records, new_offset)``: records are the decoded JSON objects, in file order.

    Raises:
        ValueError: ``offset`` is negative or past the end of the file (it was truncated).
        OSError: the file exists but cannot be read.
    """
    if offset < 0:
        raise ValueError(f"offset must be >= 0, not {offset}")
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        return [], offset
    with f:
        size = os.fstat(f.fileno()).st_size
        if size < offset:
            raise ValueError(f"{os.fspath(path)} has {size} bytes, fewer than offset {offset}: was it truncated?")
        f.seek(offset)
        data = f.read()
    end = data.rfind(b"\n")
    if end < 0:
        return [], offset
    records = []
    for line in data[:end].split(b"\n"):
        record = _parse_line(line)
        if record is not None:
            records.append(record)
    return records, offset + end + 1


def _parse_line(line: bytes) -> dict | None:
    line = line.strip()
    if not line:
        return None
    try:
        record = json.loads(line)
    except ValueError:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        return None
    if (not isinstance(record, dict) or not isinstance(record.get("kind"), str)
            or not isinstance(record.get("name"), str) or "value" not in record):
        return None
    return record


def fold_records(records: Iterable[dict], metrics: dict | None = None, tags: dict | None = None) -> tuple:
    """Fold records into ``(metrics, tags)`` (updated in place when given, else new dicts).

    ``log`` appends its value to ``metrics[name]``, ``log_list`` extends it, ``log_row`` and
    ``log_table`` append their dict; ``tag`` sets ``tags[name]`` (the last one wins). Unknown
    kinds are ignored.
    """
    metrics = {} if metrics is None else metrics
    tags = {} if tags is None else tags
    for r in records:
        kind, name, value = r.get("kind"), r.get("name"), r.get("value")
        if kind == "tag":
            tags[name] = value
        elif kind == "log_list":
            metrics.setdefault(name, []).extend(value if isinstance(value, list) else [value])
        elif kind in ("log", "log_row", "log_table"):
            metrics.setdefault(name, []).append(value)
    return metrics, tags


def read_metrics(path: str | os.PathLike) -> dict:
    """All metrics in a metrics file: ``{name: [values in order]}`` (see ``fold_records``).

    Tolerates a torn last line (a run killed mid-write); a missing file has no metrics.

    Raises:
        OSError: the file exists but cannot be read.
    """
    return fold_records(read_metric_lines(path)[0])[0]


def read_tags(path: str | os.PathLike) -> dict:
    """All tags in a metrics file: ``{key: value}`` (the last value of each key).

    Raises:
        OSError: the file exists but cannot be read.
    """
    return fold_records(read_metric_lines(path)[0])[1]
