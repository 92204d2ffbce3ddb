"""GPU placement and queue policy: pure functions over frozen value objects.

No Docker, no SQLite, no threads, no clock: the agent passes the state in (what is free, what
waits, what runs and when it is expected to end) and gets a decision back. The same inputs always
give the same decision, so a decision can be replayed in a test or a simulation.

Placement (:func:`place`)
    Chooses ``count`` free GPUs that the request may use, comparing candidate sets by, in order:

    1. the most NVLinks inside the set (sum over its pairs),
    2. the fewest NUMA nodes spanned by the set,
    3. the lowest PCIe distance inside the set (sum over its pairs of the NVML-like level),
    4. the most NVLinks left among the GPUs that stay free — equivalently, the fewest NVLinks cut
       between the chosen set and the leftovers — so the next multi-GPU run still finds a group,
    5. the fewest NUMA nodes spanned by the leftovers, then their lowest PCIe distance,
    6. the lowest GPU indices.

    Every candidate is scored when at most 8 free GPUs are eligible (at most C(8,4) = 70 sets);
    above that a greedy search seeds with the best pair and grows by the most links. Results are
    cached per topology by (free set, eligible set, count), and per-set sums are tabulated once
    per topology, so a repeated decision costs a dictionary lookup.

Queue policy (:func:`plan`)
    Runs are ordered by priority (higher first), then submit time, then run id. Runs start in
    that order while they fit. The first run that does not fit is the *head*: it gets a
    reservation, the earliest time at which enough of its GPUs are free given the running runs'
    ``expected_end`` (start + time limit), and the GPUs it would get then. A later run may start
    ahead of it (backfill) only if it fits now and has a time limit, and either ends before the
    reservation or stays off the reserved GPUs. A run without a time limit, or any run while the
    head's start time is unknown (a run it waits for has no time limit), is never backfilled,
    except onto GPUs the head can never use (filtered out by its memory or name). The runs that
    would end before the reservation share the GPUs free until then widest first (queue order
    among runs of one width): a many-GPU run rarely finds such a gap, a 1-GPU run fills any hole,
    so this cuts the wait of multi-GPU runs and leaves fewer GPUs idle before the head. Backfill
    therefore never moves the head's reservation later: with time limits enforced, the head's
    wait is bounded by the longest time limit among the runs it waits for, and every run becomes
    the head in turn (starvation-free within a priority; a stream of higher-priority runs may
    still overtake a lower-priority one, by design).

Cost (:class:`RunQueue`)
    The queue is kept in buckets, one per request shape (GPU count, memory, name filter, with or
    without a time limit), each in queue order and cut into blocks of 64 that know their lowest
    and highest time limit. Every run of a bucket places alike, so a decision reads only the front
    of each bucket (phase 1) and, per bucket, the first run whose time limit falls in the range
    that may start (phase 2): about (buckets x (n/64 + 64)) steps however long the queue is, and
    GPU sets are bit masks throughout. A caller that plans often keeps a RunQueue and adds and
    removes runs as they come and go; a list is turned into one per call (O(n log n)).
"""

from __future__ import annotations

import heapq
import math
from bisect import bisect_left, insort
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from itertools import chain, combinations
from operator import attrgetter, itemgetter
from types import MappingProxyType

from ..errors import InputError

__all__ = [
    "Active",
    "GpuRequest",
    "GpuSlot",
    "Plan",
    "Reservation",
    "RunQueue",
    "Topology",
    "Waiting",
    "place",
    "placement_score",
    "plan",
]

# NVML-like PCIe distance: 0 same board, 1 one PCIe switch, 2 several switches, 3 host bridge,
# 4 same NUMA node, 5 across sockets.
_MAX_LEVEL = 5
_LEVEL_SAME_NODE = 4
_LEVEL_ACROSS_SOCKETS = 5
# Candidate sets are all scored when at most this many free GPUs are eligible.
_EXHAUSTIVE_MAX = 8
# Per-set sums are tabulated eagerly for machines up to this size (2**10 sets), lazily above.
_TABULATE_MAX = 10
_MAX_GPUS = 1024
_CACHE_MAX = 1 << 16
_MISS = object()


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _finite(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _plural(n: int) -> str:
    return f"{n} GPU" if n == 1 else f"{n} GPUs"


@dataclass(frozen=True)
class GpuSlot:
    """One GPU of a machine, identified by its UUID (indices change with CUDA_VISIBLE_DEVICES).

    Raises:
        InputError: a field has the wrong type or range.
    """

    uuid: str
    index: int
    name: str = ""
    memory_mib: int = 0
    numa_node: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.uuid, str) or not self.uuid:
            raise InputError(f"GPU uuid must be a non-empty string, got {self.uuid!r}")
        if not _is_int(self.index) or self.index < 0:
            raise InputError(f"GPU {self.uuid}: index must be an int >= 0, got {self.index!r}")
        if not isinstance(self.name, str):
            raise InputError(f"GPU {self.uuid}: name must be a string, got {self.name!r}")
        if not _is_int(self.memory_mib) or self.memory_mib < 0:
            raise InputError(f"GPU {self.uuid}: memory_mib must be an int >= 0, got {self.memory_mib!r}")
        if self.numa_node is not None and (not _is_int(self.numa_node) or self.numa_node < 0):
            raise InputError(f"GPU {self.uuid}: numa_node must be an int >= 0 or None, got {self.numa_node!r}")


