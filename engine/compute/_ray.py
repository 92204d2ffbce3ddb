"""The ``ray`` compute backend: runs on an existing Ray cluster, followed from this machine.

A run holds its GPUs and CPUs through a **detached placement group** (``pg-<label>``: one bundle
per node it spans, ``STRICT_SPREAD`` for a distributed run), which Ray reserves in milliseconds.
On each node Ray chose, that node's long-lived **daemon** (:class:`._ray_node.NodeDaemon`, one
detached actor per node) gets the image by content key from the node's own engine (local hit,
then the shared cache, then a build), unpacks the snapshot (sent once per node), starts the
container through ``launch/`` with the GPUs the bundle holds (by UUID) and keeps its output in a
folder on the node. Nothing assumes a shared filesystem.

This agent is the Ray driver. One follower thread per run reads each part's output and metrics
**from the offsets this machine already holds** (the sizes of the run's own files; for the ranks
of a distributed run, a journal), so a restarted agent re-attaches by the group's name and misses
or repeats nothing. What it believes comes from the holder: a node's daemon is asked; a part whose
node Ray calls dead, or whose bundle Ray moved to another node, ends the run ``Failed`` ("node
lost", never started again: it may have run); a cluster that cannot be asked leaves the run as it
is (unknown is not gone). A run's group is removed when its end is recorded; daemons remove the
containers of runs whose group is gone.

The token of a token-authenticated cluster is read from the file or the variable the target names
(``RAY_AUTH_TOKEN_PATH`` / ``RAY_AUTH_TOKEN`` for Ray in this process only); dockyard stores only
the reference. Ray resolves a loopback address to the host's own IP unless told not to, so for a
cluster on 127.0.0.1 every address is kept on loopback (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``
for this driver: that setting only refuses ``ray start`` of worker nodes).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import socket
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from ..errors import ClusterUnavailable, ComputeTargetException, DockyardError, EnvironmentProblem
from ..runs import Distribution, RunRuntime, RunStatus, SnapshotStore
from ._backend import AgentRun, RunEvents
from ._ray_node import NAMESPACE, daemon_name, group_name

__all__ = ["ClusterReport", "RayBackend", "check_cluster"]

_LOOPBACK = {"127.0.0.1", "localhost", "::1", "[::1]"}
# How long one read may wait for new output on the node, and how long the follower waits for it.
_READ_WAIT_S = 1.0
_READ_TIMEOUT_S = 30.0
_CHECK_TIMEOUT_S = 90.0
# How long asking a placed group's bundles for their nodes and GPUs may take.
_PLACE_TIMEOUT_S = 120.0
# How often the agent checks that the cluster's GCS port answers.
_PROBE_EVERY_S = 5.0
# How often the agent sweeps every node of containers whose run's actor was lost with its node.
_SWEEP_EVERY_S = 15.0
_connect_lock = threading.Lock()
_connected: str | None = None


def _host(address: str) -> str:
    return address.removeprefix("ray://").rpartition(":")[0]


def _prepare_environment(settings: Mapping[str, str]) -> None:
    """What Ray reads from this process's environment, set before it is imported."""
    address = settings.get("address", "")
    # Ray's driver ends its whole process 60 s after the cluster's GCS stops answering; this process
    # is the machine's agent, which also serves this machine's runs: it must outlive any cluster
    # (measured: with this, the driver lives on, and calls wait until the GCS answers again).
    os.environ.setdefault("RAY_gcs_rpc_server_reconnect_timeout_s", str(10 * 365 * 86400))
    if _host(address) in _LOOPBACK:
        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # keep 127.0.0.1 as 127.0.0.1
    if settings.get("auth_token_file"):
        path = Path(settings["auth_token_file"])
        if not path.is_file():
            raise ClusterUnavailable(f"the token file of the Ray cluster at {address} is gone: {path}",
                                     address=address, hint="attach the target again with the token's file")
        os.environ["RAY_AUTH_MODE"] = "token"
        os.environ["RAY_AUTH_TOKEN_PATH"] = str(path)
    elif settings.get("auth_token_env"):
        name = settings["auth_token_env"]
        value = os.environ.get(name)
        if not value:
            raise ClusterUnavailable(f"the token of the Ray cluster at {address} is not set: {name} is empty",
                                     address=address, hint=f"export {name} where dockyard's agent starts")
        os.environ["RAY_AUTH_MODE"] = "token"
        os.environ["RAY_AUTH_TOKEN"] = value


def _import_ray() -> Any:
    try:
        import ray
    except ImportError as exc:
        raise ClusterUnavailable("Ray is not installed with dockyard", address="",
                                 hint="pip install 'dockyard[ray]' (the same version on every node)") from exc
    return ray


def connect(settings: Mapping[str, str]) -> Any:
    """This process as a driver of the cluster (once; one cluster per process). Returns ``ray``.

    Raises:
        ClusterUnavailable: Ray is missing, the cluster cannot be reached or refused the token, or
            this process already drives another cluster.
    """
    global _connected
    address = settings.get("address", "")
    with _connect_lock:
        if _connected == address:
            return _import_ray()
        if _connected is not None:
            raise ClusterUnavailable(f"this agent already drives the Ray cluster at {_connected}",
                                     address=address, hint="one agent drives one Ray cluster; use one address")
        if not _answers(address):  # ray.init would wait half a minute, then fail
            raise ClusterUnavailable(f"the Ray cluster at {address} does not answer (nothing accepts connections "
                                     "on that port)", address=address, hint=_token_hint(RuntimeError("")))
        _prepare_environment(settings)
        ray = _import_ray()
        import logging

        kwargs: dict[str, Any] = {"address": address, "namespace": NAMESPACE, "log_to_driver": False,
                                  "logging_level": logging.ERROR, "ignore_reinit_error": True}
        if _host(address) in _LOOPBACK and not address.startswith("ray://"):
            kwargs["_node_ip_address"] = "127.0.0.1"
        try:
            ray.init(**kwargs)
        except Exception as exc:
            raise ClusterUnavailable(f"cannot connect to the Ray cluster at {address}: {_short(exc)}",
                                     address=address, hint=_token_hint(exc)) from exc
        _connected = address
        return ray


