#!/usr/bin/env python3
"""Replay a GPU cluster trace through dockyard's scheduler and two baselines, side by side.

    python benchmarks/scheduler_sim.py --trace FILE [--gpus 8] [--nodes 1] [--load 0.3 0.5 0.7 0.9]
                                       [--skip N] [--limit N] [--time-limit-factor 1 2 random none]
                                       [--workspaces 4] [--json]

The trace is an Alibaba openb pod list (``/work/shared/traces``): a run arrives at
``creation_time`` and lasts ``deletion_time - scheduled_time``; rows without ``scheduled_time`` or
with a non-positive duration are skipped; ``num_gpu`` counts whole GPUs (a sharing pod,
``gpu_milli < 1000``, takes one whole GPU). CPU-only rows (``num_gpu = 0``) need no GPU slot: they
start on arrival and are left out of every metric. A pod list without the time columns (the
``multigpu20`` variant) takes its times from ``openb_pod_list_default.csv`` beside it, by pod
name; its extra pods, absent there, get a duration drawn from the timed runs with the same GPU
count and an arrival drawn from the timed runs' arrivals (both seeded by the pod name).

``--skip N`` drops the N earliest usable rows and ``--limit N`` then keeps the N earliest left
(``--limit N`` alone: the first N rows; ``--skip N`` alone: the rest), so one trace gives
several of the same kind to check that a policy is not tuned to one. Arrival times are scaled by one factor so the
offered load, sum(gpus x duration) / (GPUs x arrival span), is ``--load`` of capacity; every load
given is replayed in the same run (default 0.3 0.5 0.7 0.9), and for each every time-limit variant
given: ``--time-limit-factor F`` (time limit = true duration x F >= 1), ``random`` (x a factor drawn
from 1-5 per run, seeded by its name: users over-estimate, unevenly), ``mixed`` (half the runs,
drawn by name, without a limit, the others ``random``) or ``none`` (no time limits).
The queue policy is ``dockyard.gpu.Policy`` read from the ``DOCKYARD_*`` settings, as the agent
reads it. The table gives, per variant and load, the ratios against FIFO and skip-ahead and which
of the issue's goals are met: below load 0.8, Pareto-dominate both (utilisation >=, mean wait <=,
mean wait of >= 4-GPU runs <=, max wait <=); from 0.8 on, max wait <= both, utilisation within 1 %
of the better one, mean wait within 10 % of skip-ahead's. The trace has no workspaces, so those
replays use one; with ``--workspaces N`` (default 4) each load is replayed again (first variant)
with the runs spread over N synthetic workspaces (55/25/15/5 %, seeded by pod name), with and
without the fair share, and the mean wait of each workspace is printed.

The clock is simulated and event driven (arrivals and completions; a decision after each
instant's events). Policies, all over the same arrivals and nodes (``--nodes`` machines of
``--gpus`` GPUs each: ``Topology.dgx(g)`` when g is a multiple of 4, else ``Topology.uniform(g, 1)``;
a run's GPUs are on one node):

* ``dockyard``    the real ``dockyard.gpu._sched.plan`` (the queue policy of its docstring,
                  placement scoring, backfill against the head's reservation); every run's time
                  limit is its true duration x ``--time-limit-factor``. With several nodes, each node in turn
                  goes to the run now at the front of the queue: a node where it fits (best fit:
                  the fewest GPUs left free, then the best ``placement_score``), else the node
                  where its reservation is earliest; that node plans the whole queue, and a run it
                  reserved GPUs for is not offered to the next node, so each node protects its
                  own head.
* ``fifo``        strict FIFO first-fit: the oldest run starts when a node has enough free GPUs,
                  on the lowest indices; nothing passes it.
* ``skip_ahead``  first-fit with skip-ahead (Ray / task-spooler style): every waiting run that
                  fits starts, in submit order, on the lowest indices of the first node that fits.

Metrics per policy (runs = GPU runs): makespan (first arrival to last completion), utilisation
(busy GPU-seconds / (GPUs x makespan)), wait (start - arrival: mean, p50, p95, max), mean wait of
runs of >= 4 GPUs, ``fragmentation`` (mean over decision points and nodes with >= 2 free GPUs of
1 - NVLinks among the free GPUs / NVLinks of the best-connected group of that size on an idle
node: 0 = what is free is as well grouped as possible), ``idle_waiting`` (GPU-seconds left idle
while some run waited, / GPUs x makespan), ``link_quality`` (mean NVLinks of a 2..n-1 GPU run's
placement / the best possible for its size). dockyard's decision latency is timed around every
``plan`` call (p50/p95, microseconds; also over the calls with at most 100 runs waiting, since
``plan`` reads the whole queue), around every 25th first read of ``Plan.reasons`` (made lazily),
and around ``place`` alone on the states of the replay, with an empty cache (cold) and again (warm).

Every start is checked as it happens: its GPUs must be free on its node and not given twice;
a violation stops the replay with an AssertionError, and so does a run that never starts. The
reservation promise is checked too: the notes count the holders that started by the time they
were last promised, the promises that moved later, and the reservations taken over by a run
ranked ahead (the policy's bound allows only those) or given up by a run still waiting (it
became young again: a run ranked ahead moved its drain, or, without time limits, the guessed
drain grew); a holder whose start is unknown (no time limits) must start by the time the runs
holding GPUs when it reserved have ended (a run ranked ahead starting meanwhile moves that
later, counted). Benchmarks print; they never assert timings.
"""

from __future__ import annotations

import argparse
import csv
import heapq
import json
import math
import os
import platform
import random
import statistics
import sys
import time
from collections import deque
from dataclasses import dataclass, field, replace
from itertools import combinations
from pathlib import Path
from typing import Any

from dockyard.errors import InputError
from dockyard.gpu._sched import Active, GpuRequest, RunQueue, Topology, Waiting, place, placement_score, plan
from dockyard.gpu._sched import Policy as QueuePolicy

POLICIES = ("dockyard", "fifo", "skip_ahead")
SHORT_QUEUE = 100  # plan latency is also shown for decisions with at most this many runs waiting


@dataclass
class Job:
    name: str
    arrival: float
    gpus: int
    duration: float
    start: float | None = None
    account: str = ""
    node: int | None = None
    placed: tuple[str, ...] = ()


