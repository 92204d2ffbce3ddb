"""Human summaries of key parts for ``dockyard env key --explain`` (never showing credentials)."""

from __future__ import annotations

import os
from typing import Any

from ._environment import _FIELD_OF_PART, Environment

__all__ = ["changed_since_last_build", "describe_parts", "field_of_part"]


def field_of_part(part: str) -> str:
    """The environment field a key part comes from (``pip`` -> ``python.pip_requirements``)."""
    return _FIELD_OF_PART.get(part, part)


def _count(n: int, what: str) -> str:
    return f"{n} {what}{'' if n == 1 else 's'}"


def describe_parts(env: Environment, key: Any) -> list[tuple[str, str, str]]:
    """(part, its hash, a one-line summary) for each part of ``key``, in the key's order."""
    inputs = env.build_inputs()
    parts = env.key_parts(inputs=inputs)
    conda = parts.conda
    context = inputs.context
    summaries = {
        "base_image": parts.base_image or "(none: the Dockerfile defines the image)",
        "base_digest": parts.base_digest or "(not resolved: resolution happens at build time)",
        "dockerfile": _count(len(parts.dockerfile.splitlines()), "line") if parts.dockerfile else "(none)",
        "conda": (
            f"{_count(len(conda.get('dependencies') or ()), 'dependency')}, "
            f"channels {list(conda.get('channels') or [])}"
            if conda
            else "(none)"
        ),
        "pip": _count(len(parts.pip), "requirement") if parts.pip else "(none)",
        "user_managed": str(parts.user_managed).lower(),
        "platform": parts.platform,
        "build_args": ", ".join(sorted(parts.build_args)) or "(none)",
        # KeyParts holds the address only; credentials never reach it.
        "registry": parts.registry or "(none)",
        "context": (
            f"{_count(sum(1 for e in context.entries if e.kind == 'f'), 'file')} the Dockerfile reads from "
            f"{context.root} ({context.size} bytes)" if context is not None else "(none)"
        ),
        "lock": (f"{_count(len(env.lock.pins), 'pin')} from {env.lock.path}" if env.lock is not None else "(none)"),
    }
    return [(name, digest, summaries.get(name, "")) for name, digest in key.parts.items()]


def changed_since_last_build(file: str, key: Any) -> str | None:
    """Which parts of ``key`` differ from the image last built from this same spec file, in words
    (None: this file was never built here)."""
    from dockyard.cache import ImageCache

    from ._home import index_path

    if not index_path().exists():
        return None
    index = ImageCache(index_path())
    try:
        old_key = index.remembered_key(os.path.abspath(file))
        entry = index.lookup(old_key) if old_key else None
    finally:
        index.close()
    if entry is None:
        return None
    # `env key` does not resolve the base image (it works offline), so its digest part is not compared.
    # An optional part (context, lock) present on one side only is a change too.
    names = list(key.parts) + [n for n in entry.parts if n not in key.parts]
    differs = [name for name in names
               if name != "base_digest" and entry.parts and entry.parts.get(name) != key.parts.get(name)]
    if not differs:
        return f"no part changed (image {entry.image})"
    return "changed " + ", ".join(f"{name} ({field_of_part(name)})" for name in differs) + f"; was {entry.key}"