def _answers(address: str, timeout: float = 2.0) -> bool:
    """Whether something accepts a TCP connection at the cluster's address (its GCS, or Ray
    Client's server): Ray's own calls wait without end for a cluster that does not."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            return True
    except (OSError, ValueError):
        return False


def _short(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return (text[:300] + "…") if len(text) > 300 else text or type(exc).__name__


def _token_hint(exc: BaseException) -> str:
    text = str(exc).lower()
    if "auth" in text or "token" in text or "unauthenticated" in text:
        return "the cluster wants a token: attach with --token-file FILE or --token-env VARIABLE"
    return "check the address (the head's GCS port, e.g. 6379) and that this machine can reach it"


def run_label(run: AgentRun) -> str:
    """The run's name on the cluster: its workspace (hashed: another machine's paths mean
    nothing there) and its id."""
    where = hashlib.sha256(str(Path(run.workspace).resolve()).encode()).hexdigest()[:10]
    return f"{where}-{run.id}"


# -- checking a cluster (attach, doctor) -------------------------------------------------------------


class ClusterReport:
    """What a check of a cluster found: its nodes, each with dockyard's code, engine, BuildKit, GPUs."""

    def __init__(self, address: str, data: Mapping[str, Any]) -> None:
        self.address = address
        self.nodes: list[dict[str, Any]] = list(data.get("nodes") or [])
        self.code = str(data.get("code") or "")
        self.unauthenticated = bool(data.get("unauthenticated"))

    def to_json(self) -> dict[str, Any]:
        return {"address": self.address, "nodes": self.nodes, "code": self.code,
                "unauthenticated": self.unauthenticated}

    @staticmethod
    def node_name(node: Mapping[str, Any]) -> str:
        return f"node {node.get('host')} {str(node.get('node_id'))[:8]} ({node.get('address')})"

    def problems(self) -> list[str]:
        """One line per node that cannot run dockyard's runs, naming the node."""
        found = []
        for node in self.nodes:
            where = self.node_name(node)
            if node.get("error"):
                found.append(f"{where}: {node['error']}")
                continue
            if node.get("code") != self.code:
                found.append(f"{where} runs dockyard {node.get('dockyard')} (code {str(node.get('code'))[:12]}), "
                             f"not this machine's (code {self.code[:12]}): install the same version there")
            if not node.get("engine_ok"):
                found.append(f"{where}: no Docker Engine: {node.get('engine')}")
            elif not node.get("buildkit_ok"):
                found.append(f"{where}: its engine's BuildKit does not answer: {node.get('buildkit')}")
        return found


