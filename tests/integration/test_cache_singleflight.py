"""Single-flight builds across real processes sharing one SQLite index (no Docker needed)."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from dockyard.cache import ImageCache, KeyParts, compute_key

WORKER = Path(__file__).resolve().parents[1] / "helpers" / "cache_worker.py"


def _key(tag: str) -> str:
    return compute_key(KeyParts("dockyard/base:bookworm-python3", pip=[f"pkg-{tag}==1.0"])).hex


def _spawn(mode: str, db: Path, key: str, counter: Path, *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, str(WORKER), mode, "--db", str(db), "--key", key,
         "--counter", str(counter), *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _finish(proc: subprocess.Popen[str], timeout: float = 20.0) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def _lines(counter: Path) -> list[str]:
    return counter.read_text().splitlines() if counter.exists() else []


def _rows(db: Path, table: str) -> list[tuple[object, ...]]:
    conn = sqlite3.connect(db)
    try:
        return conn.execute(f"SELECT * FROM {table}").fetchall()
    finally:
        conn.close()


def _integrity(db: Path) -> str:
    conn = sqlite3.connect(db)
    try:
        return str(conn.execute("PRAGMA integrity_check").fetchone()[0])
    finally:
        conn.close()


def test_eight_processes_build_a_new_key_exactly_once(tmp_path: Path) -> None:
    db, counter, go = tmp_path / "index.db", tmp_path / "builds.txt", tmp_path / "go"
    key = _key("eight")
    procs = [
        _spawn("build", db, key, counter, "--go", str(go), "--build-seconds", "0.5")
        for _ in range(8)
    ]
    go.touch()  # every worker is past interpreter start-up and contends from here on
    results = []
    for proc in procs:
        code, out, err = _finish(proc)
        assert code == 0, err
        results.append(json.loads(out))

    builds = _lines(counter)
    assert len(builds) == 1, builds
    builder_pid = int(builds[0].split()[1])
    assert [r["pid"] for r in results if r["built"]] == [builder_pid]
    entries = {json.dumps({k: v for k, v in r["entry"].items() if k not in ("last_used", "hit_count")},
                          sort_keys=True) for r in results}
    assert len(entries) == 1, entries  # all eight got the same entry
    (entry,) = (r["entry"] for r in results if r["built"])
    assert entry["key"] == key and entry["builder"] == f"worker-{builder_pid}"
    assert len(_rows(db, "entries")) == 1
    assert _rows(db, "leases") == []
    assert _integrity(db) == "ok"


def test_a_killed_builder_is_taken_over_after_its_lease_goes_stale(tmp_path: Path) -> None:
    db, counter, ready = tmp_path / "index.db", tmp_path / "builds.txt", tmp_path / "ready"
    key = _key("kill")
    hung = _spawn("hang", db, key, counter, "--ready", str(ready), "--lease-timeout", "1")
    deadline = time.monotonic() + 15
    while not ready.exists():
        assert hung.poll() is None, hung.communicate()
        assert time.monotonic() < deadline, "the hanging builder never took the lease"
        time.sleep(0.01)
    (lease,) = _rows(db, "leases")
    assert lease[2] == hung.pid  # it holds the lease, mid-build

    os.kill(hung.pid, signal.SIGKILL)
    hung.wait(timeout=10)
    assert hung.returncode == -signal.SIGKILL

    started = time.monotonic()
    taker = _spawn("build", db, key, counter, "--lease-timeout", "1")
    code, out, err = _finish(taker)
    waited = time.monotonic() - started
    assert code == 0, err
    result = json.loads(out)
    assert result["built"] is True
    assert _lines(counter) == [f"hang {hung.pid}", f"build {taker.pid}"]
    assert waited < 15

    assert _integrity(db) == "ok"
    rows = _rows(db, "entries")
    assert len(rows) == 1  # exactly one row, and it is the taker's, complete
    entry = ImageCache(db).lookup(key)
    assert entry is not None
    assert entry.image == f"test/env:{key}"
    assert entry.image_id == f"sha256:{taker.pid:064x}"
    assert entry.size == 1234 and entry.builder == f"worker-{taker.pid}"
    assert _rows(db, "leases") == []


def test_a_failed_build_records_nothing_and_the_next_caller_builds(tmp_path: Path) -> None:
    db, counter = tmp_path / "index.db", tmp_path / "builds.txt"
    key = _key("fail")
    code, out, err = _finish(_spawn("fail", db, key, counter))
    assert code == 1, err
    assert json.loads(out)["error"] == "the build failed on purpose"
    assert _rows(db, "entries") == []
    assert _rows(db, "leases") == []  # released at once, not left to go stale

    started = time.monotonic()
    code, out, err = _finish(_spawn("build", db, key, counter))
    assert code == 0, err
    assert json.loads(out)["built"] is True
    assert time.monotonic() - started < 10  # did not wait for a 30 s lease to expire
    assert len(_lines(counter)) == 2
    assert len(_rows(db, "entries")) == 1
    assert _integrity(db) == "ok"


def test_waiters_see_a_failed_build_and_one_of_them_builds(tmp_path: Path) -> None:
    db, counter, go = tmp_path / "index.db", tmp_path / "builds.txt", tmp_path / "go"
    key = _key("fail-then-wait")
    failing = _spawn("fail", db, key, counter, "--go", str(go), "--build-seconds", "0.5")
    go.touch()
    deadline = time.monotonic() + 15
    while not _lines(counter):  # the failing builder holds the lease now
        assert time.monotonic() < deadline
        time.sleep(0.01)
    waiters = [_spawn("build", db, key, counter) for _ in range(3)]
    assert _finish(failing)[0] == 1
    results = []
    for proc in waiters:
        code, out, err = _finish(proc)
        assert code == 0, err
        results.append(json.loads(out))
    assert sum(r["built"] for r in results) == 1
    assert len(_lines(counter)) == 2  # the failed build and exactly one rebuild
    assert len(_rows(db, "entries")) == 1


def test_waiter_times_out_naming_the_holder(tmp_path: Path) -> None:
    from dockyard.cache import WaitTimeout

    db, counter, ready = tmp_path / "index.db", tmp_path / "builds.txt", tmp_path / "ready"
    key = _key("timeout")
    hung = _spawn("hang", db, key, counter, "--ready", str(ready), "--lease-timeout", "30")
    try:
        deadline = time.monotonic() + 15
        while not ready.exists():
            assert hung.poll() is None and time.monotonic() < deadline
            time.sleep(0.01)
        cache = ImageCache(db)
        with pytest.raises(WaitTimeout) as info, cache.building(key, wait_timeout=0.3, poll=0.02):
            pytest.fail("must not get a slot")
        assert info.value.key == key
        assert info.value.holder_pid == hung.pid
        assert str(hung.pid) in str(info.value) and key in str(info.value)
    finally:
        hung.kill()
        hung.wait()


def test_a_builder_killed_on_this_machine_is_taken_over_at_once_not_after_its_lease(tmp_path: Path) -> None:
    # A 30 s lease: a waiter that waited out the heartbeat timeout would take 30 s or more.
    db, counter, ready = tmp_path / "index.db", tmp_path / "builds.txt", tmp_path / "ready"
    key = _key("kill-at-once")
    hung = _spawn("hang", db, key, counter, "--ready", str(ready), "--lease-timeout", "30")
    procs = [hung]
    try:
        deadline = time.monotonic() + 15
        while not ready.exists():
            assert hung.poll() is None, hung.communicate()
            assert time.monotonic() < deadline, "the hanging builder never took the lease"
            time.sleep(0.01)
        waiter = _spawn("build", db, key, counter, "--lease-timeout", "30")
        procs.append(waiter)
        time.sleep(1.0)  # the waiter is past start-up and waiting on the live lease
        assert waiter.poll() is None and _lines(counter) == [f"hang {hung.pid}"]
        os.kill(hung.pid, signal.SIGKILL)
        killed = time.monotonic()
        hung.wait(timeout=10)
        code, out, err = _finish(waiter, timeout=60)
        assert code == 0, err
        assert json.loads(out)["built"] is True
        assert time.monotonic() - killed < 5, "the waiter waited for the dead holder's lease timeout"

        # A builder that starts after the holder died takes the lease on its first try.
        key2 = _key("kill-at-once-2")
        ready.unlink()
        hung2 = _spawn("hang", db, key2, counter, "--ready", str(ready), "--lease-timeout", "30")
        procs.append(hung2)
        while not ready.exists():
            assert hung2.poll() is None and time.monotonic() < deadline + 15
            time.sleep(0.01)
        os.kill(hung2.pid, signal.SIGKILL)
        hung2.wait(timeout=10)
        started = time.monotonic()
        code, out, err = _finish(_spawn("build", db, key2, counter, "--lease-timeout", "30"), timeout=60)
        assert code == 0, err
        assert json.loads(out)["built"] is True and time.monotonic() - started < 5
        assert _rows(db, "leases") == [] and len(_rows(db, "entries")) == 2
        assert _integrity(db) == "ok"
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
