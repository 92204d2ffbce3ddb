"""The agent killed at random moments, and its engine restarted, while 30 GPU runs come and go: every
run reaches its true end, each script runs exactly once, and no GPU is ever in two live containers.

Runs go to a second Docker Engine of their own (tests/helpers/engine2.py: its own data-root,
socket and bridge), so that it can be restarted without touching the machine's engine. Its GPUs
are 4 virtual ones: containers get them by NVIDIA_VISIBLE_DEVICES, which the sampler reads back
from the engine while the runs are live — the truth from what holds them, not from a lease row.
"""

from __future__ import annotations

import json
import os
import random
import signal
import threading
import time
from pathlib import Path

import pytest
from dockyard import Environment, Experiment, ScriptRunConfig, Workspace
from dockyard.compute import agent_status, ensure_agent, stop_agent
from dockyard.gpu import LeaseStore
from helpers.engine2 import second_engine_fixture

pytestmark = [pytest.mark.engine, pytest.mark.slow]

BUSYBOX = "dockyard/base:bookworm-busybox"
# Counts itself: each execution appends a line to outputs/, which survives every attempt.
COUNT = 'echo "$DOCKYARD_RUN_ID $NVIDIA_VISIBLE_DEVICES" >> outputs/executions.log\nsleep "$1"\n'

second_engine = second_engine_fixture(scope="module", live_restore=True)


def shell_env() -> Environment:
    env = Environment("sh")
    env.docker.base_image = BUSYBOX
    env.python.user_managed_dependencies = True
    env.python.interpreter_path = "/bin/sh"
    return env


