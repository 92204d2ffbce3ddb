"""``dockyard doctor`` checks every database dockyard keeps (index, GPU leases, each workspace's runs)
on real SQLite files: damage is a FAIL naming the file and the fix, an emptied file is a warning,
a locked one is reported busy, and doctor itself never writes, crashes or hangs."""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from dockyard import _doctor
from dockyard._doctor import Check
from dockyard.cli._app import main
from dockyard.gpu import LeaseStore
from dockyard.runs import RunStore

ENGINE_CHECKS = {"engine", "buildkit", "base-images"}


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("DOCKYARD_HOME", str(home))
    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path}/absent.sock")  # no engine answers there
    return home


@pytest.fixture
def engine_up(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pretend the engine, BuildKit and base images are fine, so the exit code is the databases' alone."""
    for name in ENGINE_CHECKS:
        ok = Check(name, True, "stubbed for this test")
        attr = f"_check_{name.replace('-', '_')}"
        monkeypatch.setattr(_doctor, attr, lambda *_args, _ok=ok: _ok)


def doctor_subprocess(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DOCKYARD_HOME": str(home), "DOCKER_HOST": f"unix://{home}/absent.sock"}
    return subprocess.run(
        [sys.executable, "-m", "dockyard", "doctor", *args], capture_output=True, text=True, env=env, timeout=60
    )


def doctor_in_process(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    try:
        main(["doctor", *args])
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    return code, capsys.readouterr().out


def checks_of(stdout: str) -> dict[str, dict[str, object]]:
    return {c["name"]: c for c in json.loads(stdout)["checks"]}


def make_runs(home: Path, workspace: str, rows: int = 200) -> Path:
    """A real run store with enough rows to span many pages, closed (its WAL checkpointed away)."""
    store = RunStore(home / "workspaces" / workspace)
    for i in range(rows):
        store.put_compute(f"cpu-{i:04d}", 1, vm_size="x" * 200)
    store.close()
    assert not store.path.with_name("runs.db-wal").exists()
    return store.path


def make_leases(home: Path) -> Path:
    store = LeaseStore(home)
    store.grant("run-1", ["GPU-0", "GPU-1"], str(home / "workspaces" / "default"))
    store.close()
    return store.path


def make_index(home: Path) -> Path:
    path = home / "index.db"
    conn = sqlite3.connect(path)
    with conn:
        conn.execute("CREATE TABLE entries (key TEXT PRIMARY KEY, image TEXT)")
        conn.executemany("INSERT INTO entries VALUES (?, ?)", [(f"k{i}", f"img{i}") for i in range(20)])
    conn.close()
    return path


def emptied_long_ago(path: Path) -> None:
    """A 0-byte file last written a minute ago: emptied, not one another process is making now."""
    then = time.time() - 60
    os.utime(path, (then, then))
    for extra in ("-wal", "-shm"):
        path.with_name(path.name + extra).unlink(missing_ok=True)


def corrupt_a_middle_page(path: Path) -> None:
    """Overwrite one whole b-tree page in the middle (never page 1): the header still says SQLite."""
    data = path.read_bytes()
    page_size = int.from_bytes(data[16:18], "big")
    pages = len(data) // page_size
    assert pages >= 4, "too few pages to damage one in the middle"
    with path.open("r+b") as f:
        f.seek((pages // 2) * page_size)
        f.write(b"\xff" * page_size)  # 0xff is no valid page type, nor a valid overflow pointer


def test_garbled_gpu_lease_store_fails_doctor_naming_the_file(home: Path):
    path = home / "gpus.db"
    path.write_bytes(os.urandom(8192))
    out = doctor_subprocess(home, "--json")
    assert out.returncode == 3 and "Traceback" not in out.stderr
    checks = checks_of(out.stdout)
    leases = checks["gpu-leases"]
    assert leases["ok"] is False and leases["required"] is True
    detail = str(leases["detail"])
    assert str(path) in detail and "damaged" in detail and "not a database" in detail
    assert "move gpus.db aside" in detail and "re-derives" in detail
    assert checks["index"]["ok"] is True

    text = doctor_subprocess(home)
    assert text.returncode == 3
    assert any(line.startswith("[FAIL] gpu-leases") and str(path) in line for line in text.stdout.splitlines())


def test_runs_db_with_a_corrupted_page_fails_doctor(home: Path, engine_up: None, capsys: pytest.CaptureFixture[str]):
    path = make_runs(home, "default")
    code, _ = doctor_in_process(capsys, "--json")
    assert code == 0, "a healthy run store before the damage"

    corrupt_a_middle_page(path)
    code, stdout = doctor_in_process(capsys, "--json")
    assert code == 3
    checks = checks_of(stdout)
    runs = checks["runs:default"]
    assert runs["ok"] is False and runs["required"] is True
    detail = str(runs["detail"])
    assert str(path) in detail and "damaged" in detail
    assert "move runs.db aside" in detail and "run history of workspace 'default'" in detail
    assert [name for name, c in checks.items() if not c["ok"]] == ["runs:default"]

    out = doctor_subprocess(home, "--json")  # the real command, no engine: the run store still fails
    assert out.returncode == 3 and "Traceback" not in out.stderr
    assert checks_of(out.stdout)["runs:default"]["ok"] is False


def test_zero_length_runs_db_is_a_warning_not_a_failure(
    home: Path, engine_up: None, capsys: pytest.CaptureFixture[str]
):
    path = home / "workspaces" / "default" / "runs.db"
    path.parent.mkdir(parents=True)
    path.touch()
    code, stdout = doctor_in_process(capsys, "--json")
    assert code == 0, "an emptied file is loud, but dockyard recreates it: not a failure"
    runs = checks_of(stdout)["runs:default"]
    assert runs["ok"] is False and runs["required"] is False
    assert str(path) in str(runs["detail"]) and "empty (0 bytes)" in str(runs["detail"])
    assert "recreate it on first use" in str(runs["detail"])

    code, text = doctor_in_process(capsys)
    assert code == 0 and text.rstrip().endswith("healthy")
    assert any(line.startswith("[warn] runs:default") for line in text.splitlines())
    assert path.stat().st_size == 0, "doctor never writes"

    out = doctor_subprocess(home, "--json")  # without an engine only the engine's checks fail
    assert out.returncode == 3
    failed = {c["name"] for c in json.loads(out.stdout)["checks"] if c["required"] and not c["ok"]}
    assert failed == ENGINE_CHECKS


def test_healthy_databases_are_all_ok_and_left_untouched(
    home: Path, engine_up: None, capsys: pytest.CaptureFixture[str]
):
    files = [make_index(home), make_leases(home), make_runs(home, "alpha"), make_runs(home, "beta", rows=3)]
    before = [hashlib.sha256(f.read_bytes()).hexdigest() for f in files]
    code, stdout = doctor_in_process(capsys, "--json")
    assert code == 0
    report = json.loads(stdout)
    assert report["ok"] is True
    checks = checks_of(stdout)
    for name, path in zip(["index", "gpu-leases", "runs:alpha", "runs:beta"], files, strict=True):
        assert checks[name]["ok"] is True and checks[name]["required"] is True
        assert f"{path} (healthy" in str(checks[name]["detail"])
    assert "runs" not in checks, "the placeholder line is only for a home without run stores"
    for check in report["checks"]:
        assert set(check) == {"name", "ok", "detail", "required"}
    assert [hashlib.sha256(f.read_bytes()).hexdigest() for f in files] == before, "doctor never writes"


def test_a_home_without_databases_is_healthy(home: Path, engine_up: None, capsys: pytest.CaptureFixture[str]):
    code, stdout = doctor_in_process(capsys, "--json")
    assert code == 0
    checks = checks_of(stdout)
    assert "not created yet" in str(checks["index"]["detail"])
    assert "not created yet" in str(checks["gpu-leases"]["detail"])
    assert checks["runs"]["ok"] is True
    assert not (home / "gpus.db").exists(), "doctor creates nothing"


def test_a_locked_database_is_reported_busy_quickly(
    home: Path, engine_up: None, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setattr(_doctor, "BUSY_TIMEOUT_S", 0.05)
    holder = sqlite3.connect(home / "gpus.db", isolation_level=None)  # rollback journal: a writer locks readers out
    holder.execute("CREATE TABLE leases (gpu TEXT)")
    holder.execute("BEGIN EXCLUSIVE")
    holder.execute("INSERT INTO leases VALUES ('GPU-0')")
    try:
        started = time.monotonic()
        code, stdout = doctor_in_process(capsys, "--json")
        assert time.monotonic() - started < 10
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert code == 0, "busy is not damage"
    leases = checks_of(stdout)["gpu-leases"]
    assert leases["ok"] is False and leases["required"] is False
    assert "busy" in str(leases["detail"]) and str(home / "gpus.db") in str(leases["detail"])


def test_sqlite_file_records_a_zero_length_file(tmp_path: Path):
    path = tmp_path / "ws" / "runs.db"
    path.parent.mkdir()
    path.touch()
    just_made = RunStore(path.parent)
    assert just_made.list() == [] and just_made.was_empty is False, "a file made a moment ago is new, not emptied"
    just_made.close()
    path.write_bytes(b"")
    emptied_long_ago(path)
    emptied = RunStore(path.parent)
    assert emptied.was_empty is False, "not opened yet"
    assert emptied.list() == []
    assert emptied.was_empty is True
    emptied.close()
    assert path.stat().st_size > 0, "the schema made it anew"

    again = RunStore(path.parent)
    again.list()
    assert again.was_empty is False, "a file with its schema is not empty"
    again.close()

    fresh = RunStore(tmp_path / "new")
    fresh.list()
    assert fresh.was_empty is False, "a file that was not there is new, not emptied"
    fresh.close()


def test_an_emptied_run_store_stays_loud_after_it_was_made_anew(
    home: Path, engine_up: None, capsys: pytest.CaptureFixture[str]
):
    path = home / "workspaces" / "default" / "runs.db"
    path.parent.mkdir(parents=True)
    path.touch()
    emptied_long_ago(path)
    store = RunStore(path.parent)
    assert store.list() == [] and store.was_empty  # the first opener (the agent, a CLI) made it anew
    store.close()
    marks = list(path.parent.glob("runs.db.was-empty-*"))
    assert len(marks) == 1 and marks[0].stat().st_size == 0, "the empty file is kept aside as evidence"
    code, stdout = doctor_in_process(capsys, "--json")
    runs = checks_of(stdout)["runs:default"]
    assert code == 0 and runs["ok"] is False and runs["required"] is False
    assert "was found empty (0 bytes)" in str(runs["detail"]) and str(marks[0]) in str(runs["detail"])
    marks[0].unlink()  # read and acknowledged
    _code, stdout = doctor_in_process(capsys, "--json")
    assert checks_of(stdout)["runs:default"]["ok"] is True
