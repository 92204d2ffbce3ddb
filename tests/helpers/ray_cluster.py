"""A real Ray cluster of several nodes on 127.0.0.1, each raylet with its own environment (its own
``DOCKER_HOST``, ``DOCKYARD_HOME`` and virtual GPUs), for tests and benchmarks.

The nodes are started by ``ray.cluster_utils.Cluster`` in a child process that this helper owns
(so the test process never becomes a Ray driver, and stopping the child stops every Ray process it
started). Every Ray process binds to 127.0.0.1: ``ray start`` would resolve 127.0.0.1 to the host's
own address, ``Cluster`` takes it as given. Token authentication is on (``RAY_AUTH_MODE=token``)
with a token file the helper writes::

    with RayCluster({"a": {"env": {...}, "gpus": 2}, "b": {...}}) as cluster:
        cluster.address, cluster.token_file
        cluster.kill_node("b")      # its raylet and workers die: a node lost
        cluster.add_node("b")       # it comes back (a new raylet, the same environment)
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

__all__ = ["RayCluster"]

_CHILD = r'''
import json, os, sys
from ray.cluster_utils import Cluster

spec = json.loads(sys.argv[1])
cluster = Cluster(initialize_head=True, head_node_args=dict(
    node_ip_address="127.0.0.1", num_cpus=0, num_gpus=0, include_dashboard=False,
    env_vars=spec.get("head_env") or {}))
nodes = {}

def add(name):
    node = spec["nodes"][name]
    nodes[name] = cluster.add_node(node_ip_address="127.0.0.1", num_cpus=node.get("cpus", 2),
                                   num_gpus=node.get("gpus", 0), env_vars=node.get("env") or {},
                                   resources={f"node:{name}": 1})

for name in spec["nodes"]:
    add(name)
print(json.dumps({"address": cluster.address}), flush=True)
for line in sys.stdin:
    cmd, _, arg = line.strip().partition(" ")
    if cmd == "kill":
        nodes.pop(arg).kill_all_processes(check_alive=False, allow_graceful=False)
    elif cmd == "add":
        add(arg)
    elif cmd == "quit":
        break
    print(json.dumps({"done": cmd}), flush=True)
cluster.shutdown()
'''


class RayCluster:
    """A head (no resources) and named nodes; see the module docstring.

    Args:
        nodes: name -> {"env": raylet environment, "gpus": N, "cpus": N}. ``DOCKYARD_GPUS`` is set
            to ``gpus`` unless the environment names its GPUs itself.
        token: whether the cluster wants a token (``RAY_AUTH_MODE=token``).
    """

    def __init__(self, nodes: dict[str, dict[str, Any]], *, token: bool = True) -> None:
        self.nodes = {name: dict(node) for name, node in nodes.items()}
        for node in self.nodes.values():
            env = node.setdefault("env", {})
            env.setdefault("DOCKYARD_GPUS", str(node.get("gpus", 0)))
        self.token = token
        self.folder = Path(tempfile.mkdtemp(prefix="dockyard-ray-"))
        self.token_file = self.folder / "token"
        self.address = ""
        self._proc: subprocess.Popen[str] | None = None

    def environment(self) -> dict[str, str]:
        """What every process of this cluster (and a driver of it) needs in its environment."""
        env = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0",
               "RAY_TMPDIR": str(self.folder / "tmp")}
        if self.token:
            env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(self.token_file))
        return env

    def start(self, timeout: float = 120.0) -> RayCluster:
        if self.token:
            self.token_file.write_text(secrets.token_hex(32))
            self.token_file.chmod(0o600)
        (self.folder / "tmp").mkdir(exist_ok=True)
        env = {**os.environ, **self.environment()}
        env.pop("RAY_AUTH_TOKEN", None)
        spec = {"nodes": self.nodes}
        self._proc = subprocess.Popen([sys.executable, "-c", _CHILD, json.dumps(spec)], stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, stderr=open(self.folder / "cluster.log", "w"),
                                      text=True, env=env, start_new_session=True)
        self.address = self._answer(timeout)["address"]
        return self

    def _answer(self, timeout: float) -> dict[str, Any]:
        assert self._proc is not None and self._proc.stdout is not None
        import selectors

        sel = selectors.DefaultSelector()
        sel.register(self._proc.stdout, selectors.EVENT_READ)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"the Ray cluster exited ({self._proc.returncode}):\n{self.log_tail()}")
            if sel.select(timeout=0.5):
                line = self._proc.stdout.readline()
                if line.strip().startswith("{"):
                    return json.loads(line)
        raise RuntimeError(f"the Ray cluster did not answer within {timeout:.0f} s:\n{self.log_tail()}")

    def _command(self, line: str, timeout: float = 120.0) -> None:
        assert self._proc is not None and self._proc.stdin is not None
        self._proc.stdin.write(line + "\n")
        self._proc.stdin.flush()
        self._answer(timeout)

    def kill_node(self, name: str) -> None:
        """Kill the node's raylet and its workers (SIGKILL): the node is lost mid-run."""
        self._command(f"kill {name}")

    def add_node(self, name: str) -> None:
        """Start the named node again (a new raylet with the same environment)."""
        self._command(f"add {name}")

    def kill(self) -> None:
        """SIGKILL every process of the cluster at once (head and nodes): the cluster is unreachable
        with nothing told to anyone, as when its machines lose power or network."""
        proc = self._proc
        if proc is not None:
            try:
                os.killpg(proc.pid, 9)
            except ProcessLookupError:
                pass

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join((self.folder / "cluster.log").read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        try:
            if proc.poll() is None and proc.stdin is not None:
                proc.stdin.write("quit\n")
                proc.stdin.flush()
            proc.wait(timeout=60)
        except (OSError, subprocess.TimeoutExpired, ValueError):
            pass
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, 9)
            except ProcessLookupError:
                pass
            proc.wait(timeout=10)
        # Every Ray process of this cluster was started in the child's session.
        try:
            os.killpg(proc.pid, 9)
        except (ProcessLookupError, PermissionError):
            pass

    def __enter__(self) -> RayCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
