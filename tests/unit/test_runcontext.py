"""The in-run API (``dockyard._runcontext``): the metrics-file channel, offline runs, the host's reader.

The in-run import path must stay Python 3.8 syntax, 3.8 library and standard-library only, because
dockyard mounts its package into images it did not build; the first tests pin that.
"""

from __future__ import annotations

import ast
import glob
import io
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import dockyard
import pytest
from dockyard import _runcontext as rc
from dockyard._runcontext import OfflineRun, SubmittedRun, fold_records, read_metric_lines, read_metrics, read_tags

ENGINE_DIR = Path(dockyard.__file__).resolve().parent
# Everything `from dockyard import Run` / `from dockyard.core import Run` loads inside a container.
IN_RUN_MODULES = ["__init__.py", "_lazy.py", "_runcontext.py", "_run.py", "core/__init__.py", "core/run.py"]


# --- Python 3.8, standard library only ----------------------------------------------------------


@pytest.mark.parametrize("module", IN_RUN_MODULES)
def test_in_run_modules_parse_as_python_38(module: str) -> None:
    source = (ENGINE_DIR / module).read_text()
    ast.parse(source, filename=module, feature_version=(3, 8))


# Library calls newer than 3.8 that feature_version cannot see (it checks grammar only).
_NEWER_ATTRIBUTES = {
    "removeprefix", "removesuffix",  # str/bytes 3.9
    "is_relative_to", "with_stem", "readlink",  # pathlib 3.9/3.9/3.9
    "bit_count",  # int 3.10
    "topological",  # graphlib 3.9
    "pairwise",  # itertools 3.10
}
_NEWER_MODULES = {"zoneinfo", "graphlib", "tomllib"}


@pytest.mark.parametrize("module", IN_RUN_MODULES)
def test_in_run_modules_use_no_library_newer_than_38(module: str) -> None:
    tree = ast.parse((ENGINE_DIR / module).read_text())
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr in _NEWER_ATTRIBUTES:
            found.append(f"line {node.lineno}: .{node.attr}")
        if isinstance(node, ast.Attribute) and node.attr == "cache" and getattr(node.value, "id", "") == "functools":
            found.append(f"line {node.lineno}: functools.cache")
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            found += [f"line {node.lineno}: import {n}" for n in names if n.split(".")[0] in _NEWER_MODULES]
    assert found == []


def _in_run_pythonpath(tmp_path: Path) -> Path:
    """A directory laid out like the container's /opt/dockyard/lib: ``dockyard`` -> engine/."""
    lib = tmp_path / "lib"
    lib.mkdir()
    (lib / "dockyard").symlink_to(ENGINE_DIR, target_is_directory=True)
    return lib


_IMPORT_PROBE = """
import json, sys
before = set(sys.modules)
from dockyard._runcontext import get_context
run = get_context()
run.log("a", 1.0); run.log_list("b", [1, 2]); run.log_row("c", x=1); run.log_table("d", {"x": [1]})
run.tag("k", "v"); run.upload_file("f.txt", __file__)
print(json.dumps({"new": sorted(set(sys.modules) - before), "kind": type(run).__name__}))
"""