@dataclass
class Trace:
    jobs: list[Job]
    cpu_only: int
    skipped: int
    synthesized: int
    scale: float
    offered_load: float
    span: float
    too_wide: int = 0  # runs asking for more GPUs than a node has: refused, as dockyard refuses them
    burst_share: float = 1.0  # the shortest stretch of the span that holds 90% of the arrivals...
    burst_load: float = 0.0  # ...and the offered load within it


# --------------------------------------------------------------------------------------------
# trace


def _read_rows(path: Path) -> tuple[list[dict[str, str]], list[str]]:
    try:
        with path.open(newline="") as f:
            reader = csv.DictReader(f)
            return list(reader), list(reader.fieldnames or [])
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise SystemExit(f"{path}: cannot read the trace: {exc}") from None


def _number(path: Path, line: int, row: dict[str, str], column: str) -> float:
    """One numeric cell, or exit naming the file, line and column."""
    text = (row.get(column) or "").strip()
    try:
        value = float(text)
    except ValueError:
        raise SystemExit(f"{path}:{line}: column {column!r} must be a number, got {text!r}") from None
    if not math.isfinite(value):
        raise SystemExit(f"{path}:{line}: column {column!r} must be finite, got {text!r}")
    return value


TIME_COLUMNS = ("creation_time", "deletion_time", "scheduled_time")


def _borrow_times(path: Path, rows: list[dict[str, str]], times: Path | None) -> tuple[list[dict[str, str]], int]:
    """Give a pod list without time columns the times of the pods of the same name in ``times``
    (default: ``openb_pod_list_default.csv`` beside it); pods absent there get a duration drawn
    from the timed runs of the same GPU count and an arrival drawn from the timed arrivals,
    seeded by the pod name."""
    timing_path = times or path.with_name("openb_pod_list_default.csv")
    if not timing_path.exists():
        raise SystemExit(f"{path} has no time columns and {timing_path} (to take them from) is missing; "
                         "name a timed pod list with --times FILE")
    timed, columns = _read_rows(timing_path)
    missing = [c for c in TIME_COLUMNS if c not in columns]
    if missing:
        raise SystemExit(f"{timing_path} has no column(s) {', '.join(missing)} to take times from")
    by_name = {r["name"]: r for r in timed}
    arrivals: list[float] = []
    durations: dict[int, list[float]] = {}
    for line, r in enumerate(timed, start=2):
        if not (r.get("scheduled_time") or "").strip():
            continue
        arrivals.append(_number(timing_path, line, r, "creation_time"))
        d = _number(timing_path, line, r, "deletion_time") - _number(timing_path, line, r, "scheduled_time")
        if d > 0:
            durations.setdefault(int(_number(timing_path, line, r, "num_gpu")), []).append(d)
    if not arrivals or not durations:
        raise SystemExit(f"{timing_path} has no scheduled pods to take times from")
    arrivals.sort()
    merged = []
    synthesized = 0
    for line, r in enumerate(rows, start=2):
        t = by_name.get(r.get("name", ""))
        if t is not None:
            merged.append({**r, **{k: t[k] for k in TIME_COLUMNS}})
            continue
        rng = random.Random(r.get("name", str(line)))
        gpus = int(_number(path, line, r, "num_gpu"))
        pool = durations.get(gpus) or [d for ds in durations.values() for d in ds]
        arrival = rng.choice(arrivals)
        merged.append({**r, "creation_time": repr(arrival), "scheduled_time": repr(arrival),
                       "deletion_time": repr(arrival + rng.choice(pool))})
        synthesized += 1
    return merged, synthesized


def _burst(jobs: list[Job], gpus_total: int, share: float = 0.9) -> tuple[float, float]:
    """The shortest stretch holding ``share`` of the arrivals, as a fraction of the whole span, and
    the offered load of the runs arriving in it: how unevenly the trace arrives."""
    n = len(jobs)
    k = max(1, math.ceil(n * share))
    span = jobs[-1].arrival - jobs[0].arrival
    if n < 2 or span <= 0 or k >= n:
        return 1.0, sum(j.gpus * j.duration for j in jobs) / (gpus_total * span) if span > 0 else math.inf
    width, lo = min((jobs[i + k - 1].arrival - jobs[i].arrival, i) for i in range(n - k + 1))
    if width <= 0:
        return 0.0, math.inf
    work = sum(j.gpus * j.duration for j in jobs[lo:lo + k])
    return width / span, work / (gpus_total * width)


def load_trace(path: Path, *, limit: int | None, node_gpus: int, gpus_total: int, load: float,
               times: Path | None = None, skip: int = 0) -> Trace:
    rows, columns = _read_rows(path)
    for column in ("name", "num_gpu"):
        if column not in columns:
            raise SystemExit(f"{path}: no {column!r} column; expected an openb pod list "
                             "(name,cpu_milli,memory_mib,num_gpu,gpu_milli,...)")
    synthesized = 0
    if any(c not in columns for c in TIME_COLUMNS):
        rows, synthesized = _borrow_times(path, rows, times)
    jobs: list[Job] = []
    skipped = 0
    for line, r in enumerate(rows, start=2):
        if not (r.get("scheduled_time") or "").strip():
            skipped += 1
            continue
        duration = _number(path, line, r, "deletion_time") - _number(path, line, r, "scheduled_time")
        if duration <= 0:
            skipped += 1
            continue
        gpus = _number(path, line, r, "num_gpu")
        if gpus < 0 or gpus != int(gpus):
            raise SystemExit(f"{path}:{line}: column 'num_gpu' must be a whole number >= 0, got {r['num_gpu']!r}")
        jobs.append(Job(r["name"], _number(path, line, r, "creation_time"), int(gpus), duration))
    jobs.sort(key=lambda j: (j.arrival, j.name))
    if skip:
        jobs = jobs[skip:]
    if limit is not None:
        jobs = jobs[:limit]
    cpu_only = sum(1 for j in jobs if j.gpus == 0)
    # A run wider than a node can never start on one: dockyard refuses it at submit, so the
    # replay leaves it out of every policy (and counts it in the notes).
    too_wide = sum(1 for j in jobs if j.gpus > node_gpus)
    jobs = [j for j in jobs if 0 < j.gpus <= node_gpus]
    if not jobs:
        raise SystemExit(f"{path}: no GPU runs of at most {node_gpus} GPUs in the trace slice")
    work = sum(j.gpus * j.duration for j in jobs)
    t0 = jobs[0].arrival
    span = jobs[-1].arrival - t0
    # One factor on arrival offsets: work / (GPUs x scaled span) = load.
    target_span = work / (gpus_total * load)
    scale = target_span / span if span > 0 else 1.0
    for j in jobs:
        j.arrival = (j.arrival - t0) * scale
    span = jobs[-1].arrival - jobs[0].arrival
    offered = work / (gpus_total * span) if span > 0 else math.inf
    share, burst = _burst(jobs, gpus_total)
    return Trace(jobs, cpu_only, skipped, synthesized, scale, offered, span, too_wide, share, burst)


