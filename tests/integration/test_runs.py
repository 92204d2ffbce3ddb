"""Runs end to end against the real engine: submit, follow, metrics, outputs, failures, the agent."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from dockyard import Environment, Experiment, Run, ScriptRunConfig, Workspace
from dockyard.compute import agent_status, stop_agent
from dockyard.errors import ComputeTargetException, InputError, RunFailed, RunNotFound
from helpers.relay import EngineRelay

pytestmark = pytest.mark.engine

PYTHON = "dockyard/base:bookworm-python3"

TRAIN = """
import sys, time, os
from dockyard import Run
run = Run.get_context()
for i in range(3):
    run.log("loss", 1.0 / (i + 1))
    print("epoch", i, flush=True)
run.log("accuracy", 0.75)
os.makedirs("outputs", exist_ok=True)
with open("outputs/model.txt", "w") as fh:
    fh.write("weights")
print("args", sys.argv[1:])
"""


@pytest.fixture
def ws(home: Path):
    workspace = Workspace(f"ws{uuid.uuid4().hex[:6]}", home=home)
    yield workspace
    stop_agent(workspace.home)
    _remove_run_containers(workspace)


def _remove_run_containers(workspace: Workspace) -> None:
    from dockyard.dockerd import EngineClient

    engine = EngineClient.from_env()
    query = json.dumps({"label": [f"dockyard.workspace={workspace.directory}"]}).replace(" ", "")
    reply = engine.request("GET", f"/containers/json?all=1&filters={query}")
    for c in reply.json() or []:
        engine.request("DELETE", f"/containers/{c['Id']}?force=1")


def python_env() -> Environment:
    env = Environment("py")
    env.docker.base_image = PYTHON
    return env


def source(tmp_path: Path, code: str = TRAIN, name: str = "train.py") -> Path:
    src = tmp_path / "src"
    src.mkdir(exist_ok=True)
    (src / name).write_text(code)
    return src


def test_submit_follow_metrics_outputs(ws: Workspace, tmp_path: Path, capsys):
    src = source(tmp_path)
    run = Experiment(ws, "exp").submit(ScriptRunConfig(str(src), "train.py", arguments=["--lr", 0.1], environment=python_env()))
    assert run.get_status() in ("Queued", "Running", "Completed")
    details = run.wait_for_completion(show_output=True)
    out = capsys.readouterr().out
    assert "epoch 2" in out and "args ['--lr', '0.1']" in out and "Status: Completed" in out
    assert details["status"] == "Completed" and details["exitCode"] == 0
    assert run.get_metrics() == {"loss": [1.0, 0.5, 1.0 / 3], "accuracy": 0.75}
    assert "outputs/model.txt" in run.get_file_names()
    target = run.download_file("outputs/model.txt", tmp_path / "model.txt")
    assert Path(target).read_text() == "weights"
    assert agent_status(ws.home).running


def test_failed_script_is_failed_with_exit_code_and_tail(ws: Workspace, tmp_path: Path):
    src = source(tmp_path, "import sys\nprint('about to fail')\nsys.exit(3)\n", "bad.py")
    run = Experiment(ws, "exp").submit(ScriptRunConfig(str(src), "bad.py", environment=python_env()))
    with pytest.raises(RunFailed) as info:
        run.wait_for_completion()
    assert info.value.exit_code_of_run == 3 and "about to fail" in info.value.log_tail
    details = run.get_details()
    assert details["status"] == "Failed" and details["error"]["exitCode"] == 3
    assert "about to fail" in details["error"]["logTail"]


def test_bad_inputs(ws: Workspace, tmp_path: Path):
    src = source(tmp_path)
    exp = Experiment(ws, "exp")
    with pytest.raises(InputError, match="not found"):
        exp.submit(ScriptRunConfig(str(src), "missing.py"))
    with pytest.raises(InputError, match="outside the source directory"):
        exp.submit(ScriptRunConfig(str(src), "../elsewhere.py"))
    with pytest.raises(ComputeTargetException):
        exp.submit(ScriptRunConfig(str(src), "train.py", compute_target="nope"))
    with pytest.raises(InputError, match="not valid"):
        Experiment(ws, "a/b")
    with pytest.raises(RunNotFound):
        ws.store.get("no-such-run")
    assert ws.store.list() == [], "a rejected submit must leave no run row"


def test_cancel_a_running_run(ws: Workspace, tmp_path: Path):
    src = source(tmp_path, "import time\nprint('sleeping', flush=True)\ntime.sleep(120)\n", "sleep.py")
    run = Experiment(ws, "exp").submit(ScriptRunConfig(str(src), "sleep.py", environment=python_env()))
    deadline = time.monotonic() + 60
    while run.get_status() != "Running" and time.monotonic() < deadline:
        time.sleep(0.1)
    run.cancel()
    details = run.wait_for_completion(raise_on_error=False)
    assert details["status"] == "Canceled"


def test_a_run_canceled_while_its_image_builds_never_gets_a_container(ws: Workspace, tmp_path: Path):
    """A queued run is Canceled at once by whoever cancels it; the agent, still building its image,
    must then not make its container (the engine's own events are asked)."""
    import urllib.parse

    from dockyard.dockerd import EngineClient

    src = source(tmp_path, "print('ran')\n", "ran.py")
    env = Environment(f"slow-{uuid.uuid4().hex[:6]}")
    env.docker.base_dockerfile = f"FROM {PYTHON}\nRUN sleep 6 && echo {uuid.uuid4().hex}\n"
    since = int(time.time()) - 1
    run = Experiment(ws, "exp").submit(ScriptRunConfig(str(src), "ran.py", environment=env))
    log = Path(run._record().run_dir) / "meta" / "std.log"
    deadline = time.monotonic() + 60
    while "building" not in (log.read_text() if log.exists() else "") and time.monotonic() < deadline:
        time.sleep(0.1)
    run.cancel()
    assert run.get_status() == "Canceled"
    time.sleep(12)  # the build ends meanwhile
    record = ws.store.get(run.id)
    assert record.status.value == "Canceled" and record.started is None and not record.container_id
    query = urllib.parse.urlencode({"since": since, "until": int(time.time()) + 1,
                                    "filters": json.dumps({"container": [f"dockyard-{run.id}"]})})
    events = EngineClient.from_env().request("GET", f"/events?{query}").body.decode().splitlines()
    assert not [e for e in map(json.loads, filter(None, events)) if e.get("Action") == "create"], events


def test_compute_target_max_nodes_limits_concurrency(ws: Workspace, tmp_path: Path):
    from dockyard.core.compute import AmlCompute, ComputeTarget

    with pytest.warns(UserWarning, match="vm_size"):
        config = AmlCompute.provisioning_configuration(vm_size="STANDARD_NC6", max_nodes=1)
    target = ComputeTarget.create(ws, "one-at-a-time", config)
    src = source(tmp_path, "import time\ntime.sleep(2)\n", "nap.py")
    exp = Experiment(ws, "exp")
    runs = [exp.submit(ScriptRunConfig(str(src), "nap.py", compute_target=target, environment=python_env())) for _ in range(2)]
    seen_both_running = False
    while not all(r.get_status() in ("Completed", "Failed") for r in runs):
        statuses = [r.get_status() for r in runs]
        seen_both_running = seen_both_running or statuses.count("Running") == 2
        assert target.get_status().serialize()["currentNodeCount"] <= 1
        time.sleep(0.05)
    assert not seen_both_running
    assert [r.get_status() for r in runs] == ["Completed", "Completed"]


def test_local_process_run(ws: Workspace, tmp_path: Path):
    src = source(tmp_path)
    env = Environment("local")
    env.docker.enabled = False
    env.python.interpreter_path = sys.executable
    run = Experiment(ws, "exp").submit(ScriptRunConfig(str(src), "train.py", environment=env))
    details = run.wait_for_completion()
    assert details["status"] == "Completed"
    assert run.get_metrics()["accuracy"] == 0.75


def test_ten_megabytes_of_output_are_kept_whole(ws: Workspace, tmp_path: Path):
    code = "import sys\nline = 'x' * 99 + '\\n'\nfor _ in range(100_000):\n    sys.stdout.write(line)\nprint('END')\n"
    src = source(tmp_path, code, "loud.py")
    run = Experiment(ws, "exp").submit(ScriptRunConfig(str(src), "loud.py", environment=python_env()))
    run.wait_for_completion()
    data = (Path(run._record().run_dir) / "meta" / "std.log").read_bytes()
    script_output = data[data.index(b"x" * 99):]  # after the build's progress, when one ran first
    assert len(script_output) == 100_000 * 100 + 4
    assert script_output.endswith(b"END\n")


def test_agent_kill_9_during_a_run_loses_nothing(ws: Workspace, tmp_path: Path):
    src = source(tmp_path, "import time\nfrom dockyard import Run\nr = Run.get_context()\nfor i in range(8):\n    r.log('step', i)\n    time.sleep(0.5)\n", "steps.py")
    run = Experiment(ws, "exp").submit(ScriptRunConfig(str(src), "steps.py", environment=python_env()))
    deadline = time.monotonic() + 60
    while run.get_status() != "Running" and time.monotonic() < deadline:
        time.sleep(0.05)
    pid = agent_status(ws.home).pid
    os.kill(pid, signal.SIGKILL)
    time.sleep(1)
    assert not agent_status(ws.home).running, "the lock must die with the agent"
    out = subprocess.run([sys.executable, "-m", "dockyard", "runs", "ls", "--workspace", ws.name, "--json"],
                         capture_output=True, text=True, env={**os.environ, "DOCKYARD_HOME": str(ws.home)}, timeout=60)
    assert json.loads(out.stdout)["runs"][0]["status"] == "Running"
    # That `runs ls` restarted an agent, which adopts the container and records the true end.
    assert agent_status(ws.home).running
    deadline = time.monotonic() + 60
    while json.loads(subprocess.run(
        [sys.executable, "-m", "dockyard", "runs", "ls", "--workspace", ws.name, "--json"], capture_output=True,
        text=True, env={**os.environ, "DOCKYARD_HOME": str(ws.home)}, timeout=60).stdout)["runs"][0]["status"] == "Running":
        assert time.monotonic() < deadline, "the run never reached its true end"
        time.sleep(0.5)
    details = run.wait_for_completion()
    assert details["status"] == "Completed"
    assert run.get_metrics()["step"] == list(range(8)), "metrics logged while no agent ran were lost"


def test_two_agents_never_run_at_once(ws: Workspace):
    from dockyard.compute import Agent, ensure_agent

    first = ensure_agent(ws.home)
    assert first.running
    assert Agent(ws.home).serve() == 1  # the second one refuses and returns


def test_an_unreachable_engine_keeps_runs_and_their_true_end_is_collected(home: Path, tmp_path: Path, monkeypatch):
    """Unknown is not gone: while the engine cannot be asked, the run stays Running (saying why) and a
    new submit waits Queued; when it answers again, the true exit and metrics are collected."""
    relay_path = tmp_path / "engine.sock"
    relay = EngineRelay(str(relay_path))
    monkeypatch.setenv("DOCKER_HOST", f"unix://{relay_path}")
    ws = Workspace(f"ws{uuid.uuid4().hex[:6]}", home=home)
    try:
        src = source(tmp_path, "import time\nfrom dockyard import Run\nr = Run.get_context()\n"
                               "for i in range(6):\n    r.log('step', i)\n    time.sleep(0.5)\n", "steps.py")
        exp = Experiment(ws, "exp")
        run = exp.submit(ScriptRunConfig(str(src), "steps.py", environment=python_env()))
        deadline = time.monotonic() + 60
        while run.get_status() != "Running" and time.monotonic() < deadline:
            time.sleep(0.05)
        relay.close()  # the engine "goes away" for this agent; the container runs on
        while "unreachable" not in ws.store.get(run.id).reason:
            assert time.monotonic() < deadline + 30, ws.store.get(run.id)
            time.sleep(0.1)
        waiting = exp.submit(ScriptRunConfig(str(src), "steps.py", environment=python_env()))
        time.sleep(4)  # longer than the run: it ends while nobody can see it
        assert run.get_status() == "Running", "an unreachable engine is not a failed run"
        assert waiting.get_status() == "Queued" and "Docker Engine" in ws.store.get(waiting.id).reason
        assert agent_status(ws.home).running, "the agent must keep serving"
        relay_path.unlink()
        relay = EngineRelay(str(relay_path))  # the engine answers again
        for r in (run, waiting):
            details = r.wait_for_completion(raise_on_error=False)
            assert details["status"] == "Completed" and details["exitCode"] == 0, details
            assert r.get_metrics()["step"] == list(range(6))
        assert ws.store.get(run.id).reason == "", "the outage note is cleared once the engine answers"
    finally:
        relay.close()
        monkeypatch.setenv("DOCKER_HOST", "unix:///var/run/docker.sock")
        stop_agent(ws.home)
        _remove_run_containers(ws)


def test_oversized_snapshot_is_refused_before_anything_is_queued(ws: Workspace, tmp_path: Path, monkeypatch):
    src = source(tmp_path)
    (src / "big.bin").write_bytes(b"\0" * (2 * 1024 * 1024))
    monkeypatch.setenv("DOCKYARD_SNAPSHOT_MAX_MB", "1")
    with pytest.raises(InputError) as info:
        Experiment(ws, "exp").submit(ScriptRunConfig(str(src), "train.py", environment=python_env()))
    assert "big.bin" in str(info.value) and ".amlignore" in info.value.hint
    assert ws.store.list() == []


def test_environment_variables_reach_the_script_and_source_edits_do_not_rebuild(ws: Workspace, tmp_path: Path):
    src = source(tmp_path, "import os\nprint('GREETING=' + os.environ['GREETING'])\n", "env.py")
    env = python_env()
    env.environment_variables = {"GREETING": "hello-from-env"}
    exp = Experiment(ws, "exp")
    first = exp.submit(ScriptRunConfig(str(src), "env.py", environment=env))
    first.wait_for_completion()
    assert "GREETING=hello-from-env" in Path(first._record().run_dir, "meta", "std.log").read_text()
    (src / "env.py").write_text("import os\nprint('edited ' + os.environ['GREETING'])\n")
    second = exp.submit(ScriptRunConfig(str(src), "env.py", environment=env))
    second.wait_for_completion()
    assert second._record().image == first._record().image, "a source edit must not change the image"
    assert "edited hello-from-env" in Path(second._record().run_dir, "meta", "std.log").read_text()


def test_cli_run_show_logs_and_ctrl_c_detaches(ws: Workspace, tmp_path: Path):
    src = source(tmp_path)
    (tmp_path / "env.yml").write_text(f"name: py\ndocker:\n  base_image: {PYTHON}\n")
    env = {**os.environ, "DOCKYARD_HOME": str(ws.home)}
    cli = [sys.executable, "-m", "dockyard"]
    done = subprocess.run([*cli, "run", "train.py", "--source", str(src), "--env", str(tmp_path / "env.yml"),
                           "--workspace", ws.name, "--json", "--", "--x", "1"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    assert doc["status"] == "Completed" and doc["exit_code"] == 0 and doc["metrics"]["accuracy"] == [0.75]
    assert set(doc) >= {"id", "status", "exit_code", "image", "gpus", "metrics"}
    shown = subprocess.run([*cli, "runs", "show", doc["id"], "--workspace", ws.name], capture_output=True, text=True, env=env, timeout=60)
    assert "Completed" in shown.stdout and "loss" in shown.stdout and "█" in shown.stdout
    logs = subprocess.run([*cli, "runs", "logs", doc["id"], "--workspace", ws.name], capture_output=True, text=True, env=env, timeout=60)
    assert "args ['--x', '1']" in logs.stdout
    missing = subprocess.run([*cli, "runs", "show", "nope", "--workspace", ws.name], capture_output=True, text=True, env=env, timeout=60)
    assert missing.returncode == 2 and "no run with id" in missing.stderr

    # Ctrl-C while following: the CLI detaches, the run goes on.
    sleeper = source(tmp_path, "import time\nprint('started', flush=True)\ntime.sleep(3)\nprint('finished', flush=True)\n", "slow.py")
    follow = subprocess.Popen([*cli, "run", "slow.py", "--source", str(sleeper), "--env", str(tmp_path / "env.yml"),
                               "--workspace", ws.name], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 60
    while not any(r.status == "Running" and r.script == "slow.py" for r in ws.store.list()) and time.monotonic() < deadline:
        time.sleep(0.05)
    follow.send_signal(signal.SIGINT)
    out, _ = follow.communicate(timeout=60)
    assert "detached" in out
    (record,) = [r for r in ws.store.list() if r.script == "slow.py"]
    run = Run(Experiment(ws, record.experiment), record.id)
    assert run.wait_for_completion()["status"] == "Completed"
