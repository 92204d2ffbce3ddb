"""The environment model: Azure ML names, the file form, validation errors, and its content key."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from dockyard import DEFAULT_BASE_IMAGE, Environment
from dockyard.errors import SpecError

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "digits" / "environment.yml"


def write(tmp_path: Path, text: str, name: str = "env.yml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_seed_style_api():
    env = Environment("fastai2")
    env.docker.enabled = True
    env.docker.base_image = "fastdotai/fastai2:latest"
    env.python.user_managed_dependencies = True
    env.docker.base_image_registry.address = "myregistry.azurecr.io"
    env.docker.base_image_registry.username = "username"
    env.docker.base_image_registry.password = "pw-XYZ-9"
    parts = env.key_parts()
    assert parts.base_image == "fastdotai/fastai2:latest" and parts.user_managed
    assert parts.registry == "myregistry.azurecr.io"
    assert "pw-XYZ-9" not in repr(env.docker.base_image_registry) + repr(parts)
    # The Dockerfile path of the seed: base_image None, base_dockerfile text.
    env.docker.base_image = None
    env.docker.base_dockerfile = 'FROM mcr.microsoft.com/azureml/base:intelmpi2018.3-ubuntu16.04\nRUN echo "Hello"\n'
    assert env.key_parts().base_image is None and "Hello" in env.key_parts().dockerfile


def test_default_base_image():
    assert Environment("x").effective_base_image == DEFAULT_BASE_IMAGE


def test_both_base_image_and_dockerfile_is_an_error():
    env = Environment("x")
    env.docker.base_image = "busybox"
    env.docker.base_dockerfile = "FROM busybox\n"
    with pytest.raises(SpecError, match="both base_image and base_dockerfile") as info:
        env.content_key()
    assert info.value.field == "docker.base_dockerfile"


def test_dockerfile_path_is_read_relative_to_the_file(tmp_path: Path):
    (tmp_path / "Dockerfile").write_text("FROM busybox\nRUN true\n")
    env = Environment.load(write(tmp_path, "name: x\ndocker:\n  base_dockerfile: Dockerfile\n"))
    assert env.dockerfile() == "FROM busybox\nRUN true\n" and env.docker.base_dockerfile == str(tmp_path / "Dockerfile")


def test_missing_dockerfile_path_names_file_line_field(tmp_path: Path):
    with pytest.raises(SpecError) as info:
        Environment.load(write(tmp_path, "name: x\ndocker:\n  base_dockerfile: ./nope/Dockerfile\n"))
    err = info.value
    assert err.line == 3 and err.field == "docker.base_dockerfile" and err.path.endswith("env.yml")
    assert "does not exist" in str(err)


def test_unknown_field_suggests_the_right_one(tmp_path: Path):
    with pytest.raises(SpecError) as info:
        Environment.load(write(tmp_path, "name: x\npython:\n  user_managed_dependncies: true\n"))
    assert info.value.line == 3 and info.value.field == "python.user_managed_dependncies"
    assert "user_managed_dependencies" in info.value.hint


def test_malformed_yaml_names_the_line(tmp_path: Path):
    with pytest.raises(SpecError, match="malformed YAML") as info:
        Environment.load(write(tmp_path, "name: x\ndocker:\n  base_image: 'unterminated\n  enabled: true\n"))
    assert info.value.line is not None and info.value.line >= 3


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ("name: x\ndocker:\n  enabled: maybe\n", "docker.enabled"),
        ("name: x\ndocker: [1, 2]\n", "docker"),
        ("name: x\npython:\n  pip_requirements: numpy\n", "python.pip_requirements"),
        ("name: x\nenvironment_variables:\n  A: [1]\n", "environment_variables.A"),
        ("name: x\nenvironment_variables:\n  1BAD: v\n", "environment_variables"),
        ("name: ../evil\n", "name"),
        ("name: x\npython:\n  conda_dependencies: {channels: conda-forge}\n", "python.conda_dependencies"),
        ("version: 1\n", "name"),
    ],
)
def test_bad_fields(tmp_path: Path, text: str, field: str):
    with pytest.raises(SpecError) as info:
        Environment.load(write(tmp_path, text))
    assert info.value.field == field


def test_inline_password_is_refused_without_echoing_it(tmp_path: Path):
    text = "name: x\ndocker:\n  base_image_registry:\n    address: r:5000\n    password: hunter2-inline\n"
    with pytest.raises(SpecError) as info:
        Environment.load(write(tmp_path, text))
    assert "password_env" in info.value.hint
    assert "hunter2-inline" not in str(info.value) + info.value.hint


def test_password_env_is_read_at_use(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    text = "name: x\ndocker:\n  base_image_registry:\n    address: r:5000\n    username: u\n    password_env: DY_TEST_PW\n"
    env = Environment.load(write(tmp_path, text))
    assert env.docker.base_image_registry.password is None
    monkeypatch.setenv("DY_TEST_PW", "from-the-environment")
    assert env.docker.base_image_registry.password == "from-the-environment"
    saved = yaml.safe_load(env.save(tmp_path / "out.yml").read_text())
    assert saved["docker"]["base_image_registry"] == {"address": "r:5000", "username": "u", "password_env": "DY_TEST_PW"}
    assert "from-the-environment" not in (tmp_path / "out.yml").read_text()


def test_round_trip(tmp_path: Path):
    text = (
        "name: full\nversion: '3'\ndocker:\n  enabled: true\n  base_image: dockyard/base:bookworm-python3\n"
        "  platform: linux/arm64\n  build_args:\n    PYTHONHASHSEED: '0'\n"
        "python:\n  user_managed_dependencies: false\n  interpreter_path: /opt/py/bin/python\n"
        "  conda_dependencies:\n    name: project\n    channels: [conda-forge]\n"
        "    dependencies: [python=3.11, numpy, {pip: [requests]}]\n"
        "  pip_requirements: [scikit-learn]\nenvironment_variables:\n  OMP_NUM_THREADS: '2'\n"
    )
    env = Environment.load(write(tmp_path, text))
    again = Environment.load(env.save(tmp_path / "again.yml"))
    assert again.to_dict() == env.to_dict()
    assert again.content_key() == env.content_key()
    assert env.to_dict()["docker"]["build_args"] == {"PYTHONHASHSEED": "0"}


def test_constructors(tmp_path: Path):
    conda = write(tmp_path, "name: p\nchannels: [defaults]\ndependencies: [numpy, {pip: [six]}]\n", "conda.yml")
    reqs = write(tmp_path, "# comment\nnumpy==2.0\n\nsix\n", "requirements.txt")
    assert Environment.from_conda_specification("a", conda).python.conda_dependencies["channels"] == ["defaults"]
    assert Environment.from_pip_requirements("b", reqs).python.pip_requirements == ["numpy==2.0", "six"]
    from_df = Environment.from_dockerfile("c", "FROM busybox\n", conda_specification=conda)
    assert from_df.docker.base_dockerfile == "FROM busybox\n" and from_df.python.conda_dependencies
    with pytest.raises(SpecError, match="not found"):
        Environment.from_pip_requirements("d", tmp_path / "absent.txt")


def test_key_ignores_name_version_env_vars_and_credentials():
    a, b = Environment("a"), Environment("b")
    b.version = "9"
    b.environment_variables = {"X": "1"}
    b.python.interpreter_path = "/usr/bin/python3.11"
    a.docker.base_image_registry.address = b.docker.base_image_registry.address = "reg.local:5000"
    b.docker.base_image_registry.username = "someone"
    b.docker.base_image_registry.password = "s3cret"
    assert a.content_key() == b.content_key()


def test_user_managed_ignores_python_dependencies():
    a, b = Environment("a"), Environment("b")
    for env in (a, b):
        env.python.user_managed_dependencies = True
    b.python.pip_requirements = ["numpy"]
    assert a.content_key() == b.content_key()


def test_changes_that_matter_change_the_key():
    base = Environment("a")
    variants = []
    for mutate in (
        lambda e: setattr(e.docker, "base_image", "other/image:1"),
        lambda e: setattr(e.python, "pip_requirements", ["numpy"]),
        lambda e: setattr(e.python, "user_managed_dependencies", True),
        lambda e: setattr(e.docker, "platform", "linux/arm64"),
        lambda e: setattr(e.docker, "build_args", {"A": "1"}),
        lambda e: setattr(e.docker.base_image_registry, "address", "reg.local:5000"),
    ):
        env = Environment("a")
        mutate(env)
        variants.append(env.content_key().hex)
    assert len({*variants, base.content_key().hex}) == len(variants) + 1


def test_key_is_stable_across_processes():
    code = f"from dockyard import Environment; print(Environment.load({str(EXAMPLE)!r}).content_key().hex)"
    keys = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout for _ in range(2)}
    assert len(keys) == 1 and len(keys.pop().strip()) == 32
