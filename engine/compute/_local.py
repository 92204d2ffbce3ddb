"""The ``local`` compute backend: this machine's engine and GPUs.

It decides which queued runs start now — each compute target's ``max_nodes``, and one GPU plan
(:func:`dockyard.gpu.plan`) over the GPU runs of every workspace, in one queue ordered by priority
then submit time — leases their GPUs, prepares each run on a thread (snapshot, image) and hands it
to a launcher (container or local process), then follows it to its true end.
"""

from __future__ import annotations

import os
import shutil
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .._environment import Environment
from ..dockerd import EngineClient
from ..errors import DockyardError
from ..gpu import Lease, LeaseConflict, LeaseStore
from ..launch import ContainerLauncher, LaunchHandle, LaunchSpec, ProcessLauncher
from ..runs import CONTAINER_LIB, CONTAINER_WORK, RunStatus, SnapshotStore
from ._backend import AgentRun, RunEvents

__all__ = ["ENGINE_GRACE_S", "LocalBackend"]

# How long the engine may be unreachable before running container runs are marked Failed.
ENGINE_GRACE_S = float(os.environ.get("DOCKYARD_ENGINE_GRACE_S", "15"))


def _library_dir() -> Path:
    """dockyard's own package folder, mounted read-only into containers for the in-run API."""
    # resolve(): an editable install is a tree of symlinks; the container needs the real folder.
    return Path(__file__).resolve().parent.parent


class _NotNow(Exception):
    """A queued run cannot be started this pass (the reason is shown); it stays queued."""


def _plan_id(run: AgentRun) -> str:
    # Run ids are unique within a workspace; the plan sees every workspace's runs at once.
    return f"{run.workspace.name}/{run.id}"


