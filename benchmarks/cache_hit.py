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

With a Docker Engine (skipped with a note otherwise), side by side on one small environment
(``FROM dockyard/base:<suite>-busybox`` + one ``RUN``), built once before timing:

* ``dockyard_hit_index``     ``Builder.ensure_image(env, verify=False)``: resolution + key + index
* ``dockyard_hit_verified``  ``Builder.ensure_image(env)``: the same plus one engine request
* ``buildkit_cached_solve``  a fully cached BuildKit Solve of the same Dockerfile over gRPC
* ``docker_build_cached``    ``DOCKER_BUILDKIT=1 docker build`` of the same Dockerfile (fully
  cached), where a BuildKit-capable docker CLI exists (Debian's ``/usr/bin/docker`` 20.10)
* ``dockyard_cli_process`` / ``docker_build_process``: whole processes, paired run by run
  (alternating which goes first): ``dockyard env build FILE`` on a hit vs the cached ``docker build``

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


BENCH_DOCKERFILE = "FROM {base}\nRUN echo dockyard-benchmark > /marker\n"


def _docker_cli() -> str | None:
    """A docker CLI whose ``docker build`` uses BuildKit (the 20.10 client with DOCKER_BUILDKIT=1)."""
    import shutil
    import subprocess

    for cand in ("/usr/bin/docker", shutil.which("docker")):
        if not cand or not os.path.exists(cand):
            continue
        out = subprocess.run([cand, "build", "--help"], capture_output=True, text=True,
                             env={**os.environ, "DOCKER_BUILDKIT": "1"})
        # The legacy-only 28.x client without buildx has no BuildKit; 20.10's shows --progress.
        if out.returncode == 0 and "--progress" in out.stdout:
            return cand
    return None


def _timed_process(cmd: list[str], env: dict[str, str]) -> float:
    import subprocess

    start = time.perf_counter_ns()
    out = subprocess.run(cmd, capture_output=True, env=env)
    elapsed = time.perf_counter_ns() - start
    if out.returncode != 0:
        raise RuntimeError(f"{cmd[:3]} failed: {out.stderr.decode(errors='replace')[-500:]}")
    return elapsed / 1000


def _row(name: str, samples_us: list[float], unit: str = "us") -> Result:
    samples_us.sort()
    n = len(samples_us)
    return Result(name, unit, round(statistics.median(samples_us), 2),
                  round(samples_us[min(n - 1, int(n * 0.95))], 2), n)


def engine_suite(n: int, workdir: Path) -> list[Result]:
    """dockyard's hits next to BuildKit's and docker's cached builds of the same Dockerfile."""
    try:
        from dockyard import Environment
        from dockyard.build import render_dockerfile
        from dockyard.build._base_images import bootstrap
        from dockyard.build._builder import Builder
        from dockyard.build._buildkit import BuildKitClient, SolveSpec
        from dockyard.dockerd import EngineClient
        from dockyard.errors import DockyardError

        engine = EngineClient.from_env()
        engine.ping()
    except Exception as exc:  # noqa: BLE001 - a benchmark says why it skipped, it does not crash
        NOTES.append(f"engine rows skipped: {exc}")
        return []
    try:
        base = bootstrap("busybox", engine=engine).ref
    except DockyardError as exc:
        NOTES.append(f"engine rows skipped: no busybox base image ({exc})")
        return []
    home = workdir / "home"
    spec = workdir / "env.yml"
    dockerfile = BENCH_DOCKERFILE.format(base=base)
    spec.write_text("name: bench\ndocker:\n  base_dockerfile: |\n" + "".join(f"    {line}\n" for line in dockerfile.splitlines()))
    env = Environment.load(spec)
    builder = Builder(home, engine=engine)
    built = builder.ensure_image(env)  # untimed: the one real build
    rows = [
        measure("dockyard_hit_index", lambda: builder.ensure_image(env, verify=False), max(100, n // 10), warmup=50),
        measure("dockyard_hit_verified", lambda: builder.ensure_image(env), max(100, n // 20), warmup=20),
    ]
    rendered = render_dockerfile(env, env.content_key(base_digest=builder.resolve_base(env)[0]))
    solve_spec = SolveSpec(rendered.dockerfile.encode(), rendered.context, "moby",
                           {"name": f"dockyard/bench:{built.key}"}, {f"label:{k}": v for k, v in rendered.labels.items()})
    slow_n = 20
    with BuildKitClient("docker", engine=engine) as client:
        client.solve(solve_spec)  # warm: everything cached from now on
        rows.append(_row("buildkit_cached_solve", [_time_us(lambda: client.solve(solve_spec)) for _ in range(slow_n)]))
    docker = _docker_cli()
    context = workdir / "ctx"
    context.mkdir()
    (context / "Dockerfile").write_text(rendered.dockerfile)
    proc_env = {**os.environ, "DOCKER_BUILDKIT": "1", "DOCKYARD_HOME": str(home)}
    if docker is None:
        NOTES.append("docker build rows skipped: no BuildKit-capable docker CLI (install Debian's docker.io)")
    else:
        build_cmd = [docker, "build", "-q", "-t", "dockyard/bench-docker:latest", str(context)]
        _timed_process(build_cmd, proc_env)  # warm
        rows.append(_row("docker_build_cached", [_timed_process(build_cmd, proc_env) for _ in range(slow_n)]))
        cli = Path(sys.executable).with_name("dockyard")
        cli_cmd = [str(cli) if cli.exists() else sys.executable, *([] if cli.exists() else ["-m", "dockyard"]),
                   "env", "build", str(spec)]
        _timed_process(cli_cmd, proc_env)  # warm: writes the spec memo
        ours: list[float] = []
        theirs: list[float] = []
        for i in range(slow_n):
            pair = [(ours, cli_cmd), (theirs, build_cmd)]
            for sink, cmd in pair if i % 2 == 0 else reversed(pair):
                sink.append(_timed_process(cmd, proc_env))
        rows += [_row("dockyard_cli_process", ours), _row("docker_build_process", theirs)]
        NOTES.append(f"docker CLI: {docker}; process rows paired run by run, {slow_n} pairs")
    for ref in (f"dockyard/bench:{built.key}", "dockyard/bench-docker:latest", built.image):
        engine.request("DELETE", f"/images/{ref.replace('/', '%2F')}")
    builder.close()
    NOTES.append(f"engine rows built from {base}; image removed afterwards")
    return rows


def _time_us(fn: Callable[[], object]) -> float:
    start = time.perf_counter_ns()
    fn()
    return (time.perf_counter_ns() - start) / 1000


SUITES: list[Callable[[int, Path], list[Result]]] = [engine_suite]
RATIOS: list[tuple[str, str]] = [
    ("hit", "key_only"),
    ("hit", "lookup_only"),
    ("spec_to_hit", "hit"),
    ("hit_write_through", "lookup_only"),
    ("dockyard_hit_verified", "dockyard_hit_index"),
    ("buildkit_cached_solve", "dockyard_hit_verified"),
    ("docker_build_cached", "dockyard_hit_verified"),
    ("docker_build_process", "dockyard_cli_process"),
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
    lines = [f"{'name':<24} {'p50 µs':>12} {'p95 µs':>12} {'n':>7}"]
    lines += [f"{r['name']:<24} {r['p50']:>12.2f} {r['p95']:>12.2f} {r['n']:>7}" for r in doc["results"]]
    lines += [""] + [f"{name:<46} {value:>9.2f}x" for name, value in doc["ratios"].items()]
    lines += ["", doc["notes"]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, run, print a table or one JSON object."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    parser.add_argument("--n", type=int, default=20000, help="timed calls per row (default 20000)")
    parser.add_argument("--entries", type=int, default=1000, help="entries in the index")
    parser.add_argument("--no-engine", action="store_true", help="only the pure cache rows")
    args = parser.parse_args(argv)
    if args.n < 1 or args.entries < 1:
        parser.error("--n and --entries must be >= 1")
    if args.no_engine:
        SUITES.clear()
    doc = run(args.n, args.entries)
    print(json.dumps(doc) if args.json else _table(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
