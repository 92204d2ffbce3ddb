"""The CLI's contract: exit codes, one-line errors, JSON on stdout only, no bare tracebacks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path


def dockyard(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "dockyard", *args], capture_output=True, text=True, env=full_env, timeout=60
    )


def test_version():
    out = dockyard("--version")
    assert out.returncode == 0 and "dockyard" in out.stdout


def test_unknown_command_is_usage_error():
    out = dockyard("frobnicate")
    assert out.returncode == 2
    assert "No such command" in out.stderr


def test_doctor_without_engine_exits_3_and_names_the_fix(tmp_path: Path):
    out = dockyard("doctor", env={"DOCKER_HOST": f"unix://{tmp_path}/absent.sock", "DOCKYARD_HOME": str(tmp_path)})
    assert out.returncode == 3
    assert "FAIL" in out.stdout and "scripts/setup-engine" in out.stdout
    assert "Traceback" not in out.stderr


def test_doctor_json_without_engine(tmp_path: Path):
    out = dockyard("doctor", "--json", env={"DOCKER_HOST": f"unix://{tmp_path}/absent.sock", "DOCKYARD_HOME": str(tmp_path)})
    assert out.returncode == 3
    report = json.loads(out.stdout)  # exactly one JSON object on stdout
    assert report["ok"] is False
    checks = {c["name"]: c for c in report["checks"]}
    assert set(checks) >= {"engine", "buildkit", "index", "gpu-leases", "runs", "gpus", "base-images"}
    assert checks["engine"]["ok"] is False and "DOCKER_HOST" in checks["engine"]["detail"]
    assert checks["index"]["ok"] is True and checks["gpu-leases"]["ok"] is True
    for check in report["checks"]:
        assert set(check) >= {"name", "ok", "detail"}


def test_bad_docker_host_is_one_line_exit_2():
    out = dockyard("doctor", env={"DOCKER_HOST": "ssh://someone@somewhere"})
    assert out.returncode == 2
    assert out.stderr.startswith("error: DOCKER_HOST='ssh://someone@somewhere'")
    assert "Traceback" not in out.stderr


def test_debug_shows_the_traceback():
    out = dockyard("--debug", "doctor", env={"DOCKER_HOST": "ssh://someone@somewhere"})
    assert out.returncode == 2 and "Traceback" in out.stderr


def test_json_error_shape():
    out = dockyard("base", "bootstrap", "--flavor", "busybox", "--json", env={"DOCKER_HOST": "ssh://x@y"})
    assert out.returncode == 2
    err = json.loads(out.stdout)["error"]
    assert err["type"] == "InputError" and err["exit_code"] == 2


def test_bad_flavor_is_usage_error():
    out = dockyard("base", "bootstrap", "--flavor", "alpine")
    assert out.returncode == 2 and "alpine" in out.stderr


def test_damaged_index_fails_doctor(tmp_path: Path):
    (tmp_path / "index.db").write_bytes(b"this is not a database" * 100)
    out = dockyard("doctor", "--json", env={"DOCKYARD_HOME": str(tmp_path), "DOCKER_HOST": f"unix://{tmp_path}/x.sock"})
    assert out.returncode == 3 and "Traceback" not in out.stderr
    checks = {c["name"]: c for c in json.loads(out.stdout)["checks"]}
    assert checks["index"]["ok"] is False and checks["index"]["required"] is True
    assert str(tmp_path / "index.db") in checks["index"]["detail"] and "move index.db aside" in checks["index"]["detail"]


def test_run_refuses_an_unknown_option_before_the_separator_and_submits_nothing(tmp_path, monkeypatch):
    from click.testing import CliRunner
    from dockyard.cli._runs import run_command

    monkeypatch.setenv("DOCKYARD_HOME", str(tmp_path / "home"))
    result = CliRunner().invoke(run_command, ["train.py", "--detatch"])
    assert result.exit_code == 2 and "Did you mean '--detach'?" in result.output
    assert not (tmp_path / "home").exists(), "nothing was submitted (no home, no store, no agent)"
    other = CliRunner().invoke(run_command, ["train.py", "--source", ".", "--epochs", "3"])
    assert other.exit_code == 2 and "after `--`" in other.output
    ctx = run_command.make_context("run", ["train.py", "--json", "data.csv", "--", "--epochs", "3", "--detatch"])
    assert ctx.params["args"] == ("data.csv", "--epochs", "3", "--detatch") and ctx.params["as_json"]