class _Tables:
    """Per-topology lookup tables and caches (built once; not part of equality)."""

    __slots__ = (
        "bit",
        "eligible",
        "lv",
        "memory",
        "names",
        "never",
        "numa_bit",
        "nv",
        "places",
        "stats",
        "tabulated",
        "uuids",
    )

    def __init__(self, gpus: tuple[GpuSlot, ...], links: Mapping, levels: Mapping) -> None:
        self.uuids = tuple(g.uuid for g in gpus)  # sorted by index: bit i = i-th lowest index
        self.bit = {u: 1 << i for i, u in enumerate(self.uuids)}
        n = len(gpus)
        pairs = list(enumerate(self.uuids))
        self.nv = [[0 if i == j else links[(a, b)] for j, b in pairs] for i, a in pairs]
        self.lv = [[0 if i == j else levels[(a, b)] for j, b in pairs] for i, a in pairs]
        numas = sorted({g.numa_node for g in gpus if g.numa_node is not None})
        numa_pos = {node: k for k, node in enumerate(numas)}
        self.numa_bit = [0 if g.numa_node is None else 1 << numa_pos[g.numa_node] for g in gpus]
        self.memory = [g.memory_mib for g in gpus]
        self.names = [g.name.lower() for g in gpus]
        self.stats: dict[int, int] = {0: self._pack(0, 0, 0)}
        self.tabulated = n <= _TABULATE_MAX
        if self.tabulated:
            self._tabulate(n)
        self.places: dict[tuple[int, int, int], int | None] = {}  # (free, eligible, count) -> chosen
        self.eligible: dict[tuple, int] = {}
        self.never: dict[tuple, str | None] = {}

    @staticmethod
    def _pack(aff: int, numa_mask: int, lvl: int) -> int:
        # One int that orders sets like the tuple (links, -NUMA nodes, -PCIe distance): comparing
        # ints is what keeps scoring 70 candidates under the latency budget.
        return (aff << 48) | ((0xFFFF - numa_mask.bit_count()) << 32) | (0xFFFFFFFF - lvl)

    def _tabulate(self, n: int) -> None:
        aff = [0] * (1 << n)
        lvl = [0] * (1 << n)
        nm = [0] * (1 << n)
        for mask in range(1, 1 << n):
            low = mask & -mask
            i = low.bit_length() - 1
            rest = mask ^ low
            a = aff[rest]
            d = lvl[rest]
            row_nv = self.nv[i]
            row_lv = self.lv[i]
            r = rest
            while r:
                b = r & -r
                j = b.bit_length() - 1
                a += row_nv[j]
                d += row_lv[j]
                r ^= b
            aff[mask] = a
            lvl[mask] = d
            nm[mask] = nm[rest] | self.numa_bit[i]
            self.stats[mask] = self._pack(a, nm[mask], d)

    def packed(self, mask: int) -> int:
        """(links, -NUMA nodes, -PCIe distance) of the set ``mask``, packed; memoised."""
        value = self.stats.get(mask)
        if value is None:
            pos = _positions(mask)
            aff = lvl = nm = 0
            for x, i in enumerate(pos):
                nm |= self.numa_bit[i]
                row_nv = self.nv[i]
                row_lv = self.lv[i]
                for j in pos[x + 1:]:
                    aff += row_nv[j]
                    lvl += row_lv[j]
            value = self._pack(aff, nm, lvl)
            if len(self.stats) >= _CACHE_MAX:
                self.stats.clear()
            self.stats[mask] = value
        return value


def _positions(mask: int) -> list[int]:
    out = []
    while mask:
        b = mask & -mask
        out.append(b.bit_length() - 1)
        mask ^= b
    return out


def _default_level(a: GpuSlot, b: GpuSlot) -> int:
    if a.numa_node is not None and b.numa_node is not None and a.numa_node != b.numa_node:
        return _LEVEL_ACROSS_SOCKETS
    return _LEVEL_SAME_NODE


def _symmetric(
    what: str, given: Mapping, known: dict[str, GpuSlot], default, check
) -> dict[tuple[str, str], int]:
    if not isinstance(given, Mapping):
        raise InputError(f"topology {what} must be a mapping {{(uuid_a, uuid_b): int}}, got {type(given).__name__}")
    out: dict[tuple[str, str], int] = {}
    for key, value in given.items():
        if not (isinstance(key, tuple) and len(key) == 2):
            raise InputError(f"topology {what}: key {key!r} is not a pair (uuid_a, uuid_b)")
        a, b = key
        for u in (a, b):
            if u not in known:
                raise InputError(f"topology {what}: {u!r} is not a GPU of this topology",
                                 hint="list the GPU under 'gpus' or fix the uuid")
        if a == b:
            raise InputError(f"topology {what}: a GPU cannot link to itself ({a})")
        check(a, b, value)
        back = out.get((b, a))
        if back is not None and back != value:
            raise InputError(f"topology {what} is not symmetric: ({a}, {b}) = {value} but ({b}, {a}) = {back}")
        out[(a, b)] = out[(b, a)] = value
    for a, ga in known.items():
        for b, gb in known.items():
            if a != b and (a, b) not in out:
                out[(a, b)] = default(ga, gb)
    return out


