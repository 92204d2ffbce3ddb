"""Real training jobs' needs: data mounted in (datasets and --mount), 2 GB of /dev/shm by default,
the allowed docker arguments, builds visible in the run's output; every bad input one clear error
with nothing queued."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from dockyard import Environment, Experiment, ScriptRunConfig
from dockyard.core import Dataset
from dockyard.core.runconfig import DockerConfiguration
from dockyard.errors import InputError
from helpers.runs import PYTHON, python_env, source

pytestmark = pytest.mark.engine


READER = """
import os, sys
from dockyard import Run
run = Run.get_context()
print("ARG", sys.argv[1])
print("NAMED", run.input_datasets.get("pets"))
print("FILES", sorted(os.listdir(sys.argv[1])))
print("LABEL", open(os.path.join(sys.argv[1], "labels.txt")).read().strip())
try:
    open(os.path.join(sys.argv[1], "new.txt"), "w")
    print("WRITABLE")
except OSError:
    print("READ-ONLY")
"""

SHM = """
import os
st = os.statvfs("/dev/shm")
print("SHM_BYTES", st.f_blocks * st.f_frsize)
with open("/dev/shm/block", "wb") as fh:  # what a DataLoader with workers does, at 1 GB
    for _ in range(1024):
        fh.write(b"\\0" * (1 << 20))
