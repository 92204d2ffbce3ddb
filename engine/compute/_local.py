"""The ``local`` compute backend: this machine's engine and GPUs.

It decides which queued runs start now — each compute target's ``max_nodes``, and one GPU plan
(:func:`dockyard.gpu.plan`) over the GPU runs of every workspace, in one queue ordered by priority
then submit time — leases their GPUs, prepares each run on a thread (snapshot, image) and hands it
to a launcher (container or local process), then follows it to its true end.

What it believes comes from what holds the resource:

* A GPU lease is released only when the run's holder is proven gone: its container or process,
  found by the run's label or environment, is absent or exited. A holder that cannot be asked
  (the engine is down) keeps its lease.
* A run is started at most once per attempt: a holder that an earlier agent started (found by
  the recorded handle, or by the run's container name or process environment) is adopted.
* While the engine is unreachable, running runs stay ``Running`` (with the reason shown) and
  keep their GPUs; their true exit is collected when it answers. Queued runs wait for it.
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
from ..errors import BuildKitUnavailable, DockyardError, EngineUnavailable, EnvironmentProblem
from ..gpu import Lease, LeaseConflict, LeaseStore
from ..launch import ContainerLauncher, LaunchHandle, LaunchSpec, Observation, ProcessLauncher
from ..runs import RunRuntime, RunStatus, SnapshotStore
from ._backend import AgentRun, RunEvents
from ._spec import container_spec, library_dir, pythonpath, rank_command, rank_variables, run_variables

__all__ = ["LocalBackend"]

# Below this much free space under a run's folder, its output cannot be written.
_DISK_LOW_BYTES = 1 << 20
# Exit codes of a container stopped by its engine (SIGTERM, then SIGKILL) rather than ending itself.
_STOPPED_CODES = (137, 143)
# A run that had to wait (the engine down, an earlier start not known) is tried again after this.
_RETRY_S = 1.0
# How near an observed engine outage a container must have ended to have been stopped by it.
_OUTAGE_SLACK_S = 30.0


class _BuildLog:
    """A build a run waits for, written into the run's own output as it happens (as Azure ML keeps
    an image-build log with the run), and announced in the agent's log. A cache hit writes nothing."""

    def __init__(self, path: Path, announce: Callable[[str], None]) -> None:
        self._path = path
        self._announce = announce
        self._fh: Any = None

    def _write(self, line: str) -> None:
        try:
            if self._fh is None:
                self._announce("building its environment's image (its progress is in the run's output)")
                self._fh = open(self._path, "ab", buffering=0)  # closed by done() or failed()
                self._fh.write(b"dockyard: building the environment's image before the run starts\n")
            self._fh.write(line.encode("utf-8", "replace") + b"\n")
        except OSError:
            pass  # a full disk: the build goes on, its output is only for reading

    def note(self, line: str) -> None:
        self._write(f"dockyard: {line}")

    def event(self, event: Any) -> None:
        self._write(event.plain())

    def done(self, built: Any) -> None:
        if self._fh is not None:
            self._write(f"dockyard: {built.image} built in {built.seconds:.1f}s; the run starts")
            self._announce(f"built {built.image} in {built.seconds:.1f}s")
            self._close()

    def failed(self, error: Exception) -> None:
        self._write(f"dockyard: the build failed: {error}")
        self._close()

    def _close(self) -> None:
        try:
            self._fh.close()
        except (OSError, AttributeError):
            pass
        self._fh = None


class _NotNow(Exception):
    """A queued run cannot be started this pass (the reason is shown); it stays queued."""


def _plan_id(run: AgentRun) -> str:
    # Run ids are unique within a workspace; the plan sees every workspace's runs at once.
    return f"{run.workspace.name}/{run.id}"


