"""The SQLite index: record/lookup, stats, pins, hit bookkeeping, errors, integrity."""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from pathlib import Path

import pytest
from dockyard.cache import (
    CacheEntry,
    CacheError,
    CacheInputError,
    ContentKey,
    ImageCache,
    IndexCorrupt,
    IndexUnavailable,
    InvalidKey,
    KeyParts,
    compute_key,
)

KEY = compute_key(KeyParts("dockyard/base:bookworm-python3", pip=["numpy==2.1.0"]))


def _key(i: int) -> str:
    return f"{i:032x}"


@pytest.fixture
def cache(tmp_path: Path) -> ImageCache:
    with ImageCache(tmp_path / "nested" / "dir" / "index.db") as c:
        yield c


def _sql(cache: ImageCache, sql: str, args: tuple[object, ...] = ()) -> list[tuple[object, ...]]:
    conn = sqlite3.connect(cache.path)
    try:
        with conn:
            return conn.execute(sql, args).fetchall()
    finally:
        conn.close()


def test_lookup_of_a_never_written_index_is_a_miss_and_creates_no_schema(cache: ImageCache) -> None:
    assert cache.lookup(KEY) is None
    assert _sql(cache, "SELECT name FROM sqlite_master") == []


def test_record_then_lookup_round_trip(cache: ImageCache) -> None:
    before = time.time()
    recorded = cache.record(
        KEY, image=f"dockyard/env:{KEY}", image_id="sha256:" + "ab" * 32, size=12345, builder="buildkit"
    )
    assert isinstance(recorded, CacheEntry)
    assert recorded.key == KEY.hex
    assert recorded.image == f"dockyard/env:{KEY.hex}"
    assert recorded.image_id == "sha256:" + "ab" * 32
    assert recorded.size == 12345 and recorded.builder == "buildkit"
    assert recorded.hit_count == 0 and recorded.pinned is False
    assert before <= recorded.created == recorded.last_used <= time.time()
    assert dict(recorded.parts) == dict(KEY.parts)  # defaults to the key's own parts

    found = cache.lookup(KEY)
    assert found == recorded
    assert cache.lookup(KEY.hex) == recorded
    assert cache.lookup(KEY.hex.upper()) == recorded
    assert cache.lookup(_key(1)) is None
    # A second ImageCache on the same file (another process would be the same) sees it too.
    assert ImageCache(cache.path).lookup(KEY) == recorded


def test_entry_to_json_is_plain_json(cache: ImageCache) -> None:
    entry = cache.record(KEY, image="img", image_id="id", size=3)
    doc = json.loads(json.dumps(entry.to_json()))
    assert doc["key"] == KEY.hex and doc["size"] == 3 and doc["pinned"] is False
    assert doc["parts"] == dict(KEY.parts)
    assert set(doc) == {"key", "image", "image_id", "size", "created", "last_used", "hit_count",
                        "parts", "builder", "pinned"}


def test_index_is_wal_with_a_schema_version(cache: ImageCache) -> None:
    cache.record(KEY, image="img", image_id="id")
    assert _sql(cache, "PRAGMA journal_mode") == [("wal",)]
    assert _sql(cache, "PRAGMA user_version") == [(5,)]
    assert {r[0] for r in _sql(cache, "SELECT name FROM sqlite_master WHERE type='table'")} == {
        "entries", "leases", "resolutions", "memos", "publishes", "remote_parts", "packages"}


def test_record_replaces_but_keeps_hits_and_pin(cache: ImageCache) -> None:
    cache.record(KEY, image="old", image_id="id1", size=1)
    cache.pin(KEY)
    cache.lookup(KEY)
    cache.stats()  # writes the pending hit
    again = cache.record(KEY, image="new", image_id="id2", size=2, parts={"pip": "0" * 32})
    assert (again.image, again.image_id, again.size) == ("new", "id2", 2)
    assert again.hit_count == 1 and again.pinned is True
    assert dict(again.parts) == {"pip": "0" * 32}
    assert cache.stats().entries == 1


