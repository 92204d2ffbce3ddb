#!/usr/bin/env python3
"""How a Dockerfile's build context reaches BuildKit: dockyard's imported image vs ``docker build``.

    python benchmarks/context_transport.py [--json] [--sizes 1 64 512] [--n 3]

For each context size (MiB of incompressible bytes in one file, plus a small file), side by side in
one run on the same Dockerfile (``FROM <base>`` + ``COPY`` of both files), each build a miss, in two
scenarios:

* ``near_miss``: the same folder with its small file edited (the large file unchanged): what a
  rebuild after editing a copied config costs;
* ``cold``: a new folder with new random bytes: nothing of it was ever sent.

Tools:

* ``dockyard``      ``Builder.ensure_image`` of ``base_dockerfile: ctx/Dockerfile`` — key (hashing
  the context), import of the context as an image, Solve, removal of the input image
* ``docker_build``  ``DOCKER_BUILDKIT=1 /usr/bin/docker build ctx`` (Debian's 20.10 CLI: the
  context goes through its BuildKit file-sync session), where that CLI exists
* ``key_only``      what a cache *hit* pays for a context of that size: hashing it into the key

Printed as a table and (``--json``) one JSON object; ratios are docker_build / dockyard (> 1:
dockyard is faster). Benchmarks print; they never assert timings. Needs a Docker Engine.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

BASE = "dockyard/base:bookworm-busybox"
DOCKER_20 = "/usr/bin/docker"


def _context(root: Path, mib: int) -> Path:
    ctx = root / f"ctx-{mib}"
    ctx.mkdir(parents=True, exist_ok=True)
    (ctx / "Dockerfile").write_text(f"FROM {BASE}\nCOPY blob.bin /blob.bin\nCOPY stamp.txt /stamp.txt\n")
    with open(ctx / "blob.bin", "wb") as fh:
        for _ in range(mib):
            fh.write(os.urandom(1 << 20))
    return ctx


def _stamp(ctx: Path) -> None:
    (ctx / "stamp.txt").write_text(uuid.uuid4().hex)


def _time(fn: Any) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def run(sizes: list[int], n: int) -> dict[str, Any]:
    from dockyard import Environment
    from dockyard.build import Builder
    from dockyard.dockerd import EngineClient

    engine = EngineClient.from_env()
    engine.ping()
    work = Path(tempfile.mkdtemp(prefix="dockyard-ctx-bench-"))
    home = work / "home"
    os.environ["DOCKYARD_HOME"] = str(home)
    builder = Builder(home)
    docker_cli = os.path.exists(DOCKER_20)
    made: list[str] = []

    def dockyard_build(spec: Path) -> None:
        made.append(builder.ensure_image(Environment.load(spec)).image)

    def docker_build(ctx: Path) -> None:
        tag = f"dockyard-bench/ctx:{uuid.uuid4().hex[:12]}"
        made.append(tag)
        subprocess.run([DOCKER_20, "build", "-q", "-t", tag, str(ctx)], check=True, capture_output=True,
                       env={**os.environ, "DOCKER_BUILDKIT": "1"})

    rows = []
    try:
        for mib in sizes:
            for scenario in ("near_miss", "cold"):
                times: dict[str, list[float]] = {"dockyard": [], "docker_build": [], "key_only": []}
                ctx = _context(work / f"{scenario}-{mib}", mib)
                for i in range(n):
                    order = ["dockyard", "docker_build"] if i % 2 == 0 else ["docker_build", "dockyard"]
                    for which in order:
                        if scenario == "cold":  # a folder and bytes never seen
                            shutil.rmtree(ctx.parent)
                            ctx = _context(work / f"{scenario}-{mib}-{uuid.uuid4().hex[:6]}", mib)
                        _stamp(ctx)
                        spec = ctx.parent / "env.yml"
                        spec.write_text(f"name: bench{mib}\ndocker:\n  base_dockerfile: {ctx.name}/Dockerfile\n")
                        if which == "dockyard":
                            times["dockyard"].append(_time(lambda spec=spec: dockyard_build(spec)))
                            times["key_only"].append(_time(lambda spec=spec: Environment.load(spec).content_key()))
                        elif docker_cli:
                            times["docker_build"].append(_time(lambda ctx=ctx: docker_build(ctx)))
                for tag in made:
                    engine.request("DELETE", f"/images/{tag}")
                made.clear()
                row: dict[str, Any] = {"size_mib": mib, "scenario": scenario}
                for name, values in times.items():
                    row[name] = round(statistics.median(values), 3) if values else None
                row["ratio_docker_over_dockyard"] = (
                    round(row["docker_build"] / row["dockyard"], 2) if row["docker_build"] and row["dockyard"]
                    else None
                )
                rows.append(row)
                shutil.rmtree(ctx.parent, ignore_errors=True)
    finally:
        builder.close()
        shutil.rmtree(work, ignore_errors=True)
    return {
        "benchmark": "context_transport",
        "unit": "seconds (median)",
        "n": n,
        "base": BASE,
        "docker_cli": DOCKER_20 if docker_cli else None,
        "rows": rows,
    }


def _table(doc: dict[str, Any]) -> str:
    lines = [f"context transport, median of {doc['n']} misses each (s); ratio = docker_build / dockyard",
             f"{'MiB':>6} {'scenario':>10} {'dockyard':>10} {'docker_build':>13} {'ratio':>7} {'key (hit)':>10}"]
    for r in doc["rows"]:
        fmt = lambda v: "-" if v is None else f"{v:.3f}"
        ratio = "-" if r["ratio_docker_over_dockyard"] is None else f"{r['ratio_docker_over_dockyard']:.2f}x"
        lines.append(f"{r['size_mib']:>6} {r['scenario']:>10} {fmt(r['dockyard']):>10} {fmt(r['docker_build']):>13} {ratio:>7} "
                     f"{fmt(r['key_only']):>10}")
    if doc["docker_cli"] is None:
        lines.append(f"(no {DOCKER_20}: the docker_build column is empty)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 64, 512], help="context sizes in MiB")
    parser.add_argument("--n", type=int, default=3, help="builds per size and tool")
    args = parser.parse_args(argv)
    doc = run(args.sizes, args.n)
    print(json.dumps(doc) if args.json else _table(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
