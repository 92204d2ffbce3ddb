"""The agent: the one background process of a dockyard home. It serves every workspace under it,
starting queued runs when their compute target has room, following them and recording how they end.

Crash safety comes from where state lives, not from the agent: a run's output goes straight from
the container (or process) into files under its run folder, its metrics into an append-only file,
its exit code into Docker (or, for local processes, a file the wrapper shell writes). A restarted
agent therefore adopts running containers and processes, resumes metric ingestion at the recorded
offset, and marks runs whose container or process vanished ``Failed`` with the reason.

Two agents never run at once: each holds an exclusive ``flock`` on ``<home>/agent.lock``. An agent
of the old layout (one per workspace, holding ``<workspace folder>/agent.lock``) is stopped when
this one starts; its runs keep running and are adopted like any others.
"""

from __future__ import annotations

import fcntl
import os
import select
import signal
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from .. import _wire
from .._home import dockyard_home, workspace_folders
from ..dockerd import EngineClient
from ..errors import DockyardError
from ..runs import LOCAL_KIND, ComputeRecord, RunStatus, RunStore
from ._backend import AgentRun, RunEvents, backend_class
from ._control import agent_files, lock_holder
from ._frontdoor import FrontDoor, Handler
from ._targets import LOCAL_COMPUTE, default_max_nodes

__all__ = ["Agent"]

_OLD_AGENT_GRACE_S = 10.0


