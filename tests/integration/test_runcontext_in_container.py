"""The in-run API inside a real container that has no dockyard installed.

dockyard mounts its own package directory read-only at /opt/dockyard/lib/dockyard and sets
PYTHONPATH; the script logs through the metrics file, which the host reads.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import dockyard
import pytest
from dockyard._runcontext import read_metrics, read_tags
from dockyard.dockerd import EngineClient

pytestmark = pytest.mark.engine

IMAGE = "dockyard/base:bookworm-python3"
# resolve(): the venv's strict editable install is a tree of symlinks into engine/.
ENGINE_DIR = Path(dockyard.__file__).resolve().parent
ALLOWED = {"dockyard", "dockyard._lazy", "dockyard._runcontext", "dockyard._run", "dockyard.core", "dockyard.core.run"}

TRAIN = r'''
import json, sys
startup = sorted(sys.modules)
from dockyard import Run
from dockyard.core import Run as CoreRun
from dockyard.core.run import Run as CoreRunModule
assert Run is CoreRun is CoreRunModule
run = Run.get_context()
run.log("accuracy", 0.9)
run.log("loss", 0.5, step=1)
run.log("loss", float("nan"), step=2)
run.log_list("lr", [0.1, 0.01])
run.log_row("roc", fpr=0.1, tpr=0.8)
run.log_table("curve", {"x": [1, 2], "y": [0.5, 0.25]})
run.set_tags({"team": "vision", "epochs": 2})
with open("model.txt", "w") as f:
    f.write("weights")
run.upload_file("outputs/model.txt", "model.txt")
run.complete()
print("REPORT " + json.dumps({
    "kind": type(run).__name__, "id": run.id, "experiment": run.experiment.name,
    "version": list(sys.version_info[:2]), "startup": startup, "modules": sorted(sys.modules),
    "stdlib": sorted(getattr(sys, "stdlib_module_names", ())), "file": sys.modules["dockyard"].__file__,
}))
'''

EXPECTED = {
    "accuracy": [0.9], "loss": [0.5, "NaN"], "lr": [0.1, 0.01], "roc": [{"fpr": 0.1, "tpr": 0.8}],
    "curve": [{"x": [1, 2], "y": [0.5, 0.25]}],
}


def _report(output: str) -> dict:
    (line,) = [line for line in output.splitlines() if line.startswith("REPORT ")]
    return json.loads(line[len("REPORT "):])


def test_a_script_logs_from_a_bare_image_through_the_mounted_package(tmp_path: Path) -> None:
    meta, work = tmp_path / "meta", tmp_path / "work"
    meta.mkdir()
    work.mkdir()
    (work / "train.py").write_text(TRAIN)
    client = EngineClient.from_env().docker_client()
    name = f"dockyard-test-runcontext-{uuid.uuid4().hex[:8]}"
    try:
        container = client.containers.run(
            IMAGE, ["python3", "train.py"], name=name, detach=True, working_dir="/work",
            user=f"{os.getuid()}:{os.getgid()}",  # the files it writes stay the test's own
            volumes={
                str(ENGINE_DIR): {"bind": "/opt/dockyard/lib/dockyard", "mode": "ro"},
                str(meta): {"bind": "/dockyard/meta", "mode": "rw"},
                str(work): {"bind": "/work", "mode": "rw"},
            },
            environment={
                "PYTHONPATH": "/opt/dockyard/lib", "DOCKYARD_RUN_ID": "r1",
                "DOCKYARD_METRICS_FILE": "/dockyard/meta/metrics.jsonl", "DOCKYARD_EXPERIMENT": "pets",
            },
        )
        code = container.wait(timeout=120)["StatusCode"]
        output = container.logs(stdout=True, stderr=True).decode(errors="replace")
    finally:
        try:
            client.containers.get(name).remove(force=True)
        except Exception:  # noqa: BLE001 - never created, or already gone
            pass
        client.close()
    assert code == 0, output
    report = _report(output)
    assert output.splitlines()[0].startswith("REPORT "), "a submitted run must not print its metrics"
    assert (report["kind"], report["id"], report["experiment"]) == ("SubmittedRun", "r1", "pets")
    assert report["file"] == "/opt/dockyard/lib/dockyard/__init__.py"
    assert report["version"] >= [3, 10], "the stdlib check needs sys.stdlib_module_names"

    # Nothing outside the standard library was imported, except dockyard's two modules. What
    # Python itself loaded before the script's first import (__main__, Debian's sitecustomize,
    # setuptools' _distutils_hack .pth) is the image's, not ours.
    stdlib = set(report["stdlib"])
    outside = [m for m in report["modules"] if m.split(".")[0] not in stdlib and m not in ALLOWED]
    assert [m for m in outside if m not in report["startup"]] == []
    assert not any(m.startswith("dockyard") for m in report["startup"])
    assert ALLOWED <= set(report["modules"])

    assert read_metrics(meta / "metrics.jsonl") == EXPECTED
    assert read_tags(meta / "metrics.jsonl") == {"team": "vision", "epochs": "2"}
    assert (work / "outputs" / "model.txt").read_text() == "weights"


def test_the_same_script_on_the_host_without_dockyard_prints_its_metrics(tmp_path: Path) -> None:
    (tmp_path / "train.py").write_text(TRAIN)
    env = {k: v for k, v in os.environ.items() if not k.startswith("DOCKYARD_")}
    out = subprocess.run([sys.executable, "train.py"], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[:-1] == [
        "accuracy: 0.9", "loss: 0.5", "loss: NaN", "lr: [0.1, 0.01]", 'roc: {"fpr": 0.1, "tpr": 0.8}',
        'curve: {"x": [1, 2], "y": [0.5, 0.25]}',
    ]
    report = _report(out.stdout)
    assert report["kind"] == "OfflineRun" and report["id"].startswith("OfflineRun_")
    assert report["experiment"] == "offline"
    assert (tmp_path / "outputs" / "model.txt").read_text() == "weights"
