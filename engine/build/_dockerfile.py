"""Rendering an :class:`Environment` into a Dockerfile plus a small build context.

The context travels inside the Solve request (BuildKit ``FrontendInputs``), so it stays small:
just the dependency specs. They are bind-mounted into the ``RUN`` that installs them
(``RUN --mount=type=bind``), so they never become an image layer — a requirements line with an
index URL and a token would otherwise sit in the image forever.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from .._conda import CondaDependencies, conda_spec
from .._environment import Environment

__all__ = ["ENV_PREFIX_ROOT", "RenderedBuild", "image_tag", "render_dockerfile"]

#: Dependencies are materialised at a key-named prefix, so two environments never share one.
ENV_PREFIX_ROOT = "/opt/dockyard/envs"
_MOUNT = "/tmp/dockyard-spec"
# Requests to BuildKit must stay well under its 4 MiB message limit (buildkit-notes §0).
MAX_CONTEXT_BYTES = 2 << 20


def image_tag(key: str) -> str:
    """The tag of the image built for a content key."""
    return f"dockyard/env:{key}"


@dataclass(frozen=True)
class RenderedBuild:
    """What BuildKit gets: the Dockerfile, context files, labels, and the run's interpreter."""

    dockerfile: str
    context: dict[str, bytes]
    labels: dict[str, str]
    python: str
    build_args: dict[str, str] = field(default_factory=dict)


def _pip_file(lines: list[str]) -> bytes:
    return ("\n".join(lines) + "\n").encode()


def _conda_file(spec: dict[str, Any]) -> bytes:
    # JSON is YAML: conda, mamba and micromamba all read it, and it needs no YAML writer here.
    body = {k: v for k, v in spec.items() if k not in ("name", "prefix")}
    return json.dumps(body, indent=1, sort_keys=True).encode()


def _conda_steps(prefix: str, with_pip: bool) -> str:
    pip = (
        f' && "{prefix}/bin/python" -m pip install --no-cache-dir -r {_MOUNT}/requirements.txt'
        if with_pip
        else ""
    )
    return (
        f"RUN --mount=type=bind,target={_MOUNT} set -e; \\\n"
        "    if command -v micromamba >/dev/null 2>&1; then M=micromamba; CREATE=\"micromamba create -y\"; \\\n"
        "    elif command -v mamba >/dev/null 2>&1; then M=mamba; CREATE=\"mamba env create\"; \\\n"
        "    elif command -v conda >/dev/null 2>&1; then M=conda; CREATE=\"conda env create\"; \\\n"
        "    else echo 'dockyard: this environment has a conda spec but the base image has no conda, "
        "mamba or micromamba; use a base image that has one, or give the dependencies as pip_requirements' >&2; "
        "exit 127; fi; \\\n"
        f"    $CREATE -p {prefix} -f {_MOUNT}/conda.yml{pip} && ($M clean -afy >/dev/null 2>&1 || true)\n"
    )


def _venv_steps(prefix: str, python_version: str | None = None) -> str:
    check = ""
    if python_version:
        # conda's "python=3.11" means 3.11.*: the base's python3 must be that version.
        want = python_version.strip().rstrip(".*")
        check = (
            f'    have=$(python3 -c \'import platform; print(platform.python_version())\'); \\\n'
            f'    case "$have" in {want}|{want}.*) ;; *) echo "dockyard: the conda spec asks for python={want} but the '
            f'base image has Python $have; without a conda channel only the base image\'s Python can be used: '
            f'drop the python pin or use a base image with Python {want}" >&2; exit 1;; esac; \\\n'
        )
    return (
        f"RUN --mount=type=bind,target={_MOUNT} set -e; \\\n"
        "    command -v python3 >/dev/null 2>&1 || { echo 'dockyard: pip requirements need python3 in the "
        "base image; use dockyard/base:<suite>-python3 or an image with python3' >&2; exit 127; }; \\\n"
        f"{check}"
        f"    python3 -m venv {prefix} && {prefix}/bin/python -m pip install --no-cache-dir "
        f"-r {_MOUNT}/requirements.txt\n"
    )


def render_dockerfile(env: Environment, key: Any) -> RenderedBuild:
    """Render the build for ``env`` whose content key is ``key`` (a ``ContentKey``).

    Raises:
        SpecError: the environment is invalid, or its context is too large to send.
    """
    from ..errors import SpecError

    parts = env.key_parts()
    prefix = f"{ENV_PREFIX_ROOT}/{key.hex}"
    header = f"# Rendered by dockyard for content key {key.hex}: edit the environment, not this file.\n"
    if parts.dockerfile is not None:
        # The user's own lines come first and unchanged, so build errors point at *their* line numbers.
        text = env.docker.base_dockerfile or ""
        lines = [text.rstrip("\n") + "\n"]
    else:
        from ._registry import qualify

        registry = env.docker.base_image_registry
        base = qualify(parts.base_image, registry if registry.address else None)
        lines = [header, f"FROM {base}\n"]
    context: dict[str, bytes] = {}
    python = env.python.interpreter_path
    if not env.python.user_managed_dependencies:
        conda = conda_spec(env.python.conda_dependencies)
        pip = list(env.python.pip_requirements)
        spec = CondaDependencies(_underlying_structure=conda) if conda is not None else None
        if spec is not None and spec._is_pip_only():
            # Only pip packages (Azure ML's CondaDependencies.create(pip_packages=...)): a venv
            # installs them, no conda needed; a python= pin must match the base image's Python.
            pip = [*spec.pip_options, *spec.pip_packages, *pip]
            conda, wanted_python = None, spec.get_python_version()
        else:
            wanted_python = None
        if conda is not None:
            context["conda.yml"] = _conda_file(conda)
            if pip:
                context["requirements.txt"] = _pip_file(pip)
            lines.append(_conda_steps(prefix, bool(pip)))
        elif pip:
            context["requirements.txt"] = _pip_file(pip)
            lines.append(_venv_steps(prefix, wanted_python))
        if conda is not None or pip:
            lines.append(f'ENV PATH="{prefix}/bin:$PATH" VIRTUAL_ENV="{prefix}"\n')
            python = f"{prefix}/bin/python"
    if parts.dockerfile is not None:
        lines.append(header)
    labels = {
        "dockyard.key": key.hex,
        "dockyard.schema": str(key.schema),
        "dockyard.python": python,
        **{f"dockyard.part.{name}": digest for name, digest in key.parts.items()},
    }
    rendered = RenderedBuild("".join(lines), context, labels, python, dict(env.docker.build_args))
    size = len(rendered.dockerfile) + sum(len(v) for v in context.values())
    if size > MAX_CONTEXT_BYTES:
        raise SpecError(
            f"the rendered build is {size} bytes, over the {MAX_CONTEXT_BYTES}-byte limit of one request",
            path=env._source,
            hint="move large files out of the Dockerfile and dependency lists",
        )
    return rendered