@dataclass(frozen=True, eq=False)
class Topology:
    """The GPUs of one machine and how they are connected.

    Attributes:
        gpus: the GPUs, sorted by index.
        links: ``links[(a, b)]`` is the number of NVLinks between GPUs ``a`` and ``b`` (UUIDs),
            0 when they only share PCIe. Symmetric, defined for every pair of distinct GPUs.
        levels: ``levels[(a, b)]`` is the NVML-like PCIe distance (0 same board … 5 across
            sockets), a tie-breaker after NVLinks and NUMA. Pairs not given default to 4 (same
            NUMA node or unknown) or 5 (different NUMA nodes).

    Two topologies are equal when their GPUs, links and levels are.

    Raises:
        InputError: duplicate UUIDs or indices, an unknown UUID in a link, an asymmetric or
            negative link, a level outside 0..5.
    """

    gpus: tuple[GpuSlot, ...]
    links: Mapping[tuple[str, str], int] = field(default_factory=dict)
    levels: Mapping[tuple[str, str], int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        gpus = tuple(self.gpus) if isinstance(self.gpus, (list, tuple)) else None
        if gpus is None or not all(isinstance(g, GpuSlot) for g in gpus):
            raise InputError("topology gpus must be a sequence of GpuSlot")
        if len(gpus) > _MAX_GPUS:
            raise InputError(f"topology has {len(gpus)} GPUs; at most {_MAX_GPUS} are supported")
        known: dict[str, GpuSlot] = {}
        indices: dict[int, str] = {}
        for g in gpus:
            if g.uuid in known:
                raise InputError(f"topology lists GPU {g.uuid} twice")
            if g.index in indices:
                raise InputError(f"topology: GPUs {indices[g.index]} and {g.uuid} share index {g.index}")
            known[g.uuid] = g
            indices[g.index] = g.uuid
        gpus = tuple(sorted(gpus, key=lambda g: g.index))

        def check_links(a: str, b: str, value: object) -> None:
            if not _is_int(value) or value < 0 or value > 0xFFFF:
                raise InputError(f"topology links: ({a}, {b}) must be an NVLink count 0..65535, got {value!r}")

        def check_level(a: str, b: str, value: object) -> None:
            if not _is_int(value) or not 0 <= value <= _MAX_LEVEL:
                raise InputError(f"topology levels: ({a}, {b}) must be an int 0..{_MAX_LEVEL}, got {value!r}")

        links = _symmetric("links", self.links, known, lambda a, b: 0, check_links)
        levels = _symmetric("levels", self.levels, known, _default_level, check_level)
        object.__setattr__(self, "gpus", gpus)
        object.__setattr__(self, "links", MappingProxyType(links))
        object.__setattr__(self, "levels", MappingProxyType(levels))
        key = (gpus, tuple(sorted(links.items())), tuple(sorted(levels.items())))
        object.__setattr__(self, "_key", key)
        object.__setattr__(self, "_t", _Tables(gpus, links, levels))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Topology) and self._key == other._key  # type: ignore[attr-defined]

    def __hash__(self) -> int:
        return hash(self._key)  # type: ignore[attr-defined]

    def __repr__(self) -> str:
        nvlinked = sum(1 for (a, b), n in self.links.items() if n and a < b)
        return f"Topology({len(self.gpus)} GPUs, {nvlinked} NVLinked pairs)"

    @property
    def uuids(self) -> tuple[str, ...]:
        """GPU UUIDs in index order."""
        return self._t.uuids  # type: ignore[attr-defined]

    def gpu(self, uuid: str) -> GpuSlot:
        """The GPU with this UUID.

        Raises:
            InputError: no GPU of this topology has that UUID.
        """
        for g in self.gpus:
            if g.uuid == uuid:
                return g
        raise InputError(f"no GPU {uuid!r} in this topology")

    @classmethod
    def uniform(cls, n: int, nvlinks: int = 0, *, name: str = "virtual", memory_mib: int = 0) -> Topology:
        """``n`` virtual GPUs ``VIRTUAL-GPU-<i>``, every pair joined by ``nvlinks`` NVLinks.

        Raises:
            InputError: ``n`` or ``nvlinks`` is negative or not an int.
        """
        if not _is_int(n) or n < 0:
            raise InputError(f"uniform topology needs n >= 0 GPUs, got {n!r}")
        gpus = [GpuSlot(f"VIRTUAL-GPU-{i}", i, name, memory_mib) for i in range(n)]
        links = {(a.uuid, b.uuid): nvlinks for a, b in combinations(gpus, 2)}
        return cls(tuple(gpus), links)

    @classmethod
    def dgx(cls, n: int = 8, *, name: str = "virtual-dgx", memory_mib: int = 81920) -> Topology:
        """A DGX-like NVLink layout of quads (a layout of dockyard's choosing, not one product's).

        GPUs come in quads ``4q..4q+3``; each quad is one NUMA node (``numa_node = q``) and is fully
        connected with 2 NVLinks per pair. Quads are paired (0 with 1, 2 with 3, …) and GPU ``i``
        has 1 NVLink to the GPU at the same place in the partner quad (for 8 GPUs: ``i``–``i+4``).
        PCIe levels: 1 within a pair ``2k, 2k+1`` (one switch), 4 elsewhere in the quad, 5 across
        quads. ``dgx(8)`` gives every GPU 7 NVLinks: two fully connected quads with cross links.

        Raises:
            InputError: ``n`` is not a positive multiple of 4.
        """
        if not _is_int(n) or n <= 0 or n % 4:
            raise InputError(f"dgx topology needs a positive multiple of 4 GPUs, got {n!r}")
        gpus = [GpuSlot(f"VIRTUAL-GPU-{i}", i, name, memory_mib, i // 4) for i in range(n)]
        links: dict[tuple[str, str], int] = {}
        levels: dict[tuple[str, str], int] = {}
        for a, b in combinations(range(n), 2):
            key = (gpus[a].uuid, gpus[b].uuid)
            qa, qb = a // 4, b // 4
            if qa == qb:
                links[key] = 2
                levels[key] = 1 if a // 2 == b // 2 else _LEVEL_SAME_NODE
            else:
                partner = qa ^ 1 == qb and a % 4 == b % 4
                links[key] = 1 if partner else 0
                levels[key] = _LEVEL_ACROSS_SOCKETS
        return cls(tuple(gpus), links, levels)

    @classmethod
    def from_dict(cls, data: Mapping) -> Topology:
        """Read a topology file's content.

        The format is ``{"gpus": [{"uuid", "index", "name", "memory_mib", "numa_node"}],
        "links": [{"a": uuid, "b": uuid, "nvlinks": int, "level": int}]}``; ``name``,
        ``memory_mib``, ``numa_node``, ``links``, ``nvlinks`` and ``level`` may be left out.

        Raises:
            InputError: the content does not follow that format.
        """
        if not isinstance(data, Mapping):
            raise InputError("a topology must be an object with 'gpus' and 'links'")
        unknown = set(data) - {"gpus", "links"}
        if unknown:
            raise InputError(f"topology: unknown keys {sorted(unknown)}", hint="expected 'gpus' and 'links'")
        raw_gpus = data.get("gpus")
        if not isinstance(raw_gpus, list):
            raise InputError("topology: 'gpus' must be a list of objects")
        gpus = []
        for k, g in enumerate(raw_gpus):
            if not isinstance(g, Mapping) or "uuid" not in g or "index" not in g:
                raise InputError(f"topology: gpus[{k}] must be an object with at least 'uuid' and 'index'")
            extra = set(g) - {"uuid", "index", "name", "memory_mib", "numa_node"}
            if extra:
                raise InputError(f"topology: gpus[{k}] has unknown keys {sorted(extra)}")
            gpus.append(GpuSlot(g["uuid"], g["index"], g.get("name", ""), g.get("memory_mib", 0), g.get("numa_node")))
        raw_links = data.get("links", [])
        if not isinstance(raw_links, list):
            raise InputError("topology: 'links' must be a list of objects")
        links: dict[tuple[str, str], int] = {}
        levels: dict[tuple[str, str], int] = {}
        for k, link in enumerate(raw_links):
            if not isinstance(link, Mapping) or "a" not in link or "b" not in link:
                raise InputError(f"topology: links[{k}] must be an object with 'a' and 'b'")
            extra = set(link) - {"a", "b", "nvlinks", "level"}
            if extra:
                raise InputError(f"topology: links[{k}] has unknown keys {sorted(extra)}")
            pair = (link["a"], link["b"])
            if pair in links or pair[::-1] in links:
                raise InputError(f"topology: links[{k}] repeats the pair {pair}")
            links[pair] = link.get("nvlinks", 0)
            if "level" in link:
                levels[pair] = link["level"]
        return cls(tuple(gpus), links, levels)

    def to_dict(self) -> dict:
        """The topology file content; ``Topology.from_dict(t.to_dict()) == t``."""
        return {
            "gpus": [
                {"uuid": g.uuid, "index": g.index, "name": g.name, "memory_mib": g.memory_mib, "numa_node": g.numa_node}
                for g in self.gpus
            ],
            "links": [
                {"a": a, "b": b, "nvlinks": self.links[(a, b)], "level": self.levels[(a, b)]}
                for a, b in combinations(self.uuids, 2)
            ],
        }


@dataclass(frozen=True)
class GpuRequest:
    """What a run needs: ``count`` GPUs, each with at least ``min_memory_mib`` and a name containing
    ``name_filter`` (case-insensitive); its queue ``priority`` (higher first) and ``time_limit_s``
    (the agent stops the run then; the scheduler relies on it to backfill).

    Raises:
        InputError: a field has the wrong type or range.
    """

    count: int
    min_memory_mib: int = 0
    name_filter: str | None = None
    priority: int = 0
    time_limit_s: float | None = None

    def __post_init__(self) -> None:
        if not _is_int(self.count) or self.count < 0:
            raise InputError(f"a GPU request needs count >= 0 (an int), got {self.count!r}")
        if not _is_int(self.min_memory_mib) or self.min_memory_mib < 0:
            raise InputError(f"min_memory_mib must be an int >= 0, got {self.min_memory_mib!r}")
        if self.name_filter is not None and (not isinstance(self.name_filter, str) or not self.name_filter.strip()):
            raise InputError(f"name_filter must be a non-empty string or None, got {self.name_filter!r}")
        if not _is_int(self.priority):
            raise InputError(f"priority must be an int, got {self.priority!r}")
        if self.time_limit_s is not None and (not _finite(self.time_limit_s) or self.time_limit_s <= 0):
            raise InputError(f"time_limit_s must be a number > 0 or None, got {self.time_limit_s!r}",
                             hint="leave it out for a run without a time limit")
        needle = self.name_filter.strip().lower() if self.name_filter else None
        object.__setattr__(self, "_ekey", (self.min_memory_mib, needle))
        object.__setattr__(self, "_fkey", (self.min_memory_mib, needle, self.count))

    @classmethod
    def from_dict(cls, data: Mapping) -> GpuRequest:
        """The stored form (a run's ``gpu_request``): missing fields take their defaults.

        Raises:
            InputError: a field has the wrong type or range.
        """
        if not isinstance(data, Mapping):
            raise InputError(f"a stored GPU request must be a JSON object, got {data!r}")
        return cls(count=data.get("count", 0), min_memory_mib=data.get("min_memory_mib") or 0,
                   name_filter=data.get("name_filter"), priority=data.get("priority") or 0,
                   time_limit_s=data.get("time_limit_s"))

    def to_dict(self) -> dict:
        """The stored form, read back by :meth:`from_dict`."""
        return {"count": self.count, "min_memory_mib": self.min_memory_mib, "name_filter": self.name_filter,
                "priority": self.priority, "time_limit_s": self.time_limit_s}

    def _eligible_mask(self, t: _Tables) -> int:
        ekey = self._ekey  # type: ignore[attr-defined]
        mask = t.eligible.get(ekey)
        if mask is None:
            mem, needle = ekey
            mask = 0
            for i, (m, name) in enumerate(zip(t.memory, t.names)):
                if m >= mem and (needle is None or needle in name):
                    mask |= 1 << i
            t.eligible[ekey] = mask
        return mask

    def _qualifiers(self) -> str:
        parts = []
        if self.name_filter:
            parts.append(f"matching {self.name_filter.strip()!r}")
        if self.min_memory_mib:
            parts.append(f"with >= {self.min_memory_mib} MiB")
        return (" " + " ".join(parts)) if parts else ""

    def eligible(self, topology: Topology) -> frozenset[str]:
        """UUIDs of the GPUs of ``topology`` this request may use, busy or not."""
        mask = self._eligible_mask(topology._t)  # type: ignore[attr-defined]
        return frozenset(_uuids(topology._t, mask))  # type: ignore[attr-defined]

    def fits_ever(self, topology: Topology) -> str | None:
        """Why this request can never start on ``topology`` (even idle), or None if it can."""
        return self._never(topology._t)  # type: ignore[attr-defined]

    def _never(self, t: _Tables) -> str | None:
        fkey = self._fkey  # type: ignore[attr-defined]
        if fkey in t.never:
            return t.never[fkey]
        have = self._eligible_mask(t).bit_count()
        reason = None
        if have < self.count:
            qual = self._qualifiers()
            total = len(t.uuids)
            of = f" (of {total})" if qual and total != have else ""
            reason = f"needs {_plural(self.count)}{qual}; this machine has {have}{of}"
        t.never[fkey] = reason
        return reason


def _free_mask(t: _Tables, free: frozenset[str]) -> int:
    bit = t.bit
    mask = 0
    try:
        for u in free:
            mask |= bit[u]
    except KeyError as exc:
        raise InputError(f"free GPU {exc.args[0]!r} is not in this topology",
                         hint="pass the UUIDs of the topology's GPUs") from None
    except TypeError:
        raise InputError("free must be a set of GPU UUID strings") from None
    return mask


def _exhaustive(t: _Tables, free: int, elig: int, count: int) -> int:
    packed = t.packed if not t.tabulated else None
    stats = t.stats
    best_key = -1
    best = 0
    # combinations() yields index-ascending sets in lexicographic order, and only a strictly
    # better score replaces the best: ties go to the lowest indices.
    for combo in combinations([1 << i for i in _positions(elig)], count):
        s = sum(combo)
        if packed is None:
            key = (stats[s] << 128) | stats[free ^ s]
        else:
            key = (packed(s) << 128) | packed(free ^ s)
        if key > best_key:
            best_key = key
            best = s
    return best


def _greedy(t: _Tables, free: int, elig: int, count: int) -> int:
    nv, lv, numa = t.nv, t.lv, t.numa_bit
    cand = _positions(elig)
    free_pos = _positions(free)
    # NVLinks from each candidate to every other free GPU: what choosing it cuts from the leftovers.
    degree = {i: sum(nv[i][j] for j in free_pos) for i in cand}
    if count == 1:
        numa_free = {}
        for j in free_pos:
            numa_free[numa[j]] = numa_free.get(numa[j], 0) + 1
        # The GPU least connected to the rest, on the emptiest NUMA node, lowest index.
        pick = min(cand, key=lambda i: (degree[i], numa_free[numa[i]], i))
        return 1 << pick
    best_pair = None
    best_key = None
    for x, i in enumerate(cand):
        for j in cand[x + 1:]:
            key = (-nv[i][j], numa[i] != numa[j], lv[i][j], degree[i] + degree[j] - 2 * nv[i][j])
            if best_key is None or key < best_key:
                best_key, best_pair = key, (i, j)
    chosen = list(best_pair)
    nodes = numa[chosen[0]] | numa[chosen[1]]
    rest = [i for i in cand if i not in chosen]
    while len(chosen) < count:
        def grow_key(i: int, nodes: int = nodes) -> tuple:  # this round's NUMA nodes, bound now
            inside = sum(nv[i][s] for s in chosen)
            return (-inside, not (numa[i] & nodes) and numa[i] != 0, sum(lv[i][s] for s in chosen),
                    degree[i] - 2 * inside, i)
        pick = min(rest, key=grow_key)
        chosen.append(pick)
        nodes |= numa[pick]
        rest.remove(pick)
    return sum(1 << i for i in chosen)


def _pick(t: _Tables, fmask: int, request: GpuRequest) -> int | None:
    """The GPUs :func:`place` chooses, as a bit mask (0 for a request of none), or None."""
    elig = request._eligible_mask(t)
    count = request.count
    key = (fmask, elig, count)
    hit = t.places.get(key, _MISS)
    if hit is not _MISS:
        return hit  # type: ignore[return-value]
    usable = fmask & elig
    n_usable = usable.bit_count()
    result: int | None
    if n_usable < count:
        result = None
    elif count == 0:
        result = 0
    elif n_usable == count:
        result = usable
    elif n_usable <= _EXHAUSTIVE_MAX:
        result = _exhaustive(t, fmask, usable, count)
    else:
        result = _greedy(t, fmask, usable, count)
    if len(t.places) >= _CACHE_MAX:
        t.places.clear()
    t.places[key] = result
    return result


def _uuids(t: _Tables, mask: int) -> tuple[str, ...]:
    return tuple(t.uuids[i] for i in _positions(mask))


def _place(t: _Tables, free: frozenset[str], request: GpuRequest) -> tuple[str, ...] | None:
    chosen = _pick(t, _free_mask(t, free), request)
    return None if chosen is None else _uuids(t, chosen)


def place(topology: Topology, free: frozenset[str], request: GpuRequest) -> tuple[str, ...] | None:
    """Choose GPUs for ``request`` among ``free`` (see the module docstring for the score).

    Returns:
        ``request.count`` UUIDs in index order, ``()`` for a request of 0 GPUs, or None when
        fewer than ``count`` free GPUs are eligible. Never a GPU outside ``free`` or ineligible.

    Raises:
        InputError: ``free`` names a GPU that is not in ``topology``.
    """
    if not isinstance(free, frozenset):
        free = frozenset(free)
    return _place(topology._t, free, request)  # type: ignore[attr-defined]


def placement_score(topology: Topology, free: frozenset[str], gpus: Sequence[str]) -> tuple[int, ...]:
    """How good taking ``gpus`` out of ``free`` is; larger is better, comparable across machines.

    The tuple is (NVLinks inside, -NUMA nodes, -PCIe distance, NVLinks left among the leftovers,
    -their NUMA nodes, -their PCIe distance): the order :func:`place` compares candidates in.
    Across machines, compare it only between machines left with as many free GPUs: on its own
    it prefers the emptiest machine (its leftovers keep the most NVLinks), which spreads small
    runs until no machine is free for a wide one; pick the fullest machine that fits first.

    Raises:
        InputError: a GPU is not in ``topology`` or ``gpus`` is not a subset of ``free``.
    """
    t: _Tables = topology._t  # type: ignore[attr-defined]
    fmask = _free_mask(t, frozenset(free))
    smask = _free_mask(t, frozenset(gpus))
    if smask & ~fmask:
        raise InputError("placement_score: the chosen GPUs must all be free")

    def unpack(p: int) -> tuple[int, int, int]:
        return (p >> 48, (p >> 32 & 0xFFFF) - 0xFFFF, (p & 0xFFFFFFFF) - 0xFFFFFFFF)

    return unpack(t.packed(smask)) + unpack(t.packed(fmask ^ smask))


@dataclass(frozen=True)
class Waiting:
    """A queued run: its id, request, and submit time (seconds, same clock as ``plan``'s ``now``).

    Raises:
        InputError: a field has the wrong type.
    """

    run_id: str
    request: GpuRequest
    submitted: float

    def __post_init__(self) -> None:
        if not isinstance(self.run_id, str) or not self.run_id:
            raise InputError(f"run_id must be a non-empty string, got {self.run_id!r}")
        if not isinstance(self.request, GpuRequest):
            raise InputError(f"run {self.run_id}: request must be a GpuRequest, got {type(self.request).__name__}")
        if not _finite(self.submitted):
            raise InputError(f"run {self.run_id}: submitted must be a finite number, got {self.submitted!r}")
        object.__setattr__(self, "_order", (-self.request.priority, self.submitted, self.run_id))


@dataclass(frozen=True)
class Active:
    """A running run: the GPUs it holds and when it is expected to end (start + time limit;
    None when it has no time limit).

    Raises:
        InputError: a field has the wrong type or a GPU is listed twice.
    """

    run_id: str
    gpus: tuple[str, ...]
    expected_end: float | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.run_id, str) or not self.run_id:
            raise InputError(f"run_id must be a non-empty string, got {self.run_id!r}")
        if isinstance(self.gpus, str) or not isinstance(self.gpus, (tuple, list, frozenset, set)):
            raise InputError(f"run {self.run_id}: gpus must be a tuple of UUIDs, got {self.gpus!r}")
        gpus = tuple(self.gpus)
        if not all(isinstance(u, str) and u for u in gpus) or len(set(gpus)) != len(gpus):
            raise InputError(f"run {self.run_id}: gpus must be distinct UUID strings, got {gpus!r}")
        object.__setattr__(self, "gpus", gpus)
        if self.expected_end is not None and not _finite(self.expected_end):
            raise InputError(f"run {self.run_id}: expected_end must be a finite number or None")


@dataclass(frozen=True)
class Reservation:
    """The head of the queue's promised start: ``at`` (None when unknown) on ``gpus``."""

    run_id: str
    at: float | None
    gpus: tuple[str, ...] = ()


@dataclass(frozen=True)
class Plan:
    """What to do now.

    Attributes:
        starts: ``(run_id, gpus)`` to start now, in queue order; no GPU appears twice.
        reservation: the head of the queue's reservation, when a run is blocked.
        reasons: for every queued run not started, why, in words (for ``dockyard gpus``). A
            ``dict`` made on first access: explaining a long queue costs about a microsecond a
            run, more than the decision itself, and most decisions are never explained.
    """

    starts: tuple[tuple[str, tuple[str, ...]], ...]
    reservation: Reservation | None = None
    _explain: object = field(default=None, repr=False, compare=False)

    @cached_property
    def reasons(self) -> dict[str, str]:
        return self._explain() if self._explain is not None else {}  # type: ignore[operator]


def _reserve(
    now: float, t: _Tables, avail: int, head: Waiting, releases: list[tuple[float | None, int]],
) -> tuple[Reservation, int]:
    """The head's reservation and its GPUs as a mask: the earliest release time (a running
    run's expected end) at which enough of the GPUs it may use are free."""
    request = head.request
    elig = request._eligible_mask(t)
    count = request.count
    known = sorted((max(end, now), m) for end, m in releases if end is not None)
    have = avail
    n = len(known)
    k = 0
    while k < n:
        at = known[k][0]
        while k < n and known[k][0] == at:  # everything released at the same moment
            have |= known[k][1]
            k += 1
        if (have & elig).bit_count() >= count:
            chosen = _pick(t, have, request)
            if chosen is not None:
                return Reservation(head.run_id, at, _uuids(t, chosen)), chosen
    return Reservation(head.run_id, None, ()), 0


_ORDER = attrgetter("_order")
_INF = math.inf
# Runs per block of a RunQueue bucket: a query skips a whole block by its min/max time limit, so
# finding the first run of a bucket within a time-limit range costs about n/64 + 64 steps.
_BLOCK = 64


class _Bucket:
    """The waiting runs of one request shape (count, memory, name filter; with or without a time
    limit), in queue order, cut into blocks that remember their lowest and highest time limit."""

    __slots__ = ("blocks", "highs", "key", "lasts", "limited", "lows", "request", "size")

    def __init__(self, key: tuple, request: GpuRequest, limited: bool) -> None:
        self.key = key  # its key in RunQueue._buckets
        self.request = request  # placement depends only on the shape: any member stands for all
        self.limited = limited
        self.blocks: list[list[tuple]] = []  # entries (order, limit, Waiting), sorted
        self.lows: list[float] = []
        self.highs: list[float] = []
        self.lasts: list[tuple] = []  # order key of each block's last entry, for bisect
        self.size = 0

    def _refresh(self, k: int) -> None:
        block = self.blocks[k]
        limits = [e[1] for e in block]
        self.lows[k] = min(limits)
        self.highs[k] = max(limits)
        self.lasts[k] = block[-1][0]

    def add(self, entry: tuple) -> None:
        self.size += 1
        if not self.blocks:
            self.blocks.append([entry])
            self.lows.append(entry[1])
            self.highs.append(entry[1])
            self.lasts.append(entry[0])
            return
        k = min(bisect_left(self.lasts, entry[0]), len(self.blocks) - 1)
        block = self.blocks[k]
        insort(block, entry)
        if len(block) > 2 * _BLOCK:
            self.blocks[k + 1:k + 1] = [block[_BLOCK:]]
            del block[_BLOCK:]
            self.lows.insert(k + 1, 0.0)
            self.highs.insert(k + 1, 0.0)
            self.lasts.insert(k + 1, ())
            self._refresh(k + 1)
        self._refresh(k)

    def remove(self, entry: tuple) -> None:
        k = bisect_left(self.lasts, entry[0])
        block = self.blocks[k]
        del block[bisect_left(block, entry)]
        self.size -= 1
        if block:
            self._refresh(k)
        else:
            del self.blocks[k], self.lows[k], self.highs[k], self.lasts[k]

    def within(self, low: float, high: float) -> Iterator[tuple]:
        """Entries whose time limit is in ``(low, high]``, in queue order (lazily)."""
        for k, block in enumerate(self.blocks):
            if self.highs[k] <= low or self.lows[k] > high:
                continue
            for entry in block:
                if low < entry[1] <= high:
                    yield entry

    def __iter__(self) -> Iterator[tuple]:
        for block in self.blocks:
            yield from block


class RunQueue:
    """The waiting runs, kept in queue order (priority, then submit time, then run id) and indexed
    by request shape and time limit, so :func:`plan` reads only the runs it may start.

    Passing a list to :func:`plan` builds one per call; a caller that plans often over a long
    queue (a simulation, a busy agent) keeps one and adds and removes runs as they come and go
    (O(log n + 64) each). A :class:`Plan` made from a queue must have its ``reasons`` read before
    the queue changes.

    Raises:
        InputError: adding a run id that is queued already, removing one that is not.
    """

    __slots__ = ("_buckets", "_entries", "_version")

    def __init__(self, runs: Iterable[Waiting] = ()) -> None:
        self._entries: dict[str, tuple[tuple, _Bucket]] = {}
        self._buckets: dict[tuple, _Bucket] = {}
        self._version = 0
        for w in sorted(runs, key=_ORDER):
            self.add(w)

    def add(self, run: Waiting) -> None:
        """Queue ``run``."""
        if not isinstance(run, Waiting):
            raise InputError(f"a RunQueue holds Waiting runs, got {type(run).__name__}")
        if run.run_id in self._entries:
            raise InputError(f"a run id appears twice in the queue: {run.run_id}")
        req = run.request
        limit = req.time_limit_s
        key = (req._fkey, limit is not None)  # type: ignore[attr-defined]
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = _Bucket(key, req, limit is not None)
        entry = (run._order, _INF if limit is None else float(limit), run)  # type: ignore[attr-defined]
        bucket.add(entry)
        self._entries[run.run_id] = (entry, bucket)
        self._version += 1

    def remove(self, run_id: str) -> Waiting:
        """Take run ``run_id`` out of the queue and return it."""
        found = self._entries.pop(run_id, None)
        if found is None:
            raise InputError(f"run {run_id!r} is not in the queue")
        entry, bucket = found
        bucket.remove(entry)
        if not bucket.size:
            del self._buckets[bucket.key]
        self._version += 1
        return entry[2]

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, run_id: object) -> bool:
        return run_id in self._entries

    def __iter__(self) -> Iterator[Waiting]:
        """The runs in queue order."""
        # Each bucket is sorted already: the sort merges runs of sorted entries, in C.
        return (entry[2] for entry in sorted(chain.from_iterable(self._buckets.values())))

    def first(self) -> Waiting | None:
        """The run at the front of the queue, or None when it is empty."""
        fronts = [b.blocks[0][0] for b in self._buckets.values()]
        return min(fronts)[2] if fronts else None