@pytest.mark.parametrize(
    "kwargs",
    [
        {"image": "", "image_id": "id"},
        {"image": "img", "image_id": None},
        {"image": "img", "image_id": "id", "size": -1},
        {"image": "img", "image_id": "id", "size": True},
        {"image": "img", "image_id": "id", "builder": 3},
        {"image": "img", "image_id": "id", "parts": {"pip": "not-a-hash"}},
        {"image": "img", "image_id": "id", "parts": {"pip": "https://u:p@h"}},
    ],
)
def test_record_refuses_bad_fields_and_writes_nothing(cache: ImageCache, kwargs: dict) -> None:
    with pytest.raises(CacheInputError) as info:
        cache.record(KEY, **kwargs)
    assert info.value.exit_code == 2
    assert cache.lookup(KEY) is None


@pytest.mark.parametrize("bad", ["nope", "0" * 31, 42, None, b"0" * 32])
def test_bad_keys_are_refused(cache: ImageCache, bad: object) -> None:
    with pytest.raises(InvalidKey):
        cache.lookup(bad)  # type: ignore[arg-type]
    with pytest.raises(InvalidKey):
        cache.record(bad, image="i", image_id="x")  # type: ignore[arg-type]


def test_remove_pin_unpin_report_whether_the_entry_exists(cache: ImageCache) -> None:
    assert cache.pin(KEY) is False
    cache.record(KEY, image="img", image_id="id")
    assert cache.pin(KEY) is True and cache.lookup(KEY).pinned is True  # type: ignore[union-attr]
    assert cache.unpin(KEY) is True and cache.lookup(KEY).pinned is False  # type: ignore[union-attr]
    assert cache.remove(KEY) is True
    assert cache.remove(KEY) is False
    assert cache.lookup(KEY) is None


def test_stats_and_entries(cache: ImageCache) -> None:
    empty = cache.stats()
    assert (empty.entries, empty.total_bytes, empty.hits, empty.oldest, empty.newest) == (0, 0, 0, None, None)
    for i in range(5):
        cache.record(_key(i), image=f"img{i}", image_id=f"id{i}", size=100 * (i + 1))
    cache.pin(_key(2))
    for _ in range(3):
        assert cache.lookup(_key(4)) is not None
    cache.lookup(_key(1))
    stats = cache.stats()
    assert stats.entries == 5 and stats.total_bytes == 1500 and stats.hits == 4
    assert stats.pinned == 1 and stats.leases == 0
    assert stats.oldest is not None and stats.newest is not None and stats.oldest <= stats.newest
    assert stats.path == str(cache.path)
    assert json.loads(json.dumps(stats.to_json()))["total_bytes"] == 1500
    listed = cache.entries()
    assert [e.key for e in listed][:2] == [_key(1), _key(4)]  # most recently used first
    assert {e.key for e in listed} == {_key(i) for i in range(5)}
    assert next(e for e in listed if e.key == _key(4)).hit_count == 3


def test_hits_are_written_when_last_used_is_older_than_the_touch_interval(tmp_path: Path) -> None:
    cache = ImageCache(tmp_path / "i.db", touch_interval=3600)
    cache.record(KEY, image="img", image_id="id")
    old = time.time() - 7200
    _sql(cache, "UPDATE entries SET last_used = ? WHERE key = ?", (old, KEY.hex))
    cache.lookup(KEY)  # stale last_used: written through at once, for other processes' GC
    (row,) = _sql(cache, "SELECT hit_count, last_used FROM entries")
    assert row[0] == 1 and row[1] > old + 3000
    cache.lookup(KEY)  # fresh now: kept in memory
    assert _sql(cache, "SELECT hit_count FROM entries") == [(1,)]
    cache.close()  # and written on close
    assert _sql(cache, "SELECT hit_count FROM entries") == [(2,)]