def test_importing_and_using_the_in_run_path_pulls_only_the_standard_library(tmp_path: Path) -> None:
    lib = _in_run_pythonpath(tmp_path)
    script = tmp_path / "probe.py"
    script.write_text(_IMPORT_PROBE)
    env = {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(lib), "DOCKYARD_RUN_ID": "r1",
           "DOCKYARD_METRICS_FILE": str(tmp_path / "m.jsonl")}
    # -S: no site-packages at all, as in a bare image; importing anything else would fail outright.
    out = subprocess.run([sys.executable, "-S", str(script)], env=env, cwd=tmp_path, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    probe = json.loads(out.stdout)
    assert probe["kind"] == "SubmittedRun"
    foreign = [m for m in probe["new"]
               if m.split(".")[0] not in sys.stdlib_module_names and m not in ("dockyard", "dockyard._lazy", "dockyard._runcontext")]
    assert foreign == []
    assert read_metrics(tmp_path / "m.jsonl") == {"a": [1.0], "b": [1, 2], "c": [{"x": 1}], "d": [{"x": [1]}]}


def _python38() -> str | None:
    candidates = [os.environ.get("DOCKYARD_TEST_PYTHON38", "")]
    candidates += sorted(glob.glob(os.path.expanduser("~/.pyenv/versions/3.8*/bin/python3.8")))
    candidates += ["/usr/bin/python3.8", "/usr/local/bin/python3.8"]
    for cand in candidates:
        if cand and os.access(cand, os.X_OK):
            try:
                out = subprocess.run([cand, "-c", "import sys; print(sys.version_info[:2])"],
                                     capture_output=True, text=True, timeout=30)
            except OSError:
                continue
            if out.stdout.strip() == "(3, 8)":
                return cand
    return None


_PY38_SCRIPT = """
import math, sys
from dockyard._runcontext import get_context
assert sys.version_info[:2] == (3, 8), sys.version
run = get_context(allow_offline=False)
run.log("acc", 0.5, step=1); run.log("acc", float("nan")); run.log("flag", True)
run.log_list("l", (1, 2.5, "x")); run.log_row("roc", fpr=0.1, tpr=0.9); run.log_table("t", {"a": [1, 2]})
run.set_tags({"k": 1}); run.tag("solo")
assert run.get_metrics()["acc"] == [0.5, "NaN"] and run.get_tags() == {"k": "1", "solo": ""}
assert run.id == "r38" and run.experiment.name == "exp"
import dockyard
assert dockyard.__version__
"""


def test_a_real_python_38_runs_the_in_run_path(tmp_path: Path) -> None:
    py38 = _python38()
    if py38 is None:
        pytest.skip("no Python 3.8 here (set DOCKYARD_TEST_PYTHON38=/path/to/python3.8)")
    lib = _in_run_pythonpath(tmp_path)
    metrics = tmp_path / "m.jsonl"
    env = {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(lib), "DOCKYARD_RUN_ID": "r38",
           "DOCKYARD_METRICS_FILE": str(metrics), "DOCKYARD_EXPERIMENT": "exp"}
    out = subprocess.run([py38, "-S", "-c", _PY38_SCRIPT], env=env, cwd=tmp_path, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert read_metrics(metrics) == {"acc": [0.5, "NaN"], "flag": [True], "l": [1, 2.5, "x"],
                                     "roc": [{"fpr": 0.1, "tpr": 0.9}], "t": [{"a": [1, 2]}]}
    assert read_tags(metrics) == {"k": "1", "solo": ""}


def test_public_surface_is_pinned() -> None:
    assert sorted(rc.__all__) == [
        "ENV_EXPERIMENT", "ENV_INPUT_DATASETS", "ENV_METRICS_FILE", "ENV_RUN_ID", "KINDS", "MAX_NAME_LENGTH", "OfflineRun",
        "RunContext", "SubmittedRun", "fold_records", "get_context", "read_metric_lines", "read_metrics",
        "read_tags",
    ]
    for name in rc.__all__:
        assert hasattr(rc, name)


# --- the line format --------------------------------------------------------------------------


@pytest.fixture
def run(tmp_path: Path) -> SubmittedRun:
    return SubmittedRun("run-1", str(tmp_path / "metrics.jsonl"), "exp")


def _lines(run: SubmittedRun) -> list[dict]:
    def no_constants(token: str) -> object:
        raise AssertionError(f"non-standard JSON constant {token} in the metrics file")

    raw = Path(run.metrics_file).read_bytes()
    assert raw.endswith(b"\n")
    return [json.loads(line, parse_constant=no_constants) for line in raw.splitlines()]


def test_each_call_appends_one_json_line_of_the_documented_shape(run: SubmittedRun) -> None:
    run.log("accuracy", 0.9)
    run.log("loss", 2, step=7)
    run.log_list("lr", [0.1, 0.01])
    run.log_row("roc", fpr=0.0, tpr=1.0)
    run.log_table("curve", {"x": [1, 2], "y": [3.5, 4.5]})
    run.tag("team", "vision")
    lines = _lines(run)
    assert [(r["kind"], r["name"], r["value"]) for r in lines] == [
        ("log", "accuracy", 0.9), ("log", "loss", 2), ("log_list", "lr", [0.1, 0.01]),
        ("log_row", "roc", {"fpr": 0.0, "tpr": 1.0}), ("log_table", "curve", {"x": [1, 2], "y": [3.5, 4.5]}),
        ("tag", "team", "vision"),
    ]
    assert all(set(r) == {"t", "kind", "name", "value"} for i, r in enumerate(lines) if i != 1)
    assert lines[1]["step"] == 7 and set(lines[1]) == {"t", "kind", "name", "value", "step"}
    times = [r["t"] for r in lines]
    assert all(isinstance(t, float) for t in times) and times == sorted(times)
    assert {r["kind"] for r in lines} == set(rc.KINDS)


def test_the_line_is_in_the_file_as_soon_as_the_call_returns(run: SubmittedRun) -> None:
    run.log("a", 1)
    assert read_metrics(run.metrics_file) == {"a": [1]}  # no flush, no close
    run.log("a", 2)
    assert read_metrics(run.metrics_file) == {"a": [1, 2]}


def test_set_tags_writes_one_line_per_tag_in_one_write(run: SubmittedRun, monkeypatch: pytest.MonkeyPatch) -> None:
    writes: list[bytes] = []
    real_write = os.write
    monkeypatch.setattr(rc.os, "write", lambda fd, data: writes.append(data) or real_write(fd, data))
    run.set_tags({"a": 1, "b": None, "c": True})
    run.set_tags(["d", "e"])
    run.set_tags({})
    assert len(writes) == 2
    assert read_tags(run.metrics_file) == {"a": "1", "b": "", "c": "True", "d": "", "e": ""}
    assert run.get_tags() == {"a": "1", "b": "", "c": "True", "d": "", "e": ""}


def test_get_metrics_is_what_this_process_logged(run: SubmittedRun) -> None:
    run.log("acc", 0.5)
    run.log("acc", 0.6)
    run.log_list("acc", [0.7, 0.8])
    run.log_row("roc", fpr=0.1)
    run.log_table("tbl", {"a": [1]})
    expected = {"acc": [0.5, 0.6, 0.7, 0.8], "roc": [{"fpr": 0.1}], "tbl": [{"a": [1]}]}
    assert run.get_metrics() == expected == read_metrics(run.metrics_file)
    assert run.get_metrics("acc") == {"acc": [0.5, 0.6, 0.7, 0.8]}
    assert run.get_metrics("missing") == {}
    run.get_metrics()["tbl"][0]["a"].append(99)  # a copy: the caller cannot change the run's view
    assert run.get_metrics()["tbl"] == [{"a": [1]}]


def test_non_finite_floats_are_strings_that_float_reads_back(run: SubmittedRun) -> None:
    run.log("loss", float("nan"))
    run.log("loss", float("inf"))
    run.log_list("loss", [float("-inf"), 1.5])
    values = read_metrics(run.metrics_file)["loss"]
    assert values == ["NaN", "Infinity", "-Infinity", 1.5]
    floats = [float(v) for v in values]
    assert floats[0] != floats[0] and floats[1:] == [float("inf"), float("-inf"), 1.5]
    _lines(run)  # strict JSON: no bare NaN/Infinity tokens


def test_ints_bools_and_strs_keep_their_json_types(run: SubmittedRun) -> None:
    import enum

    class Level(enum.IntEnum):
        HIGH = 3

    run.log("n", 10**30)
    run.log("b", False)
    run.log("s", "línea\nnueva \udc80")  # newlines and lone surrogates cannot break a line
    run.log("e", Level.HIGH)
    assert read_metrics(run.metrics_file) == {"n": [10**30], "b": [False], "s": ["línea\nnueva \udc80"], "e": [3]}
    assert len(Path(run.metrics_file).read_bytes().splitlines()) == 4


# --- numpy-style scalars ------------------------------------------------------------------------


class _Scalar:
    """Quacks like a numpy/torch scalar: only ``.item()``."""

    def __init__(self, value: object) -> None:
        self.value = value

    def item(self) -> object:
        return self.value


class _Vector:
    def item(self) -> object:
        raise ValueError("can only convert an array of size 1 to a Python scalar")


def test_item_objects_are_converted_without_numpy(run: SubmittedRun) -> None:
    run.log("acc", _Scalar(0.75), step=_Scalar(3))
    run.log("nan", _Scalar(float("nan")))
    run.log_list("xs", [_Scalar(1), _Scalar(True)])
    run.log_row("row", a=_Scalar("s"))
    assert read_metrics(run.metrics_file) == {"acc": [0.75], "nan": ["NaN"], "xs": [1, True], "row": [{"a": "s"}]}
    assert _lines(run)[0]["step"] == 3


def test_item_objects_that_do_not_give_a_scalar_are_type_errors(run: SubmittedRun) -> None:
    with pytest.raises(TypeError, match=r"_Vector\.item\(\) failed.*log_list"):
        run.log("v", _Vector())
    with pytest.raises(TypeError, match=r"_Scalar\.item\(\) gave list"):
        run.log("v", _Scalar([1, 2]))
    with pytest.raises(TypeError, match="gave _Scalar"):
        run.log("v", _Scalar(_Scalar(1)))  # one level only, never a loop
    assert not Path(run.metrics_file).read_bytes()


def test_real_numpy_scalars_and_arrays(run: SubmittedRun) -> None:
    np = pytest.importorskip("numpy")
    run.log("f32", np.float32(0.5))
    run.log("i64", np.int64(7), step=np.int32(2))
    run.log("b", np.bool_(True))
    run.log("zero_d", np.array(2.5))
    run.log("nan", np.float64("nan"))
    run.log_list("arr", np.arange(3))
    run.log_table("tbl", {"x": np.array([1.5, 2.5])})
    assert read_metrics(run.metrics_file) == {
        "f32": [0.5], "i64": [7], "b": [True], "zero_d": [2.5], "nan": ["NaN"], "arr": [0, 1, 2],
        "tbl": [{"x": [1.5, 2.5]}],
    }
    with pytest.raises(TypeError, match="log_list"):
        run.log("vec", np.array([1, 2]))
    with pytest.raises(TypeError):
        run.log_list("matrix", np.zeros((2, 2)))


# --- bad names and values -----------------------------------------------------------------------


@pytest.mark.parametrize("name", ["", "   ", "x" * 256, None, 3, b"acc"])
def test_bad_names_are_value_errors_and_write_nothing(run: SubmittedRun, name: object) -> None:
    for call in (lambda: run.log(name, 1), lambda: run.log_list(name, [1]),  # type: ignore[arg-type]
                 lambda: run.log_row(name, a=1), lambda: run.log_table(name, {"a": [1]}),  # type: ignore[arg-type]
                 lambda: run.tag(name, "v"), lambda: run.set_tags({name: "v"})):  # type: ignore[dict-item]
        with pytest.raises(ValueError, match=r"name|key"):
            call()
    assert not Path(run.metrics_file).read_bytes()


def test_name_limits_are_clear(run: SubmittedRun) -> None:
    run.log("x" * 255, 1)
    with pytest.raises(ValueError, match="256 characters long; the limit is 255"):
        run.log("x" * 256, 1)
    with pytest.raises(ValueError, match="must be a str, not int"):
        run.log(3, 1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="empty or blank"):
        run.log(" ", 1)
    with pytest.raises(ValueError, match="column name of 'tbl'"):
        run.log_table("tbl", {"": [1]})
    with pytest.raises(ValueError, match="column name of 'tbl'"):
        run.log_table("tbl", {1: [1]})  # type: ignore[dict-item]


@pytest.mark.parametrize("value", [None, b"x", [1], (1,), {"a": 1}, object(), 1j])
def test_log_rejects_non_scalars_with_a_type_error(run: SubmittedRun, value: object) -> None:
    with pytest.raises(TypeError, match="must be a number, str or bool"):
        run.log("m", value)
    assert not Path(run.metrics_file).read_bytes()


def test_list_row_table_and_step_type_errors(run: SubmittedRun) -> None:
    with pytest.raises(TypeError, match="use log_list"):
        run.log("m", [1, 2])
    for bad in ("abc", 5, {"a": 1}, None):
        with pytest.raises(TypeError, match="list"):
            run.log_list("m", bad)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="metric 'm', item 1 must be"):
        run.log_list("m", [1, None])
    with pytest.raises(TypeError, match="table 'roc', column 'fpr' must be"):
        run.log_row("roc", fpr=[0.1])
    with pytest.raises(TypeError, match="dict of column"):
        run.log_table("t", [[1, 2]])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="table 't', column 'a', item 0 must be"):
        run.log_table("t", {"a": [None]})
    for step in (1.5, "3", True):
        with pytest.raises(TypeError, match="step"):
            run.log("m", 1, step=step)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="tag 'k'"):
        run.tag("k", [1])
    assert not Path(run.metrics_file).read_bytes()


