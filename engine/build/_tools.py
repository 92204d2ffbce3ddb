"""Small local tool images that builds mount for one step and never keep (no registry needed).

``dockyard/tool:rattler-<version>-<script hash>`` holds py-rattler's package, copied from the Python
that runs dockyard, and the install script (``conda_install.py``). A conda build mounts it into the
one ``RUN`` that installs conda packages. It is made once per machine (≈80 MiB, a few seconds) and
found again by its tag, which changes with rattler's version or the script.

``dockyard/tool:uv-<version>-<script hash>`` holds the ``uv`` binary of the ``uv`` wheel installed
with dockyard (≈40 MiB) and its install script (``uv_install.py``); every build that installs pip
requirements mounts it into that one ``RUN``, so uv never enters an environment's image.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from ..dockerd import EngineClient
from ..errors import SpecError

__all__ = ["ensure_rattler_image", "ensure_uv_image", "uv_binary"]


def _rattler_files() -> tuple[str, dict[str, bytes | Path]]:
    try:
        import rattler
    except ImportError as exc:
        raise SpecError(
            "conda packages are installed with py-rattler, which is not installed with dockyard",
            field="python.conda_dependencies",
            hint="pip install 'dockyard[conda]' (or py-rattler) into dockyard's environment, "
            "or give the dependencies as pip packages",
        ) from exc
    from importlib.metadata import PackageNotFoundError, version

    try:
        ver = version("py-rattler")
    except PackageNotFoundError:  # pragma: no cover - a rattler not installed by pip
        ver = "unknown"
    package = Path(rattler.__file__).resolve().parent
    files: dict[str, bytes | Path] = {}
    for path in sorted(package.rglob("*")):
        if path.is_file() and "__pycache__" not in path.parts:
            files[f"rattler/{path.relative_to(package)}"] = path
    files["conda_install.py"] = Path(__file__).with_name("conda_install.py")
    return ver, files


def ensure_rattler_image(engine: EngineClient) -> str:
    """The tag of the rattler tool image, importing it into the engine when it is missing.

    Raises:
        SpecError: py-rattler is not installed with dockyard.
        EngineError, EngineUnavailable: the engine refused the import or went away.
    """
    from ._base_images import _import_rootfs
    from ._inputs import SpecTree, tar_chunks

    ver, files = _rattler_files()
    script = hashlib.sha256(Path(files["conda_install.py"]).read_bytes()).hexdigest()[:12]  # type: ignore[arg-type]
    tag = f"dockyard/tool:rattler-{ver}-{script}"
    if engine.inspect_image(tag) is not None:
        return tag
    tree = SpecTree(files)
    # The engine tags an import only once it is complete: no reader finds half a tool.
    _import_rootfs(engine, tar_chunks(tree.write_tar), tag, ["LABEL dockyard.tool=rattler"])
    return tag


def uv_binary() -> tuple[str, Path] | None:
    """(uv's version, its binary) from the ``uv`` wheel installed with dockyard, or None."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        from uv import find_uv_bin

        path = Path(find_uv_bin())
        ver = version("uv")
    except (ImportError, FileNotFoundError, PackageNotFoundError):
        return None
    return (ver, path) if path.is_file() and os.access(path, os.X_OK) else None


def ensure_uv_image(engine: EngineClient) -> str | None:
    """The tag of the uv tool image, importing it into the engine when it is missing; None when the
    ``uv`` wheel is not installed with dockyard (the caller installs with pip then).

    Raises:
        EngineError, EngineUnavailable: the engine refused the import or went away.
    """
    from ._base_images import _import_rootfs
    from ._inputs import SpecTree, tar_chunks

    found = uv_binary()
    if found is None:
        return None
    ver, binary = found
    script = Path(__file__).with_name("uv_install.py")
    digest = hashlib.sha256(script.read_bytes()).hexdigest()[:12]
    tag = f"dockyard/tool:uv-{ver}-{digest}"
    if engine.inspect_image(tag) is not None:
        return tag
    tree = SpecTree({"uv": binary, "uv_install.py": script})
    _import_rootfs(engine, tar_chunks(tree.write_tar), tag, ["LABEL dockyard.tool=uv"])
    return tag
