"""Faults a hostile operator causes, one guarantee each: a waiter revives a killed agent, damage is
contained to what is damaged, a full disk is survived and named, secrets stay out of the agent and
the runs, and no path is ever shell text."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from dockyard import Experiment, ScriptRunConfig, Workspace
from dockyard.compute import agent_status, ensure_agent, stop_agent
from helpers.runs import local_env, python_env, source

pytestmark = pytest.mark.engine



@pytest.fixture
def ws(workspace):
    return workspace


def wait_status(run, status: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while run.get_status() != status:
        assert time.monotonic() < deadline, run.get_details()
        time.sleep(0.05)


def test_a_waiter_revives_an_agent_killed_in_the_middle_of_its_run(ws, tmp_path):
    src = source(tmp_path, "nap.py", "import time\nprint('up', flush=True)\ntime.sleep(3)\nprint('down')\n")
    run = Experiment(ws, "exp").submit(ScriptRunConfig(str(src), "nap.py", environment=local_env()))
    wait_status(run, "Running")
    os.kill(agent_status(ws.home).pid, signal.SIGKILL)
    time.sleep(0.3)
    assert not agent_status(ws.home).running
    details = run.wait_for_completion()  # it must not hang: the waiter starts an agent again
    assert details["status"] == "Completed"
    assert "down" in Path(details["logFiles"]["logs/std.log"]).read_text()


def test_a_damaged_row_fails_its_own_run_and_the_others_go_on(ws, tmp_path):
    src = source(tmp_path, "ok.py", "print('fine')\n")
    stop_agent(ws.home)
    exp = Experiment(ws, "exp")
    damaged = exp.submit(ScriptRunConfig(str(src), "ok.py", environment=local_env()))
    stop_agent(ws.home)
    conn = sqlite3.connect(ws.directory / "runs.db")
    conn.execute("UPDATE runs SET status = 'Queued', environment = '{not json' WHERE id = ?", (damaged.id,))
    conn.commit()
    conn.close()
    healthy = exp.submit(ScriptRunConfig(str(src), "ok.py", environment=local_env()))
    assert healthy.wait_for_completion()["status"] == "Completed", "one bad row stopped every run"
    conn = sqlite3.connect(ws.directory / "runs.db")
    status, reason = conn.execute("SELECT status, reason FROM runs WHERE id = ?", (damaged.id,)).fetchone()
    conn.close()
    assert status == "Failed" and "damaged" in reason and "runs.db" in reason
    log = Path(agent_status(ws.home).log).read_text()
    assert log.count(f"run {damaged.id}: its row") == 1, "the damage is reported once, not every pass"


def test_a_garbled_lease_store_stops_gpu_runs_only_and_says_why(ws, tmp_path, monkeypatch):
    monkeypatch.setenv("DOCKYARD_GPUS", "2")
    src = source(tmp_path, "ok.py", "print('fine')\n")
    stop_agent(ws.home)
    ws.home.mkdir(parents=True, exist_ok=True)
    (ws.home / "gpus.db").write_bytes(os.urandom(8192))
    exp = Experiment(ws, "exp")
    gpu_run = exp.submit(ScriptRunConfig(str(src), "ok.py", environment=local_env(), gpus=1))
    cpu_run = exp.submit(ScriptRunConfig(str(src), "ok.py", environment=local_env()))
    assert cpu_run.wait_for_completion()["status"] == "Completed"
    deadline = time.monotonic() + 30
    while "GPU leases cannot be read" not in ws.store.get(gpu_run.id).reason:
        assert time.monotonic() < deadline, ws.store.get(gpu_run.id)
        time.sleep(0.1)
    assert gpu_run.get_status() == "Queued"
    # A foreground `dockyard run` that cannot start says why, instead of waiting in silence.
    (tmp_path / "env.yml").write_text("name: local\ndocker:\n  enabled: false\npython:\n"
                                      f"  interpreter_path: {sys.executable}\n")
    client = subprocess.Popen([sys.executable, "-m", "dockyard", "run", "ok.py", "--source", str(src), "--env",
                               str(tmp_path / "env.yml"), "--gpus", "1", "--workspace", ws.name],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = ""
        while "GPU leases cannot be read" not in line:
            line = client.stderr.readline()
            assert line or client.poll() is None, "the client ended without saying why its run waits"
    finally:
        client.kill()
        client.wait(10)
    doctor = subprocess.run([sys.executable, "-m", "dockyard", "doctor", "--json"], capture_output=True, text=True,
                            timeout=120)
    checks = {c["name"]: c for c in json.loads(doctor.stdout)["checks"]}
    assert not checks["gpu-leases"]["ok"] and "gpus.db" in checks["gpu-leases"]["detail"]


@pytest.fixture
def small_disk(tmp_path: Path):
    """A 16 MiB filesystem of its own (tmpfs), so filling it troubles nothing else."""
    mount = tmp_path / "small"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mount)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.fail(f"cannot mount a tmpfs for the disk-full test: {done.stderr.strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def test_a_full_disk_is_survived_and_named(small_disk: Path, tmp_path: Path, monkeypatch):
    """The run fills the disk its output goes to. Nothing can be recorded until space is freed; the
    agent survives (its own log cannot be written either), keeps what was written, and then records
    the run Failed saying the disk was full."""
    home = small_disk / "home"
    monkeypatch.setenv("DOCKYARD_HOME", str(home))
    ws = Workspace("disk", home=home)
    src = source(tmp_path, "loud.py", "import sys\nline = 'x' * 999 + '\\n'\nfor _ in range(100_000):\n"
                                      "    sys.stdout.write(line)\n")
    (tmp_path / "src" / "small.py").write_text("print('after')\n")
    exp = Experiment(ws, "exp")
    try:
        ensure_agent(home)
        filler = small_disk / "filler"
        free = os.statvfs(small_disk).f_bavail * os.statvfs(small_disk).f_frsize
        filler.write_bytes(b"\0" * (free - (3 << 20)))  # about 3 MiB left for the run's output
        run = exp.submit(ScriptRunConfig(str(src), "loud.py", environment=local_env()))
        log = Path(run.get_details()["logFiles"]["logs/std.log"])
        deadline = time.monotonic() + 60
        exit_file = log.parent / "exit_code"
        while not (exit_file.exists() and exit_file.read_text().strip()):  # the script ended: it could not write
            assert time.monotonic() < deadline, run.get_details()
            time.sleep(0.1)
        time.sleep(1.0)  # a few agent passes while nothing can be written
        assert agent_status(home).running, "the agent died of the full disk"
        written = log.stat().st_size
        assert written > 1 << 20, "what was written is kept"
        filler.unlink()  # space freed: the agent carries on and records the end
        details = run.wait_for_completion(raise_on_error=False)
        assert details["status"] == "Failed"
        assert "no space left on device" in details["error"]["message"], details["error"]
        assert log.stat().st_size == written
        again = exp.submit(ScriptRunConfig(str(src), "small.py", environment=local_env()))
        assert again.wait_for_completion()["status"] == "Completed"
    finally:
        stop_agent(home)


def test_the_agent_and_local_runs_never_see_a_registry_password(ws, tmp_path, monkeypatch):
    monkeypatch.setenv("REGISTRY_PASSWORD", "s3cr3t-value")
    monkeypatch.setenv("TEAM_TOKEN_FOR_TEST", "not-a-password-but-not-ours")
    src = source(tmp_path, "env.py", "import os\nprint(sorted(os.environ))\nprint(os.environ.get('REGISTRY_PASSWORD'))\n")
    stop_agent(ws.home)
    run = Experiment(ws, "exp").submit(ScriptRunConfig(str(src), "env.py", environment=local_env(DECLARED="yes")))
    assert run.wait_for_completion()["status"] == "Completed"
    agent_environ = Path(f"/proc/{agent_status(ws.home).pid}/environ").read_bytes()
    assert b"s3cr3t-value" not in agent_environ and b"REGISTRY_PASSWORD" not in agent_environ
    log = Path(run.get_details()["logFiles"]["logs/std.log"]).read_text()
    assert "s3cr3t-value" not in log
    assert "DECLARED" in log and "TEAM_TOKEN_FOR_TEST" not in log, "a local run got the agent's environment"


@pytest.mark.parametrize("kind", ["process", "container"])
def test_paths_are_never_shell_text(tmp_path: Path, monkeypatch, kind: str):
    marker = tmp_path / "injected"
    home = tmp_path / f'ho:me "q" $(touch {marker})'
    monkeypatch.setenv("DOCKYARD_HOME", str(home))
    ws = Workspace("paths", home=home)
    src = source(tmp_path, "hello.py", "print('hello from a strange home')\n")
    try:
        env = local_env() if kind == "process" else python_env()
        run = Experiment(ws, "exp").submit(ScriptRunConfig(str(src), "hello.py", environment=env))
        details = run.wait_for_completion(raise_on_error=False)
        assert details["status"] == "Completed", details
        assert "hello from a strange home" in Path(details["logFiles"]["logs/std.log"]).read_text()
        assert not marker.exists(), "a path was executed as shell text"
    finally:
        stop_agent(home)


def test_a_snapshot_that_does_not_fit_leaves_no_orphan_blob(small_disk: Path, tmp_path: Path):
    from dockyard.errors import EnvironmentProblem
    from dockyard.runs import SnapshotStore

    src = tmp_path / "big-src"
    src.mkdir()
    (src / "a-small.bin").write_bytes(os.urandom(1 << 20))
    (src / "b-large.bin").write_bytes(os.urandom(24 << 20))  # more than the 16 MiB disk holds
    store = SnapshotStore(small_disk / "snapshots")
    with pytest.raises(EnvironmentProblem, match=r"(?i)no space|disk"):
        store.take(src)
    left = [p for p in (small_disk / "snapshots").rglob("*") if p.is_file()]
    assert left == [], f"a failed snapshot left {left}"
    (src / "b-large.bin").unlink()
    assert store.take(src).files == 1, "the store works again once the snapshot fits"


def test_a_burst_of_wake_up_signals_never_hangs_the_agent(ws, tmp_path):
    """Every submit signals the agent; signals arrive between any two bytecodes of its loop. A
    handler that takes a lock the loop may hold deadlocks it (seen under a burst of submits)."""
    src = source(tmp_path, "nap.py", "import time\ntime.sleep(2)\nprint('woke')\n")
    run = Experiment(ws, "exp").submit(ScriptRunConfig(str(src), "nap.py", environment=local_env()))
    pid = agent_status(ws.home).pid
    started = time.monotonic()
    while pid is None and time.monotonic() - started < 30:  # a loaded machine: the pid file comes later
        time.sleep(0.05)
        pid = agent_status(ws.home).pid
    assert pid is not None, "the agent never wrote its pid"
    deadline = time.monotonic() + 3
    sent = 0
    while time.monotonic() < deadline:
        os.kill(pid, signal.SIGUSR1)
        sent += 1
    assert sent > 1000
    assert run.wait_for_completion()["status"] == "Completed"
    assert agent_status(ws.home).pid == pid, "the agent was replaced: it had hung"
    assert stop_agent(ws.home) and not agent_status(ws.home).running, "the agent does not stop: it hangs"
