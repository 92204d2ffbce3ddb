"""The ``ray`` compute backend: runs on an existing Ray cluster, followed from this machine.

Each run is one **detached, named Ray actor** (:class:`._ray_node.NodeRun`) that reserves the
run's GPUs and one CPU; Ray places it on a node, and there the actor gets the image by content key
from the node's own engine (local hit, then the shared cache, then a build), unpacks the snapshot
(sent once per node), starts the container through ``launch/`` with the GPUs Ray gave it (by
UUID) and keeps its output in a folder on the node. Nothing assumes a shared filesystem.

This agent is the Ray driver. One follower thread per run reads the actor's output and metrics
**from the offsets this machine already holds** (the sizes of the run's own files), so a restarted
agent re-attaches by the actor's name and misses or repeats nothing. What it believes comes from
the holder: a live actor is asked; an actor Ray no longer knows, or one that died with its node,
ends the run ``Failed`` with the reason; a cluster that cannot be asked leaves the run as it is
(unknown is not gone).

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
from ..runs import RunRuntime, RunStatus, SnapshotStore
from ._backend import AgentRun, RunEvents
from ._ray_node import NAMESPACE

__all__ = ["ClusterReport", "RayBackend", "check_cluster"]

_LOOPBACK = {"127.0.0.1", "localhost", "::1", "[::1]"}
# How long one read may wait for new output on the node, and how long the follower waits for it.
_READ_WAIT_S = 1.0
_READ_TIMEOUT_S = 30.0
_CHECK_TIMEOUT_S = 90.0
# Placements of a run's actor that may die before it answers once (its node was lost meanwhile).
_PLACEMENTS = 3
# How often the agent sweeps every node of containers whose run's actor was lost with its node.
_SWEEP_EVERY_S = 15.0
_connect_lock = threading.Lock()
_connected: str | None = None


def _host(address: str) -> str:
    return address.removeprefix("ray://").rpartition(":")[0]


def _prepare_environment(settings: Mapping[str, str]) -> None:
    """What Ray reads from this process's environment, set before it is imported."""
    address = settings.get("address", "")
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


