"""Runs as containers on this node's Docker Engine, through the docker SDK.

The SDK's import (~0.1-0.3 s) is paid once by the long-lived agent, never by a CLI process. Its
errors are translated once, by :func:`dockyard.dockerd.translate_docker_error`.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable
from typing import Any

from ..dockerd import EngineClient, translate_docker_error
from ..errors import EngineError, EngineUnavailable, EnvironmentProblem
from ._types import LaunchHandle, LaunchSpec, Observation

__all__ = ["ContainerLauncher", "container_name"]

# Each running container has a thread blocked in the engine's wait endpoint, each on a connection.
_POOL = 64
# $1 is the log file, the rest the command: data stays data (no path is ever part of the script).
_WRAPPER = 'log=$1; shift; exec "$@" >>"$log" 2>&1'


def container_name(run_id: str) -> str:
    return f"dockyard-{run_id}"


class ContainerLauncher:
    """Starts a run as a container labelled ``dockyard.run=<id>`` and named ``dockyard-<id>``.

    The command runs under ``/bin/sh`` with ``exec``, so the script becomes PID 1's process
    image (signals reach it, its exit code is the container's) and its output goes straight into
    the bind-mounted log file. Paths and arguments reach it as argv elements, never as shell text.
    """

    kind = "container"

    def __init__(self, engine: EngineClient | None = None) -> None:
        self.engine = engine or EngineClient.from_env()
        self._api: Any = None
        self._lock = threading.Lock()

    @property
    def api(self) -> Any:
        """The SDK's low-level client (one request per call; no implicit inspect after create)."""
        with self._lock:
            if self._api is None:
                self._api = self.engine.docker_client(timeout=60, max_pool_size=_POOL).api
            return self._api

    def _body(self, spec: LaunchSpec) -> dict[str, Any]:
        from docker.types import DeviceRequest, Mount, Ulimit

        device_requests = None
        if spec.device_ids:
            # By UUID, never `count`: dockerd's count means "the first N GPUs", whoever uses them.
            device_requests = [DeviceRequest(driver="nvidia", device_ids=list(spec.device_ids), capabilities=[["gpu"]])]
        # Mounts, not "host:container" bind strings: a ':' or ',' in a path is just a character.
        mounts = [Mount(m.target, m.source, type="bind", read_only=m.read_only) for m in spec.mounts]
        return {
            "image": spec.image,
            "command": ["/bin/sh", "-c", _WRAPPER, "dockyard-run", spec.log_path, *spec.argv],
            "environment": dict(spec.env),
            "working_dir": spec.workdir,
            "labels": {**spec.labels, "dockyard.run": spec.run_id},
            "name": container_name(spec.run_id),
            "host_config": self.api.create_host_config(
                mounts=mounts, device_requests=device_requests, shm_size=spec.shm_size, ipc_mode=spec.ipc_mode,
                network_mode=spec.network_mode,
                ulimits=[Ulimit(name=n, soft=soft, hard=hard) for n, soft, hard in spec.ulimits] or None,
            ),
            "use_config_proxy": False,  # the run gets its environment's variables, not the client's proxies
        }

    def launch(self, spec: LaunchSpec, *, on_created: Callable[[LaunchHandle], None]) -> LaunchHandle:
        """Create, report, start.

        A container of this run that already exists is an earlier attempt that got that far
        before its agent died: never started, it is replaced; started, it is adopted as it is
        (the script never runs twice).

        Raises:
            EnvironmentProblem: the engine cannot give GPUs to containers (no NVIDIA toolkit).
            EngineUnavailable, EngineError: the engine refused or is down; nothing is left behind.
        """
        import docker.errors

        if not spec.image:
            raise EngineError(f"run {spec.run_id}: a container needs an image")
        body = self._body(spec)
        try:
            try:
                container_id = str(self.api.create_container(**body)["Id"])
            except docker.errors.APIError as exc:
                if exc.status_code != 409:
                    raise
                existing = self.api.inspect_container(body["name"])
                handle = LaunchHandle("container", str(existing["Id"]), spec.run_id)
                if (existing.get("State") or {}).get("Status") != "created":
                    on_created(handle)  # it started once already: adopt it
                    return handle
                self.api.remove_container(handle.ref, force=True)
                container_id = str(self.api.create_container(**body)["Id"])
        except Exception as exc:
            raise translate_docker_error(exc, f"creating the container of run {spec.run_id}") from exc
        handle = LaunchHandle("container", container_id, spec.run_id)
        on_created(handle)  # recorded before start: a crash from here on leaves an adoptable run
        try:
            self.api.start(container_id)
        except Exception as exc:
            error = translate_docker_error(exc, f"starting the container of run {spec.run_id}")
            if not isinstance(error, EngineUnavailable):
                try:
                    self.remove(handle)  # leave nothing behind
                except EngineError:
                    pass  # best effort: a later adoption finds it "created, never started" and replaces it
            if "nvidia" in str(error).lower():
                message = getattr(exc, "explanation", None) or str(exc)
                raise EnvironmentProblem(
                    f"the engine cannot give GPUs to containers: {str(message).strip()}",
                    hint="install the NVIDIA Container Toolkit (nvidia-container-toolkit) and restart dockerd",
                ) from exc
            raise error from exc
        return handle

    def poll(self, handle: LaunchHandle) -> Observation:
        import docker.errors

        try:
            state = self.api.inspect_container(handle.ref).get("State") or {}
        except docker.errors.NotFound:
            return Observation("gone", reason="the run's container disappeared (removed outside dockyard)")
        except Exception as exc:  # noqa: BLE001 - translated once, here
            error = translate_docker_error(exc, "inspecting a run's container")
            return Observation("unknown", reason=getattr(error, "reason", None) or str(error))
        if state.get("Status") == "created":
            return Observation("gone", reason="the run's container was created but never started")
        if state.get("Status") not in ("exited", "dead"):
            return Observation("running")
        code = int(state.get("ExitCode", -1))
        reason = "" if code == 0 else str(state.get("Error") or "")
        if state.get("OOMKilled"):
            reason = "killed: out of memory"
        return Observation("exited", exit_code=code, reason=reason, finished_at=_timestamp(state.get("FinishedAt")))

    def wait(self, handle: LaunchHandle) -> None:
        try:
            self.api.wait(handle.ref, timeout=None)
        except Exception:  # noqa: BLE001 - whoever polls next decides what happened
            return

    def stop(self, handle: LaunchHandle, grace_s: float = 5.0) -> None:
        try:
            self.api.stop(handle.ref, timeout=int(grace_s))
        except Exception as exc:
            error = translate_docker_error(exc, "stopping a run's container")
            if not (isinstance(error, EngineError) and error.status == 404):
                raise error from exc

    def find(self, run_id: str) -> LaunchHandle | None:
        """The container of ``run_id`` that ever started (running or exited), else None.

        Raises:
            EngineUnavailable, EngineError: the engine cannot be asked (unknown is not "none").
        """
        import docker.errors

        try:
            found = self.api.inspect_container(container_name(run_id))
        except docker.errors.NotFound:
            return None
        except Exception as exc:
            raise translate_docker_error(exc, f"looking for the container of run {run_id}") from exc
        if (found.get("State") or {}).get("Status") == "created":
            return None  # never started: it holds nothing and ran nothing
        return LaunchHandle("container", str(found["Id"]), run_id)

    def live_runs(self) -> set[str] | None:
        """Runs with a running container on this engine (by their ``dockyard.run`` label)."""
        try:
            listed = self.api.containers(filters={"label": "dockyard.run"})
        except Exception:  # noqa: BLE001 - None means "cannot tell", which keeps every lease
            return None
        return {str((c.get("Labels") or {}).get("dockyard.run")) for c in listed}

    def remove(self, handle: LaunchHandle) -> None:
        try:
            self.api.remove_container(handle.ref, force=True)
        except Exception as exc:
            error = translate_docker_error(exc, "removing a run's container")
            if not (isinstance(error, EngineError) and error.status == 404):
                raise error from exc


_RFC3339 = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d+))?(Z|[+-]\d\d:\d\d)?$")


def _timestamp(text: object) -> float | None:
    """Docker's RFC 3339 times (nanoseconds, 'Z') as seconds since the epoch; None for the zero time."""
    from datetime import datetime

    found = _RFC3339.match(text) if isinstance(text, str) else None
    if found is None or text.startswith("0001-"):  # type: ignore[union-attr]
        return None
    whole, fraction, zone = found.groups()
    zone = "+00:00" if zone in (None, "Z") else zone
    return datetime.fromisoformat(f"{whole}.{(fraction or '0')[:6]:0<6}{zone}").timestamp()
