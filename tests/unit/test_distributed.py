"""Distributed runs' pure parts: Azure's configurations, the in-container ranks launcher (a real
subprocess tree), the agent's merge of the ranks' output (a real folder, a crash between append
and journal), and the admission of runs to a cluster (a fake view of its resources)."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from dockyard.compute._ray import _Admission, _Merged
from dockyard.core.runconfig import MpiConfiguration, PyTorchConfiguration
from dockyard.errors import InputError
from dockyard.runs import Distribution, RunFolder, RunRuntime


def test_azure_configurations_become_a_distribution_and_bad_counts_are_clear():
    from dockyard._runtime import distribution_of

    assert distribution_of(PyTorchConfiguration(process_count=4, node_count=2)) == Distribution("pytorch", 2, 2, "Nccl")
    assert distribution_of(PyTorchConfiguration(node_count=3)).world_size == 3
    assert distribution_of(MpiConfiguration(process_count_per_node=2, node_count=2)) == Distribution("mpi", 2, 2)
    assert distribution_of(PyTorchConfiguration()) is None  # one process: a plain run
    with pytest.raises(InputError, match="not a multiple of node_count 2"):
        distribution_of(PyTorchConfiguration(process_count=3, node_count=2))
    with pytest.raises(InputError, match="node_count must be a positive integer"):
        distribution_of(MpiConfiguration(node_count=0))
    with pytest.raises(InputError, match="unknown arguments: nodes"):
        PyTorchConfiguration(nodes=2)
    with pytest.raises(InputError, match="not supported"):
        distribution_of(object())
    runtime = RunRuntime(distributed=Distribution("pytorch", 2, 2, "Gloo"))
    assert RunRuntime.from_dict(runtime.to_dict()) == runtime
    assert RunRuntime.from_dict(RunRuntime().to_dict()).distributed is None


def test_node_count_above_one_on_this_machine_is_refused_before_anything_is_stored(tmp_path):
    from dockyard import Environment, Experiment, ScriptRunConfig, Workspace

    ws = Workspace("dist", home=tmp_path / "home")
    src = tmp_path / "src"
    src.mkdir()
    (src / "t.py").write_text("print(1)\n")
    env = Environment("local")
    env.docker.enabled = False
    config = ScriptRunConfig(str(src), "t.py", environment=env,
                             distributed_job_config=PyTorchConfiguration(process_count=2, node_count=2))
    with pytest.raises(InputError, match="needs a cluster"):
        Experiment(ws, "e").submit(config)
    assert ws.store.list(limit=10) == []


RANK_SCRIPT = """\
import os, sys, time
rank = int(os.environ["RANK"])
print("hello", rank, os.environ["LOCAL_RANK"], os.environ["OMPI_COMM_WORLD_RANK"], os.environ["WORLD_SIZE"])
sys.stdout.write("no newline at the end")
sys.stdout.flush()
if rank == int(os.environ.get("FAIL", "-1")):
    sys.exit(5)
if os.environ.get("FAIL"):
    time.sleep(60)
"""


def _ranks(tmp_path: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    import os

    script = tmp_path / "r.py"
    script.write_text(RANK_SCRIPT)
    return subprocess.run([sys.executable, "-m", "dockyard._ranks", "2", "1", "--", sys.executable, str(script)],
                          capture_output=True, text=True, timeout=60, env={**os.environ, "WORLD_SIZE": "4", **env})


def test_the_ranks_launcher_prefixes_every_line_with_its_rank(tmp_path):
    done = _ranks(tmp_path, {})
    assert done.returncode == 0, done.stderr
    lines = sorted(done.stdout.splitlines())
    assert lines == ["[rank 2] hello 2 0 2 4", "[rank 2] no newline at the end",
                     "[rank 3] hello 3 1 3 4", "[rank 3] no newline at the end"], done.stdout


def test_one_failing_rank_stops_the_others_and_its_code_is_the_exit_code(tmp_path):
    started = time.monotonic()
    done = _ranks(tmp_path, {"FAIL": "3"})
    assert done.returncode == 5
    assert time.monotonic() - started < 30, "the other rank was not stopped"


def _folder(tmp_path: Path) -> RunFolder:
    folder = RunFolder(tmp_path / "run")
    folder.prepare()
    return folder


def test_merged_ranks_keep_whole_lines_and_a_crash_repeats_nothing(tmp_path):
    folder = _folder(tmp_path)
    merged = _Merged(folder, 2)
    merged.take(0, b"[rank 0] a\n[rank 0] par", b"")
    merged.take(1, b"[rank 1] b\n", b'{"m": 1}\n')
    merged.take(0, b"tial\n", b"")
    assert Path(folder.log).read_text() == "[rank 0] a\n[rank 1] b\n[rank 0] partial\n"
    assert merged.offsets(0) == (len(b"[rank 0] a\n[rank 0] partial\n"), 0)
    # A crash after an append but before its journal: the next agent cuts the append and reads again.
    with open(folder.log, "ab") as fh:
        fh.write(b"[rank 1] c\n")
    again = _Merged(folder, 2)
    assert Path(folder.log).read_text() == "[rank 0] a\n[rank 1] b\n[rank 0] partial\n"
    assert again.offsets(1) == (len(b"[rank 1] b\n"), len(b'{"m": 1}\n'))
    again.take(1, b"[rank 1] c\n[rank 1] end", b"")
    again.flush(1)
    assert Path(folder.log).read_text().splitlines()[-2:] == ["[rank 1] c", "[rank 1] end"]


class _FakeRay:
    """The two calls admission makes, over a cluster of ``gpus`` GPUs and as many CPUs."""

    def __init__(self, gpus: float) -> None:
        self.total = gpus
        self.used = 0.0

    def cluster_resources(self) -> dict[str, float]:
        return {"GPU": self.total, "CPU": self.total}

    def available_resources(self) -> dict[str, float]:
        return {"GPU": self.total - self.used, "CPU": self.total - self.used}


def test_admission_lets_runs_in_oldest_first_as_room_frees_up():
    ray = _FakeRay(2)
    admission = _Admission()
    order: list[str] = []

    def run(key: str, submitted: float) -> None:
        assert admission.admit(ray, key, submitted, 1, 1, stop=lambda: False)
        order.append(key)
        ray.used += 1
        admission.placed(key)

    threads = [threading.Thread(target=run, args=(f"r{i}", float(i))) for i in range(4)]
    for t in threads:
        t.start()
        time.sleep(0.05)
    time.sleep(0.5)
    assert sorted(order) == ["r0", "r1"], "more runs were let in than the cluster has room for"
    ray.used -= 1
    admission.released()
    time.sleep(0.5)
    assert order[2] == "r2" and len(order) == 3
    ray.used -= 1
    admission.released()
    for t in threads:
        t.join(timeout=5)
    assert order == ["r0", "r1", "r2", "r3"]


def test_admission_does_not_hold_back_a_run_the_cluster_cannot_hold_and_honours_a_cancel():
    ray = _FakeRay(2)
    admission = _Admission()
    assert admission.admit(ray, "wide", 0.0, 4, 4, stop=lambda: False), "a wide run goes to Ray's own queue"
    ray.used = 2
    assert admission.admit(ray, "late", 1.0, 1, 1, stop=lambda: True) is False