# --------------------------------------------------------------------------------------------
# cluster and policies


def node_topology(gpus: int) -> Topology:
    return Topology.dgx(gpus) if gpus % 4 == 0 else Topology.uniform(gpus, 1)


def _settle(deadlines: dict[str, float], run_id: str, now: float) -> bool | None:
    """Whether a run starting ``now`` started by its deadline (taken out); None if it had none."""
    deadline = deadlines.pop(run_id, None)
    return None if deadline is None else now <= deadline + 1e-6


class Cluster:
    def __init__(self, topologies: list[Topology]) -> None:
        self.topologies = topologies
        self.free: list[frozenset[str]] = [frozenset(t.uuids) for t in topologies]
        self.checked = 0

    def take(self, node: int, gpus: tuple[str, ...], job: Job) -> None:
        free = self.free[node]
        # The invariant the whole scheduler promises: never oversubscribe.
        if len(set(gpus)) != len(gpus) or not free.issuperset(gpus) or len(gpus) != job.gpus:
            raise AssertionError(f"oversubscription: {job.name} given {gpus} on node {node}; free {sorted(free)}")
        self.free[node] = free.difference(gpus)
        self.checked += 1

    def give_back(self, node: int, gpus: tuple[str, ...]) -> None:
        if self.free[node].intersection(gpus):
            raise AssertionError(f"GPUs {gpus} released twice on node {node}")
        self.free[node] = self.free[node].union(gpus)


class Policy:
    name = ""

    def submit(self, job: Job) -> None:
        raise NotImplementedError

    def finish(self, job: Job) -> None:
        pass

    def decide(self, now: float, cluster: Cluster) -> list[tuple[Job, int, tuple[str, ...]]]:
        raise NotImplementedError

    def waiting(self) -> int:
        raise NotImplementedError


def lowest_indices(topology: Topology, free: frozenset[str], count: int) -> tuple[str, ...]:
    return tuple(u for u in topology.uuids if u in free)[:count]


class Fifo(Policy):
    name = "fifo"

    def __init__(self) -> None:
        self.queue: deque[Job] = deque()

    def submit(self, job: Job) -> None:
        self.queue.append(job)

    def waiting(self) -> int:
        return len(self.queue)

    def decide(self, now, cluster):
        out = []
        while self.queue:
            job = self.queue[0]
            for node, free in enumerate(cluster.free):
                if len(free) >= job.gpus:
                    gpus = lowest_indices(cluster.topologies[node], free, job.gpus)
                    cluster.take(node, gpus, job)
                    out.append((job, node, gpus))
                    self.queue.popleft()
                    break
            else:
                break
        return out


class SkipAhead(Policy):
    """Every waiting run that fits starts, in submit order. Runs are bucketed by GPU count so a
    decision looks at one run per size instead of the whole queue (the same choices as a scan)."""

    name = "skip_ahead"

    def __init__(self) -> None:
        self.buckets: dict[int, deque[Job]] = {}
        self.n = 0

    def submit(self, job: Job) -> None:
        self.buckets.setdefault(job.gpus, deque()).append(job)
        self.n += 1

    def waiting(self) -> int:
        return self.n

    def decide(self, now, cluster):
        out = []
        while self.n:
            room = max(len(f) for f in cluster.free)
            heads = [(q[0].arrival, q[0].name, size) for size, q in self.buckets.items() if q and size <= room]
            if not heads:
                break
            _, _, size = min(heads)
            job = self.buckets[size].popleft()
            self.n -= 1
            node = next(i for i, f in enumerate(cluster.free) if len(f) >= job.gpus)
            gpus = lowest_indices(cluster.topologies[node], cluster.free[node], job.gpus)
            cluster.take(node, gpus, job)
            out.append((job, node, gpus))
        return out