def check_cluster(settings: Mapping[str, str], *, timeout: float = _CHECK_TIMEOUT_S) -> ClusterReport:
    """Connect to the cluster in a separate process (this one stays no Ray driver) and probe every
    live node: dockyard's code, engine, BuildKit, GPUs.

    Raises:
        ClusterUnavailable: the cluster cannot be reached, refused the token, or did not answer
            within ``timeout``.
    """
    address = settings.get("address", "")
    try:
        done = subprocess.run([sys.executable, "-m", "dockyard.compute._ray", "check"], input=json.dumps(dict(settings)),
                              capture_output=True, text=True, timeout=timeout, env=_check_environment())
    except subprocess.TimeoutExpired as exc:
        raise ClusterUnavailable(f"the Ray cluster at {address} did not answer within {timeout:.0f} s",
                                 address=address, hint=_token_hint(exc)) from exc
    try:
        data = json.loads(done.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        data = {"error": (done.stderr.strip().splitlines() or ["no answer"])[-1]}
    if data.get("error"):
        raise ClusterUnavailable(str(data["error"]), address=address, hint=str(data.get("hint") or ""))
    return ClusterReport(address, data)


def _check_environment() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH_TOKEN")}


def _check_main() -> int:
    """``python -m dockyard.compute._ray check``: settings on stdin, one JSON line on stdout."""
    from .._codeid import code_id
    from ._ray_node import probe_node

    settings = json.loads(sys.stdin.read())
    out: dict[str, Any] = {"code": code_id()}
    try:
        ray = connect(settings)
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        probe = ray.remote(num_cpus=0)(probe_node)
        alive = [n for n in ray.nodes() if n.get("Alive")]
        pending = {}
        for node in alive:
            strategy = NodeAffinitySchedulingStrategy(node["NodeID"], soft=False)
            pending[node["NodeID"]] = (node, probe.options(scheduling_strategy=strategy).remote())
        nodes = []
        for node_id, (node, ref) in pending.items():
            entry = {"node_id": node_id, "address": node.get("NodeManagerAddress"),
                     "gpus_ray": node.get("Resources", {}).get("GPU", 0)}
            try:
                entry.update(ray.get(ref, timeout=60))
            except Exception as exc:  # noqa: BLE001 - a node without dockyard is reported, not fatal
                entry["error"] = f"dockyard cannot run there: {_short(exc)}"
                entry.setdefault("host", node.get("NodeManagerHostname"))
            nodes.append(entry)
        out["nodes"] = nodes
        out["unauthenticated"] = not (settings.get("auth_token_file") or settings.get("auth_token_env"))
    except ClusterUnavailable as exc:
        out.update(error=exc.message, hint=exc.hint)
    print(json.dumps(out))
    return 0


# -- the backend ---------------------------------------------------------------------------------------


class _Part:
    """One container of a run on the cluster: its rank (one per node), its node, that node's daemon,
    the unit's name there and the GPU indices its bundle holds."""

    def __init__(self, rank: int, node_id: str, gpus: list[str], unit: str, daemon: Any) -> None:
        self.rank = rank
        self.node_id = node_id
        self.gpus = gpus
        self.unit = unit
        self.daemon = daemon


class _Single:
    """A run of one container: its output and metrics are appended as they come, and the offsets
    read from the node are the sizes of this machine's own files (a restarted agent re-reads
    nothing and misses nothing)."""

    def __init__(self, folder: Any) -> None:
        self.folder = folder

    def offsets(self, _rank: int) -> tuple[int, int]:
        return _size(self.folder.log), _size(self.folder.metrics)

    def take(self, _rank: int, log: bytes, metrics: bytes) -> None:
        _append(self.folder.log, log)
        _append(self.folder.metrics, metrics)

    def flush(self, _rank: int) -> None:
        pass


class _Merged:
    """The ranks of a distributed run, merged line by line into the run's one log (each line carries
    its ``[rank R]`` prefix from the node) and its one metrics file.

    Each rank's offsets, the partial line it ended with, and the sizes of the merged files are kept
    in ``meta/ranks.json``, written after every append: a restarted agent cuts the merged files back
    to the sizes the journal names (an append it did not journal), then reads every rank from its
    journalled offset — no gap, no repeat."""

    def __init__(self, folder: Any, ranks: int) -> None:
        self.folder = folder
        self.path = Path(folder.meta) / "ranks.json"
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            data = {}
        if len(data.get("log") or ()) != ranks:
            data = {"log": [0] * ranks, "metrics": [0] * ranks, "partial": [""] * ranks,
                    "partial_metrics": [""] * ranks, "log_size": _size(folder.log),
                    "metrics_size": _size(folder.metrics)}
        self.data = data
        for path, size in ((folder.log, data["log_size"]), (folder.metrics, data["metrics_size"])):
            if _size(path) > size:
                with open(path, "r+b") as fh:
                    fh.truncate(size)

    def offsets(self, rank: int) -> tuple[int, int]:
        return int(self.data["log"][rank]), int(self.data["metrics"][rank])

    def take(self, rank: int, log: bytes, metrics: bytes) -> None:
        if not log and not metrics:
            return
        self._merge(rank, log, "log", "partial", self.folder.log)
        self._merge(rank, metrics, "metrics", "partial_metrics", self.folder.metrics)
        self._save()

    def flush(self, rank: int) -> None:
        """The rank ended: a last line without its newline is written too."""
        changed = False
        for key, path in (("partial", self.folder.log), ("partial_metrics", self.folder.metrics)):
            rest = self.data[key][rank]
            if rest:
                _append(path, rest.encode("utf-8", "surrogateescape") + b"\n")
                self.data[key][rank] = ""
                changed = True
        if changed:
            self._save()

    def _merge(self, rank: int, data: bytes, offset_key: str, partial_key: str, path: Path) -> None:
        if not data:
            return
        text = self.data[partial_key][rank].encode("utf-8", "surrogateescape") + data
        whole, _, rest = text.rpartition(b"\n")
        if whole or text.endswith(b"\n"):
            _append(path, whole + b"\n")
        self.data[partial_key][rank] = rest.decode("utf-8", "surrogateescape")
        self.data[offset_key][rank] += len(data)

    def _save(self) -> None:
        self.data["log_size"] = _size(self.folder.log)
        self.data["metrics_size"] = _size(self.folder.metrics)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data))
        os.replace(tmp, self.path)


class _Admission:
    """Runs wait here, oldest first, while the cluster has no room for them, and make their
    placement group only when it does.

    Why: Ray schedules a group made while nothing is free again only after a back-off that grows
    to a second, so a queue held in Ray drains in waves a second apart (measured: 40 one-second
    runs over 8 GPUs, groups all made at once, drained in 8.2 s; admitted by free resources, 5.6 s).
    Room is Ray's own view (``available_resources``, read at most every 0.1 s) less what groups
    made here but not yet placed will take. A run the whole cluster cannot hold now is not held
    back: its group goes to Ray at once (an autoscaler sees the demand only there)."""

    _FRESH_S = 0.1
    # Ray's view of a node's resources follows a placement by a report from its raylet: a group
    # placed this recently before a read is counted as taken whatever the read says.
    _LAG_S = 0.25

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._waiting: list[tuple[float, str, float, float]] = []  # (submitted, key, GPUs, CPUs)
        self._unplaced: dict[str, tuple[float, float]] = {}
        self._recent: dict[str, tuple[float, float, float]] = {}  # placed: (GPUs, CPUs, when)
        self._free: tuple[float, float] = (0.0, 0.0)
        self._read_at = 0.0

    def _view(self, ray: Any) -> tuple[float, float]:
        if time.monotonic() - self._read_at > self._FRESH_S:
            free = ray.available_resources()
            self._free = (float(free.get("GPU", 0)), float(free.get("CPU", 0)))
            self._read_at = time.monotonic()
            self._recent = {k: v for k, v in self._recent.items() if v[2] > self._read_at - self._LAG_S}
        taken = [*self._unplaced.values(), *((g, c) for g, c, _ in self._recent.values())]
        return self._free[0] - sum(g for g, _ in taken), self._free[1] - sum(c for _, c in taken)

    def admit(self, ray: Any, key: str, submitted: float, gpus: float, cpus: float,
              stop: Callable[[], bool]) -> bool:
        """Wait for room (True), or until ``stop()`` says the run no longer wants it (False)."""
        total = ray.cluster_resources()
        if float(total.get("GPU", 0)) < gpus or float(total.get("CPU", 0)) < cpus:
            with self._cond:
                self._unplaced[key] = (gpus, cpus)
            return True  # more than the cluster holds now: Ray's queue (and autoscaler) decide
        entry = (submitted, key, gpus, cpus)
        with self._cond:
            self._waiting.append(entry)
            self._waiting.sort()
            try:
                while True:
                    free_gpus, free_cpus = self._view(ray)
                    for _, other, g, c in self._waiting:  # oldest first; a run that fits goes
                        if g <= free_gpus and c <= free_cpus:
                            free_gpus, free_cpus = free_gpus - g, free_cpus - c
                            if other == key:
                                self._unplaced[key] = (gpus, cpus)
                                return True
                    if stop():
                        return False
                    self._cond.wait(self._FRESH_S)
            finally:
                self._waiting.remove(entry)

    def placed(self, key: str) -> None:
        """Its group was placed (Ray's view now counts it) or given up."""
        with self._cond:
            found = self._unplaced.pop(key, None)
            if found is not None:
                self._recent[key] = (*found, time.monotonic())
            self._read_at = 0.0

    def released(self) -> None:
        """A group was removed: look again at once."""
        with self._cond:
            self._read_at = 0.0
            self._cond.notify_all()