def plan(
    now: float,
    topology: Topology,
    free: frozenset[str],
    queue: Sequence[Waiting] | RunQueue,
    running: Sequence[Active],
) -> Plan:
    """Decide which queued runs start now and on which GPUs (see the module docstring).

    Args:
        now: the current time, on the clock of ``submitted`` and ``expected_end``.
        topology: the machine.
        free: UUIDs of the GPUs nobody holds; a GPU held by a run in ``running`` is never
            started on even if listed here.
        queue: the runs waiting, in any order, or a :class:`RunQueue` (left unchanged).
        running: the runs holding GPUs.

    Returns:
        A :class:`Plan`: starts never share a GPU and use only free, eligible GPUs.

    Raises:
        InputError: a run id repeats in ``queue``, a GPU is held by two running runs, or a GPU
            is not in ``topology``.
    """
    if not _finite(now):
        raise InputError(f"now must be a finite number, got {now!r}")
    t: _Tables = topology._t  # type: ignore[attr-defined]
    bit = t.bit
    busy = 0
    releases: list[tuple[float | None, int]] = []  # (expected end, GPUs as a mask)
    for a in running:
        held = 0
        for u in a.gpus:
            b = bit.get(u)
            if b is None:
                raise InputError(f"running run {a.run_id} holds GPU {u!r}, which is not in this topology")
            held |= b
        if held & busy:
            u = _uuids(t, held & busy)[0]
            raise InputError(f"GPU {u} is held by two running runs", hint="the lease table is inconsistent")
        busy |= held
        releases.append((a.expected_end, held))
    # A busy GPU listed as free is still busy.
    avail = _free_mask(t, free) & ~busy
    rq = queue if isinstance(queue, RunQueue) else RunQueue(queue)
    version = rq._version
    # Runs of a shape that can never fit this machine are skipped (and explained) wholesale.
    buckets = [b for b in rq._buckets.values() if b.request._never(t) is None]

    starts: list[tuple[tuple, str, int]] = []  # (queue order, run id, GPUs as a mask)
    taken: set[str] = set()
    head: Waiting | None = None
    head_avail = avail
    res: Reservation | None = None
    # Phase 1: start runs in queue order until one does not fit; that one is the head. Only the
    # front of each shape's bucket can be next, so this merges the fronts.
    fronts = []
    for n, b in enumerate(buckets):
        it = iter(b)
        fronts.append((next(it), n, it))
    heapq.heapify(fronts)
    while fronts:
        entry, n, it = fronts[0]
        w = entry[2]
        chosen = _pick(t, avail, w.request)
        if chosen is None:
            head = w
            break
        starts.append((entry[0], w.run_id, chosen))
        taken.add(w.run_id)
        avail &= ~chosen
        limit = w.request.time_limit_s
        releases.append((now + limit if limit is not None else None, chosen))
        following = next(it, None)
        if following is None:
            heapq.heappop(fronts)
        else:
            heapq.heapreplace(fronts, (following, n, it))
    if head is not None:
        head_avail = avail
        taken.add(head.run_id)
        res, res_mask = _reserve(now, t, avail, head, releases)
        head_never = ~head.request._eligible_mask(t)
        res_at = res.at
        # Phase 2: backfill. A run with a time limit that ends by the reservation may use any
        # free GPU (the gap, filled last, widest first); a run with a longer time limit, the
        # GPUs the head was not promised; a run without one (or any run while the head's start
        # is unknown), only the GPUs the head can never use. Within a bucket every run has the
        # same shape, so only the first run of each bucket in its class can be next, and it is
        # looked up only when its shape fits.
        gap_until = res_at - now if res_at is not None else None
        classes = []
        for b in buckets:
            if gap_until is not None and b.limited:
                classes.append((b, 1, b.within(gap_until, _INF)))
            else:
                classes.append((b, 2, b.within(-_INF, _INF)))
        candidates: dict[int, object] = {}  # class -> its next run (None: none left)
        while avail:
            pools = (avail, avail & ~res_mask, avail & head_never)
            best = None
            for k, (b, pool, gen) in enumerate(classes):
                req = b.request
                if req.count > pools[pool].bit_count():
                    continue
                entry = candidates.get(k, _MISS)
                if entry is _MISS:
                    entry = candidates[k] = _next_untaken(gen, taken)
                if entry is None or (best is not None and entry[0] > best[0][0]):
                    continue
                chosen = _pick(t, pools[pool], req)
                if chosen is not None:
                    best = (entry, k, chosen)
            if best is None:
                break
            entry, k, chosen = best
            starts.append((entry[0], entry[2].run_id, chosen))
            taken.add(entry[2].run_id)
            avail &= ~chosen
            candidates[k] = _next_untaken(classes[k][2], taken)
        if gap_until is not None and avail:
            # The gap before the reservation goes to the widest runs first (queue order among
            # equals): a many-GPU run rarely finds room otherwise, a 1-GPU run fills any hole.
            have = avail.bit_count()
            gap: list[tuple[int, tuple, GpuRequest, Waiting]] = []
            for b in buckets:
                count = b.request.count
                if not b.limited or count > have:
                    continue
                room = have // count if count else len(rq)
                for entry in b.within(-_INF, gap_until):
                    if room <= 0:
                        break
                    # now + limit, as the reservation was computed: never a rounding past it.
                    if entry[2].run_id not in taken and now + entry[1] <= res_at:
                        gap.append((-count, entry[0], b.request, entry[2]))
                        room -= 1
            gap.sort(key=_GAP_ORDER)
            failed: set[tuple] = set()
            for _, order, req, w in gap:
                fk = req._fkey  # type: ignore[attr-defined]
                if fk in failed or req.count > avail.bit_count():
                    continue
                chosen = _pick(t, avail, req)
                if chosen is None:
                    failed.add(fk)
                    continue
                starts.append((order, w.run_id, chosen))
                taken.add(w.run_id)
                avail &= ~chosen
    starts.sort(key=_FIRST)  # report every start in queue order

    def explain() -> dict[str, str]:
        if rq._version != version:
            raise InputError("the run queue changed after this plan was made",
                             hint="read Plan.reasons before adding or removing runs")
        started = {run_id for _, run_id, _ in starts}
        waiting = (w for w in rq if w.run_id not in started)
        return _explain(now, t, head, res, frozenset(_uuids(t, head_avail)), frozenset(_uuids(t, avail)), waiting)

    return Plan(tuple((run_id, _uuids(t, chosen)) for _, run_id, chosen in starts), res, explain)


