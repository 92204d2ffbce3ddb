"""What runs on a cluster node for one run: a detached Ray actor that reserves the run's GPUs and
CPU, gets the image on **that node's** Docker Engine, starts the container through ``launch/``
and keeps its output in a folder on the node, which the submitting agent reads by offset.

Ray's own ``runtime_env`` containers are not used: they hard-code podman, pass no GPU and need
the image's Ray to match the host's. Ray enforces no GPU isolation either; the actor asks Ray which
of the node's GPUs it was given (indices into what the raylet saw) and requests exactly those
UUIDs from the engine — never ``CUDA_VISIBLE_DEVICES``, which Docker would renumber.

The actor is detached (it outlives the agent that made it, so a restarted agent re-attaches by
its name) and never restarted by Ray: a run is started at most once. Its folder, on the node::

    <node's DOCKYARD_HOME>/cluster-runs/<label>/   work/, outputs/, meta/std.log, meta/metrics.jsonl
    <node's DOCKYARD_HOME>/cluster-snapshots/<snapshot id>.tar   sent once per node, then reused

This module is imported on the nodes, by Ray, with the node's dockyard (whose version must match).
"""

from __future__ import annotations

import io
import os
import shutil
import socket
import tarfile
import threading
import time
from pathlib import Path
from typing import Any

__all__ = ["NodeRun", "probe_node", "sweep_node"]

#: Bytes of output (and of metrics) one read hands back; the follower asks again at once for more.
READ_CHUNK = 1 << 20
#: Label of a cluster run's container: which actor owns it (a container whose actor is gone is swept).
CLUSTER_LABEL = "dockyard.cluster-run"
NAMESPACE = "dockyard"


def node_home() -> Path:
    from .._home import dockyard_home

    return dockyard_home()


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


