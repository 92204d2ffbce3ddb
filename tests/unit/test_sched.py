"""Placement and queue policy (dockyard.gpu._sched): pure functions, checked by example and by property."""

from __future__ import annotations

import json
import random
from itertools import combinations

import pytest
from dockyard.errors import InputError
from dockyard.gpu import _sched
from dockyard.gpu._sched import (
    Active,
    GpuRequest,
    GpuSlot,
    Plan,
    Policy,
    Reservation,
    RunQueue,
    Topology,
    Waiting,
    place,
    placement_score,
    plan,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

DGX = Topology.dgx(8)
U = DGX.uuids


def gpus(*indices: int, topology: Topology = DGX) -> frozenset[str]:
    return frozenset(topology.uuids[i] for i in indices)


def indices(chosen, topology: Topology = DGX) -> list[int] | None:
    return None if chosen is None else [topology.uuids.index(u) for u in chosen]


def links_inside(topology: Topology, chosen) -> int:
    return sum(topology.links[(a, b)] for a, b in combinations(chosen, 2))


def hetero() -> Topology:
    """Two H100 80 GB on NUMA 0, two A100 40 GB on NUMA 1, NVLink only within a kind."""
    return Topology.from_dict({
        "gpus": [
            {"uuid": "GPU-h0", "index": 0, "name": "NVIDIA H100 80GB HBM3", "memory_mib": 81559, "numa_node": 0},
            {"uuid": "GPU-h1", "index": 1, "name": "NVIDIA H100 80GB HBM3", "memory_mib": 81559, "numa_node": 0},
            {"uuid": "GPU-a0", "index": 2, "name": "NVIDIA A100-PCIE-40GB", "memory_mib": 40960, "numa_node": 1},
            {"uuid": "GPU-a1", "index": 3, "name": "NVIDIA A100-PCIE-40GB", "memory_mib": 40960, "numa_node": 1},
        ],
        "links": [{"a": "GPU-h0", "b": "GPU-h1", "nvlinks": 18}, {"a": "GPU-a0", "b": "GPU-a1", "nvlinks": 4}],
    })


def test_public_surface_is_pinned():
    assert sorted(_sched.__all__) == [
        "Active", "GpuRequest", "GpuSlot", "Plan", "Policy", "Reservation", "RunQueue", "Topology", "Waiting",
        "place", "placement_score", "plan",
    ]


# ---------------------------------------------------------------------------------------------
# Topology


def test_dgx8_is_two_quads_with_cross_links():
    for a, b in combinations(range(8), 2):
        n = DGX.links[(U[a], U[b])]
        assert n == DGX.links[(U[b], U[a])]
        assert n == (2 if a // 4 == b // 4 else 1 if b == a + 4 else 0)
    assert [g.numa_node for g in DGX.gpus] == [0, 0, 0, 0, 1, 1, 1, 1]
    assert all(sum(DGX.links[(u, v)] for v in U if v != u) == 7 for u in U)
    assert DGX.levels[(U[0], U[1])] == 1 and DGX.levels[(U[0], U[2])] == 4 and DGX.levels[(U[0], U[4])] == 5


def test_uniform_names_virtual_gpus_by_uuid():
    t = Topology.uniform(3, nvlinks=2)
    assert t.uuids == ("VIRTUAL-GPU-0", "VIRTUAL-GPU-1", "VIRTUAL-GPU-2")
    assert t.links[("VIRTUAL-GPU-2", "VIRTUAL-GPU-0")] == 2
    assert Topology.uniform(0).gpus == ()


def test_topology_file_round_trips_through_json():
    for t in (DGX, hetero(), Topology.uniform(5, 1)):
        again = Topology.from_dict(json.loads(json.dumps(t.to_dict())))
        assert again == t and hash(again) == hash(t)
        assert again.to_dict() == t.to_dict()
    assert Topology.uniform(4) != Topology.uniform(4, nvlinks=1)


def test_topology_file_defaults_levels_from_numa():
    t = hetero()
    assert t.levels[("GPU-h0", "GPU-h1")] == 4  # same NUMA node
    assert t.levels[("GPU-h0", "GPU-a0")] == 5  # across sockets
    assert t.links[("GPU-h0", "GPU-a1")] == 0
    assert t.gpu("GPU-a1").index == 3


@pytest.mark.parametrize(
    ("data", "words"),
    [
        ({"gpus": [{"uuid": "A", "index": 0}, {"uuid": "A", "index": 1}]}, "twice"),
        ({"gpus": [{"uuid": "A", "index": 0}, {"uuid": "B", "index": 0}]}, "share index 0"),
        ({"gpus": [{"uuid": "A", "index": 0}], "links": [{"a": "A", "b": "Z", "nvlinks": 1}]}, "'Z' is not a GPU"),
        ({"gpus": [{"uuid": "A", "index": 0}, {"uuid": "B", "index": 1}],
          "links": [{"a": "A", "b": "B", "nvlinks": -1}]}, "NVLink count"),
        ({"gpus": [{"uuid": "A", "index": 0}, {"uuid": "B", "index": 1}],
          "links": [{"a": "A", "b": "B", "level": 9}]}, "0..5"),
        ({"gpus": [{"uuid": "A", "index": 0}, {"uuid": "B", "index": 1}],
          "links": [{"a": "A", "b": "B"}, {"a": "B", "b": "A"}]}, "repeats"),
        ({"gpus": [{"uuid": "A", "index": 0}], "links": [{"a": "A", "b": "A"}]}, "itself"),
        ({"gpus": [{"uuid": "A"}]}, "'uuid' and 'index'"),
        ({"gpus": [{"uuid": "A", "index": 0, "memory_mib": "lots"}]}, "memory_mib"),
        ({"gpus": [{"uuid": "A", "index": 0, "colour": "green"}]}, "unknown keys"),
        ({"gpus": {}}, "'gpus' must be a list"),
        ([], "must be an object"),
    ],
)
def test_topology_file_errors_say_what_is_wrong(data, words):
    with pytest.raises(InputError, match=words):
        Topology.from_dict(data)


def test_topology_rejects_asymmetric_links():
    a, b = GpuSlot("A", 0), GpuSlot("B", 1)
    with pytest.raises(InputError, match="not symmetric"):
        Topology((a, b), {("A", "B"): 2, ("B", "A"): 1})
    assert Topology((a, b), {("A", "B"): 2, ("B", "A"): 2}).links[("B", "A")] == 2


def test_constructors_validate():
    with pytest.raises(InputError, match="multiple of 4"):
        Topology.dgx(6)
    with pytest.raises(InputError, match="n >= 0"):
        Topology.uniform(-1)
    with pytest.raises(InputError, match="index"):
        GpuSlot("A", -1)
    with pytest.raises(InputError, match="numa_node"):
        GpuSlot("A", 0, numa_node=True)


# ---------------------------------------------------------------------------------------------
# GpuRequest


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"count": -1}, "count >= 0"),
        ({"count": True}, "count >= 0"),
        ({"count": 1.0}, "count >= 0"),
        ({"count": 1, "min_memory_mib": -5}, "min_memory_mib"),
        ({"count": 1, "name_filter": " "}, "name_filter"),
        ({"count": 1, "priority": 1.5}, "priority"),
        ({"count": 1, "time_limit_s": 0}, "time_limit_s"),
        ({"count": 1, "time_limit_s": float("inf")}, "time_limit_s"),
    ],
)
def test_request_is_validated_at_construction(kwargs, words):
    with pytest.raises(InputError, match=words):
        GpuRequest(**kwargs)


def test_eligible_applies_memory_and_case_insensitive_name():
    t = hetero()
    assert GpuRequest(1).eligible(t) == frozenset(t.uuids)
    assert GpuRequest(1, min_memory_mib=80000).eligible(t) == {"GPU-h0", "GPU-h1"}
    assert GpuRequest(1, name_filter="a100").eligible(t) == {"GPU-a0", "GPU-a1"}
    assert GpuRequest(1, name_filter="A100", min_memory_mib=80000).eligible(t) == frozenset()


