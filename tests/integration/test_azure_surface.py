"""The Azure ML v1 surface an ordinary ported project touches: registered environments, tags and
properties, listings of experiments, runs and targets, run files; Azure-only names fail clearly."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from dockyard.core import ComputeTarget, Dataset, Environment, Experiment, Run, ScriptRunConfig
from dockyard.core.environment import DockerBuildContext
from dockyard.errors import InputError, NotSupportedHere
from helpers.runs import PYTHON, local_env, source

pytestmark = pytest.mark.engine


def _env(name: str, *pip: str) -> Environment:
    env = Environment(name)
    env.docker.base_image = PYTHON
    env.python.pip_requirements = list(pip)
    return env


def test_registered_environments_have_versions_like_azure_ml(workspace):
    first = _env("train").register(workspace)
    assert first.version == "1"
    assert _env("train").register(workspace).version == "1", "an unchanged environment keeps its version"
    second = _env("train", "six").register(workspace)
    assert second.version == "2"
    assert Environment.get(workspace, "train").version == "2"
    old = Environment.get(workspace, "train", version="1")
    assert old.python.pip_requirements == [] and old.content_key() == first.content_key()
    assert set(Environment.list(workspace)) == {"train"} and workspace.environments["train"].version == "2"
    copy = second.clone("train-copy")
    assert copy.name == "train-copy" and copy.version is None and copy.content_key() == second.content_key()
    assert copy.register(workspace).version == "1"
    with pytest.raises(InputError) as missing:
        Environment.get(workspace, "nope")
    assert "train" in missing.value.hint and "train-copy" in missing.value.hint
    with pytest.raises(InputError, match="no registered environment 'train' version 9"):
        Environment.get(workspace, "train", version=9)


def test_build_and_image_details_tell_the_truth_from_the_engine(workspace, tmp_path):
    env = _env(f"b{uuid.uuid4().hex[:6]}")
    env.docker.build_args = {"STAMP": uuid.uuid4().hex}
    env.register(workspace)
    before = env.get_image_details(workspace)
    assert before["imageExistsInRegistry"] is False and before["keyResolved"] is True
    details = env.build(workspace).wait_for_completion(show_output=True)
    assert details["status"] == "Succeeded" and details["image"] == before["dockerImage"]["name"]
    after = env.get_image_details(workspace)
    assert after["imageExistsInRegistry"] is True and after["key"] == details["key"]
    assert env.build_local(workspace).get_details()["status"] == "Succeeded"
    listing = subprocess.run([sys.executable, "-m", "dockyard", "env", "ls", "--workspace", workspace.name,
                              "--json"], capture_output=True, text=True, timeout=120,
                             env={**__import__("os").environ, "DOCKYARD_HOME": str(workspace.home)})
    assert listing.returncode == 0, listing.stderr
    row = next(r for r in json.loads(listing.stdout)["registered"] if r["name"] == env.name)
    assert row["version"] == "1" and row["key"] == details["key"] and row["image"] == details["image"]
    bad = _env("broken")
    bad.python.pip_requirements = ["this-package-does-not-exist-dockyard==0"]
    failed = bad.build(workspace).wait_for_completion(raise_on_error=False)
    assert failed["status"] == "Failed" and failed["error"]


def test_tags_properties_display_names_and_listings(workspace, tmp_path):
    src = source(tmp_path, "tagged.py", "from dockyard import Run\nRun.get_context().tag('epochs', 3)\n")
    exp = Experiment(workspace, "tagging")
    run = exp.submit(ScriptRunConfig(str(src), "tagged.py", environment=local_env()), tags={"model": "resnet", "lr": 0.1})
    assert run.get_tags() == {"model": "resnet", "lr": "0.1"}
    run.wait_for_completion()
    run.tag("reviewed")
    run.set_tags({"best": "yes"})
    assert run.tags == {"model": "resnet", "lr": "0.1", "reviewed": "", "best": "yes", "epochs": "3"}
    run.add_properties({"dataset": "pets-v2"})
    run.add_properties({"dataset": "pets-v2"})  # the same value again is fine
    with pytest.raises(InputError, match="cannot change"):
        run.add_properties({"dataset": "pets-v3"})
    assert run.properties == {"dataset": "pets-v2"}
    assert run.display_name == run.id
    run.display_name = "first try"
    assert Run.get(workspace, run.id).display_name == "first try" == workspace.get_run(run.id).display_name
    assert run.to_json()["tags"]["model"] == "resnet"
    assert [e.name for e in Experiment.list(workspace)] == ["tagging"] and "tagging" in workspace.experiments
    assert [t.name for t in ComputeTarget.list(workspace)] == ["local"]
    assert run.get_environment().docker.enabled is False
    with pytest.raises(InputError, match="unknown arguments: bogus"):
        exp.submit(ScriptRunConfig(str(src), "tagged.py", environment=local_env()), bogus=1)


OUTPUTS = """
import os
from dockyard import Run
run = Run.get_context()
os.makedirs("outputs/sub", exist_ok=True)
open("outputs/model.txt", "w").write("weights")
open("outputs/sub/notes.txt", "w").write("notes")
open("plot.png", "wb").write(b"\\x89PNG fake")
run.log_image("loss curve", path="plot.png")
run.upload_folder("outputs", "outputs")          # into itself: no recursion, nothing doubled
run.upload_folder("outputs/copy", "outputs")     # into a folder inside it: copied once
print("FILES", sorted(os.path.relpath(os.path.join(d, f), "outputs") for d, _, fs in os.walk("outputs") for f in fs))
"""


def test_run_files_of_a_local_process_run_download_where_asked(workspace, tmp_path):
    src = source(tmp_path, "outputs.py", OUTPUTS)
    run = Experiment(workspace, "files").submit(ScriptRunConfig(str(src), "outputs.py", environment=local_env()))
    details = run.wait_for_completion(raise_on_error=False)
    log = Path(details["logFiles"]["logs/std.log"]).read_text()
    assert details["status"] == "Completed", log
    names = run.get_file_names()
    assert {"outputs/model.txt", "outputs/sub/notes.txt", "outputs/images/loss_curve.png"} <= set(names), names
    assert "outputs/copy/copy/model.txt" not in names and "outputs/copy/model.txt" in names
    into_folder = run.download_file("outputs/model.txt", str(tmp_path / "new" / "deep") + "/")
    assert into_folder == str(tmp_path / "new" / "deep" / "model.txt") and Path(into_folder).read_text() == "weights"
    renamed = run.download_file("outputs/model.txt", tmp_path / "other" / "m.bin")
    assert Path(renamed).read_bytes() == b"weights"
    (tmp_path / "existing").mkdir()
    assert run.download_file("outputs/sub/notes.txt", tmp_path / "existing").endswith("existing/notes.txt")


def test_runs_show_finds_a_run_of_another_workspace(workspace, tmp_path):
    src = source(tmp_path, "hello.py", "print('hello')\n")
    run = Experiment(workspace, "where").submit(ScriptRunConfig(str(src), "hello.py", environment=local_env()))
    run.wait_for_completion()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    import os

    env = {**os.environ, "DOCKYARD_HOME": str(workspace.home)}
    shown = subprocess.run([sys.executable, "-m", "dockyard", "runs", "show", run.id, "--json"], cwd=elsewhere,
                           capture_output=True, text=True, timeout=60, env=env)
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["id"] == run.id
    missing = subprocess.run([sys.executable, "-m", "dockyard", "runs", "show", "nope_123"], cwd=elsewhere,
                             capture_output=True, text=True, timeout=60, env=env)
    assert missing.returncode == 2 and "looked in" in missing.stderr and workspace.name in missing.stderr


def test_from_docker_image_and_build_context_constructors(tmp_path):
    env = Environment.from_docker_image("img", PYTHON)
    assert env.python.user_managed_dependencies and env.docker.base_image == PYTHON
    (tmp_path / "requirements.txt").write_text("six\n")
    with_pip = Environment.from_docker_image("img", PYTHON, pip_requirements=str(tmp_path / "requirements.txt"))
    assert not with_pip.python.user_managed_dependencies and with_pip.python.pip_requirements == ["six"]
    (tmp_path / "Dockerfile").write_text(f"FROM {PYTHON}\n")
    ctx = Environment.from_docker_build_context("c", DockerBuildContext.from_local_directory(None, tmp_path))
    assert ctx.dockerfile() == f"FROM {PYTHON}\n"


def test_azure_only_names_fail_with_one_clear_error(workspace):
    cases = [
        lambda: workspace.get_default_datastore(),
        lambda: Dataset.get_by_name(workspace, "pets"),
        lambda: Experiment(workspace, "x").archive(),
        lambda: Environment("e").add_private_pip_wheel(workspace, "x.whl"),
    ]
    for case in cases:
        with pytest.raises(NotSupportedHere) as err:
            case()
        assert isinstance(err.value, NotImplementedError) and err.value.hint
    with pytest.raises(NotSupportedHere, match="Model"):
        from dockyard.core.model import Model  # noqa: F401
    with pytest.raises(NotSupportedHere, match="Datastore"):
        from dockyard.core import Datastore  # noqa: F401
    with pytest.raises(AttributeError):
        workspace.get_defualt_datastore  # noqa: B018 - a typo stays an AttributeError
    run_ctx = __import__("dockyard").Run.get_context()
    with pytest.raises(NotImplementedError, match="outputs/"):
        run_ctx.register_model("m", "outputs/m.pkl")


def _cli(home: Path, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    import os

    return subprocess.run([sys.executable, "-m", "dockyard", *args], capture_output=True, text=True, timeout=120,
                          cwd=cwd, env={**os.environ, "DOCKYARD_HOME": str(home)})


def test_runs_compare_and_rm_with_the_snapshots_nobody_names(workspace, tmp_path):
    src = source(tmp_path, "m.py", "import sys\nfrom dockyard import Run\nr = Run.get_context()\n"
                                   "for i in range(3):\n    r.log('loss', float(sys.argv[1]) / (i + 1))\nr.log('acc', 0.9)\n")
    exp = Experiment(workspace, "cmp")
    a = exp.submit(ScriptRunConfig(str(src), "m.py", arguments=["1"], environment=local_env()))
    b = exp.submit(ScriptRunConfig(str(src), "m.py", arguments=["2"], environment=local_env()))
    a.wait_for_completion()
    b.wait_for_completion()
    table = _cli(workspace.home, "runs", "compare", a.id, b.id, "--workspace", workspace.name)
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].split() == ["METRIC", a.id, b.id]
    assert lines[2].split() == ["loss", "0.3333", "(3)", "0.6667", "(3)"] and lines[1].split()[0] == "acc"
    png = tmp_path / "loss.png"
    drawn = _cli(workspace.home, "runs", "compare", a.id, b.id, "--metric", "loss", "--plot", str(png),
                 "--workspace", workspace.name)
    assert drawn.returncode == 0, drawn.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    shown = _cli(workspace.home, "runs", "show", a.id, "--plot", str(tmp_path / "a.png"))
    assert shown.returncode == 0 and (tmp_path / "a.png").stat().st_size > 0, shown.stderr
    # rm: a finished run goes with its folder; a running one is refused; an old snapshot nobody names goes.
    folder = Path(workspace.store.get(a.id).run_dir)
    from dockyard.runs import SnapshotStore

    store = SnapshotStore(workspace.home / "snapshots")
    (tmp_path / "lonely").mkdir()
    (tmp_path / "lonely" / "x.py").write_text("print('nobody runs me')\n")
    lonely = store.take(tmp_path / "lonely").id
    manifest = workspace.home / "snapshots" / "manifests" / f"{lonely}.json"
    old = __import__("time").time() - 7200
    __import__("os").utime(manifest, (old, old))
    dry = _cli(workspace.home, "runs", "rm", a.id, "--dry-run", "--workspace", workspace.name)
    assert dry.returncode == 0 and f"would remove {a.id}" in dry.stdout and folder.exists()
    gone = _cli(workspace.home, "runs", "rm", a.id, "--workspace", workspace.name, "--json")
    doc = json.loads(gone.stdout)
    assert doc["removed"] == [a.id] and doc["snapshots_removed"] >= 1 and not folder.exists()
    assert lonely not in store.ids() and b.get_status() == "Completed"
    assert b.id in [r.id for r in workspace.get_runs()] and a.id not in [r.id for r in workspace.get_runs()]
    store.materialize(workspace.store.get(b.id).snapshot, tmp_path / "still-there")  # b's snapshot is kept
    nap = source(tmp_path, "nap.py", "import time\ntime.sleep(30)\n")
    running = exp.submit(ScriptRunConfig(str(nap), "nap.py", environment=local_env()))
    refused = _cli(workspace.home, "runs", "rm", running.id, "--workspace", workspace.name)
    assert refused.returncode == 2 and "cancel it first" in refused.stderr
    running.cancel()
