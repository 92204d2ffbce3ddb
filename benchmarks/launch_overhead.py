#!/usr/bin/env python3
"""Launch overhead of a run: a trivial script from submit to Completed, next to a raw
``docker run --rm`` of the same image and script, side by side in one run.

    python benchmarks/launch_overhead.py [--json] [--n N]

Rows (p50/p95 over N runs each, alternating which goes first; the agent is up and the image
built, the steady state of a loop of experiments):

* ``dockyard_run_process``          the whole ``dockyard run t.py --source src --env env.yml`` process,
                                    as a user starts it from a shell (wall seconds)
* ``docker_run_rm``                 the whole ``/usr/bin/docker run --rm -v src:/workspace -w /workspace
                                    IMAGE python3 t.py`` process (wall seconds)
* ``dockyard_submit_to_completed``  ``Experiment.submit`` + ``wait_for_completion`` in this process
* ``dockyard_run_process_cpu``      CPU seconds (user + system) of the ``dockyard run`` process, plus
                                    the agent's CPU seconds spent meanwhile (the work moved there)
* ``docker_run_rm_cpu``             CPU seconds of the docker CLI process (dockerd's own work, the
                                    same for both, is in neither)

Ratios read "A took this many times B". Benchmarks print; they never assert timings.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

SCRIPT = "print('hello from a trivial run')\n"
RAW_DOCKER = "/usr/bin/docker"  # Debian's 20.10 CLI: the one a user of this engine has


def _row(name: str, samples: list[float], unit: str = "s") -> dict[str, Any]:
    samples = sorted(samples)
    return {"name": name, "unit": unit, "p50": round(statistics.median(samples), 4),
            "p95": round(samples[min(len(samples) - 1, int(len(samples) * 0.95))], 4), "n": len(samples)}


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _process_cpu(pid: int) -> float:
    """CPU seconds a running process has used so far (utime + stime from /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run(n: int) -> dict[str, Any]:
    from dockyard import Environment, Experiment, ScriptRunConfig, Workspace
    from dockyard.build import Builder, bootstrap
    from dockyard.compute import agent_status, stop_agent

    docker = RAW_DOCKER if os.path.exists(RAW_DOCKER) else (shutil.which("docker") or RAW_DOCKER)
    with tempfile.TemporaryDirectory(prefix="dockyard-launch-") as tmp:
        work = Path(tmp)
        src = work / "src"
        src.mkdir()
        (src / "t.py").write_text(SCRIPT)
        home = work / "home"
        base = bootstrap("python").ref
        (work / "env.yml").write_text(f"name: bench\ndocker:\n  base_image: {base}\n")
        env = Environment.load(work / "env.yml")
        builder = Builder(home)
        image = builder.ensure_image(env).image
        builder.close()
        ws = Workspace("default", home=home)
        exp = Experiment(ws, "launch")
        config = ScriptRunConfig(str(src), "t.py", environment=env)
        exp.submit(config).wait_for_completion()  # warm: agent up, image verified
        cli_env = {**os.environ, "DOCKYARD_HOME": str(home)}
        cli_cmd = [str(Path(sys.executable).with_name("dockyard")), "run", "t.py", "--source", "src", "--env", "env.yml"]
        if not Path(cli_cmd[0]).exists():
            cli_cmd = [sys.executable, "-m", "dockyard", *cli_cmd[1:]]
        raw_cmd = [docker, "run", "--rm", "-v", f"{src}:/workspace", "-w", "/workspace", image, "python3", "t.py"]
        for cmd in (cli_cmd, raw_cmd):  # warm both paths once
            subprocess.run(cmd, check=True, capture_output=True, cwd=work, env=cli_env)
        agent_pid = agent_status(home).pid
        samples: dict[str, list[float]] = {k: [] for k in ("cli", "raw", "api", "cli_cpu", "raw_cpu")}

        def timed(cmd: list[str], wall: str, cpu: str) -> None:
            agent_before = _process_cpu(agent_pid) if cpu == "cli_cpu" and agent_pid else 0.0
            cpu_before = _children_cpu()
            start = time.perf_counter()
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, cwd=work, env=cli_env)
            samples[wall].append(time.perf_counter() - start)
            spent = _children_cpu() - cpu_before
            if cpu == "cli_cpu" and agent_pid:
                spent += _process_cpu(agent_pid) - agent_before
            samples[cpu].append(spent)

        def in_process() -> None:
            start = time.perf_counter()
            exp.submit(config).wait_for_completion()
            samples["api"].append(time.perf_counter() - start)

        steps = [lambda: timed(cli_cmd, "cli", "cli_cpu"), lambda: timed(raw_cmd, "raw", "raw_cpu"), in_process]
        for i in range(n):
            for step in steps if i % 2 == 0 else list(reversed(steps)):
                step()
        stop_agent(home)
    results = [
        _row("dockyard_run_process", samples["cli"]),
        _row("docker_run_rm", samples["raw"]),
        _row("dockyard_submit_to_completed", samples["api"]),
        _row("dockyard_run_process_cpu", samples["cli_cpu"]),
        _row("docker_run_rm_cpu", samples["raw_cpu"]),
    ]
    p50 = {r["name"]: r["p50"] for r in results}
    ratio = lambda a, b: round(p50[a] / p50[b], 3) if p50[b] else None
    return {
        "benchmark": "launch_overhead",
        "results": results,
        "ratios": {
            "dockyard_run_process/docker_run_rm": ratio("dockyard_run_process", "docker_run_rm"),
            "dockyard_submit_to_completed/docker_run_rm": ratio("dockyard_submit_to_completed", "docker_run_rm"),
            "dockyard_run_process_cpu/docker_run_rm_cpu": ratio("dockyard_run_process_cpu", "docker_run_rm_cpu"),
        },
        "notes": f"paired whole processes, alternating order; docker CLI {docker}; image {image}; the dockyard "
                 f"process hands the run to the agent's front door; its CPU row adds the agent's CPU meanwhile; "
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
        print(f"{'name':<32} {'p50':>8} {'p95':>8} {'n':>4}  unit")
        for r in doc["results"]:
            print(f"{r['name']:<32} {r['p50']:>8.3f} {r['p95']:>8.3f} {r['n']:>4}  {r['unit']}")
        print()
        for name, value in doc["ratios"].items():
            print(f"{name}: {value:.3f}x")
        print(doc["notes"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