@pytest.fixture
def machine(second_engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    second_engine.load_image(BUSYBOX)
    home = tmp_path / "home"
    for key, value in {"DOCKYARD_HOME": str(home), "DOCKER_HOST": second_engine.docker_host, "DOCKYARD_GPUS": "4",
                       "DOCKYARD_LOCAL_MAX_RUNS": "16"}.items():
        monkeypatch.setenv(key, value)
    src = tmp_path / "src"
    src.mkdir()
    (src / "count.sh").write_text(COUNT)
    yield home, src
    stop_agent(home)
    second_engine.remove_all_containers()


class Sampler(threading.Thread):
    """Reads the engine's running containers every few tens of ms: which run holds which GPU."""

    def __init__(self, engine) -> None:
        super().__init__(daemon=True)
        self.engine = engine
        self.stop = threading.Event()
        self.overlaps: list[str] = []
        self.samples = 0
        self._gpus_of: dict[str, tuple[str, list[str]]] = {}

    def _gpus(self, cid: str) -> tuple[str, list[str]] | None:
        if cid not in self._gpus_of:
            found = self.engine.inspect_container(cid)
            if found is None:
                return None
            env = dict(e.split("=", 1) for e in found["Config"]["Env"] or [] if "=" in e)
            gpus = [g for g in env.get("NVIDIA_VISIBLE_DEVICES", "").split(",") if g and g != "void"]
            self._gpus_of[cid] = (found["Config"]["Labels"].get("dockyard.run", "?"), gpus)
        return self._gpus_of[cid]

    def run(self) -> None:
        query = json.dumps({"label": ["dockyard.run"]})
        while not self.stop.is_set():
            try:
                reply = self.engine.client.request("GET", f"/containers/json?filters={query}", timeout=5)
                running = reply.json() if reply.status == 200 else []
            except Exception:  # noqa: BLE001 - the engine restarts in the middle: skip that moment
                running = []
            holders: dict[str, str] = {}
            for container in running or []:
                found = self._gpus(container["Id"])
                if found is None:
                    continue
                run, gpus = found
                for gpu in gpus:
                    if gpu in holders and holders[gpu] != run:
                        self.overlaps.append(f"{gpu}: {holders[gpu]} and {run} at once")
                    holders[gpu] = run
            self.samples += 1
            self.stop.wait(0.03)


def test_agent_killed_twenty_times_and_an_engine_restart_lose_nothing_and_run_nothing_twice(machine, second_engine):
    home, src = machine
    rng = random.Random(20261201)
    ws = Workspace("chaos", home=home)
    exp = Experiment(ws, "chaos")
    sampler = Sampler(second_engine)
    sampler.start()
    runs = []
    for _ in range(30):
        config = ScriptRunConfig(str(src), "count.sh", arguments=[round(rng.uniform(0.3, 1.5), 2)],
                                 environment=shell_env(), gpus=rng.randint(0, 4))
        runs.append(exp.submit(config))
    kills = {"SIGTERM": 0, "SIGKILL": 0}
    for i in range(20):
        time.sleep(rng.uniform(0.1, 0.9))
        status = agent_status(home)
        if status.running and status.pid:
            sig = rng.choice([signal.SIGTERM, signal.SIGKILL])
            try:
                os.kill(status.pid, sig)
                kills[sig.name] += 1
            except ProcessLookupError:
                pass
            deadline = time.monotonic() + 15
            while agent_status(home).running and time.monotonic() < deadline:
                time.sleep(0.02)
        if i == 10:
            second_engine.restart(live_restore=True)  # an engine restart in the middle; containers live on
        time.sleep(rng.uniform(0.0, 0.4))
        ensure_agent(home)
    assert sum(kills.values()) >= 15, kills
    try:
        deadline = time.monotonic() + 240
        for run in runs:
            while not run.get_status().final:
                assert time.monotonic() < deadline, [(r.id, r.get_status(), ws.store.get(r.id).reason) for r in runs]
                ensure_agent(home)  # someone is always awake
                time.sleep(0.2)
    finally:
        sampler.stop.set()
        sampler.join(10)
    assert sampler.samples > 50 and sampler.overlaps == []
    outcomes = {r.id: (ws.store.get(r.id).status, ws.store.get(r.id).reason) for r in runs}
    assert {r: o for r, o in outcomes.items() if o[0] != "Completed"} == {}, "every run reaches its true end"
    for run in runs:
        log = Path(ws.store.get(run.id).run_dir) / "outputs" / "executions.log"
        lines = log.read_text().splitlines()
        assert len(lines) == 1, f"{run.id} ran {len(lines)} times: {lines}"
    leases = LeaseStore(home)
    try:
        assert leases.leases() == [], "a lease outlived its run"
    finally:
        leases.close()


def test_an_engine_restart_that_stops_a_run_is_reported_as_such(machine, second_engine):
    home, src = machine
    ws = Workspace("restart", home=home)
    run = Experiment(ws, "restart").submit(ScriptRunConfig(str(src), "count.sh", arguments=[60], environment=shell_env()))
    deadline = time.monotonic() + 60
    while run.get_status() != "Running":
        assert time.monotonic() < deadline, run.get_details()
        time.sleep(0.05)
    time.sleep(0.5)
    second_engine.restart(live_restore=False)  # without live-restore the engine stops its containers
    try:
        details = run.wait_for_completion(raise_on_error=False)
        assert details["status"] == "Failed"
        assert "stopped when the Docker Engine restarted" in details["error"]["message"], details["error"]
        assert "the script exited" not in details["error"]["message"], "the script was blamed for the restart"
    finally:
        second_engine.restart(live_restore=True)


def test_a_run_started_but_not_yet_recorded_running_keeps_its_gpus_and_runs_once(machine, second_engine):
    """The state an agent killed between starting a container and marking its run Running leaves:
    the row says Queued, the engine runs the container. The next agent must adopt that container
    (not start the script again) and keep its GPUs (not give them to the next run), although
    a fresh plan would place that run elsewhere now (the GPU busy when it started is free again)."""
    import sqlite3

    home, src = machine
    ws = Workspace("window", home=home)
    exp = Experiment(ws, "window")
    blocker = exp.submit(ScriptRunConfig(str(src), "count.sh", arguments=[1], environment=shell_env(), gpus=1))
    deadline = time.monotonic() + 60
    while blocker.get_status() != "Running":
        assert time.monotonic() < deadline, blocker.get_details()
        time.sleep(0.05)
    first = exp.submit(ScriptRunConfig(str(src), "count.sh", arguments=[6], environment=shell_env(), gpus=2))
    while first.get_status() != "Running":
        assert time.monotonic() < deadline, first.get_details()
        time.sleep(0.05)
    os.kill(agent_status(home).pid, signal.SIGKILL)
    conn = sqlite3.connect(ws.directory / "runs.db")
    conn.execute("UPDATE runs SET status = 'Queued', started = NULL WHERE id = ?", (first.id,))
    conn.commit()
    conn.close()
    time.sleep(1.5)  # the blocker's container ends meanwhile: all GPUs but first's are free
    sampler = Sampler(second_engine)
    sampler.start()
    second = exp.submit(ScriptRunConfig(str(src), "count.sh", arguments=[0.5], environment=shell_env(), gpus=2))
    try:
        for run in (blocker, first, second):
            assert run.wait_for_completion()["status"] == "Completed"
    finally:
        sampler.stop.set()
        sampler.join(10)
    assert sampler.overlaps == [], f"a GPU was given to a second live container: {sampler.overlaps}"
    leases = LeaseStore(home)
    try:
        events = [(event, gpu) for _t, event, gpu, run_id in leases.audit() if run_id == first.id]
    finally:
        leases.close()
    assert [e for e, _ in events if e in ("grant", "reclaim", "release")] == ["grant", "grant", "release", "release"], (
        f"the GPUs of a live container were released and granted again: {events}")
    for run in (blocker, first, second):
        lines = (Path(ws.store.get(run.id).run_dir) / "outputs" / "executions.log").read_text().splitlines()
        assert len(lines) == 1, f"{run.id} ran {len(lines)} times"
    assert "adopted" in Path(agent_status(home).log).read_text()
