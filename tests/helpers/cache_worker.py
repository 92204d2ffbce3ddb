"""A separate process that asks a ``dockyard.cache`` index for one key (single-flight tests).

Run as a script so that every worker is a fresh interpreter with its own SQLite connections::

    python tests/helpers/cache_worker.py build --db X --key K --counter F [--go G] [--build-seconds S]
    python tests/helpers/cache_worker.py hang  --db X --key K --counter F --ready R --lease-timeout 1
    python tests/helpers/cache_worker.py fail  --db X --key K --counter F

``build`` prints one JSON object ``{"entry": {...}, "built": bool, "pid": int}`` on stdout.
Every build appends one line ``"<mode> <pid>"`` to the counter file *before* it does anything
else, which is how the tests count builds across processes (``O_APPEND`` lines do not interleave).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from dockyard.cache import BuildResult, ImageCache


def _count(counter: Path, mode: str) -> None:
    with open(counter, "a", encoding="utf-8") as f:
        f.write(f"{mode} {os.getpid()}\n")


def _wait_for(path: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise SystemExit(f"gave up waiting for {path}")
        time.sleep(0.005)


def main(argv: list[str] | None = None) -> int:
    """Run one worker; return its exit status."""
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["build", "hang", "fail"])
    parser.add_argument("--db", required=True, type=Path)
    parser.add_argument("--key", required=True)
    parser.add_argument("--counter", required=True, type=Path)
    parser.add_argument("--go", type=Path, help="start only once this file exists (a barrier)")
    parser.add_argument("--ready", type=Path, help="hang: touched once the lease is held")
    parser.add_argument("--build-seconds", type=float, default=0.0)
    parser.add_argument("--lease-timeout", type=float, default=30.0)
    parser.add_argument("--wait-timeout", type=float, default=None)
    args = parser.parse_args(argv)

    cache = ImageCache(args.db)
    if args.go is not None:
        _wait_for(args.go, 30.0)
    opts = {"lease_timeout": args.lease_timeout, "wait_timeout": args.wait_timeout, "poll": 0.02}

    if args.mode == "hang":
        with cache.building(args.key, **opts) as slot:
            if not slot.must_build:
                print(json.dumps({"error": "expected to hold the lease"}))
                return 3
            _count(args.counter, "hang")
            assert args.ready is not None
            args.ready.touch()
            time.sleep(3600)  # the test SIGKILLs us here, mid-build, lease held
        return 0

    def build(key: object) -> BuildResult:
        _count(args.counter, args.mode)
        time.sleep(args.build_seconds)
        if args.mode == "fail":
            raise RuntimeError("the build failed on purpose")
        return BuildResult(
            image=f"test/env:{key}", image_id=f"sha256:{os.getpid():064x}", size=1234,
            builder=f"worker-{os.getpid()}",
        )

    try:
        entry, built = cache.get_or_build(args.key, build, **opts)
    except RuntimeError as exc:
        print(json.dumps({"error": str(exc), "pid": os.getpid()}))
        return 1
    print(json.dumps({"entry": entry.to_json(), "built": built, "pid": os.getpid()}))
    cache.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
