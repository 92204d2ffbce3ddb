"""The agent: one background process per dockyard home that starts queued runs when their compute
target has room, follows them, records what happened and cleans up.

Crash safety comes from where state lives, not from the agent: a run's output goes straight from
the container (or process) into files under its run folder, its metrics into an append-only file,
its exit code into Docker (or, for local processes, a file the wrapper shell writes). A restarted
agent therefore adopts running containers and processes, resumes metric ingestion at the recorded
offset, and marks runs whose container or process vanished ``Failed`` with the reason.
Two agents never run at once: each holds an exclusive ``flock`` on ``<home>/agent.lock``, which
the kernel releases even on ``kill -9``.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from ._engine import EngineAddress
from ._leases import LeaseConflict, LeaseStore
from ._runstore import RunRecord, RunStore
from .errors import DockyardError, EngineUnavailable, EnvironmentProblem

__all__ = ["Agent", "LOCAL_COMPUTE", "agent_status", "default_max_nodes", "ensure_agent", "stop_agent"]

LOCAL_COMPUTE = "local"
CONTAINER_LIB = "/opt/dockyard/lib"
CONTAINER_WORK = "/workspace"
CONTAINER_META = "/dockyard/meta"
# How long the engine may be unreachable before running container runs are marked Failed.
ENGINE_GRACE_S = float(os.environ.get("DOCKYARD_ENGINE_GRACE_S", "15"))


def default_max_nodes() -> int:
    """Runs the implicit ``local`` compute target executes at once (``DOCKYARD_LOCAL_MAX_RUNS``)."""
    raw = os.environ.get("DOCKYARD_LOCAL_MAX_RUNS")
    return max(1, int(raw)) if raw and raw.isdigit() else max(1, os.cpu_count() or 1)


def _library_dir() -> Path:
    """dockyard's own package folder, mounted read-only into containers for the in-run API."""
    import dockyard

    return Path(dockyard.__file__).resolve().parent


# -- agent lifecycle --------------------------------------------------------------------------------


def _lock_path(home: Path) -> Path:
    return Path(home) / "agent.lock"


