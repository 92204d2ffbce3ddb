#!/usr/bin/env python3
"""What a run pays for running on a Ray cluster instead of this machine, side by side in one run.

    python benchmarks/cluster_overhead.py [--json] [--n 5] [--burst 40]

Real parts: a Ray cluster of two nodes on 127.0.0.1 (``tests/helpers/ray_cluster.py``, token
auth on, 4 virtual GPUs per node, both on this machine's Docker Engine) attached as a compute
target, and the implicit ``local`` target. The environment (the python base) is built before
timing, on this machine and on both nodes.

* ``local_submit_to_completed`` / ``ray_submit_to_completed``  a trivial run (``print``), from
  ``Experiment.submit`` to ``Completed`` seen by ``wait_for_completion``; median of ``--n``
* ``ray_burst_drain``  ``--burst`` runs of 1 GPU and 1 s each submitted at once to the cluster (8
  GPUs): time from the first submit to the last ``Completed``, and the GPU utilisation over it
  (busy GPU-seconds / (8 x drain time))
* ``local_burst_drain``  the same burst on the ``local`` target with 8 virtual GPUs: what this
  machine allows (both nodes run on it too), so ``ray_burst_over_local_burst`` is the cluster's own cost

Ratio ``ray_over_local`` = ray / local per run (goal ≤ 1.5). Printed as a table and, with
``--json``, one JSON object. Benchmarks print; they never assert timings.
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
GPUS_PER_NODE = 4


def _config(src: Path, env: Any, target: str, script: str, gpus: int = 0) -> Any:
    from dockyard import ScriptRunConfig

    config = ScriptRunConfig(str(src), script, compute_target=target, environment=env)
    config.gpus = gpus
    return config


def _submit_to_completed(ws: Any, src: Path, env: Any, target: str, n: int) -> list[float]:
    from dockyard import Experiment

    took = []
    for _ in range(n):
        started = time.perf_counter()
        run = Experiment(ws, "bench").submit(_config(src, env, target, "hello.py"))
        details = run.wait_for_completion(raise_on_error=False)
        took.append(time.perf_counter() - started)
        if details["status"] != "Completed":
            raise SystemExit(f"{target}: a trivial run ended {details['status']}: {ws.store.get(run.id).reason}")
    return took


def _burst(ws: Any, src: Path, env: Any, count: int, target: str = "cluster") -> dict[str, float]:
    from dockyard import Experiment

    started = time.perf_counter()
    first_submit = time.time()
    runs = [Experiment(ws, "burst").submit(_config(src, env, target, "sleep1.py", gpus=1)) for _ in range(count)]
    for run in runs:
        if run.wait_for_completion(raise_on_error=False)["status"] != "Completed":
            raise SystemExit("a burst run did not complete")
    drain = time.perf_counter() - started
    busy = 0.0
    for run in runs:
        record = ws.store.get(run.id)
        busy += (record.ended - record.started) * max(1, len(record.gpus))
    last_end = max(ws.store.get(r.id).ended for r in runs)
    return {"drain_s": round(drain, 3), "gpu_utilisation": round(busy / (2 * GPUS_PER_NODE * (last_end - first_submit)), 3)}


def run(n: int, burst: int) -> dict[str, Any]:
    from dockyard import Environment, Workspace
    from dockyard.compute import stop_agent
    from dockyard.core.compute import ComputeTarget, RayCompute
    from helpers.ray_cluster import RayCluster

    work = Path(tempfile.mkdtemp(prefix="dockyard-cluster-bench-"))
    src = work / "src"
    src.mkdir()
    (src / "hello.py").write_text("print('hello')\n")
    (src / "sleep1.py").write_text("import time\ntime.sleep(1.0)\n")
    home = work / "home"
    os.environ["DOCKYARD_HOME"] = str(home)
    os.environ["DOCKYARD_GPUS"] = str(2 * GPUS_PER_NODE)  # the local burst's GPUs: as many as the cluster's
    os.environ["DOCKYARD_LOCAL_MAX_RUNS"] = str(2 * GPUS_PER_NODE)
    nodes = {name: {"gpus": GPUS_PER_NODE, "cpus": GPUS_PER_NODE, "env": {"DOCKYARD_HOME": str(work / f"node-{name}")}}
             for name in ("a", "b")}
    env = Environment("bench")
    env.docker.base_image = PYTHON_BASE
    env.docker.build_args = {"BENCH": uuid.uuid4().hex}
    with RayCluster(nodes) as cluster:
        ws = Workspace("bench", home=home)
        ComputeTarget.attach(ws, "cluster", RayCompute.attach_configuration(
            cluster.address, max_nodes=2 * GPUS_PER_NODE, auth_token_file=str(cluster.token_file)))
        try:
            # Warm: the image on this machine and on both nodes, the agent and its Ray driver up.
            _submit_to_completed(ws, src, env, "local", 1)
            from dockyard import Experiment

            warm = [Experiment(ws, "warm").submit(_config(src, env, "cluster", "sleep1.py", gpus=GPUS_PER_NODE))
                    for _ in range(2)]
            for r in warm:
                r.wait_for_completion(raise_on_error=False)
            local = _submit_to_completed(ws, src, env, "local", n)
            ray = _submit_to_completed(ws, src, env, "cluster", n)
            drained = _burst(ws, src, env, burst)
            # The same burst on this machine's own 8 (virtual) GPUs: what the machine itself allows.
            drained_local = _burst(ws, src, env, burst, target="local")
        finally:
            stop_agent(home)
    rows = {"local_submit_to_completed": round(statistics.median(local), 4),
            "ray_submit_to_completed": round(statistics.median(ray), 4),
            "ray_burst_drain": drained["drain_s"], "local_burst_drain": drained_local["drain_s"]}
    ideal = burst / (2 * GPUS_PER_NODE) * 1.0
    return {
        "benchmark": "cluster_overhead",
        "unit": "seconds (median)",
        "n": n,
        "burst": burst,
        "rows": rows,
        "burst_gpu_utilisation": drained["gpu_utilisation"],
        "local_burst_gpu_utilisation": drained_local["gpu_utilisation"],
        "burst_ideal_drain_s": ideal,
        "ratios": {"ray_over_local": round(rows["ray_submit_to_completed"] / rows["local_submit_to_completed"], 2),
                   "ray_burst_over_local_burst": round(rows["ray_burst_drain"] / rows["local_burst_drain"], 2)},
        "goal": {"ray_over_local_at_most": 1.5,
                 "met": rows["ray_submit_to_completed"] / rows["local_submit_to_completed"] <= 1.5},
    }


def _table(doc: dict[str, Any]) -> str:
    lines = [f"cluster overhead, median (s) over {doc['n']} runs; burst of {doc['burst']}",
             f"{'row':<28} {'seconds':>10}"]
    lines += [f"{name:<28} {value:>10.4f}" for name, value in doc["rows"].items()]
    lines.append(f"{'burst GPU utilisation':<28} {doc['burst_gpu_utilisation']:>10.3f}"
                 f"  (ideal drain {doc['burst_ideal_drain_s']:.1f} s)")
    lines.append(f"{'local burst GPU utilisation':<28} {doc['local_burst_gpu_utilisation']:>10.3f}")
    lines.append("")
    lines += [f"{name}: {value}x" for name, value in doc["ratios"].items()]
    lines.append(f"goal ray_over_local <= {doc['goal']['ray_over_local_at_most']}: "
                 f"{'met' if doc['goal']['met'] else 'NOT met'}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--n", type=int, default=5, help="trivial runs per target")
    parser.add_argument("--burst", type=int, default=40, help="runs submitted at once to the cluster")
    args = parser.parse_args(argv)
    doc = run(args.n, args.burst)
    print(json.dumps(doc) if args.json else _table(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
