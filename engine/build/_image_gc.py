"""Image GC: the index's LRU policy applied to the engine's images, never to one a container uses."""

from __future__ import annotations

import urllib.parse
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .._home import dockyard_home, index_path
from ..dockerd import EngineClient
from ..errors import DockyardError, EngineError, InputError

if TYPE_CHECKING:  # pragma: no cover
    from dockyard.cache import CacheEntry, GcReport

__all__ = ["collect_build_inputs", "collect_garbage", "image_names", "images_in_use", "parse_size",
           "prune_build_cache", "remove_image"]

_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(text: str) -> int:
    """``"10G"``, ``"500MiB"``, ``"1048576"`` -> bytes.

    Raises:
        InputError: not a size.
    """
    raw = text.strip().lower().replace(" ", "")
    number = raw.rstrip("kmgtib")
    unit = raw[len(number):]
    try:
        value = float(number)
    except ValueError:
        value = -1.0
    if unit not in _UNITS or value < 0:
        raise InputError(f"{text!r} is not a size", hint="write e.g. 20G, 500MiB or a number of bytes")
    return int(value * _UNITS[unit])


def images_in_use(engine: EngineClient) -> set[str]:
    """Image IDs of every container that exists (running or stopped): GC must not pull them away."""
    reply = engine.request("GET", "/containers/json?all=1")
    if reply.status != 200:
        raise EngineError(f"listing containers answered HTTP {reply.status}", status=reply.status)
    return {str(c.get("ImageID", "")) for c in reply.json() or []}


def remove_image(engine: EngineClient, ref: str) -> None:
    """Delete one tag from the engine (an image that is already gone is fine).

    Raises:
        EngineError: the engine refused (e.g. a container still uses it).
    """
    reply = engine.request("DELETE", f"/images/{urllib.parse.quote(ref, safe='')}")
    if reply.status in (200, 404):
        return
    try:
        message = str(reply.json().get("message", ""))
    except (ValueError, DockyardError):
        message = reply.body[:200].decode(errors="replace")
    raise EngineError(f"removing {ref}: {message or f'HTTP {reply.status}'}", status=reply.status)


def collect_garbage(
    *,
    keep_bytes: int | None = None,
    keep_days: float | None = None,
    dry_run: bool = False,
    engine: EngineClient | None = None,
    home: Path | None = None,
) -> GcReport:
    """Remove least-recently-used environment images until the limits hold.

    Pinned images and images that any container (running or stopped) uses are never removed.

    Args:
        keep_bytes: shrink the images to at most this many bytes.
        keep_days: remove images unused for more than this many days.
        dry_run: report what would be removed; change nothing.
        engine: the engine holding the images (default from ``DOCKER_HOST``).
        home: dockyard's home (default ``$DOCKYARD_HOME``).

    Raises:
        InputError: neither limit given.
        EngineUnavailable, EngineError: the engine cannot list containers.
    """
    from dockyard.cache import ImageCache

    if keep_bytes is None and keep_days is None:
        raise InputError("image GC needs a limit", hint="give --keep-bytes SIZE and/or --keep-days N")
    engine = engine or EngineClient.from_env()
    index = ImageCache(index_path(home))
    try:
        used = images_in_use(engine)
        in_use = [e.key for e in index.entries() if e.image_id in used]
        from ._builder import home_label

        mine = home_label(home or dockyard_home())

        def remove(entry: CacheEntry) -> None:
            # An image another home's index owns (a shared engine, the same key built there last)
            # is forgotten here but kept in the engine: that home still uses it.
            labels = engine.image_labels(entry.image) or {}
            if labels.get("dockyard.home", mine) == mine:
                remove_image(engine, entry.image)

        return index.gc(keep_bytes=keep_bytes, keep_days=keep_days, in_use=in_use, dry_run=dry_run, remove=remove)
    finally:
        index.close()


#: A per-build input older than this belongs to a build that died before removing it.
_STALE_INPUT_S = 24 * 3600.0


def collect_build_inputs(
    *, keep_days: float | None, dry_run: bool = False, engine: EngineClient | None = None,
) -> list[dict[str, object]]:
    """Remove build inputs nothing needs any more: per-build context/spec images older than a day
    (their build died before removing them) and large-file blobs older than ``keep_days`` (they
    only speed up later builds). Images a container uses are kept.

    Returns one ``{"image", "size", "why"}`` per image removed (or, with ``dry_run``, to remove).

    Raises:
        EngineUnavailable, EngineError: the engine cannot list images or containers.
    """
    import time

    engine = engine or EngineClient.from_env()
    used = images_in_use(engine)
    now = time.time()
    out: list[dict[str, object]] = []
    for image in _images(engine, "dockyard/build-input"):
        if image.get("Id") in used:
            continue
        age = now - float(image.get("Created") or now)
        for tag in image.get("RepoTags") or []:
            name = tag.split(":", 1)[1] if ":" in tag else ""
            blob = name.startswith("blob-")
            if blob and (keep_days is None or age <= keep_days * 86400):
                continue
            if not blob and age <= _STALE_INPUT_S:
                continue  # a build may be using it right now
            out.append({"image": tag, "size": int(image.get("Size") or 0),
                        "why": "unused large-file blob" if blob else "left by a build that did not finish"})
            if not dry_run:
                remove_image(engine, tag)
    return out


def prune_build_cache(*, keep_bytes: int = 0, engine: EngineClient | None = None) -> int:
    """``Control.Prune`` on the engine's BuildKit: drop build-cache records beyond ``keep_bytes``
    (images are not touched). Returns the bytes freed.

    Raises:
        EngineUnavailable, BuildKitUnavailable: the engine or its BuildKit cannot be reached.
    """
    from ._buildkit import BuildKitClient

    engine = engine or EngineClient.from_env()
    with BuildKitClient("docker", engine=engine) as client:
        return client.prune(keep_bytes=keep_bytes)


def _images(engine: EngineClient, reference: str) -> list[dict[str, Any]]:
    """``GET /images/json`` for one repository: every image with its tags, labels, size, age.

    Raises:
        EngineUnavailable, EngineError: the engine cannot be asked.
    """
    import json

    filters = urllib.parse.quote(json.dumps({"reference": [reference]}))
    reply = engine.request("GET", f"/images/json?filters={filters}")
    if reply.status != 200:
        raise EngineError(f"listing {reference} images answered HTTP {reply.status}", status=reply.status)
    return list(reply.json() or [])


def image_names(engine: EngineClient | None = None) -> dict[str, str]:
    """tag -> the environment name each ``dockyard/env`` image was built as (one engine request);
    empty when the engine cannot be asked (listings then show no names, and say nothing false)."""
    engine = engine or EngineClient.from_env()
    try:
        images = _images(engine, "dockyard/env")
    except DockyardError:
        return {}
    out = {}
    for image in images:
        name = (image.get("Labels") or {}).get("dockyard.name")
        for tag in image.get("RepoTags") or []:
            if name:
                out[tag] = str(name)
    return out
