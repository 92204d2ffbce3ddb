#!/usr/bin/env python3
"""Launch overhead of a run: submit -> Completed of a trivial script, against a raw
``docker run --rm`` of the same image and script, side by side in one run.

    python benchmarks/launch_overhead.py [--json] [--n N]

Rows (seconds, p50/p95 over N runs each, alternating which goes first):

* ``dockyard_submit_to_completed``  ``Experiment.submit`` + ``wait_for_completion`` (agent already up,
  image already built: the steady state of a training loop of experiments)
* ``docker_run_rm``                 ``docker run --rm -v SRC:/workspace -w /workspace IMAGE python train.py``

Ratio ``dockyard_submit_to_completed/docker_run_rm`` reads "a dockyard run took this many times a raw
docker run". Benchmarks print; they never assert timings.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

SCRIPT = "print('hello from a trivial run')\n"


def _row(name: str, samples: list[float]) -> dict[str, Any]:
    samples = sorted(samples)
    return {"name": name, "unit": "s", "p50": round(statistics.median(samples), 4),
            "p95": round(samples[min(len(samples) - 1, int(len(samples) * 0.95))], 4), "n": len(samples)}


def run(n: int) -> dict[str, Any]:
    from dockyard import Environment, Experiment, ScriptRunConfig, Workspace
    from dockyard.build._base_images import bootstrap
    from dockyard.build._builder import Builder
    from dockyard.compute import stop_agent

    docker = shutil.which("docker") or "/usr/bin/docker"
    with tempfile.TemporaryDirectory(prefix="dockyard-launch-") as tmp:
        work = Path(tmp)
        src = work / "src"
        src.mkdir()
        (src / "train.py").write_text(SCRIPT)
        home = work / "home"
        ws = Workspace("bench", home=home)
        env = Environment("bench")
        env.docker.base_image = bootstrap("python").ref
        builder = Builder(home)
        image = builder.ensure_image(env).image
        builder.close()
        exp = Experiment(ws, "launch")
        config = ScriptRunConfig(str(src), "train.py", environment=env)
        exp.submit(config).wait_for_completion()  # warm: agent up, image verified
        raw_cmd = [docker, "run", "--rm", "-v", f"{src}:/workspace", "-w", "/workspace", image, "python3", "train.py"]
        subprocess.run(raw_cmd, check=True, capture_output=True)  # warm
        ours: list[float] = []
        theirs: list[float] = []

        def dockyard_once() -> None:
            start = time.perf_counter()
            exp.submit(config).wait_for_completion()
            ours.append(time.perf_counter() - start)

        def docker_once() -> None:
            start = time.perf_counter()
            subprocess.run(raw_cmd, check=True, capture_output=True)
            theirs.append(time.perf_counter() - start)

        for i in range(n):
            for fn in ((dockyard_once, docker_once) if i % 2 == 0 else (docker_once, dockyard_once)):
                fn()
        stop_agent(ws.home)
    results = [_row("dockyard_submit_to_completed", ours), _row("docker_run_rm", theirs)]
    return {
        "benchmark": "launch_overhead",
        "results": results,
        "ratios": {"dockyard_submit_to_completed/docker_run_rm": round(results[0]["p50"] / results[1]["p50"], 3)},
        "notes": f"paired runs, alternating order; docker CLI {docker}; image {image}; "
                 f"Python {platform.python_version()}, {os.cpu_count()} CPUs",
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    parser.add_argument("--n", type=int, default=15, help="runs of each kind (default 15)")
    args = parser.parse_args(argv)
    if args.n < 1:
        parser.error("--n must be >= 1")
    doc = run(args.n)
    if args.json:
        print(json.dumps(doc))
    else:
        print(f"{'name':<32} {'p50 s':>8} {'p95 s':>8} {'n':>4}")
        for r in doc["results"]:
            print(f"{r['name']:<32} {r['p50']:>8.3f} {r['p95']:>8.3f} {r['n']:>4}")
        for name, value in doc["ratios"].items():
            print(f"\n{name}: {value:.3f}x")
        print(doc["notes"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