class Dockyard(Policy):
    name = "dockyard"

    def __init__(self, nodes: int, time_limit_factor: float | str | None = 1.0, policy: QueuePolicy | None = None,
                 seed: int = 1) -> None:
        self.factor = time_limit_factor
        self.policy = policy
        self.seed = seed
        # The agent's queue as a simulation keeps it: a RunQueue updated as runs come and go, so
        # a decision reads only the runs it may start (a list would be sorted on every call).
        self.queue = RunQueue(policy=policy)
        self.jobs: dict[str, Job] = {}
        self.update_us: list[float] = []  # RunQueue.add / remove, timed apart from plan
        self.running: list[dict[str, Active]] = [{} for _ in range(nodes)]
        self.plan_us: list[float] = []
        self.plan_queue: list[int] = []  # queue length at each plan call
        self.reasons_us: list[float] = []
        self.states: list[tuple[int, frozenset[str], GpuRequest]] = []
        self.head_since: dict[str, float] = {}  # when each run first held the head's reservation
        self.started: list[Job] = []
        # The reservation promise, checked: the start each holder was last promised, how often a
        # promise moved later (only a run ranked ahead of the holder may do that) or was broken.
        self.promise: dict[str, float] = {}
        self.holder: list[str | None] = [None] * nodes
        self.promises_kept = 0
        self.promises_moved = 0
        self.promises_broken = 0
        self.takeovers = 0
        # A holder whose start is unknown (runs without time limits in its way) is promised no
        # time, but nothing may start on its GPUs: it must start once the runs holding them when it
        # first reserved have ended (their true ends, which the simulation knows).
        self.true_end: list[dict[str, tuple[float, tuple[str, ...]]]] = [{} for _ in range(nodes)]
        self.unknown_deadline: dict[str, float] = {}
        self.unknown_kept = 0
        self.unknown_broken = 0
        self.dropped = 0  # reservations given up by a run still waiting, with no new holder
        self.unknown_moved = 0  # deadlines moved later by a run ranked ahead

    def submit(self, job: Job) -> None:
        if self.factor is None:
            limit = None
        elif self.factor in ("random", "mixed"):
            # Seeded by the run's name: the same over-estimate whatever the replay order.
            rng = random.Random(f"{self.seed}:{job.name}")
            limit = job.duration * rng.uniform(1.0, 5.0)
            if self.factor == "mixed" and rng.random() < 0.5:
                limit = None  # half the users set no limit at all
        else:
            limit = job.duration * self.factor
        request = GpuRequest(job.gpus, time_limit_s=limit)
        waiting = Waiting(job.name, request, job.arrival, job.account)
        t0 = time.perf_counter()
        self.queue.add(waiting)
        self.update_us.append((time.perf_counter() - t0) * 1e6)
        self.jobs[job.name] = job

    def finish(self, job: Job) -> None:
        del self.running[job.node][job.name]
        del self.true_end[job.node][job.name]

    def waiting(self) -> int:
        return len(self.queue)

    def _best_node(self, now: float, cluster: Cluster, nodes: list[int]) -> int:
        """Of ``nodes``, where the run now at the front of the queue should go: a node where it
        fits (the fewest GPUs left free, then the best placement score), else the node where its
        reservation is earliest (each asked with a queue of one)."""
        if len(nodes) == 1:
            return nodes[0]
        head = self.queue.first()
        ranked = []
        for i in nodes:
            topo = cluster.topologies[i]
            alone = plan(now, topo, cluster.free[i], [head], list(self.running[i].values()), self.policy)
            if alone.starts:
                # Best fit first: the node left with the fewest free GPUs, so whole nodes stay
                # free for wide runs (a placement score alone prefers the emptiest node, whose
                # leftovers keep the most NVLinks); the placement score breaks ties.
                score = placement_score(topo, cluster.free[i], alone.starts[0][1])
                left = len(cluster.free[i]) - head.request.count
                ranked.append((0, left, tuple(-x for x in score), i))
            else:
                at = alone.reservation.at if alone.reservation and alone.reservation.at is not None else math.inf
                ranked.append((1, at, (), i))
        return min(ranked)[-1]

    def decide(self, now, cluster):
        out = []
        while len(self.queue):
            started = 0
            # One reservation per run: a run blocked on the node where it would start first is
            # not offered to the other nodes, so they protect their own head, not the same one.
            reserved: list[Waiting] = []
            queue = self.queue
            nodes = list(range(len(cluster.free)))
            while nodes:
                # Each node in turn goes to the run now at the front of what is left: the node
                # where it fits or would start first; that node then plans the whole queue.
                node = self._best_node(now, cluster, nodes)
                nodes.remove(node)
                topo = cluster.topologies[node]
                running = list(self.running[node].values())
                t0 = time.perf_counter()
                decision = plan(now, topo, cluster.free[node], queue, running, self.policy)
                self.plan_us.append((time.perf_counter() - t0) * 1e6)
                self.plan_queue.append(len(queue))
                if len(self.states) < 4000 and len(queue):
                    self.states.append((node, cluster.free[node], queue.first().request))
                if len(self.plan_us) % 25 == 1:
                    # Sampled: the reasons are made on first access (for `dockyard gpus`), so
                    # they are timed apart from the decision, and checked: one per run not started.
                    t0 = time.perf_counter()
                    reasons = decision.reasons
                    self.reasons_us.append((time.perf_counter() - t0) * 1e6)
                    started_ids = {run_id for run_id, _ in decision.starts}
                    if set(reasons) != {w.run_id for w in queue} - started_ids:
                        raise AssertionError("plan did not explain every queued run it left waiting")
                for run_id, gpus in decision.starts:
                    kept = _settle(self.promise, run_id, now)
                    if kept is not None:
                        self.promises_kept += kept
                        self.promises_broken += not kept
                    kept = _settle(self.unknown_deadline, run_id, now)
                    if kept is not None:
                        self.unknown_kept += kept
                        self.unknown_broken += not kept
                    job = self.jobs.pop(run_id)
                    t0 = time.perf_counter()
                    waiting = queue.remove(run_id)
                    self.update_us.append((time.perf_counter() - t0) * 1e6)
                    cluster.take(node, gpus, job)
                    limit = waiting.request.time_limit_s
                    self.running[node][run_id] = Active(run_id, gpus, now + limit if limit is not None else None,
                                                        waiting.account, now)
                    self.true_end[node][run_id] = (now + job.duration, gpus)
                    out.append((job, node, gpus))
                    self.started.append(job)
                    started += 1
                previous = self.holder[node]
                holder = decision.reservation.run_id if decision.reservation is not None else None
                if previous not in (None, holder) and previous in queue:
                    # Still waiting, no longer the holder: a run ranked ahead became the head, or
                    # (unknown start) the guessed drain grew past what it had waited. Its unknown
                    # start's deadline is set again when it next reserves.
                    if holder is not None:
                        self.takeovers += 1
                    else:
                        self.dropped += 1
                    self.unknown_deadline.pop(previous, None)
                    self.promise.pop(previous, None)
                self.holder[node] = holder
                if holder is not None:
                    at = decision.reservation.at
                    self.head_since.setdefault(holder, now)
                    if at is not None:
                        if holder in self.promise and at > self.promise[holder] + 1e-6:
                            self.promises_moved += 1
                        self.promise[holder] = at
                        # Its start is known now (the runs without a limit in its way ended): the
                        # promise, made of time limits, replaces the deadline made of true ends.
                        self.unknown_deadline.pop(holder, None)
                    else:
                        # The replay's requests have no memory or name filter: any GPU will do, and
                        # nothing may be backfilled while the start is unknown, so a run started
                        # now is one ranked ahead of the holder (it may delay it, as with limits).
                        deadline = max((end for end, _ in self.true_end[node].values()), default=now)
                        before = self.unknown_deadline.get(holder)
                        if before is None or deadline > before + 1e-6:
                            self.unknown_moved += before is not None
                            self.unknown_deadline[holder] = deadline
                if decision.reservation is not None and len(cluster.free) > 1:
                    # Offered to the next node without it (put back after the round).
                    reserved.append(queue.remove(decision.reservation.run_id))
                if not len(queue):
                    break
            for waiting in reserved:
                queue.add(waiting)
            # Several nodes: a start can change the head, so offer the queue again.
            if not started or len(cluster.free) == 1:
                break
        return out


