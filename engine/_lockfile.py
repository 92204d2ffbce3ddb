"""Pinned locks next to an environment file: ``environment.yml`` -> ``environment.lock.txt``.

``dockyard env lock FILE`` writes one from the resolution a build recorded (the versions the image
holds, see ``dockyard env show``); from then on a build of ``FILE`` installs exactly those pins and
the content key covers them (its ``lock`` part). The lock says which requirements it was made from
(the hashes of the key's ``pip`` and ``conda`` parts): when the spec's requirements change, the lock
is stale and a build refuses it (lock again, or delete it) instead of installing pins that no
longer match the spec.

The file is a pip requirements file (``pip install -r`` reads it too): the index options of the
spec, then one ``name==version`` line per package. Paths of local files are the host's.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from .errors import SpecError

__all__ = ["LOCK_SUFFIX", "PipLock", "format_lock", "lock_path", "read_lock"]

LOCK_SUFFIX = ".lock.txt"
_HEADER = re.compile(r"^#\s*dockyard-lock:\s*1\s+pip=([0-9a-f]{32})\s+conda=([0-9a-f]{32})\s*$")
#: Option lines a lock keeps from the spec: where packages come from. Constraints and hashes are
#: already met by the pins (and ``--require-hashes`` would refuse pins without hashes).
_KEPT_OPTIONS = ("-i", "--index-url", "--extra-index-url", "--no-index", "-f", "--find-links", "--pre",
                 "--trusted-host", "--only-binary", "--no-binary", "--prefer-binary")


def lock_path(spec: str | os.PathLike[str]) -> Path:
    """Where the lock of an environment file lives: next to it, ``<stem>.lock.txt``."""
    spec = Path(spec)
    return spec.with_name(spec.stem + LOCK_SUFFIX)


@dataclass(frozen=True)
class PipLock:
    """A lock read from its file.

    Attributes:
        path: the file.
        lines: what a build installs: the option lines, then the pins (host paths, as written).
        pip_part: the ``pip`` part hash of the requirements it was made from.
        conda_part: the ``conda`` part hash of the spec it was made from.
    """

    path: Path
    lines: tuple[str, ...]
    pip_part: str
    conda_part: str

    @property
    def pins(self) -> tuple[str, ...]:
        """The package lines (options left out)."""
        return tuple(line for line in self.lines if not line.startswith("-"))


def read_lock(path: str | os.PathLike[str]) -> PipLock | None:
    """The lock at ``path``, or None when there is none.

    Raises:
        SpecError: the file is unreadable, or was not written by ``dockyard env lock``.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise SpecError(f"cannot read the lock: {exc}", path=str(path),
                        hint="delete it, or write it again with `dockyard env lock`") from exc
    header = None
    lines: list[str] = []
    for raw in text.splitlines():
        line = raw.strip()
        m = _HEADER.match(line)
        if m:
            header = m
        elif line and not line.startswith("#"):
            lines.append(" ".join(line.split()))
    if header is None:
        raise SpecError("is not a lock written by `dockyard env lock` (no '# dockyard-lock: 1 …' line)",
                        path=str(path), hint="delete it, or write it again with `dockyard env lock`")
    if not any(not line.startswith("-") for line in lines):
        raise SpecError("pins no package", path=str(path), hint="write it again with `dockyard env lock`")
    return PipLock(path, tuple(lines), header.group(1), header.group(2))


def lock_options(lines: list[str] | tuple[str, ...]) -> list[str]:
    """The option lines of ``lines`` a lock keeps (see :data:`_KEPT_OPTIONS`), in order."""
    kept = []
    for line in lines:
        if line.startswith("-"):
            option = line.split("=", 1)[0].split(None, 1)[0]
            if option in _KEPT_OPTIONS and line not in kept:
                kept.append(line)
    return kept


def format_lock(*, spec_name: str, options: list[str], pins: list[str], pip_part: str, conda_part: str,
                source: str) -> str:
    """The text of a lock file (see the module docstring)."""
    head = [
        f"# Pinned by `dockyard env lock {spec_name}` from {source}.",
        f"# Edit {spec_name}, not this file, then lock again; `dockyard env build` installs exactly these.",
        f"# dockyard-lock: 1 pip={pip_part} conda={conda_part}",
    ]
    return "\n".join([*head, *options, *sorted(pins, key=lambda p: p.lower())]) + "\n"
