"""The seed article's Azure ML code runs with only `azureml` -> `dockyard` in its imports.

The registry placeholders ("myregistry.azurecr.io", "username", "password") become a real
password-protected registry on loopback holding the "fastdotai/fastai2:latest" base image (our
local python base, pushed there), and the source folder gets a tiny train.py.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import urllib.parse
import uuid
from pathlib import Path

import pytest
from dockyard.build._base_images import bootstrap
from dockyard.dockerd import EngineClient
from helpers.registry import LocalRegistry, local_registry_fixture

pytestmark = pytest.mark.engine

ROOT = Path(__file__).resolve().parents[2]
SNIPPET = ROOT / "tests" / "data" / "seed_snippet.py.txt"
SEED = ROOT.parent / "shared" / "seed-azureml-custom-docker.md"

local_registry = local_registry_fixture(scope="module")

TRAIN = """
from dockyard.core.run import Run
run = Run.get_context()
for epoch in range(3):
    run.log("accuracy", 0.5 + epoch / 10)
    print(f"epoch {epoch} done", flush=True)
"""


def test_snippet_is_the_seed_code():
    if not SEED.exists():
        pytest.skip(f"{SEED} is not beside this checkout (CI and developer machines have it)")
    blocks = re.findall(r"```[Pp]ython\s*\n(.*?)```", SEED.read_text(), re.S)
    ours = SNIPPET.read_text()
    for i, block in enumerate(blocks):
        if i != 4:
            assert block in ours, f"seed block {i} differs from tests/data/seed_snippet.py.txt"


def test_seed_code_runs_end_to_end(local_registry: LocalRegistry, tmp_path: Path, engine_resources):
    engine = EngineClient.from_env()
    base = bootstrap("python", engine=engine).ref
    remote = local_registry.push_local(base, "fastdotai/fastai2:latest", engine)

    code = SNIPPET.read_text().replace("azureml", "dockyard")
    code = code.replace('"myregistry.azurecr.io"', repr(local_registry.address))
    code = code.replace('"username"', repr(local_registry.username)).replace('"password"', repr(local_registry.password))
    project = tmp_path / "project"
    (project / "fastai-example").mkdir(parents=True)
    (project / "fastai-example" / "train.py").write_text(TRAIN)
    # An Azure ML config.json, as downloaded from the portal.
    (project / "config.json").write_text(json.dumps({
        "subscription_id": "00000000-0000-0000-0000-000000000000",
        "resource_group": "rg", "workspace_name": f"seed{uuid.uuid4().hex[:6]}"}))
    (project / "port.py").write_text(code)
    home = tmp_path / "home"
    env = {**os.environ, "DOCKYARD_HOME": str(home)}
    try:
        out = subprocess.run([sys.executable, "port.py"], cwd=project, capture_output=True, text=True, env=env, timeout=600)
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
        assert "Creating a new compute target..." in out.stdout
        assert '"maxNodeCount": 4' in out.stdout.replace("'", '"')
        assert "epoch 2 done" in out.stdout, "wait_for_completion(show_output=True) did not stream the run"
        assert "Status: Completed" in out.stdout
        assert local_registry.password not in out.stdout + out.stderr
        again = subprocess.run([sys.executable, "port.py"], cwd=project, capture_output=True, text=True, env=env, timeout=600)
        assert again.returncode == 0 and "Found existing compute target." in again.stdout
    finally:
        subprocess.run([sys.executable, "-m", "dockyard", "agent", "stop", "--workspace",
                        json.loads((project / "config.json").read_text())["workspace_name"]],
                       env=env, capture_output=True, timeout=60)
        engine.request("DELETE", f"/images/{urllib.parse.quote(remote, safe='')}")
