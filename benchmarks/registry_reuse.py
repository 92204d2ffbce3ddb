#!/usr/bin/env python3
"""A key built on one machine, reused on another through the shared cache (a registry).

    python benchmarks/registry_reuse.py [--json] [--n 3]

Real parts, side by side in one run: Debian's ``docker-registry`` (htpasswd) on 127.0.0.1 and a
second Docker Engine with its own image store standing in for the second machine (both from
``tests/helpers``). The environment is the digits example's (the python base + numpy and
scikit-learn, installed from wheels downloaded once into a local folder: engine B's containers
have no route beyond this host).
Engine A builds and publishes once; then on engine B, each sample from an empty dockyard home and
without the environment image:

* ``b_pull_via_registry``  ``Builder.ensure_image`` with the shared cache: HEAD, pull, tag
* ``b_full_build``         the same on B without the shared cache: a full build (pip from PyPI)

and a **near miss** on B: the user's own Dockerfile (a build context holding the wheels: ``COPY``,
``RUN pip install``, then ``ARG STAMP`` and one more step), published by A with one ``STAMP``
and wanted on B with another. Before each sample B's BuildKit cache is pruned, so only the
registry can help:

* ``b_near_miss_import``   with the shared cache: the published neighbour is pulled and its
                           inline cache imported (the install step is reused)
* ``b_near_miss_build``    without it: every step runs

and on A, what a **local hit** pays for the registry being configured (goal: nothing):

* ``hit_without_registry`` / ``hit_with_registry``  ``ensure_image`` on a hit, p50 over many calls

Printed as a table and (``--json``) one JSON object with the ratios. Benchmarks print; they never
assert timings. Needs root (the second engine), the registry package and a Docker Engine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

PYTHON_BASE = "dockyard/base:bookworm-python3"


def _wheels(folder: Path) -> Path:
    """The digits example's packages as wheels in a local folder (downloaded once on this host):
    engine B's containers have no route beyond the host, so its full build installs them offline."""
    import subprocess

    folder.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--only-binary=:all:", "-d", str(folder),
                    "numpy", "scikit-learn"], check=True, capture_output=True)
    return folder


def _env(wheels: Path) -> Any:
    from dockyard import Environment

    env = Environment("digits")
    env.docker.base_image = PYTHON_BASE
    env.python.pip_requirements = ["--no-index", f"--find-links {wheels}", "numpy", "scikit-learn"]
    env.docker.build_args = {"BENCH": uuid.uuid4().hex}  # a key no earlier run published
    return env


def _user_dockerfile_env(context: Path, salt: str, stamp: str) -> Any:
    from dockyard import Environment
    from dockyard.core.environment import DockerBuildContext

    (context / "Dockerfile").write_text(
        f"FROM {PYTHON_BASE}\nCOPY wheels /wheels\n"
        f"RUN echo {salt} && python3 -m venv /opt/venv && /opt/venv/bin/pip install -q --no-index "
        "--find-links /wheels numpy scikit-learn\nARG STAMP\nRUN echo $STAMP > /stamp\n")
    env = Environment.from_docker_build_context("near", DockerBuildContext.from_local_directory(
        None, str(context), "Dockerfile"))
    env.python.user_managed_dependencies = True
    env.docker.build_args = {"STAMP": stamp}
    return env


def _near_misses(n: int, work: Path, wheels: Path, shared: str, b_engine: Any) -> tuple[list[float], list[float]]:
    import shutil

    from dockyard.build import Builder, prune_build_cache

    context = work / "context"
    context.mkdir()
    shutil.copytree(wheels, context / "wheels")
    imported, built = [], []
    for i in range(n):
        salt = uuid.uuid4().hex  # the install step of this sample has never run anywhere
        a = Builder(work / f"near-a{i}", cache_registry=shared)
        try:
            a.ensure_image(_user_dockerfile_env(context, salt, "one"))
        finally:
            a.close()
        for which in (("import", "build") if i % 2 == 0 else ("build", "import")):
            prune_build_cache(keep_bytes=0, engine=b_engine.client)
            env = _user_dockerfile_env(context, salt, f"two-{which}")
            took, _ = _timed_on_b(work / f"near-b-{which}{i}", b_engine, shared if which == "import" else "", env)
            (imported if which == "import" else built).append(took)
    return imported, built


