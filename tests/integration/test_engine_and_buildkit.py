"""Doctor and BuildKit's ListWorkers against the real engine."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from dockyard._doctor import run_doctor
from dockyard.build._buildkit import BuildKitClient
from dockyard.dockerd import EngineClient
from dockyard.errors import EngineUnavailable, InputError

pytestmark = pytest.mark.engine


def test_engine_info():
    info = EngineClient.from_env().info()
    assert info.version and info.api_version and info.os == "linux"


def test_list_workers_through_grpc_hijack():
    with BuildKitClient("docker") as client:
        workers = client.list_workers()
        again = client.list_workers()  # the channel and relay are reusable
    assert workers == again
    moby = [w for w in workers if w.embedded_in_docker]
    assert moby, f"no 'moby' worker in {workers}"
    assert any(p.startswith("linux/") for p in moby[0].platforms)


def test_buildkit_client_without_engine_says_engine(tmp_path: Path):
    with pytest.raises(EngineUnavailable):
        BuildKitClient("docker", engine=EngineClient.parse(f"unix://{tmp_path}/none.sock"))


def test_buildkit_client_rejects_unknown_target():
    with pytest.raises(InputError, match="unknown BuildKit target"):
        BuildKitClient("ssh://somewhere")


def test_doctor_is_healthy(home: Path):
    report = run_doctor()
    checks = {c.name: c for c in report.checks}
    assert checks["engine"].ok, checks["engine"].detail
    assert checks["buildkit"].ok and "moby" in checks["buildkit"].detail
    assert checks["base-images"].ok, checks["base-images"].detail
    assert report.ok


def test_doctor_cli_json(home: Path):
    out = subprocess.run(
        [sys.executable, "-m", "dockyard", "doctor", "--json"],
        capture_output=True,
        text=True,
        env={**os.environ, "DOCKYARD_HOME": str(home)},
        timeout=60,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    report = json.loads(out.stdout)
    assert report["ok"] is True
    assert {c["name"] for c in report["checks"] if c["ok"]} >= {"engine", "buildkit", "index", "base-images"}
