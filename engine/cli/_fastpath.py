"""The ``dockyard`` entry point, with a fast lane for ``dockyard env build FILE`` on a cache hit.

A CLI process pays for every import. On a hit, ``env build`` needs no YAML parser, no click, no
key computation: the index remembers which key this exact spec file produced (and which base
resolutions that key depended on), so the answer is three SQLite reads and one HTTP request on
the engine socket. This module therefore imports only the standard library plus
``dockyard.cache._fastread`` and xxhash; anything unusual falls through to the full CLI, which
re-derives everything and refreshes the memo.
"""

from __future__ import annotations

import os
import sys
import time

__all__ = ["main", "try_env_build_hit"]

def _unix_engine() -> str | None:
    host = os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock"
    if not host.startswith("unix://") or os.environ.get("DOCKER_TLS_VERIFY"):
        return None
    return host.removeprefix("unix://")


def _parse(args: list[str]) -> tuple[str, bool] | None:
    """``env build FILE [--json] [--progress MODE]`` -> (FILE, as_json); anything else -> None."""
    if len(args) < 3 or args[0] != "env" or args[1] != "build":
        return None
    file, as_json, rest = None, False, args[2:]
    i = 0
    while i < len(rest):
        arg = rest[i]
        if arg == "--json":
            as_json = True
        elif arg == "--progress" and i + 1 < len(rest):
            i += 1  # progress only matters when something is built
        elif arg.startswith("--progress="):
            pass
        elif arg.startswith("-") or file is not None:
            return None  # --no-cache, --help, --debug, a second file: the full CLI decides
        else:
            file = arg
        i += 1
    return (file, as_json) if file else None


def try_env_build_hit(args: list[str]) -> int | None:
    """Answer ``dockyard env build FILE`` from the memo, or return None to take the full path."""
    started = time.perf_counter()
    parsed = _parse(args)
    socket_path = _unix_engine()
    if parsed is None or socket_path is None or os.environ.get("DOCKYARD_BUILDKIT", "docker") != "docker":
        return None
    file, as_json = parsed
    home = os.environ.get("DOCKYARD_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share", "dockyard")
    index = os.path.join(os.path.expanduser(home), "index.db")
    try:
        ttl = float(os.environ.get("DOCKYARD_RESOLVE_TTL", "300"))
        with open(file, "rb") as fh:
            spec = fh.read()
    except (OSError, ValueError):
        return None
    if not os.path.exists(index):
        return None
    from dockyard.cache._fastread import fast_hit

    from ..build._memo import spec_fingerprint
    from ..dockerd._rawhttp import unix_image_id

    hit = fast_hit(index, os.path.abspath(file), spec_fingerprint(spec, f"unix://{socket_path}"), ttl)
    if hit is None or unix_image_id(socket_path, hit.image) != hit.image_id:
        return None
    seconds = time.perf_counter() - started
    if as_json:
        import json

        out = {"key": hit.key, "image": hit.image, "image_id": hit.image_id, "cached": True,
               "source": "local-hit", "seconds": round(seconds, 6)}
        sys.stdout.write(json.dumps(out) + "\n")
    else:
        sys.stdout.write(f"{hit.image} (cache hit in {seconds * 1000:.1f} ms)\n")
    sys.stdout.flush()
    return 0


def main() -> None:
    """The ``dockyard`` command."""
    args = sys.argv[1:]
    code = try_env_build_hit(args)
    if code is not None:
        sys.exit(code)
    from ._app import main as full_cli

    full_cli(args)
