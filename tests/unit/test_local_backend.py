"""The local backend's dispatch decisions on real SQLite stores, with launching replaced by a recorder
(pure logic: which run starts, on which GPUs, and never twice)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from dockyard.compute import AgentRun, LocalBackend, RunEvents
from dockyard.dockerd import EngineClient
from dockyard.runs import ComputeRecord, RunRecord, RunStatus, RunStore


def record(store: RunStore, run_id: str, gpus: int, created: float, launcher: str = "process") -> RunRecord:
    rec = RunRecord(
        id=run_id, experiment="exp", status=RunStatus.QUEUED, script="t.py", arguments=(), source_dir="/src",
        snapshot="0" * 32, environment={"name": "e"}, compute="local", launcher=launcher, image="", gpus=(),
        exit_code=None, reason="", container_id="", pid=None, created=created, started=None, ended=None,
        cancel_requested=False, metrics_offset=0, run_dir=str(store.folder_of(run_id).root),
        gpu_request={"count": gpus},
    )
    store.insert(rec)
    return rec


@pytest.fixture
def backend(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("DOCKYARD_GPUS", "4")
    folder = tmp_path / "home" / "workspaces" / "ws"
    store = RunStore(folder)
    events = RunEvents(lambda _folder: store, log=lambda _line: None)
    local = LocalBackend(home=tmp_path / "home", events=events, engine=EngineClient.parse("unix:///nonexistent.sock"))
    spawned: list[tuple[str, tuple[str, ...]]] = []
    monkeypatch.setattr(local, "_spawn", lambda run, gpus: spawned.append((run.id, gpus)))
    # What holds the GPUs, as the launchers would find it: the runs a test declares alive.
    local.alive = set()  # type: ignore[attr-defined]
    monkeypatch.setattr(local.processes, "live_runs", lambda: set(local.alive))
    monkeypatch.setattr(local.containers, "live_runs", lambda: set())
    yield local, store, folder, spawned
    local.close()


def agent_runs(store: RunStore, folder: Path, ids: list[str]) -> list[AgentRun]:
    target = ComputeRecord("local", 8)
    return [AgentRun(folder, store.get(i), target) for i in ids]


def test_a_run_whose_launch_ended_after_the_pass_read_it_is_not_started_again(backend):
    local, store, folder, spawned = backend
    record(store, "r1", 2, 1.0)
    stale = agent_runs(store, folder, ["r1"])  # the pass reads the run while it is still Queued
    local.leases.grant("r1", ["VIRTUAL-GPU-0", "VIRTUAL-GPU-1"], str(folder))
    store.update("r1", gpus=["VIRTUAL-GPU-0", "VIRTUAL-GPU-1"], pid=99999)
    store.transition("r1", RunStatus.RUNNING, started=time.time())  # ...and its launch ends after that read
    local.alive.add("r1")
    done = threading.Thread(target=lambda: None)
    done.start()
    done.join()
    local._preparing[stale[0].key] = done
    local.dispatch(stale, [])
    assert spawned == [], "the same run was launched twice"
    assert sorted(local.leases.held()) == ["VIRTUAL-GPU-0", "VIRTUAL-GPU-1"], "it was granted more GPUs"


def test_gpu_runs_count_against_the_targets_limit(backend):
    local, store, folder, spawned = backend
    for i in range(3):
        record(store, f"g{i}", 1, float(i))
    target = ComputeRecord("one-at-a-time", 1)
    queued = [AgentRun(folder, store.get(f"g{i}"), target) for i in range(3)]
    local.dispatch(queued, [])
    assert [run_id for run_id, _ in spawned] == ["g0"], "max_nodes=1 must hold for GPU runs too"
    assert "is full" in store.get("g1").reason


def test_one_queue_a_wide_run_is_not_overtaken_by_later_narrow_ones(backend):
    local, store, folder, spawned = backend
    record(store, "busy", 1, 0.0)
    store.transition("busy", RunStatus.RUNNING, started=time.time())
    local.alive.add("busy")
    local.leases.grant("busy", ["VIRTUAL-GPU-0"], str(folder))  # one GPU busy: the wide run must wait
    running = agent_runs(store, folder, ["busy"])
    record(store, "wide", 4, 1.0)
    record(store, "narrow", 1, 2.0)
    local.dispatch(agent_runs(store, folder, ["wide", "narrow"]), running)
    assert spawned == [], "a later run without a time limit overtook the waiting 4-GPU run"
    assert store.get("narrow").reason and store.get("wide").reason, "a waiting run says why"
    local.leases.release("busy")
    store.transition("busy", RunStatus.COMPLETED, ended=time.time(), exit_code=0)
    local.alive.discard("busy")
    local.dispatch(agent_runs(store, folder, ["wide", "narrow"]), [])
    assert spawned == [("wide", ("VIRTUAL-GPU-0", "VIRTUAL-GPU-1", "VIRTUAL-GPU-2", "VIRTUAL-GPU-3"))]


@pytest.mark.parametrize(
    ("launcher", "containers", "processes", "kept"),
    [
        ("container", None, set(), True),  # the engine cannot say: unknown keeps the lease
        ("container", set(), set(), False),  # proven gone: released
        ("container", {"r1"}, set(), True),  # its container runs, whatever the run's row says
        ("process", None, set(), False),  # a process run is not the engine's to vouch for
        ("process", None, {"r1"}, True),  # its wrapper process lives
    ],
    ids=["engine-unknown", "gone", "container-live", "process-gone-engine-unknown", "process-live"],
)
def test_a_lease_is_released_only_when_its_holder_is_proven_gone(backend, monkeypatch, launcher, containers,
                                                                  processes, kept):
    local, store, folder, _spawned = backend
    record(store, "r1", 1, 1.0, launcher)  # Queued: as left by an agent killed between start and Running
    local.leases.grant("r1", ["VIRTUAL-GPU-0"], str(folder))
    monkeypatch.setattr(local.containers, "live_runs", lambda: containers)
    monkeypatch.setattr(local.processes, "live_runs", lambda: processes)
    local._reclaim()
    assert ("VIRTUAL-GPU-0" in local.leases.held()) is kept


def test_a_process_run_that_ended_before_its_pid_was_recorded_ends_with_its_exit_code(backend):
    """An agent killed right after starting a short run: the run ended, its pid was never recorded.
    The next agent adopts it by its exit code file; following it must then read that code, not
    call it lost (a race seen in the kill -9 stress test)."""
    local, store, folder, _spawned = backend
    rec = record(store, "r1", 0, 1.0)
    rec.folder.prepare()
    rec.folder.exit_code.write_text("3\n")
    local._adopt_or_start(agent_runs(store, folder, ["r1"])[0], ())
    adopted = store.get("r1")
    assert adopted.status == RunStatus.RUNNING and not adopted.pid
    local.poll(agent_runs(store, folder, ["r1"])[0])
    ended = store.get("r1")
    assert ended.status == RunStatus.FAILED and ended.exit_code == 3, (ended.status, ended.reason)
    assert "lost while starting" not in ended.reason