def test_fits_ever_says_why_a_request_can_never_fit():
    t = hetero()
    assert GpuRequest(4).fits_ever(t) is None
    assert GpuRequest(0).fits_ever(t) is None
    assert GpuRequest(5).fits_ever(t) == "needs 5 GPUs; this machine has 4"
    assert GpuRequest(4, min_memory_mib=80000).fits_ever(t) == (
        "needs 4 GPUs with >= 80000 MiB; this machine has 2 (of 4)"
    )
    assert GpuRequest(1, name_filter="B200").fits_ever(t) == "needs 1 GPU matching 'B200'; this machine has 0 (of 4)"
    assert GpuRequest(2, min_memory_mib=80000).fits_ever(t) is None


# ---------------------------------------------------------------------------------------------
# place


def test_place_prefers_nvlink_connected_sets():
    # An empty DGX: 4 GPUs make a whole quad (12 NVLinks), not e.g. 0,1,4,5 (6).
    assert indices(place(DGX, frozenset(U), GpuRequest(4))) == [0, 1, 2, 3]
    # Free 0, 1, 4: the pair 0-1 (2 NVLinks) beats the cross link 0-4 (1) and 1-4 (none).
    assert indices(place(DGX, gpus(1, 4, 0), GpuRequest(2))) == [0, 1]
    # Free 0, 4, 5: index order would take 0-4; the quad pair 4-5 has more links.
    assert indices(place(DGX, gpus(0, 4, 5), GpuRequest(2))) == [4, 5]
    # Not by index: 0-2 and 1-3 are the NVLinked pairs here.
    t = Topology(tuple(GpuSlot(f"G{i}", i) for i in range(4)), {("G0", "G2"): 4, ("G1", "G3"): 4})
    assert place(t, frozenset(t.uuids), GpuRequest(2)) == ("G0", "G2")


def test_place_keeps_the_leftovers_grouped():
    # A 2-GPU run on an empty machine takes 2 from one quad, and a 4-GPU run after it still
    # finds a whole quad.
    first = place(DGX, frozenset(U), GpuRequest(2))
    assert len({DGX.gpu(u).numa_node for u in first}) == 1
    second = place(DGX, frozenset(U) - set(first), GpuRequest(4))
    assert links_inside(DGX, second) == 12 and len({DGX.gpu(u).numa_node for u in second}) == 1
    # One GPU: take the lone GPU of the broken quad, not GPU 0 of the whole one.
    assert indices(place(DGX, gpus(0, 1, 2, 3, 7), GpuRequest(1))) == [7]
    assert indices(place(DGX, gpus(0, 1, 2, 3, 4), GpuRequest(1))) == [4]
    # Two GPUs: first-fit by index would take 0-1 and break the whole quad.
    assert indices(place(DGX, gpus(0, 1, 2, 3, 6, 7), GpuRequest(2))) == [6, 7]
    # Three 1-GPU runs in a row on 7 free GPUs fill the broken quad first.
    free = gpus(1, 2, 3, 4, 5, 6, 7)
    taken = []
    for _ in range(3):
        (u,) = place(DGX, free, GpuRequest(1))
        taken.append(U.index(u))
        free -= {u}
    assert sorted(taken) == [1, 2, 3]


