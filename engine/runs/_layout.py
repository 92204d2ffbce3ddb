"""The run folder: the one module that knows what lives where in it, on the host and in a container.

::

    <workspace folder>/runs/<run id>/
        work/       the source snapshot, materialised (the script's working directory)
        outputs/    what the script writes to ./outputs (kept after the run)
        meta/       std.log (stdout and stderr, in order), metrics.jsonl, exit_code (processes)

Inside a container the same folders are bind-mounted at fixed paths (``CONTAINER_*``), and
dockyard's own package is mounted read-only for the in-run API. Runs expose their files under
Azure ML's names: ``outputs/…`` and ``logs/std.log``.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = [
    "CONTAINER_LIB",
    "CONTAINER_META",
    "CONTAINER_WORK",
    "LOG_NAME",
    "RunFolder",
]

CONTAINER_WORK = "/workspace"
CONTAINER_META = "/dockyard/meta"
#: dockyard's package is mounted at ``<CONTAINER_LIB>/dockyard`` and this folder is on PYTHONPATH.
CONTAINER_LIB = "/opt/dockyard/lib"
#: The name under which a run's output is listed (Azure ML's).
LOG_NAME = "logs/std.log"
_TAIL_BYTES = 64 * 1024


class RunFolder:
    """The folder of one run (nothing is created until :meth:`prepare`)."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self.work = self.root / "work"
        self.outputs = self.root / "outputs"
        self.meta = self.root / "meta"
        self.log = self.meta / "std.log"
        self.metrics = self.meta / "metrics.jsonl"
        self.exit_code = self.meta / "exit_code"

    def __repr__(self) -> str:
        return f"RunFolder({str(self.root)!r})"

    def prepare(self) -> None:
        """Create ``meta/`` and ``outputs/`` (``work/`` is made by materialising the snapshot)."""
        self.meta.mkdir(parents=True, exist_ok=True)
        self.outputs.mkdir(parents=True, exist_ok=True)

    def link_outputs(self) -> None:
        """For a local process: make ``work/outputs`` the run's ``outputs/`` (a relative symlink), as
        a container's mount does, so what the script writes to ./outputs is collected the same way.
        Files the snapshot had there move into ``outputs/`` first."""
        import shutil

        inside = self.work / "outputs"
        if inside.is_symlink() or (inside.exists() and not inside.is_dir()):
            return  # already linked, or a file the script owns: left alone
        if inside.is_dir():
            for item in inside.iterdir():
                if not (self.outputs / item.name).exists():
                    shutil.move(str(item), str(self.outputs / item.name))
            shutil.rmtree(inside)
        inside.symlink_to(os.path.relpath(self.outputs, self.work))

    # -- in a container ---------------------------------------------------------------------------

    @property
    def container_log(self) -> str:
        return f"{CONTAINER_META}/std.log"

    @property
    def container_metrics(self) -> str:
        return f"{CONTAINER_META}/metrics.jsonl"

    def container_mounts(self, library: Path) -> list[tuple[str, str, bool]]:
        """(host folder, container path, read-only): work, outputs, meta, and dockyard's package."""
        return [
            (str(self.work), CONTAINER_WORK, False),
            (str(self.outputs), f"{CONTAINER_WORK}/outputs", False),
            (str(self.meta), CONTAINER_META, False),
            (str(library), f"{CONTAINER_LIB}/dockyard", True),
        ]

    # -- files as a run lists them ----------------------------------------------------------------

    def file_names(self) -> list[str]:
        """``outputs/…`` files, then ``logs/std.log`` when the run printed anything."""
        names = sorted(
            "outputs/" + p.relative_to(self.outputs).as_posix() for p in self.outputs.rglob("*") if p.is_file()
        )
        if self.log.exists():
            names.append(LOG_NAME)
        return names

    def path_of(self, name: str) -> Path | None:
        """The host path of a listed file name, or None when the run has no such file."""
        if name == LOG_NAME:
            return self.log if self.log.exists() else None
        return self.root / name if name in self.file_names() else None

    # -- the output log ---------------------------------------------------------------------------

    def log_size(self) -> int:
        try:
            return self.log.stat().st_size
        except OSError:
            return 0

    def read_log(self, offset: int = 0, limit: int = -1) -> bytes:
        """Bytes of the log from ``offset`` (b"" when there is no log yet)."""
        try:
            with open(self.log, "rb") as fh:
                fh.seek(offset)
                return fh.read(limit)
        except FileNotFoundError:
            return b""

    def log_tail(self, lines: int = 30) -> str:
        """The last ``lines`` lines of the output (read from the end: logs may be gigabytes)."""
        size = self.log_size()
        if not size:
            return ""
        data = self.read_log(max(0, size - _TAIL_BYTES)).decode("utf-8", errors="replace")
        return "\n".join(data.splitlines()[-lines:])