class Agent:
    """One reconcile loop over every workspace of a home. Use :meth:`serve` (holds the lock) or :meth:`step`."""

    def __init__(self, home: Path | None = None, *, engine: EngineClient | None = None, poll: float = 0.2,
                 front_door: Handler | None = None) -> None:
        self.home = Path(home) if home is not None else dockyard_home()
        self.engine = engine or EngineClient.from_env()
        self.poll = poll
        self._front_door_handler = front_door
        self._stores: dict[Path, RunStore] = {}
        self._backends: dict[str, Any] = {}
        self._stopping = False  # set by SIGTERM/SIGINT
        self._wake = _Waker()  # set by SIGUSR1 (a submit) or by a run that just ended
        self._log_lock = threading.Lock()
        self._logged: dict[str, tuple[str, float]] = {}
        self._warned_empty: set[Path] = set()
        self.events = RunEvents(self.store, self.log)

    def log(self, message: str) -> None:
        """One line in the agent's log. Never raises: a full disk must not kill the agent."""
        with self._log_lock:
            try:
                sys.stdout.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {message}\n")
                sys.stdout.flush()
            except (OSError, ValueError):
                pass

    def log_once(self, topic: str, message: str, every: float = 60.0) -> None:
        """Log ``message`` unless the same one was logged for ``topic`` within ``every`` seconds."""
        now = time.monotonic()
        last = self._logged.get(topic)
        if last is None or last[0] != message or now - last[1] > every:
            self._logged[topic] = (message, now)
            self.log(message)

    def store(self, workspace: Path) -> RunStore:
        """The run store of a workspace folder, opened once for the agent's life."""
        workspace = Path(workspace)
        found = self._stores.get(workspace)
        if found is None:
            found = self._stores[workspace] = RunStore(workspace)
        return found

    def backend(self, kind: str) -> Any:
        """The backend serving compute targets of ``kind``. Raises: InputError: no such backend."""
        found = self._backends.get(kind)
        if found is None:
            found = self._backends[kind] = backend_class(kind)(
                home=self.home, events=self.events, engine=self.engine, wake=self._wake.set)
        return found

    # -- serving --------------------------------------------------------------------------------

    def serve(self) -> int:
        """Hold the agent lock and loop until SIGTERM/SIGINT. Returns 0, or 1 if another agent runs."""
        files = agent_files(self.home)
        self.home.mkdir(parents=True, exist_ok=True)
        lock = open(files.lock, "a+")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.log(f"another agent already serves {self.home}; exiting")
            return 1
        # Handlers first: a client signals the agent as soon as it sees the pid file, and SIGUSR1's
        # default action would kill an agent that has not installed its handler yet.
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_stop_signal)
        signal.signal(signal.SIGUSR1, lambda *_: self._wake.set())
        files.pid.write_text(str(os.getpid()))
        from .._codeid import code_id

        files.code.write_text(code_id(fresh=True))  # clients hand work only to an agent of their code
        self.log(f"agent {os.getpid()} serving every workspace of {self.home}")
        self._retire_old_agents()
        threading.Thread(target=self._prewarm, name="prewarm", daemon=True).start()
        door = None
        if self._front_door_handler is not None:
            door = FrontDoor(self.home / _wire.SOCKET_NAME, self._front_door_handler, self.log)
            try:
                door.start()
            except OSError as exc:  # clients then take their own path: slower, never wrong
                self.log(f"front door unavailable: {exc}")
                door = None
        while not self._stopping:
            try:
                self.step()
            except Exception as exc:  # noqa: BLE001 - the agent keeps serving whatever one pass hit
                self.log_once("pass", f"pass failed: {type(exc).__name__}: {exc}")
            # Polling is the fallback; submits (SIGUSR1) and run exits wake the loop at once.
            self._wake.wait(self.poll)
        self.log("agent stopping; running runs keep running and will be adopted")
        if door is not None:
            door.close()
        for backend in self._backends.values():
            backend.close()
        return 0

    def _on_stop_signal(self, *_: object) -> None:
        self._stopping = True
        self._wake.set()

    def _prewarm(self) -> None:
        try:
            self.backend(LOCAL_KIND).prewarm()
        except Exception as exc:  # noqa: BLE001 - only a head start; the first run retries it
            self.log(f"prewarm failed: {type(exc).__name__}: {exc}")

    def _retire_old_agents(self) -> None:
        """Stop agents of the old layout (one per workspace); their runs are adopted by this one."""
        for folder in workspace_folders(self.home):
            lock, pid_file = folder / "agent.lock", folder / "agent.pid"
            held, pid = lock_holder(lock, pid_file)
            if not held:
                continue
            self.log(f"stopping the old per-workspace agent of {folder} (pid {pid}); adopting its runs")
            if pid:
                try:
                    os.kill(pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + _OLD_AGENT_GRACE_S
            while lock_holder(lock, pid_file)[0] and time.monotonic() < deadline:
                time.sleep(0.05)
            if lock_holder(lock, pid_file)[0] and pid:
                try:
                    os.kill(pid, signal.SIGKILL)  # it ignored SIGTERM: runs survive it either way
                except ProcessLookupError:
                    pass
            pid_file.unlink(missing_ok=True)

    # -- one pass -------------------------------------------------------------------------------

    def _collect(self) -> tuple[list[AgentRun], list[AgentRun]]:
        """Every workspace's queued and running runs, oldest first, each with its compute target."""
        queued: list[AgentRun] = []
        running: list[AgentRun] = []
        for folder in workspace_folders(self.home):
            store = self.store(folder)
            try:
                records = store.unfinished()
            except DockyardError as exc:  # one damaged workspace must not stop the others
                self.log_once(f"store:{folder}", f"workspace {folder.name} cannot be read: {exc}")
                continue
            if store.was_empty and store.path not in self._warned_empty:
                self._warned_empty.add(store.path)
                self.log(f"warning: {store.path} was an empty file (0 bytes) when opened: "
                         "whatever runs it held are gone")
            for damaged in store.damaged:
                self.log_once(f"damaged:{folder}:{damaged}", f"workspace {folder.name}: {damaged}")
            targets: dict[str, ComputeRecord] = {}
            for record in records:
                target = targets.get(record.compute)
                if target is None:
                    target = store.compute(record.compute)
                    if target is None:  # the implicit `local`, or a target deleted meanwhile
                        target = ComputeRecord(record.compute, default_max_nodes() if record.compute == LOCAL_COMPUTE else 0)
                    targets[record.compute] = target
                (running if record.status == RunStatus.RUNNING else queued).append(AgentRun(folder, record, target))
        queued.sort(key=lambda r: (r.record.created, r.id))
        return queued, running

    def step(self) -> None:
        """Follow running runs, honour cancels, start what fits, in every workspace."""
        queued, running = self._collect()
        for run in running:
            try:
                self.backend(run.target.kind).poll(run)
            except DockyardError as exc:
                self.log_once(f"poll:{run.id}", f"{run.id}: following it failed: {exc}")
        by_kind: dict[str, tuple[list[AgentRun], list[AgentRun]]] = defaultdict(lambda: ([], []))
        for run in queued:  # a queued run's cancel is its backend's: it may be starting it right now
            by_kind[run.target.kind][0].append(run)
        for run in running:
            by_kind[run.target.kind][1].append(run)
        for kind, (waiting, active) in by_kind.items():
            try:
                backend = self.backend(kind)
            except DockyardError as exc:
                for run in waiting:
                    if run.record.cancel_requested:
                        self.events.canceled(run)
                    else:
                        self.events.note(run, exc.message)
                continue
            backend.dispatch(waiting, active)
        for kind, backend in list(self._backends.items()):
            idle = getattr(backend, "idle", None)  # housekeeping of a backend with no run this pass
            if kind not in by_kind and idle is not None:
                try:
                    idle()
                except DockyardError as exc:
                    self.log_once(f"idle:{kind}", f"the {kind} backend's housekeeping failed: {exc}")


class _Waker:
    """What wakes the loop: a pipe, not a ``threading.Event``.

    Signal handlers run in the main thread between any two bytecodes — possibly while it holds an
    Event's lock inside ``wait()`` — so a handler that sets an Event can deadlock the agent (it did,
    under a burst of submits). Writing a byte to a pipe takes no lock; the loop waits with select.
    """

    def __init__(self) -> None:
        self._read, self._write = os.pipe()
        os.set_blocking(self._read, False)
        os.set_blocking(self._write, False)

    def set(self) -> None:
        try:
            os.write(self._write, b"!")
        except (BlockingIOError, OSError):
            pass  # the pipe is full: the loop is already due to wake

    def wait(self, timeout: float) -> None:
        readable, _, _ = select.select([self._read], [], [], timeout)
        if readable:
            try:
                while os.read(self._read, 4096):
                    pass
            except (BlockingIOError, OSError):
                pass