def test_place_on_numa_and_pcie_without_nvlink():
    # No NVLink at all: NUMA nodes, then PCIe levels, decide.
    slots = tuple(GpuSlot(f"P{i}", i, numa_node=i // 2) for i in range(4))
    t = Topology(slots, levels={("P0", "P1"): 1, ("P2", "P3"): 3})
    assert place(t, frozenset(t.uuids), GpuRequest(2)) == ("P0", "P1")
    assert place(t, frozenset({"P1", "P2", "P3"}), GpuRequest(2)) == ("P2", "P3")
    # One GPU: take P1 alone on NUMA 0 and leave P2-P3 together.
    assert place(t, frozenset({"P1", "P2", "P3"}), GpuRequest(1)) == ("P1",)


def test_place_edge_cases():
    assert place(DGX, frozenset(U), GpuRequest(0)) == ()
    assert place(DGX, frozenset(), GpuRequest(0)) == ()
    assert place(DGX, gpus(0, 1, 2), GpuRequest(4)) is None
    assert place(DGX, frozenset(), GpuRequest(1)) is None
    assert indices(place(DGX, gpus(5, 2), GpuRequest(2))) == [2, 5]
    with pytest.raises(InputError, match="not in this topology"):
        place(DGX, frozenset({"GPU-nope"}), GpuRequest(1))


def test_place_filters_memory_and_name():
    t = hetero()
    free = frozenset(t.uuids)
    assert place(t, free, GpuRequest(2, name_filter="a100")) == ("GPU-a0", "GPU-a1")
    assert place(t, free, GpuRequest(1, min_memory_mib=80000)) == ("GPU-h0",)
    assert place(t, free - {"GPU-h0"}, GpuRequest(2, min_memory_mib=80000)) is None
    assert place(t, free, GpuRequest(3, name_filter="h100")) is None


def test_place_above_eight_free_gpus_greedily_groups():
    t = Topology.dgx(16)
    everything = frozenset(t.uuids)
    assert links_inside(t, place(t, everything, GpuRequest(4))) == 12
    two = place(t, everything, GpuRequest(2))
    assert links_inside(t, two) == 2
    eight = place(t, everything, GpuRequest(8))
    assert links_inside(t, eight) == 12 + 12 + 4  # two partner quads and their 4 cross links
    # The one GPU taken from a full machine; then with 0 busy, the next 3 complete its quad.
    assert indices(place(t, everything - {t.uuids[0]}, GpuRequest(3)), t) == [1, 2, 3]


def test_place_is_exhaustively_optimal_on_the_own_links():
    # Brute force over every free set of the DGX and every count: no candidate has more links.
    for mask in range(1, 256):
        free = gpus(*[i for i in range(8) if mask >> i & 1])
        for count in range(1, len(free) + 1):
            chosen = place(DGX, free, GpuRequest(count))
            best = max(links_inside(DGX, c) for c in combinations(sorted(free), count))
            assert links_inside(DGX, chosen) == best


def test_place_is_deterministic_and_independent_of_set_order():
    fresh = Topology.dgx(8)  # its own (empty) caches
    for mask in range(0, 256, 7):
        free = gpus(*[i for i in range(8) if mask >> i & 1])
        shuffled = frozenset(sorted(free, reverse=True))
        for count in range(0, 5):
            assert place(DGX, free, GpuRequest(count)) == place(fresh, shuffled, GpuRequest(count))


def test_placement_score_orders_like_place():
    free = gpus(0, 1, 2, 3, 6, 7)
    good = placement_score(DGX, free, place(DGX, free, GpuRequest(2)))
    worse = placement_score(DGX, free, tuple(gpus(0, 1)))
    assert good > worse
    assert good[:3] == worse[:3] == (2, -1, -1)  # same own links, NUMA and PCIe; the leftovers differ
    with pytest.raises(InputError, match="must all be free"):
        placement_score(DGX, gpus(0), tuple(gpus(1)))


# ---------------------------------------------------------------------------------------------
# plan


def req(count: int, *, limit: float | None = None, priority: int = 0, **kw) -> GpuRequest:
    return GpuRequest(count, priority=priority, time_limit_s=limit, **kw)


# Classic EASY backfill: reserve at once, submit order, one account. The tests of the reservation
# and backfill mechanics use it; the tests further down cover what the default Policy adds.
EASY = Policy(reserve_factor=0.0, reserve_unknown_s=0.0, short_first=0.0, short_first_window=0.0, fair_share=False,
              reserve_unknown_factor=0.0, hold_factor=0.0)


def started(p: Plan) -> dict[str, list[int]]:
    return {run_id: indices(g) for run_id, g in p.starts}


def test_plan_orders_by_priority_then_submit_time():
    queue = [
        Waiting("late-low", req(1), 5.0),
        Waiting("early-low", req(1), 1.0),
        Waiting("late-high", req(1, priority=5), 9.0),
        Waiting("early-high", req(1, priority=5), 3.0),
    ]
    running = [Active("busy", tuple(U[:6]), None)]
    p = plan(10.0, DGX, frozenset(U[6:]), queue, running)
    assert [r for r, _ in p.starts] == ["early-high", "late-high"]
    assert set(p.reasons) == {"late-low", "early-low"}
    p = plan(10.0, DGX, frozenset(U[5:]), queue, [Active("busy", tuple(U[:5]), None)])
    assert [r for r, _ in p.starts] == ["early-high", "late-high", "early-low"]


def test_plan_starts_everything_that_fits_with_good_placements():
    queue = [Waiting("two", req(2), 0.0), Waiting("four", req(4), 1.0), Waiting("zero", req(0), 2.0)]
    p = plan(0.0, DGX, frozenset(U), queue, [])
    assert started(p) == {"two": [0, 1], "four": [4, 5, 6, 7], "zero": []}
    assert p.reasons == {} and p.reservation is None


def test_head_that_cannot_fit_reserves_and_blocks_runs_that_would_delay_it():
    # 6 GPUs busy until t=100; an 8-GPU run waits; 2 GPUs free now.
    running = [Active("busy", tuple(U[:6]), 100.0)]
    queue = [
        Waiting("big", req(8, limit=1000), 0.0),
        Waiting("long", req(1, limit=500), 1.0),   # would still run at t=100: blocked
        Waiting("short", req(1, limit=50), 2.0),   # ends at t=50 <= 100: backfilled
        Waiting("free-rider", req(1), 3.0),        # no time limit: never backfilled
    ]
    p = plan(0.0, DGX, frozenset(U[6:]), queue, running, policy=EASY)
    assert list(started(p)) == ["short"]
    assert p.reservation == Reservation("big", 100.0, tuple(U))
    assert p.reasons["big"] == "needs 8 GPUs; 2 free; reserved 8 GPUs from t+100s"
    assert p.reasons["long"] == "reserved GPUs for run big at t+100s; this run's time limit ends later"
    assert "never started ahead" in p.reasons["free-rider"]
    # A run ending exactly at the reservation does not delay it.
    p = plan(0.0, DGX, frozenset(U[6:]), [queue[0], Waiting("exact", req(1, limit=100), 1.0)], running, policy=EASY)
    assert list(started(p)) == ["exact"]


def test_backfill_may_use_gpus_the_head_will_not_need():
    # A 7-GPU head is promised 7 of the 8 GPUs at t=100; a long 1-GPU run may take the eighth
    # now, a long 2-GPU run would need a reserved GPU and may not.
    running = [Active("busy", tuple(U[:6]), 100.0)]
    queue = [
        Waiting("head", req(7, limit=10), 0.0),
        Waiting("wide", req(2, limit=10_000), 1.0),
        Waiting("narrow", req(1, limit=10_000), 2.0),
    ]
    p = plan(0.0, DGX, frozenset(U[6:]), queue, running, policy=EASY)
    assert p.reservation == Reservation("head", 100.0, tuple(U[:7]))
    assert started(p) == {"narrow": [7]}
    assert p.reasons["wide"] == "reserved GPUs for run head at t+100s; this run's time limit ends later"
    # The same long run cannot start when the head needs the whole machine.
    queue[0] = Waiting("head", req(8, limit=10), 0.0)
    assert plan(0.0, DGX, frozenset(U[6:]), queue, running, policy=EASY).starts == ()


def test_the_gap_before_the_reservation_goes_to_the_widest_runs_first():
    # 6 GPUs busy until t=100, an 8-GPU head: 2 GPUs free until then. A 1-GPU run submitted
    # first would leave the 2-GPU run no room; the 2-GPU run gets the gap, the 1-GPU run waits.
    running = [Active("busy", tuple(U[:6]), 100.0)]
    queue = [
        Waiting("big", req(8, limit=1000), 0.0),
        Waiting("narrow", req(1, limit=50), 1.0),
        Waiting("wide", req(2, limit=50), 2.0),
    ]
    p = plan(0.0, DGX, frozenset(U[6:]), queue, running, policy=EASY)
    assert started(p) == {"wide": [6, 7]}
    assert p.reservation == Reservation("big", 100.0, tuple(U))
    assert set(p.reasons) == {"big", "narrow"}
    # With room for both, both start, reported in queue order.
    p = plan(0.0, DGX, frozenset(U[5:]), queue, [Active("busy", tuple(U[:5]), 100.0)], policy=EASY)
    assert [r for r, _ in p.starts] == ["narrow", "wide"]
    assert sorted(g for _, gs in p.starts for g in gs) == sorted(U[5:])


def test_no_backfill_when_the_head_start_time_is_unknown():
    # The running run has no time limit: nobody can say when the 8-GPU run starts.
    running = [Active("forever", tuple(U[:6]), None)]
    queue = [Waiting("big", req(8, limit=1000), 0.0), Waiting("tiny", req(1, limit=1), 1.0)]
    p = plan(0.0, DGX, frozenset(U[6:]), queue, running, policy=EASY)
    assert p.starts == ()
    assert p.reservation == Reservation("big", None, ())
    assert "start time unknown" in p.reasons["big"]
    assert "whose start time is unknown" in p.reasons["tiny"]


def test_runs_started_in_the_same_plan_count_for_the_reservation():
    queue = [
        Waiting("one", req(6, limit=300), 0.0),
        Waiting("big", req(8, limit=10), 1.0),
        Waiting("short", req(1, limit=100), 2.0),
        Waiting("long", req(1, limit=400), 3.0),
    ]
    p = plan(0.0, DGX, frozenset(U), queue, [], policy=EASY)
    assert list(started(p)) == ["one", "short"]
    assert p.reservation.at == 300.0
    # Without a time limit on the run started first, the head's start is unknown: no backfill.
    queue[0] = Waiting("one", req(6), 0.0)
    p = plan(0.0, DGX, frozenset(U), queue, [], policy=EASY)
    assert list(started(p)) == ["one"] and p.reservation.at is None


def test_gpus_the_head_can_never_use_are_open_to_anyone():
    t = hetero()
    running = [Active("h-busy", ("GPU-h0",), None)]
    queue = [
        Waiting("needs-h100s", req(2, min_memory_mib=80000, limit=100), 0.0),
        Waiting("a100-job", req(2), 1.0),  # no time limit, but the head can never use A100s
        Waiting("other", req(1), 2.0),
    ]
    p = plan(0.0, t, frozenset({"GPU-h1", "GPU-a0", "GPU-a1"}), queue, running, policy=EASY)
    assert p.starts == (("a100-job", ("GPU-a0", "GPU-a1")),)
    assert p.reasons["needs-h100s"].startswith("needs 2 GPUs with >= 80000 MiB; 1 free")
    assert p.reasons["other"].startswith("waiting behind run needs-h100s")


def test_a_run_that_can_never_fit_does_not_block_the_queue():
    queue = [Waiting("huge", req(16), 0.0), Waiting("ok", req(8), 1.0)]
    p = plan(0.0, DGX, frozenset(U), queue, [])
    assert list(started(p)) == ["ok"]
    assert p.reasons["huge"] == "can never start on this machine: needs 16 GPUs; this machine has 8"
    assert p.reservation is None


def test_reasons_name_the_higher_priority_run():
    running = [Active("busy", tuple(U[:7]), 50.0)]
    queue = [Waiting("vip", req(2, priority=9, limit=10), 5.0), Waiting("pleb", req(2, limit=10), 0.0)]
    p = plan(0.0, DGX, frozenset(U[7:]), queue, running, policy=EASY)
    assert p.reasons["pleb"] == "needs 2 GPUs; 1 free; waiting behind higher-priority run vip"


def test_a_busy_gpu_listed_as_free_is_never_started_on():
    running = [Active("holder", (U[0],), None)]
    p = plan(0.0, DGX, frozenset(U), [Waiting("all", req(8), 0.0), Waiting("one", req(1), 1.0)], running, policy=EASY)
    assert p.starts == ()
    p = plan(0.0, DGX, gpus(0, 1), [Waiting("one", req(2), 1.0)], running, policy=EASY)
    assert p.starts == ()


def test_plan_rejects_inconsistent_state():
    with pytest.raises(InputError, match="twice in the queue"):
        plan(0.0, DGX, frozenset(U), [Waiting("a", req(1), 0.0), Waiting("a", req(1), 1.0)], [])
    with pytest.raises(InputError, match="held by two running runs"):
        plan(0.0, DGX, frozenset(), [], [Active("a", (U[0],)), Active("b", (U[0],))])
    with pytest.raises(InputError, match="not in this topology"):
        plan(0.0, DGX, frozenset(), [], [Active("a", ("GPU-elsewhere",))])
    with pytest.raises(InputError, match="distinct"):
        Active("a", (U[0], U[0]))
    with pytest.raises(InputError, match="started must be a finite number"):
        Active("a", (U[0],), None, "", float("inf"))
    with pytest.raises(InputError, match="submitted"):
        Waiting("a", req(1), float("nan"))


# ---------------------------------------------------------------------------------------------
# properties


@st.composite
def states(draw):
    topology = draw(st.sampled_from([DGX, Topology.uniform(4, 1), hetero(), Topology.dgx(16)]))
    uuids = list(topology.uuids)
    holders = draw(st.lists(st.integers(0, 5), min_size=len(uuids), max_size=len(uuids)))
    # holder 0: free; 1: not free and held by nobody (e.g. unhealthy); 2..5: running runs
    free = frozenset(u for u, h in zip(uuids, holders) if h == 0)
    running = []
    for k in range(2, 6):
        held = tuple(u for u, h in zip(uuids, holders) if h == k)
        if held:
            end = draw(st.one_of(st.none(), st.floats(0, 500)))
            started = draw(st.one_of(st.none(), st.floats(-500, 200)))  # may even be after now
            running.append(Active(f"run-{k}", held, end, draw(st.sampled_from(["", "A", "B"])), started))
    # Sometimes a busy GPU is also (wrongly) listed free: it must still never be started on.
    if running and draw(st.booleans()):
        free |= {running[0].gpus[0]}
    queue = []
    for i in range(draw(st.integers(0, 12))):
        request = GpuRequest(
            draw(st.integers(0, len(uuids) + 1)),
            min_memory_mib=draw(st.sampled_from([0, 0, 50000])),
            name_filter=draw(st.sampled_from([None, None, "h100", "virtual"])),
            priority=draw(st.integers(0, 2)),
            time_limit_s=draw(st.one_of(st.none(), st.floats(1, 1000))),
        )
        queue.append(Waiting(f"q{i}", request, draw(st.floats(0, 100)), draw(st.sampled_from(["", "A", "B"]))))
    now = draw(st.floats(0, 200))
    policy = draw(st.one_of(
        st.sampled_from([EASY, Policy()]),
        st.builds(Policy, st.floats(0, 10), st.floats(0, 500), st.floats(0, 100), st.floats(0, 0.99), st.booleans(),
                  st.floats(0, 8), st.floats(0, 100), hold_factor=st.floats(0, 5), hold_backlog=st.floats(0, 3)),
    ))
    return topology, now, free, queue, running, policy


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(states())
def test_plan_never_oversubscribes_and_explains_every_waiting_run(state):
    topology, now, free, queue, running, policy = state
    busy = {u for a in running for u in a.gpus}
    p = plan(now, topology, free, queue, running, policy)
    handed_out: list[str] = []
    by_id = {w.run_id: w for w in queue}
    for run_id, chosen in p.starts:
        request = by_id[run_id].request
        assert len(chosen) == request.count
        assert set(chosen) <= request.eligible(topology)
        handed_out.extend(chosen)
    assert len(handed_out) == len(set(handed_out)), "a GPU was given to two runs"
    assert set(handed_out) <= free - busy, "a busy or not-free GPU was given out"
    started_ids = [r for r, _ in p.starts]
    assert len(started_ids) == len(set(started_ids))
    assert set(p.reasons) == set(by_id) - set(started_ids)
    assert all(isinstance(text, str) and text for text in p.reasons.values())
    # Nothing delays the head: whatever started on a reserved GPU ends by the reservation (a run
    # ranked ahead of it too: the reservation counts the runs started in the same plan).
    if p.reservation is not None and p.reservation.at is not None:
        assert p.reservation.run_id not in started_ids
        for run_id, chosen in p.starts:
            if set(chosen) & set(p.reservation.gpus):
                assert now + by_id[run_id].request.time_limit_s <= p.reservation.at
    # Deterministic, whatever order the queue comes in, and the same from a kept RunQueue.
    again = plan(now, topology, free, list(reversed(queue)), list(reversed(running)), policy)
    assert again.starts == p.starts and again.reservation == p.reservation and again.reasons == p.reasons
    kept = RunQueue(policy=policy)
    for w in queue:
        kept.add(w)
    from_queue = plan(now, topology, free, kept, running, policy)
    assert from_queue.starts == p.starts and from_queue.reservation == p.reservation
    assert from_queue.reasons == p.reasons
    assert len(kept) == len(queue), "plan must leave a RunQueue unchanged"


@settings(max_examples=300, deadline=None)
@given(
    st.sampled_from([DGX, Topology.dgx(16), hetero(), Topology.uniform(12, 1)]),
    st.data(),
)
def test_place_only_returns_free_eligible_gpus(topology, data):
    uuids = list(topology.uuids)
    free = frozenset(data.draw(st.lists(st.sampled_from(uuids), unique=True)))
    request = GpuRequest(
        data.draw(st.integers(0, len(uuids))),
        min_memory_mib=data.draw(st.sampled_from([0, 50000, 90000])),
        name_filter=data.draw(st.sampled_from([None, "a100", "DGX"])),
    )
    chosen = place(topology, free, request)
    usable = free & request.eligible(topology)
    if len(usable) < request.count:
        assert chosen is None
    else:
        assert chosen is not None and len(chosen) == request.count == len(set(chosen))
        assert set(chosen) <= usable
        assert list(chosen) == sorted(chosen, key=lambda u: topology.gpu(u).index)


# ---------------------------------------------------------------------------------------------
# no starvation


def _replay(policy, horizon: float = 2000.0, limit: float | None = 60.0, warm: bool = True) -> float | None:
    """One DGX; eight 1-GPU runs hold it (ending t=10..80; none with ``warm`` False); an 8-GPU
    run is submitted at t=0; then a 1-GPU run lasting 60 s (time limit ``limit``) arrives every
    5 s. Returns when the 8-GPU run started, or None if it had not by ``horizon``."""
    # run -> (gpu, true end, start): warm run i started 10 x (i + 1) s ago and lasts twice that
    running = {f"warm-{i}": (U[i], 10.0 * (i + 1), -10.0 * (i + 1)) for i in range(8)} if warm else {}
    queue = {"big": Waiting("big", req(8, limit=100 if limit else None), 0.0)}
    now, next_arrival, k = 0.0, 0.0, 0
    while now <= horizon:
        while next_arrival <= now:
            queue[f"s{k}"] = Waiting(f"s{k}", req(1, limit=limit), next_arrival)
            next_arrival += 5.0
            k += 1
        running = {r: held for r, held in running.items() if held[1] > now}
        free = frozenset(U) - {g for g, _, _ in running.values()}
        for run_id, chosen in policy(now, free, list(queue.values()), running):
            if run_id == "big":
                return now
            queue.pop(run_id)
            running[run_id] = (chosen[0], now + 60.0, now)
        ends = [end for _, end, _ in running.values() if end > now]
        now = min([next_arrival, *ends])
    return None


def _dockyard(policy: Policy | None = None, limit: float | None = 60.0, starts: bool = False):
    def decide(now, free, queue, running):
        # expected end = start + time limit: the stream's runs last exactly their limit. With
        # ``starts`` the agent also tells when each run started (what guesses a run's end).
        active = [Active(r, (g,), end if limit else None, "", start if starts else None)
                  for r, (g, end, start) in running.items()]
        return plan(now, DGX, free, queue, active, policy).starts
    return decide


def _skip_ahead(now, free, queue, running):
    starts, free = [], sorted(free, key=U.index)
    for w in sorted(queue, key=lambda w: w.submitted):
        if w.request.count <= len(free):
            starts.append((w.run_id, tuple(free[: w.request.count])))
            free = free[w.request.count:]
    return starts


def test_an_8_gpu_run_at_the_head_starts_under_a_stream_of_1_gpu_runs():
    # EASY: its reservation is when the last warm run ends (t=80); backfill never pushes it later.
    assert _replay(_dockyard(EASY)) == 80.0
    # Skip-ahead (Ray / task-spooler style) starves it under the same stream: the test can fail.
    assert _replay(_skip_ahead) is None


@pytest.mark.parametrize("factor", [0.0, 0.5, 1.0, 3.0, 10.0])
def test_the_starvation_bound_holds_for_any_reserve_factor(factor):
    # The stated bound: a run at the front reserves once it has waited factor x its drain, and
    # the drain is at most L, the longest time limit among the runs it waits for (here 80 s for
    # the warm runs, 60 s for the stream): it starts within (1 + factor) x L.
    policy = Policy(reserve_factor=factor)
    started_at = _replay(_dockyard(policy), horizon=10_000.0)
    assert started_at is not None and started_at <= (1 + factor) * 80.0
    # The default policy passes the stream's runs for a while (they flow), within the bound.
    assert _replay(_dockyard()) <= (1 + Policy().reserve_factor) * 80.0


def test_without_time_limits_the_front_run_reserves_after_reserve_unknown_s():
    # Nothing has a time limit: nobody can say when the 8-GPU run could start. It lets the stream
    # flow until it has waited reserve_unknown_s, then nothing passes it: it starts once the runs
    # holding GPUs then end (60 s at most here).
    for wait in (0.0, 100.0, 600.0):
        started_at = _replay(_dockyard(Policy(reserve_unknown_s=wait), limit=None), horizon=10_000.0)
        assert started_at is not None and wait <= started_at <= wait + 80.0 + 5.0


@pytest.mark.parametrize("factor", [0.0, 1.0, 3.0, 30.0])
def test_without_time_limits_the_end_is_guessed_and_the_bound_holds(factor):
    # The agent tells when each run started: a run without a time limit that has run x seconds is
    # guessed to end x seconds from now, and the front run reserves once it has waited factor x
    # the guessed drain. The guess is never above the runtime of a run it waits for (at most L =
    # 160 s here: the warm runs last 20-160 s, the stream's 60 s), so it reserves by factor x L
    # and starts by (1 + factor) x L: the stated bound.
    bound = (1 + factor) * 160.0
    started_at = _replay(_dockyard(Policy(reserve_unknown_factor=factor), limit=None, starts=True), horizon=bound)
    assert started_at is not None and started_at <= bound
    if factor == 0.0:
        # No guess: it reserves at once and starts when the warm runs end (FIFO, as before).
        assert started_at == 80.0
    if factor >= 3.0:
        # The stream's 1-GPU runs flowed past it for a while: it did not reserve at once.
        assert started_at > 80.0 + 60.0


def test_a_guessed_drain_delays_the_reservation_but_never_promises_a_start():
    # 6 GPUs held by a run without a time limit that started 100 s ago: guessed free at t+100.
    running = [Active("forever", tuple(U[:6]), None, "", -100.0)]
    queue = [Waiting("big", req(8, limit=1000), 0.0), Waiting("small", req(1), 0.0)]
    policy = Policy(reserve_unknown_factor=3.0)
    p = plan(0.0, DGX, frozenset(U[6:]), queue, running, policy)
    assert list(started(p)) == ["small"] and p.reservation is None  # young: waits 3 x 100 s first
    assert "300s (3x the time they are guessed to take to free up, t+100s" in p.reasons["big"]
    # At t=700 that run has run 800 s: guessed to end at t+800, so the big run waits until it
    # has waited 3 x 800 s. Against one run the guess grows as fast as the wait (faster, x3):
    # it reserves once the runs in its way are young ones, which the bound's L covers.
    p = plan(700.0, DGX, frozenset(U[6:]), queue, running, policy)
    assert list(started(p)) == ["small"] and p.reservation is None
    # Once only a short-lived run is in the way, it reserves; the start stays unknown, so
    # nothing without a time limit is backfilled and no time is promised.
    running = [Active("recent", tuple(U[:6]), None, "", 650.0)]
    p = plan(700.0, DGX, frozenset(U[6:]), queue, running, policy)
    assert p.starts == () and p.reservation == Reservation("big", None, ())
    # Without a start (an agent that does not say), the old rule: reserve at once.
    p = plan(0.0, DGX, frozenset(U[6:]), queue, [Active("forever", tuple(U[:6]), None)], policy)
    assert p.starts == () and p.reservation == Reservation("big", None, ())
    # reserve_unknown_s is a floor under the guessed threshold.
    p = plan(700.0, DGX, frozenset(U[6:]), queue, running, Policy(reserve_unknown_factor=3.0, reserve_unknown_s=1e4))
    assert list(started(p)) == ["small"] and p.reservation is None


# ---------------------------------------------------------------------------------------------
# the default policy: delayed reservation, short runs first, fair share


def test_a_young_run_that_does_not_fit_reserves_nothing_and_small_runs_flow():
    # 6 GPUs busy until t=100 (drain 100 s at t=0); the 8-GPU run reserves once it has waited
    # reserve_factor x drain. Until then a 1-GPU run may start on a free GPU (one that ends by the
    # young run's guard, t=360: see the next test).
    running = [Active("busy", tuple(U[:6]), 100.0)]
    queue = [Waiting("big", req(8, limit=1000), 0.0), Waiting("long", req(1, limit=300), 1.0)]
    p = plan(10.0, DGX, frozenset(U[6:]), queue, running, Policy(reserve_factor=3.0))
    assert list(started(p)) == ["long"] and p.reservation is None
    assert p.reasons["big"].startswith("needs 8 GPUs; 1 free; smaller runs may start first until it reserves")
    # Waited 300 s >= 3 x 90 s: it reserves, and the long run no longer starts.
    p = plan(300.0, DGX, frozenset(U[6:]), queue, [Active("busy", tuple(U[:6]), 390.0)], Policy(reserve_factor=3.0))
    assert p.starts == () and p.reservation == Reservation("big", 390.0, tuple(U))


def test_a_long_wide_run_that_fits_holds_back_while_shorter_runs_start():
    # An idle DGX at t=10. "big" (8 GPUs x 1000 s) fits, but would make the 1-GPU runs wait its
    # whole time limit: it holds back until it has waited 1.5 x 1000 s x 8/8 (t=1500), the short
    # run starts, and a 1-GPU run that would end after t=1500 may not take its GPUs.
    queue = [Waiting("big", req(8, limit=1000), 0.0), Waiting("short", req(1, limit=100), 5.0),
             Waiting("long", req(1, limit=2000), 6.0)]
    p = plan(10.0, DGX, frozenset(U), queue, [])
    assert list(started(p)) == ["short"] and p.reservation is None
    assert p.reasons["big"].startswith("fits now, but holds back until t+1490s so that shorter runs start first")
    assert "its time limit ends after t+1490s" in p.reasons["long"]
    # Off, it takes the machine at once.
    assert list(started(plan(10.0, DGX, frozenset(U), queue, [], Policy(hold_factor=0.0)))) == ["big"]
    # Once it has waited that long it starts (the short run ended meanwhile).
    assert list(started(plan(1500.0, DGX, frozenset(U), [queue[0], queue[2]], []))) == ["big"]


def test_a_wide_run_holds_only_for_runs_that_gain_from_it():
    big = Waiting("big", req(8, limit=1000), 0.0)
    # Nothing shorter that would end within the hold (t+1490s): no hold.
    assert list(started(plan(10.0, DGX, frozenset(U), [big, Waiting("s", req(1, limit=1600), 5.0)], []))) == ["big"]
    # A run without a time limit that fits would be kept waiting by the hold (nothing without a
    # limit passes a guard): no hold.
    queue = [big, Waiting("short", req(1, limit=100), 5.0), Waiting("open", req(1), 6.0)]
    assert list(started(plan(10.0, DGX, frozenset(U), queue, []))) == ["big"]
    # Under a backlog (the other runs' work, 90 x 100 GPU-s over 8 GPUs, is more than its time
    # limit) holding would only stretch its wait.
    queue = [big] + [Waiting(f"s{i}", req(1, limit=100), 5.0 + i) for i in range(90)]
    assert list(started(plan(10.0, DGX, frozenset(U), queue, []))) == ["big"]
    assert len(started(plan(10.0, DGX, frozenset(U), queue, [], Policy(hold_backlog=0.0)))) == 8
    # A 4-GPU run holds only when the shorter runs need its GPUs: one short run goes beside it...
    half = Waiting("half", req(4, limit=1000), 0.0)
    shorts = [Waiting(f"s{i}", req(1, limit=100), 5.0 + i) for i in range(5)]
    assert set(started(plan(10.0, DGX, frozenset(U), [half, shorts[0]], []))) == {"half", "s0"}
    # ...five take the other four GPUs and one of its own, so it holds back (nothing idles).
    p = plan(10.0, DGX, frozenset(U), [half, *shorts], [])
    assert set(started(p)) == {f"s{i}" for i in range(5)} and "holds back" in p.reasons["half"]


def test_a_held_run_starts_within_its_bound_under_a_stream_of_short_runs():
    # An idle DGX; "big" (8 GPUs, 100 s limit) and a stream of 1-GPU runs of 60 s, one every 5 s.
    # It holds back for at most 1.5 x 100 s x 8/8 = 150 s, and only runs that end by then start
    # on its GPUs: it starts by t=150 (plus a decision), where skip-ahead starves it.
    started_at = _replay(_dockyard(), horizon=10_000.0, warm=False)
    assert started_at is not None and 0.0 < started_at <= 155.0
    assert _replay(_dockyard(Policy(hold_factor=0.0)), warm=False) == 0.0
    assert _replay(_skip_ahead, warm=False) == 0.0  # it fits at once; skip-ahead takes it then


def test_the_oldest_run_waiting_reserves_after_fewer_drains():
    # 6 GPUs busy until t=100. "old" (8 GPUs) was submitted first; "urgent" (8 GPUs of >= 1 MiB,
    # another shape, and a higher priority, so ranked ahead of it) later. At t=40 (drain 60 s)
    # neither reserves: "old" would
    # after 0.75 x 60 = 45 s, "urgent" after 3 x 60. Each guards the GPUs: "old" until t=100 + 45
    # - 40 = 105, "urgent" until t=100 + 180 - 35 = 245, so a 1-GPU run ending at t=100 starts and
    # one ending at t=106 does not.
    running = [Active("busy", tuple(U[:6]), 100.0)]
    queue = [Waiting("old", req(8, limit=1000), 0.0), Waiting("urgent", req(8, limit=1000, priority=1, min_memory_mib=1), 5.0),
             Waiting("small", req(1, limit=60), 6.0), Waiting("small2", req(1, limit=66), 7.0)]
    policy = Policy(reserve_oldest_factor=0.75, fair_share=False)
    p = plan(40.0, DGX, frozenset(U[6:]), queue, running, policy)
    assert list(started(p)) == ["small"] and p.reservation is None
    assert "waited 0.75x the time they take to free up (the oldest run waiting)" in p.reasons["old"]
    assert "waited 3x the time they take to free up (they" in p.reasons["urgent"]
    assert p.reasons["small2"].startswith("its time limit ends after t+65s, and run old")
    # At t=50 (drain 50 s) "old" has waited 50 s >= 0.75 x 50 and reserves; "urgent" (45 s < 150)
    # does not, though ranked ahead. Nothing may end after the reservation on its GPUs.
    p = plan(50.0, DGX, frozenset(U[6:]), queue, running, policy)
    assert p.reservation == Reservation("old", 100.0, tuple(U)) and p.starts == ()
    # By default the oldest run waits three drains like the others: nothing reserves yet and the
    # small runs flow (both end by the guards, t=200 and t=205).
    p = plan(50.0, DGX, frozenset(U[6:]), queue, running, Policy(fair_share=False))
    assert p.reservation is None and sorted(started(p)) == ["small", "small2"]
    # The oldest's factor is never more than reserve_factor's: with 5 (and reserve_factor 3) it
    # still reserves after 3 drains, like any run (at t=150, drain 50 s: "old" has waited 150 s,
    # "urgent" 145 s).
    assert plan(50.0, DGX, frozenset(U[6:]), queue, running,
                Policy(reserve_oldest_factor=5.0, fair_share=False)).reservation is None
    late = plan(150.0, DGX, frozenset(U[6:]), queue, [Active("busy", tuple(U[:6]), 200.0)],
                Policy(reserve_oldest_factor=5.0, fair_share=False))
    assert late.reservation == Reservation("old", 200.0, tuple(U))
    # Of one shape, the higher-priority run is its front; the oldest behind it is still looked at.
    queue[1] = Waiting("urgent", req(8, limit=1000, priority=1), 5.0)
    p = plan(50.0, DGX, frozenset(U[6:]), queue, running, policy)
    assert p.reservation == Reservation("old", 100.0, tuple(U)) and p.starts == ()


def test_a_young_run_placed_ahead_does_not_hide_an_older_run_of_its_shape_that_may_reserve():
    # Two 8-GPU runs; 6 GPUs busy until t=4600 (drain 1000 s at t=3600: reserve after 3000 s).
    # "old" waited 3600 s (placed at 0 + min(30 x 10000, 0.25 x 3600) = 900), "young" 2900 s
    # (placed at 700 + 30 x 1 = 730: ahead of "old", short-first). The young one passes; the
    # old one still reserves, so a 1-GPU run ending at t=4650 no longer starts on its GPUs (the
    # young run's guard alone would let it: t=4600 + 3000 - 2900 = 4700).
    running = [Active("busy", tuple(U[:6]), 4600.0)]
    queue = [Waiting("old", req(8, limit=10_000), 0.0), Waiting("young", req(8, limit=1), 700.0),
             Waiting("small", req(1, limit=1050), 800.0)]
    p = plan(3600.0, DGX, frozenset(U[6:]), queue, running, Policy(reserve_factor=3.0, fair_share=False))
    assert p.reservation == Reservation("old", 4600.0, tuple(U))
    assert p.starts == ()
    assert p.reasons["old"] == "needs 8 GPUs; 2 free; reserved 8 GPUs from t+1000s"
    assert p.reasons["young"].startswith("needs 8 GPUs; 2 free; smaller runs may start first until it reserves")
    # Once "young" has waited long enough too, it takes the reservation over (placed ahead).
    p = plan(3800.0, DGX, frozenset(U[6:]), queue, running, Policy(reserve_factor=3.0, fair_share=False))
    assert p.reservation == Reservation("young", 4600.0, tuple(U))


def test_a_run_behind_a_young_run_starts_only_if_it_ends_by_the_young_runs_guard():
    # "big" (8 GPUs) at t=10: free from t=100 (drain 90 s), it reserves once it has waited
    # 3 x 90 = 270 s, 260 s from now. Its guard: t=100 + 260 = 360. A run ranked behind it may
    # take its GPUs only if it ends by then, so no single long run moves its start far.
    running = [Active("busy", tuple(U[:6]), 100.0)]
    queue = [Waiting("big", req(8, limit=1000), 0.0), Waiting("fits", req(1, limit=350), 1.0),
             Waiting("too-long", req(1, limit=351), 2.0), Waiting("no-limit", req(1), 3.0)]
    p = plan(10.0, DGX, frozenset(U[6:]), queue, running, Policy(reserve_factor=3.0))
    assert list(started(p)) == ["fits"] and p.reservation is None
    assert p.reasons["too-long"].startswith("its time limit ends after t+350s, and run big (ahead in the queue")
    assert p.reasons["no-limit"] == p.reasons["too-long"]
    # The guard shrinks as the run ages: at t=50 (drain 50 s, it reserves after 150 s, 100 s
    # from now) it is t=200.
    queue = [Waiting("big", req(8, limit=1000), 0.0), Waiting("a", req(1, limit=150), 1.0),
             Waiting("b", req(1, limit=151), 2.0)]
    p = plan(50.0, DGX, frozenset(U[6:]), queue, running, Policy(reserve_factor=3.0))
    assert list(started(p)) == ["a"] and p.reservation is None


def test_a_young_runs_guard_covers_only_the_gpus_it_would_start_on():
    # "quad" needs 4 GPUs: GPUs 0-3 free up at t=100, GPUs 4-5 are busy much longer, 6-7 free.
    # It would start on 0-3, so a long run may still take GPU 6 or 7, never a GPU of 0-3.
    running = [Active("a", tuple(U[:4]), 100.0), Active("b", tuple(U[4:6]), 10_000.0)]
    queue = [Waiting("quad", req(4, limit=1000), 0.0), Waiting("long", req(2, limit=5000), 1.0)]
    p = plan(10.0, DGX, frozenset(U[6:]), queue, running, Policy(reserve_factor=3.0))
    assert dict(p.starts) == {"long": tuple(U[6:])} and p.reservation is None


def test_backfill_behind_a_reservation_keeps_to_the_guard_of_a_young_run_ranked_ahead():
    # At t=300 "wide" (8 GPUs, first in the queue) is young: free from t=1000, it reserves after
    # 2 x 700 s; its guard is t=1000 + 1400 - 300 = 2100. "quad" (4 GPUs) has waited long
    # enough: it reserves GPUs 0-3 from t=400. Backfill onto GPUs 6-7 must also end by t=2100.
    running = [Active("x", tuple(U[:4]), 400.0), Active("y", tuple(U[4:6]), 1000.0)]
    queue = [Waiting("wide", req(8, limit=100), 0.0), Waiting("quad", req(4, limit=100), 0.5),
             Waiting("long", req(1, limit=5000), 1.0), Waiting("ends-in-time", req(1, limit=1800), 2.0)]
    policy = Policy(reserve_factor=2.0, short_first=0.0, fair_share=False)
    p = plan(300.0, DGX, frozenset(U[6:]), queue, running, policy)
    assert p.reservation == Reservation("quad", 400.0, tuple(U[:4]))
    assert list(started(p)) == ["ends-in-time"]
    assert p.reasons["long"].startswith("its time limit ends after t+1800s, and run wide")


def test_short_runs_go_first_within_a_window_of_the_longest_wait():
    # One free GPU. The oldest run waited 1000 s: the shift is at most 0.25 x 1000 = 250 s.
    running = [Active("busy", tuple(U[:7]), None)]
    queue = [
        Waiting("old-long", req(1, limit=10_000), 0.0),   # place 0 + min(300000, 250) = 250
        Waiting("new-short", req(1, limit=1), 100.0),     # place 100 + 30 = 130: goes first
        Waiting("newer-short", req(1, limit=5), 200.0),   # place 200 + 150 = 350: after old-long
    ]
    policy = Policy(short_first=30.0, short_first_window=0.25)
    assert list(started(plan(1000.0, DGX, frozenset(U[7:]), queue, running, policy))) == ["new-short"]
    assert list(started(plan(1000.0, DGX, frozenset(U[7:]), queue[::2], running, policy))) == ["old-long"]
    # Submit order when short_first is 0.
    assert list(started(plan(1000.0, DGX, frozenset(U[7:]), queue, running, Policy(short_first=0.0)))) == ["old-long"]


def test_a_shallow_queue_is_not_reordered_beyond_its_own_work():
    # The end of a busy period: two 1-GPU runs left, one GPU free, the oldest waited 1e6 s. The
    # longest-wait cap (0.25 x 1e6) would put the 4,000 s run before the 15,000 s one, which
    # would then start last and end last; the queued work (19,000 GPU-s over 8 GPUs) caps the
    # shift at 0.25 x 4 x 2,375 s, so the older, longer run goes first.
    running = [Active("busy", tuple(U[:7]), None)]
    queue = [Waiting("long", req(1, limit=15_000), 0.0), Waiting("short", req(1, limit=4_000), 10.0)]
    free = frozenset(U[7:])
    assert list(started(plan(1e6, DGX, free, queue, running))) == ["long"]
    assert list(started(plan(1e6, DGX, free, queue, running, Policy(short_first_backlog=0.0)))) == ["short"]
    # Under a backlog (a hundred more runs waiting) the short run goes first again.
    backlog = [Waiting(f"more-{i}", req(1, limit=15_000), 20.0 + i) for i in range(100)]
    assert list(started(plan(1e6, DGX, free, queue + backlog, running))) == ["short"]
    # A RunQueue kept through adds and removes decides as a fresh one (its work sum is exact).
    rq = RunQueue(queue + backlog)
    for w in backlog:
        rq.remove(w.run_id)
    assert list(started(plan(1e6, DGX, free, rq, running))) == ["long"]


def test_a_run_submitted_when_the_oldest_has_waited_is_placed_behind_it():
    # With a window below 1, the oldest run's place (submitted + window x its wait) is before now,
    # so a run submitted now, however short, is placed behind it.
    running = [Active("busy", tuple(U[:7]), None)]
    policy = Policy(short_first=1000.0, short_first_window=0.9)
    for now in (1.0, 100.0, 1e6):
        queue = [Waiting("oldest", req(1), 0.0), Waiting("now", req(1, limit=0.001), now)]
        assert list(started(plan(now, DGX, frozenset(U[7:]), queue, running, policy))) == ["oldest"]


def test_fair_share_lets_another_workspace_through_a_thousand_runs():
    # Workspace A holds every GPU and has 1,000 runs queued; workspace B submits one run after them.
    # When a GPU frees, B's run goes first: A holds more than its share (8 GPUs / 2 workspaces).
    running = [Active(f"a-run-{i}", (U[i],), 100.0, "A") for i in range(1, 8)]
    queue = [Waiting(f"a{i:04}", req(1, limit=100), float(i), "A") for i in range(1000)]
    queue.append(Waiting("b-only", req(1, limit=100), 2000.0, "B"))
    p = plan(2000.0, DGX, frozenset(U[:1]), queue, running)
    assert list(started(p)) == ["b-only"]
    # Without fair share it waits for every one of A's runs: submit order.
    p = plan(2000.0, DGX, frozenset(U[:1]), queue, running, Policy(fair_share=False))
    assert list(started(p)) == ["a0000"]


def test_fair_share_over_a_replay_bounds_the_small_workspace_wait():
    # A submits 1,000 runs of 100 s at t=0, B one at t=1. B's run starts within one run's
    # duration (the first GPU to free), not after A's thousand runs (12,500 s on 8 GPUs).
    queue = RunQueue([Waiting(f"a{i:04}", req(1, limit=100), 0.0, "A") for i in range(1000)])
    queue.add(Waiting("b-only", req(1, limit=100), 1.0, "B"))
    running: dict[str, Active] = {}
    now = 0.0
    while "b-only" in queue:
        free = frozenset(U) - {g for a in running.values() for g in a.gpus}
        for run_id, chosen in plan(now, DGX, free, queue, list(running.values())).starts:
            w = queue.remove(run_id)
            running[run_id] = Active(run_id, chosen, now + 100.0, w.account)
        if "b-only" not in queue:
            break
        now = max(now + 1.0, min(a.expected_end for a in running.values()))
        running = {r: a for r, a in running.items() if a.expected_end > now}
    assert now <= 100.0


def test_policy_is_validated_and_read_from_the_environment():
    assert Policy.from_env({}) == Policy()
    env = {"DOCKYARD_RESERVE_FACTOR": "1.5", "DOCKYARD_RESERVE_UNKNOWN_S": "60", "DOCKYARD_SHORT_FIRST": "0",
           "DOCKYARD_SHORT_FIRST_WINDOW": "0.5", "DOCKYARD_FAIR_SHARE": "0", "DOCKYARD_SHORT_FIRST_BACKLOG": "2",
           "DOCKYARD_RESERVE_UNKNOWN_FACTOR": "5", "DOCKYARD_RESERVE_OLDEST_FACTOR": "0.5",
           "DOCKYARD_HOLD_FACTOR": "3", "DOCKYARD_HOLD_BACKLOG": "0"}
    assert Policy.from_env(env) == Policy(1.5, 60.0, 0.0, 0.5, False, 2.0, 5.0, 0.5, 3.0, 0.0)
    for env, words in [({"DOCKYARD_RESERVE_FACTOR": "soon"}, "not a number"),
                       ({"DOCKYARD_SHORT_FIRST_WINDOW": "1"}, "out of range"),
                       ({"DOCKYARD_RESERVE_UNKNOWN_S": "-1"}, "out of range"),
                       ({"DOCKYARD_RESERVE_UNKNOWN_FACTOR": "-3"}, "out of range"),
                       ({"DOCKYARD_RESERVE_UNKNOWN_FACTOR": "often"}, "not a number"),
                       ({"DOCKYARD_SHORT_FIRST_BACKLOG": "-4"}, "out of range"),
                       ({"DOCKYARD_SHORT_FIRST_BACKLOG": "deep"}, "not a number"),
                       ({"DOCKYARD_RESERVE_OLDEST_FACTOR": "-1"}, "out of range"),
                       ({"DOCKYARD_RESERVE_OLDEST_FACTOR": "early"}, "not a number"),
                       ({"DOCKYARD_HOLD_FACTOR": "-1"}, "out of range"),
                       ({"DOCKYARD_HOLD_BACKLOG": "lots"}, "not a number"),
                       ({"DOCKYARD_FAIR_SHARE": "maybe"}, "must be 1 or 0")]:
        with pytest.raises(InputError, match=words):
            Policy.from_env(env)
    with pytest.raises(InputError, match="reserve_factor"):
        Policy(reserve_factor=float("nan"))
    with pytest.raises(InputError, match="fair_share"):
        Policy(fair_share=1)  # type: ignore[arg-type]
    with pytest.raises(InputError, match="policy must be a Policy"):
        plan(0.0, DGX, frozenset(U), [], [], "easy")  # type: ignore[arg-type]
    with pytest.raises(InputError, match="another short_first"):
        plan(0.0, DGX, frozenset(U), RunQueue(policy=EASY), [])
    with pytest.raises(InputError, match="account"):
        Waiting("a", req(1), 0.0, None)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# RunQueue: the incremental queue plan reads


def _order(w: Waiting) -> tuple:
    return (-w.request.priority, w.submitted, w.run_id)


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 400), st.integers(0, 2**32 - 1))
def test_run_queue_keeps_queue_order_through_adds_and_removes(n, seed):
    # Enough runs of a few shapes to fill several blocks, so splits and empty blocks happen.
    rng = random.Random(seed)
    rq = RunQueue()
    live: dict[str, Waiting] = {}
    for i in range(n):
        request = req(rng.choice([1, 1, 1, 2, 8]), limit=rng.choice([None, 10.0, 50.0, 900.0]),
                      priority=rng.randint(0, 1))
        w = Waiting(f"r{i}", request, rng.choice([rng.uniform(0, 1000), 5.0]))
        rq.add(w)
        live[w.run_id] = w
        if rng.randrange(4) == 0:
            gone = rng.choice(sorted(live))
            assert rq.remove(gone) is live.pop(gone)
    expected = sorted(live.values(), key=_order)
    assert list(rq) == expected
    assert len(rq) == len(expected)
    assert rq.first() == (expected[0] if expected else None)
    assert all(run_id in rq for run_id in live) and "nobody" not in rq
    # Each bucket answers "runs whose time limit is in (low, high]" in submit order, and in
    # queue order (submitted + min(c x limit, cap)) for any cap.
    for bucket in rq._buckets.values():
        members = list(bucket)
        assert members == sorted(members)
        for low, high in [(-1.0, 10.0), (10.0, 900.0), (50.0, float("inf")), (-float("inf"), float("inf"))]:
            assert list(bucket.by_submit.within(low, high)) == [e for e in members if low < e[1] <= high]
            for cap in (0.0, 100.0, 2000.0, 1e9):
                c = rq._short_first
                places = sorted(((o[0], o[1] + min(c * lim, cap), o[1], o[2]), lim, w) for o, lim, w in members
                                if low < lim <= high)
                assert list(bucket.ordered(low, high, c, cap)) == places


