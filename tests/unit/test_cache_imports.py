"""What ``dockyard.cache`` imports, and what it exposes.

The read path (import, compute a key, look it up) must stay light: no sqlite_utils, docker or grpc.
The package must never import the engine (``dockyard`` outside ``dockyard.cache``).
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import dockyard.cache
import pytest
from dockyard.cache import ImageCache, KeyParts, compute_key

CACHE_DIR = Path(dockyard.cache.__file__).resolve().parent
HEAVY = ("sqlite_utils", "docker", "grpc")

_READ_PATH = f"""
import json, sys
import dockyard.cache as cache
key = cache.compute_key(cache.KeyParts("dockyard/base:bookworm-python3", pip=["numpy==2.1.0"]))
index = cache.ImageCache(sys.argv[1])
index.resolution("dockyard/base:bookworm-python3", max_age=60)
entry = index.lookup(key)
heavy = sorted(m for m in sys.modules if m.split(".")[0] in {set(HEAVY)!r})
# dockyard._lazy is the namespace package's own lazy loader (stdlib only), run by `import dockyard`.
engine = sorted(m for m in sys.modules if m.startswith("dockyard.") and m != "dockyard._lazy"
                and not m.startswith(("dockyard.cache", "dockyard.proto")))
print(json.dumps({{"hit": entry is not None, "heavy": heavy, "engine": engine}}))
"""


def _read_path(index: Path) -> dict[str, object]:
    out = subprocess.run(
        [sys.executable, "-c", _READ_PATH, str(index)], capture_output=True, text=True, check=True,
        timeout=60,
    ).stdout
    return json.loads(out)


@pytest.mark.parametrize("populated", [True, False], ids=["hit", "miss-on-a-fresh-path"])
def test_the_read_path_imports_neither_sqlite_utils_docker_nor_grpc(tmp_path: Path, populated: bool) -> None:
    index = tmp_path / "index.db"
    if populated:
        key = compute_key(KeyParts("dockyard/base:bookworm-python3", pip=["numpy==2.1.0"]))
        cache = ImageCache(index)
        for i in range(50):
            cache.record(f"{i:032x}", image=f"img{i}", image_id="id")
        cache.record(key, image="img", image_id="id")
        cache.remember_resolution("dockyard/base:bookworm-python3", "sha256:" + "0" * 64)
        cache.close()
    result = _read_path(index)
    assert result["hit"] is populated
    assert result["heavy"] == []
    assert result["engine"] == []


def test_the_read_path_check_can_fail(tmp_path: Path) -> None:
    """The probe does see a heavy import when there is one (so the test above is not vacuous)."""
    probe = _READ_PATH.replace(
        "import dockyard.cache as cache", "import dockyard.cache as cache\nimport sqlite_utils"
    )
    out = subprocess.run([sys.executable, "-c", probe, str(tmp_path / "i.db")],
                         capture_output=True, text=True, check=True, timeout=60).stdout
    assert "sqlite_utils" in json.loads(out)["heavy"]


def _imports(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            found.append((node.lineno, "." * node.level + (node.module or "")))
    return found


def test_no_module_of_dockyard_cache_imports_the_engine() -> None:
    modules = sorted(CACHE_DIR.glob("*.py"))
    assert len(modules) >= 5
    bad = []
    for path in modules:
        for line, name in _imports(path):
            if name.startswith(".."):
                bad.append(f"{path.name}:{line} relative import above the package: {name}")
            elif name.split(".")[0] == "dockyard" and not name.startswith("dockyard.cache"):
                bad.append(f"{path.name}:{line} imports the engine: {name}")
    assert bad == []


def test_heavy_imports_are_lazy_inside_functions() -> None:
    for path in sorted(CACHE_DIR.glob("*.py")):
        tree = ast.parse(path.read_text())
        for node in tree.body:  # module level only (TYPE_CHECKING blocks never run)
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                assert not any(n.split(".")[0] in HEAVY for n in names), f"{path.name}:{node.lineno}"


PUBLIC = {
    "OPTIONAL_PART_NAMES", "PART_NAMES", "SCHEMA_VERSION", "BuildResult", "BuildSlot", "CacheEntry", "CacheError",
    "CacheInputError", "CacheStats", "ContentKey", "GcFailure", "GcReport", "ImageCache",
    "IndexCorrupt", "IndexUnavailable", "InvalidKey", "InvalidKeyParts", "KeyParts", "LeaseLost",
    "PackageRecord", "PublishRecord", "WaitTimeout", "compute_key", "diff_keys", "FastHit", "fast_hit",
    "unresolved_key",
}


def test_the_public_surface_is_pinned() -> None:
    assert set(dockyard.cache.__all__) == PUBLIC
    for name in PUBLIC:
        assert getattr(dockyard.cache, name) is not None
    assert not [n for n in dockyard.cache.__all__ if n.startswith("_")]


def test_the_error_tree_is_rooted_at_cache_error_and_drawn_in_its_docstring() -> None:
    from dockyard.cache import errors

    doc = errors.__doc__ or ""
    for name in errors.__all__:
        cls = getattr(errors, name)
        assert issubclass(cls, dockyard.cache.CacheError)
        assert name in doc, f"{name} is missing from the drawn tree"
    assert dockyard.cache.CacheError.__bases__ == (Exception,)


def test_the_embedding_example_in_the_package_docstring_runs(tmp_path: Path) -> None:
    doc = dockyard.cache.__doc__ or ""
    block = doc.split("::\n", 1)[1].split("\n\n``", 1)[0]
    code = "\n".join(line[4:] for line in block.splitlines())
    assert "get_or_build" in code and "compute_key" in code

    class _Builder:  # stands in for "my_builder", the embedding tool's own builder
        @staticmethod
        def build(tag: str) -> str:
            return "sha256:" + "1" * 64

    code = code.replace("/var/cache/mytool/index.db", str(tmp_path / "index.db"))
    namespace: dict[str, object] = {"my_builder": _Builder}
    exec(compile(code, "<dockyard.cache docstring>", "exec"), namespace)
    entry, built = namespace["entry"], namespace["built"]
    assert built is True and entry.image.startswith("mytool/env:")  # type: ignore[attr-defined]
