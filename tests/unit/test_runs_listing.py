"""``dockyard runs ls``: the header, newest first, filters, the limit and its "showing" line, and the
duration and time formats. Runs are written straight into a real run store (no engine, no agent)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import click
import pytest
from click.testing import CliRunner
from dockyard.cli._runs import _STATUS_HELP, _duration, _when, runs
from dockyard.runs import RunRecord, RunStatus, RunStore


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    import dockyard

    home = tmp_path / "home"
    monkeypatch.setenv("DOCKYARD_HOME", str(home))
    monkeypatch.chdir(tmp_path)  # no config.json above: the workspace is 'default'
    # Queued and Running rows here are not real runs: no agent may be started to follow them.
    monkeypatch.setattr(dockyard.Workspace, "wake_agent", lambda self: None)
    return home


def add_run(home: Path, run_id: str, *, created: float, status: RunStatus = RunStatus.COMPLETED,
            experiment: str = "exp", started: float | None = None, ended: float | None = None,
            exit_code: int | None = None, gpus: tuple[str, ...] = (), workspace: str = "default") -> None:
    store = RunStore(home / "workspaces" / workspace)
    try:
        store.insert(RunRecord(
            id=run_id, experiment=experiment, status=status, script="train.py", arguments=(), source_dir="/src",
            snapshot="s", environment={}, compute="local", launcher="process", image="", gpus=gpus,
            exit_code=exit_code, reason="", container_id="", pid=None, created=created, started=started,
            ended=ended, cancel_requested=False, metrics_offset=0, run_dir=str(store.folder_of(run_id).root)))
    finally:
        store.close()


def ls(*args: str) -> click.testing.Result:
    return CliRunner().invoke(runs, ["ls", *args])


@pytest.fixture
def four(home: Path) -> Path:
    """A completed, a failed, a running and a queued run, oldest to newest."""
    now = time.time()  # read now: the running run's elapsed time counts from it
    add_run(home, "exp_1_done", created=now - 400, started=now - 399, ended=now - 394.75, exit_code=0)
    add_run(home, "exp_2_failed", created=now - 300, status=RunStatus.FAILED, started=now - 299,
            ended=now - 299 + 192.5, exit_code=3, gpus=("GPU-a", "GPU-b"))
    add_run(home, "other_3_running", created=now - 200, status=RunStatus.RUNNING, experiment="other",
            started=now - 65)
    add_run(home, "exp_4_queued", created=now - 100, status=RunStatus.QUEUED)
    return home


def test_header_columns_aligned_newest_first(four: Path):
    out = ls()
    assert out.exit_code == 0, out.output
    lines = out.output.splitlines()
    assert lines[0].split() == ["ID", "EXPERIMENT", "STATUS", "STARTED", "DURATION", "TARGET", "GPUS", "SCRIPT"]
    assert [line.split()[0] for line in lines[1:]] == ["exp_4_queued", "other_3_running", "exp_2_failed",
                                                       "exp_1_done"]
    # Every column starts where its header does.
    for header in ("EXPERIMENT", "STATUS", "STARTED", "TARGET", "SCRIPT"):
        col = lines[0].index(header)
        assert all(line[col - 2:col] == "  " and line[col] != " " for line in lines[1:]), header
    done, failed = lines[4], lines[3]
    assert "Completed" in done and "4.2s" in done and "exit" not in done
    assert "Failed (exit 3)" in failed and "3m12s" in failed and failed[lines[0].index("GPUS"):].split()[0] == "2"
    assert "showing" not in out.output


def test_running_shows_elapsed_and_queued_shows_no_start(four: Path):
    lines = ls().output.splitlines()
    queued, running = lines[1], lines[2]
    assert "Running" in running and "1m0" in running  # 65 s so far (and counting)
    started, duration = lines[0].index("STARTED"), lines[0].index("DURATION")
    assert queued[started:duration].strip() == "-"
    assert queued[duration:lines[0].index("TARGET")].strip() == "-"


@pytest.mark.parametrize(("spelling", "expected"), [
    (["--status", "failed"], ["exp_2_failed"]),
    (["--status", "FAILED,completed"], ["exp_2_failed", "exp_1_done"]),
    (["--status", "Completed", "--status", "failed"], ["exp_2_failed", "exp_1_done"]),
    (["--status", " running , Running"], ["other_3_running"]),
])
def test_status_filter_any_case_comma_or_repeated(four: Path, spelling: list[str], expected: list[str]):
    out = ls(*spelling)
    assert out.exit_code == 0, out.output
    assert [line.split()[0] for line in out.output.splitlines()[1:]] == expected


def test_status_and_experiment_filters_combine(four: Path):
    ids = [line.split()[0] for line in ls("--status", "running,queued", "--experiment", "exp").output.splitlines()[1:]]
    assert ids == ["exp_4_queued"]
    none = ls("--status", "canceled")
    assert none.exit_code == 0 and none.output == "no runs with status Canceled\n"


def test_bad_status_is_a_usage_error_naming_the_valid_ones(four: Path):
    out = ls("--status", "done")
    assert out.exit_code == 2
    assert "'done' is not a run status" in out.output
    assert all(str(s) in out.output for s in RunStatus)


def test_help_lists_every_status():
    *most, last = [str(s) for s in RunStatus]
    assert _STATUS_HELP == f"{', '.join(most)} or {last}"
    assert "Canceled" in CliRunner().invoke(runs, ["ls", "--help"]).output


def test_limit_and_the_showing_line(home: Path):
    now = time.time()
    for i in range(25):
        add_run(home, f"exp_{i:02d}", created=now - 1000 + i, started=now - 1000 + i, ended=now - 990 + i)
    out = ls()
    lines = out.output.splitlines()
    assert len(lines) == 1 + 20 + 1
    assert lines[1].split()[0] == "exp_24" and lines[20].split()[0] == "exp_05"
    assert lines[-1] == "showing 20 of 25 runs (--limit 0 for all)"
    assert ls("--limit", "3").output.splitlines()[-1] == "showing 3 of 25 runs (--limit 0 for all)"
    for every in (["--limit", "0"], ["--all"], ["--limit", "25"]):
        lines = ls(*every).output.splitlines()
        assert len(lines) == 26 and "showing" not in lines[-1], every
    assert ls("--limit", "-1").exit_code == 2


def test_json_keeps_its_shape_and_honours_filters_and_limit(four: Path):
    out = ls("--json", "--status", "completed,failed,queued", "--limit", "2")
    assert out.exit_code == 0, out.output
    doc = json.loads(out.output)
    assert [r["id"] for r in doc["runs"]] == ["exp_4_queued", "exp_2_failed"]
    assert set(doc["runs"][0]) == {"id", "status", "experiment", "script", "exit_code", "created"}
    assert doc["runs"][1]["status"] == "Failed" and doc["runs"][1]["exit_code"] == 3
    assert doc["total"] == 3
    assert [r["id"] for r in json.loads(ls("--json", "--experiment", "other").output)["runs"]] == ["other_3_running"]


def test_no_runs_yet(home: Path):
    out = ls()
    assert out.exit_code == 0 and "no runs yet" in out.output
    assert json.loads(ls("--json").output) == {"runs": [], "total": 0}


@pytest.mark.parametrize(("seconds", "text"), [
    (0, "0.0s"), (0.04, "0.0s"), (4.26, "4.2s"), (9.99, "9.9s"), (10, "10s"), (59.9, "59s"), (60, "1m00s"),
    (192, "3m12s"), (3599, "59m59s"), (3600, "1h00m"), (3900, "1h05m"), (86399, "23h59m"), (86400, "1d00h"),
    (2 * 86400 + 3 * 3600 + 59, "2d03h"), (-3, "0.0s"),
])
def test_duration_format(seconds: float, text: str):
    assert _duration(seconds) == text


def test_start_time_is_short_local_time():
    now = time.mktime((2025, 6, 15, 12, 0, 0, 0, 0, -1))
    assert _when(now - 3600, now) == "11:00:00"
    assert _when(time.mktime((2025, 3, 4, 9, 7, 0, 0, 0, -1)), now) == "Mar 04 09:07"
    assert _when(time.mktime((2024, 3, 4, 9, 7, 0, 0, 0, -1)), now) == "2024-03-04 09:07"


def test_shell_completion_offers_run_ids_and_keeps_run_options_completable(four: Path):
    from click.shell_completion import ShellComplete
    from dockyard.cli._app import cli

    def complete(args: list[str], incomplete: str) -> list[str]:
        return [c.value for c in ShellComplete(cli, {}, "dockyard", "_DOCKYARD_COMPLETE").get_completions(args, incomplete)]

    assert complete(["runs", "show"], "exp_") == ["exp_4_queued", "exp_2_failed", "exp_1_done"]
    assert complete(["runs", "compare", "exp_1_done"], "other") == ["other_3_running"]
    assert "--detach" in complete(["run", "train.py"], "--det"), "a partial option is not a usage error here"