class LocalBackend:
    """Runs on this machine. Constructed by the agent; ``wake`` wakes its loop (a run just ended)."""

    kind = "local"

    def __init__(self, *, home: Path, events: RunEvents, engine: EngineClient | None = None,
                 wake: Callable[[], None] = lambda: None) -> None:
        self.home = Path(home)
        self.events = events
        self.engine = engine or EngineClient.from_env()
        self.wake = wake
        self.leases = LeaseStore(self.home)  # machine-wide
        self.snapshots = SnapshotStore(self.home / "snapshots")
        self.containers = ContainerLauncher(self.engine)
        self.processes = ProcessLauncher()
        self._builder: Any = None
        self._gpus: Any = None  # (inventory, topology), read once
        self._lock = threading.Lock()
        self._preparing: dict[tuple[str, str], threading.Thread] = {}
        self._watching: set[tuple[str, str]] = set()
        self._stopping: set[tuple[str, str]] = set()
        self._python_of: dict[str, str] = {}  # image id -> its interpreter (labels never change)
        self._engine_down_since: float | None = None

    def close(self) -> None:
        if self._builder is not None:
            self._builder.close()
        self.leases.close()

    # -- shared state ---------------------------------------------------------------------------

    def _launcher(self, run: AgentRun) -> ContainerLauncher | ProcessLauncher:
        return self.processes if run.record.launcher == "process" else self.containers

    def _gpu_state(self) -> Any:
        if self._gpus is None:
            from ..gpu import Topology, inventory

            found = inventory()
            self._gpus = (found, Topology.from_dict(found.topology_dict()) if found.gpus else None)
        return self._gpus

    @property
    def builder(self) -> Any:
        with self._lock:
            if self._builder is None:
                from ..build import Builder

                self._builder = Builder(self.home, engine=self.engine)
            return self._builder

    def prewarm(self) -> None:
        """Pay the one-off imports (docker SDK, the builder) before the first run asks for them."""
        _ = self.containers.api, self.builder

    def _holds(self, lease: Lease) -> bool:
        """A lease stays while its run is being launched or runs; ended or vanished runs lose it."""
        key = (lease.holder, lease.run_id)
        thread = self._preparing.get(key)
        if thread is not None and thread.is_alive():
            return True
        return self.events.status(Path(lease.holder), lease.run_id) == RunStatus.RUNNING

    # -- dispatching ----------------------------------------------------------------------------

    def dispatch(self, queued: Sequence[AgentRun], running: Sequence[AgentRun]) -> None:
        self.leases.reclaim(self._holds)
        busy = Counter((str(r.workspace), r.target.name) for r in running)
        waiting_gpu: list[AgentRun] = []
        listed = {r.key for r in queued}
        for key, thread in list(self._preparing.items()):
            if key not in listed and not thread.is_alive():
                del self._preparing[key]  # this pass already sees what its launch recorded
        for run in queued:
            target = (str(run.workspace), run.target.name)
            thread = self._preparing.get(run.key)
            if thread is not None:
                if thread.is_alive():  # its thread honours a cancel itself
                    busy[target] += 1
                    continue
                # Its launch ended since: this pass's row may predate what the launch recorded.
                del self._preparing[run.key]
                try:
                    run = self.events.refresh(run)
                except DockyardError:
                    continue
                if run.record.status != RunStatus.QUEUED:
                    busy[target] += run.record.status == RunStatus.RUNNING
                    continue
            if run.record.cancel_requested:
                self.events.canceled(run)
                continue
            if busy[target] >= run.target.max_nodes:
                self.events.waiting(run, f"compute target {run.target.name} is full ({run.target.max_nodes} at once)")
                continue
            if run.record.gpu_count:
                waiting_gpu.append(run)
                continue
            busy[target] += 1
            self._spawn(run, ())
        if waiting_gpu:
            self._start_gpu_runs(waiting_gpu, running, busy)

    def _start_gpu_runs(self, waiting: list[AgentRun], running: Sequence[AgentRun], busy: Counter) -> None:
        """One plan over every workspace's waiting GPU runs: one queue, priority then submit time."""
        from ..gpu import Active, GpuRequest, Waiting, plan

        found, topology = self._gpu_state()
        if topology is None:
            for run in waiting:
                self.events.waiting(run, f"needs {run.record.gpu_count} GPU(s); this machine has none")
            return
        free = frozenset(g.uuid for g in found.gpus) - set(self.leases.held())
        active = []
        for r in running:
            if r.record.gpus:
                limit = GpuRequest.from_dict(r.record.gpu_request).time_limit_s
                end = (r.record.started or r.record.created) + limit if limit else None
                active.append(Active(_plan_id(r), tuple(r.record.gpus), end))
        by_id = {_plan_id(r): r for r in waiting}
        queue = [Waiting(pid, GpuRequest.from_dict(r.record.gpu_request), r.record.created) for pid, r in by_id.items()]
        decision = plan(time.time(), topology, free, queue, active)
        for plan_id, gpus in decision.starts:
            run = by_id[plan_id]
            target = (str(run.workspace), run.target.name)
            if busy[target] >= run.target.max_nodes:
                self.events.waiting(run, f"compute target {run.target.name} is full ({run.target.max_nodes} at once)")
                continue
            try:
                self.leases.grant(run.id, gpus, str(run.workspace))
            except LeaseConflict:
                continue  # taken meanwhile (a lease left by an older agent): the next pass re-plans
            try:
                self.events.granted(run, gpus)
            except DockyardError:
                self.leases.release(run.id)  # never a lease without its run knowing
                raise
            busy[target] += 1
            self._spawn(run, tuple(gpus))
        for plan_id, reason in decision.reasons.items():
            if plan_id in by_id:
                self.events.waiting(by_id[plan_id], reason)

    def _spawn(self, run: AgentRun, gpus: tuple[str, ...]) -> None:
        thread = threading.Thread(target=self._launch, args=(run, gpus), name=f"launch-{run.id}", daemon=True)
        self._preparing[run.key] = thread
        thread.start()

    # -- launching ------------------------------------------------------------------------------

    def _launch(self, run: AgentRun, gpus: tuple[str, ...]) -> None:
        try:
            self._adopt_or_start(run, gpus)
        except _NotNow as exc:
            self.leases.release(run.id)  # the next pass tries again
            self.events.waiting(run, str(exc))
        except DockyardError as exc:
            self.leases.release(run.id)
            tail = getattr(exc, "log_tail", "")
            self.events.failed_to_start(run, f"{exc}" + (f"\n{tail}" if tail else ""))
            self.events.log(f"{run.id} failed to start: {exc}")
        except Exception as exc:  # noqa: BLE001 - a bug must fail one run, not the agent
            self.leases.release(run.id)
            self.events.failed_to_start(run, f"internal error: {type(exc).__name__}: {exc}")
            self.events.log(f"{run.id} failed to start (internal): {exc!r}")

    def _handle(self, run: AgentRun) -> LaunchHandle | None:
        record = run.record
        if record.launcher == "process":
            return LaunchHandle("process", str(record.pid)) if record.pid else None
        return LaunchHandle("container", record.container_id) if record.container_id else None

    def _adopt_or_start(self, run: AgentRun, gpus: tuple[str, ...]) -> None:
        """At most once per attempt: a holder an earlier agent started is adopted, not started again."""
        handle = self._handle(run)
        if handle is not None:
            launcher = self._launcher(run)
            if run.record.launcher == "process":
                self.processes.adopt(handle, str(run.record.folder.exit_code))
            seen = launcher.poll(handle)
            if seen.state in ("running", "exited"):
                self._running(run, handle, "adopted")
                return
            if seen.state == "unknown":  # not proven gone: starting it again could run it twice
                raise _NotNow(f"waiting to learn what became of its earlier start: {seen.reason}")
        self._prepare_and_start(run, gpus)

    def _prepare_and_start(self, run: AgentRun, gpus: tuple[str, ...]) -> None:
        record = run.record
        folder = record.folder
        if folder.work.exists():
            shutil.rmtree(folder.work)  # a launch interrupted by a crash: start clean
        self.snapshots.materialize(record.snapshot, folder.work)
        folder.prepare()
        env = Environment.from_dict(record.environment)
        variables = {
            **env.environment_variables,
            "DOCKYARD_RUN_ID": record.id,
            "DOCKYARD_EXPERIMENT": record.experiment,
            "PYTHONUNBUFFERED": "1",
            "CUDA_DEVICE_ORDER": "PCI_BUS_ID",
        }
        if record.launcher == "process":
            # Local processes are isolated by CUDA alone; "" hides every GPU from a CPU-only run.
            lib_parent = str(_library_dir().parent)
            variables.update({
                "CUDA_VISIBLE_DEVICES": ",".join(gpus),
                "DOCKYARD_METRICS_FILE": str(folder.metrics),
                "PYTHONPATH": os.pathsep.join(p for p in (lib_parent, os.environ.get("PYTHONPATH", "")) if p),
            })
            spec = LaunchSpec(record.id, (env.python.interpreter_path, record.script, *record.arguments), variables,
                              str(folder.work), str(folder.log), exit_code_path=str(folder.exit_code))
            handle = self.processes.launch(
                spec, on_created=lambda h: self.events.launched(run, pid=int(h.ref), image="(local process)"))
            self._running(run, handle, f"as local process {handle.ref}")
            return
        built = self.builder.ensure_image(env, progress=lambda line: self.events.log(f"{record.id}: {line}"))
        if self.events.cancel_requested(run):
            self.leases.release(run.id)
            self.events.canceled(run)
            return
        virtual = self._gpu_state()[0].virtual if gpus else False
        variables.update({
            # NVIDIA's runtime reads NVIDIA_VISIBLE_DEVICES; "void" gives a CPU-only run no GPU.
            "NVIDIA_VISIBLE_DEVICES": ",".join(gpus) if gpus else "void",
            "PYTHONPATH": CONTAINER_LIB,
            "DOCKYARD_METRICS_FILE": folder.container_metrics,
        })
        spec = LaunchSpec(
            record.id, (self._python(built, env), record.script, *record.arguments), variables, CONTAINER_WORK,
            folder.container_log, image=built.image, binds=tuple(folder.container_binds(_library_dir())),
            labels={"dockyard.workspace": str(run.workspace)}, device_ids=gpus if gpus and not virtual else (),
        )
        handle = self.containers.launch(
            spec, on_created=lambda h: self.events.launched(run, container_id=h.ref, image=built.image))
        self._running(run, handle, f"in container {handle.ref[:12]} ({built.image})")

    def _python(self, built: Any, env: Environment) -> str:
        """The interpreter the image's environment installed (its label), else the spec's."""
        python = self._python_of.get(built.image_id)
        if python is None:
            labels = self.engine.image_labels(built.image) or {}
            python = self._python_of[built.image_id] = labels.get("dockyard.python") or ""
        return python or env.python.interpreter_path

    def _running(self, run: AgentRun, handle: LaunchHandle, how: str) -> None:
        if not self.events.started(run):
            # Canceled (or ended) while it was being prepared: what just started must not run on.
            self.events.log(f"{run.id} was canceled while starting; stopping it")
            launcher = self._launcher(run)
            try:
                launcher.stop(handle, 0)
                launcher.remove(handle)
            finally:
                self.leases.release(run.id)
            return
        self.events.log(f"{run.id} running {how}")
        self._watch(run, handle)

    def _watch(self, run: AgentRun, handle: LaunchHandle) -> None:
        """Block on the holder's exit in a thread, so the loop notices an end at once."""
        with self._lock:
            if run.key in self._watching:
                return
            self._watching.add(run.key)
        launcher = self._launcher(run)

        def watch() -> None:
            try:
                launcher.wait(handle)
            finally:
                with self._lock:
                    self._watching.discard(run.key)
                self.wake()

        threading.Thread(target=watch, name=f"watch-{run.id}", daemon=True).start()

    # -- following ------------------------------------------------------------------------------

    def poll(self, run: AgentRun) -> None:
        self.events.ingest_metrics(run)
        handle = self._handle(run)
        if handle is None:
            self._finish(run, None, "the run has no container (it was lost while starting)")
            return
        launcher = self._launcher(run)
        if run.record.launcher == "process":
            self.processes.adopt(handle, str(run.record.folder.exit_code))
        seen = launcher.poll(handle)
        if seen.state == "unknown":
            now = time.monotonic()
            self._engine_down_since = self._engine_down_since or now
            if now - self._engine_down_since > ENGINE_GRACE_S:
                self._finish(run, None, f"the Docker Engine became unreachable: {seen.reason}")
            return
        if run.record.launcher == "container":
            self._engine_down_since = None
        if seen.state == "running":
            if run.record.cancel_requested:
                self._stop(run, handle)
            else:
                self._watch(run, handle)  # an adopted run: follow its exit too
            return
        self._finish(run, seen.exit_code, seen.reason)
        if seen.state == "exited":
            try:
                launcher.remove(handle)  # after the end is recorded: a waiter hears of it first
            except DockyardError as exc:
                self.events.log(f"{run.id}: could not remove its container: {exc}")

    def _stop(self, run: AgentRun, handle: LaunchHandle) -> None:
        """Stop a canceled run on a thread: a container gets seconds of grace, the loop none."""
        with self._lock:
            if run.key in self._stopping:
                return
            self._stopping.add(run.key)
        launcher = self._launcher(run)

        def stop() -> None:
            try:
                launcher.stop(handle, 5.0)
            except DockyardError as exc:
                self.events.log(f"{run.id}: stopping failed: {exc}")
            finally:
                with self._lock:
                    self._stopping.discard(run.key)
                self.wake()

        threading.Thread(target=stop, name=f"stop-{run.id}", daemon=True).start()

    def _finish(self, run: AgentRun, exit_code: int | None, reason: str = "") -> None:
        self.events.finished(run, exit_code, reason)
        self.leases.release(run.id)