# --------------------------------------------------------------------------------------------
# simulation


def _links(topology: Topology, gpus) -> int:
    return sum(topology.links[(a, b)] for a, b in combinations(sorted(gpus), 2))


@dataclass
class Result:
    name: str
    waits: list[float] = field(default_factory=list)
    waits_ge4: list[float] = field(default_factory=list)
    makespan: float = 0.0
    utilisation: float = 0.0
    fragmentation: float = 0.0
    idle_waiting: float = 0.0
    link_quality: float = 1.0
    link_quality_n: int = 0
    decisions: int = 0
    checked: int = 0


def simulate(jobs: list[Job], topologies: list[Topology], policy: Policy) -> Result:
    jobs = [Job(j.name, j.arrival, j.gpus, j.duration, account=j.account) for j in jobs]
    cluster = Cluster(topologies)
    total = sum(len(t.uuids) for t in topologies)
    best_links = []
    for topo in topologies:
        everything = frozenset(topo.uuids)
        best_links.append({m: _links(topo, place(topo, everything, GpuRequest(m))) for m in range(len(topo.uuids) + 1)})
    link_memo: dict[tuple[int, frozenset[str]], int] = {}
    events: list[tuple[float, int, int, Job]] = []
    for seq, job in enumerate(jobs):
        events.append((job.arrival, 1, seq, job))  # at one instant, completions (0) before arrivals (1)
    heapq.heapify(events)
    seq = len(jobs)
    frag_sum = 0.0
    frag_n = 0
    idle_waiting = 0.0
    last = jobs[0].arrival
    quality: list[float] = []
    decisions = 0
    end = 0.0
    while events:
        now = events[0][0]
        if policy.waiting():
            idle_waiting += sum(len(f) for f in cluster.free) * (now - last)
        last = now
        while events and events[0][0] == now:
            _, kind, _, job = heapq.heappop(events)
            if kind == 0:
                cluster.give_back(job.node, job.placed)
                policy.finish(job)
            else:
                policy.submit(job)
        decisions += 1
        for job, node, gpus in policy.decide(now, cluster):
            job.start, job.node, job.placed = now, node, gpus
            done = now + job.duration
            end = max(end, done)
            seq += 1
            heapq.heappush(events, (done, 0, seq, job))
            n = len(topologies[node].uuids)
            if 2 <= job.gpus < n and best_links[node][job.gpus]:
                quality.append(_links(topologies[node], gpus) / best_links[node][job.gpus])
        for node, free in enumerate(cluster.free):
            if len(free) >= 2 and best_links[node][len(free)]:
                key = (node, free)
                have = link_memo.get(key)
                if have is None:
                    have = link_memo[key] = _links(topologies[node], free)
                frag_sum += 1 - have / best_links[node][len(free)]
                frag_n += 1
    if policy.waiting():
        raise AssertionError(f"{policy.name}: {policy.waiting()} runs never started")
    result = Result(policy.name)
    first = jobs[0].arrival
    result.makespan = end - first
    result.utilisation = sum(j.gpus * j.duration for j in jobs) / (total * result.makespan)
    result.waits = [j.start - j.arrival for j in jobs]
    result.waits_ge4 = [j.start - j.arrival for j in jobs if j.gpus >= 4]
    result.fragmentation = frag_sum / frag_n if frag_n else 0.0
    result.idle_waiting = idle_waiting / (total * result.makespan)
    result.link_quality = statistics.fmean(quality) if quality else 1.0
    result.link_quality_n = len(quality)
    result.decisions = decisions
    result.checked = cluster.checked
    return result


def _pct(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * q))]


def place_latency(dock: Dockyard, topologies: list[Topology]) -> tuple[list[float], list[float]]:
    cold, warm = [], []
    for node, free, request in dock.states:
        topo = topologies[node]
        topo._t.places.clear()  # the decision cache: clearing it times a first-seen state
        t0 = time.perf_counter()
        place(topo, free, request)
        cold.append((time.perf_counter() - t0) * 1e6)
        t0 = time.perf_counter()
        place(topo, free, request)
        warm.append((time.perf_counter() - t0) * 1e6)
    return cold, warm


# --------------------------------------------------------------------------------------------
# report

#: Where the goals change: below it, Pareto-dominate both baselines; from it on, the overload goals.
OVERLOAD = 0.8
#: Synthetic workspaces for the fairness replay: shares of the runs (seeded by pod name).
WORKSPACE_SHARES = (0.55, 0.25, 0.15, 0.05)
LONG_QUEUE = 1000  # "thousands waiting": decisions with at least this many runs queued


def parse_limits(text: str) -> float | str | None:
    """A ``--time-limit-factor`` value: a number >= 1, ``random`` (1-5x, seeded), ``mixed`` (half
    the runs without a limit, the rest random) or ``none``."""
    if text == "none":
        return None
    if text in ("random", "mixed"):
        return text
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number >= 1, 'random', 'mixed' or 'none'") from None
    if not math.isfinite(value) or value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: a time limit factor must be >= 1 (an over-estimate)")
    return value


def limits_label(factor: float | str | None) -> str:
    if factor is None:
        return "none"
    if factor == "random":
        return "random 1-5x"
    if factor == "mixed":
        return "mixed"
    return f"{factor:g}x"


def assign_workspaces(jobs: list[Job], n: int) -> None:
    """Give each run one of ``n`` synthetic workspaces, seeded by its name, with skewed shares
    (a big team and small ones): what the fair share is for."""
    shares = list(WORKSPACE_SHARES[:n]) if n <= len(WORKSPACE_SHARES) else [1.0] * n
    total = sum(shares)
    for job in jobs:
        r = random.Random(f"ws:{job.name}").random() * total
        k = 0
        while k < n - 1 and r >= shares[k]:
            r -= shares[k]
            k += 1
        job.account = f"ws{k}"


def _metrics(r: Result) -> dict[str, float]:
    return {"utilisation": r.utilisation, "wait_mean": statistics.fmean(r.waits),
            "wait_ge4_mean": statistics.fmean(r.waits_ge4) if r.waits_ge4 else 0.0, "wait_max": max(r.waits)}