class NodeRun:
    """One run on one node (made by the agent as a detached, named Ray actor)."""

    def __init__(self, run_id: str, label: str) -> None:
        from ..runs import RunFolder

        self.run_id = run_id
        self.label = label
        self.home = node_home()
        self.folder = RunFolder(self.home / "cluster-runs" / label)
        self.state = "new"  # new -> preparing -> running -> exited; or failed (never started)
        self.exit_code: int | None = None
        self.reason = ""
        self.image = ""
        self.gpus: tuple[str, ...] = ()
        self._handle: Any = None
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._cancel = False
        self._sweep()

    # -- asked by the agent ---------------------------------------------------------------------

    def where(self) -> dict[str, Any]:
        import ray

        return {"host": socket.gethostname(), "node_id": ray.get_runtime_context().get_node_id(),
                "docker_host": os.environ.get("DOCKER_HOST", ""), "pid": os.getpid()}

    def has_snapshot(self, snapshot_id: str) -> bool:
        return self._snapshot_path(snapshot_id).is_file()

    def start(self, payload: dict[str, Any], snapshot: list[Any]) -> str:
        """Prepare and start the run in the background (at most once); returns the state."""
        with self._lock:
            if self.state != "new":
                return self.state
            self.state = "preparing"
        threading.Thread(target=self._prepare_and_run, args=(payload, snapshot), daemon=True,
                         name=f"run-{self.run_id}").start()
        return "preparing"

    def read(self, log_offset: int, metrics_offset: int, wait: float = 1.0) -> dict[str, Any]:
        """Output and metrics bytes from the offsets (what the agent already holds), waiting up to
        ``wait`` seconds for something new; with the state, exit code and reason."""
        deadline = time.monotonic() + max(0.0, min(wait, 10.0))
        while True:
            log = _read_from(self.folder.log, log_offset)
            metrics = _read_from(self.folder.metrics, metrics_offset)
            with self._lock:
                state = self.state
                if log or metrics or state in ("exited", "failed") or time.monotonic() >= deadline:
                    return {"log": log, "metrics": metrics, "state": state, "exit_code": self.exit_code,
                            "reason": self.reason, "image": self.image, "gpus": list(self.gpus),
                            "started": self._handle is not None,
                            "more": len(log) == READ_CHUNK or len(metrics) == READ_CHUNK}
                self._changed.wait(timeout=min(0.2, max(0.0, deadline - time.monotonic())))

    def cancel(self) -> str:
        """Stop the run's container (it ends ``exited``; the agent records ``Canceled``)."""
        with self._lock:
            self._cancel = True
            handle = self._handle
        if handle is not None:
            from ..launch import ContainerLauncher

            ContainerLauncher(_engine()).stop(handle, 5.0)
        return self.state

    def outputs(self) -> bytes:
        """The run's ``outputs/`` as a gzipped tar (taken after it exited)."""
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w:gz") as tar:
            if self.folder.outputs.is_dir():
                tar.add(self.folder.outputs, arcname=".")
        return buf.getvalue()

    def close(self) -> None:
        """The agent has everything: remove the container and the folder, and end the actor."""
        import ray

        self._remove_container()
        shutil.rmtree(self.folder.root, ignore_errors=True)
        ray.actor.exit_actor()

    # -- on the node ----------------------------------------------------------------------------

    def _set(self, **fields: Any) -> None:
        with self._changed:
            for name, value in fields.items():
                setattr(self, name, value)
            self._changed.notify_all()

    def _snapshot_path(self, snapshot_id: str) -> Path:
        safe = "".join(c for c in snapshot_id if c.isalnum() or c in "-_")
        return self.home / "cluster-snapshots" / f"{safe}.tar"

    def _prepare_and_run(self, payload: dict[str, Any], snapshot: list[Any]) -> None:
        from ..errors import DockyardError

        try:
            self._prepare_and_start(payload, snapshot)
        except DockyardError as exc:
            tail = getattr(exc, "log_tail", "")
            self._failed(f"{exc}" + (f"\n{tail}" if tail else ""))
        except Exception as exc:  # noqa: BLE001 - the run fails, the actor answers why
            self._failed(f"on node {socket.gethostname()}: {type(exc).__name__}: {exc}")

    def _failed(self, reason: str) -> None:
        try:
            with open(self.folder.log, "ab") as fh:
                fh.write(f"dockyard: the run could not start: {reason}\n".encode(errors="replace"))
        except OSError:
            pass
        self._set(state="failed", reason=reason)

    def _prepare_and_start(self, payload: dict[str, Any], snapshot: list[Any]) -> None:
        import ray

        from .._environment import Environment
        from ..build import Builder
        from ..gpu import inventory
        from ..launch import ContainerLauncher
        from ..runs import RunRuntime
        from ._local import _BuildLog
        from ._spec import container_spec

        folder = self.folder
        if folder.root.exists():
            shutil.rmtree(folder.root)
        folder.prepare()
        tar_path = self._snapshot_path(payload["snapshot"])
        if not tar_path.is_file():
            if not snapshot:
                raise RuntimeError(f"snapshot {payload['snapshot']} is not on this node and was not sent")
            data = ray.get(snapshot[0])
            tar_path.parent.mkdir(parents=True, exist_ok=True)
            tmp = tar_path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_bytes(data)
            os.replace(tmp, tar_path)  # content-addressed: whoever wrote it wrote the same bytes
        folder.work.mkdir(parents=True, exist_ok=True)
        with tarfile.open(tar_path) as tar:
            tar.extractall(folder.work, filter="data")
        env = Environment.from_dict(payload["environment"])
        runtime = RunRuntime.from_dict(payload["runtime"])
        build_log = _BuildLog(folder.log, lambda _line: None)
        engine = _engine()
        builder = Builder(self.home, engine=engine, cache_registry=payload.get("shared_cache") or "")
        try:
            built = builder.ensure_image(env, progress=build_log.note, on_event=build_log.event)
        except Exception as exc:
            build_log.failed(exc)
            raise
        finally:
            builder.close()
        build_log.done(built)
        found = inventory()
        given = [int(i) for i in ray.get_runtime_context().get_accelerator_ids().get("GPU", [])]
        if any(i >= len(found.gpus) for i in given):
            raise RuntimeError(f"Ray gave GPU(s) {given} but this node declares {len(found.gpus)} "
                               "(--num-gpus must match the node's GPUs or DOCKYARD_GPUS)")
        gpus = tuple(found.gpus[i].uuid for i in given)
        labels = engine.image_labels(built.image) or {}
        python = labels.get("dockyard.python") or env.python.interpreter_path
        spec = container_spec(self.run_id, payload["experiment"], (python, payload["script"], *payload["arguments"]),
                              env, runtime, folder, image=built.image, gpus=gpus, virtual=found.virtual,
                              labels={CLUSTER_LABEL: self.label})
        launcher = ContainerLauncher(engine)
        with self._lock:
            if self._cancel:
                self.state, self.reason = "exited", "canceled before it started"
                return
        # Known before the container exists: a read that sees it started also sees its GPUs.
        self._set(image=built.image, gpus=gpus)
        handle = launcher.launch(spec, on_created=lambda h: self._set(_handle=h))
        self._set(_handle=handle, state="running")
        if self._cancel:
            launcher.stop(handle, 5.0)
        launcher.wait(handle)
        seen = launcher.poll(handle)
        while seen.state == "running":  # wait() returned early (the engine restarted): wait again
            time.sleep(1.0)
            launcher.wait(handle)
            seen = launcher.poll(handle)
        if seen.state == "exited":
            self._set(state="exited", exit_code=seen.exit_code, reason=seen.reason)
        else:
            self._set(state="exited", exit_code=None, reason=f"its container is {seen.state}: {seen.reason}")

    def _remove_container(self) -> None:
        handle = self._handle
        if handle is None:
            return
        from ..launch import ContainerLauncher

        try:
            ContainerLauncher(_engine()).remove(handle)
        except Exception:  # noqa: BLE001 - swept later by the next actor on this node
            pass

    def _sweep(self) -> None:
        sweep_node(keep=self.label)


