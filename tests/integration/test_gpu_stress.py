"""The GPU scheduler under load, with virtual GPUs: 40 runs of 0-4 GPUs from 4 processes at once.

Runs are local processes (the GPU logic is the same for containers, and processes keep the test
short); each checks that it sees exactly the GPUs it asked for. The lease audit then proves that
no GPU was ever held by two runs and that no lease is left. The second test kills the agent
(kill -9) in the middle and lets a new one adopt the runs.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from dockyard._workflow import Workspace
from dockyard.compute import agent_status, ensure_agent, stop_agent
from dockyard.gpu._leases import LeaseStore

pytestmark = pytest.mark.engine  # the agent also serves container runs; CI has an engine

CHECK = """
import os, sys, time
want = int(sys.argv[1])
seen = [g for g in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if g]
assert len(seen) == want, (want, seen)
assert len(set(seen)) == want
time.sleep(float(sys.argv[2]))
"""

SUBMITTER = """
import json, random, sys
from dockyard import Environment, Experiment, ScriptRunConfig, Workspace
ws = Workspace(sys.argv[1], home=sys.argv[2])
rng = random.Random(int(sys.argv[4]))
env = Environment("local")
env.docker.enabled = False
env.python.interpreter_path = sys.executable
ids = []
for _ in range(int(sys.argv[5])):
    gpus = rng.randint(0, 4)
    nap = round(rng.uniform(0.05, 0.4), 2)
    config = ScriptRunConfig(sys.argv[3], "check.py", arguments=[gpus, nap], environment=env, gpus=gpus,
                             max_run_duration_seconds=5)
    ids.append(Experiment(ws, "stress").submit(config).id)