def _goal_bounds(load: float, fifo: dict[str, float], skip: dict[str, float]) -> list[tuple[str, str, float, bool]]:
    """The issue's goals at this load as (goal, metric, bound, whether ours must be at least the
    bound): below OVERLOAD, Pareto-dominate both baselines; from it on, max wait <= both,
    utilisation within 1 % of the better one, mean wait within 10 % of skip-ahead's."""
    if load < OVERLOAD:
        return [("utilisation >= both", "utilisation", max(fifo["utilisation"], skip["utilisation"]), True),
                ("mean wait <= both", "wait_mean", min(fifo["wait_mean"], skip["wait_mean"]), False),
                (">=4-GPU mean wait <= both", "wait_ge4_mean", min(fifo["wait_ge4_mean"], skip["wait_ge4_mean"]), False),
                ("max wait <= both", "wait_max", min(fifo["wait_max"], skip["wait_max"]), False)]
    return [("max wait <= both", "wait_max", min(fifo["wait_max"], skip["wait_max"]), False),
            ("utilisation within 1% of the better", "utilisation",
             0.99 * max(fifo["utilisation"], skip["utilisation"]), True),
            ("mean wait within 10% of skip_ahead", "wait_mean", 1.10 * skip["wait_mean"], False)]


def goals_for(load: float, d: dict[str, float], fifo: dict[str, float], skip: dict[str, float]) -> dict[str, bool]:
    """Whether each of the issue's goals at this load is met (see _goal_bounds)."""
    eps = 1e-9
    return {goal: d[metric] >= bound - eps if at_least else d[metric] <= bound * (1 + eps)
            for goal, metric, bound, at_least in _goal_bounds(load, fifo, skip)}