def _timed_on_b(home: Path, b_engine: Any, shared: str, env: Any) -> tuple[float, Any]:
    """``ensure_image`` on engine B from an empty home, timed; the image is removed after."""
    from dockyard.build import Builder

    b = Builder(home, engine=b_engine.client, cache_registry=shared)
    try:
        started = time.perf_counter()
        got = b.ensure_image(env)
        took = time.perf_counter() - started
    finally:
        b.close()
    b_engine.client.request("DELETE", f"/images/{got.image}?force=1")
    return took, got


def _median(values: list[float]) -> float:
    return round(statistics.median(values), 4)


def run(n: int) -> dict[str, Any]:
    from dockyard.build import Builder
    from helpers.engine2 import SecondEngine
    from helpers.registry import LocalRegistry

    work = Path(tempfile.mkdtemp(prefix="dockyard-reuse-bench-"))
    wheels = _wheels(work / "wheels")
    rows: dict[str, Any] = {}
    with LocalRegistry() as reg, SecondEngine() as b_engine:
        b_engine.load_image(PYTHON_BASE)  # the same base image ID on both machines
        os.environ.update({"DOCKYARD_CACHE_REGISTRY_USERNAME": reg.username,
                           "DOCKYARD_CACHE_REGISTRY_PASSWORD_ENV": "BENCH_CACHE_PASSWORD",
                           "BENCH_CACHE_PASSWORD": reg.password})
        shared = f"{reg.address}/bench/cache"
        pulls, builds = [], []
        for i in range(n):
            env = _env(wheels)
            a = Builder(work / f"a{i}", cache_registry=shared)
            try:
                built = a.ensure_image(env)
            finally:
                a.close()  # the push finishes here
            for which in (("pull", "build") if i % 2 == 0 else ("build", "pull")):
                took, got = _timed_on_b(work / f"b-{which}{i}", b_engine, shared if which == "pull" else "", env)
                assert got.key == built.key
                (pulls if which == "pull" else builds).append(took)
        rows["b_pull_via_registry"] = _median(pulls)
        rows["b_full_build"] = _median(builds)
        imported, full = _near_misses(n, work, wheels, shared, b_engine)
        rows["b_near_miss_import"] = _median(imported)
        rows["b_near_miss_build"] = _median(full)
        # The local-hit cost of a configured registry (A holds the last environment built).
        hits: dict[str, list[float]] = {"hit_without_registry": [], "hit_with_registry": []}
        for name, setting in (("hit_without_registry", ""), ("hit_with_registry", shared)):
            builder = Builder(work / f"a{n - 1}", cache_registry=setting)
            try:
                for _ in range(200):
                    started = time.perf_counter()
                    builder.ensure_image(env)
                    hits[name].append(time.perf_counter() - started)
            finally:
                builder.close()
        for name, values in hits.items():
            rows[name] = _median(values)
    return {
        "benchmark": "registry_reuse",
        "unit": "seconds (median)",
        "n": n,
        "rows": rows,
        "ratios": {
            "full_build_over_pull": round(rows["b_full_build"] / rows["b_pull_via_registry"], 2),
            "near_miss_build_over_import": round(rows["b_near_miss_build"] / rows["b_near_miss_import"], 2),
            "hit_with_over_without_registry": round(rows["hit_with_registry"] / rows["hit_without_registry"], 3),
        },
    }


def _table(doc: dict[str, Any]) -> str:
    lines = [f"shared cache reuse, median (s) over {doc['n']} environments", f"{'row':<24} {'seconds':>10}"]
    lines += [f"{name:<24} {value:>10.4f}" for name, value in doc["rows"].items()]
    lines.append("")
    lines += [f"{name}: {value}x" for name, value in doc["ratios"].items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--n", type=int, default=3, help="environments (each: one pull and one build on B)")
    args = parser.parse_args(argv)
    doc = run(args.n)
    print(json.dumps(doc) if args.json else _table(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
