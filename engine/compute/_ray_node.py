"""What runs on a cluster node: one long-lived **node daemon** (a detached Ray actor pinned to its
node) that starts and follows the containers of every run Ray placed there.

A run's resources are held by a detached **placement group** the agent makes (``pg-<label>``: one
bundle of the run's GPUs and one CPU per node it spans), not by a process: making one costs
milliseconds, where an actor per run cost a fresh Ray worker (~0.4 s) each time. Which GPUs a
bundle holds is asked by a tiny task run inside it (Ray hands out indices into the GPUs the raylet
saw; they stay the bundle's while it lives); the daemon maps them to UUIDs on its node and requests
exactly those from the engine — never ``CUDA_VISIBLE_DEVICES``, which Docker would renumber.

Ray's own ``runtime_env`` containers are not used: they hard-code podman, pass no GPU and need
the image's Ray to match the host's. Ray enforces no GPU isolation; the placement group keeps
other Ray work off the bundle's GPUs, and the daemon gives a container only its bundle's.

The daemon keeps each run's part ("unit": one per node the run spans) in a folder on the node,
which the submitting agent reads by offset::

    <node's DOCKYARD_HOME>/cluster-runs/<unit>/   work/, outputs/, meta/std.log, meta/metrics.jsonl,
                                                  meta/state.json (what the daemon knows of it)
    <node's DOCKYARD_HOME>/cluster-snapshots/<snapshot id>.tar   sent once per node, then reused

What it reports comes from the holder: a unit's container on the node's engine, and its state
file (written at every step, so a daemon that is started again on the same node adopts what the
last one started). A container whose run's placement group is gone is an orphan and is removed
(its node was lost mid-run and came back; the agent removed the group when it ended the run).

This module is imported on the nodes, by Ray, with the node's dockyard (whose version must match).
"""

from __future__ import annotations

import io
import json
import os
import shutil
import socket
import tarfile
import threading
import time
from pathlib import Path
from typing import Any

__all__ = ["CLUSTER_LABEL", "NAMESPACE", "NodeDaemon", "bundle_gpus", "daemon_name", "group_name", "probe_node"]

#: Bytes of output (and of metrics) one read hands back; the follower asks again at once for more.
READ_CHUNK = 1 << 20
#: Label of a cluster run's container: the run's label (its placement group is ``pg-<label>``).
CLUSTER_LABEL = "dockyard.cluster-run"
NAMESPACE = "dockyard"
#: How many calls one daemon serves at once (each followed unit has one read waiting in it).
DAEMON_CONCURRENCY = 1024
# A unit folder with no container and no placement group, untouched this long, is removed.
_STALE_FOLDER_S = 600.0


def node_home() -> Path:
    from .._home import dockyard_home

    return dockyard_home()


def daemon_name(node_id: str, code: str) -> str:
    """The daemon of a node for this code (a node returning to the cluster is a new node to Ray)."""
    return f"node-{node_id}-{code[:12]}"


def group_name(label: str) -> str:
    return f"pg-{label}"


def bundle_gpus() -> dict[str, Any]:
    """Run as a task inside a bundle: the node it is on and the GPU indices the bundle holds."""
    import ray

    context = ray.get_runtime_context()
    return {"node_id": context.get_node_id(), "gpus": [str(i) for i in context.get_accelerator_ids().get("GPU", [])]}