def test_run_queue_refuses_duplicates_and_unknown_runs():
    rq = RunQueue([Waiting("a", req(1), 0.0)])
    with pytest.raises(InputError, match="twice"):
        rq.add(Waiting("a", req(2), 5.0))
    with pytest.raises(InputError, match="not in the queue"):
        rq.remove("b")
    with pytest.raises(InputError, match="Waiting"):
        rq.add("a run")  # type: ignore[arg-type]
    assert [w.run_id for w in rq] == ["a"]


def test_reasons_of_a_plan_made_from_a_run_queue_must_be_read_before_it_changes():
    rq = RunQueue([Waiting("big", req(8, limit=10), 0.0), Waiting("small", req(1, limit=10), 1.0)], EASY)
    running = [Active("busy", tuple(U[:6]), 100.0)]
    p = plan(0.0, DGX, frozenset(U[6:]), rq, running, policy=EASY)
    assert [r for r, _ in p.starts] == ["small"]
    rq.remove("small")
    with pytest.raises(InputError, match="changed after this plan"):
        _ = p.reasons
    fresh = plan(0.0, DGX, frozenset(U[7:]), rq, running, policy=EASY)
    assert set(fresh.reasons) == {"big"}


def test_plan_over_a_long_queue_reads_only_what_it_may_start():
    # 5,000 runs waiting behind an 8-GPU head: the decision is the same as over a short queue
    # holding the runs that matter (the head, and the first short and long run of each shape).
    running = [Active("busy", tuple(U[:6]), 100.0)]
    long_queue = [Waiting("big", req(8, limit=10), 0.0)]
    long_queue += [Waiting(f"long{i:04}", req(1, limit=500), 1.0 + i) for i in range(5000)]
    long_queue += [Waiting("short", req(2, limit=50), 9000.0)]
    rq = RunQueue(long_queue, EASY)
    assert max(len(b.by_submit.blocks) for b in rq._buckets.values()) > 10  # the 1-GPU runs span many blocks
    p = plan(0.0, DGX, frozenset(U[6:]), rq, running, policy=EASY)
    assert started(p) == {"short": [6, 7]}
    assert p.reservation == Reservation("big", 100.0, tuple(U))


def test_an_empty_time_limit_range_reads_no_entry():
    # ordered() asks for pieces of a range cut at the short-first split, which are often empty;
    # every block holding both short and long limits straddles such a piece, and reading it
    # through cost 1,800 entries per decision on multigpu20 with random limits.
    class Counted(list):
        reads = 0

        def __iter__(self):
            for e in super().__iter__():
                Counted.reads += 1
                yield e

    index = _sched._Index()
    for i in range(1000):
        index.add(((0, float(i), f"r{i:04}"), 1.0 if i % 2 else 100.0, None))
    assert len(index.blocks) > 5
    index.blocks = [Counted(b) for b in index.blocks]
    assert list(index.within(50.0, 40.0)) == [] and list(index.within(50.0, 50.0)) == []
    assert Counted.reads == 0
    short = [e[0][2] for e in index.within(0.0, 1.0)]
    assert short == [f"r{i:04}" for i in range(1, 1000, 2)]