# --- the offline run ----------------------------------------------------------------------------


def test_offline_run_prints_and_remembers(capsys: pytest.CaptureFixture[str]) -> None:
    run = OfflineRun()
    assert re.fullmatch(r"OfflineRun_[0-9a-f-]{36}", run.id)
    assert run.experiment == "offline" and run.experiment.name == "offline"
    run.log("accuracy", 0.9)
    run.log("loss", float("nan"), step=1)
    run.log("flag", True)
    run.log("note", "text")
    run.log_list("lr", [0.1, 0.01])
    run.log_row("roc", fpr=0.1, tpr=0.9)
    run.log_table("tbl", {"a": [1, 2]})
    run.tag("team", "vision")
    assert capsys.readouterr().out.splitlines() == [
        "accuracy: 0.9", "loss: NaN", "flag: True", "note: text", "lr: [0.1, 0.01]",
        'roc: {"fpr": 0.1, "tpr": 0.9}', 'tbl: {"a": [1, 2]}',
    ]
    assert run.get_metrics() == {"accuracy": [0.9], "loss": ["NaN"], "flag": [True], "note": ["text"],
                                 "lr": [0.1, 0.01], "roc": [{"fpr": 0.1, "tpr": 0.9}], "tbl": [{"a": [1, 2]}]}
    assert run.get_tags() == {"team": "vision"}
    assert OfflineRun().id != run.id
    with pytest.raises(ValueError):
        run.log("", 1)