def probe_node() -> dict[str, Any]:
    """What ``dockyard doctor --compute`` reports of a node: dockyard's code, the engine, BuildKit, GPUs."""
    from importlib.metadata import PackageNotFoundError, version

    from .._codeid import code_id

    try:
        __version__ = version("dockyard")
    except PackageNotFoundError:  # pragma: no cover - run from a source tree
        __version__ = "unknown"
    from ..gpu import inventory

    report: dict[str, Any] = {"host": socket.gethostname(), "dockyard": __version__, "code": code_id(),
                              "docker_host": os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")}
    try:
        from ..dockerd import EngineClient

        engine = EngineClient.from_env()
        report["engine"] = engine.info().version
        report["engine_ok"] = True
    except Exception as exc:  # noqa: BLE001 - reported, not raised: the doctor lists every node
        report["engine"], report["engine_ok"] = f"{type(exc).__name__}: {exc}", False
    try:
        from ..build import BuildKitClient

        with BuildKitClient("docker") as client:
            report["buildkit"] = f"{len(client.list_workers())} worker(s)"
            report["buildkit_ok"] = True
    except Exception as exc:  # noqa: BLE001 - the same
        report["buildkit"], report["buildkit_ok"] = f"{type(exc).__name__}: {exc}", False
    found = inventory()
    report["gpus"] = [g.uuid for g in found.gpus]
    report["gpus_virtual"] = found.virtual
    return report


class _Unit:
    """One run's part on this node, as the daemon knows it (mirrored in ``meta/state.json``)."""

    def __init__(self, name: str, folder: Any) -> None:
        self.name = name
        self.folder = folder
        self.state = "new"  # new -> preparing -> running -> exited; or failed (never started)
        self.exit_code: int | None = None
        self.reason = ""
        self.image = ""
        self.gpus: tuple[str, ...] = ()
        self.label = ""  # the run's label (its placement group is pg-<label>)
        self.container = ""  # its container's launch id (named dockyard-<id>), once it exists
        self.handle: Any = None
        self.cancel = False
        self.variables: dict[str, str] = {}  # a rank's own (its rendezvous), kept for a later rank

    @property
    def state_file(self) -> Path:
        return Path(self.folder.meta) / "state.json"

    def save(self) -> None:
        data = {"label": self.label, "state": self.state, "exit_code": self.exit_code, "reason": self.reason, "image": self.image,
                "gpus": list(self.gpus), "container": self.container, "cancel": self.cancel,
                "variables": self.variables}
        tmp = self.state_file.with_suffix(f".{threading.get_ident()}.tmp")
        try:
            tmp.write_text(json.dumps(data))
            os.replace(tmp, self.state_file)
        except OSError:
            pass  # a full disk: the daemon's memory still holds it; only a daemon restart would lose it

    def load(self) -> bool:
        try:
            data = json.loads(self.state_file.read_text())
        except (OSError, ValueError):
            return False
        self.label = str(data.get("label") or "")
        self.state = str(data.get("state") or "new")
        self.exit_code = data.get("exit_code")
        self.reason = str(data.get("reason") or "")
        self.image = str(data.get("image") or "")
        self.gpus = tuple(data.get("gpus") or ())
        self.container = str(data.get("container") or "")
        self.cancel = bool(data.get("cancel"))
        self.variables = {str(k): str(v) for k, v in (data.get("variables") or {}).items()}
        return True


class NodeDaemon:
    """The runs of one node (made by the agent as a detached, named Ray actor pinned to the node)."""

    def __init__(self) -> None:
        from .._codeid import code_id

        self.home = node_home()
        self.code = code_id()
        self._units: dict[str, _Unit] = {}
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._builders: dict[str, Any] = {}
        self._engine: Any = None
        self._launcher: Any = None
        self._inventory: Any = None
        self.sweep()

    # -- asked by the agent ---------------------------------------------------------------------

    def where(self) -> dict[str, Any]:
        import ray

        return {"host": socket.gethostname(), "node_id": ray.get_runtime_context().get_node_id(),
                "docker_host": os.environ.get("DOCKER_HOST", ""), "pid": os.getpid(), "code": self.code}

    def busy(self) -> int:
        """Units this daemon still follows (a daemon of older code is ended once it follows none)."""
        with self._lock:
            return sum(unit.state in ("preparing", "running") for unit in self._units.values())

    def has_snapshot(self, snapshot_id: str) -> bool:
        return self._snapshot_path(snapshot_id).is_file()

    def free_port(self) -> int:
        """A TCP port free on this node now (a distributed run's rendezvous, on its first node)."""
        with socket.socket() as sock:
            sock.bind(("", 0))
            return int(sock.getsockname()[1])

    def start(self, name: str, payload: dict[str, Any], snapshot: list[Any], gpu_indices: list[str]) -> str:
        """Prepare and start the unit in the background, at most once: a unit this node already
        knows (in memory or by its state file) is not started again. Returns its state."""
        with self._lock:
            unit = self._known(name)
            if unit is not None:
                return unit.state
            unit = _Unit(name, self._folder(name))
            unit.label = str(payload["label"])
            unit.variables = {str(k): str(v) for k, v in (payload.get("variables") or {}).items()}
            folder = unit.folder
            if folder.root.exists():
                shutil.rmtree(folder.root)
            folder.prepare()
            unit.state = "preparing"
            unit.save()  # from now on a daemon started again here knows it was started once
            self._units[name] = unit
        threading.Thread(target=self._prepare_and_run, args=(unit, payload, snapshot, gpu_indices), daemon=True,
                         name=f"unit-{name}").start()
        return "preparing"

    def read(self, name: str, log_offset: int, metrics_offset: int, wait: float = 1.0) -> dict[str, Any]:
        """Output and metrics bytes from the offsets (what the agent already holds), waiting up to
        ``wait`` seconds for something new; with the state, exit code and reason. A unit this node
        has no trace of is ``unknown`` (never started here)."""
        deadline = time.monotonic() + max(0.0, min(wait, 10.0))
        with self._lock:
            unit = self._known(name)
        if unit is None:
            return {"state": "unknown", "log": b"", "metrics": b"", "exit_code": None, "reason": "", "image": "",
                    "gpus": [], "started": False, "more": False, "variables": {}}
        while True:
            log = _read_from(unit.folder.log, log_offset)
            metrics = _read_from(unit.folder.metrics, metrics_offset)
            with self._lock:
                state = unit.state
                if log or metrics or state in ("exited", "failed") or time.monotonic() >= deadline:
                    return {"log": log, "metrics": metrics, "state": state, "exit_code": unit.exit_code,
                            "reason": unit.reason, "image": unit.image, "gpus": list(unit.gpus),
                            "started": bool(unit.container) and state in ("running", "exited"),
                            "variables": dict(unit.variables),
                            "more": len(log) == READ_CHUNK or len(metrics) == READ_CHUNK}
                self._changed.wait(timeout=min(0.2, max(0.0, deadline - time.monotonic())))

    def cancel(self, name: str) -> str:
        """Stop the unit's container (it ends ``exited``; the agent records ``Canceled``)."""
        with self._lock:
            unit = self._known(name)
            if unit is None:
                return "unknown"
            unit.cancel = True
            unit.save()
            handle = unit.handle
        if handle is not None:
            self._containers().stop(handle, 5.0)
        return unit.state

    def outputs(self, name: str) -> bytes:
        """The unit's ``outputs/`` as a gzipped tar (taken after it exited)."""
        folder = self._folder(name)
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w:gz") as tar:
            if folder.outputs.is_dir():
                tar.add(folder.outputs, arcname=".")
        return buf.getvalue()

    def close(self, name: str) -> None:
        """The agent has everything: remove the unit's container and folder."""
        with self._lock:
            unit = self._units.pop(name, None)
        self._remove_container(unit.container if unit else "")
        shutil.rmtree(self._folder(name).root, ignore_errors=True)

    def sweep(self) -> list[str]:
        """Remove this node's containers (and folders) of cluster runs whose placement group is gone
        (the node was lost mid-run and came back, or an agent never closed them); returns their
        labels. A container whose group cannot be asked about is kept (unknown is not gone)."""
        try:
            api = self._containers().api
            listed = api.containers(all=True, filters={"label": CLUSTER_LABEL})
        except Exception:  # noqa: BLE001 - best effort: the engine may be starting
            return []
        removed = []
        for container in listed:
            label = str((container.get("Labels") or {}).get(CLUSTER_LABEL) or "")
            if not label or _group_alive(label) is not False:
                continue
            try:
                api.remove_container(container["Id"], force=True)
                removed.append(label)
            except Exception:  # noqa: BLE001 - the next sweep tries again
                pass
        runs = self.home / "cluster-runs"
        for folder in runs.iterdir() if runs.is_dir() else ():
            with self._lock:
                if folder.name in self._units:
                    continue
            try:
                if time.time() - folder.stat().st_mtime < _STALE_FOLDER_S:
                    continue
            except OSError:
                continue
            stale = _Unit(folder.name, self._folder(folder.name))
            if stale.load() and stale.label and _group_alive(stale.label) is False:
                shutil.rmtree(folder, ignore_errors=True)
        return removed

    # -- on the node ----------------------------------------------------------------------------

    def _folder(self, name: str) -> Any:
        from ..runs import RunFolder

        safe = "".join(c for c in name if c.isalnum() or c in "-_.")
        return RunFolder(self.home / "cluster-runs" / safe)

    def _known(self, name: str) -> _Unit | None:
        """The unit from memory, else from its state file (a daemon started again adopts it). Holds the lock."""
        unit = self._units.get(name)
        if unit is not None:
            return unit
        unit = _Unit(name, self._folder(name))
        if not unit.load():
            return None
        self._units[name] = unit
        if unit.state in ("preparing", "running"):
            threading.Thread(target=self._adopt, args=(unit,), daemon=True, name=f"adopt-{name}").start()
        return unit

    def _adopt(self, unit: _Unit) -> None:
        """A unit an earlier daemon on this node started: follow its container if it ever started."""
        launcher = self._containers()
        try:
            handle = launcher.find(unit.container) if unit.container else None
        except Exception as exc:  # noqa: BLE001 - the engine cannot say now: report it, keep the unit
            self._set(unit, reason=f"its container cannot be asked about now: {exc}")
            return
        if handle is None:
            what = "it was being prepared" if unit.state == "preparing" else "it ran"
            self._set(unit, state="failed" if unit.state == "preparing" else "exited",
                      reason=f"this node's dockyard daemon was restarted while {what}, and its container is gone")
            return
        self._set(unit, handle=handle, state="running")
        self._follow(unit, handle)

    def _containers(self) -> Any:
        from ..dockerd import EngineClient
        from ..launch import ContainerLauncher

        with self._lock:
            if self._launcher is None:
                self._engine = EngineClient.from_env()
                self._launcher = ContainerLauncher(self._engine)
            return self._launcher

    def _set(self, unit: _Unit, **fields: Any) -> None:
        with self._changed:
            for name, value in fields.items():
                setattr(unit, name, value)
            unit.save()
            self._changed.notify_all()

    def _snapshot_path(self, snapshot_id: str) -> Path:
        safe = "".join(c for c in snapshot_id if c.isalnum() or c in "-_")
        return self.home / "cluster-snapshots" / f"{safe}.tar"

    def _prepare_and_run(self, unit: _Unit, payload: dict[str, Any], snapshot: list[Any],
                         gpu_indices: list[str]) -> None:
        from ..errors import DockyardError

        try:
            self._prepare_and_start(unit, payload, snapshot, gpu_indices)
        except DockyardError as exc:
            tail = getattr(exc, "log_tail", "")
            self._failed(unit, f"{exc}" + (f"\n{tail}" if tail else ""))
        except Exception as exc:  # noqa: BLE001 - the run fails, the daemon answers why
            self._failed(unit, f"on node {socket.gethostname()}: {type(exc).__name__}: {exc}")

    def _failed(self, unit: _Unit, reason: str) -> None:
        try:
            with open(unit.folder.log, "ab") as fh:
                fh.write(f"dockyard: the run could not start: {reason}\n".encode(errors="replace"))
        except OSError:
            pass
        self._set(unit, state="failed", reason=reason)

    def _builder(self, shared_cache: str) -> Any:
        from ..build import Builder

        with self._lock:  # one builder per setting: its index and its single flight are shared
            builder = self._builders.get(shared_cache)
            if builder is None:
                builder = self._builders[shared_cache] = Builder(self.home, engine=self._engine,
                                                                 cache_registry=shared_cache)
            return builder

    def _prepare_and_start(self, unit: _Unit, payload: dict[str, Any], snapshot: list[Any],
                           gpu_indices: list[str]) -> None:
        import ray

        from .._environment import Environment
        from ..gpu import inventory
        from ..runs import RunRuntime
        from ._local import _BuildLog
        from ._spec import container_spec, rank_command

        folder = unit.folder
        tar_path = self._snapshot_path(payload["snapshot"])
        if not tar_path.is_file():
            if not snapshot:
                raise RuntimeError(f"snapshot {payload['snapshot']} is not on this node and was not sent")
            data = ray.get(snapshot[0])
            tar_path.parent.mkdir(parents=True, exist_ok=True)
            tmp = tar_path.with_suffix(f".{threading.get_ident()}.tmp")
            tmp.write_bytes(data)
            os.replace(tmp, tar_path)  # content-addressed: whoever wrote it wrote the same bytes
        folder.work.mkdir(parents=True, exist_ok=True)
        with tarfile.open(tar_path) as tar:
            tar.extractall(folder.work, filter="data")
        env = Environment.from_dict(payload["environment"])
        runtime = RunRuntime.from_dict(payload["runtime"])
        build_log = _BuildLog(folder.log, lambda _line: None)
        launcher = self._containers()
        try:
            builder = self._builder(payload.get("shared_cache") or "")
            built = builder.ensure_image(env, progress=build_log.note, on_event=build_log.event)
        except Exception as exc:
            build_log.failed(exc)
            raise
        build_log.done(built)
        if self._inventory is None:
            self._inventory = inventory()
        found = self._inventory
        given = [int(i) for i in gpu_indices]
        if any(i >= len(found.gpus) for i in given):
            raise RuntimeError(f"Ray gave GPU(s) {given} but this node declares {len(found.gpus)} "
                               "(--num-gpus must match the node's GPUs or DOCKYARD_GPUS)")
        gpus = tuple(found.gpus[i].uuid for i in given)
        labels = self._engine.image_labels(built.image) or {}
        python = labels.get("dockyard.python") or env.python.interpreter_path
        argv: tuple[str, ...] = (python, payload["script"], *payload["arguments"])
        if runtime.distributed is not None:  # a distributed run's node: its processes, one per local rank
            argv = rank_command(argv, runtime.distributed, int(payload["rank"]))
        spec = container_spec(payload["run_id"], payload["experiment"], argv, env, runtime, folder,
                              image=built.image, gpus=gpus, virtual=found.virtual,
                              labels={CLUSTER_LABEL: payload["label"]}, launch_id=payload["container"],
                              variables=payload.get("variables") or {}, network=payload.get("network") or None)
        with self._lock:
            if unit.cancel:
                unit.state, unit.reason = "exited", "canceled before it started"
                unit.save()
                self._changed.notify_all()
                return
        # Known before the container exists: a read that sees it started also sees its GPUs.
        self._set(unit, image=built.image, gpus=gpus, container=payload["container"])
        handle = launcher.launch(spec, on_created=lambda h: self._set(unit, handle=h))
        self._set(unit, handle=handle, state="running")
        if unit.cancel:
            launcher.stop(handle, 5.0)
        self._follow(unit, handle, lambda: builder.wait_published(built.key))

    def _follow(self, unit: _Unit, handle: Any, published: Any = None) -> None:
        launcher = self._containers()
        launcher.wait(handle)
        seen = launcher.poll(handle)
        while seen.state == "running":  # wait() returned early (the engine restarted): wait again
            time.sleep(1.0)
            launcher.wait(handle)
            seen = launcher.poll(handle)
        if published is not None:
            published()  # the image is in the shared cache before the run is seen to end
        if seen.state == "exited":
            self._set(unit, state="exited", exit_code=seen.exit_code, reason=seen.reason)
        else:
            self._set(unit, state="exited", exit_code=None, reason=f"its container is {seen.state}: {seen.reason}")
        self._remove_container(unit.container)  # its output is in the unit's folder

    def _remove_container(self, name: str) -> None:
        if not name:
            return
        from ..launch import LaunchHandle, container_name

        try:
            self._containers().remove(LaunchHandle("container", container_name(name), name))
        except Exception:  # noqa: BLE001 - swept later
            pass


def _group_alive(label: str) -> bool | None:
    """Whether the run's placement group exists: True, False (Ray knows none), None (cannot say)."""
    try:
        from ray.util import get_placement_group, placement_group_table

        group = get_placement_group(group_name(label))
    except ValueError:
        return False
    except Exception:  # noqa: BLE001 - the cluster cannot say: unknown keeps it
        return None
    try:
        return str(placement_group_table(group).get("state")) != "REMOVED"
    except Exception:  # noqa: BLE001
        return None


def _read_from(path: Path, offset: int) -> bytes:
    try:
        with open(path, "rb") as fh:
            fh.seek(offset)
            return fh.read(READ_CHUNK)
    except OSError:
        return b""
