"""The ``dockyard`` entry point, with two fast lanes that import almost nothing.

A CLI process pays for every import (click, YAML, the run store: tens of milliseconds, more than
a cache hit or the work of a submit).

* ``dockyard env build FILE`` on a cache hit needs no YAML parser, no click, no key computation:
  the index remembers which key this exact spec file produced (and which base resolutions that
  key depended on), so the answer is three SQLite reads and one HTTP request on the engine socket.
* ``dockyard run …`` is handed to the machine's agent through its front door (a unix socket in
  the dockyard home), which submits and follows the run in its already-warm process with the same
  library calls, and streams back what the command prints. The agent answers "do it yourself"
  for anything it is not certain to do exactly as this process would (see ``_remote``).

Anything unusual, or no agent running, falls through to the full CLI, which re-derives everything.
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
    index = os.path.join(_home(), "index.db")
    try:
        ttl = float(os.environ.get("DOCKYARD_RESOLVE_TTL", "300"))
        with open(file, "rb") as fh:
            spec = fh.read()
    except (OSError, ValueError):
        return None
    if not os.path.exists(index):
        return None
    stem, _ = os.path.splitext(file)
    if os.path.exists(stem + ".lock.txt"):
        return None  # a lock next to the spec is part of the key: the full path reads it
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


def _home() -> str:
    home = os.environ.get("DOCKYARD_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share", "dockyard")
    return os.path.expanduser(home)


def try_run_via_agent(args: list[str]) -> int | None:
    """Have the agent do ``dockyard run …`` and print what it sends; None to take the full path.

    None is returned only while nothing was queued. Once the agent said the run is queued, this
    process never submits it again: if the agent goes away (or Ctrl-C), it follows the run itself.
    """
    head = args[: args.index("--")] if "--" in args else args
    if not args or args[0] != "run" or "-h" in head or "--help" in head:
        return None
    if os.environ.get(os.environ.get("DOCKYARD_CACHE_REGISTRY_PASSWORD_ENV") or "-"):
        return None  # this process holds the shared cache's password: only it can pull with it
    import _socket

    from .._codeid import code_id

    try:
        with open(os.path.join(_home(), "agent.code")) as fh:
            if fh.read().strip() != code_id():
                return None  # an agent of another dockyard version: the full path replaces it
    except OSError:
        return None
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    try:
        sock.connect(os.path.join(_home(), "agent.sock"))
    except OSError:
        sock.close()
        return None  # no agent (yet): the full path submits and starts one
    from .._wire import PROTOCOL, fields, frame, read_frame

    # Configuration only, and never a variable named like a password (it stays in this process).
    config = [f"{k}={v}" for k, v in os.environ.items()
              if k.startswith(("DOCKYARD_", "DOCKER_")) and "PASSW" not in k.upper()]
    queued: list[str] | None = None
    offset = 0
    out, err = sys.stdout.buffer, sys.stderr.buffer
    try:
        sock.sendall(frame(b"R", "\0".join([PROTOCOL, os.getcwd(), str(len(config)), *config, *args])))
        while True:
            got = read_frame(sock)
            if got is None:
                break
            kind, payload = got
            if kind in (b"L", b"O"):
                out.write(payload)
                out.flush()
                if kind == b"L":
                    offset += len(payload)
            elif kind == b"E":
                err.write(payload)
                err.flush()
            elif kind == b"I":
                queued = fields(payload)
            elif kind == b"X":
                return int(payload or b"1")
            elif kind == b"F" and queued is None:
                return None
            else:
                break  # not our protocol: treat as a torn connection
    except KeyboardInterrupt:
        sock.close()
        if queued is None:
            err.write(b"interrupted\n")
            err.flush()
            return 130
        return _resume(args, queued, offset, detached=True)
    except (OSError, ValueError):
        pass  # the agent went away mid-stream
    finally:
        sock.close()
    if queued is None:
        # The agent may have queued the run just before it went away: never submit a second one.
        err.write(b"error: the agent went away while queueing the run\n"
                  b"  hint: see `dockyard runs ls` (it may be queued), then run again if it is not\n")
        err.flush()
        return 3
    return _resume(args, queued, offset, detached=False)


def _resume(args: list[str], queued: list[str], offset: int, *, detached: bool) -> int:
    from ._app import resume_run
    from ._common import detached_line

    workspace, run_id = queued[0], queued[1]
    if detached:
        sys.stdout.write(detached_line(run_id))
        sys.stdout.flush()
    resume_run(args, workspace, run_id, offset, detached=detached)
    return 0


def main() -> None:
    """The ``dockyard`` command."""
    args = sys.argv[1:]
    code = try_env_build_hit(args)
    if code is None:
        code = try_run_via_agent(args)
    if code is not None:
        sys.stdout.flush()
        sys.exit(code)
    from ._app import main as full_cli

    full_cli(args)