def test_status_calls_are_no_ops_and_the_run_is_a_context_manager(run: SubmittedRun) -> None:
    with run as same:
        assert same is run
        run.complete()
        run.fail(error_details="boom")
        run.flush()
    assert not Path(run.metrics_file).read_bytes()
    assert "run-1" in repr(run) and run.experiment.name == "exp" and run.id == "run-1"


# --- get_context ---------------------------------------------------------------------------------


@pytest.fixture
def fresh_context(monkeypatch: pytest.MonkeyPatch):
    for var in (rc.ENV_RUN_ID, rc.ENV_METRICS_FILE, rc.ENV_EXPERIMENT):
        monkeypatch.delenv(var, raising=False)
    rc._reset_context()
    yield monkeypatch
    rc._reset_context()


def test_get_context_offline_is_cached_and_allow_offline_false_refuses(fresh_context) -> None:
    first = rc.get_context()
    assert isinstance(first, OfflineRun) and rc.get_context() is first
    with pytest.raises(RuntimeError, match=r"not running under dockyard.*DOCKYARD_RUN_ID"):
        rc.get_context(allow_offline=False)


def test_get_context_under_dockyard(fresh_context, tmp_path: Path) -> None:
    fresh_context.setenv("DOCKYARD_RUN_ID", "r7")
    fresh_context.setenv("DOCKYARD_METRICS_FILE", str(tmp_path / "m.jsonl"))
    fresh_context.setenv("DOCKYARD_EXPERIMENT", "digits")
    run = rc.get_context(allow_offline=False, used_for_context_manager=True, extra="ignored")
    assert isinstance(run, SubmittedRun) and (run.id, run.experiment.name) == ("r7", "digits")
    assert rc.get_context() is run
    run.log("a", 1)
    assert read_metrics(tmp_path / "m.jsonl") == {"a": [1]}


