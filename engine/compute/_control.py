"""The machine's agent from the outside: is it running, start it, wake it, stop it.

One agent per dockyard home serves every workspace under it. It holds an exclusive ``flock`` on
``<home>/agent.lock`` (the kernel releases it even on ``kill -9``) and writes its pid to
``<home>/agent.pid``. Cheap on purpose: a submit calls :func:`ensure_agent` and pays one ``open``,
one ``flock`` and one signal when the agent runs.
"""

from __future__ import annotations

import fcntl
import os
import re
import signal
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

__all__ = ["AgentStatus", "agent_files", "agent_status", "ensure_agent", "runs_other_code", "stop_agent",
           "wake_agent"]

# The agent process is started by module name (not imported): it is the compute room's Agent with
# the CLI's front door open, so it lives with the CLI.
AGENT_MODULE = "dockyard.cli._daemon"
# Registry passwords reach dockyard through variables (``password_env``); a long-lived agent must
# not inherit them from whichever process happened to start it.
_SECRET_NAME = re.compile(r"(?i)passw(or)?d")


@dataclass(frozen=True)
class AgentFiles:
    lock: Path
    pid: Path
    log: Path
    code: Path  # the code id of the dockyard the agent runs (see dockyard._codeid)


def agent_files(home: Path) -> AgentFiles:
    home = Path(home)
    return AgentFiles(home / "agent.lock", home / "agent.pid", home / "agent.log", home / "agent.code")


def runs_other_code(home: Path) -> bool:
    """The running agent of ``home`` runs another dockyard than this process (an upgrade, an edit)."""
    from .._codeid import code_id

    try:
        return agent_files(home).code.read_text().strip() != code_id()
    except OSError:
        return True  # an agent from before code ids, or one still starting: not known to match


@dataclass(frozen=True)
class AgentStatus:
    running: bool
    pid: int | None
    log: str

    def to_json(self) -> dict[str, object]:
        return {"running": self.running, "pid": self.pid, "log": self.log}


def lock_holder(lock: Path, pid_file: Path) -> tuple[bool, int | None]:
    """(someone holds ``lock``, the pid in ``pid_file``) without disturbing the holder."""
    try:
        fh = open(lock, "a+")
    except FileNotFoundError:
        return False, None
    with fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                text = pid_file.read_text().strip()
            except OSError:
                text = ""
            return True, int(text) if text.isdigit() else None
        fcntl.flock(fh, fcntl.LOCK_UN)
    return False, None


def agent_status(home: Path) -> AgentStatus:
    """Whether the machine's agent for ``home`` runs, its pid and its log."""
    files = agent_files(home)
    files.lock.parent.mkdir(parents=True, exist_ok=True)
    running, pid = lock_holder(files.lock, files.pid)
    return AgentStatus(running, pid if running else None, str(files.log))


# A run's own variables, when a run itself submits (the agent must not pass for that run).
_RUN_VARIABLES = ("DOCKYARD_RUN_ID", "DOCKYARD_METRICS_FILE", "DOCKYARD_EXPERIMENT")


def _agent_environment(scrub: Iterable[str]) -> dict[str, str]:
    drop = {*scrub, *_RUN_VARIABLES}
    return {k: v for k, v in os.environ.items() if k not in drop and not _SECRET_NAME.search(k)}


def ensure_agent(home: Path, *, wait: float = 10.0, scrub: Iterable[str] = ()) -> AgentStatus:
    """Start the agent for ``home`` unless one runs (then wake it: there is work); return its status.

    The agent is started with this process's environment minus the variables named in ``scrub``
    (an environment's ``password_env``) and any whose name says password: it lives long, and its
    environment is readable by its user's other processes.
    """
    status = agent_status(home)
    if status.running and runs_other_code(home) and _started_long_enough_ago(home):
        # An agent of another dockyard version would run new submissions with old code: replace it.
        # Its runs keep running; the new agent adopts them (and their GPU leases).
        stop_agent(home, wait=wait)
        status = agent_status(home)
    if status.running:
        if status.pid:
            try:
                os.kill(status.pid, signal.SIGUSR1)  # "there is work": no waiting for the next poll
            except ProcessLookupError:
                pass
        return status
    import subprocess

    files = agent_files(home)
    with open(files.log, "ab") as log:
        subprocess.Popen(
            [sys.executable, "-m", AGENT_MODULE, "--home", str(home)],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=_agent_environment(scrub),
            start_new_session=True,  # outlives the submitting process and its Ctrl-C
            close_fds=True,
        )
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        status = agent_status(home)
        if status.running:
            return status
        time.sleep(0.02)
    return status


def _started_long_enough_ago(home: Path) -> bool:
    """The agent had time to write its code id (a just-started one is still importing)."""
    try:
        return time.time() - agent_files(home).pid.stat().st_mtime > 5.0
    except OSError:
        return True


def stop_agent(home: Path, *, wait: float = 10.0) -> bool:
    """Ask the agent to stop (SIGTERM); runs keep running and are adopted by the next agent."""
    status = agent_status(home)
    if not status.running or not status.pid:
        return False
    try:
        os.kill(status.pid, signal.SIGTERM)
    except ProcessLookupError:
        return False
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline and agent_status(home).running:
        time.sleep(0.05)
    return True


def wake_agent(home: Path) -> bool:
    """Start the agent if any workspace of ``home`` has unfinished runs and none runs (it was killed):
    someone is always awake while a run is unfinished. Returns whether one was started."""
    if agent_status(home).running:
        return False
    from .._home import workspace_folders
    from ..runs import RunStatus, RunStore

    for folder in workspace_folders(Path(home)):
        store = RunStore(folder)
        try:
            unfinished = store.list(statuses=(RunStatus.QUEUED, RunStatus.RUNNING), limit=1)
        except Exception:  # noqa: BLE001 - a damaged store must not stop the others waking the agent
            unfinished = []
        finally:
            store.close()
        if unfinished:
            return ensure_agent(home).running
    return False