def test_hits_survive_a_busy_index_and_are_written_later(tmp_path: Path) -> None:
    cache = ImageCache(tmp_path / "i.db", busy_timeout=0.05, touch_interval=0)
    cache.record(KEY, image="img", image_id="id")
    blocker = sqlite3.connect(cache.path, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")  # another process holds the write lock
    try:
        assert cache.lookup(KEY) is not None  # a hit is still a hit
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    cache.close()
    assert _sql(cache, "SELECT hit_count FROM entries") == [(1,)]


def test_lookups_from_many_threads(cache: ImageCache) -> None:
    for i in range(20):
        cache.record(_key(i), image=f"img{i}", image_id="id")
    errors: list[BaseException] = []

    def reader() -> None:
        try:
            for i in range(200):
                entry = cache.lookup(_key(i % 20))
                assert entry is not None and entry.image == f"img{i % 20}"
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=reader) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert cache.stats().hits == 800


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
def test_a_forked_child_opens_its_own_connection(cache: ImageCache) -> None:
    cache.record(KEY, image="img", image_id="id")
    assert cache.lookup(KEY) is not None  # the parent's connection exists before the fork
    pid = os.fork()
    if pid == 0:  # child: must not reuse the parent's connection, and must work
        code = 1
        try:
            entry = cache.lookup(KEY)
            cache.record(_key(7), image="child", image_id="id")
            code = 0 if entry is not None and entry.image == "img" else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert cache.lookup(_key(7)) is not None and cache.lookup(KEY) is not None


def test_a_file_that_is_not_a_database_is_reported_as_corrupt(tmp_path: Path) -> None:
    path = tmp_path / "index.db"
    path.write_bytes(b"this is not sqlite, " * 400)
    cache = ImageCache(path)
    with pytest.raises(IndexCorrupt) as info:
        cache.lookup(KEY)
    err = info.value
    assert isinstance(err, IndexUnavailable) and isinstance(err, CacheError)
    assert err.path == str(path) and str(path) in str(err) and err.hint
    assert isinstance(err.__cause__, sqlite3.DatabaseError)  # translated once, from the cause
    with pytest.raises(IndexCorrupt):
        cache.record(KEY, image="i", image_id="x")