def _holds_exit_code(path: Path) -> bool:
    """Whether a process run's exit code file holds a code (its wrapper ended), not the placeholder."""
    try:
        return path.read_text().strip().lstrip("-").isdigit()
    except OSError:
        return False


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _clock(t: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(t))


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
        self._engine_down_since: float | None = None  # wall clock
        self._outages: list[tuple[float, float]] = []  # (from, to), wall clock, most recent last
        self._disk_low: dict[tuple[str, str], str] = {}  # run -> what was seen while it ran
        self._closing = False
        self._said_trouble = ""
        self._holding: set[tuple[str, str]] = set()  # runs whose holder this agent started
        self._created: dict[tuple[str, str], str] = {}  # containers created, not (yet) started
        self._retry_at: dict[tuple[str, str], float] = {}  # runs that wait: when to try again

    def close(self) -> None:
        """The agent stops: launches still on their way are left to the next agent (never failed)."""
        self._closing = True
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

    def _shared_cache(self, runtime: RunRuntime) -> dict[str, Any]:
        """``ensure_image``'s ``shared`` for a run: the shared cache its submit saw (runs from
        before that was recorded use the agent's own setting)."""
        if runtime.shared_cache is None:
            return {}
        registry, username, password_env = runtime.shared_cache
        return {"shared": self.builder.registry(registry, username=username or None,
                                                password_env=password_env or None)}

    def prewarm(self) -> None:
        """Pay the one-off imports (docker SDK, the builder) before the first run asks for them."""
        _ = self.containers.api, self.builder

    # -- who holds the GPUs -------------------------------------------------------------------

    def _reclaim(self) -> None:
        """Release the leases whose holder is proven gone; keep every other (unknown keeps)."""
        live: dict[str, set[str] | None] = {}

        def live_runs(kind: str) -> set[str] | None:
            if kind not in live:  # asked at most once per pass, and only when a lease needs it
                live[kind] = (self.containers if kind == "container" else self.processes).live_runs()
            return live[kind]

        def holds(lease: Lease) -> bool:
            key = (lease.holder, lease.run_id)
            thread = self._preparing.get(key)
            if (thread is not None and thread.is_alive()) or key in self._watching:
                return True  # being launched, or its holder's exit has not been seen yet
            record = self.events.record(Path(lease.holder), lease.run_id)
            kinds = (record.launcher,) if record is not None else ("container", "process")
            for kind in kinds:
                found = live_runs(kind)
                if found is None or lease.run_id in found:
                    return True  # alive, or its holder cannot be asked: unknown keeps the lease
            return False

        for gpu in self.leases.reclaim(holds):
            self.events.log(f"GPU {gpu} released: its run's holder is gone")

    # -- dispatching ----------------------------------------------------------------------------

    def dispatch(self, queued: Sequence[AgentRun], running: Sequence[AgentRun]) -> None:
        gpu_trouble = ""
        try:
            self._reclaim()
            held = self.leases.held()
        except EnvironmentProblem as exc:  # a damaged lease store stops GPU runs, not the others
            gpu_trouble, held = f"the GPU leases cannot be read: {exc.message} (run `dockyard doctor`)", {}
            if gpu_trouble != self._said_trouble:  # once, not every pass
                self.events.log(gpu_trouble)
        self._said_trouble = gpu_trouble
        leased: dict[str, list[str]] = {}
        for gpu, run_id in held.items():
            leased.setdefault(run_id, []).append(gpu)
        busy = Counter((str(r.workspace), r.target.name) for r in running)
        listed = {r.key for r in queued}
        for key, thread in list(self._preparing.items()):
            if key not in listed and not thread.is_alive():
                del self._preparing[key]  # this pass already sees what its launch recorded
        waiting_gpu: list[AgentRun] = []
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
            if self._retry_at.get(run.key, 0.0) > time.monotonic():
                continue  # its last attempt had to wait (the engine, an unknown earlier start): not every pass
            if busy[target] >= run.target.max_nodes:
                self.events.note(run, f"compute target {run.target.name} is full ({run.target.max_nodes} at once)")
                continue
            if run.record.gpu_count:
                if gpu_trouble:
                    self.events.note(run, gpu_trouble)
                elif run.id in leased:
                    # An earlier agent granted these GPUs and may have started the run on them.
                    busy[target] += 1
                    self._spawn(run, tuple(sorted(leased[run.id])))
                else:
                    waiting_gpu.append(run)
                continue
            busy[target] += 1
            self._spawn(run, ())
        if waiting_gpu:
            self._start_gpu_runs(waiting_gpu, running, busy, held)

    def _start_gpu_runs(self, waiting: list[AgentRun], running: Sequence[AgentRun], busy: Counter,
                        held: dict[str, str]) -> None:
        """One plan over every workspace's waiting GPU runs: one queue, priority then submit time."""
        from ..gpu import Active, GpuRequest, Policy, Waiting, plan

        found, topology = self._gpu_state()
        if topology is None:
            for run in waiting:
                self.events.note(run, f"needs {run.record.gpu_count} GPU(s); this machine has none")
            return
        free = frozenset(g.uuid for g in found.gpus) - set(held)
        active = []
        for r in running:
            if r.record.gpus:
                limit = GpuRequest.from_dict(r.record.gpu_request).time_limit_s
                end = (r.record.started or r.record.created) + limit if limit else None
                # Its start lets the policy guess the end of a run without a time limit.
                active.append(Active(_plan_id(r), tuple(r.record.gpus), end, str(r.workspace), r.record.started))
        by_id = {_plan_id(r): r for r in waiting}
        # Each run is charged to its workspace: the fair share compares workspaces.
        queue = [Waiting(pid, GpuRequest.from_dict(r.record.gpu_request), r.record.created, str(r.workspace))
                 for pid, r in by_id.items()]
        try:
            policy = Policy.from_env(os.environ)  # DOCKYARD_RESERVE_*, DOCKYARD_SHORT_FIRST*, DOCKYARD_FAIR_SHARE
        except DockyardError as exc:
            for run in waiting:
                self.events.note(run, f"the queue settings are invalid: {exc}")
            return
        decision = plan(time.time(), topology, free, queue, active, policy)
        for plan_id, gpus in decision.starts:
            run = by_id[plan_id]
            target = (str(run.workspace), run.target.name)
            if busy[target] >= run.target.max_nodes:
                self.events.note(run, f"compute target {run.target.name} is full ({run.target.max_nodes} at once)")
                continue
            try:
                self.leases.grant(run.id, gpus, str(run.workspace))
            except LeaseConflict:
                continue  # taken meanwhile: the next pass re-plans
            try:
                self.events.granted(run, gpus)
            except DockyardError:
                self.leases.release(run.id)  # never a lease without its run knowing
                raise
            busy[target] += 1
            self._spawn(run, tuple(gpus))
        for plan_id, reason in decision.reasons.items():
            if plan_id in by_id:
                self.events.note(by_id[plan_id], reason)

    def _spawn(self, run: AgentRun, gpus: tuple[str, ...]) -> None:
        thread = threading.Thread(target=self._launch, args=(run, gpus), name=f"launch-{run.id}", daemon=True)
        self._preparing[run.key] = thread
        thread.start()

    # -- launching ------------------------------------------------------------------------------

    def _release(self, run: AgentRun) -> None:
        try:
            self.leases.release(run.id)
        except EnvironmentProblem as exc:
            self.events.log(f"{run.id}: its GPU leases could not be released now ({exc.message}); "
                            "the next pass releases them once its holder is proven gone")

    def _launch(self, run: AgentRun, gpus: tuple[str, ...]) -> None:
        try:
            self._adopt_or_start(run, gpus)
        except _NotNow as exc:
            self._not_started(run, note=str(exc))
        except (EngineUnavailable, BuildKitUnavailable) as exc:
            # Not the run's fault, and not final: it waits for the engine (the reason says so).
            self._not_started(run, note=f"waiting for the Docker Engine: {exc.message}")
        except DockyardError as exc:
            tail = getattr(exc, "log_tail", "")
            self._not_started(run, failure=f"{exc}" + (f"\n{tail}" if tail else ""))
        except Exception as exc:  # noqa: BLE001 - a bug must fail one run, not the agent
            self._not_started(run, failure=f"internal error: {type(exc).__name__}: {exc}")

    def _not_started(self, run: AgentRun, *, note: str = "", failure: str = "") -> None:
        """A launch that did not start its run: the run waits again (``note``) or fails (``failure``),
        unless the agent is stopping under it; the next agent then takes it over as it stands.

        If its holder was started after all (what failed came after, e.g. recording it on a full
        disk), nothing is released or failed: a later pass finds the holder and follows it."""
        if self._closing:
            return
        with self._lock:
            started = run.key in self._holding
            created = self._created.pop(run.key, None) is not None
        if started:
            self.events.log(f"{run.id}: {(failure or note).splitlines()[0]}; it was started, and is followed as it is")
            return
        if not failure:
            self._retry_at[run.key] = time.monotonic() + _RETRY_S
        if created and not failure:
            # Created, and then the engine could not be asked: it may hold the GPUs. Keep them until
            # a pass learns what became of it (the handle is recorded, or found by the run's name).
            self.events.note(run, note)
            return
        self._release(run)  # nothing holds them
        if failure:
            self.events.failed_to_start(run, failure)
            self.events.log(f"{run.id} failed to start: {failure.splitlines()[0]}")
        else:
            self.events.note(run, note)

    def _handle(self, run: AgentRun) -> LaunchHandle | None:
        record = run.record
        if record.launcher == "process":
            return LaunchHandle("process", str(record.pid), record.id) if record.pid else None
        return LaunchHandle("container", record.container_id, record.id) if record.container_id else None

    def _existing_holder(self, run: AgentRun) -> LaunchHandle | None:
        """A holder an earlier attempt started: by its recorded handle, else by the run's name/environment.

        Raises:
            _NotNow: the engine cannot say (starting again could run the script twice).
        """
        launcher = self._launcher(run)
        handle = self._handle(run)
        if handle is not None:
            if run.record.launcher == "process":
                self.processes.adopt(handle, str(run.record.folder.exit_code))
            seen = launcher.poll(handle)
            if seen.state in ("running", "exited"):
                return handle
            if seen.state == "unknown":
                raise _NotNow(f"waiting to learn what became of its earlier start: {seen.reason}")
        try:
            found = launcher.find(run.id)
        except (EngineUnavailable, EnvironmentProblem) as exc:
            raise _NotNow(f"waiting to learn whether it was started already: {exc.message}") from exc
        if run.record.launcher == "process":
            exit_file = run.record.folder.exit_code
            if found is None and _holds_exit_code(exit_file):
                # It ran and ended while its start could not be recorded: its exit code says so.
                found = LaunchHandle("process", str(run.record.pid or 0), run.id)
            if found is not None:
                self.processes.adopt(found, str(exit_file))
        return found

    def _adopt_or_start(self, run: AgentRun, gpus: tuple[str, ...]) -> None:
        """At most once per attempt: a holder an earlier agent started is adopted, not started again."""
        found = self._existing_holder(run)
        if found is not None:
            if found.ref != (run.record.container_id or str(run.record.pid or "")):
                self._recorded(run, found, run.record.image)
            self._running(run, found, "adopted")
            return
        self._prepare_and_start(run, gpus)

    def _recorded(self, run: AgentRun, handle: LaunchHandle, image: str) -> None:
        """The holder exists: record it (before it can do anything) with the GPUs it holds.

        Never raises: if the store cannot be written (a full disk), the holder is still found by
        the run's name or environment, and its GPUs stay leased."""
        with self._lock:
            if handle.kind == "process":  # a process runs from the moment it exists
                self._holding.add(run.key)
            else:  # a container is created, and started only if its start succeeds
                self._created[run.key] = handle.ref
        try:
            if handle.kind == "process":
                self.events.launched(run, pid=int(handle.ref), image="(local process)")
            else:
                self.events.launched(run, container_id=handle.ref, image=image)
        except EnvironmentProblem as exc:
            self.events.log(f"{run.id}: its {handle} could not be recorded now: {exc.message}")
        try:
            self.leases.note_holder(run.id, f"{handle.kind}:{handle.ref}")
        except EnvironmentProblem as exc:
            self.events.log(f"{run.id}: its holder could not be noted in the lease audit: {exc.message}")

    def _prepare_and_start(self, run: AgentRun, gpus: tuple[str, ...]) -> None:
        record = run.record
        folder = record.folder
        if folder.work.exists():
            shutil.rmtree(folder.work)  # an attempt that never started: start clean
        self.snapshots.materialize(record.snapshot, folder.work)
        folder.prepare()
        env = Environment.from_dict(record.environment)
        runtime = RunRuntime.from_dict(record.runtime)
        if record.launcher == "process":
            folder.link_outputs()  # ./outputs is collected as a container run's is
            variables = run_variables(record.id, record.experiment, env, runtime)
            argv: tuple[str, ...] = (env.python.interpreter_path, record.script, *record.arguments)
            if runtime.distributed is not None:  # one node's processes share this machine's network
                variables.update(rank_variables(runtime.distributed, 0, "127.0.0.1", _free_port()))
                argv = rank_command(argv, runtime.distributed, 0)
            # Local processes are isolated by CUDA alone; "" hides every GPU from a CPU-only run.
            variables.update({
                "CUDA_VISIBLE_DEVICES": ",".join(gpus),
                "DOCKYARD_METRICS_FILE": str(folder.metrics),
                "PYTHONPATH": pythonpath(str(library_dir().parent), env),
            })
            spec = LaunchSpec(record.id, argv, variables,
                              str(folder.work), str(folder.log), exit_code_path=str(folder.exit_code))
            handle = self.processes.launch(spec, on_created=lambda h: self._recorded(run, h, ""))
            self._running(run, handle, f"as local process {handle.ref}")
            return
        build_log = _BuildLog(folder.log, lambda line: self.events.log(f"{record.id}: {line}"))
        try:
            built = self.builder.ensure_image(env, progress=build_log.note, on_event=build_log.event,
                                              **self._shared_cache(runtime))
        except DockyardError as exc:
            build_log.failed(exc)
            raise
        build_log.done(built)
        fresh = self.events.record(run.workspace, run.id)
        # Canceled during the build: asked for (a running run), or done at once (a queued one is
        # Canceled by whoever cancels it): the container is never made.
        if fresh is None or fresh.cancel_requested or fresh.final:
            self._release(run)
            self.events.canceled(run)
            return
        virtual = self._gpu_state()[0].virtual if gpus else False
        argv = (self._python(built, env), record.script, *record.arguments)
        ranks: dict[str, str] = {}
        if runtime.distributed is not None:  # one node: its processes meet in the container's own network
            ranks = rank_variables(runtime.distributed, 0, "127.0.0.1", 29500)
            argv = rank_command(argv, runtime.distributed, 0)
        spec = container_spec(record.id, record.experiment, argv, env, runtime, folder, image=built.image, gpus=gpus,
                              virtual=virtual, labels={"dockyard.workspace": str(run.workspace)}, variables=ranks)
        handle = self.containers.launch(spec, on_created=lambda h: self._recorded(run, h, built.image))
        self._running(run, handle, f"in container {handle.ref[:12]} ({built.image})")

    def _python(self, built: Any, env: Environment) -> str:
        """The interpreter the image's environment installed (its label), else the spec's."""
        python = self._python_of.get(built.image_id)
        if python is None:
            labels = self.engine.image_labels(built.image) or {}
            python = self._python_of[built.image_id] = labels.get("dockyard.python") or ""
        return python or env.python.interpreter_path

    def _running(self, run: AgentRun, handle: LaunchHandle, how: str) -> None:
        with self._lock:  # its holder runs: from now on nothing may release its GPUs but its end
            self._holding.add(run.key)
            self._created.pop(run.key, None)
            self._retry_at.pop(run.key, None)
        self._check_disk(run)  # a full disk is seen from the start: the run may end before it is recorded
        try:
            started = self.events.started(run)
        except EnvironmentProblem as exc:  # it runs, whatever the store says: follow it, record it later
            self.events.log(f"{run.id} running {how}, but not recorded yet: {exc.message}")
            self._watch(run, handle)
            return
        if not started and self.events.status(run.workspace, run.id) != RunStatus.RUNNING:
            # Canceled (or ended) while it was being prepared: what just started must not run on.
            self.events.log(f"{run.id} was canceled while starting; stopping it")
            launcher = self._launcher(run)
            try:
                launcher.stop(handle, 0)
                launcher.remove(handle)
            except DockyardError as exc:
                self.events.log(f"{run.id}: stopping it failed ({exc}); its GPUs stay leased until it is gone")
                return
            with self._lock:
                self._holding.discard(run.key)
            self._release(run)
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
        try:
            self.events.ingest_metrics(run)
        except EnvironmentProblem as exc:  # e.g. a full disk: following the run matters more
            self.events.log(f"{run.id}: its metrics could not be stored now: {exc.message}")
        launcher = self._launcher(run)
        handle = self._handle(run)
        if handle is None:
            try:
                handle = launcher.find(run.id)
            except EnvironmentProblem as exc:
                self._engine_unreachable(run, exc.message)
                return
            if handle is None and run.record.launcher == "process" and _holds_exit_code(run.record.folder.exit_code):
                # It ended before its pid was recorded (its agent was killed right after starting
                # it, and the next one adopted it by its exit code): the exit code is the truth.
                handle = LaunchHandle("process", "0", run.id)
            if handle is None:
                self._finish(run, None, "the run has no container or process (it was lost while starting)")
                return
            self._recorded(run, handle, run.record.image)
        if run.record.launcher == "process":
            self.processes.adopt(handle, str(run.record.folder.exit_code))
        seen = launcher.poll(handle)
        if seen.state == "unknown":
            self._engine_unreachable(run, seen.reason)
            return
        if run.record.launcher == "container":
            self._engine_answers(run)
        self._check_disk(run)
        if seen.state == "running":
            if run.record.cancel_requested:
                self._stop(run, handle)
            else:
                self._watch(run, handle)  # an adopted run: follow its exit too
            return
        self._finish(run, seen.exit_code, self._reason(run, seen))
        if seen.state == "exited":
            try:
                launcher.remove(handle)  # after the end is recorded: a waiter hears of it first
            except DockyardError as exc:
                self.events.log(f"{run.id}: could not remove its container: {exc}")

    def _engine_unreachable(self, run: AgentRun, reason: str) -> None:
        now = time.time()
        if self._engine_down_since is None:
            self._engine_down_since = now
            self.events.log(f"the Docker Engine is unreachable: {reason}; runs keep their GPUs until it answers")
        self.events.note(run, f"the Docker Engine is unreachable since {_clock(self._engine_down_since)} ({reason}); "
                              "the run is followed again when it answers, and keeps its GPUs")

    def _engine_answers(self, run: AgentRun) -> None:
        if self._engine_down_since is not None:
            self._outages = [*self._outages[-19:], (self._engine_down_since, time.time())]
            self.events.log(f"the Docker Engine answers again (unreachable since {_clock(self._engine_down_since)})")
            self._engine_down_since = None
        if run.record.reason.startswith("the Docker Engine is unreachable"):
            self.events.note(run, "")

    def _check_disk(self, run: AgentRun) -> None:
        """Remember a full disk under a running run's folder: its output then cannot be written."""
        try:
            stats = os.statvfs(run.record.folder.root)
        except OSError:
            return
        if stats.f_bavail * stats.f_frsize < _DISK_LOW_BYTES:
            self._disk_low.setdefault(run.key, f"no space left on device under {run.record.folder.root}")

    def _reason(self, run: AgentRun, seen: Observation) -> str:
        """Why a run ended as it did, in words: the engine's restart, a full disk, or the script."""
        self._check_disk(run)
        disk = self._disk_low.get(run.key, "")  # kept until the end is recorded (a full disk may refuse it)
        code = seen.exit_code
        if seen.state == "exited" and code in _STOPPED_CODES and seen.finished_at is not None:
            for start, end in self._outages:
                if start - _OUTAGE_SLACK_S <= seen.finished_at <= end + _OUTAGE_SLACK_S:
                    return (f"stopped when the Docker Engine restarted (exit code {code}, at "
                            f"{_clock(seen.finished_at)}); the script did not finish")
        if disk and code != 0:
            what = f"the script exited with code {code}" if code is not None else seen.reason
            return f"{disk} while it ran, so its output could not all be written ({what})"
        return seen.reason

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
        self._disk_low.pop(run.key, None)
        with self._lock:
            self._holding.discard(run.key)
        self._release(run)
