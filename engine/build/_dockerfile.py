"""Rendering an :class:`Environment` into a Dockerfile plus the files its build reads.

Dependency files (requirements, the conda spec, the local files pip lines name, local conda
channels) are bind-mounted into the ``RUN`` that installs them (``RUN --mount=type=bind``), so
they never become an image layer — a requirements line with an index URL and a token would
otherwise sit in the image forever. How they travel is :mod:`._inputs`' concern: as the build's
context when the image has no context of its own, else as a separate input mounted ``from=``.

Conda packages are solved and installed by py-rattler (the library behind pixi), not by a conda
binary: dockyard's base images have none, and no registry is needed to bring one in. rattler comes
from dockyard's own installation as a small local tool image (``dockyard/tool:rattler-<version>``,
made once by :func:`._tools.ensure_rattler_image`) mounted into that one ``RUN`` and never left in
the environment's image; it runs on the base image's ``python3`` (3.10 or newer).

pip requirements (and a conda spec's pip section) are installed by uv, brought in the same way
(``dockyard/tool:uv-<version>``, see :func:`._tools.ensure_uv_image`) and run by ``uv_install.py``
with a BuildKit cache mount (``id=dockyard-uv``) for its downloads, so a rebuild downloads nothing
it has seen. ``DOCKYARD_INSTALLER=pip`` renders the pip step dockyard used before uv. Either way
the installing step writes what it resolved to ``/opt/dockyard/resolved/<key>.txt``, which the
builder turns into the image's ``dockyard.resolved`` label and the index's record.

A near miss (see :mod:`._nearmiss`) starts ``FROM`` its neighbour's image and lets uv change the
neighbour's environment into the new one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .._conda import CondaDependencies
from .._context import BuildContext
from .._environment import BuildInputs, Environment, pip_lines
from .._requirements import SPEC_MOUNT
from ._inputs import SpecTree

__all__ = ["ENV_PREFIX_ROOT", "RECORD_ROOT", "NeighbourImage", "RenderedBuild", "image_tag", "render_dockerfile"]

#: Dependencies are materialised at a key-named prefix, so two environments never share one.
ENV_PREFIX_ROOT = "/opt/dockyard/envs"
_MOUNT = SPEC_MOUNT
_TOOL = "/opt/dockyard/tool"
#: Shown in a rendered Dockerfile where a build puts its own per-build tag.
SPEC_IMAGE_PLACEHOLDER = "dockyard/build-input:spec"
#: Shown where a build puts the tag of the rattler tool image.
RATTLER_PLACEHOLDER = "dockyard/tool:rattler"
#: Shown where a build puts the tag of the uv tool image.
UV_PLACEHOLDER = "dockyard/tool:uv"
#: Where an installing step writes what it resolved (``<key>.txt``); tiny, kept in the image.
RECORD_ROOT = "/opt/dockyard/resolved"
_UV = "/opt/dockyard/uv"
#: uv's download cache: a BuildKit cache mount shared by every build on the engine. ``shared``, not
#: ``locked``: uv's own cache is made for concurrent processes (every entry is written aside and
#: renamed into place), and ``locked`` would make the installing steps of different environments
#: take turns — measured in benchmarks/build_times.py, two near misses at once took 9-33 % longer
#: locked on 2 cores, and more cores only widen that. What a race could still do (an entry emptied by
#: a step that found the cache damaged while another reads it) fails that uv call, which
#: uv_install.py retries without the cache, and every installed file is checked against its RECORD.
UV_CACHE_MOUNT = "--mount=type=cache,id=dockyard-uv,target=/tmp/dockyard-uv-cache,sharing=shared"


@dataclass(frozen=True)
class NeighbourImage:
    """The built environment a near miss starts from (see :mod:`._nearmiss`).

    Attributes:
        key: its key.
        image: its image reference (``dockyard/env:<key>``).
        prefix: its environment's folder in the image.
        path: its ``PATH`` without any dockyard environment's ``bin`` in it.
    """

    key: str
    image: str
    prefix: str
    path: str


def image_tag(key: str) -> str:
    """The tag of the image built for a content key."""
    return f"dockyard/env:{key}"


@dataclass(frozen=True)
class RenderedBuild:
    """What BuildKit gets: the Dockerfile, the files it reads, labels, and the run's interpreter.

    ``context`` holds small dependency files that travel in the request; ``spec`` is every
    dependency file (``spec_from_image``: they are mounted from a separate input image, because the
    Dockerfile's own ``context`` takes the context slot); ``uses_rattler``: conda packages are
    installed, the rattler tool image must exist.
    """

    dockerfile: str
    context: dict[str, bytes]
    labels: dict[str, str]
    python: str
    build_args: dict[str, str] = field(default_factory=dict)
    spec: SpecTree = field(default_factory=lambda: SpecTree({}))
    user_context: BuildContext | None = None
    spec_from_image: bool = False
    uses_rattler: bool = False
    #: Where the installing step writes its resolution (None: nothing is installed by pip or uv).
    record_path: str | None = None
    #: ``venv`` or ``conda``: where the Python packages go (None: nowhere).
    layout: str | None = None
    #: ``uv`` or ``pip``: what installs the pip requirements (None: none to install).
    installer: str | None = None
    uses_uv: bool = False
    neighbour: NeighbourImage | None = None


def _pip_file(lines: list[str]) -> bytes:
    return ("\n".join(lines) + "\n").encode()


def _conda_file(spec: dict[str, Any]) -> bytes:
    # JSON is YAML: any conda tool reads it, and it needs no YAML writer here.
    body = {k: v for k, v in spec.items() if k not in ("name", "prefix")}
    return json.dumps(body, indent=1, sort_keys=True).encode()


def _local_channels(spec: dict[str, Any], files: dict[str, bytes | Path]) -> dict[str, Any]:
    """``spec`` with each local channel (``file://`` or a folder) moved to where the build mounts it."""
    channels, names = [], {}
    for i, channel in enumerate(spec.get("channels") or []):
        text = str(channel)
        path = text[len("file://"):] if text.startswith("file://") else text if text.startswith("/") else None
        if path is not None and Path(path).is_dir():
            files[f"channels/{i}"] = Path(path)
            channels.append(f"file://{_MOUNT}/channels/{i}")
            names[channels[-1]] = text  # the install step's messages name the channel as written
        else:
            channels.append(text)
    return {**spec, "channels": channels, **({"dockyard_channel_names": names} if names else {})}


def _spec_mount(from_image: str | None) -> str:
    source = f",from={from_image}" if from_image else ""
    return f"--mount=type=bind{source},target={_MOUNT}"


def _uv_command(prefix: str, record: str, mode: str, old: str | None = None, fresh: str | None = None) -> str:
    near = f" --from {old}" if old else ""
    # --fresh NONCE: a --no-cache build; the nonce makes a step text BuildKit's cache has never seen.
    again = f" --fresh {fresh}" if fresh else ""
    return (f"python3 -s {_UV}/uv_install.py --uv {_UV}/uv --cache /tmp/dockyard-uv-cache "
            f"--requirements {_MOUNT}/requirements.txt --prefix {prefix} --record {record} --mode {mode}{near}{again}")


def _pip_record(prefix: str, record: str, mode: str) -> str:
    """Shell that writes ``pip freeze`` of ``prefix`` as the step's resolution (the pip installer)."""
    return (f'mkdir -p {RECORD_ROOT} && {{ echo "# installer: pip"; echo "# mode: {mode}"; '
            f'"{prefix}/bin/python" -m pip freeze; }} > {record}')


def _conda_steps(prefix: str, with_pip: bool, spec_from: str | None, tool: str, *, uv: str | None = None,
                 record: str = "", fresh: str | None = None) -> str:
    if not with_pip:
        pip = ""
    elif uv is not None:
        pip = f" && {_uv_command(prefix, record, 'into', fresh=fresh)}"
    else:
        pip = (f' && "{prefix}/bin/python" -m pip install --no-cache-dir -r {_MOUNT}/requirements.txt'
               f" && {_pip_record(prefix, record, 'conda')}")
    uv_mounts = f"--mount=type=bind,from={uv},target={_UV} {UV_CACHE_MOUNT} " if uv is not None and with_pip else ""
    return (
        f"RUN --mount=type=bind,from={tool},target={_TOOL} {uv_mounts}{_spec_mount(spec_from)} set -e; \\\n"
        "    command -v python3 >/dev/null 2>&1 || { echo 'dockyard: conda packages are installed by py-rattler, "
        "which runs on python3 (3.10 or newer) of the base image, and this base image has none; use "
        "dockyard/base:<suite>-python3 or an image with python3' >&2; exit 127; }; \\\n"
        f"    PYTHONPATH={_TOOL} python3 -s {_TOOL}/conda_install.py {_MOUNT}/conda.yml {prefix}; \\\n"
        # A conda spec without python (a channel of tools only) still gets an interpreter to run with.
        f"    [ -x {prefix}/bin/python ] || python3 -m venv {prefix}{pip}\n"
    )


def _venv_steps(prefix: str, python_version: str | None, spec_from: str | None, *, uv: str | None = None,
                record: str = "", neighbour: NeighbourImage | None = None, fresh: str | None = None) -> str:
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
    if uv is not None:
        mounts = f"--mount=type=bind,from={uv},target={_UV} {_spec_mount(spec_from)} {UV_CACHE_MOUNT}"
        mode = ("near", neighbour.prefix) if neighbour is not None else ("venv", None)
        install = f"    {_uv_command(prefix, record, *mode, fresh=fresh)}\n"
    else:
        mounts = _spec_mount(spec_from)
        install = (f"    python3 -m venv {prefix} && {prefix}/bin/python -m pip install --no-cache-dir "
                   f"-r {_MOUNT}/requirements.txt && {_pip_record(prefix, record, 'venv')}\n")
    return (
        f"RUN {mounts} set -e; \\\n"
        "    command -v python3 >/dev/null 2>&1 || { echo 'dockyard: pip requirements need python3 in the "
        "base image; use dockyard/base:<suite>-python3 or an image with python3' >&2; exit 127; }; \\\n"
        f"{check}"
        f"{install}"
    )


def needs_rattler(env: Environment, inputs: BuildInputs) -> bool:
    """The build installs conda packages (not only a pip section): it mounts the rattler tool."""
    if env.python.user_managed_dependencies or inputs.conda is None:
        return False
    return not CondaDependencies(_underlying_structure=inputs.conda)._is_pip_only()


def render_dockerfile(
    env: Environment,
    key: Any,
    *,
    inputs: BuildInputs | None = None,
    spec_image: str = SPEC_IMAGE_PLACEHOLDER,
    rattler_image: str = RATTLER_PLACEHOLDER,
    installer: str = "uv",
    uv_image: str = UV_PLACEHOLDER,
    neighbour: NeighbourImage | None = None,
    fresh: str | None = None,
) -> RenderedBuild:
    """Render the build for ``env`` whose content key is ``key`` (a ``ContentKey``).

    Args:
        inputs: ``env.build_inputs()`` when the caller has it already (it hashes the context).
        spec_image: the tag dependency files are mounted from when the Dockerfile has a context.
        rattler_image: the tag of the rattler tool image (conda packages).
        installer: ``uv`` or ``pip``: what installs pip requirements.
        uv_image: the tag of the uv tool image.
        neighbour: a near miss's neighbour (uv, a venv, no Dockerfile of the user's): the build
            starts from its image and changes its environment.
        fresh: a ``--no-cache`` build by uv (a nonce): the installing step downloads and compiles
            everything itself, leaving the shared download cache as it is, and its text is new, so
            BuildKit's cache cannot answer it.

    Raises:
        SpecError: the environment is invalid.
    """
    inputs = env.build_inputs() if inputs is None else inputs
    parts = env.key_parts(inputs=inputs)
    prefix = f"{ENV_PREFIX_ROOT}/{key.hex}"
    header = f"# Rendered by dockyard for content key {key.hex}: edit the environment, not this file.\n"
    if parts.dockerfile is not None:
        # The user's own lines come first and unchanged, so build errors point at *their* line numbers.
        lines = [parts.dockerfile.rstrip("\n") + "\n"]
    else:
        from ._registry import qualify

        registry = env.docker.base_image_registry
        base = qualify(parts.base_image, registry if registry.address else None)
        lines = [header, f"FROM {base}\n"]
    files: dict[str, bytes | Path] = dict(inputs.files)
    spec_from = spec_image if inputs.context is not None else None
    python = env.python.interpreter_path
    uses_rattler = False
    record = layout = used = None
    if not env.python.user_managed_dependencies:
        conda = inputs.conda
        # A lock replaces the requirements: the build installs exactly its pins.
        pip = list(inputs.lock) if inputs.lock is not None else pip_lines(inputs)
        spec = CondaDependencies(_underlying_structure=conda) if conda is not None else None
        if spec is not None and spec._is_pip_only():
            # Only pip packages (Azure ML's CondaDependencies.create(pip_packages=...)): a venv
            # installs them, no conda needed; a python= pin must match the base image's Python.
            conda, wanted_python = None, spec.get_python_version()
        else:
            wanted_python = None
        uv = uv_image if installer == "uv" and pip else None
        record = f"{RECORD_ROOT}/{key.hex}.txt" if pip else None
        if conda is not None:
            files["conda.yml"] = _conda_file(_local_channels(conda, files))
            if pip:
                files["requirements.txt"] = _pip_file(pip)
            lines.append(_conda_steps(prefix, bool(pip), spec_from, rattler_image, uv=uv, record=record or "",
                                      fresh=fresh))
            uses_rattler, layout = True, "conda"
        elif pip:
            files["requirements.txt"] = _pip_file(pip)
            lines.append(_venv_steps(prefix, wanted_python, spec_from, uv=uv, record=record or "",
                                     neighbour=neighbour if uv is not None and parts.dockerfile is None else None,
                                     fresh=fresh))
            layout = "venv"
        if conda is not None or pip:
            path = "$PATH"
            if neighbour is not None and layout == "venv" and uv is not None and parts.dockerfile is None:
                path = neighbour.path.replace("$", "\\$")  # the neighbour's own bin is not in it
            lines.append(f'ENV PATH="{prefix}/bin:{path}" VIRTUAL_ENV="{prefix}"\n')
            python = f"{prefix}/bin/python"
        used = ("uv" if uv is not None else "pip") if pip else None
    near = neighbour if used == "uv" and layout == "venv" and parts.dockerfile is None else None
    if near is not None:
        lines[0] += f"# A near miss: it starts from the environment {near.key}, built on {lines[1][5:].strip()}.\n"
        lines[1] = f"FROM {near.image}\n"
    if parts.dockerfile is not None:
        lines.append(header)
    labels = {
        "dockyard.key": key.hex,
        "dockyard.schema": str(key.schema),
        "dockyard.python": python,
        **{f"dockyard.part.{name}": digest for name, digest in key.parts.items()},
    }
    tree = SpecTree(files)
    inline = tree.inline() if spec_from is None else None
    return RenderedBuild(
        "".join(lines),
        inline if inline is not None else {},
        labels,
        python,
        dict(env.docker.build_args),
        spec=tree,
        user_context=inputs.context,
        spec_from_image=spec_from is not None and bool(files),
        uses_rattler=uses_rattler,
        record_path=record,
        layout=layout,
        installer=used,
        uses_uv=used == "uv",
        neighbour=near,
    )