def test_verify_passes_a_sound_index_and_names_a_damaged_one(tmp_path: Path) -> None:
    cache = ImageCache(tmp_path / "index.db")
    for i in range(300):
        cache.record(_key(i), image=f"img{i}" * 20, image_id="id" * 30, size=i)
    cache.verify()
    cache.close()
    conn = sqlite3.connect(cache.path)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    # Scribble over the header of a table leaf page (type byte 13), as a failing disk would.
    data = bytearray(cache.path.read_bytes())
    page = 4096
    leaf = next(n for n in range(2, len(data) // page) if data[n * page] == 13)
    data[leaf * page : leaf * page + 64] = b"\xff" * 64
    cache.path.write_bytes(bytes(data))
    with pytest.raises(IndexCorrupt) as info:
        ImageCache(cache.path).verify()
    assert info.value.problems and info.value.problems != ("ok",)


def test_an_index_from_a_newer_schema_is_refused_with_a_hint(tmp_path: Path) -> None:
    cache = ImageCache(tmp_path / "index.db")
    cache.record(KEY, image="img", image_id="id")
    cache.close()
    _sql(cache, "PRAGMA user_version = 99")
    newer = ImageCache(cache.path)
    assert newer.lookup(KEY) is not None  # reading columns we know still works
    with pytest.raises(IndexUnavailable) as info:
        newer.verify()
    assert "99" in str(info.value) and "upgrade" in info.value.hint


def test_an_unwritable_location_is_an_environment_problem(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    cache = ImageCache(blocker / "sub" / "index.db")  # parent "directory" is a file
    with pytest.raises(IndexUnavailable) as info:
        cache.lookup(KEY)
    assert info.value.exit_code == 3


def test_memory_paths_are_refused() -> None:
    with pytest.raises(CacheInputError):
        ImageCache(":memory:")


def test_parsed_and_computed_keys_address_the_same_entry(cache: ImageCache) -> None:
    cache.record(KEY, image="img", image_id="id")
    assert cache.lookup(ContentKey.parse(KEY.hex)) is not None


def test_many_connections_creating_a_fresh_index_at_once_all_succeed(tmp_path: Path) -> None:
    # Regression: switching a fresh file to WAL answers "database is locked" at once (SQLite does
    # not run its busy handler for it) when several connections race to create the schema.
    failures: list[str] = []
    for round_ in range(40):
        path = tmp_path / f"fresh-{round_}.db"
        barrier = threading.Barrier(6)

        def create(i: int, path: Path = path, barrier: threading.Barrier = barrier) -> None:
            cache = ImageCache(path)
            try:
                assert cache.lookup(KEY) is None  # a read first, as a real caller would
                barrier.wait()
                cache.record(_key(i), image=f"img{i}", image_id="id")
            except Exception as exc:  # noqa: BLE001 - collected and reported below
                failures.append(repr(exc))
            finally:
                cache.close()

        threads = [threading.Thread(target=create, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert ImageCache(path).stats().entries == 6
    assert failures == []


REF = "dockyard/base:bookworm-python3"
DIGEST = "sha256:" + "9a" * 32


def test_resolutions_are_remembered_for_a_bounded_time(cache: ImageCache) -> None:
    assert cache.resolution(REF, max_age=60) is None  # nothing yet, and no schema needed to say so
    cache.remember_resolution(REF, DIGEST)
    assert cache.resolution(REF, max_age=60) == DIGEST
    assert ImageCache(cache.path).resolution(REF, max_age=60) == DIGEST  # other processes too
    _sql(cache, "UPDATE resolutions SET resolved = resolved - 120")
    assert cache.resolution(REF, max_age=60) is None  # too old: the tag may have moved
    assert cache.resolution(REF, max_age=600) == DIGEST
    cache.remember_resolution(REF, "sha256:" + "1b" * 32)  # re-resolved: replaces, fresh again
    assert cache.resolution(REF, max_age=60) == "sha256:" + "1b" * 32


@pytest.mark.parametrize(
    ("ref", "digest"),
    [("", DIGEST), ("has space", DIGEST), (REF, "latest"), (REF, "sha256:xyz"), (3, DIGEST)],
)
def test_bad_resolutions_are_refused(cache: ImageCache, ref: object, digest: object) -> None:
    with pytest.raises(CacheInputError):
        cache.remember_resolution(ref, digest)  # type: ignore[arg-type]
    with pytest.raises(CacheInputError):
        cache.resolution(REF, max_age=-1)


def test_an_index_of_schema_1_is_read_as_is_and_migrated_on_first_write(tmp_path: Path) -> None:
    import sqlite_utils
    from dockyard.cache import _db

    path = tmp_path / "old.db"
    conn = sqlite3.connect(path, isolation_level=None)
    _db._migrate_to_1(sqlite_utils.Database(conn, execute_plugins=False))
    conn.execute("PRAGMA user_version = 1")
    conn.execute(
        "INSERT INTO entries (key, image, image_id, size, created, last_used, hit_count, parts,"
        " builder, pinned) VALUES (?, 'old-img', 'id', 7, 1.0, 1.0, 3, '{}', 'old', 0)",
        (KEY.hex,),
    )
    conn.close()

    cache = ImageCache(path)
    entry = cache.lookup(KEY)
    assert entry is not None and entry.image == "old-img" and entry.hit_count == 3
    assert cache.resolution(REF, max_age=60) is None
    assert _sql(cache, "PRAGMA user_version") == [(1,)]  # reads never migrate
    cache.remember_resolution(REF, DIGEST)  # the first write migrates
    assert _sql(cache, "PRAGMA user_version") == [(5,)]
    assert cache.resolution(REF, max_age=60) == DIGEST
    assert cache.lookup(KEY) is not None and cache.stats().entries == 1
    cache.verify()


def test_the_last_push_of_a_key_is_remembered_per_registry(cache: ImageCache) -> None:
    cache.record_publish(KEY, "127.0.0.1:5000/team/cache", ok=False, detail="HTTP 500 from the registry")
    cache.record_publish(KEY, "127.0.0.1:5001/other", ok=True, detail="sha256:" + "a" * 64)
    (first,) = cache.publishes("127.0.0.1:5000/team/cache")
    assert (first.key, first.ok, first.detail) == (KEY.hex, False, "HTTP 500 from the registry")
    cache.record_publish(KEY, "127.0.0.1:5000/team/cache", ok=True, detail="sha256:" + "b" * 64)
    (again,) = cache.publishes("127.0.0.1:5000/team/cache")
    assert again.ok and again.detail.endswith("b" * 64) and again.at >= first.at
    assert len(cache.publishes()) == 2
    assert set(again.to_json()) == {"key", "registry", "ok", "detail", "at"}


def test_a_push_record_refuses_credentials_in_the_registry(cache: ImageCache) -> None:
    with pytest.raises(CacheInputError):
        cache.record_publish(KEY, "user:secret@127.0.0.1:5000/cache", ok=True, detail="")
    with pytest.raises(InvalidKey):
        cache.record_publish("not-a-key", "127.0.0.1:5000/cache", ok=True, detail="")
    assert cache.publishes() == []


def test_parts_of_published_keys_are_remembered_per_registry(cache: ImageCache) -> None:
    cache.remember_remote_parts("127.0.0.1:5000/c", KEY, dict(KEY.parts))
    assert cache.remote_parts("127.0.0.1:5000/c") == {KEY.hex: dict(KEY.parts)}
    assert cache.remote_parts("127.0.0.1:5001/other") == {}
    with pytest.raises(CacheInputError):
        cache.remember_remote_parts("", KEY, dict(KEY.parts))


def test_what_a_build_resolved_is_recorded_per_key_and_replaced_by_a_rebuild(cache: ImageCache) -> None:
    assert cache.packages(KEY) is None
    first = cache.record_packages(KEY, ["six==1.17.0", "Idna==3.7", "six==1.17.0"], installer="uv 0.13.9")
    assert first.packages == ("Idna==3.7", "six==1.17.0") and first.neighbour == ""
    again = cache.packages(KEY.hex)
    assert again is not None and (again.installer, again.packages) == ("uv 0.13.9", ("Idna==3.7", "six==1.17.0"))
    near = "b" * 32
    cache.record_packages(KEY, ["six==1.17.0"], installer="pip", neighbour=near)
    replaced = cache.packages(KEY)
    assert replaced is not None and replaced.packages == ("six==1.17.0",) and replaced.neighbour == near
    assert set(replaced.to_json()) == {"key", "installer", "layout", "packages", "neighbour", "recorded"}


def test_a_package_record_refuses_what_is_not_a_list_of_lines(cache: ImageCache) -> None:
    with pytest.raises(CacheInputError):
        cache.record_packages(KEY, "six==1.17.0", installer="uv")
    with pytest.raises(CacheInputError):
        cache.record_packages(KEY, ["six==1\nevil"], installer="uv")
    with pytest.raises(CacheInputError):
        cache.record_packages(KEY, ["six==1"], installer="")
    with pytest.raises(CacheInputError):
        cache.record_packages(KEY, ["six==1"], installer="uv", layout="somewhere")
    with pytest.raises(InvalidKey):
        cache.record_packages(KEY, ["six==1"], installer="uv", neighbour="not-a-key")
    assert cache.packages(KEY) is None