_FIRST = itemgetter(0)
_GAP_ORDER = itemgetter(0, 1)


def _next_untaken(entries: Iterator[tuple], taken: set[str]) -> tuple | None:
    for entry in entries:
        if entry[2].run_id not in taken:
            return entry
    return None


def _after(now: float, at: float) -> str:
    return f"t+{at - now:.0f}s"


def _explain(
    now: float, t: _Tables, head: Waiting | None, res: Reservation | None,
    head_avail: frozenset[str], avail: frozenset[str], waiting: Iterable[Waiting],
) -> dict[str, str]:
    said: dict[tuple, str] = {}
    out: dict[str, str] = {}
    for w in waiting:
        req = w.request
        never = req._never(t)
        if never is not None:
            out[w.run_id] = f"can never start on this machine: {never}"
            continue
        if w is head:
            have = (req._eligible_mask(t) & _free_mask(t, head_avail)).bit_count()
            if res.at is not None:  # type: ignore[union-attr]
                when = f"reserved {_plural(req.count)} from {_after(now, res.at)}"  # type: ignore[union-attr]
            else:
                when = "start time unknown: a run it waits for has no time limit"
            out[w.run_id] = f"needs {_plural(req.count)}{req._qualifiers()}; {have} free; {when}"
            continue
        limit = req.time_limit_s
        in_gap = res.at is not None and limit is not None and now + limit <= res.at  # type: ignore[union-attr]
        # A run that would end before the reservation competed for what was left at the end (the
        # gap); any other run behind the head, for what was free when the head was found.
        seen = avail if in_gap else head_avail
        out[w.run_id] = _behind_reason(now, t, w, head, res, seen, said)  # type: ignore[arg-type]
    return out


