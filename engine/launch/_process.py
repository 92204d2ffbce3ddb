"""Runs as local processes (``docker.enabled = False``): a shell wrapper writes the exit code.

The wrapper is its own session leader, so it outlives the agent that started it, and its exit code
lands in the run folder whoever is watching — a later agent adopts the process and reads the file.
A process is known to be a run's by its environment (``DOCKYARD_RUN_ID``), never by its pid alone
(pids are reused). Paths and arguments reach the wrapper as argv elements, never as shell text.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

from ..errors import EnvironmentProblem
from ._types import LaunchHandle, LaunchSpec, Observation

__all__ = ["RUN_ID_VARIABLE", "ProcessLauncher", "pid_alive"]

#: The variable that names a process's run (set for every run; the in-run API reads it too).
RUN_ID_VARIABLE = "DOCKYARD_RUN_ID"
# $1 the log, $2 the exit code file, the rest the command. `1<>` writes the code over the
# placeholder written at launch without truncating it: no new disk block is needed on a full disk.
_WRAPPER = 'log=$1 code=$2; shift 2; "$@" >>"$log" 2>&1; echo $? 1<>"$code"'
_PLACEHOLDER = " " * 15 + "\n"
# What a local process inherits from the agent besides its environment's declared variables and
# dockyard's own: enough to find programs and libraries (the host's CUDA and driver libraries
# included) and behave like a login's shell, and nothing secret.
_INHERITED = ("PATH", "HOME", "USER", "LOGNAME", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "TMPDIR", "SHELL",
              "LD_LIBRARY_PATH")


def pid_alive(pid: int | None) -> bool:
    """Whether ``pid`` is a live process (a zombie has exited)."""
    if not pid:
        return False
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _run_of(pid: int) -> str | None:
    """The run a process belongs to (from its environment), if it is one of this user's runs."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as fh:
            environ = fh.read()
    except OSError:  # gone, or another user's
        return None
    marker = RUN_ID_VARIABLE.encode() + b"="
    for entry in environ.split(b"\0"):
        if entry.startswith(marker):
            return entry[len(marker):].decode(errors="replace")
    return None


def _session_leaders() -> Iterator[int]:
    """Live processes that lead their own session (every run's wrapper does)."""
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        pid = int(name)
        try:
            if os.getsid(pid) == pid and pid_alive(pid):
                yield pid
        except OSError:
            continue


class ProcessLauncher:
    """Starts a run as a local process group; keeps the child objects it started so they are reaped."""

    kind = "process"

    def __init__(self, inherited: Mapping[str, str] | None = None) -> None:
        source = os.environ if inherited is None else inherited
        self._inherited = {k: source[k] for k in _INHERITED if k in source}
        self._children: dict[str, subprocess.Popen[bytes]] = {}
        self._exit_files: dict[str, str] = {}
        self._lock = threading.Lock()

    def launch(self, spec: LaunchSpec, *, on_created: Callable[[LaunchHandle], None]) -> LaunchHandle:
        """Raises: EnvironmentProblem: the interpreter, the working directory or the disk is missing."""
        if not spec.exit_code_path:
            raise ValueError(f"run {spec.run_id}: a process launch needs an exit code file")
        env = {**self._inherited, **spec.env, RUN_ID_VARIABLE: spec.run_id}
        try:
            Path(spec.exit_code_path).write_text(_PLACEHOLDER)  # the block the exit code will need
            proc = subprocess.Popen(
                ["/bin/sh", "-c", _WRAPPER, "dockyard-run", spec.log_path, spec.exit_code_path, *spec.argv],
                cwd=spec.workdir,
                env=env,
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # its own process group: cancel signals the whole tree
            )
        except OSError as exc:
            raise EnvironmentProblem(f"cannot start run {spec.run_id} as a process: {exc}") from exc
        handle = LaunchHandle("process", str(proc.pid), spec.run_id)
        with self._lock:
            self._children[handle.ref] = proc
            self._exit_files[handle.ref] = spec.exit_code_path
        on_created(handle)
        return handle

    def adopt(self, handle: LaunchHandle, exit_code_path: str) -> None:
        """Follow a process an earlier agent started (its exit code will be in ``exit_code_path``)."""
        with self._lock:
            self._exit_files.setdefault(handle.ref, exit_code_path)

    def _alive(self, handle: LaunchHandle) -> bool:
        with self._lock:
            proc = self._children.get(handle.ref)
        if proc is not None:
            return proc.poll() is None
        pid = int(handle.ref)
        # Not our child: alive only while that pid is still this run's (pids are reused).
        return pid_alive(pid) and (not handle.run_id or _run_of(pid) == handle.run_id)

    def poll(self, handle: LaunchHandle) -> Observation:
        if self._alive(handle):
            return Observation("running")
        with self._lock:
            self._children.pop(handle.ref, None)
            exit_file = self._exit_files.get(handle.ref)
        try:
            text = Path(exit_file).read_text().strip() if exit_file else ""
        except OSError:
            text = ""
        if text.lstrip("-").isdigit():
            return Observation("exited", exit_code=int(text))
        return Observation("gone", reason="the run's process ended without an exit code (killed?)")

    def wait(self, handle: LaunchHandle) -> None:
        with self._lock:
            proc = self._children.get(handle.ref)
        if proc is not None:
            proc.wait()
            return
        while self._alive(handle):  # not our child: no wait() to block in
            time.sleep(0.2)

    def stop(self, handle: LaunchHandle, grace_s: float = 5.0) -> None:
        if not self._alive(handle):
            return  # never signal a pid that is no longer the run's
        try:
            os.killpg(int(handle.ref), signal.SIGTERM)
        except ProcessLookupError:
            pass

    def remove(self, handle: LaunchHandle) -> None:
        with self._lock:
            self._exit_files.pop(handle.ref, None)

    def find(self, run_id: str) -> LaunchHandle | None:
        """The live wrapper process of ``run_id`` (an earlier agent started it), else None."""
        for pid in _session_leaders():
            if _run_of(pid) == run_id:
                return LaunchHandle("process", str(pid), run_id)
        return None

    def live_runs(self) -> set[str]:
        """Every run with a live wrapper process on this machine."""
        return {run for run in (_run_of(pid) for pid in _session_leaders()) if run}
