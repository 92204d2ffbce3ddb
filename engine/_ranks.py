"""Inside one node's container of a distributed run: start its processes, one per local rank.

    python -m dockyard._ranks PER_NODE NODE_RANK -- PYTHON SCRIPT ARG...

Each process gets ``LOCAL_RANK``, ``RANK`` (= ``NODE_RANK`` x ``PER_NODE`` + ``LOCAL_RANK``) and the
MPI names Azure ML's MPI jobs read (``OMPI_COMM_WORLD_RANK``, ``…_LOCAL_RANK``, ``…_SIZE``), on top
of what the container already has (``MASTER_ADDR``, ``MASTER_PORT``, ``WORLD_SIZE``, ``NODE_RANK``).
Every line a process writes is prefixed ``[rank R] `` on this process's stdout (the run's log), so
the ranks of all nodes can be told apart in one log. When one process fails, the others are
stopped (SIGTERM, then SIGKILL after a grace) and this exits with the failed one's code, so the
run fails and its other nodes are stopped by the agent. Standard library only: it runs on the
image's Python.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

__all__ = ["main"]

_GRACE_S = 10.0


def _pump(stream, prefix: bytes, out, lock: threading.Lock) -> None:
    for line in iter(stream.readline, b""):
        with lock:
            out.write(prefix + (line if line.endswith(b"\n") else line + b"\n"))
            out.flush()


def main(argv: list[str]) -> int:
    if len(argv) < 4 or "--" not in argv:
        print("usage: python -m dockyard._ranks PER_NODE NODE_RANK -- COMMAND...", file=sys.stderr)
        return 2
    cut = argv.index("--")
    per_node, node_rank = int(argv[0]), int(argv[1])
    command = argv[cut + 1:]
    world = os.environ.get("WORLD_SIZE", str(per_node))
    out = sys.stdout.buffer
    lock = threading.Lock()
    procs: list[subprocess.Popen[bytes]] = []
    pumps = []
    for local in range(per_node):
        rank = node_rank * per_node + local
        env = {**os.environ, "LOCAL_RANK": str(local), "RANK": str(rank), "LOCAL_WORLD_SIZE": str(per_node),
               "OMPI_COMM_WORLD_RANK": str(rank), "OMPI_COMM_WORLD_LOCAL_RANK": str(local),
               "OMPI_COMM_WORLD_SIZE": world, "OMPI_COMM_WORLD_LOCAL_SIZE": str(per_node)}
        proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        procs.append(proc)
        pump = threading.Thread(target=_pump, args=(proc.stdout, f"[rank {rank}] ".encode(), out, lock), daemon=True)
        pump.start()
        pumps.append(pump)

    def stop(_signum: int = 0, _frame: object = None) -> None:
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()

    signal.signal(signal.SIGTERM, stop)  # the container is stopped: stop every rank with it
    failed = 0
    while any(p.poll() is None for p in procs):
        for proc in procs:
            code = proc.poll()
            if code not in (None, 0) and not failed:
                failed = code
                stop()
                deadline = time.monotonic() + _GRACE_S
                while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
                    time.sleep(0.1)
                for other in procs:
                    if other.poll() is None:
                        other.kill()
        time.sleep(0.05)
    for pump in pumps:
        pump.join(timeout=5)
    codes = [p.returncode for p in procs]
    failed = failed or next((c for c in codes if c != 0), 0)
    return 128 - failed if failed < 0 else failed  # a signal's death as a shell reports it


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
