"""Single-flight semantics within one process: leases, heartbeats, release, get_or_build."""

from __future__ import annotations

import itertools
import os
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from dockyard.cache import (
    BuildResult,
    BuildSlot,
    CacheInputError,
    ImageCache,
    KeyParts,
    LeaseLost,
    WaitTimeout,
    compute_key,
)
from dockyard.cache._lease import new_owner

KEY = compute_key(KeyParts("dockyard/base:bookworm-python3", pip=["torch==2.3.0"]))


@pytest.fixture
def cache(tmp_path: Path) -> ImageCache:
    with ImageCache(tmp_path / "index.db") as c:
        yield c


def _leases(cache: ImageCache) -> list[tuple[object, ...]]:
    conn = sqlite3.connect(cache.path)
    try:
        if not conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'leases'").fetchone():
            return []  # no schema yet: nothing was ever leased
        return conn.execute("SELECT key, owner, pid, acquired, heartbeat, timeout FROM leases").fetchall()
    finally:
        conn.close()


def _put_lease(cache: ImageCache, *, owner: str, pid: int, heartbeat: float, timeout: float) -> None:
    cache.stats()  # creates the schema
    conn = sqlite3.connect(cache.path)
    with conn:
        conn.execute(
            "INSERT INTO leases (key, owner, pid, acquired, heartbeat, timeout) VALUES (?,?,?,?,?,?)",
            (KEY.hex, owner, pid, heartbeat, heartbeat, timeout),
        )
    conn.close()


def test_a_miss_takes_the_lease_and_record_releases_it_in_the_same_transaction(cache: ImageCache) -> None:
    with cache.building(KEY) as slot:
        assert isinstance(slot, BuildSlot)
        assert slot.must_build and slot.entry is None
        (lease,) = _leases(cache)
        assert lease[0] == KEY.hex and lease[1] == slot.owner and lease[5] == 30.0
        entry = slot.record(image="img", image_id="id", size=9, builder="test")
        assert slot.entry == entry
        assert _leases(cache) == []
    assert cache.lookup(KEY) == entry
    assert dict(entry.parts) == dict(KEY.parts)


def test_a_hit_needs_no_lease(cache: ImageCache) -> None:
    cache.record(KEY, image="img", image_id="id")
    with cache.building(KEY) as slot:
        assert not slot.must_build and slot.entry is not None and slot.entry.image == "img"
        assert _leases(cache) == []
        with pytest.raises(CacheInputError):
            slot.record(image="other", image_id="id")


def test_a_raising_body_releases_the_lease_and_records_nothing(cache: ImageCache) -> None:
    with pytest.raises(RuntimeError, match="boom"), cache.building(KEY) as slot:
        assert slot.must_build
        raise RuntimeError("boom")
    assert _leases(cache) == []
    assert cache.lookup(KEY) is None


def test_a_body_that_forgets_to_record_releases_the_lease(cache: ImageCache) -> None:
    with cache.building(KEY) as slot:
        assert slot.must_build
    assert _leases(cache) == []
    assert cache.lookup(KEY) is None


def test_record_twice_is_refused(cache: ImageCache) -> None:
    with cache.building(KEY) as slot:
        slot.record(image="img", image_id="id")
        with pytest.raises(CacheInputError):
            slot.record(image="img", image_id="id")


def test_bad_record_fields_keep_the_lease_until_the_body_ends(cache: ImageCache) -> None:
    with pytest.raises(CacheInputError), cache.building(KEY) as slot:
        try:
            slot.record(image="", image_id="id")
        finally:
            assert len(_leases(cache)) == 1
    assert _leases(cache) == [] and cache.lookup(KEY) is None


def test_the_heartbeat_keeps_the_lease_fresh(cache: ImageCache) -> None:
    with cache.building(KEY, lease_timeout=0.3) as slot:
        (before,) = _leases(cache)
        time.sleep(0.45)
        (after,) = _leases(cache)
        assert after[4] > before[4] + 0.05  # refreshed about every 0.1 s
        assert time.time() - after[4] < 0.3  # never stale while we are alive
        assert not slot.lease_lost
        slot.record(image="img", image_id="id")


