"""Near misses: which built environment a new one can start from (pure logic, no engine).

An environment that misses the cache often differs from one already built only in its Python
dependencies (a package added, a pin moved). Then the build starts ``FROM`` that neighbour's image
and uv changes only what differs (``uv pip sync`` to the new resolution): seconds instead of a full
install, and a layer holding only the difference instead of a whole new copy. The result is the
package set a clean build resolves (the resolution is done afresh, it never prefers what the
neighbour holds), so the key keeps meaning what it meant.

A neighbour qualifies when every part of its key but the dependency parts (``pip``, ``conda``,
``lock``) is equal (same base image and digest, platform, build args, registry), when its packages
live in a venv (pip requirements, or a conda spec of pip packages only: no conda packages), when
no Dockerfile of the user's is involved (its ``ARG``s and stages do not carry over to a ``FROM``),
and when the image is not too deep already (each near miss adds a layer).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

__all__ = ["DEPENDENCY_PARTS", "MAX_LAYERS", "Candidate", "pick_neighbour", "requirement_names"]

#: The parts a near miss may differ in: what the installer changes.
DEPENDENCY_PARTS = frozenset({"pip", "conda", "lock"})
#: A neighbour with more layers than this is not built on (overlayfs allows 128 in all).
MAX_LAYERS = 32

_NAME = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)")


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_names(lines: Iterable[str]) -> set[str]:
    """The project names requirement lines name (options and paths left out), normalised."""
    names = set()
    for line in lines:
        text = line.strip()
        if not text or text.startswith(("-", "/", ".", "#")) or "://" in text.split(" @ ")[0]:
            continue
        m = _NAME.match(text)
        if m:
            names.add(_normalize(m.group(1)))
    return names


@dataclass(frozen=True)
class Candidate:
    """A built environment that might serve as a neighbour.

    Attributes:
        key: its key.
        parts: its key's part hashes.
        layout: ``"venv"``, ``"conda"``, or ``""`` when no resolution was recorded (built before).
        packages: the names it resolved to (empty when not recorded).
        last_used: for ties, the most recently used wins.
    """

    key: str
    parts: Mapping[str, str]
    layout: str
    packages: frozenset[str]
    last_used: float


def qualifies(parts: Mapping[str, str], other: Candidate, *, no_conda: str, no_dockerfile: str) -> bool:
    """``other`` may be the neighbour of the key with ``parts`` (see the module docstring).

    ``no_conda`` / ``no_dockerfile`` are the hashes of an absent conda spec / Dockerfile (the
    caller has them from the key code): an environment without a conda spec is a venv for sure.
    """
    if other.key == parts.get("_key") or parts.get("dockerfile") != no_dockerfile:
        return False
    names = (set(parts) | set(other.parts)) - DEPENDENCY_PARTS - {"_key"}
    if any(parts.get(n) != other.parts.get(n) for n in names):
        return False
    # A lock's label would outlive it in a FROM: a neighbour may only have fewer optional parts.
    if "lock" in other.parts and "lock" not in parts:
        return False
    if other.layout == "conda":
        return False
    return other.layout == "venv" or other.parts.get("conda") == no_conda


def pick_neighbour(
    parts: Mapping[str, str],
    key: str,
    wanted: set[str],
    candidates: Iterable[Candidate],
    *,
    no_conda: str,
    no_dockerfile: str,
) -> Candidate | None:
    """The best neighbour for the key ``key`` with ``parts`` whose requirements name ``wanted``:
    the qualifying candidate sharing the most of those names, then the most recently used."""
    mine = {**parts, "_key": key}
    fit = [c for c in candidates if qualifies(mine, c, no_conda=no_conda, no_dockerfile=no_dockerfile)]
    if not fit:
        return None
    return max(fit, key=lambda c: (len(wanted & c.packages), c.last_used, c.key))
