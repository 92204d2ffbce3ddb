"""GPU leases on a real SQLite file: all-or-nothing grants, releases, reclaim, audit."""

from __future__ import annotations

import multiprocessing
from pathlib import Path

import pytest
from dockyard.errors import InputError
from dockyard.gpu._discovery import inventory
from dockyard.gpu._leases import LeaseConflict, LeaseStore


def test_grant_is_all_or_nothing(tmp_path: Path):
    store = LeaseStore(tmp_path)
    store.grant("run-a", ["G0", "G1"], "ws")
    with pytest.raises(LeaseConflict):
        store.grant("run-b", ["G2", "G1"], "ws")
    assert store.held() == {"G0": "run-a", "G1": "run-a"}, "a refused grant must take nothing"
    assert store.release("run-a") == ["G0", "G1"]
    assert store.release("run-a") == []
    assert [e[1] for e in store.audit()] == ["grant", "grant", "release", "release"]


def test_reclaim_frees_only_dead_holders_of_every_workspace(tmp_path: Path):
    store = LeaseStore(tmp_path)
    store.grant("alive", ["G0"], "ws")
    store.grant("dead", ["G1", "G3"], "ws")
    store.grant("other-workspace", ["G2"], "ws2")
    asked = []

    def holds(lease):
        asked.append((lease.holder, lease.run_id))
        return lease.run_id != "dead"

    assert sorted(store.reclaim(holds)) == ["G1", "G3"]
    assert sorted(asked) == [("ws", "alive"), ("ws", "dead"), ("ws2", "other-workspace")], "once per run"
    assert store.held() == {"G0": "alive", "G2": "other-workspace"}
    assert store.audit()[-1][1] == "reclaim"


def _grab(path: str, run: str, gpus: list[str], out: multiprocessing.Queue[str]) -> None:
    try:
        LeaseStore(Path(path)).grant(run, gpus, "ws")
        out.put(run)
    except LeaseConflict:
        out.put("")


def test_racing_processes_never_share_a_gpu(tmp_path: Path):
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_grab, args=(str(tmp_path), f"r{i}", ["G0", f"G{i + 1}"], out)) for i in range(6)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
    winners = [w for w in (out.get(timeout=5) for _ in procs) if w]
    assert len(winners) == 1
    assert LeaseStore(tmp_path).held()["G0"] == winners[0]


def test_virtual_inventory(tmp_path: Path):
    found = inventory({"DOCKYARD_GPUS": "3"})
    assert [g.uuid for g in found.gpus] == ["VIRTUAL-GPU-0", "VIRTUAL-GPU-1", "VIRTUAL-GPU-2"]
    assert found.virtual and all(g.virtual for g in found.gpus)
    topo = tmp_path / "topo.json"
    topo.write_text('{"gpus": [{"uuid": "A", "index": 0, "memory_mib": 40960}, {"uuid": "B", "index": 1}],'
                    ' "links": [{"a": "A", "b": "B", "nvlinks": 4, "level": 1}]}')
    from_file = inventory({"DOCKYARD_GPU_TOPOLOGY": str(topo)})
    assert [g.memory_mib for g in from_file.gpus] == [40960, 81920] and from_file.links == (("A", "B", 4, 1),)
    with pytest.raises(InputError, match="DOCKYARD_GPUS"):
        inventory({"DOCKYARD_GPUS": "many"})
    topo.write_text("{not json")
    with pytest.raises(InputError, match="DOCKYARD_GPU_TOPOLOGY"):
        inventory({"DOCKYARD_GPU_TOPOLOGY": str(topo)})


def test_no_gpus_without_nvml_or_declaration():
    found = inventory({})
    if found.gpus:  # a machine with real GPUs and NVML
        assert not found.virtual
    else:
        assert found.reason