def test_a_live_lease_makes_others_wait_then_they_see_the_entry(cache: ImageCache) -> None:
    holder_has_lease = threading.Event()
    results: list[tuple[bool, str]] = []

    def holder() -> None:
        with ImageCache(cache.path).building(KEY) as slot:
            assert slot.must_build
            holder_has_lease.set()
            time.sleep(0.3)
            slot.record(image="from-holder", image_id="id")

    t = threading.Thread(target=holder)
    t.start()
    assert holder_has_lease.wait(5)
    started = time.monotonic()
    with cache.building(KEY, poll=0.01) as slot:
        results.append((slot.must_build, slot.entry.image if slot.entry else ""))
    t.join()
    assert results == [(False, "from-holder")]
    assert time.monotonic() - started >= 0.2  # it did wait


def test_a_stale_lease_is_taken_over(cache: ImageCache) -> None:
    _put_lease(cache, owner="gone:4242:x", pid=4242, heartbeat=time.time() - 10, timeout=1.0)
    with cache.building(KEY, wait_timeout=1.0) as slot:
        assert slot.must_build
        ((_, owner, *_),) = _leases(cache)
        assert owner == slot.owner != "gone:4242:x"
        slot.record(image="img", image_id="id")


def test_staleness_is_judged_by_the_holders_timeout(cache: ImageCache) -> None:
    # Ten seconds without a heartbeat is fine for a holder that promised sixty.
    _put_lease(cache, owner="slow:77:x", pid=77, heartbeat=time.time() - 10, timeout=60.0)
    with pytest.raises(WaitTimeout) as info, cache.building(
        KEY, lease_timeout=1.0, wait_timeout=0.1, poll=0.02
    ):
        pytest.fail("must wait")
    err = info.value
    assert err.key == KEY.hex and err.holder_pid == 77 and err.holder == "slow:77:x"
    assert "77" in str(err) and KEY.hex in str(err) and err.hint


def test_a_waiter_takes_over_when_the_lease_vanishes(cache: ImageCache) -> None:
    _put_lease(cache, owner="other:99:x", pid=99, heartbeat=time.time() + 3600, timeout=60.0)

    def give_up() -> None:
        time.sleep(0.2)
        conn = sqlite3.connect(cache.path)
        with conn:
            conn.execute("DELETE FROM leases")  # the holder's build failed
        conn.close()

    t = threading.Thread(target=give_up)
    t.start()
    with cache.building(KEY, poll=0.01, wait_timeout=5) as slot:
        assert slot.must_build
        slot.record(image="img", image_id="id")
    t.join()


def test_a_lease_taken_over_meanwhile_is_reported_not_overwritten(cache: ImageCache) -> None:
    with pytest.raises(LeaseLost) as info, cache.building(KEY, lease_timeout=30) as slot:
        conn = sqlite3.connect(cache.path)
        with conn:  # as if we had stalled past our lease and another process took it
            conn.execute("UPDATE leases SET owner = 'thief:1:x'")
        conn.close()
        slot.record(image="mine", image_id="id")
    assert info.value.holder == "thief:1:x" and info.value.key == KEY.hex
    assert cache.lookup(KEY) is None  # nothing written
    ((_, owner, *_),) = _leases(cache)
    assert owner == "thief:1:x"  # and the thief's lease is untouched by our release


def test_the_heartbeat_notices_a_lost_lease(cache: ImageCache) -> None:
    with cache.building(KEY, lease_timeout=0.3) as slot:
        conn = sqlite3.connect(cache.path)
        with conn:
            conn.execute("DELETE FROM leases")
        conn.close()
        deadline = time.monotonic() + 3
        while not slot.lease_lost:
            assert time.monotonic() < deadline
            time.sleep(0.02)


@pytest.mark.parametrize(
    "opts",
    [{"lease_timeout": 0}, {"lease_timeout": -1}, {"poll": 0}, {"heartbeat": 40},
     {"wait_timeout": -1}, {"lease_timeout": True}],
)
def test_bad_timing_arguments_are_refused(cache: ImageCache, opts: dict) -> None:
    with pytest.raises(CacheInputError), cache.building(KEY, **opts):
        pass
    assert _leases(cache) == []