def _behind_reason(
    now: float, t: _Tables, w: Waiting, head: Waiting, res: Reservation, avail: frozenset[str], said: dict
) -> str:
    req = w.request
    higher = head.request.priority > req.priority
    if avail and _place(t, avail, req) is not None:
        if res.at is None:
            kind: tuple = ("unknown", higher)
        elif req.time_limit_s is None:
            kind = ("nolimit", higher)
        else:
            kind = ("reserved", higher)
        have = 0
    else:
        have = (req._eligible_mask(t) & _free_mask(t, avail)).bit_count() if avail else 0
        kind = ("short", higher, req._fkey, have)  # type: ignore[attr-defined]
    text = said.get(kind)
    if text is None:
        who = f"higher-priority run {head.run_id}" if higher else f"run {head.run_id} (ahead in the queue)"
        if kind[0] == "reserved":
            text = f"reserved GPUs for run {head.run_id} at {_after(now, res.at)}; this run's time limit ends later"
        elif kind[0] == "nolimit":
            text = f"waiting behind {who}: a run without a time limit is never started ahead of it"
        elif kind[0] == "unknown":
            text = f"waiting behind {who}, whose start time is unknown (runs it waits for have no time limit)"
        else:
            text = f"needs {_plural(req.count)}{req._qualifiers()}; {have} free; waiting behind {who}"
        said[kind] = text
    return text
