"""What run tests share: the environments they run in and a source folder with one script."""

from __future__ import annotations

import sys
from pathlib import Path

from dockyard import Environment

PYTHON = "dockyard/base:bookworm-python3"

__all__ = ["PYTHON", "local_env", "python_env", "source"]


def python_env() -> Environment:
    """The python base image, nothing installed: a container run."""
    env = Environment("py")
    env.docker.base_image = PYTHON
    return env


def local_env(**variables: str) -> Environment:
    """This interpreter as a local process, with these declared variables."""
    env = Environment("local")
    env.docker.enabled = False
    env.python.interpreter_path = sys.executable
    env.environment_variables = dict(variables)
    return env


def source(tmp_path: Path, name: str, code: str) -> Path:
    """``tmp_path/src`` holding the script ``name`` (more scripts may be added to it)."""
    src = tmp_path / "src"
    src.mkdir(exist_ok=True)
    (src / name).write_text(code)
    return src