def goal_shortfalls(load: float, d: dict[str, float], fifo: dict[str, float],
                    skip: dict[str, float]) -> dict[str, float]:
    """How far each goal is from met: the share by which our figure must improve (a utilisation
    rise of bound / ours - 1, a wait cut of 1 - bound / ours), 0 when met. A goal missed by
    0.01 % is a tie; one missed by 50 % is not, and a miss count alone does not tell them apart."""
    met = goals_for(load, d, fifo, skip)
    out = {}
    for goal, metric, bound, at_least in _goal_bounds(load, fifo, skip):
        ours = d[metric]
        if met[goal] or ours <= 0:
            out[goal] = 0.0
        else:
            out[goal] = bound / ours - 1 if at_least else 1 - bound / ours
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    total = args.gpus * args.nodes
    loads: list[float] = args.load
    variants: list[float | str | None] = args.time_limit_factor
    policy = QueuePolicy.from_env(os.environ)
    many = len(loads) > 1 or len(variants) > 1

    def tag(load: float, factor: float | str | None) -> str:
        if not many:
            return ""
        out = f"@load={load:g}"
        return out + (f",limits={limits_label(factor)}" if len(variants) > 1 else "")

    rows: list[dict[str, Any]] = []
    ratios: dict[str, float] = {}

    def row(name: str, unit: str, p50: float, p95: float, n: int) -> None:
        rows.append({"name": name, "unit": unit, "p50": round(p50, 4), "p95": round(p95, 4), "n": n})

    cells: list[dict[str, Any]] = []  # one per (variant, load): what the table shows
    fairness: list[dict[str, Any]] = []
    plan_us: list[float] = []
    plan_queue: list[int] = []
    short: list[float] = []
    seconds: dict[str, float] = {}
    checked = 0
    trace = None
    docks: list[Dockyard] = []
    offered: list[str] = []
    for load in loads:
        trace = load_trace(Path(args.trace), limit=args.limit, node_gpus=args.gpus, gpus_total=total, load=load,
                           times=Path(args.times) if args.times else None, skip=args.skip)
        offered.append(f"offered load {trace.offered_load:.3f} of capacity over {trace.span:.0f}s (arrivals scaled "
                       f"x{trace.scale:.4g}; 90% of the runs arrive within {trace.burst_share:.0%} of it, at load "
                       f"{trace.burst_load:.2f})")
        base: dict[str, Result] = {}
        for baseline in (Fifo(), SkipAhead()):
            t0 = time.perf_counter()
            base[baseline.name] = simulate(trace.jobs, [node_topology(args.gpus) for _ in range(args.nodes)], baseline)
            seconds[baseline.name] = seconds.get(baseline.name, 0.0) + time.perf_counter() - t0
            checked += base[baseline.name].checked
        fifo_m, skip_m = _metrics(base["fifo"]), _metrics(base["skip_ahead"])
        for factor in variants:
            dock = Dockyard(args.nodes, factor, policy)
            t0 = time.perf_counter()
            result = simulate(trace.jobs, [node_topology(args.gpus) for _ in range(args.nodes)], dock)
            seconds["dockyard"] = seconds.get("dockyard", 0.0) + time.perf_counter() - t0
            checked += result.checked
            docks.append(dock)
            plan_us += dock.plan_us
            plan_queue += dock.plan_queue
            short += [us for us, q in zip(dock.plan_us, dock.plan_queue) if q <= SHORT_QUEUE]
            results = {"dockyard": result, **base}
            suffix = tag(load, factor)
            for name in POLICIES:
                r = results[name]
                n = len(r.waits)
                row(f"{name}:makespan{suffix}", "s", r.makespan, r.makespan, n)
                row(f"{name}:utilisation{suffix}", "ratio", r.utilisation, r.utilisation, n)
                row(f"{name}:wait{suffix}", "s", _pct(r.waits, 0.5), _pct(r.waits, 0.95), n)
                row(f"{name}:wait_mean{suffix}", "s", statistics.fmean(r.waits), statistics.fmean(r.waits), n)
                ge4 = statistics.fmean(r.waits_ge4) if r.waits_ge4 else 0.0
                row(f"{name}:wait_ge4{suffix}", "s", _pct(r.waits_ge4, 0.5), _pct(r.waits_ge4, 0.95), len(r.waits_ge4))
                row(f"{name}:wait_ge4_mean{suffix}", "s", ge4, ge4, len(r.waits_ge4))
                row(f"{name}:wait_max{suffix}", "s", max(r.waits), max(r.waits), n)
                row(f"{name}:fragmentation{suffix}", "ratio", r.fragmentation, r.fragmentation, r.decisions)
                row(f"{name}:idle_waiting{suffix}", "ratio", r.idle_waiting, r.idle_waiting, n)
                row(f"{name}:link_quality{suffix}", "ratio", r.link_quality, r.link_quality, r.link_quality_n)
            # Where a wide run's wait goes: reaching the head of the queue, then waiting as the
            # head for its reserved GPUs to drain.
            to_head, as_head = [], []
            for job in dock.started:
                if job.gpus >= 4:
                    since = dock.head_since.get(job.name, job.start)
                    to_head.append(since - job.arrival)
                    as_head.append(job.start - since)
            for name, values in (("wait_ge4_to_head", to_head), ("wait_ge4_as_head", as_head)):
                m = statistics.fmean(values) if values else 0.0
                row(f"dockyard:{name}_mean{suffix}", "s", m, m, len(values))
            d = _metrics(result)
            for base_name, b in (("skip_ahead", skip_m), ("fifo", fifo_m)):
                for metric in ("wait_ge4_mean", "wait_mean", "wait_max"):
                    if d[metric] > 0:
                        ratios[f"{base_name}:{metric}/dockyard:{metric}{suffix}"] = round(b[metric] / d[metric], 4)
                ratios[f"dockyard:utilisation/{base_name}:utilisation{suffix}"] = round(d["utilisation"] / b["utilisation"], 4)
            cells.append({"load": load, "limits": factor, "d": d, "fifo": fifo_m, "skip": skip_m,
                          "goals": goals_for(load, d, fifo_m, skip_m), "promised": dock.promises_kept + dock.promises_broken,
                          "kept": dock.promises_kept, "moved": dock.promises_moved, "takeovers": dock.takeovers,
                          "unknown": dock.unknown_kept + dock.unknown_broken, "unknown_kept": dock.unknown_kept,
                          "dropped": dock.dropped, "unknown_moved": dock.unknown_moved,
                          "p95": _pct(dock.plan_us, 0.95)})
        if args.workspaces > 1:
            assign_workspaces(trace.jobs, args.workspaces)
            entry: dict[str, Any] = {"load": load}
            for label, pol in (("fair share", policy), ("no fair share", replace(policy, fair_share=False))):
                dock = Dockyard(args.nodes, variants[0], pol)
                r = simulate(trace.jobs, [node_topology(args.gpus) for _ in range(args.nodes)], dock)
                checked += r.checked
                by_ws: dict[str, list[float]] = {}
                for job in dock.started:
                    by_ws.setdefault(job.account, []).append(job.start - job.arrival)
                means = {ws: statistics.fmean(w) for ws, w in sorted(by_ws.items())}
                entry[label] = means
                key = "fair" if pol.fair_share else "nofair"
                for ws, m in means.items():
                    row(f"dockyard:wait_mean_{ws}_{key}@load={load:g}", "s", m, m, len(by_ws[ws]))
            fairness.append(entry)
            for job in trace.jobs:
                job.account = ""
    assert trace is not None
    long_q = [us for us, q in zip(plan_us, plan_queue) if q >= LONG_QUEUE]
    row("dockyard:plan_latency", "us", _pct(plan_us, 0.5), _pct(plan_us, 0.95), len(plan_us))
    row(f"dockyard:plan_latency_queue_le{SHORT_QUEUE}", "us", _pct(short, 0.5), _pct(short, 0.95), len(short))
    row(f"dockyard:plan_latency_queue_ge{LONG_QUEUE}", "us", _pct(long_q, 0.5), _pct(long_q, 0.95), len(long_q))
    row("dockyard:queue_length", "runs", _pct(plan_queue, 0.5), _pct(plan_queue, 0.95), len(plan_queue))
    update = [us for dk in docks for us in dk.update_us]
    reasons = [us for dk in docks for us in dk.reasons_us]
    row("dockyard:queue_update_latency", "us", _pct(update, 0.5), _pct(update, 0.95), len(update))
    row("dockyard:reasons_latency", "us", _pct(reasons, 0.5), _pct(reasons, 0.95), len(reasons))
    cold, warm = place_latency(docks[0], [node_topology(args.gpus) for _ in range(args.nodes)])
    row("dockyard:place_cold_latency", "us", _pct(cold, 0.5), _pct(cold, 0.95), len(cold))
    row("dockyard:place_latency", "us", _pct(warm, 0.5), _pct(warm, 0.95), len(warm))

    fair_goal = None
    if fairness:
        # The smallest workspace's runs wait no longer than the biggest one's, on average.
        small, big = f"ws{args.workspaces - 1}", "ws0"
        fair_goal = all(e["fair share"].get(small, 0.0) <= e["fair share"].get(big, 0.0) for e in fairness)
    promised = sum(c["promised"] for c in cells)
    kept = sum(c["kept"] for c in cells)
    moved = sum(c["moved"] for c in cells)
    takeovers = sum(c["takeovers"] for c in cells)
    unknown = sum(c["unknown"] for c in cells)
    unknown_kept = sum(c["unknown_kept"] for c in cells)
    dropped = sum(c["dropped"] for c in cells)
    unknown_moved = sum(c["unknown_moved"] for c in cells)
    met = [f"{limits_label(c['limits'])} @{c['load']:g}: " + ", ".join(f"{k} {'met' if v else 'NOT met'}"
                                                                     for k, v in c["goals"].items()) for c in cells]
    latency_goal = _pct(long_q or plan_us, 0.95) <= 100
    # One line to compare policies by (a change is judged over many cells, not one).
    cells_met = sum(all(c["goals"].values()) for c in cells)
    goals_missed = sum(not v for c in cells for v in c["goals"].values())
    summary = (f"all goals met in {cells_met} of {len(cells)} cells ({goals_missed} goal(s) missed in all)")
    notes = (
        f"trace {Path(args.trace).name}"
        + (f" (usable rows from {args.skip}" + (f", {args.limit} of them" if args.limit else "") + ")" if args.skip else "")
        + f": {len(trace.jobs)} GPU runs ({trace.cpu_only} CPU-only left out, "
        f"{trace.skipped} rows without a run skipped, {trace.too_wide} runs wider than a node refused, "
        f"{trace.synthesized} extra pods given drawn times); "
        f"{args.nodes} node(s) x {args.gpus} GPUs ({node_topology(args.gpus)!r}); "
        + "; ".join(offered) + f"; longest run {max(j.duration for j in trace.jobs):.0f}s; "
        f"dockyard time limits = duration x {', '.join(limits_label(v) for v in variants)}; "
        f"queue policy {policy}; "
        f"{checked} starts checked against oversubscription, none found; every run started; "
        f"reservation promises: {kept} of {promised} holders started by the time they were promised, "
        f"{moved} promises moved later by a run ranked ahead, {takeovers} reservations taken over by a run ranked ahead; "
        f"reservations of unknown start (no time limits in the way): {unknown_kept} of {unknown} holders started "
        f"by the time the runs holding GPUs when they reserved had ended, {unknown_moved} of those deadlines moved "
        f"later by a run ranked ahead; {dropped} reservations given up while waiting; "
        f"replay seconds " + ", ".join(f"{k} {v:.1f}" for k, v in seconds.items()) + "; "
        "goals: " + "; ".join(met) + f"; {summary}; "
        f"plan p95 <= 100 us with >= {LONG_QUEUE} runs waiting: {'met' if latency_goal else 'NOT met'}"
        + (f"; fair share (smallest workspace waits <= the biggest, on average): {'met' if fair_goal else 'NOT met'}"
           if fair_goal is not None else "")
        + f"; {platform.python_implementation()} {platform.python_version()} on {platform.machine()}"
    )
    return {"benchmark": "scheduler_sim", "results": rows, "ratios": ratios, "notes": notes,
            "_cells": cells, "_summary": summary, "_fairness": fairness, "_latency_goal": latency_goal, "_fair_goal": fair_goal}