def _short(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return (text[:300] + "…") if len(text) > 300 else text or type(exc).__name__


def _token_hint(exc: BaseException) -> str:
    text = str(exc).lower()
    if "auth" in text or "token" in text or "unauthenticated" in text:
        return "the cluster wants a token: attach with --token-file FILE or --token-env VARIABLE"
    return "check the address (the head's GCS port, e.g. 6379) and that this machine can reach it"


def actor_name(run: AgentRun) -> str:
    return f"run-{run_label(run)}"


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

    def close(self) -> None:
        self._closing = True  # followers stop; actors and their runs live on, and are re-attached

    # -- dispatching ------------------------------------------------------------------------------

    def dispatch(self, queued: Sequence[AgentRun], running: Sequence[AgentRun]) -> None:
        self._sweep_nodes()
        busy = Counter((str(r.workspace), r.target.name) for r in running)
        with self._lock:
            alive = {k for k, t in self._threads.items() if t.is_alive()}
        for run in queued:
            target = (str(run.workspace), run.target.name)
            if run.key in alive:
                busy[target] += 1  # being started: its thread honours a cancel itself
                continue
            if run.record.cancel_requested and not run.record.container_id:
                self.events.canceled(run)
                continue
            if busy[target] >= run.target.max_nodes:
                self.events.note(run, f"compute target {run.target.name} is full ({run.target.max_nodes} at once)")
                continue
            busy[target] += 1
            self._spawn(run)

    def idle(self) -> None:
        """A pass with no run on a Ray target: the nodes are still swept."""
        self._sweep_nodes()

    def _sweep_nodes(self) -> None:
        """Every few seconds while this agent drives the cluster: remove, on every live node, the
        containers that actors lost with their node left there. Not once per node: Ray declares a
        lost node's actors dead only after its health checks time out, which may be after the node
        has come back (and a container whose actor Ray still calls alive is kept)."""
        if _connected is None or time.monotonic() < self._next_sweep:
            return
        self._next_sweep = time.monotonic() + _SWEEP_EVERY_S
        threading.Thread(target=self._sweep, name="ray-sweep", daemon=True).start()

    def _sweep(self) -> None:
        try:
            import ray
            from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

            from ._ray_node import sweep_node

            task = ray.remote(num_cpus=0, max_retries=0)(sweep_node)
            nodes = [n["NodeID"] for n in ray.nodes() if n.get("Alive")]
        except Exception as exc:  # noqa: BLE001 - tried again on the next sweep
            self.events.log(f"listing the cluster's nodes failed: {_short(exc)}")
            return
        for node_id in nodes:
            try:
                strategy = NodeAffinitySchedulingStrategy(node_id, soft=False)
                removed = ray.get(task.options(scheduling_strategy=strategy).remote(), timeout=60)
            except Exception:  # noqa: BLE001 - a node that just died (Ray still lists it): the next sweep
                continue
            for label in removed:
                self.events.log(f"removed the container of {label} from node {node_id[:12]}: "
                                "its run's actor was lost with the node")

    def poll(self, run: AgentRun) -> None:
        """A Running run: make sure a follower reads it (after an agent restart, one is started)."""
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
            actor = self._actor_of(run)
            if actor is not None:
                self._follow(run, actor)
        except ClusterUnavailable as exc:
            self.events.note(run, f"the Ray cluster cannot be reached: {exc.message}")
            time.sleep(1.0)  # the next pass tries again
        except DockyardError as exc:
            self._fail(run, f"{exc}")
        except Exception as exc:  # noqa: BLE001 - a bug fails one run, not the agent
            self._fail(run, f"internal error: {type(exc).__name__}: {exc}")
        finally:
            self.wake()

    def _fail(self, run: AgentRun, reason: str) -> None:
        fresh = self.events.refresh(run)
        if fresh.record.status == RunStatus.QUEUED:
            self.events.failed_to_start(run, reason)
        elif fresh.record.status == RunStatus.RUNNING:
            self.events.finished(run, None, reason)
        self.events.log(f"{run.id}: {reason.splitlines()[0]}")

    def _actor_of(self, run: AgentRun) -> Any:
        """The run's actor: found by its name (adopted), else made now — unless one was made before
        and is gone (then the run ends: whether it ran cannot be known, so it is not run again)."""
        ray = connect(run.target.settings)
        name = actor_name(run)
        try:
            return ray.get_actor(name, namespace=NAMESPACE)
        except ValueError:
            pass  # Ray knows no such actor
        if run.record.container_id or run.record.status == RunStatus.RUNNING:
            self._fail(run, "node lost: the run's Ray actor is gone (its node left the cluster, or the cluster "
                            "restarted); it is not started again, since it may have run")
            return None
        if run.record.cancel_requested:
            self.events.canceled(run)
            return None
        payload = self._payload(run)
        from ray.exceptions import RayActorError

        from ._ray_node import NodeRun

        gpus = run.record.gpu_count
        for attempt in range(_PLACEMENTS):
            actor = ray.remote(NodeRun).options(
                name=name, namespace=NAMESPACE, lifetime="detached", num_cpus=1, num_gpus=gpus,
                max_restarts=0, max_task_retries=0,
            ).remote(run.id, run_label(run))
            # Recorded before it can do anything: from now on a restarted agent adopts it by name.
            self.events.launched(run, container_id=f"ray:{name}")
            self.events.note(run, f"waiting for the Ray cluster to place it ({gpus} GPU(s), 1 CPU)")
            try:
                where = self._placed(run, actor, ray)
                break
            except RayActorError as exc:
                # It died before it answered once (placed on a node that was just lost, which Ray
                # had not noticed yet): it never ran anything, so placing it again runs nothing twice.
                self.events.log(f"{run.id}: its actor died before it started ({_short(exc)}); placing it again")
                if attempt == _PLACEMENTS - 1:
                    raise ClusterUnavailable(f"the run's actor died {_PLACEMENTS} times before it started: "
                                             f"{_short(exc)}", address=run.target.settings.get("address", "")) from exc
                time.sleep(2.0)
        if where is None:
            return None
        send = []
        if not ray.get(actor.has_snapshot.remote(payload["snapshot"]), timeout=_READ_TIMEOUT_S):
            send = [ray.put(self._snapshot_tar(run.record.snapshot))]
        ray.get(actor.start.remote(payload, send), timeout=_READ_TIMEOUT_S)
        # Which node holds it, for `runs show` (the actor's name alone finds it again).
        self.events.launched(run, container_id=f"ray:{name}@{where['node_id'][:16]}")
        self.events.note(run, f"preparing on node {where['host']} (image, snapshot)")
        self.events.log(f"{run.id} placed on Ray node {where['host']} ({where['node_id'][:12]})")
        return actor

    def _placed(self, run: AgentRun, actor: Any, ray: Any) -> dict[str, Any] | None:
        """Wait until Ray placed the actor (the cluster's queue), honouring a cancel meanwhile."""
        ref = actor.where.remote()
        while True:
            ready, _ = ray.wait([ref], timeout=1.0)
            if ready:
                return ray.get(ref)
            if self._closing:
                return None
            if self.events.cancel_requested(run):
                ray.kill(actor)
                self.events.canceled(run)
                return None

    def _payload(self, run: AgentRun) -> dict[str, Any]:
        record = run.record
        runtime = RunRuntime.from_dict(record.runtime)
        shared = runtime.shared_cache[0] if runtime.shared_cache else ""
        # Nodes authenticate to the shared cache with their own credentials (docker login there):
        # only the registry's address travels, never a user name or a password variable's name.
        return {"experiment": record.experiment, "script": record.script, "arguments": list(record.arguments),
                "environment": dict(record.environment), "runtime": runtime.to_dict(), "snapshot": record.snapshot,
                "shared_cache": shared}

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

    def _follow(self, run: AgentRun, actor: Any) -> None:
        """Read the run's output and metrics from the node until it ends; record what it says."""
        import ray
        from ray.exceptions import GetTimeoutError, RayActorError

        folder = run.record.folder
        folder.prepare()
        canceled_sent = False
        started = run.record.status == RunStatus.RUNNING
        while not self._closing:
            if not canceled_sent and self.events.cancel_requested(run):
                actor.cancel.remote()
                canceled_sent = True
            try:
                got = ray.get(actor.read.remote(_size(folder.log), _size(folder.metrics), _READ_WAIT_S),
                              timeout=_READ_TIMEOUT_S)
            except RayActorError as exc:
                self._fail(run, f"node lost: the run's Ray actor died ({_short(exc)})")
                return
            except (GetTimeoutError, ConnectionError, OSError) as exc:
                self.events.note(run, f"the Ray cluster does not answer ({_short(exc)}); the run is followed "
                                      "again when it does")
                time.sleep(1.0)
                continue
            _append(folder.log, got["log"])
            if got["metrics"]:
                _append(folder.metrics, got["metrics"])
                try:
                    self.events.ingest_metrics(self.events.refresh(run))
                except EnvironmentProblem as exc:
                    self.events.log(f"{run.id}: its metrics could not be stored now: {exc.message}")
            state = got["state"]
            if got["started"] and not started:  # running, or already ended: a short run's start is recorded too
                held = self.events.refresh(run).record.container_id
                self.events.launched(run, container_id=held or f"ray:{actor_name(run)}", image=got["image"])
                self.events.granted(run, got["gpus"])
                started = self.events.started(run)
                if not started:  # canceled while it was prepared
                    actor.cancel.remote()
                    canceled_sent = True
                self.events.note(run, "")
                self.wake()
            if got["more"]:
                continue
            if state == "failed":
                self._fail(run, got["reason"] or "the run could not start on its node")
                self._close(actor)
                return
            if state == "exited":
                self._collect_outputs(run, actor)
                fresh = self.events.refresh(run)
                if fresh.record.status == RunStatus.QUEUED:
                    if fresh.record.cancel_requested:
                        self.events.canceled(run)
                    else:
                        self.events.failed_to_start(run, got["reason"] or "it ended before it started")
                else:
                    self.events.finished(fresh, got["exit_code"], got["reason"])
                self._close(actor)
                return

    def _collect_outputs(self, run: AgentRun, actor: Any) -> None:
        import ray

        try:
            data = ray.get(actor.outputs.remote(), timeout=300)
        except Exception as exc:  # noqa: BLE001 - the run's end is recorded whatever the outputs did
            self.events.log(f"{run.id}: its outputs could not be fetched: {_short(exc)}")
            return
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            tar.extractall(run.record.folder.outputs, filter="data")

    def _close(self, actor: Any) -> None:
        try:
            actor.close.remote()  # it removes its container and folder, then ends itself
        except Exception:  # noqa: BLE001 - an actor left behind holds no GPU once its run ended
            pass


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
