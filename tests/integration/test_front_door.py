"""`dockyard run` through the agent's front door: the same output and exit codes as the client's
own path, every doubtful case done by the client itself, and no run lost or run twice when the
agent goes away in the middle."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from dockyard import Workspace
from dockyard.compute import agent_status, ensure_agent, stop_agent

pytestmark = pytest.mark.engine

PYTHON = "dockyard/base:bookworm-python3"
TRAIN = "from dockyard import Run\nrun = Run.get_context()\nprint('training', flush=True)\nrun.log('accuracy', 0.5)\n"


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    home = tmp_path / "home"
    monkeypatch.setenv("DOCKYARD_HOME", str(home))
    src = tmp_path / "src"
    src.mkdir()
    (src / "train.py").write_text(TRAIN)
    (tmp_path / "env.yml").write_text(f"name: py\ndocker:\n  base_image: {PYTHON}\n")
    yield home, tmp_path
    stop_agent(home)


def dockyard(cwd: Path, *args: str, env: dict[str, str] | None = None, **kw) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dockyard", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300, env={**os.environ, **(env or {})}, **kw)


def served_by_front_door(home: Path) -> int:
    return Path(agent_status(home).log).read_text().count("front door: queued")


def normalise(text: str) -> str:
    return re.sub(r"default_\d+_[0-9a-f]{8}", "RUN", text)


def test_the_front_door_prints_what_the_client_would(project):
    home, cwd = project
    assert dockyard(cwd, "env", "build", "env.yml").returncode == 0  # both runs below are cache hits
    assert not agent_status(home).running
    first = dockyard(cwd, "run", "train.py", "--source", "src", "--env", "env.yml")  # no agent: the client's path
    assert first.returncode == 0, first.stderr
    assert agent_status(home).running and served_by_front_door(home) == 0
    second = dockyard(cwd, "run", "train.py", "--source", "src", "--env", "env.yml")
    assert second.returncode == 0, second.stderr
    assert served_by_front_door(home) == 1
    assert normalise(second.stdout) == normalise(first.stdout)
    assert "training" in second.stdout and "accuracy" in second.stdout and "Status: Completed" in second.stdout
    as_json = dockyard(cwd, "run", "train.py", "--source", "src", "--env", "env.yml", "--json")
    doc = json.loads(as_json.stdout)
    assert doc["status"] == "Completed" and doc["metrics"] == {"accuracy": [0.5]} and served_by_front_door(home) == 2
    failing = cwd / "src" / "fail.py"
    failing.write_text("import sys\nprint('bad', flush=True)\nsys.exit(4)\n")
    failed = dockyard(cwd, "run", "fail.py", "--source", "src", "--env", "env.yml")
    assert failed.returncode == 1 and "bad" in failed.stdout and "Failed: the script exited with code 4" in failed.stderr
    detached = dockyard(cwd, "run", "train.py", "--source", "src", "--env", "env.yml", "--detach", "--json")
    assert detached.returncode == 0 and json.loads(detached.stdout)["status"] in ("Queued", "Running", "Completed")
    assert served_by_front_door(home) == 4
    runs = Workspace("default", home=home).get_runs()
    assert len(runs) == 5, "each command queued exactly one run"


def test_bad_input_is_reported_by_the_client_word_for_word(project):
    home, cwd = project
    ensure_agent(home)
    via_agent = dockyard(cwd, "run", "missing.py", "--source", "src", "--env", "env.yml")
    stop_agent(home)
    (home / "agent.sock").unlink(missing_ok=True)
    alone = dockyard(cwd, "run", "missing.py", "--source", "src", "--env", "env.yml")  # no agent: the client alone
    assert via_agent.returncode == alone.returncode == 2
    assert via_agent.stderr == alone.stderr and "not found" in via_agent.stderr
    bad_spec = cwd / "bad.yml"
    bad_spec.write_text("name: x\ndocker:\n  bse_image: y\n")
    ensure_agent(home)
    spec_error = dockyard(cwd, "run", "train.py", "--source", "src", "--env", "bad.yml", "--json")
    assert spec_error.returncode == 2 and "did you mean 'base_image'" in spec_error.stderr
    assert json.loads(spec_error.stdout)["error"]["type"] == "SpecError"
    assert Workspace("default", home=home).get_runs() == [], "a refused submit queues nothing"


def test_a_client_configured_differently_is_served_by_itself(project):
    """The agent's snapshot limit is the default (100 MB); this client's is 1 MB: its own applies."""
    home, cwd = project
    ensure_agent(home)
    (cwd / "src" / "big.bin").write_bytes(b"\0" * (2 * 1024 * 1024))
    out = dockyard(cwd, "run", "train.py", "--source", "src", "--env", "env.yml", env={"DOCKYARD_SNAPSHOT_MAX_MB": "1"})
    assert out.returncode == 2 and "big.bin" in out.stderr
    assert served_by_front_door(home) == 0


def test_the_agent_killed_while_a_client_follows_loses_and_repeats_nothing(project):
    home, cwd = project
    (cwd / "src" / "count.py").write_text(
        "import time\nfor i in range(12):\n    print('line', i, flush=True)\n    time.sleep(0.25)\n")
    ensure_agent(home)
    client = subprocess.Popen([sys.executable, "-m", "dockyard", "run", "count.py", "--source", "src", "--env", "env.yml"],
                              cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen = ""
    while "line 3" not in seen:
        seen += client.stdout.readline()
        assert client.poll() is None, client.stderr.read()
    os.kill(agent_status(home).pid, signal.SIGKILL)  # mid-follow: the client must carry on alone
    rest, err = client.communicate(timeout=120)
    output = seen + rest
    assert client.returncode == 0, err
    assert [line for line in output.splitlines() if line.startswith("line ")] == [f"line {i}" for i in range(12)]
    assert "Status: Completed" in output
    assert len(Workspace("default", home=home).get_runs()) == 1, "the run was submitted twice"
    assert agent_status(home).running, "following the run revived an agent"


def test_ctrl_c_while_the_agent_streams_detaches(project):
    home, cwd = project
    (cwd / "src" / "slow.py").write_text("import time\nprint('started', flush=True)\ntime.sleep(2)\n")
    ensure_agent(home)
    client = subprocess.Popen([sys.executable, "-m", "dockyard", "run", "slow.py", "--source", "src", "--env", "env.yml"],
                              cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = ""
    while "started" not in line:
        line = client.stdout.readline()
        assert client.poll() is None, client.stderr.read()
    client.send_signal(signal.SIGINT)
    out, _ = client.communicate(timeout=60)
    assert "detached from" in out
    (run,) = Workspace("default", home=home).get_runs()
    assert run.wait_for_completion()["status"] == "Completed"