def test_get_context_run_id_without_metrics_file_says_so(fresh_context) -> None:
    fresh_context.setenv("DOCKYARD_RUN_ID", "r7")
    with pytest.raises(RuntimeError, match="DOCKYARD_METRICS_FILE is not"):
        rc.get_context()


def test_get_context_unopenable_metrics_file_is_an_os_error(fresh_context, tmp_path: Path) -> None:
    fresh_context.setenv("DOCKYARD_RUN_ID", "r7")
    fresh_context.setenv("DOCKYARD_METRICS_FILE", str(tmp_path / "no" / "such" / "dir" / "m.jsonl"))
    with pytest.raises(OSError):
        rc.get_context()


_FORK_SCRIPT = """
import json, os, sys
from dockyard._runcontext import get_context
parent = get_context(); parent.log("p", 1)
pid = os.fork()
if pid == 0:
    child = get_context(); child.log("c", 2)
    ok = child is not parent and child.get_metrics() == {"c": [2]} and child.id == parent.id
    os._exit(0 if ok else 1)
_, status = os.waitpid(pid, 0)
print(json.dumps({"child_ok": os.WEXITSTATUS(status) == 0, "parent": parent.get_metrics()}))
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_forked_child_gets_its_own_context_and_the_same_file(tmp_path: Path) -> None:
    metrics = tmp_path / "m.jsonl"
    env = {**os.environ, "DOCKYARD_RUN_ID": "rf", "DOCKYARD_METRICS_FILE": str(metrics)}
    out = subprocess.run([sys.executable, "-c", _FORK_SCRIPT], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == {"child_ok": True, "parent": {"p": [1]}}
    assert read_metrics(metrics) == {"p": [1], "c": [2]}


# --- several writers ----------------------------------------------------------------------------

_WRITER = """
import sys, threading
from dockyard._runcontext import get_context
proc, n = sys.argv[1], int(sys.argv[2])
run = get_context(allow_offline=False)
pad = "x" * 9000  # lines of ~9 KB: more than PIPE_BUF (4096), so atomicity is O_APPEND's, not a pipe's
def work(thread):
    for i in range(n):
        if i % 3 == 0:
            run.log_row("rows", proc=proc, thread=thread, i=i, pad=pad)
        else:
            run.log("seq-%s-%d" % (proc, thread), i)
threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
[t.start() for t in threads]; [t.join() for t in threads]
"""


def test_concurrent_processes_and_threads_never_interleave_lines(tmp_path: Path) -> None:
    metrics = tmp_path / "metrics.jsonl"
    env = {**os.environ, "DOCKYARD_RUN_ID": "rc", "DOCKYARD_METRICS_FILE": str(metrics)}
    procs, n = 6, 300
    children = [subprocess.Popen([sys.executable, "-c", _WRITER, f"p{p}", str(n)], env=env,
                                 stderr=subprocess.PIPE) for p in range(procs)]
    for child in children:
        _, err = child.communicate(timeout=120)
        assert child.returncode == 0, err.decode()
    raw = metrics.read_bytes().split(b"\n")
    assert raw[-1] == b""
    lines = [json.loads(line) for line in raw[:-1]]  # every line intact, or this raises
    assert len(lines) == procs * 4 * n
    records, offset = read_metric_lines(metrics)
    assert len(records) == len(lines) and offset == metrics.stat().st_size
    got = read_metrics(metrics)
    for p in range(procs):
        for t in range(4):
            assert got[f"seq-p{p}-{t}"] == [i for i in range(n) if i % 3]  # each writer's order kept
    rows = got["rows"]
    assert len(rows) == procs * 4 * len(range(0, n, 3)) and all(len(r["pad"]) == 9000 for r in rows)


# --- the host's reader --------------------------------------------------------------------------


def test_a_torn_last_line_is_ignored_and_read_when_complete(tmp_path: Path) -> None:
    path = tmp_path / "m.jsonl"
    whole = b'{"t":1.0,"kind":"log","name":"a","value":1}\n'
    torn = b'{"t":2.0,"kind":"log","name":"a","value":2}\n'
    path.write_bytes(whole + torn[:20])
    assert read_metrics(path) == {"a": [1]}
    records, offset = read_metric_lines(path)
    assert [r["value"] for r in records] == [1] and offset == len(whole)
    assert read_metric_lines(path, offset) == ([], offset)  # nothing new, offset unchanged
    with path.open("ab") as f:
        f.write(torn[20:])
    records, offset2 = read_metric_lines(path, offset)
    assert [r["value"] for r in records] == [2] and offset2 == len(whole) + len(torn)


def test_garbage_lines_are_skipped(tmp_path: Path) -> None:
    path = tmp_path / "m.jsonl"
    path.write_bytes(
        b'{"t":1.0,"kind":"log","name":"a","value":1}\n'
        b'{"t":2.0,"kind":"lo{"t":3.0,"kind":"log","name":"a","value":3}\n'  # a killed writer's fragment
        b"\n[1, 2]\n\xff\xfe\n"
        b'{"t":4.0,"kind":"log","name":"a"}\n'  # no value
        b'{"t":5.0,"kind":"future_kind","name":"a","value":9,"extra":true}\n'
        b'{"t":6.0,"kind":"log","name":"a","value":6,"extra":true}\n'
    )
    records, _ = read_metric_lines(path)
    assert [r["t"] for r in records] == [1.0, 5.0, 6.0]
    assert read_metrics(path) == {"a": [1, 6]}  # unknown kinds and extra fields are ignored


def test_incremental_reads_cover_the_file_exactly_once(run: SubmittedRun) -> None:
    offset, seen = 0, []
    for i in range(5):
        run.log("m", i)
        run.log_list("m", [i, i])
        records, offset = read_metric_lines(run.metrics_file, offset)
        seen += records
    assert fold_records(seen)[0] == read_metrics(run.metrics_file) == run.get_metrics()
    assert read_metric_lines(run.metrics_file, offset) == ([], offset)


def test_missing_file_and_bad_offsets(tmp_path: Path) -> None:
    missing = tmp_path / "none.jsonl"
    assert read_metric_lines(missing, 0) == ([], 0)
    assert read_metrics(missing) == {} and read_tags(missing) == {}
    path = tmp_path / "m.jsonl"
    path.write_bytes(b'{"t":1.0,"kind":"log","name":"a","value":1}\n')
    with pytest.raises(ValueError, match="truncated"):
        read_metric_lines(path, 1000)
    with pytest.raises(ValueError, match=">= 0"):
        read_metric_lines(path, -1)


def test_fold_records_updates_given_dicts_and_last_tag_wins() -> None:
    metrics: dict = {"a": [0]}
    tags: dict = {"k": "old"}
    out = fold_records([{"kind": "log", "name": "a", "value": 1}, {"kind": "tag", "name": "k", "value": "new"},
                        {"kind": "log_list", "name": "b", "value": [1, 2]}], metrics, tags)
    assert out == ({"a": [0, 1], "b": [1, 2]}, {"k": "new"}) and out[0] is metrics and out[1] is tags


# --- files ------------------------------------------------------------------------------------


def test_upload_file_copies_into_outputs(run: SubmittedRun, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    src = tmp_path / "model.pkl"
    src.write_bytes(b"weights")
    assert run.upload_file("model.pkl", str(src)) == str(work / "outputs" / "model.pkl")
    assert run.upload_file("outputs/sub/model.pkl", src) == str(work / "outputs" / "sub" / "model.pkl")
    assert run.upload_file("stream.bin", io.BytesIO(b"streamed")) == str(work / "outputs" / "stream.bin")
    assert (work / "outputs" / "model.pkl").read_bytes() == b"weights"
    assert (work / "outputs" / "sub" / "model.pkl").read_bytes() == b"weights"
    assert (work / "outputs" / "stream.bin").read_bytes() == b"streamed"
    # Azure scripts often save into outputs/ and then upload the same file: a no-op, not an error.
    assert run.upload_file("outputs/model.pkl", "outputs/model.pkl") == str(work / "outputs" / "model.pkl")
    assert run.upload_files(["a.pkl", "b.pkl"], [src, src]) == [str(work / "outputs" / n) for n in ("a.pkl", "b.pkl")]
    with pytest.raises(ValueError, match="2 names but 1 paths"):
        run.upload_files(["a", "b"], [src])
    for bad in ("", "/etc/passwd", "../escape", "outputs/../../x", "outputs", "outputs/"):
        with pytest.raises(ValueError, match="upload name"):
            run.upload_file(bad, src)
    tree = tmp_path / "tree"
    (tree / "d").mkdir(parents=True)
    (tree / "d" / "f.txt").write_text("f")
    assert run.upload_folder("logs", tree) == str(work / "outputs" / "logs")
    assert (work / "outputs" / "logs" / "d" / "f.txt").read_text() == "f"
    run.upload_folder("logs", tree)  # again: merged, not an error
    assert not Path(run.metrics_file).read_bytes()  # uploads are not metrics


def test_module_docstring_documents_the_decisions() -> None:
    doc = textwrap.dedent(rc.__doc__ or "")
    for needle in ('"NaN"', '"Infinity"', "O_APPEND", "os.write", "255", ".item()", '"step"'):
        assert needle in doc, needle
