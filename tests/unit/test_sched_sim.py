"""benchmarks/scheduler_sim.py replays traces through the real plan/place and checks every start."""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "scheduler_sim.py"
TRACES = Path("/work/shared/traces")
POLICIES = ("dockyard", "fifo", "skip_ahead")
COLUMNS = ("name,cpu_milli,memory_mib,num_gpu,gpu_milli,gpu_spec,qos,pod_phase,"
           "creation_time,deletion_time,scheduled_time")


def _sim():
    spec = importlib.util.spec_from_file_location("scheduler_sim", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["scheduler_sim"] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def _write_trace(path: Path, n: int = 400, seed: int = 7) -> Path:
    """A small pod list in the openb format: mostly 1-GPU runs, some 2/4/8, CPU-only and unscheduled rows."""
    rng = random.Random(seed)
    lines = [COLUMNS]
    t = 0
    for i in range(n):
        t += rng.randint(0, 600)
        gpus = rng.choices([0, 1, 2, 4, 8], weights=[10, 70, 8, 6, 6])[0]
        milli = rng.choice([460, 1000]) if gpus == 1 else 1000 if gpus else 0
        duration = int(rng.expovariate(1 / 3000)) + 1
        scheduled = "" if i % 50 == 3 else str(t + rng.randint(0, 5))
        end = (int(scheduled) if scheduled else t) + duration
        lines.append(f"pod-{i:04d},4000,8192,{gpus},{milli},,LS,Running,{t},{end},{scheduled}")
    path.write_text("\n".join(lines) + "\n")
    return path


def _check_doc(doc: dict) -> dict[str, dict]:
    assert set(doc) == {"benchmark", "results", "ratios", "notes"}
    assert doc["benchmark"] == "scheduler_sim"
    by = {}
    for row in doc["results"]:
        assert set(row) == {"name", "unit", "p50", "p95", "n"}
        assert isinstance(row["p50"], float | int) and isinstance(row["n"], int)
        by[row["name"]] = row
    for policy in POLICIES:
        for metric in ("makespan", "utilisation", "wait", "wait_mean", "wait_ge4_mean", "wait_max", "fragmentation"):
            assert f"{policy}:{metric}" in by
        assert 0 < by[f"{policy}:utilisation"]["p50"] <= 1
        assert 0 <= by[f"{policy}:fragmentation"]["p50"] <= 1
        assert by[f"{policy}:wait"]["p50"] <= by[f"{policy}:wait"]["p95"] <= by[f"{policy}:wait_max"]["p50"]
    assert by["dockyard:plan_latency"]["n"] > 0 and by["dockyard:plan_latency"]["p50"] > 0
    assert "skip_ahead:wait_ge4_mean/dockyard:wait_ge4_mean" in doc["ratios"]
    assert all(isinstance(v, float | int) and v > 0 for v in doc["ratios"].values())
    assert "offered load 0.900" in doc["notes"]
    assert "checked against oversubscription, none found; every run started" in doc["notes"]
    assert "reservation promises:" in doc["notes"]
    return by


def test_replay_of_a_small_trace_prints_one_json_object(tmp_path: Path):
    trace = _write_trace(tmp_path / "pods.csv")
    out = subprocess.run(
        [sys.executable, str(SCRIPT), "--trace", str(trace), "--limit", "300", "--load", "0.9", "--json"],
        capture_output=True, text=True, check=True, timeout=120,
    ).stdout
    by = _check_doc(json.loads(out))  # exactly one object: json.loads refuses trailing text
    n = by["dockyard:wait"]["n"]
    assert 0 < n <= 300 and all(by[f"{p}:wait"]["n"] == n for p in POLICIES)


@pytest.mark.parametrize("name", ["openb_pod_list_default.csv", "openb_pod_list_multigpu20.csv"])
def test_replay_of_the_shared_traces(name: str):
    trace = TRACES / name
    if not trace.exists():
        pytest.skip(f"{trace} is not on this machine")
    for nodes in ("1", "2"):
        out = subprocess.run(
            [sys.executable, str(SCRIPT), "--trace", str(trace), "--limit", "300", "--nodes", nodes, "--load", "0.9",
             "--json"],
            capture_output=True, text=True, check=True, timeout=120,
        ).stdout
        _check_doc(json.loads(out))


def test_the_replay_catches_a_policy_that_oversubscribes(tmp_path: Path):
    sim = _sim()
    trace = sim.load_trace(_write_trace(tmp_path / "pods.csv"), limit=100, node_gpus=8, gpus_total=8, load=0.9)

    class Greedy(sim.SkipAhead):
        """Hands out GPU 0 every time, busy or not."""

        def decide(self, now, cluster):
            out = []
            while self.n:
                size = min(s for s, q in self.buckets.items() if q)
                job = self.buckets[size].popleft()
                self.n -= 1
                chosen = cluster.topologies[0].uuids[:size]
                cluster.take(0, chosen, job)
                out.append((job, 0, chosen))
            return out

    with pytest.raises(AssertionError, match="oversubscription"):
        sim.simulate(trace.jobs, [sim.node_topology(8)], Greedy())
    result = sim.simulate(trace.jobs, [sim.node_topology(8)], sim.Dockyard(1, 1.0))
    assert result.checked == len(trace.jobs)


def test_load_scaling_and_row_filtering(tmp_path: Path):
    sim = _sim()
    path = _write_trace(tmp_path / "pods.csv", n=200)
    for load in (0.5, 0.9):
        trace = sim.load_trace(path, limit=None, node_gpus=8, gpus_total=16, load=load)
        work = sum(j.gpus * j.duration for j in trace.jobs)
        assert work / (16 * trace.span) == pytest.approx(load)
        assert trace.jobs[0].arrival == 0 and all(j.gpus > 0 for j in trace.jobs)
    assert trace.skipped == 4  # rows 3, 53, 103, 153 were never scheduled
    assert trace.cpu_only + len(trace.jobs) + trace.skipped == 200


def test_bad_traces_are_refused_with_file_line_and_column(tmp_path: Path):
    sim = _sim()
    bad = tmp_path / "bad.csv"
    bad.write_text(f"{COLUMNS}\npod-0,1,1,1,1000,,LS,Running,10,20,11\npod-1,1,1,one,1000,,LS,Running,10,20,11\n")
    with pytest.raises(SystemExit, match=r"bad\.csv:3: column 'num_gpu' must be a number, got 'one'"):
        sim.load_trace(bad, limit=None, node_gpus=8, gpus_total=8, load=0.9)
    bad.write_text(f"{COLUMNS}\npod-0,1,1,1,1000,,LS,Running,ten,20,11\n")
    with pytest.raises(SystemExit, match=r"bad\.csv:2: column 'creation_time'"):
        sim.load_trace(bad, limit=None, node_gpus=8, gpus_total=8, load=0.9)
    bad.write_text("pod,gpus\na,1\n")
    with pytest.raises(SystemExit, match="no 'name' column"):
        sim.load_trace(bad, limit=None, node_gpus=8, gpus_total=8, load=0.9)
    # Without time columns and nothing to take them from, the message names --times.
    untimed = tmp_path / "untimed.csv"
    untimed.write_text("name,cpu_milli,memory_mib,num_gpu,gpu_milli\npod-0001,1,1,1,1000\n")
    with pytest.raises(SystemExit, match="--times"):
        sim.load_trace(untimed, limit=None, node_gpus=8, gpus_total=8, load=0.9)


def test_untimed_pod_lists_borrow_times_and_too_wide_runs_are_refused(tmp_path: Path):
    sim = _sim()
    timed = _write_trace(tmp_path / "timed.csv", n=60)
    untimed = tmp_path / "untimed.csv"
    # Pods 0..39 exist in the timed list; two extra pods get drawn times; one asks for 16 GPUs.
    lines = ["name,cpu_milli,memory_mib,num_gpu,gpu_milli"]
    lines += [f"pod-{i:04d},1,1,1,1000" for i in range(40)]
    lines += ["extra-a,1,1,2,1000", "extra-b,1,1,1,1000", "huge,1,1,16,1000"]
    untimed.write_text("\n".join(lines) + "\n")
    trace = sim.load_trace(untimed, limit=None, node_gpus=8, gpus_total=8, load=0.5, times=timed)
    assert trace.synthesized == 3 and trace.too_wide == 1
    assert all(j.gpus <= 8 for j in trace.jobs) and "huge" not in {j.name for j in trace.jobs}
    again = sim.load_trace(untimed, limit=None, node_gpus=8, gpus_total=8, load=0.5, times=timed)
    assert [(j.name, j.arrival, j.duration) for j in again.jobs] == [(j.name, j.arrival, j.duration) for j in trace.jobs]
    assert 0 < trace.burst_share <= 1 and trace.burst_load > 0


def test_the_report_splits_the_wait_of_wide_runs(tmp_path: Path):
    trace = _write_trace(tmp_path / "pods.csv")
    doc = json.loads(subprocess.run(
        [sys.executable, str(SCRIPT), "--trace", str(trace), "--load", "0.9", "--workspaces", "1", "--json"],
        capture_output=True, text=True, check=True, timeout=120,
    ).stdout)
    by = {r["name"]: r for r in doc["results"]}
    to_head, as_head = by["dockyard:wait_ge4_to_head_mean"], by["dockyard:wait_ge4_as_head_mean"]
    assert to_head["n"] == as_head["n"] == by["dockyard:wait_ge4_mean"]["n"] > 0
    assert to_head["p50"] + as_head["p50"] == pytest.approx(by["dockyard:wait_ge4_mean"]["p50"], rel=1e-3, abs=1e-3)
    assert "90% of the runs arrive within" in doc["notes"]


def test_several_nodes_pack_small_runs_so_a_wide_run_finds_a_whole_node():
    # Two long 1-GPU runs, then an 8-GPU run, on two 8-GPU nodes: best fit puts the second
    # 1-GPU run beside the first, leaving a whole node for the 8-GPU run, which starts at once.
    # (Choosing by placement score alone would spread them, one per node, and the 8-GPU run
    # would wait 1000 s for a long run to end.)
    sim = _sim()
    jobs = [sim.Job("long-a", 0.0, 1, 1000.0), sim.Job("long-b", 1.0, 1, 1000.0), sim.Job("wide", 2.0, 8, 10.0)]
    result = sim.simulate(jobs, [sim.node_topology(8), sim.node_topology(8)], sim.Dockyard(2, 1.0))
    assert result.waits == [0.0, 0.0, 0.0]
    assert result.checked == 3


def test_one_run_replays_every_load_and_time_limit_variant_and_says_which_goals_are_met(tmp_path: Path):
    trace = _write_trace(tmp_path / "pods.csv")
    doc = json.loads(subprocess.run(
        [sys.executable, str(SCRIPT), "--trace", str(trace), "--limit", "300", "--load", "0.5", "0.9",
         "--time-limit-factor", "1", "2", "random", "none", "--json"],
        capture_output=True, text=True, check=True, timeout=300,
    ).stdout)
    assert set(doc) == {"benchmark", "results", "ratios", "notes"}
    by = {r["name"]: r for r in doc["results"]}
    for load in ("0.5", "0.9"):
        for limits in ("1x", "2x", "random 1-5x", "none"):
            tag = f"@load={load},limits={limits}"
            for policy in POLICIES:
                assert f"{policy}:wait_mean{tag}" in by and f"{policy}:utilisation{tag}" in by
            assert f"skip_ahead:wait_mean/dockyard:wait_mean{tag}" in doc["ratios"]
            assert f"{limits} @{load}: " in doc["notes"]
    # Safe under every estimate: never oversubscribed (checked on every start), nobody starved.
    assert "starts checked against oversubscription, none found; every run started" in doc["notes"]
    assert "utilisation >= both" in doc["notes"] and "mean wait within 10% of skip_ahead" in doc["notes"]
    # The fairness replay over synthetic workspaces, with and without the fair share.
    assert "dockyard:wait_mean_ws0_fair@load=0.9" in by and "dockyard:wait_mean_ws0_nofair@load=0.9" in by
    assert "fair share (smallest workspace waits <= the biggest, on average)" in doc["notes"]
    assert f"dockyard:plan_latency_queue_ge{1000}" in by


def test_the_table_shows_ratios_and_goals(tmp_path: Path):
    trace = _write_trace(tmp_path / "pods.csv")
    out = subprocess.run(
        [sys.executable, str(SCRIPT), "--trace", str(trace), "--limit", "300", "--load", "0.3", "0.9"],
        capture_output=True, text=True, check=True, timeout=120,
    ).stdout
    assert "util/skip" in out and "goals" in out and "fairness replay" in out
    rows = [line for line in out.splitlines() if line.startswith("1x ")]
    assert len(rows) == 2
    # The summary line counts the cells whose goals are all met, as the rows say.
    met = sum(row.endswith("all met") for row in rows)
    assert f"all goals met in {met} of 2 cells" in out


@pytest.mark.parametrize("bad", ["0.5", "often"])
def test_a_bad_time_limit_factor_is_a_usage_error(tmp_path: Path, bad: str):
    trace = _write_trace(tmp_path / "pods.csv", n=20)
    done = subprocess.run([sys.executable, str(SCRIPT), "--trace", str(trace), "--time-limit-factor", bad],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "time-limit-factor" in done.stderr


def test_workspaces_are_assigned_by_name_with_skewed_shares(tmp_path: Path):
    sim = _sim()
    trace = sim.load_trace(_write_trace(tmp_path / "pods.csv", n=400), limit=None, node_gpus=8, gpus_total=8, load=0.9)
    sim.assign_workspaces(trace.jobs, 4)
    first = [j.account for j in trace.jobs]
    sim.assign_workspaces(trace.jobs, 4)
    assert [j.account for j in trace.jobs] == first
    counts = {ws: first.count(ws) for ws in set(first)}
    assert set(counts) == {"ws0", "ws1", "ws2", "ws3"} and counts["ws0"] > counts["ws3"]


def test_skip_and_limit_cut_the_trace_into_slices_of_the_same_kind(tmp_path: Path):
    # --skip drops the earliest usable rows and --limit keeps the earliest of the rest: the two
    # halves of one trace partition its runs, each scaled to the offered load on its own.
    sim = _sim()
    path = _write_trace(tmp_path / "pods.csv", n=200)
    whole = sim.load_trace(path, limit=None, node_gpus=8, gpus_total=8, load=0.7)
    usable = whole.cpu_only + len(whole.jobs)
    first = sim.load_trace(path, limit=usable // 2, node_gpus=8, gpus_total=8, load=0.7)
    second = sim.load_trace(path, limit=None, node_gpus=8, gpus_total=8, load=0.7, skip=usable // 2)
    assert sorted(j.name for j in first.jobs + second.jobs) == sorted(j.name for j in whole.jobs)
    assert not {j.name for j in first.jobs} & {j.name for j in second.jobs}
    for part in (first, second):
        assert part.jobs[0].arrival == 0
        assert sum(j.gpus * j.duration for j in part.jobs) / (8 * part.span) == pytest.approx(0.7)
    done = subprocess.run([sys.executable, str(SCRIPT), "--trace", str(path), "--skip", "-1"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "--skip" in done.stderr


def test_a_variant_with_more_multi_gpu_pods_replays_with_borrowed_times(tmp_path: Path):
    timed = _write_trace(tmp_path / "timed.csv", n=300)
    out = tmp_path / "variant.csv"
    tool = ROOT / "benchmarks" / "trace_variant.py"
    done = subprocess.run([sys.executable, str(tool), "--trace", str(timed), "--multi-gpu-share", "0.6",
                           "--out", str(out)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    rows = list(csv.DictReader(out.open()))
    assert "creation_time" not in rows[0]  # like multigpu20: times come from the timed list
    single = sum(1 for r in rows if r["num_gpu"] == "1")
    multi = sum(int(r["num_gpu"]) for r in rows if int(r["num_gpu"]) > 1)
    assert 0.6 <= multi / (single + multi) < 0.65
    added = [r for r in rows if r["name"].startswith("openb-pod-x")]
    assert added and all(int(r["num_gpu"]) > 1 for r in added)
    sim = _sim()
    trace = sim.load_trace(out, limit=None, node_gpus=8, gpus_total=8, load=0.5, times=timed)
    assert trace.synthesized == len(added)
    # A share outside (0, 1) and an unreadable trace are usage errors that name the problem.
    for args, words in ((["--trace", str(timed), "--multi-gpu-share", "1"], "between 0 and 1"),
                        (["--trace", str(tmp_path / "none.csv"), "--multi-gpu-share", "0.5"], "cannot read")):
        bad = subprocess.run([sys.executable, str(tool), *args, "--out", str(tmp_path / "x.csv")],
                             capture_output=True, text=True, timeout=60)
        assert bad.returncode == 2 and words in bad.stderr
    # So are a list without num_gpu, a bad num_gpu cell (by line) and an output that cannot be written.
    (tmp_path / "nogpu.csv").write_text("name,cpu_milli\npod-0,1000\n")
    (tmp_path / "badcell.csv").write_text("name,num_gpu\npod-0,1\npod-1,two\n")
    for args, words in ((["--trace", str(tmp_path / "nogpu.csv")], "no 'name' or 'num_gpu' column"),
                        (["--trace", str(tmp_path / "badcell.csv")], "badcell.csv:3: column 'num_gpu'"),
                        (["--trace", str(timed), "--out", str(tmp_path / "no" / "x.csv")], "cannot write")):
        out_args = [] if "--out" in args else ["--out", str(tmp_path / "x.csv")]
        bad = subprocess.run([sys.executable, str(tool), *args, "--multi-gpu-share", "0.5", *out_args],
                             capture_output=True, text=True, timeout=60)
        assert bad.returncode == 2 and words in bad.stderr, bad.stderr


def test_the_replay_checks_the_reservations_without_time_limits(tmp_path: Path):
    # Without time limits a holder is promised no time, but nothing may start on its GPUs: the
    # replay checks that it started once the runs holding them when it reserved had ended, and,
    # with limits, that every holder started by the time it was last promised.
    trace = _write_trace(tmp_path / "pods.csv")
    out = subprocess.run(
        [sys.executable, str(SCRIPT), "--trace", str(trace), "--limit", "300", "--load", "0.9", "--workspaces", "1",
         "--time-limit-factor", "none", "mixed", "1", "--json"],
        capture_output=True, text=True, check=True, timeout=120,
    ).stdout
    notes = json.loads(out)["notes"]
    assert "limits=mixed" in json.dumps(json.loads(out)["results"])  # half the runs without a limit
    unknown = re.search(r"reservations of unknown start \(no time limits in the way\): (\d+) of (\d+) holders", notes)
    promised = re.search(r"reservation promises: (\d+) of (\d+) holders started by the time", notes)
    assert unknown and promised, notes
    for found in (unknown, promised):
        kept, total = int(found.group(1)), int(found.group(2))
        assert total > 0 and kept == total, notes


def test_time_limit_variants_are_parsed_and_bad_ones_refused():
    sim = _sim()
    assert sim.parse_limits("none") is None and sim.parse_limits("2") == 2.0
    assert sim.parse_limits("random") == "random" and sim.parse_limits("mixed") == "mixed"
    for bad in ("0.5", "often", "nan"):
        with pytest.raises(argparse.ArgumentTypeError):
            sim.parse_limits(bad)


def test_a_goal_missed_says_by_how_much():
    sim = _sim()
    fifo = {"utilisation": 0.5, "wait_mean": 300.0, "wait_ge4_mean": 900.0, "wait_max": 4000.0}
    skip = {"utilisation": 1.0, "wait_mean": 100.0, "wait_ge4_mean": 800.0, "wait_max": 5000.0}
    ours = {"utilisation": 0.99, "wait_mean": 125.0, "wait_ge4_mean": 700.0, "wait_max": 4000.0}
    short = sim.goal_shortfalls(0.5, ours, fifo, skip)
    assert short["utilisation >= both"] == pytest.approx(1 / 0.99 - 1)  # ours must rise ~1 %
    assert short["mean wait <= both"] == pytest.approx(0.2)  # ours must fall 20 %
    assert short[">=4-GPU mean wait <= both"] == 0.0 and short["max wait <= both"] == 0.0  # met, a tie included
    met = sim.goals_for(0.5, ours, fifo, skip)
    assert [goal for goal, ok in met.items() if not ok] == [goal for goal, v in short.items() if v > 0]
    # From the overload on, the bounds are relative: 1 % of utilisation, 10 % of mean wait.
    short = sim.goal_shortfalls(0.9, ours, fifo, skip)
    assert short["utilisation within 1% of the better"] == 0.0
    assert short["mean wait within 10% of skip_ahead"] == pytest.approx(1 - 110 / 125)


def test_the_grid_counts_the_goals_missed_over_every_slice_and_variant(tmp_path: Path):
    # The grid replays both lists whole and in halves plus four variants (or four hold-out
    # lists), at four loads under each limit variant, and sums what its cells missed.
    traces = tmp_path / "traces"
    traces.mkdir()
    _write_trace(traces / "openb_pod_list_default.csv", n=240, seed=3)
    _write_trace(traces / "openb_pod_list_multigpu20.csv", n=240, seed=4)
    grid = ROOT / "benchmarks" / "scheduler_grid.py"
    goals = {"utilisation >= both", "mean wait <= both", ">=4-GPU mean wait <= both", "max wait <= both",
             "utilisation within 1% of the better", "mean wait within 10% of skip_ahead"}
    for extra, slices in (([], 10), (["--holdout"], 4)):
        done = subprocess.run([sys.executable, str(grid), "--traces", str(traces), "--time-limit-factor", "1", "2",
                               "--jobs", "2", "--json", *extra], capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr
        doc = json.loads(done.stdout)
        assert doc["benchmark"] == "scheduler_grid" and doc["holdout"] == bool(extra)
        assert len(doc["traces"]) == slices
        cells = [c for t in doc["traces"] for c in t["cells"]]
        assert len(cells) == slices * 4 * 2
        assert {(c["load"], c["limits"]) for c in cells} == {(x, y) for x in (0.3, 0.5, 0.7, 0.9) for y in ("1x", "2x")}
        assert all(set(c["missed"]) <= goals for c in cells)
        total = doc["total"]
        assert total["cells"] == len(cells)
        assert total["goals_missed"] == sum(len(c["missed"]) for c in cells) == sum(total["by_goal"].values())
        assert total["cells_all_met"] == sum(not c["missed"] for c in cells)
        assert all(set(c["shortfall"]) == set(c["missed"]) and all(v > 0 for v in c["shortfall"].values())
                   for c in cells)
        assert total["missed_by_under_half_a_percent"] == sum(v < 0.005 for c in cells for v in c["shortfall"].values())
    names = [t["trace"] for t in json.loads(done.stdout)["traces"]]
    assert names == ["default-mg20", "default-mg40", "multigpu25-like", "multigpu50-seed51"]
    # Another list is replayed whole after them, named by its file.
    _write_trace(tmp_path / "openb_pod_list_other.csv", n=120, seed=5)
    done = subprocess.run([sys.executable, str(grid), "--traces", str(traces), "--time-limit-factor", "1",
                           "--holdout", "--extra", str(tmp_path / "openb_pod_list_other.csv"), "--json"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    assert [t["trace"] for t in doc["traces"]][4:] == ["other"] and len(doc["traces"][4]["cells"]) == 4
    absent = subprocess.run([sys.executable, str(grid), "--traces", str(traces), "--extra", str(tmp_path / "x.csv")],
                            capture_output=True, text=True, timeout=60)
    assert absent.returncode == 2 and "x.csv: no such file" in absent.stderr
    missing = subprocess.run([sys.executable, str(grid), "--traces", str(tmp_path / "none")],
                             capture_output=True, text=True, timeout=60)
    assert missing.returncode != 0 and "openb_pod_list_default.csv: not found" in missing.stderr
    bad = subprocess.run([sys.executable, str(grid), "--traces", str(traces), "--jobs", "0"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "--jobs" in bad.stderr
    setting = subprocess.run([sys.executable, str(grid), "--traces", str(traces)], capture_output=True, text=True,
                             timeout=60, env={**os.environ, "DOCKYARD_RESERVE_FACTOR": "abc"})
    assert setting.returncode == 2 and "DOCKYARD_RESERVE_FACTOR" in setting.stderr