def test_get_or_build_builds_once_then_hits(cache: ImageCache) -> None:
    calls: list[object] = []

    def build(key: object) -> BuildResult:
        calls.append(key)
        return BuildResult(image=f"dockyard/env:{key}", image_id="sha256:1", size=5, builder="fn")

    entry, built = cache.get_or_build(KEY, build)
    assert built is True and calls == [KEY]
    assert entry.image == f"dockyard/env:{KEY.hex}" and entry.builder == "fn" and entry.size == 5
    again, built = cache.get_or_build(KEY, build)
    assert built is False and again.key == entry.key and len(calls) == 1


def test_get_or_build_propagates_build_errors_and_releases(cache: ImageCache) -> None:
    def build(key: object) -> BuildResult:
        raise ValueError("compiler exploded")

    with pytest.raises(ValueError, match="compiler exploded"):
        cache.get_or_build(KEY, build)
    assert _leases(cache) == [] and cache.lookup(KEY) is None


def test_get_or_build_refuses_a_wrong_return_type(cache: ImageCache) -> None:
    with pytest.raises(CacheInputError, match="BuildResult"):
        cache.get_or_build(KEY, lambda key: ("img", "id"))  # type: ignore[arg-type,return-value]
    assert _leases(cache) == [] and cache.lookup(KEY) is None


def test_build_result_is_validated() -> None:
    with pytest.raises(CacheInputError):
        BuildResult(image="", image_id="x")
    with pytest.raises(CacheInputError):
        BuildResult(image="img", image_id="x", size=-5)