class RayBackend:
    """Runs on Ray clusters. Constructed by the agent (see :class:`ComputeBackend`)."""

    kind = "ray"

    def __init__(self, *, home: Path, events: RunEvents, engine: Any = None,
                 wake: Callable[[], None] = lambda: None) -> None:
        self.home = Path(home)
        self.events = events
        self.wake = wake
        self.snapshots = SnapshotStore(self.home / "snapshots")
        self._lock = threading.Lock()
        self._threads: dict[tuple[str, str], threading.Thread] = {}
        self._closing = False
        self._tars: dict[str, bytes] = {}
        self._next_sweep = 0.0
        self._daemons: dict[str, Any] = {}
        self._code = ""
        self._admission = _Admission()
        self._sweeper: threading.Thread | None = None
        self._prober: threading.Thread | None = None
        self._next_probe = 0.0
        self._silent_since: float | None = None

    def close(self) -> None:
        self._closing = True  # followers stop; the runs live on on their nodes, and are re-attached

    # -- dispatching ------------------------------------------------------------------------------

    def dispatch(self, queued: Sequence[AgentRun], running: Sequence[AgentRun]) -> None:
        self._sweep_nodes()
        if self._cluster_silent(queued, running):
            return  # nothing can be placed; each run's reason says why
        busy: Counter[tuple[str, str]] = Counter()
        for r in running:
            busy[(str(r.workspace), r.target.name)] += _nodes_of(r)
        with self._lock:
            alive = {k for k, t in self._threads.items() if t.is_alive()}
        for run in queued:
            target = (str(run.workspace), run.target.name)
            if run.key in alive:
                busy[target] += _nodes_of(run)  # being started: its thread honours a cancel itself
                continue
            if run.record.cancel_requested and not run.record.container_id:
                self.events.canceled(run)
                continue
            nodes = _nodes_of(run)  # a distributed run takes one of max_nodes per node it spans
            if busy[target] + nodes > run.target.max_nodes:
                self.events.note(run, f"compute target {run.target.name} is full ({run.target.max_nodes} at once)")
                continue
            busy[target] += nodes
            self._spawn(run)

    def _cluster_silent(self, queued: Sequence[AgentRun], running: Sequence[AgentRun]) -> bool:
        """Whether the cluster this agent drives stopped answering: its GCS port is probed (a TCP
        connect, 2 s at most, in the background, every few seconds), since Ray's own calls then
        wait without end. While it is silent every run on it says so in its reason."""
        if _connected is None:
            return False
        if self._prober is None or not self._prober.is_alive():
            if time.monotonic() >= self._next_probe:
                self._next_probe = time.monotonic() + _PROBE_EVERY_S
                self._prober = threading.Thread(target=self._probe, args=(_connected,), name="ray-probe", daemon=True)
                self._prober.start()
        silent = self._silent_since
        runs = [r for r in (*queued, *running) if r.target.settings.get("address") == _connected]
        if silent is None:
            for run in runs:
                if run.record.reason.startswith("the Ray cluster at"):
                    self.events.note(run, "")
            return False
        when = time.strftime("%H:%M:%S", time.localtime(silent))
        for run in runs:
            what = "started" if run.record.status == RunStatus.QUEUED else "followed again"
            reason = f"the Ray cluster at {_connected} does not answer since {when}; the run is {what} when it does"
            if run.record.reason != reason:
                self.events.note(run, reason)
        return True

    def _probe(self, address: str) -> None:
        if not _answers(address):
            if self._silent_since is None:
                self._silent_since = time.time()
                self.events.log(f"the Ray cluster at {address} does not answer (its GCS port refuses or is silent)")
            return
        if self._silent_since is not None:
            self.events.log(f"the Ray cluster at {address} answers again")
        self._silent_since = None

    def idle(self) -> None:
        """A pass with no run on a Ray target: the nodes are still swept."""
        self._sweep_nodes()

    def _sweep_nodes(self) -> None:
        """Every few seconds while this agent drives the cluster: on every live node, make sure its
        daemon is up (a run placed there then starts at once) and let it remove the containers of
        runs whose placement group is gone (a node lost mid-run that came back)."""
        if _connected is None or time.monotonic() < self._next_sweep:
            return
        if self._sweeper is not None and self._sweeper.is_alive():
            return  # the last one waits on a cluster that does not answer: one at a time
        self._next_sweep = time.monotonic() + _SWEEP_EVERY_S
        self._sweeper = threading.Thread(target=self._sweep, name="ray-sweep", daemon=True)
        self._sweeper.start()

    def _sweep(self) -> None:
        try:
            import ray

            nodes = [n["NodeID"] for n in ray.nodes() if n.get("Alive")]
        except Exception as exc:  # noqa: BLE001 - tried again on the next sweep
            self.events.log(f"listing the cluster's nodes failed: {_short(exc)}")
            return
        self._retire_old_daemons(ray)
        for node_id in nodes:
            try:
                daemon = self._daemon(ray, node_id)
                removed = ray.get(daemon.sweep.remote(), timeout=60)
                self._warm(ray, node_id)
            except Exception:  # noqa: BLE001 - a node that just died (Ray still lists it): the next sweep
                self._forget_daemon(node_id)
                continue
            for label in removed:
                self.events.log(f"removed the container of {label} from node {node_id[:12]}: "
                                "its run's placement group is gone (its node was lost)")

    def _retire_old_daemons(self, ray: Any) -> None:
        """End the node daemons of other dockyard code (made before an upgrade) that follow nothing
        any more; the ones still following a run are left to finish it."""
        from .._codeid import code_id

        self._code = self._code or code_id()
        try:
            names = ray.util.list_named_actors()
        except Exception:  # noqa: BLE001 - the next sweep
            return
        for name in names:
            if not name.startswith("node-") or name.endswith(f"-{self._code[:12]}"):
                continue
            try:
                old = ray.get_actor(name, namespace=NAMESPACE)
                if ray.get(old.busy.remote(), timeout=10) == 0:
                    ray.kill(old)
                    self.events.log(f"ended the node daemon {name} (other dockyard code, following no run)")
            except Exception:  # noqa: BLE001 - gone already, or code without busy(): left alone
                continue

    def _warm(self, ray: Any, node_id: str) -> None:
        """Keep a Ray worker of this driver on the node, so asking a bundle for its GPUs costs
        milliseconds (a fresh worker costs ~0.4 s; idle workers are reused)."""
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        strategy = NodeAffinitySchedulingStrategy(node_id, soft=False)
        ray.get(_bundle_task(ray).options(num_cpus=0, num_gpus=0, scheduling_strategy=strategy).remote(), timeout=60)

    def poll(self, run: AgentRun) -> None:
        """A Running run: make sure a follower reads it (after an agent restart, one is started)."""
        if self._silent_since is not None:
            return  # a follower now would only wait on the silent cluster; dispatch notes it
        with self._lock:
            thread = self._threads.get(run.key)
            if thread is not None and thread.is_alive():
                return
        self._spawn(run)

    def _spawn(self, run: AgentRun) -> None:
        thread = threading.Thread(target=self._serve, args=(run,), name=f"ray-{run.id}", daemon=True)
        with self._lock:
            self._threads[run.key] = thread
        thread.start()

    def _serve(self, run: AgentRun) -> None:
        try:
            run = self.events.refresh(run)
            if run.record.status not in (RunStatus.QUEUED, RunStatus.RUNNING):
                return  # ended meanwhile (this pass's row was older than its follower's last write)
            parts = self._place(run)
            if parts is not None:
                self._follow(run, parts)
        except ClusterUnavailable as exc:
            self.events.note(run, f"the Ray cluster cannot be reached: {exc.message}")
            time.sleep(1.0)  # the next pass tries again
        except DockyardError as exc:
            self._fail(run, f"{exc}")
        except Exception as exc:  # noqa: BLE001 - a bug fails one run, not the agent
            self._fail(run, f"internal error: {type(exc).__name__}: {exc}")
        finally:
            self.wake()

    def _fail(self, run: AgentRun, reason: str, parts: Sequence[_Part] = ()) -> None:
        """The run ends Failed (its other containers stopped, its GPUs given back)."""
        fresh = self.events.refresh(run)
        if fresh.record.status == RunStatus.QUEUED:
            self.events.failed_to_start(run, reason)
        elif fresh.record.status == RunStatus.RUNNING:
            self.events.finished(run, None, reason)
        self.events.log(f"{run.id}: {reason.splitlines()[0]}")
        self._release(run, parts)

    # -- placing ---------------------------------------------------------------------------------

    def _place(self, run: AgentRun) -> list[_Part] | None:
        """The run's placement group (found by its name, else made now) and, on each of its
        nodes, its unit started (at most once: a unit a node knows is not started again). None
        when the run ended meanwhile (canceled, its node lost) or this agent is stopping."""
        ray = connect(run.target.settings)
        from ray.util.placement_group import get_placement_group, placement_group

        record = run.record
        label = run_label(run)
        runtime = RunRuntime.from_dict(record.runtime)
        spread = runtime.distributed
        nodes = spread.nodes if spread else 1
        gpus = record.gpu_count
        try:
            group = get_placement_group(group_name(label))
        except ValueError:
            group = None
        if group is None:
            if record.container_id or record.status == RunStatus.RUNNING:
                self._fail(run, "node lost: the run's placement group is gone (the cluster restarted, or it was "
                                "removed); it is not started again, since it may have run")
                return None
            if record.cancel_requested:
                self.events.canceled(run)
                return None
            if not self._admit(run, nodes, gpus):
                return None
            bundle = {"CPU": 1, "GPU": gpus} if gpus else {"CPU": 1}
            group = placement_group([dict(bundle) for _ in range(nodes)], name=group_name(label), lifetime="detached",
                                    strategy="STRICT_SPREAD" if nodes > 1 else "PACK")
            # Recorded before anything runs: from now on a restarted agent adopts it by its name.
            self.events.launched(run, container_id=f"ray:run-{label}")
        try:
            if not self._wait_placed(run, group, nodes, gpus):
                return None
        finally:
            self._admission.placed(run_label(run))
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        task = _bundle_task(ray)
        asks = [task.options(num_cpus=0, num_gpus=gpus, scheduling_strategy=PlacementGroupSchedulingStrategy(
            group, placement_group_bundle_index=i)).remote() for i in range(nodes)]
        bundles = ray.get(asks, timeout=_PLACE_TIMEOUT_S)
        current = [str(b["node_id"]) for b in bundles]
        recorded = _recorded_nodes(record.container_id)
        if recorded and recorded != [n[:16] for n in current]:
            lost = [r for r, n in enumerate(recorded) if n != current[r][:16]]
            self._fail(run, f"node lost: node {recorded[lost[0]]} of the run (node rank {lost[0]}) left the cluster; "
                            "Ray placed its share elsewhere, and it is not started again, since it may have run")
            return None
        parts = [_Part(rank, node, list(b["gpus"]), label if nodes == 1 else f"{label}.r{rank}",
                       self._daemon(ray, node)) for rank, (node, b) in enumerate(zip(current, bundles, strict=True))]
        if not recorded:
            if self._unwanted(run):  # canceled while it was placed: nothing starts
                self._release(run, ())
                self.events.canceled(run)
                return None
            # Where it runs, before it can start there (`runs show`; a moved part is "lost").
            self.events.launched(run, container_id=f"ray:run-{label}@{','.join(n[:16] for n in current)}")
        payload = self._payload(run, label)
        rendezvous = self._rendezvous(ray, parts) if spread else {}
        for part in parts:
            send = []
            if not ray.get(part.daemon.has_snapshot.remote(payload["snapshot"]), timeout=_READ_TIMEOUT_S):
                send = [ray.put(self._snapshot_tar(record.snapshot))]
            ray.get(part.daemon.start.remote(part.unit, self._part_payload(payload, part, spread, rendezvous),
                                             send, part.gpus), timeout=_READ_TIMEOUT_S)
        hosts = ", ".join(sorted({self._host_of(ray, p.node_id) for p in parts}))
        self.events.note(run, f"preparing on node {hosts} (image, snapshot)")
        self.events.log(f"{run.id} placed on Ray node {hosts} ({', '.join(p.node_id[:12] for p in parts)})")
        return parts

    def _unwanted(self, run: AgentRun) -> bool:
        """Whether a run not started yet should no longer start: its cancel was asked for, or it
        ended meanwhile (a queued run is canceled at once by whoever cancels it)."""
        fresh = self.events.record(run.workspace, run.id)
        return fresh is None or fresh.cancel_requested or fresh.status not in (RunStatus.QUEUED, RunStatus.RUNNING)

    def _admit(self, run: AgentRun, nodes: int, gpus: int) -> bool:
        """Wait for room on the cluster (see :class:`_Admission`); False if it was canceled meanwhile
        (then recorded) or this agent is stopping."""
        import ray

        noted: list[bool] = []

        def stop() -> bool:
            if self._closing:
                return True
            if not noted:
                self.events.note(run, f"waiting for room on the Ray cluster ({gpus} GPU(s), 1 CPU"
                                      f"{f' on {nodes} different nodes' if nodes > 1 else ''})")
                noted.append(True)
            return self._unwanted(run)

        if self._admission.admit(ray, run_label(run), run.record.created, nodes * gpus, nodes, stop):
            return True
        if not self._closing:
            self.events.canceled(run)
        return False

    def _wait_placed(self, run: AgentRun, group: Any, nodes: int, gpus: int) -> bool:
        """Wait until Ray reserved the group (the cluster's queue), honouring a cancel meanwhile."""
        noted = False
        while True:
            if group.wait(timeout_seconds=1):
                return True
            if self._closing:
                return False
            if not noted:
                spread = f" on {nodes} different nodes" if nodes > 1 else ""
                self.events.note(run, f"waiting for the Ray cluster to place it ({gpus} GPU(s), 1 CPU{spread})")
                noted = True
            if self._unwanted(run):
                self._release(run, ())
                self.events.canceled(run)
                return False

    def _daemon(self, ray: Any, node_id: str) -> Any:
        """The node's daemon (made once per node and code; a daemon that died is made again, and
        adopts what its predecessor started from the node's folders)."""
        with self._lock:
            found = self._daemons.get(node_id)
        if found is not None:
            return found
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        from .._codeid import code_id
        from ._ray_node import DAEMON_CONCURRENCY, NodeDaemon

        if not self._code:
            self._code = code_id()
        daemon = ray.remote(NodeDaemon).options(
            name=daemon_name(node_id, self._code), namespace=NAMESPACE, lifetime="detached", get_if_exists=True,
            num_cpus=0, max_concurrency=DAEMON_CONCURRENCY, max_restarts=0, max_task_retries=0,
            scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False),
        ).remote()
        with self._lock:
            self._daemons[node_id] = daemon
        return daemon

    def _forget_daemon(self, node_id: str) -> None:
        with self._lock:
            self._daemons.pop(node_id, None)

    def _host_of(self, ray: Any, node_id: str) -> str:
        for node in ray.nodes():
            if node.get("NodeID") == node_id:
                return str(node.get("NodeManagerAddress") or node_id[:12])
        return node_id[:12]

    def _node_alive(self, ray: Any, node_id: str) -> bool | None:
        """Whether Ray counts the node alive: True, False, or None (the cluster cannot say now)."""
        try:
            for node in ray.nodes():
                if node.get("NodeID") == node_id:
                    return bool(node.get("Alive"))
        except Exception:  # noqa: BLE001 - unknown is not gone
            return None
        return False

    def _rendezvous(self, ray: Any, parts: Sequence[_Part]) -> dict[str, str]:
        """Where the ranks meet: the first node's address and a port free there (kept by the first
        unit once started, so a restarted agent gives a later rank the same one)."""
        first = parts[0]
        known = ray.get(first.daemon.read.remote(first.unit, 0, 0, 0.0), timeout=_READ_TIMEOUT_S)
        variables = known.get("variables") or {}
        if variables.get("MASTER_PORT"):
            return {"MASTER_ADDR": variables["MASTER_ADDR"], "MASTER_PORT": variables["MASTER_PORT"]}
        port = ray.get(first.daemon.free_port.remote(), timeout=_READ_TIMEOUT_S)
        return {"MASTER_ADDR": self._host_of(ray, first.node_id), "MASTER_PORT": str(port)}

    def _payload(self, run: AgentRun, label: str) -> dict[str, Any]:
        record = run.record
        runtime = RunRuntime.from_dict(record.runtime)
        shared = runtime.shared_cache[0] if runtime.shared_cache else ""
        # Nodes authenticate to the shared cache with their own credentials (docker login there):
        # only the registry's address travels, never a user name or a password variable's name.
        return {"run_id": record.id, "label": label, "container": record.id, "experiment": record.experiment,
                "script": record.script, "arguments": list(record.arguments),
                "environment": dict(record.environment), "runtime": runtime.to_dict(), "snapshot": record.snapshot,
                "shared_cache": shared}

    @staticmethod
    def _part_payload(payload: dict[str, Any], part: _Part, spread: Distribution | None,
                      rendezvous: Mapping[str, str]) -> dict[str, Any]:
        if spread is None:
            return payload
        from ._spec import rank_variables

        # Host networking, as NCCL jobs use: the ranks reach each other at their nodes' addresses.
        return {**payload, "container": f"{payload['run_id']}.r{part.rank}", "network": "host", "rank": part.rank,
                "variables": rank_variables(spread, part.rank, rendezvous["MASTER_ADDR"], rendezvous["MASTER_PORT"])}

    def _snapshot_tar(self, snapshot_id: str) -> bytes:
        found = self._tars.get(snapshot_id)
        if found is not None:
            return found
        with tempfile.TemporaryDirectory(prefix="dockyard-snap-") as tmp:
            self.snapshots.materialize(snapshot_id, Path(tmp) / "work")
            buf = io.BytesIO()
            with tarfile.open(fileobj=buf, mode="w") as tar:
                tar.add(Path(tmp) / "work", arcname=".")
        data = buf.getvalue()
        self._tars = {snapshot_id: data}  # the last one only: a burst of runs shares a snapshot
        return data

    # -- following -------------------------------------------------------------------------------

    def _follow(self, run: AgentRun, parts: list[_Part]) -> None:
        """Read every part's output and metrics until all have ended; record what they say. One
        part failing (or exiting non-zero) stops the others, and the run fails."""
        import ray
        from ray.exceptions import GetTimeoutError, RayActorError

        folder = run.record.folder
        folder.prepare()
        sink: _Single | _Merged = _Single(folder) if len(parts) == 1 else _Merged(folder, len(parts))
        ends: dict[int, dict[str, Any]] = {}
        pending: dict[Any, _Part] = {}
        stopping = False
        started = run.record.status == RunStatus.RUNNING
        held: dict[int, list[str]] = {}  # each part's GPUs (virtual GPUs of two nodes may share a name)
        while not self._closing and len(ends) < len(parts):
            if not stopping and self.events.cancel_requested(run):
                self._stop(parts, ends)
                stopping = True
            for part in parts:
                if part.rank not in ends and part not in pending.values():
                    log_at, metrics_at = sink.offsets(part.rank)
                    pending[part.daemon.read.remote(part.unit, log_at, metrics_at, _READ_WAIT_S)] = part
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=_READ_TIMEOUT_S)
            if not ready:
                self.events.note(run, "the Ray cluster does not answer; the run is followed again when it does")
                continue
            for ref in ready:
                part = pending.pop(ref)
                try:
                    got = ray.get(ref, timeout=_READ_TIMEOUT_S)
                except RayActorError as exc:
                    alive = self._node_alive(ray, part.node_id)
                    self._forget_daemon(part.node_id)
                    if alive is False:
                        where = f" (node rank {part.rank})" if len(parts) > 1 else ""
                        self._stop(parts, ends)
                        self._fail(run, f"node lost: the node of the run{where} left the cluster ({_short(exc)})",
                                   parts)
                        return
                    if alive:  # its daemon died, not the node: a new one adopts the unit
                        part.daemon = self._daemon(ray, part.node_id)
                    time.sleep(1.0)
                    continue
                except (GetTimeoutError, ConnectionError, OSError) as exc:
                    self.events.note(run, f"the Ray cluster does not answer ({_short(exc)}); the run is followed "
                                          "again when it does")
                    time.sleep(1.0)
                    continue
                sink.take(part.rank, got["log"], got["metrics"])
                if got["metrics"]:
                    try:
                        self.events.ingest_metrics(self.events.refresh(run))
                    except EnvironmentProblem as exc:
                        self.events.log(f"{run.id}: its metrics could not be stored now: {exc.message}")
                if got["state"] == "unknown":
                    got = {**got, "state": "failed", "reason": "its node has no trace of it (the node's dockyard "
                                                              "folder was removed?)"}
                if got["started"] and (not started or part.rank not in held):
                    held[part.rank] = list(got["gpus"])
                    granted = [g for rank in sorted(held) for g in held[rank]]
                    if not started:
                        where = self.events.refresh(run).record.container_id
                        self.events.launched(run, container_id=where or f"ray:run-{run_label(run)}",
                                             image=got["image"])
                    self.events.granted(run, granted)
                    if not started:  # running, or already ended: a short run's start is recorded too
                        started = self.events.started(run)
                        if not started:  # canceled while it was prepared
                            self._stop(parts, ends)
                            stopping = True
                        started = True
                        self.events.note(run, "")
                        self.wake()
                if got["more"]:
                    continue
                if got["state"] in ("failed", "exited"):
                    sink.flush(part.rank)
                    ends[part.rank] = got
                    if (got["state"] == "failed" or got["exit_code"] != 0) and not stopping:
                        self._stop(parts, ends)  # one rank failed: the others stop, the run fails
                        stopping = True
        if self._closing:
            return
        self._end(run, parts, ends)

    def _end(self, run: AgentRun, parts: Sequence[_Part], ends: Mapping[int, Mapping[str, Any]]) -> None:
        """Record the run's true end from its parts' ends, then give its node resources back."""
        for part in parts:
            self._collect_outputs(run, part)
        many = len(parts) > 1
        # The first part seen to fail decides (``ends`` is in the order they ended): the others
        # were stopped because of it, and end too (143 after SIGTERM).
        failed = next((r for r in ends if ends[r]["state"] == "failed"), None)
        nonzero = next((r for r in ends if ends[r]["state"] == "exited" and ends[r]["exit_code"] != 0), None)
        fresh = self.events.refresh(run)
        if failed is not None and fresh.record.status == RunStatus.QUEUED:
            if fresh.record.cancel_requested:
                self.events.canceled(run)
            else:
                self.events.failed_to_start(run, ends[failed]["reason"] or "the run could not start on its node")
        elif failed is not None:
            reason = ends[failed]["reason"] or "a part of the run could not start"
            self.events.finished(fresh, None, f"node rank {failed}: {reason}" if many else reason)
        elif fresh.record.status == RunStatus.QUEUED:
            if fresh.record.cancel_requested:
                self.events.canceled(run)
            else:
                self.events.failed_to_start(run, ends[0]["reason"] or "it ended before it started")
        else:
            first = nonzero if nonzero is not None else 0
            end = ends[first]
            code = end["exit_code"]
            reason = str(end["reason"] or "")
            if many and code != 0:
                reason = f"node rank {first}: {reason or f'the script exited with code {code}'}"
            self.events.finished(fresh, code, reason)
        self._release(run, parts)

    def _stop(self, parts: Sequence[_Part], ends: Mapping[int, Any]) -> None:
        for part in parts:
            if part.rank not in ends:
                try:
                    part.daemon.cancel.remote(part.unit)
                except Exception:  # noqa: BLE001 - a lost node's part: nothing to stop there
                    pass

    def _collect_outputs(self, run: AgentRun, part: _Part) -> None:
        import ray

        try:
            data = ray.get(part.daemon.outputs.remote(part.unit), timeout=300)
        except Exception as exc:  # noqa: BLE001 - the run's end is recorded whatever the outputs did
            self.events.log(f"{run.id}: its outputs could not be fetched: {_short(exc)}")
            return
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            tar.extractall(run.record.folder.outputs, filter="data")

    def _release(self, run: AgentRun, parts: Sequence[_Part]) -> None:
        """Each part's container and folder removed on its node, then the run's placement group:
        its GPUs and CPUs go back to the cluster."""
        for part in parts:
            try:
                part.daemon.close.remote(part.unit)
            except Exception:  # noqa: BLE001 - swept later (its group is gone)
                pass
        try:
            from ray.util.placement_group import get_placement_group, remove_placement_group

            remove_placement_group(get_placement_group(group_name(run_label(run))))
            self._admission.released()
        except ValueError:
            pass  # none (never made, or removed already)
        except Exception as exc:  # noqa: BLE001 - logged; the GPUs stay reserved until it is removed
            self.events.log(f"{run.id}: its placement group could not be removed: {_short(exc)}")


def _nodes_of(run: AgentRun) -> int:
    spread = RunRuntime.from_dict(run.record.runtime).distributed
    return spread.nodes if spread else 1


def _bundle_task(ray: Any) -> Any:
    from ._ray_node import bundle_gpus

    # max_calls=0: the worker is kept for the next ask (Ray's default for GPU tasks is a fresh one).
    return ray.remote(max_calls=0, max_retries=0)(bundle_gpus)


def _recorded_nodes(container_id: str) -> list[str]:
    """The nodes a run's parts were started on, as recorded (``ray:run-<label>@<node>,<node>``)."""
    _, at, nodes = container_id.partition("@")
    return [n for n in nodes.split(",") if n] if at else []


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _append(path: Path, data: bytes) -> None:
    if data:
        with open(path, "ab") as fh:
            fh.write(data)


if __name__ == "__main__":  # pragma: no cover - the check's own process
    if sys.argv[1:] == ["check"]:
        sys.exit(_check_main())
    raise ComputeTargetException("usage: python -m dockyard.compute._ray check")