print(json.dumps(ids))
"""


def audit_is_clean(home: Path) -> None:
    leases = LeaseStore(home)
    try:
        holders: dict[str, str] = {}
        for _t, event, gpu, run_id in leases.audit():
            if event == "grant":
                assert gpu not in holders, f"{gpu} granted to {run_id} while {holders.get(gpu)} held it"
                holders[gpu] = run_id
            elif event == "hold":  # what holds the devices, noted under the lease it holds them by
                assert holders.get(gpu) == run_id, f"{run_id} held {gpu} without its lease ({holders.get(gpu)})"
            else:
                assert holders.get(gpu) == run_id, f"{event} of {gpu} by {run_id}, holder {holders.get(gpu)}"
                del holders[gpu]
        assert holders == {}, f"leases left at the end: {holders}"
        assert leases.leases() == []
    finally:
        leases.close()


def submit_from_four_processes(ws: Workspace, src: Path, env: dict[str, str], per_process: int) -> list[str]:
    procs = [
        subprocess.Popen([sys.executable, "-c", SUBMITTER, ws.name, str(ws.home), str(src), str(seed), str(per_process)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        for seed in range(4)
    ]
    ids: list[str] = []
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        ids += json.loads(out)
    return ids


def wait_all(ws: Workspace, ids: list[str], timeout: float = 240) -> dict[str, str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        statuses = {r.id: r.status for r in ws.store.list(limit=1000) if r.id in ids}
        if len(statuses) == len(ids) and all(s in ("Completed", "Failed", "Canceled") for s in statuses.values()):
            return statuses
        time.sleep(0.2)
    raise AssertionError(f"runs did not finish: {statuses}")


@pytest.fixture
def setup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    home = tmp_path / "home"
    env = {**os.environ, "DOCKYARD_HOME": str(home), "DOCKYARD_GPUS": "4", "DOCKYARD_LOCAL_MAX_RUNS": "8"}
    for key in ("DOCKYARD_HOME", "DOCKYARD_GPUS", "DOCKYARD_LOCAL_MAX_RUNS"):
        monkeypatch.setenv(key, env[key])
    ws = Workspace(f"stress{uuid.uuid4().hex[:6]}", home=home)
    src = tmp_path / "src"
    src.mkdir()
    (src / "check.py").write_text(CHECK)
    yield ws, src, env
    stop_agent(ws.home)


def test_forty_runs_from_four_processes(setup):
    ws, src, env = setup
    ids = submit_from_four_processes(ws, src, env, 10)
    statuses = wait_all(ws, ids)
    failed = {i: ws.store.get(i).reason for i, s in statuses.items() if s != "Completed"}
    assert failed == {}
    audit_is_clean(ws.home)


def test_agent_killed_in_the_middle(setup):
    ws, src, env = setup
    ids = submit_from_four_processes(ws, src, env, 10)
    deadline = time.monotonic() + 60
    while sum(r.status == "Completed" for r in ws.store.list(limit=1000)) < 5 and time.monotonic() < deadline:
        time.sleep(0.05)
    os.kill(agent_status(ws.home).pid, signal.SIGKILL)
    time.sleep(0.5)
    ensure_agent(ws.home)
    statuses = wait_all(ws, ids)
    failed = {i: ws.store.get(i).reason for i, s in statuses.items() if s != "Completed"}
    # A run whose process was adopted finishes Completed (its exit code is in its folder).
    assert failed == {}
    audit_is_clean(ws.home)


ENV_PRINT = "import os\nprint('NVIDIA_VISIBLE_DEVICES=' + os.environ.get('NVIDIA_VISIBLE_DEVICES', '<unset>'))\n"


def test_containers_get_their_gpus_by_uuid_and_cpu_runs_get_void(setup):
    from dockyard import Environment, Experiment, ScriptRunConfig

    ws, src, _env = setup
    (src / "show.py").write_text(ENV_PRINT)
    env = Environment("py")
    env.docker.base_image = "dockyard/base:bookworm-python3"
    exp = Experiment(ws, "iso")
    two = exp.submit(ScriptRunConfig(str(src), "show.py", environment=env, gpus=2))
    none = exp.submit(ScriptRunConfig(str(src), "show.py", environment=env))
    for run in (two, none):
        assert run.wait_for_completion()["status"] == "Completed"
    log = lambda run: (Path(run._record().run_dir) / "meta" / "std.log").read_text()
    granted = list(two._record().gpus)
    assert len(granted) == 2 and f"NVIDIA_VISIBLE_DEVICES={','.join(granted)}" in log(two)
    assert "NVIDIA_VISIBLE_DEVICES=void" in log(none)
    audit_is_clean(ws.home)


def test_real_gpus_without_the_nvidia_toolkit_fail_clearly_and_leave_nothing(setup, tmp_path: Path, monkeypatch):
    """An engine without the NVIDIA runtime refuses the device request: one clear reason, no container."""
    from dockyard import Environment, Experiment, ScriptRunConfig
    from dockyard.dockerd import EngineClient

    ws, src, _env = setup
    topology = tmp_path / "topology.json"
    topology.write_text(json.dumps({"gpus": [{"uuid": "GPU-00000000-0000-0000-0000-000000000001", "index": 0,
                                              "name": "NVIDIA test", "memory_mib": 81920, "virtual": False}]}))
    monkeypatch.delenv("DOCKYARD_GPUS")
    monkeypatch.setenv("DOCKYARD_GPU_TOPOLOGY", str(topology))
    stop_agent(ws.home)  # the next submit starts an agent that sees this topology
    (src / "show.py").write_text(ENV_PRINT)
    env = Environment("py")
    env.docker.base_image = "dockyard/base:bookworm-python3"
    run = Experiment(ws, "iso").submit(ScriptRunConfig(str(src), "show.py", environment=env, gpus=1))
    details = run.wait_for_completion(raise_on_error=False)
    assert details["status"] == "Failed"
    assert "NVIDIA Container Toolkit" in details["error"]["message"] or "nvidia" in details["error"]["message"].lower()
    engine = EngineClient.from_env()
    leftover = engine.request("GET", "/containers/json?all=1").json()
    assert not [c for c in leftover if (c.get("Labels") or {}).get("dockyard.run") == run.id]
    audit_is_clean(ws.home)