os.remove("/dev/shm/block")
print("SHM_OK")
"""


@pytest.fixture
def ws(workspace):
    return workspace


def output(run) -> str:
    return Path(run.get_details()["logFiles"]["logs/std.log"]).read_text()


@pytest.fixture
def pets(tmp_path: Path) -> Path:
    data = tmp_path / "data" / "pets"
    data.mkdir(parents=True)
    (data / "labels.txt").write_text("cat,dog\n")
    (data / "img0.bin").write_bytes(b"\1" * 1024)
    return data


def test_a_named_dataset_is_mounted_read_only_and_found_by_argument_and_by_name(ws, tmp_path, pets):
    src = source(tmp_path, "read.py", READER)
    ds = Dataset.File.from_files(str(pets))
    config = ScriptRunConfig(str(src), "read.py", arguments=[ds.as_named_input("pets").as_mount()],
                             environment=python_env())
    run = Experiment(ws, "data").submit(config)
    assert run.wait_for_completion()["status"] == "Completed", output(run)
    text = output(run)
    assert "ARG /mnt/dockyard/datasets/pets" in text and "NAMED /mnt/dockyard/datasets/pets" in text
    assert "FILES ['img0.bin', 'labels.txt']" in text and "LABEL cat,dog" in text and "READ-ONLY" in text
    assert not (Path(ws.store.get(run.id).run_dir) / "work" / "labels.txt").exists(), "data went into the snapshot"


def test_a_local_process_run_reads_the_dataset_where_it_is(ws, tmp_path, pets):
    src = source(tmp_path, "read.py", READER)
    env = Environment("local")
    env.docker.enabled = False
    env.python.interpreter_path = sys.executable
    run = Experiment(ws, "data").submit(ScriptRunConfig(
        str(src), "read.py", arguments=[Dataset.File.from_files(str(pets)).as_named_input("pets").as_download()],
        environment=env))
    assert run.wait_for_completion()["status"] == "Completed", output(run)
    assert f"NAMED {os.path.realpath(pets)}" in output(run)


def test_shared_memory_is_2g_by_default_and_configurable(ws, tmp_path):
    src = source(tmp_path, "shm.py", SHM)
    exp = Experiment(ws, "shm")
    default = exp.submit(ScriptRunConfig(str(src), "shm.py", environment=python_env()))
    assert default.wait_for_completion()["status"] == "Completed", output(default)
    assert "SHM_OK" in output(default) and f"SHM_BYTES {2 << 30}" in output(default)
    small = exp.submit(ScriptRunConfig(str(src), "shm.py", environment=python_env(),
                                       docker_runtime_config=DockerConfiguration(shm_size="64m")))
    details = small.wait_for_completion(raise_on_error=False)
    assert details["status"] == "Failed" and "SHM_BYTES 67108864" in output(small)
    argued = exp.submit(ScriptRunConfig(str(src), "shm.py", environment=python_env(), docker_runtime_config=
                                        DockerConfiguration(arguments=["--shm-size=1500m", "-e", "WHO=argued"])))
    assert argued.wait_for_completion()["status"] == "Completed"
    assert f"SHM_BYTES {1500 << 20}" in output(argued)


def test_cli_mount_and_shm_size(ws, tmp_path, pets):
    src = source(tmp_path, "read.py", READER.replace('run.input_datasets.get("pets")', "'-'"))
    env_file = tmp_path / "env.yml"
    env_file.write_text(f"name: py\ndocker:\n  base_image: {PYTHON}\n  shm_size: 1g\n")
    done = subprocess.run([sys.executable, "-m", "dockyard", "run", "read.py", "--source", str(src), "--env",
                           str(env_file), "--workspace", ws.name, "--mount", f"{pets}:/data/pets:rw", "--json",
                           "--", "/data/pets"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    run = ws.get_run(json.loads(done.stdout)["id"])
    assert "LABEL cat,dog" in output(run) and "WRITABLE" in output(run)
    assert (pets / "new.txt").exists(), "an :rw mount writes through to the host"


def test_a_run_that_needs_a_build_shows_it_first_and_a_failed_build_fails_the_run(ws, tmp_path):
    src = source(tmp_path, "hello.py", "print('the script starts')\n")
    env = Environment("built")
    env.docker.base_dockerfile = f"FROM {PYTHON}\nARG STAMP\nRUN echo compiling-the-environment $STAMP\n"
    env.docker.build_args = {"STAMP": uuid.uuid4().hex}
    run = Experiment(ws, "build").submit(ScriptRunConfig(str(src), "hello.py", environment=env))
    assert run.wait_for_completion()["status"] == "Completed"
    text = output(run)
    assert "building the environment's image" in text and "compiling-the-environment" in text
    assert text.index("compiling-the-environment") < text.index("the script starts")
    logs = subprocess.run([sys.executable, "-m", "dockyard", "runs", "logs", run.id, "--workspace", ws.name],
                          capture_output=True, text=True, timeout=60)
    assert "compiling-the-environment" in logs.stdout
    again = Experiment(ws, "build").submit(ScriptRunConfig(str(src), "hello.py", environment=env))
    assert again.wait_for_completion()["status"] == "Completed"
    assert "building" not in output(again), "a cache hit writes nothing before the script"

    broken = Environment("broken")
    broken.docker.base_dockerfile = f"FROM {PYTHON}\nARG STAMP\nRUN echo about-to-fail $STAMP && exit 3\n"
    broken.docker.build_args = {"STAMP": uuid.uuid4().hex}
    failed = Experiment(ws, "build").submit(ScriptRunConfig(str(src), "hello.py", environment=broken))
    details = failed.wait_for_completion(raise_on_error=False)
    assert details["status"] == "Failed" and "exit code" in details["error"]["message"]
    assert "about-to-fail" in output(failed) and "the build failed" in output(failed)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"mounts": ["/no/such/folder:/data"]}, "does not exist"),
        ({"mounts": ["/var/run/docker.sock:/var/run/docker.sock"]}, "socket"),
        ({"mounts": ["{src}:/workspace"]}, "dockyard's or the system's"),
        ({"docker_runtime_config": DockerConfiguration(arguments=["--privileged"])}, "not an argument dockyard passes"),
        ({"docker_runtime_config": DockerConfiguration(arguments=["--ipc", "bogus"])}, "--ipc"),
        ({"docker_runtime_config": DockerConfiguration(shm_size="lots")}, "not a size"),
        ({"arguments": ["{pets_a}", "{pets_b}"]}, "used twice"),
    ],
    ids=["missing", "docker-socket", "reserved-target", "forbidden-arg", "bad-ipc", "bad-size", "duplicate-name"],
)
def test_bad_run_configuration_is_one_clear_error_and_queues_nothing(ws, tmp_path, pets, kwargs, message):
    src = source(tmp_path, "hello.py", "print('x')\n")
    named = Dataset.File.from_files(str(pets)).as_named_input("pets")
    resolved = {k: ([named.as_mount(), named.as_download()] if v == ["{pets_a}", "{pets_b}"]
                    else [m.replace("{src}", str(src)) for m in v] if k == "mounts" else v)
                for k, v in kwargs.items()}
    with pytest.raises(InputError, match=message):
        Experiment(ws, "bad").submit(ScriptRunConfig(str(src), "hello.py", environment=python_env(), **resolved))
    assert ws.store.list() == []


def test_a_link_out_of_the_allowed_folders_is_refused(ws, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "nohome"))  # the home folder is one of the roots
    link = tmp_path / "etc-link"
    link.symlink_to("/etc")
    src = source(tmp_path, "hello.py", "print('x')\n")
    with pytest.raises(InputError, match="outside the folders a run may mount") as info:
        Experiment(ws, "bad").submit(ScriptRunConfig(str(src), "hello.py", environment=python_env(),
                                                     mounts=[f"{link}:/data"]))
    assert "link to /etc" in str(info.value) and "DOCKYARD_MOUNT_ROOTS" in info.value.hint


def test_unknown_arguments_are_an_error_and_azure_only_ones_a_warning(tmp_path):
    with pytest.raises(InputError, match="unknown arguments: colour"):
        ScriptRunConfig(str(tmp_path), "x.py", colour="blue")
    with pytest.warns(UserWarning, match="resume_from"):
        ScriptRunConfig(str(tmp_path), "x.py", resume_from=object())
    with pytest.raises(InputError, match="does not exist"):
        Dataset.File.from_files(str(tmp_path / "nothing-here"))


def test_azure_ml_pip_only_conda_dependencies_build_without_conda_and_run(ws, tmp_path):
    from dockyard.core.conda_dependencies import CondaDependencies

    src = source(tmp_path, "uses_six.py", "import six\nprint('six', six.__version__)\n")
    env = Environment("azure-style")
    env.docker.base_image = PYTHON
    env.python.conda_dependencies = CondaDependencies.create(pip_packages=["six==1.16.0"])
    run = Experiment(ws, "conda").submit(ScriptRunConfig(str(src), "uses_six.py", environment=env))
    assert run.wait_for_completion()["status"] == "Completed", output(run)
    assert "six 1.16.0" in output(run)
    default = Environment("defaulted")  # Azure's default object, to add packages to
    default.python.conda_dependencies.add_pip_package("six==1.16.0")
    assert default.content_key().hex == env.content_key().hex or default.to_dict()["python"]["conda_dependencies"]


def test_a_python_pin_the_base_cannot_meet_fails_the_build_in_one_short_error(ws, tmp_path):
    from dockyard.core.conda_dependencies import CondaDependencies

    src = source(tmp_path, "hello.py", "print('x')\n")
    env = Environment("old-python")
    env.docker.base_image = PYTHON
    env.python.conda_dependencies = CondaDependencies.create(pip_packages=["six"], python_version="3.7")
    details = Experiment(ws, "conda").submit(ScriptRunConfig(str(src), "hello.py", environment=env)) \
        .wait_for_completion(raise_on_error=False)
    message = details["error"]["message"]
    assert details["status"] == "Failed" and "asks for python=3.7" in message
    assert message.count("RUN --mount") <= 1 and len(message.splitlines()[0]) < 400, "the error is short"