def test_threads_of_one_process_build_once(cache: ImageCache) -> None:
    calls: list[int] = []
    lock = threading.Lock()

    def build(key: object) -> BuildResult:
        with lock:
            calls.append(threading.get_ident())
        time.sleep(0.2)
        return BuildResult(image="img", image_id="id")

    out: list[bool] = []

    def worker() -> None:
        out.append(cache.get_or_build(KEY, build, poll=0.01)[1])

    threads = [threading.Thread(target=worker) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and sorted(out) == [False] * 5 + [True]


# -- a dead holder on this machine; saying what a waiter waits for ------------------------------


def _dead_pid() -> int:
    """The pid of a process that has exited and been reaped."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _here(pid: int) -> str:
    """An owner token naming ``pid`` on this machine (host name and pid namespace as ours)."""
    host, _, rest = new_owner().split(":", 2)
    return f"{host}:{pid}:{rest}"


def test_a_dead_holder_on_this_machine_is_taken_over_at_once(cache: ImageCache) -> None:
    pid = _dead_pid()
    # A fresh heartbeat and a long timeout: only the dead pid can make it stale.
    _put_lease(cache, owner=_here(pid), pid=pid, heartbeat=time.time(), timeout=60.0)
    started = time.monotonic()
    with cache.building(KEY, wait_timeout=2.0, poll=0.01) as slot:
        assert slot.must_build
        ((_, owner, lease_pid, *_),) = _leases(cache)
        assert owner == slot.owner and lease_pid == os.getpid()
        slot.record(image="img", image_id="id")
    assert time.monotonic() - started < 1.0


def test_a_waiter_takes_over_as_soon_as_a_holder_on_this_machine_dies(cache: ImageCache) -> None:
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        _put_lease(cache, owner=_here(holder.pid), pid=holder.pid, heartbeat=time.time() + 3600, timeout=60.0)
        threading.Timer(0.3, holder.kill).start()  # killed, not reaped: a zombie until wait()
        started = time.monotonic()
        with cache.building(KEY, wait_timeout=5.0, poll=0.01) as slot:
            assert slot.must_build
            slot.record(image="img", image_id="id")
        assert 0.25 < time.monotonic() - started < 2.0
    finally:
        holder.kill()
        holder.wait()


def test_a_live_holder_on_this_machine_is_waited_for(cache: ImageCache) -> None:
    _put_lease(cache, owner=_here(os.getpid()), pid=os.getpid(), heartbeat=time.time(), timeout=60.0)
    with pytest.raises(WaitTimeout), cache.building(KEY, wait_timeout=0.2, poll=0.02):
        pytest.fail("must wait")


def test_a_holder_owned_by_another_user_counts_as_alive(
    cache: ImageCache, monkeypatch: pytest.MonkeyPatch
) -> None:
    pid = _dead_pid()
    real_kill = os.kill

    def kill(target: int, sig: int) -> None:
        if target == pid:
            raise PermissionError(1, "Operation not permitted")  # exists, but is not ours
        real_kill(target, sig)

    monkeypatch.setattr(os, "kill", kill)
    _put_lease(cache, owner=_here(pid), pid=pid, heartbeat=time.time(), timeout=60.0)
    with pytest.raises(WaitTimeout) as info, cache.building(KEY, wait_timeout=0.2, poll=0.02):
        pytest.fail("must wait")
    assert info.value.holder_pid == pid


@pytest.mark.parametrize("where", ["another host", "another pid namespace", "an older token"])
def test_a_dead_pid_elsewhere_is_not_trusted(cache: ImageCache, where: str) -> None:
    pid = _dead_pid()
    host, _, rest = _here(pid).split(":", 2)
    owner = {
        "another host": f"not-{host}:{pid}:{rest}",
        "another pid namespace": f"{host}:{pid}:1{rest}",  # same pids mean other processes there
        "an older token": f"{host}:{pid}:{os.urandom(8).hex()}",  # says nothing of its namespace
    }[where]
    _put_lease(cache, owner=owner, pid=pid, heartbeat=time.time(), timeout=60.0)
    with pytest.raises(WaitTimeout), cache.building(KEY, wait_timeout=0.2, poll=0.02):
        pytest.fail("must wait for the heartbeat timeout")


def test_on_wait_says_whom_it_waits_for_at_once_then_every_few_seconds(
    cache: ImageCache, monkeypatch: pytest.MonkeyPatch
) -> None:
    from dockyard.cache import _lease

    assert 1.0 <= _lease._WAIT_NOTE_EVERY <= 10.0  # "every few seconds"
    monkeypatch.setattr(_lease, "_WAIT_NOTE_EVERY", 0.1)
    _put_lease(cache, owner="other:99:x", pid=99, heartbeat=time.time() + 3600, timeout=60.0)
    calls: list[tuple[str, int, float]] = []
    with pytest.raises(WaitTimeout), cache.building(
        KEY, wait_timeout=0.45, poll=0.01, on_wait=lambda *a: calls.append(a)
    ):
        pytest.fail("must wait")
    assert calls, "on_wait was never called"
    assert calls[0][:2] == ("other:99:x", 99) and calls[0][2] < 0.05  # at once
    assert 3 <= len(calls) <= 6, calls
    waited = [c[2] for c in calls]
    assert all(b - a >= 0.09 for a, b in itertools.pairwise(waited)), waited


def test_on_wait_names_the_new_holder_when_the_lease_changes_hands(cache: ImageCache) -> None:
    _put_lease(cache, owner="first:1:x", pid=1, heartbeat=time.time() + 3600, timeout=60.0)

    def hand_over() -> None:
        time.sleep(0.15)
        conn = sqlite3.connect(cache.path)
        with conn:
            conn.execute("UPDATE leases SET owner = 'second:2:x', pid = 2")
        conn.close()

    t = threading.Thread(target=hand_over)
    t.start()
    calls: list[tuple[str, int, float]] = []
    with pytest.raises(WaitTimeout), cache.building(
        KEY, wait_timeout=0.5, poll=0.01, on_wait=lambda *a: calls.append(a)
    ):
        pytest.fail("must wait")
    t.join()
    assert [c[:2] for c in calls] == [("first:1:x", 1), ("second:2:x", 2)]


def test_on_wait_is_not_called_without_a_wait(cache: ImageCache) -> None:
    calls: list[object] = []
    with cache.building(KEY, on_wait=calls.append) as slot:  # a miss: takes the lease
        slot.record(image="img", image_id="id")
    with cache.building(KEY, on_wait=calls.append) as slot:  # a hit
        assert not slot.must_build
    assert calls == []


def test_an_exception_from_on_wait_ends_the_wait(cache: ImageCache) -> None:
    _put_lease(cache, owner="other:99:x", pid=99, heartbeat=time.time() + 3600, timeout=60.0)

    def stop(holder: str, pid: int, waited: float) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt), cache.building(KEY, on_wait=stop):
        pytest.fail("must not get a slot")
    ((_, owner, *_),) = _leases(cache)
    assert owner == "other:99:x"  # the holder's lease is untouched


def test_a_non_callable_on_wait_is_refused(cache: ImageCache) -> None:
    with pytest.raises(CacheInputError, match="on_wait"), cache.building(KEY, on_wait="print"):  # type: ignore[arg-type]
        pass
