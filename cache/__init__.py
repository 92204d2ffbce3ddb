"""dockyard.cache: an embeddable, content-addressed image cache.

Canonical content keys (XXH3-128 over named parts), a SQLite index safe across processes,
single-flight builds (one builder per key, the others wait) and LRU garbage collection. It never
imports the dockyard engine, Docker or gRPC: any tool can plug in its own builder::

    from dockyard.cache import BuildResult, ImageCache, KeyParts, compute_key

    key = compute_key(KeyParts("dockyard/base:bookworm-python3", pip=["numpy==2.1.0"]))
    cache = ImageCache("/var/cache/mytool/index.db")

    def build(key):  # runs once across all processes asking for this key
        image_id = my_builder.build(tag=f"mytool/env:{key}")
        return BuildResult(image=f"mytool/env:{key}", image_id=image_id, builder="mytool")

    entry, built = cache.get_or_build(key, build)
    print(entry.image, "built now" if built else "cache hit")

``dockyard env key --explain`` and :func:`diff_keys` show which part changed when a key missed.
"""

from importlib import import_module

# Not `from typing import …`: typing alone costs ~10 ms, more than a whole cache hit.
TYPE_CHECKING = False

# public name -> private module. Loaded on first use (PEP 562), so that a short-lived process can
# import one light module (``dockyard.cache._fastread``) without paying for the rest.
_EXPORTS = {
    "ImageCache": "._index",
    "PART_NAMES": "._keys",
    "OPTIONAL_PART_NAMES": "._keys",
    "SCHEMA_VERSION": "._keys",
    "ContentKey": "._keys",
    "KeyParts": "._keys",
    "compute_key": "._keys",
    "diff_keys": "._keys",
    "unresolved_key": "._keys",
    "BuildSlot": "._lease",
    "BuildResult": "._model",
    "CacheEntry": "._model",
    "CacheStats": "._model",
    "GcFailure": "._model",
    "GcReport": "._model",
    "PackageRecord": "._model",
    "PublishRecord": "._model",
    "CacheError": ".errors",
    "CacheInputError": ".errors",
    "IndexCorrupt": ".errors",
    "IndexUnavailable": ".errors",
    "InvalidKey": ".errors",
    "InvalidKeyParts": ".errors",
    "LeaseLost": ".errors",
    "WaitTimeout": ".errors",
    "FastHit": "._fastread",
    "fast_hit": "._fastread",
}

if TYPE_CHECKING:  # pragma: no cover
    from ._fastread import FastHit, fast_hit
    from ._index import ImageCache
    from ._keys import (
        OPTIONAL_PART_NAMES,
        PART_NAMES,
        SCHEMA_VERSION,
        ContentKey,
        KeyParts,
        compute_key,
        diff_keys,
        unresolved_key,
    )
    from ._lease import BuildSlot
    from ._model import BuildResult, CacheEntry, CacheStats, GcFailure, GcReport, PackageRecord, PublishRecord
    from .errors import (
        CacheError,
        CacheInputError,
        IndexCorrupt,
        IndexUnavailable,
        InvalidKey,
        InvalidKeyParts,
        LeaseLost,
        WaitTimeout,
    )

__all__ = [
    "OPTIONAL_PART_NAMES",
    "PART_NAMES",
    "SCHEMA_VERSION",
    "BuildResult",
    "BuildSlot",
    "CacheEntry",
    "CacheError",
    "CacheInputError",
    "CacheStats",
    "ContentKey",
    "FastHit",
    "GcFailure",
    "GcReport",
    "ImageCache",
    "IndexCorrupt",
    "IndexUnavailable",
    "InvalidKey",
    "InvalidKeyParts",
    "KeyParts",
    "LeaseLost",
    "PackageRecord",
    "PublishRecord",
    "WaitTimeout",
    "compute_key",
    "diff_keys",
    "fast_hit",
    "unresolved_key",
]


def __getattr__(name: str) -> object:
    try:
        module = _EXPORTS[name]
    except KeyError:
        raise AttributeError(f"module 'dockyard.cache' has no attribute {name!r}") from None
    value = getattr(import_module(module, __name__), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
