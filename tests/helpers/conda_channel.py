"""A local conda channel of real packages, for tests of the conda install step.

No conda channel can be reached from the test machines, and a mocked solver would prove nothing. So the
tests build their own channel: real ``.tar.bz2`` conda packages (``info/index.json``, ``info/paths.json``,
``info/files`` and the payload) in ``noarch/``, indexed into ``repodata.json`` by rattler's own indexer,
the same one ``rattler-index`` runs. The solver and installer then read it through a ``file://`` URL
exactly as they would read conda-forge.

Pure stdlib plus ``rattler`` (the ``py-rattler`` distribution).
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import re
import tarfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["CondaPackage", "make_channel"]

# Fixed metadata so the same inputs give byte-identical packages (and so the same sha256 in repodata).
_MTIME = 1_700_000_000
_TIMESTAMP_MS = _MTIME * 1000


@dataclass(frozen=True)
class CondaPackage:
    """One package to put in the channel: ``files`` maps paths relative to the prefix to their bytes."""

    name: str
    version: str
    build: str = "0"
    depends: tuple[str, ...] = ()
    files: Mapping[str, bytes] = field(default_factory=dict)
    noarch: str = "generic"

    @property
    def filename(self) -> str:
        return f"{self.name}-{self.version}-{self.build}.tar.bz2"

    @property
    def build_number(self) -> int:
        # conda's convention: the build string ends in the build number ("0", "py_3", "h1a2b_5").
        match = re.search(r"(\d+)$", self.build)
        return int(match.group(1)) if match else 0


def _executable(path: str) -> bool:
    return path.startswith("bin/")


def _add(tar: tarfile.TarFile, name: str, data: bytes, mode: int = 0o644) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), mode, _MTIME
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


def _json(value: object) -> bytes:
    return (json.dumps(value, indent=2, sort_keys=True) + "\n").encode()


def _write_package(package: CondaPackage, subdir: Path) -> Path:
    index = {
        "name": package.name,
        "version": package.version,
        "build": package.build,
        "build_number": package.build_number,
        "depends": list(package.depends),
        "license": "MIT",
        "noarch": package.noarch,
        "subdir": "noarch",
        "timestamp": _TIMESTAMP_MS,
    }
    paths = {
        "paths": [
            {
                "_path": rel,
                "path_type": "hardlink",
                "sha256": hashlib.sha256(data).hexdigest(),
                "size_in_bytes": len(data),
            }
            for rel, data in sorted(package.files.items())
        ],
        "paths_version": 1,
    }
    listing = "".join(f"{rel}\n" for rel in sorted(package.files)).encode()
    out = subdir / package.filename
    with tarfile.open(out, "w:bz2") as tar:
        _add(tar, "info/index.json", _json(index))
        _add(tar, "info/paths.json", _json(paths))
        _add(tar, "info/files", listing)
        for rel, data in sorted(package.files.items()):
            _add(tar, rel, data, 0o755 if _executable(rel) else 0o644)
    return out


def make_channel(root: Path, packages: list[CondaPackage]) -> Path:
    """Write ``packages`` into the channel folder ``root`` (its ``noarch/``) and index it; returns ``root``.

    Use it as ``root.as_uri()`` (``file:///...``) wherever a channel name or URL goes.
    """
    from rattler.index import index_fs

    noarch = root / "noarch"
    noarch.mkdir(parents=True, exist_ok=True)
    for package in packages:
        _write_package(package, noarch)
    # index_fs is a coroutine in py-rattler 0.28. Plain repodata.json only: no .zst copy, no shards, so
    # the channel looks like the classic layout every conda client reads.
    asyncio.run(index_fs(root, write_zst=False, write_shards=False, force=True))
    return root