def sweep_node(keep: str = "") -> list[str]:
    """Remove this node's containers of cluster runs whose actor is gone (the node was lost mid-run
    and came back, or an agent never closed them); returns their labels. The agent runs it on
    every node it has not swept yet (a node that returns is a new node to Ray), and every actor
    runs it as it starts. A container whose actor's fate cannot be asked is kept (unknown is not gone)."""
    import ray

    try:
        api = _engine_api()
        listed = api.containers(all=True, filters={"label": CLUSTER_LABEL})
    except Exception:  # noqa: BLE001 - best effort: the engine may be starting
        return []
    removed = []
    for container in listed:
        label = str((container.get("Labels") or {}).get(CLUSTER_LABEL) or "")
        if not label or label == keep:
            continue
        try:
            ray.get_actor(f"run-{label}", namespace=NAMESPACE)
            continue  # its actor lives: not ours to touch
        except ValueError:
            pass  # Ray knows no live actor of that name: the container is an orphan
        except Exception:  # noqa: BLE001 - the cluster cannot say: unknown keeps it
            continue
        try:
            api.remove_container(container["Id"], force=True)
            removed.append(label)
        except Exception:  # noqa: BLE001 - the next sweep tries again
            pass
    return removed


def _engine() -> Any:
    from ..dockerd import EngineClient

    return EngineClient.from_env()


def _engine_api() -> Any:
    from ..launch import ContainerLauncher

    return ContainerLauncher(_engine()).api


def _read_from(path: Path, offset: int) -> bytes:
    try:
        with open(path, "rb") as fh:
            fh.seek(offset)
            return fh.read(READ_CHUNK)
    except OSError:
        return b""
