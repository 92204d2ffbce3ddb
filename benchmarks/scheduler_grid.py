#!/usr/bin/env python3
"""Replay the queue policy over a grid of traces and count the issue's goals missed in all: the
one number a policy change is judged by (a change moves misses between cells; one cell says little).

    python benchmarks/scheduler_grid.py [--traces ../shared/traces] [--time-limit-factor 1 2 random]
        [--holdout] [--extra FILE ...] [--jobs N] [--json]

The grid: ``openb_pod_list_default.csv`` and ``openb_pod_list_multigpu20.csv`` whole and in
halves (the first and second half of their usable rows, ``scheduler_sim.py --limit`` and
``--skip``), and lists written by ``trace_variant.py`` (multigpu20 with half of its GPUs asked by
multi-GPU pods, and the default list and multigpu20 with 30-40 %), each replayed at loads 0.3,
0.5, 0.7 and 0.9 under each time-limit variant on one 8-GPU node. ``--holdout`` replays four
more lists instead (the default list with 20 % and 40 %, multigpu20 with 25 % and 50 %, other
seeds), kept apart to check a change the grid favours before it is kept: the grid has been looked
at while the policy was tuned, the hold-out has not. ``--extra`` adds other pod lists, replayed
whole (a list without time columns borrows them from the default list, as multigpu20 does): the
data set's other lists (``multigpu30``-``50``, ``gpushare*``, ``gpuspec*``, ``cpu*``) are
real workloads of the kind, when they are at hand. The policy's settings come from the
environment as the agent reads them (``DOCKYARD_RESERVE_FACTOR=5 python benchmarks/...``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import scheduler_sim as sim  # sibling scripts, not a package
import trace_variant

DEFAULT = "openb_pod_list_default.csv"
MULTIGPU20 = "openb_pod_list_multigpu20.csv"
# (name, source list, share of the GPUs asked by multi-GPU pods, seed) for trace_variant.py.
VARIANTS = (("multigpu50-like", MULTIGPU20, 0.5, 50), ("default-mg30", DEFAULT, 0.3, 7),
            ("multigpu30-like", MULTIGPU20, 0.3, 30), ("multigpu40-like", MULTIGPU20, 0.4, 40))
HOLDOUT = (("default-mg20", DEFAULT, 0.2, 21), ("default-mg40", DEFAULT, 0.4, 41),
           ("multigpu25-like", MULTIGPU20, 0.25, 25), ("multigpu50-seed51", MULTIGPU20, 0.5, 51))
LOADS = (0.3, 0.5, 0.7, 0.9)
NEAR_TIE = 0.005


@dataclass(frozen=True)
class Replay:
    """One trace slice of the grid: a file and the rows of it replayed."""

    name: str
    trace: Path
    times: Path
    skip: int = 0
    limit: int | None = None


def _usable(trace: Path, times: Path) -> int:
    """Rows the replay can use (a run with a start and a positive duration, GPU or not)."""
    t = sim.load_trace(trace, limit=None, node_gpus=8, gpus_total=8, load=0.5, times=times)
    return len(t.jobs) + t.cpu_only + t.too_wide


def _variant(name: str, source: Path, share: float, seed: int, folder: Path) -> Path:
    out = folder / f"{name}.csv"
    try:
        trace_variant.write_variant(source, share, seed, out)
    except trace_variant.VariantError as exc:
        raise SystemExit(f"cannot write the {name} list: {exc}") from None
    return out


def grid(traces: Path, folder: Path, holdout: bool, extra: tuple[Path, ...] = ()) -> list[Replay]:
    """The replays of the grid (or of the hold-out), variants written under ``folder``, then the
    ``extra`` lists whole."""
    for name in (DEFAULT, MULTIGPU20):
        if not (traces / name).is_file():
            raise SystemExit(f"{traces / name}: not found; pass --traces, the folder holding the openb pod lists")
    times = traces / DEFAULT
    out: list[Replay] = []
    if not holdout:
        for label, name in (("default", DEFAULT), ("multigpu20", MULTIGPU20)):
            half = _usable(traces / name, times) // 2
            out += [Replay(label, traces / name, times), Replay(f"{label} 1st half", traces / name, times, limit=half),
                    Replay(f"{label} 2nd half", traces / name, times, skip=half)]
    for label, source, share, seed in HOLDOUT if holdout else VARIANTS:
        out.append(Replay(label, _variant(label, traces / source, share, seed, folder), times))
    out += [Replay(path.stem.removeprefix("openb_pod_list_"), path, times) for path in extra]
    return out


def replay(job: tuple[Replay, list[float | str | None]]) -> dict[str, Any]:
    """Replay one slice under every limit variant; its cells' goals (run in a worker process)."""
    r, limits = job
    args = argparse.Namespace(trace=str(r.trace), gpus=8, nodes=1, load=list(LOADS), skip=r.skip, limit=r.limit,
                              times=str(r.times), time_limit_factor=limits, workspaces=1)
    doc = sim.run(args)
    cells = []
    for c in doc["_cells"]:
        short = sim.goal_shortfalls(c["load"], c["d"], c["fifo"], c["skip"])
        missed = [goal for goal, met in c["goals"].items() if not met]
        cells.append({"load": c["load"], "limits": sim.limits_label(c["limits"]), "missed": missed,
                      "shortfall": {goal: round(short[goal], 6) for goal in missed}})
    return {"trace": r.name, "cells": cells, "latency_goal": doc["_latency_goal"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--traces", default=str(Path(__file__).resolve().parents[2] / "shared" / "traces"),
                        help="the folder holding openb_pod_list_default.csv and openb_pod_list_multigpu20.csv")
    parser.add_argument("--time-limit-factor", type=sim.parse_limits, nargs="+", default=[1.0, 2.0, "random"],
                        help="as scheduler_sim.py's (default: 1 2 random)")
    parser.add_argument("--holdout", action="store_true", help="replay the hold-out lists instead of the grid")
    parser.add_argument("--extra", type=Path, nargs="+", default=[], metavar="FILE",
                        help="more pod lists to replay whole (e.g. the data set's openb_pod_list_multigpu50.csv)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="replays run at once")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error("--jobs must be >= 1")
    for path in args.extra:
        if not path.is_file():
            parser.error(f"--extra {path}: no such file")
    try:
        policy = sim.QueuePolicy.from_env(os.environ)
    except sim.InputError as exc:  # a bad DOCKYARD_* setting, named by the error
        parser.error(str(exc))
    with tempfile.TemporaryDirectory(prefix="dockyard-grid-") as tmp:
        replays = grid(Path(args.traces), Path(tmp), args.holdout, tuple(args.extra))
        with ProcessPoolExecutor(min(args.jobs, len(replays))) as pool:
            results = list(pool.map(replay, [(r, args.time_limit_factor) for r in replays]))
    cells = [c for r in results for c in r["cells"]]
    missed = sum(len(c["missed"]) for c in cells)
    met = sum(not c["missed"] for c in cells)
    by_goal: dict[str, int] = {}
    for c in cells:
        for goal in c["missed"]:
            by_goal[goal] = by_goal.get(goal, 0) + 1
    # Misses by less than NEAR_TIE of the figure: ties a change of policy flips either way.
    near = sum(1 for c in cells for v in c["shortfall"].values() if v < NEAR_TIE)
    total = {"goals_missed": missed, "cells": len(cells), "cells_all_met": met, "by_goal": by_goal,
             "missed_by_under_half_a_percent": near,
             "latency_goal_met": all(r["latency_goal"] for r in results)}
    if args.json:
        json.dump({"benchmark": "scheduler_grid", "holdout": args.holdout, "policy": str(policy),
                   "traces": results, "total": total}, sys.stdout)
        sys.stdout.write("\n")
        return 0
    print(f"queue policy {policy}")
    print(f"{'trace':<22}{'cells met':>10}{'missed':>8}  missed goals (limits @load)")
    for r in results:
        n = sum(len(c["missed"]) for c in r["cells"])
        ok = sum(not c["missed"] for c in r["cells"])
        where = "; ".join(f"{c['limits']} @{c['load']:g}: {', '.join(c['missed'])}" for c in r["cells"] if c["missed"])
        share = f"{ok}/{len(r['cells'])}"
        print(f"{r['trace']:<22}{share:>10}{n:>8}  {where}")
    print(f"{'grid' if not args.holdout else 'hold-out'}: {missed} goal(s) missed over {len(cells)} cells, "
          f"all goals met in {met}; {near} of the misses by < 0.5 %; by goal: "
          + ", ".join(f"{g} {n}" for g, n in sorted(by_goal.items()))
          + f"; plan p95 <= 100 us with >= 1000 waiting: {'met' if total['latency_goal_met'] else 'NOT met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
