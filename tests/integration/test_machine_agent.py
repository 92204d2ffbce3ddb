"""One agent per machine (per dockyard home): one GPU queue across workspaces, and the retirement of
an agent of the old per-workspace layout, whose runs are adopted with nothing lost.

Runs are local processes on virtual GPUs (the scheduling is the same for containers); the
adoption test uses a real container.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest
from dockyard import Environment, Experiment, ScriptRunConfig, Workspace
from dockyard.compute import agent_status, ensure_agent, stop_agent
from dockyard.gpu import LeaseStore

pytestmark = pytest.mark.engine

NAP = "import sys, time\ntime.sleep(float(sys.argv[1]))\n"


def local_env() -> Environment:
    env = Environment("local")
    env.docker.enabled = False
    env.python.interpreter_path = sys.executable
    return env


@pytest.fixture
def machine(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    home = tmp_path / "home"
    for key, value in {"DOCKYARD_HOME": str(home), "DOCKYARD_GPUS": "4", "DOCKYARD_LOCAL_MAX_RUNS": "16"}.items():
        monkeypatch.setenv(key, value)
    src = tmp_path / "src"
    src.mkdir()
    (src / "nap.py").write_text(NAP)
    yield home, src
    stop_agent(home)


def _grants_and_releases(home: Path) -> tuple[dict[str, float], dict[str, float]]:
    """First grant and last release time of each run, from the lease audit (the holder's truth)."""
    leases = LeaseStore(home)
    try:
        granted: dict[str, float] = {}
        released: dict[str, float] = {}
        for t, event, _gpu, run_id in leases.audit():
            if event == "grant":
                granted.setdefault(run_id, t)
            else:
                released[run_id] = max(released.get(run_id, 0.0), t)
        return granted, released
    finally:
        leases.close()


@pytest.mark.parametrize("unknown_factor", ["0", None])
def test_one_gpu_queue_across_workspaces_a_wide_run_is_not_starved(machine, tmp_path: Path, monkeypatch,
                                                                   unknown_factor: str | None):
    """Workspace B keeps submitting 1-GPU runs without time limits while workspace A's 4-GPU run
    waits. With ``DOCKYARD_RESERVE_UNKNOWN_FACTOR=0`` it reserves at once: it starts as soon as the
    GPUs busy at its submit are released and no later run overtakes it. By default the agent
    tells the policy when each run started, the drain is guessed from that, and the 1-GPU runs
    flow past the young wide run, which still starts within the stated bound: (1 + 30) x the
    longest runtime among the runs it waited for."""
    home, src = machine
    if unknown_factor is not None:
        monkeypatch.setenv("DOCKYARD_RESERVE_UNKNOWN_FACTOR", unknown_factor)  # read by the agent this test starts
    a, b = Workspace("team-a", home=home), Workspace("team-b", home=home)
    exp_a, exp_b = Experiment(a, "wide"), Experiment(b, "narrow")
    busy = [exp_b.submit(ScriptRunConfig(str(src), "nap.py", arguments=[3], environment=local_env(), gpus=1))
            for _ in range(3)]
    deadline = time.monotonic() + 30
    while any(r.get_status() != "Running" for r in busy):
        assert time.monotonic() < deadline, [r.get_details() for r in busy]
        time.sleep(0.05)
    submitted = time.time()
    wide = exp_a.submit(ScriptRunConfig(str(src), "nap.py", arguments=[0.5], environment=local_env(), gpus=4))
    later = []
    shown = None
    while wide.get_status() == "Queued":
        assert time.monotonic() < deadline + 30, "the 4-GPU run never started"
        if len(later) < 12:
            later.append(exp_b.submit(ScriptRunConfig(str(src), "nap.py", arguments=[1], environment=local_env(), gpus=1)))
        if shown is None and len(later) >= 2:
            out = subprocess.run([sys.executable, "-m", "dockyard", "gpus", "--json"], capture_output=True, text=True,
                                 timeout=60, env=os.environ.copy())
            shown = json.loads(out.stdout)
        time.sleep(0.2)
    assert wide.wait_for_completion()["status"] == "Completed"
    for run in later:
        assert run.wait_for_completion()["status"] == "Completed"

    granted, released = _grants_and_releases(home)
    busy_end = max(released[r.id] for r in busy)
    assert granted[wide.id] >= busy_end, "a GPU was granted twice"
    overtook = [r for r in later if granted[r.id] < granted[wide.id]]
    if unknown_factor == "0":
        assert granted[wide.id] - busy_end < 2.0, "the wide run waited after the GPUs it needed were free"
        assert overtook == [], "a later 1-GPU run without a time limit overtook the waiting 4-GPU run"
    else:
        # A free GPU and a young wide run: small runs flow (without the runs' start times the
        # agent would give no guess, and the wide run would reserve at once).
        assert overtook, "no 1-GPU run started past the young 4-GPU run: the drain was not guessed"
        for r in overtook:
            assert released[r.id] <= granted[wide.id], "a GPU was granted twice"
        longest = max(released[r.id] - granted[r.id] for r in busy + overtook)
        assert granted[wide.id] - submitted <= 31 * longest + 5.0, "the wide run waited past the bound"

    # `dockyard gpus` showed one queue: the wide run first, then workspace B's later runs.
    queue = shown["queue"]
    assert queue[0]["run"] == wide.id and queue[0]["workspace"] == "team-a"
    # (By default one of those later runs may have started on the free GPU already.)
    assert {q["workspace"] for q in queue[1:]} == {"team-b"} and len(queue) >= (3 if unknown_factor == "0" else 2)
    held = sum(g["holder"] is not None for g in shown["gpus"])
    assert len(shown["gpus"]) == 4 and (held == 3 if unknown_factor == "0" else held >= 3)


OLD_AGENT = textwrap.dedent("""
    # Stands in for an agent of the old layout: it holds <workspace folder>/agent.lock, wrote its
    # pid next to it, and stops on SIGTERM leaving its runs running (as the old agent did).
    import fcntl, os, signal, sys, time
    folder = sys.argv[1]
    lock = open(os.path.join(folder, "agent.lock"), "a+")
    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    open(os.path.join(folder, "agent.pid"), "w").write(str(os.getpid()))
    signal.signal(signal.SIGTERM, lambda *_: (open(sys.argv[2], "w").write("stopped"), sys.exit(0)))
    print("holding", flush=True)
    while True:
        time.sleep(0.1)
""")


def test_an_old_layout_agent_is_stopped_and_its_running_runs_adopted(tmp_path: Path, monkeypatch):
    home = tmp_path / "home"
    monkeypatch.setenv("DOCKYARD_HOME", str(home))
    ws = Workspace(f"old{uuid.uuid4().hex[:6]}", home=home)
    src = tmp_path / "src"
    src.mkdir()
    (src / "steps.py").write_text(
        "import time\nfrom dockyard import Run\nr = Run.get_context()\n"
        "for i in range(10):\n    r.log('step', i)\n    time.sleep(0.4)\n")
    env = Environment("py")
    env.docker.base_image = "dockyard/base:bookworm-python3"
    run = Experiment(ws, "exp").submit(ScriptRunConfig(str(src), "steps.py", environment=env))
    old = None
    try:
        deadline = time.monotonic() + 60
        while run.get_status() != "Running":
            assert time.monotonic() < deadline
            time.sleep(0.05)
        # The run's container now runs with no agent following it, and an old-layout agent holds
        # the workspace: the situation after upgrading dockyard under a running old agent.
        os.kill(agent_status(home).pid, signal.SIGKILL)
        time.sleep(0.3)
        marker = tmp_path / "old-agent-stopped"
        old = subprocess.Popen([sys.executable, "-c", OLD_AGENT, str(ws.directory), str(marker)],
                               stdout=subprocess.PIPE, text=True)
        assert old.stdout.readline().strip() == "holding"
        assert ensure_agent(home).running
        assert old.wait(timeout=30) == 0 and marker.read_text() == "stopped", "the old agent was not asked to stop"
        details = run.wait_for_completion()
        assert not (ws.directory / "agent.pid").exists(), "the old agent's pid file was left behind"
        assert details["status"] == "Completed"
        assert run.get_metrics()["step"] == list(range(10)), "metrics logged across the hand-over were lost"
        log = Path(agent_status(home).log).read_text()
        assert "stopping the old per-workspace agent" in log
    finally:
        if old is not None and old.poll() is None:
            old.kill()
        stop_agent(home)


def test_a_run_store_of_the_old_layout_is_read_and_served(tmp_path: Path, monkeypatch):
    """A store written before launchers had names (``docker`` 0/1, no ``launcher``, no target kind)."""
    import sqlite3

    home = tmp_path / "home"
    monkeypatch.setenv("DOCKYARD_HOME", str(home))
    ws = Workspace("legacy", home=home)
    src = tmp_path / "src"
    src.mkdir()
    (src / "nap.py").write_text(NAP)
    # Take a snapshot and a run folder the normal way, then write the row as the old layout did.
    from dockyard.runs import SnapshotStore

    snapshot = SnapshotStore(home / "snapshots").take(src)
    ws.directory.mkdir(parents=True)
    conn = sqlite3.connect(ws.directory / "runs.db")
    conn.executescript(OLD_SCHEMA)
    run_dir = ws.directory / "runs" / "exp_1_deadbeef"
    run_dir.mkdir(parents=True)
    conn.execute(
        "INSERT INTO runs (id, experiment, status, script, arguments, source_dir, snapshot, environment, compute,"
        " docker, created, run_dir, gpu_request) VALUES (?, 'exp', 'Queued', 'nap.py', '[\"0.1\"]', ?, ?, ?, 'local',"
        " 0, ?, ?, '{}')",
        ("exp_1_deadbeef", str(src), snapshot.id, json.dumps(local_env().to_dict()), time.time(), str(run_dir)),
    )
    conn.execute("INSERT INTO computes (name, max_nodes, vm_size, created) VALUES ('old-target', 2, '', 0)")
    conn.commit()
    conn.close()
    try:
        run = ws.get_run("exp_1_deadbeef")  # revives an agent: the run is unfinished
        assert run.wait_for_completion()["status"] == "Completed"
        assert ws.store.get(run.id).launcher == "process"
        assert ws.store.compute("old-target").kind == "local"
    finally:
        stop_agent(home)


# The runs.db schema before this layout (launchers as `docker` 0/1, compute targets without a kind).
OLD_SCHEMA = """
CREATE TABLE runs (
    id TEXT PRIMARY KEY, experiment TEXT NOT NULL, status TEXT NOT NULL, script TEXT NOT NULL,
    arguments TEXT NOT NULL, source_dir TEXT NOT NULL, snapshot TEXT NOT NULL, environment TEXT NOT NULL,
    compute TEXT NOT NULL, docker INTEGER NOT NULL, image TEXT NOT NULL DEFAULT '', gpus TEXT NOT NULL DEFAULT '[]',
    exit_code INTEGER, reason TEXT NOT NULL DEFAULT '', container_id TEXT NOT NULL DEFAULT '', pid INTEGER,
    created REAL NOT NULL, started REAL, ended REAL, cancel_requested INTEGER NOT NULL DEFAULT 0,
    metrics_offset INTEGER NOT NULL DEFAULT 0, run_dir TEXT NOT NULL, gpu_request TEXT NOT NULL DEFAULT '{}'
);
CREATE INDEX runs_status ON runs(status, created);
CREATE TABLE metrics (run_id TEXT NOT NULL, seq INTEGER NOT NULL, name TEXT NOT NULL, kind TEXT NOT NULL,
    value TEXT NOT NULL, t REAL NOT NULL, PRIMARY KEY (run_id, seq));
CREATE TABLE computes (name TEXT PRIMARY KEY, max_nodes INTEGER NOT NULL, vm_size TEXT NOT NULL DEFAULT '',
    created REAL NOT NULL);
"""


def test_an_agent_of_other_code_is_replaced_and_its_running_run_adopted(machine, tmp_path: Path):
    home, src = machine
    (src / "steps.py").write_text(
        "import time\nfrom dockyard import Run\nr = Run.get_context()\n"
        "for i in range(8):\n    r.log('step', i)\n    time.sleep(0.3)\n")
    ws = Workspace(f"up{uuid.uuid4().hex[:6]}", home=home)
    run = Experiment(ws, "exp").submit(ScriptRunConfig(str(src), "steps.py", environment=local_env()))
    deadline = time.monotonic() + 60
    while run.get_status() != "Running":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    first = agent_status(home).pid
    assert (home / "agent.code").read_text().strip(), "the agent says which code it runs"
    # What an upgrade under a running agent looks like from outside: its code id is not ours.
    (home / "agent.code").write_text("0123456789abcdef")
    old = time.time() - 60
    os.utime(home / "agent.pid", (old, old))
    status = ensure_agent(home)
    assert status.running and status.pid != first, "the agent of other code was replaced"
    done = subprocess.run([sys.executable, "-m", "dockyard", "run", "steps.py", "--source", str(src),
                           "--workspace", ws.name, "--json"], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "DOCKYARD_HOME": str(home)})
    assert done.returncode == 0, done.stderr
    assert run.wait_for_completion()["status"] == "Completed"
    assert run.get_metrics()["step"] == list(range(8)), "nothing lost across the hand-over"
    assert (home / "agent.code").read_text().strip() != "0123456789abcdef"
