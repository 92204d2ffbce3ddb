#!/usr/bin/env python3
"""Write a variant of an openb pod list with more multi-GPU pods, to check a queue policy on
traces it was not tuned on.

    python benchmarks/trace_variant.py --trace ../shared/traces/openb_pod_list_multigpu20.csv \\
        --multi-gpu-share 0.5 --out /tmp/openb_pod_list_multigpu50.csv [--seed 50]

The openb data set's ``multigpuNN`` lists keep the default list's pods and add multi-GPU ones
until about NN % of the GPUs asked for are asked by pods of 2 or more GPUs; the shared folder
holds only ``multigpu20``. This adds copies of the trace's own multi-GPU rows (2, 4 and 8 GPUs in
the proportions the trace has them, chosen with ``--seed``) under new names (``openb-pod-xNNNNN``)
until that share is reached. Like ``multigpu20``'s, the list written has no time columns:
``scheduler_sim.py`` takes each pod's times from a timed list by name (``--times``, default
``openb_pod_list_default.csv`` beside the trace) and gives the copies a duration drawn from the
timed runs of the same GPU count and an arrival drawn from the timed arrivals, seeded by name.
"""

from __future__ import annotations

import argparse
import csv
import random
import sys
from pathlib import Path


def gpu_demand(rows: list[dict[str, str]]) -> tuple[int, int]:
    """(GPUs asked by 1-GPU pods, GPUs asked by pods of 2 or more)."""
    single = multi = 0
    for r in rows:
        n = int(float(r["num_gpu"]))
        if n == 1:
            single += 1
        elif n > 1:
            multi += n
    return single, multi


def variant(rows: list[dict[str, str]], share: float, seed: int) -> list[dict[str, str]]:
    """``rows`` plus copies of its multi-GPU rows until they ask for ``share`` of the GPUs."""
    pool = [r for r in rows if int(float(r["num_gpu"])) > 1]
    if not pool:
        raise SystemExit("the trace has no multi-GPU pods to copy")
    single, multi = gpu_demand(rows)
    want = share * single / (1 - share)  # multi / (single + multi) = share
    rng = random.Random(seed)
    out = list(rows)
    k = 0
    while multi < want:
        row = dict(rng.choice(pool))
        row["name"] = f"openb-pod-x{k:05d}"
        out.append(row)
        multi += int(float(row["num_gpu"]))
        k += 1
    return out


class VariantError(ValueError):
    """The source list cannot be read or is not an openb pod list (the message says where)."""


def write_variant(source: Path, share: float, seed: int, out: Path) -> tuple[int, int, float]:
    """Write the variant of ``source`` to ``out``: (pods read, pods written, the multi-GPU share
    of the GPUs asked in it).

    Raises:
        VariantError: ``source`` cannot be read, lacks a column, or has a bad ``num_gpu``.
        OSError: ``out`` cannot be written.
    """
    try:
        with source.open(newline="") as f:
            reader = csv.DictReader(f)
            rows = list(reader)
            columns = [c for c in (reader.fieldnames or []) if c not in ("creation_time", "deletion_time",
                                                                           "scheduled_time")]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise VariantError(f"{source}: cannot read the trace: {exc}") from None
    if "name" not in columns or "num_gpu" not in columns:
        raise VariantError(f"{source}: no 'name' or 'num_gpu' column; expected an openb pod list")
    for line, r in enumerate(rows, start=2):
        try:
            float(r["num_gpu"])
        except (TypeError, ValueError):
            raise VariantError(f"{source}:{line}: column 'num_gpu' must be a number, got {r['num_gpu']!r}") from None
    written = variant(rows, share, seed)
    with out.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(written)
    single, multi = gpu_demand(written)
    return len(rows), len(written), multi / (single + multi)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trace", required=True, help="an openb pod-list CSV (name,...,num_gpu,...)")
    parser.add_argument("--multi-gpu-share", type=float, required=True,
                        help="the share of the GPUs asked by pods of 2 or more GPUs, 0-1 (exclusive)")
    parser.add_argument("--out", required=True, help="where to write the variant")
    parser.add_argument("--seed", type=int, default=50)
    args = parser.parse_args(argv)
    if not 0 < args.multi_gpu_share < 1:
        parser.error("--multi-gpu-share must be between 0 and 1 (exclusive)")
    try:
        read, written, share = write_variant(Path(args.trace), args.multi_gpu_share, args.seed, Path(args.out))
    except VariantError as exc:
        parser.error(str(exc))
    except OSError as exc:
        parser.error(f"{args.out}: cannot write the variant: {exc}")
    print(f"{args.out}: {written} pods ({written - read} added); multi-GPU pods ask for {share:.1%} of the GPUs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
