"""Runs as local processes (``docker.enabled = False``): a shell wrapper writes the exit code.

The wrapper (``sh -c '"$0" "$@" >>log 2>&1; echo $? >exit_code'``) is the process's own session
leader, so it outlives the agent that started it, and its exit code lands in the run folder
whoever is watching — a later agent adopts the process by pid and reads the file.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

from ..errors import EnvironmentProblem
from ._types import LaunchHandle, LaunchSpec, Observation

__all__ = ["ProcessLauncher", "pid_alive"]


def pid_alive(pid: int | None) -> bool:
    """Whether ``pid`` is a live process (a zombie has exited)."""
    if not pid:
        return False
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


class ProcessLauncher:
    """Starts a run as a local process group; keeps the child objects it started so they are reaped."""

    kind = "process"

    def __init__(self) -> None:
        self._children: dict[str, subprocess.Popen[bytes]] = {}
        self._exit_files: dict[str, str] = {}
        self._lock = threading.Lock()

    def launch(self, spec: LaunchSpec, *, on_created: Callable[[LaunchHandle], None]) -> LaunchHandle:
        """Raises: EnvironmentProblem: the interpreter or the working directory is missing."""
        if not spec.exit_code_path:
            raise ValueError(f"run {spec.run_id}: a process launch needs an exit code file")
        wrapper = f'"$0" "$@" >>"{spec.log_path}" 2>&1; echo $? >"{spec.exit_code_path}"'
        try:
            proc = subprocess.Popen(
                ["/bin/sh", "-c", wrapper, *spec.argv],
                cwd=spec.workdir,
                env={**os.environ, **spec.env},
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # its own process group: cancel signals the whole tree
            )
        except OSError as exc:
            raise EnvironmentProblem(f"cannot start run {spec.run_id} as a process: {exc}") from exc
        handle = LaunchHandle("process", str(proc.pid))
        with self._lock:
            self._children[handle.ref] = proc
            self._exit_files[handle.ref] = spec.exit_code_path
        on_created(handle)
        return handle

    def adopt(self, handle: LaunchHandle, exit_code_path: str) -> None:
        """Follow a process an earlier agent started (its exit code will be in ``exit_code_path``)."""
        with self._lock:
            self._exit_files.setdefault(handle.ref, exit_code_path)

    def poll(self, handle: LaunchHandle) -> Observation:
        with self._lock:
            proc = self._children.get(handle.ref)
            exit_file = self._exit_files.get(handle.ref)
        alive = proc.poll() is None if proc is not None else pid_alive(int(handle.ref))
        if alive:
            return Observation("running")
        with self._lock:
            self._children.pop(handle.ref, None)
        text = Path(exit_file).read_text().strip() if exit_file and os.path.exists(exit_file) else ""
        if text.lstrip("-").isdigit():
            return Observation("exited", exit_code=int(text))
        return Observation("gone", reason="the run's process ended without an exit code (killed?)")

    def wait(self, handle: LaunchHandle) -> None:
        with self._lock:
            proc = self._children.get(handle.ref)
        if proc is not None:
            proc.wait()
            return
        while pid_alive(int(handle.ref)):  # not our child: no wait() to block in
            time.sleep(0.2)

    def stop(self, handle: LaunchHandle, grace_s: float = 5.0) -> None:
        try:
            os.killpg(int(handle.ref), signal.SIGTERM)
        except ProcessLookupError:
            pass

    def remove(self, handle: LaunchHandle) -> None:
        with self._lock:
            self._exit_files.pop(handle.ref, None)