def agent_status(home: Path) -> dict[str, Any]:
    """``{"running": bool, "pid": int|None, "log": path}`` without disturbing a running agent."""
    home = Path(home)
    home.mkdir(parents=True, exist_ok=True)
    with open(_lock_path(home), "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid_text = (home / "agent.pid").read_text().strip() if (home / "agent.pid").exists() else ""
            return {"running": True, "pid": int(pid_text) if pid_text.isdigit() else None, "log": str(home / "agent.log")}
        fcntl.flock(fh, fcntl.LOCK_UN)
    return {"running": False, "pid": None, "log": str(home / "agent.log")}


def ensure_agent(home: Path, *, images_home: Path | None = None, wait: float = 10.0) -> dict[str, Any]:
    """Start the agent for the workspace folder ``home`` unless one runs; return its status."""
    status = agent_status(home)
    if status["running"]:
        if status["pid"]:
            try:
                os.kill(status["pid"], signal.SIGUSR1)  # "there is work": no waiting for the next poll
            except ProcessLookupError:
                pass
        return status
    log = open(Path(home) / "agent.log", "ab")
    try:
        subprocess.Popen(
            [sys.executable, "-m", "dockyard._agent", "--workspace-dir", str(home),
             *(["--home", str(images_home)] if images_home is not None else [])],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # outlives the submitting process and its Ctrl-C
            close_fds=True,
        )
    finally:
        log.close()
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        status = agent_status(home)
        if status["running"]:
            return status
        time.sleep(0.05)
    return status


def stop_agent(home: Path, *, wait: float = 10.0) -> bool:
    """Ask the agent to stop (SIGTERM); runs keep running and are adopted by the next agent."""
    status = agent_status(home)
    if not status["running"] or not status["pid"]:
        return False
    try:
        os.kill(status["pid"], signal.SIGTERM)
    except ProcessLookupError:
        return False
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline and agent_status(home)["running"]:
        time.sleep(0.05)
    return True


# -- the agent --------------------------------------------------------------------------------------


class Agent:
    """One reconcile loop over the run store. Use :meth:`serve` (holds the lock) or :meth:`step`."""

    def __init__(
        self, workspace_dir: Path, *, home: Path | None = None, engine: EngineAddress | None = None, poll: float = 0.2
    ) -> None:
        from ._home import dockyard_home

        self.workspace_dir = Path(workspace_dir)  # runs, their folders, the agent lock
        self.home = Path(home) if home is not None else dockyard_home()  # images and snapshots, shared
        self.store = RunStore(self.workspace_dir)
        self.leases = LeaseStore(self.home)  # machine-wide: shared with other workspaces' agents
        self.holder = str(self.workspace_dir)
        self._gpus: Any = None  # (inventory, topology), read once per agent
        self.engine = engine or EngineAddress.from_env()
        self.poll = poll
        self._preparing: dict[str, threading.Thread] = {}
        self._children: dict[str, subprocess.Popen[bytes]] = {}
        self._engine_down_since: float | None = None
        self._stop = threading.Event()
        self._wake = threading.Event()  # set by SIGUSR1 (a submit) or by a run that just ended
        self._log_lock = threading.Lock()

    def log(self, message: str) -> None:
        with self._log_lock:
            sys.stdout.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {message}\n")
            sys.stdout.flush()

    def serve(self) -> int:
        """Hold the agent lock and loop until SIGTERM/SIGINT. Returns 0, or 1 if another agent runs."""
        self.workspace_dir.mkdir(parents=True, exist_ok=True)
        lock = open(_lock_path(self.workspace_dir), "a+")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.log("another agent already serves this home; exiting")
            return 1
        (self.workspace_dir / "agent.pid").write_text(str(os.getpid()))
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: (self._stop.set(), self._wake.set()))
        signal.signal(signal.SIGUSR1, lambda *_: self._wake.set())
        self.log(f"agent {os.getpid()} serving {self.workspace_dir}")
        while not self._stop.is_set():
            try:
                self.step()
            except Exception as exc:  # noqa: BLE001 - the agent keeps serving whatever one pass hit
                self.log(f"pass failed: {type(exc).__name__}: {exc}")
            # Polling is the fallback; submits (SIGUSR1) and container exits wake the loop at once.
            self._wake.wait(self.poll)
            self._wake.clear()
        self.log("agent stopping; running runs keep running and will be adopted")
        return 0

    # -- one pass ---------------------------------------------------------------------------------

    def step(self) -> None:
        """Follow running runs, honour cancels, reclaim orphaned GPU leases, start what fits."""
        for record in self.store.list(statuses=("Running",), limit=10_000):
            self._follow(record)
        self.leases.reclaim(self.holder, self._holds_gpus)
        self._start_queued()

    def _holds_gpus(self, run_id: str) -> bool:
        """A lease stays while its run is launching or running; ended or vanished runs lose it."""
        if run_id in self._preparing and self._preparing[run_id].is_alive():
            return True
        try:
            return self.store.get(run_id).status == "Running"
        except DockyardError:
            return False

    def _gpu_state(self) -> Any:
        if self._gpus is None:
            from ._gpu import inventory
            from ._sched import Topology

            found = inventory()
            self._gpus = (found, Topology.from_dict(found.topology_dict()) if found.gpus else None)
        return self._gpus

    def _capacity(self, compute: str) -> int:
        found = self.store.compute(compute)
        if found is not None:
            return found.max_nodes
        return default_max_nodes() if compute == LOCAL_COMPUTE else 0

    def _start_queued(self) -> None:
        running = self.store.list(statuses=("Running",), limit=10_000)
        busy: dict[str, int] = {}
        for r in running:
            busy[r.compute] = busy.get(r.compute, 0) + 1
        for run_id, thread in list(self._preparing.items()):
            if not thread.is_alive():
                del self._preparing[run_id]
        waiting_gpu: list[RunRecord] = []
        for record in self.store.queued():
            if record.id in self._preparing:
                busy[record.compute] = busy.get(record.compute, 0) + 1
                continue
            if record.cancel_requested:
                self.store.transition(record.id, "Canceled", ended=time.time(), reason="canceled before it started")
                continue
            if busy.get(record.compute, 0) >= self._capacity(record.compute):
                self._set_reason(record, f"compute target {record.compute} is full ({self._capacity(record.compute)} at once)")
                continue
            if record.gpu_count:
                waiting_gpu.append(record)
                continue
            busy[record.compute] = busy.get(record.compute, 0) + 1
            self._spawn(record, ())
        if waiting_gpu:
            self._start_gpu_runs(waiting_gpu, running)

    def _spawn(self, record: RunRecord, gpus: tuple[str, ...]) -> None:
        thread = threading.Thread(target=self._launch, args=(record, gpus), name=f"launch-{record.id}", daemon=True)
        self._preparing[record.id] = thread
        thread.start()

    def _set_reason(self, record: RunRecord, reason: str) -> None:
        if record.reason != reason:
            self.store.update(record.id, reason=reason)

    def _start_gpu_runs(self, waiting: list[RunRecord], running: list[RunRecord]) -> None:
        """Ask the placement policy which waiting GPU runs start now, on which GPUs."""
        from ._sched import Active, Waiting, plan
        from ._workflow import _gpu_request_of

        found, topology = self._gpu_state()
        if topology is None:
            for record in waiting:
                self._set_reason(record, f"needs {record.gpu_count} GPU(s); this machine has none")
            return
        held = self.leases.held()
        free = frozenset(g.uuid for g in found.gpus) - set(held)
        active = []
        for r in running:
            if r.gpus:
                limit = r.gpu_request.get("time_limit_s")
                active.append(Active(r.id, tuple(r.gpus), (r.started or r.created) + limit if limit else None))
        queue = [Waiting(r.id, _gpu_request_of(r.gpu_request), r.created) for r in waiting]
        decision = plan(time.time(), topology, free, queue, active)
        by_id = {r.id: r for r in waiting}
        for run_id, gpus in decision.starts:
            try:
                self.leases.grant(run_id, gpus, self.holder)
            except LeaseConflict:
                continue  # another workspace's agent took one first: next pass re-plans
            try:
                self.store.update(run_id, gpus=list(gpus))
            except DockyardError:
                self.leases.release(run_id)  # never a lease without its run knowing
                raise
            self._spawn(by_id[run_id], tuple(gpus))
        for run_id, reason in decision.reasons.items():
            if run_id in by_id:
                self._set_reason(by_id[run_id], reason)

    # -- launching --------------------------------------------------------------------------------

    def _launch(self, record: RunRecord, gpus: tuple[str, ...] = ()) -> None:
        try:
            self._prepare_and_start(record, gpus)
        except DockyardError as exc:
            self.leases.release(record.id)
            tail = getattr(exc, "log_tail", "")
            reason = f"{exc}" + (f"\n{tail}" if tail else "")
            self.store.transition(record.id, "Failed", ended=time.time(), reason=reason)
            self.log(f"{record.id} failed to start: {exc}")
        except Exception as exc:  # noqa: BLE001 - a bug must fail one run, not the agent
            self.leases.release(record.id)
            self.store.transition(record.id, "Failed", ended=time.time(), reason=f"internal error: {type(exc).__name__}: {exc}")
            self.log(f"{record.id} failed to start (internal): {exc!r}")

    def _prepare_and_start(self, record: RunRecord, gpus: tuple[str, ...]) -> None:
        from ._builder import Builder
        from ._environment import Environment
        from ._snapshot import SnapshotStore

        run_dir = Path(record.run_dir)
        work, meta, outputs = run_dir / "work", run_dir / "meta", run_dir / "outputs"
        if work.exists():
            shutil.rmtree(work)  # a launch interrupted by a crash: start clean
        SnapshotStore(self.home / "snapshots").materialize(record.snapshot, work)
        meta.mkdir(parents=True, exist_ok=True)
        outputs.mkdir(parents=True, exist_ok=True)
        env = Environment.from_dict(record.environment)
        variables = {
            **env.environment_variables,
            "DOCKYARD_RUN_ID": record.id,
            "DOCKYARD_EXPERIMENT": record.experiment,
            "PYTHONUNBUFFERED": "1",
        }
        virtual = self._gpu_state()[0].virtual if gpus else False
        if not record.docker:
            # Local processes are isolated by CUDA alone; "" hides every GPU from a CPU-only run.
            variables.update({"CUDA_VISIBLE_DEVICES": ",".join(gpus), "CUDA_DEVICE_ORDER": "PCI_BUS_ID"})
            self._start_process(record, env, variables, work, meta)
            return
        # Containers: NVIDIA's runtime reads NVIDIA_VISIBLE_DEVICES; "void" gives a CPU-only run none.
        variables.update({"NVIDIA_VISIBLE_DEVICES": ",".join(gpus) if gpus else "void",
                          "CUDA_DEVICE_ORDER": "PCI_BUS_ID"})
        builder = Builder(self.home, engine=self.engine)
        try:
            built = builder.ensure_image(env, progress=lambda line: self.log(f"{record.id}: {line}"))
        finally:
            builder.close()
        if self.store.get(record.id).cancel_requested:
            self.store.transition(record.id, "Canceled", ended=time.time(), reason="canceled before it started")
            return
        labels = self.engine.image_labels(built.image) or {}
        python = labels.get("dockyard.python") or env.python.interpreter_path
        variables.update(
            {
                "PYTHONPATH": CONTAINER_LIB,
                "DOCKYARD_METRICS_FILE": f"{CONTAINER_META}/metrics.jsonl",
            }
        )
        # exec: the shell becomes the script, so signals (cancel) reach it and its exit code is ours;
        # the output goes straight into the run folder, whatever happens to the agent.
        command = ["/bin/sh", "-c", f'exec "$0" "$@" >>{CONTAINER_META}/std.log 2>&1', python, record.script, *record.arguments]
        body = {
            "Image": built.image,
            "Cmd": command,
            "Env": [f"{k}={v}" for k, v in variables.items()],
            "WorkingDir": CONTAINER_WORK,
            "Labels": {"dockyard.run": record.id, "dockyard.workspace": str(self.workspace_dir)},
            "HostConfig": {
                "Binds": [
                    f"{work}:{CONTAINER_WORK}",
                    f"{outputs}:{CONTAINER_WORK}/outputs",
                    f"{meta}:{CONTAINER_META}",
                    f"{_library_dir()}:{CONTAINER_LIB}/dockyard:ro",
                ],
            },
        }
        if gpus and not virtual:
            # By UUID, never `count`: dockerd's count means "the first N GPUs", whoever uses them.
            body["HostConfig"]["DeviceRequests"] = [  # type: ignore[index]
                {"Driver": "nvidia", "DeviceIDs": list(gpus), "Capabilities": [["gpu"]]}
            ]
        if record.container_id:  # an earlier launch got this far before the agent died
            self.engine.request("DELETE", f"/containers/{record.container_id}?force=1")
        create = f"/containers/create?name=dockyard-{record.id}"
        payload = json.dumps(body).encode()
        headers = {"Content-Type": "application/json"}
        reply = self.engine.request("POST", create, body=payload, headers=headers, timeout=60)
        if reply.status == 409:  # created, then the agent died before recording it
            self.engine.request("DELETE", f"/containers/dockyard-{record.id}?force=1")
            reply = self.engine.request("POST", create, body=payload, headers=headers, timeout=60)
        if reply.status != 201:
            raise EngineUnavailable(self.engine.url, f"creating the container answered HTTP {reply.status}: {reply.body[:300]!r}")
        container_id = reply.json()["Id"]
        self.store.update(record.id, container_id=container_id, image=built.image)  # before start: adoptable
        started = self.engine.request("POST", f"/containers/{container_id}/start", timeout=60)
        if started.status not in (204, 304):
            self.engine.request("DELETE", f"/containers/{container_id}?force=1")  # leave nothing behind
            try:
                message = str(started.json().get("message", ""))
            except ValueError:
                message = started.body[:300].decode(errors="replace")
            if "nvidia" in message.lower():
                raise EnvironmentProblem(
                    f"the engine cannot give GPUs to containers: {message.strip()}",
                    hint="install the NVIDIA Container Toolkit (nvidia-container-toolkit) and restart dockerd",
                )
            raise EngineUnavailable(self.engine.url, f"starting the container answered HTTP {started.status}: {message}")
        self.store.transition(record.id, "Running", started=time.time())
        self.log(f"{record.id} running in container {container_id[:12]} ({built.image})")
        threading.Thread(target=self._await_container, args=(container_id,), daemon=True).start()

    def _await_container(self, container_id: str) -> None:
        """Block on the engine's wait endpoint so the loop notices the exit at once."""
        try:
            self.engine.request("POST", f"/containers/{container_id}/wait", timeout=None)
        except DockyardError:
            pass  # the loop's own check decides what happened
        self._wake.set()

    def _start_process(self, record: RunRecord, env: Any, variables: dict[str, str], work: Path, meta: Path) -> None:
        runtime_env = {**os.environ, **variables, "DOCKYARD_METRICS_FILE": str(meta / "metrics.jsonl")}
        lib_parent = str(_library_dir().parent)
        runtime_env["PYTHONPATH"] = os.pathsep.join(p for p in (lib_parent, os.environ.get("PYTHONPATH", "")) if p)
        wrapper = f'"$0" "$@" >>"{meta}/std.log" 2>&1; echo $? >"{meta}/exit_code"'
        proc = subprocess.Popen(
            ["/bin/sh", "-c", wrapper, env.python.interpreter_path, record.script, *record.arguments],
            cwd=work,
            env=runtime_env,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        self._children[record.id] = proc
        threading.Thread(target=lambda: (proc.wait(), self._wake.set()), daemon=True).start()
        self.store.update(record.id, pid=proc.pid, image="(local process)")
        self.store.transition(record.id, "Running", started=time.time())
        self.log(f"{record.id} running as local process {proc.pid}")

    # -- following --------------------------------------------------------------------------------

    def _ingest(self, record: RunRecord) -> None:
        from ._runcontext import read_metric_lines

        path = Path(record.run_dir) / "meta" / "metrics.jsonl"
        if not path.exists():
            return
        records, offset = read_metric_lines(path, record.metrics_offset)
        if records or offset != record.metrics_offset:
            self.store.add_metrics(record.id, records, offset)

    def _follow(self, record: RunRecord) -> None:
        self._ingest(record)
        if record.docker:
            self._follow_container(record)
        else:
            self._follow_process(record)

    def _finish(self, record: RunRecord, exit_code: int | None, reason: str = "") -> None:
        self._ingest(self.store.get(record.id))
        fresh = self.store.get(record.id)
        if fresh.cancel_requested:
            status, reason = "Canceled", reason or "canceled"
        elif exit_code == 0:
            status = "Completed"
        else:
            status = "Failed"
            if not reason:
                reason = f"the script exited with code {exit_code}"
        if self.store.transition(record.id, status, ended=time.time(), exit_code=exit_code, reason=reason):
            self.log(f"{record.id} {status} (exit code {exit_code})")
        self.leases.release(record.id)

    def _follow_container(self, record: RunRecord) -> None:
        if not record.container_id:
            self._finish(record, None, "the run has no container (it was lost while starting)")
            return
        try:
            reply = self.engine.request("GET", f"/containers/{record.container_id}/json", timeout=10)
        except EngineUnavailable as exc:
            now = time.monotonic()
            self._engine_down_since = self._engine_down_since or now
            if now - self._engine_down_since > ENGINE_GRACE_S:
                self._finish(record, None, f"the Docker Engine became unreachable: {exc.reason}")
            return
        self._engine_down_since = None
        if reply.status == 404:
            self._finish(record, None, "the run's container disappeared (removed outside dockyard)")
            return
        state = reply.json().get("State") or {}
        if record.cancel_requested and state.get("Running"):
            self.engine.request("POST", f"/containers/{record.container_id}/stop?t=5", timeout=30)
            return
        if state.get("Status") in ("exited", "dead"):
            code = int(state.get("ExitCode", -1))
            reason = "" if code == 0 else (state.get("Error") or "")
            if state.get("OOMKilled"):
                reason = "killed: out of memory"
            self._finish(record, code, reason)
            self.engine.request("DELETE", f"/containers/{record.container_id}?force=1")

    def _follow_process(self, record: RunRecord) -> None:
        proc = self._children.get(record.id)
        exit_file = Path(record.run_dir) / "meta" / "exit_code"
        alive = proc.poll() is None if proc is not None else _pid_alive(record.pid)
        if alive:
            if record.cancel_requested and record.pid:
                try:
                    os.killpg(record.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
            return
        self._children.pop(record.id, None)
        text = exit_file.read_text().strip() if exit_file.exists() else ""
        if text.lstrip("-").isdigit():
            self._finish(record, int(text))
        else:
            self._finish(record, None, "the run's process ended without an exit code (killed?)")


def _pid_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has exited
    except (OSError, IndexError):
        return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dockyard._agent", description="dockyard's run agent")
    parser.add_argument("--workspace-dir", required=True)
    parser.add_argument("--home", default=None, help="dockyard home holding images and snapshots")
    parser.add_argument("--poll", type=float, default=0.2)
    args = parser.parse_args(argv)
    home = Path(args.home) if args.home else None
    return Agent(Path(args.workspace_dir), home=home, poll=args.poll).serve()


if __name__ == "__main__":
    sys.exit(main())

