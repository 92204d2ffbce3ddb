#!/usr/bin/env python3
"""How long a cache hit takes through ``dockyard.cache``'s public API.

    python benchmarks/cache_hit.py [--json] [--n N] [--entries M]

Rows (µs per call, p50/p95 over N timed calls after a warm-up):

* ``key_only``        ``compute_key`` on a realistic KeyParts (conda + pip + build args + digest)
* ``lookup_only``     ``ImageCache.lookup`` of a present key in a file index holding M entries
* ``hit``             ``compute_key`` + ``lookup``: what a tool pays to learn "already built"
* ``spec_to_hit``     ``KeyParts(...)`` validation + ``compute_key`` + ``lookup``
* ``miss``            ``lookup`` of an absent key
* ``hit_write_through`` ``lookup`` with ``touch_interval=0``: every hit writes its bookkeeping,
  which is what the default (batched) bookkeeping avoids

To add a row (an engine-verified hit, a cached BuildKit Solve, a cached ``docker build``), write a
function ``(n, workdir) -> list[Result]`` that calls :func:`measure`, append it to ``SUITES``, and
add any ratio worth reading to ``RATIOS``. A suite that cannot run here (no engine) returns ``[]``
and says why in ``NOTES``. Benchmarks print; they never assert timings.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from dockyard.cache import ImageCache, KeyParts, compute_key


@dataclass(frozen=True)
class Result:
    """One row: percentiles of single-call durations."""

    name: str
    unit: str
    p50: float
    p95: float
    n: int


def measure(name: str, fn: Callable[[], object], n: int, *, warmup: int = 500) -> Result:
    """Time ``fn()`` ``n`` times, one call at a time, after ``warmup`` untimed calls.

    Each call is timed on its own (``perf_counter_ns``, ~0.1 µs of overhead included) so that the
    p95 shows the slow calls instead of averaging them away.
    """
    for _ in range(warmup):
        fn()
    clock = time.perf_counter_ns
    samples = [0] * n
    for i in range(n):
        start = clock()
        fn()
        samples[i] = clock() - start
    samples.sort()
    return Result(
        name=name,
        unit="us",
        p50=round(statistics.median(samples) / 1000, 2),
        p95=round(samples[min(n - 1, int(n * 0.95))] / 1000, 2),
        n=n,
    )


# A realistic environment: an Azure ML-style conda file with a pip sub-list, plus pip lines.
SPEC: dict[str, Any] = {
    "base_image": "dockyard/base:bookworm-python3",
    "base_digest": "sha256:" + "3f" * 32,
    "conda": {
        "name": "project_environment",
        "channels": ["conda-forge", "defaults"],
        "dependencies": [
            "python=3.11", "pip=24.0", "numpy=1.26", "pandas=2.2", "cudatoolkit=11.8",
            {"pip": ["azureml-defaults", "torch==2.3.0", "torchvision==0.18.0", "mlflow>=2.12"]},
        ],
    },
    "pip": ["--index-url https://pypi.internal.example/simple", "scikit-learn>=1.5",
            "tqdm", "pyyaml==6.0.1"],
    "build_args": {"PYTHON_VERSION": "3.11"},
}

NOTES: list[str] = []


def cache_suite(n: int, workdir: Path, *, entries: int) -> list[Result]:
    """The pure-cache rows: keys and a file index, no engine."""
    parts = KeyParts(**SPEC)
    key = compute_key(parts)
    index = workdir / "index.db"
    cache = ImageCache(index)
    for i in range(entries - 1):
        cache.record(f"{i:032x}", image=f"dockyard/env:{i:032x}", image_id="sha256:" + "0" * 64,
                     size=1 << 30)
    cache.record(key, image=f"dockyard/env:{key}", image_id="sha256:" + "1" * 64, size=1 << 30,
                 builder="benchmark")
    assert cache.lookup(key) is not None and cache.lookup("f" * 32) is None
    absent = "f" * 32
    writer = ImageCache(index, touch_interval=0)
    rows = [
        measure("key_only", lambda: compute_key(parts), n),
        measure("lookup_only", lambda: cache.lookup(key), n),
        measure("hit", lambda: cache.lookup(compute_key(parts)), n),
        measure("spec_to_hit", lambda: cache.lookup(compute_key(KeyParts(**SPEC))), n),
        measure("miss", lambda: cache.lookup(absent), n),
        measure("hit_write_through", lambda: writer.lookup(key), max(10, n // 10), warmup=50),
    ]
    cache.close()
    writer.close()
    NOTES.append(
        f"file index with {entries} entries in a temp dir (WAL); default touch_interval=60s keeps "
        "hit bookkeeping in memory, hit_write_through shows one write transaction per hit"
    )
    return rows


SUITES: list[Callable[[int, Path], list[Result]]] = []
RATIOS: list[tuple[str, str]] = [
    ("hit", "key_only"),
    ("hit", "lookup_only"),
    ("spec_to_hit", "hit"),
    ("hit_write_through", "lookup_only"),
]


def run(n: int, entries: int) -> dict[str, Any]:
    """Run every suite and return the benchmark JSON object."""
    results: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="dockyard-bench-") as tmp:
        workdir = Path(tmp)
        results.extend(cache_suite(n, workdir, entries=entries))
        for suite in SUITES:
            results.extend(suite(n, workdir))
    by_name = {r.name: r for r in results}
    ratios = {
        f"{a}/{b}": round(by_name[a].p50 / by_name[b].p50, 2)
        for a, b in RATIOS
        if a in by_name and b in by_name and by_name[b].p50 > 0
    }
    NOTES.append(
        f"ratios compare p50s; Python {platform.python_version()}, SQLite {sqlite3.sqlite_version}, "
        f"{os.cpu_count()} CPUs, {platform.machine()}"
    )
    return {
        "benchmark": "cache_hit",
        "results": [asdict(r) for r in results],
        "ratios": ratios,
        "notes": "; ".join(NOTES),
    }


def _table(doc: dict[str, Any]) -> str:
    lines = [f"{'name':<20} {'p50 µs':>9} {'p95 µs':>9} {'n':>7}"]
    lines += [f"{r['name']:<20} {r['p50']:>9.2f} {r['p95']:>9.2f} {r['n']:>7}" for r in doc["results"]]
    lines += [""] + [f"{name:<30} {value:>6.2f}x" for name, value in doc["ratios"].items()]
    lines += ["", doc["notes"]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, run, print a table or one JSON object."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    parser.add_argument("--n", type=int, default=20000, help="timed calls per row (default 20000)")
    parser.add_argument("--entries", type=int, default=1000, help="entries in the index")
    args = parser.parse_args(argv)
    if args.n < 1 or args.entries < 1:
        parser.error("--n and --entries must be >= 1")
    doc = run(args.n, args.entries)
    print(json.dumps(doc) if args.json else _table(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
