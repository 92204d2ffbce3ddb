"""Value objects of the index: entries, statistics, GC reports, build results."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from .errors import CacheInputError

__all__ = [
    "ENTRY_COLUMNS",
    "BuildResult",
    "CacheEntry",
    "CacheStats",
    "GcFailure",
    "GcReport",
    "PackageRecord",
    "PublishRecord",
    "check_parts",
    "check_result_fields",
    "entry_from_row",
]

#: Column order of every ``SELECT`` that feeds :func:`entry_from_row`.
ENTRY_COLUMNS = "key, image, image_id, size, created, last_used, hit_count, parts, builder, pinned"


class _JsonParts(Mapping[str, str]):
    """Part hashes decoded from their JSON column on first use.

    Most hits never look at the parts, and decoding them would be a fifth of a lookup's cost.
    """

    __slots__ = ("_data", "_raw")

    def __init__(self, raw: str) -> None:
        self._raw = raw
        self._data: dict[str, str] | None = None

    def _load(self) -> dict[str, str]:
        if self._data is None:
            self._data = json.loads(self._raw)
        return self._data

    def __getitem__(self, name: str) -> str:
        return self._load()[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._load())

    def __len__(self) -> int:
        return len(self._load())

    def __repr__(self) -> str:
        return repr(self._load())


@dataclass(frozen=True)
class CacheEntry:
    """One cached image.

    Times are unix seconds (float). ``last_used`` and ``hit_count`` lag behind hits made by
    running processes by at most the cache's ``touch_interval``.

    Attributes:
        key: the content key (32 hex).
        image: the image reference, e.g. ``"dockyard/env:<key>"``.
        image_id: the image id in the engine (``"sha256:…"``), or whatever the builder reports.
        size: bytes.
        created: when the entry was (re)recorded.
        last_used: the last hit (or ``created``).
        hit_count: lookups that found the entry.
        parts: part name -> part hash, as computed with the key.
        builder: who built it (``"buildkit"``, a tool's name).
        pinned: GC never removes a pinned entry.
    """

    key: str
    image: str
    image_id: str
    size: int
    created: float
    last_used: float
    hit_count: int
    parts: Mapping[str, str]
    builder: str
    pinned: bool

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict with every field."""
        return {
            "key": self.key,
            "image": self.image,
            "image_id": self.image_id,
            "size": self.size,
            "created": self.created,
            "last_used": self.last_used,
            "hit_count": self.hit_count,
            "parts": dict(self.parts),
            "builder": self.builder,
            "pinned": self.pinned,
        }


_ENTRY_FIELDS = tuple(c.strip() for c in ENTRY_COLUMNS.split(","))
_new = object.__new__


def entry_from_row(row: tuple[Any, ...]) -> CacheEntry:
    """Build an entry from a row selected with :data:`ENTRY_COLUMNS`."""
    # Filling __dict__ directly skips the frozen dataclass's ten object.__setattr__ calls: this
    # runs on every hit, and the row's types are the schema's.
    entry = _new(CacheEntry)
    fields = entry.__dict__
    fields.update(zip(_ENTRY_FIELDS, row, strict=True))
    fields["parts"] = _JsonParts(fields["parts"])
    fields["pinned"] = bool(fields["pinned"])
    return entry


@dataclass(frozen=True)
class CacheStats:
    """What the index holds.

    Attributes:
        path: the index file.
        entries: number of entries.
        total_bytes: sum of their sizes.
        hits: sum of their hit counts.
        pinned: number of pinned entries.
        leases: builds in progress (live or stale leases).
        oldest: earliest ``created``, or None when empty.
        newest: latest ``created``, or None when empty.
    """

    path: str
    entries: int
    total_bytes: int
    hits: int
    pinned: int
    leases: int
    oldest: float | None
    newest: float | None

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict with every field."""
        return {
            "path": self.path,
            "entries": self.entries,
            "total_bytes": self.total_bytes,
            "hits": self.hits,
            "pinned": self.pinned,
            "leases": self.leases,
            "oldest": self.oldest,
            "newest": self.newest,
        }


@dataclass(frozen=True)
class GcFailure:
    """An entry GC chose but could not remove: the ``remove`` callback raised.

    Attributes:
        key: the entry's key.
        image: the entry's image.
        error: the callback's exception, as ``"Type: message"``.
    """

    key: str
    image: str
    error: str

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict with every field."""
        return {"key": self.key, "image": self.image, "error": self.error}


@dataclass(frozen=True)
class GcReport:
    """What a GC pass removed (or, with ``dry_run``, would remove).

    Attributes:
        removed: the entries removed, least recently used first.
        kept: entries left in the index afterwards.
        freed_bytes: sum of the removed entries' sizes.
        remaining_bytes: sum of the sizes left.
        errors: entries whose removal failed; their rows were kept.
        dry_run: True when nothing was changed.
    """

    removed: tuple[CacheEntry, ...]
    kept: int
    freed_bytes: int
    remaining_bytes: int
    errors: tuple[GcFailure, ...] = ()
    dry_run: bool = False

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict with every field."""
        return {
            "dry_run": self.dry_run,
            "removed": [e.to_json() for e in self.removed],
            "kept": self.kept,
            "freed_bytes": self.freed_bytes,
            "remaining_bytes": self.remaining_bytes,
            "errors": [e.to_json() for e in self.errors],
        }


@dataclass(frozen=True)
class PackageRecord:
    """What one build resolved its requirements to.

    Attributes:
        key: the content key (32 hex).
        installer: what installed them (``"uv 0.13.9"``, ``"pip"``; a note may follow).
        layout: where they went: ``"venv"`` (a virtualenv of the base's Python) or ``"conda"``.
        packages: the resolution, one ``name==version`` (or ``name @ url``) line each, sorted.
        neighbour: the key of the image a near miss started from ("" for a clean build).
        recorded: when (unix seconds).
    """

    key: str
    installer: str
    layout: str
    packages: tuple[str, ...]
    neighbour: str
    recorded: float

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict with every field."""
        return {"key": self.key, "installer": self.installer, "layout": self.layout,
                "packages": list(self.packages), "neighbour": self.neighbour or None, "recorded": self.recorded}


@dataclass(frozen=True)
class PublishRecord:
    """The last push of one key to one shared registry: what happened then, not what the
    registry holds now (ask the registry for that).

    Attributes:
        key: the content key (32 hex).
        registry: where it was pushed (``REG/REPO``).
        ok: the push succeeded.
        detail: the pushed digest when ``ok``, else why the push failed (no secret: the caller's
            message, as it would show in a log).
        at: when (unix seconds).
    """

    key: str
    registry: str
    ok: bool
    detail: str
    at: float

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict with every field."""
        return {"key": self.key, "registry": self.registry, "ok": self.ok, "detail": self.detail, "at": self.at}


@dataclass(frozen=True)
class BuildResult:
    """What a builder callable hands back to :meth:`ImageCache.get_or_build`.

    Attributes:
        image: the image reference it produced.
        image_id: the image id.
        size: bytes (0 when unknown).
        builder: who built it.

    Raises:
        CacheInputError: a field has the wrong type or is empty.
    """

    image: str
    image_id: str
    size: int = 0
    builder: str = field(default="")

    def __post_init__(self) -> None:
        check_result_fields(self.image, self.image_id, self.size, self.builder)


def check_result_fields(image: object, image_id: object, size: object, builder: object) -> None:
    """Validate what a builder reports before it reaches the index.

    Raises:
        CacheInputError: naming the bad field.
    """
    for name, value in (("image", image), ("image_id", image_id)):
        if not isinstance(value, str) or not value.strip():
            raise CacheInputError(
                f"{name} must be a non-empty string", hint=f"pass the built image's {name}"
            )
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise CacheInputError("size must be an int >= 0 (bytes)", hint="pass 0 when unknown")
    if not isinstance(builder, str):
        raise CacheInputError("builder must be a string", hint='e.g. "buildkit"')


_HEX32 = re.compile(r"[0-9a-f]{32}")


def check_parts(parts: object) -> dict[str, str]:
    """Validate part hashes before they are stored: names to 32-hex hashes, nothing else.

    Only hashes are ever stored, which is also why no secret can reach the index through here.

    Raises:
        CacheInputError: ``parts`` is not a mapping of str to 32 lowercase hex.
    """
    if not isinstance(parts, Mapping):
        raise CacheInputError("parts must be a mapping of part name to hash", hint="pass key.parts")
    out: dict[str, str] = {}
    for name, value in parts.items():
        if not isinstance(name, str) or not isinstance(value, str) or not _HEX32.fullmatch(value):
            raise CacheInputError(
                "parts must map part names to 32 lowercase hex hashes",
                hint="pass ContentKey.parts, not the key parts themselves",
            )
        out[name] = value
    return out