def _ratio(a: float, b: float, digits: int = 3) -> str:
    return f"{a / b:.{digits}f}" if b > 0 else "-"


def print_table(doc: dict[str, Any]) -> None:
    print("ratios read 'A took this many times B': for waits baseline/dockyard (> 1: dockyard waits less), "
          "for utilisation dockyard/baseline (>= 1: dockyard is as busy)")
    header = (f"{'limits':<12}{'load':>5}  {'util/fifo':>9} {'util/skip':>9}  {'mean f/d':>9} {'mean s/d':>9}  "
              f"{'ge4 f/d':>8} {'ge4 s/d':>8}  {'max f/d':>8} {'max s/d':>8}  goals")
    print(header)
    for c in doc["_cells"]:
        d, f, s = c["d"], c["fifo"], c["skip"]
        unmet = [k for k, v in c["goals"].items() if not v]
        print(f"{limits_label(c['limits']):<12}{c['load']:>5g}  "
              f"{_ratio(d['utilisation'], f['utilisation'], 4):>9} {_ratio(d['utilisation'], s['utilisation'], 4):>9}  "
              f"{_ratio(f['wait_mean'], d['wait_mean']):>9} {_ratio(s['wait_mean'], d['wait_mean']):>9}  "
              f"{_ratio(f['wait_ge4_mean'], d['wait_ge4_mean']):>8} {_ratio(s['wait_ge4_mean'], d['wait_ge4_mean']):>8}  "
              f"{_ratio(f['wait_max'], d['wait_max']):>8} {_ratio(s['wait_max'], d['wait_max']):>8}  "
              + ("all met" if not unmet else "NOT met: " + ", ".join(unmet)))
    print(doc["_summary"])
    if doc["_fairness"]:
        print("fairness replay (runs spread over synthetic workspaces ws0 55%, ws1 25%, ws2 15%, ws3 5%): mean wait (s)")
        for e in doc["_fairness"]:
            for label in ("fair share", "no fair share"):
                print(f"  load {e['load']:g} {label:<14}" + "  ".join(f"{ws} {m:.4g}" for ws, m in e[label].items()))
    by = {r["name"]: r for r in doc["results"]}
    for name in ("plan_latency", f"plan_latency_queue_le{SHORT_QUEUE}", f"plan_latency_queue_ge{LONG_QUEUE}",
                 "queue_update_latency", "reasons_latency", "place_cold_latency", "place_latency", "queue_length"):
        r = by[f"dockyard:{name}"]
        print(f"dockyard {name}: p50 {r['p50']:.1f} {r['unit']}, p95 {r['p95']:.1f} {r['unit']} over {r['n']} calls")
    print(doc["notes"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trace", required=True, help="an openb pod-list CSV")
    parser.add_argument("--gpus", type=int, default=8, help="GPUs per node")
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--load", type=float, nargs="+", default=[0.3, 0.5, 0.7, 0.9],
                        help="offered load(s) as a fraction of capacity, each replayed in this run")
    parser.add_argument("--skip", type=int, default=0, help="drop the N earliest usable rows (before --limit)")
    parser.add_argument("--limit", type=int, default=None, help="keep the N earliest usable rows (after --skip)")
    parser.add_argument("--times", default=None,
                        help="a timed pod list to take times from when --trace has no time columns "
                             "(default: openb_pod_list_default.csv beside it)")
    parser.add_argument("--time-limit-factor", type=parse_limits, nargs="+", default=[1.0],
                        help="dockyard's time limit = true duration x this (>= 1: an over-estimate); "
                             "'random' draws 1-5x per run (seeded by its name), 'mixed' leaves half the runs "
                             "without a limit and draws the others so, 'none' gives no time limits; "
                             "several values are replayed one after another")
    parser.add_argument("--workspaces", type=int, default=4,
                        help="also replay with the runs spread over this many synthetic workspaces, with and "
                             "without fair share (1: no fairness replay)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    if args.gpus < 1 or args.nodes < 1 or any(x <= 0 for x in args.load) or args.workspaces < 1:
        parser.error("--gpus, --nodes, --load and --workspaces must be positive")
    if args.skip < 0 or (args.limit is not None and args.limit < 1):
        parser.error("--skip must be >= 0 and --limit >= 1")
    try:
        doc = run(args)
    except InputError as exc:
        parser.error(str(exc))
    public = {k: v for k, v in doc.items() if not k.startswith("_")}
    if args.json:
        json.dump(public, sys.stdout)
        sys.stdout.write("\n")
    else:
        print_table(doc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
