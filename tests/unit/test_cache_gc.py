"""LRU garbage collection: ordering, age and size limits, protections, the remove callback."""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path

import pytest
from dockyard.cache import CacheEntry, CacheInputError, ImageCache

DAY = 86400.0


def _key(i: int) -> str:
    return f"{i:032x}"


@pytest.fixture
def cache(tmp_path: Path) -> ImageCache:
    """Ten entries of 100 bytes; entry i was last used i days before entry 9 (0 is the oldest)."""
    c = ImageCache(tmp_path / "index.db")
    now = time.time()
    for i in range(10):
        c.record(_key(i), image=f"img{i}", image_id=f"id{i}", size=100)
    conn = sqlite3.connect(c.path)
    with conn:
        for i in range(10):
            conn.execute("UPDATE entries SET last_used = ? WHERE key = ?", (now - (10 - i) * DAY, _key(i)))
    conn.close()
    yield c
    c.close()


def _keys(entries: tuple[CacheEntry, ...] | list[CacheEntry]) -> list[str]:
    return [e.key for e in entries]


def _left(cache: ImageCache) -> set[str]:
    return {e.key for e in cache.entries()}


def test_keep_bytes_removes_least_recently_used_first(cache: ImageCache) -> None:
    report = cache.gc(keep_bytes=700)
    assert _keys(report.removed) == [_key(0), _key(1), _key(2)]
    assert report.freed_bytes == 300 and report.remaining_bytes == 700 and report.kept == 7
    assert _left(cache) == {_key(i) for i in range(3, 10)}


def test_a_hit_moves_an_entry_to_the_back_of_the_queue(cache: ImageCache) -> None:
    assert cache.lookup(_key(0)) is not None  # a month-old last_used is written through
    report = cache.gc(keep_bytes=800)
    assert _keys(report.removed) == [_key(1), _key(2)]


def test_keep_days_removes_entries_unused_for_longer(cache: ImageCache) -> None:
    report = cache.gc(keep_days=4.5)  # entries 0..5 were last used 10..5 days ago
    assert _keys(report.removed) == [_key(i) for i in range(6)]
    assert report.remaining_bytes == 400


def test_keep_days_then_keep_bytes(cache: ImageCache) -> None:
    report = cache.gc(keep_days=7.5, keep_bytes=500)
    assert _keys(report.removed) == [_key(i) for i in range(5)]
    assert report.remaining_bytes == 500


def test_pinned_entries_and_arguments_are_never_touched(cache: ImageCache) -> None:
    cache.pin(_key(0))
    report = cache.gc(keep_bytes=0, pinned=[_key(1)], in_use={_key(2)})
    assert _left(cache) == {_key(0), _key(1), _key(2)}
    assert report.remaining_bytes == 300 and report.kept == 3
    assert cache.gc(keep_days=0, pinned=[_key(1)], in_use=[_key(2)]).removed == ()


def test_keys_with_a_live_lease_are_kept_but_stale_leases_do_not_protect(cache: ImageCache) -> None:
    now = time.time()
    conn = sqlite3.connect(cache.path)
    with conn:
        conn.executemany(
            "INSERT INTO leases (key, owner, pid, acquired, heartbeat, timeout) VALUES (?,?,?,?,?,?)",
            [(_key(0), "live:1:x", 1, now, now, 30.0), (_key(1), "dead:2:x", 2, now - 99, now - 99, 30.0)],
        )
    conn.close()
    report = cache.gc(keep_bytes=800)
    assert _keys(report.removed) == [_key(1), _key(2)]
    assert _key(0) in _left(cache)


def test_the_remove_callback_runs_before_the_row_is_deleted(cache: ImageCache) -> None:
    seen: list[tuple[str, bool]] = []

    def remove(entry: CacheEntry) -> None:
        still_indexed = cache.lookup(entry.key) is not None
        seen.append((entry.image, still_indexed))

    cache.gc(keep_bytes=800, remove=remove)
    assert seen == [("img0", True), ("img1", True)]
    assert _left(cache) == {_key(i) for i in range(2, 10)}


def test_a_failing_remove_keeps_the_row_reports_it_and_gc_goes_on(cache: ImageCache) -> None:
    def remove(entry: CacheEntry) -> None:
        if entry.key == _key(1):
            raise RuntimeError("image is used by a stopped container")

    report = cache.gc(keep_bytes=700, remove=remove)
    assert _keys(report.removed) == [_key(0), _key(2), _key(3)]  # 3 replaces the one that failed
    assert [(e.key, e.image) for e in report.errors] == [(_key(1), "img1")]
    assert report.errors[0].error == "RuntimeError: image is used by a stopped container"
    assert _key(1) in _left(cache)
    assert report.remaining_bytes == 700
    doc = json.loads(json.dumps(report.to_json()))
    assert doc["errors"][0]["key"] == _key(1) and len(doc["removed"]) == 3 and doc["dry_run"] is False


def test_dry_run_changes_nothing_and_calls_nothing(cache: ImageCache) -> None:
    called: list[CacheEntry] = []
    report = cache.gc(keep_bytes=500, dry_run=True, remove=called.append)
    assert report.dry_run and _keys(report.removed) == [_key(i) for i in range(5)]
    assert called == [] and len(_left(cache)) == 10


def test_no_limits_remove_nothing(cache: ImageCache) -> None:
    report = cache.gc()
    assert report.removed == () and report.kept == 10 and report.remaining_bytes == 1000


def test_an_entry_used_during_gc_is_spared(cache: ImageCache) -> None:
    other = ImageCache(cache.path, touch_interval=0)  # another process, writing hits at once

    def remove(entry: CacheEntry) -> None:
        if entry.key == _key(0):
            other.lookup(_key(1))  # meanwhile, someone uses the next victim

    report = cache.gc(keep_bytes=800, remove=remove)
    assert _keys(report.removed) == [_key(0), _key(2)]
    assert _key(1) in _left(cache)


@pytest.mark.parametrize(
    "kwargs", [{"keep_bytes": -1}, {"keep_bytes": 1.5}, {"keep_bytes": True}, {"keep_days": -1},
               {"pinned": ["nope"]}],
)
def test_bad_limits_are_refused(cache: ImageCache, kwargs: dict) -> None:
    with pytest.raises(CacheInputError):
        cache.gc(**kwargs)
    assert len(_left(cache)) == 10
