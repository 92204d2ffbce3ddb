"""A distributed configuration on this machine (node_count 1): its processes share one container
(or this machine, as local processes), find each other at MASTER_ADDR:MASTER_PORT, and every line
of the run's log carries its rank; one failing process fails the run and stops the others."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from dockyard import Experiment, ScriptRunConfig
from dockyard.core.runconfig import MpiConfiguration, PyTorchConfiguration
from helpers.runs import local_env, python_env, source

pytestmark = pytest.mark.engine

MEET = """\
import os, socket, sys, time
rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
addr, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
print("rank", rank, "local", os.environ["LOCAL_RANK"], "mpi", os.environ["OMPI_COMM_WORLD_RANK"], flush=True)
if os.environ.get("FAIL") == str(rank):
    sys.exit(4)
if os.environ.get("FAIL"):
    time.sleep(120)
if rank == 0:
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind((addr, port))
    server.listen()
    server.settimeout(60)
    for _ in range(world - 1):
        conn, _ = server.accept()
        conn.recv(8)
        conn.close()
    print("all", world, "met", flush=True)
else:
    deadline = time.time() + 60
    while True:
        try:
            socket.create_connection((addr, port), timeout=2).sendall(b"hi")
            break
        except OSError:
            if time.time() > deadline:
                raise
            time.sleep(0.1)
"""


@pytest.mark.parametrize("container", [True, False], ids=["container", "process"])
def test_the_processes_of_one_node_meet_and_their_lines_carry_their_rank(workspace, tmp_path: Path, container: bool):
    env = python_env() if container else local_env()
    config = ScriptRunConfig(str(source(tmp_path, "meet.py", MEET)), "meet.py", environment=env,
                             distributed_job_config=PyTorchConfiguration(process_count=3))
    run = Experiment(workspace, "ddp").submit(config)
    details = run.wait_for_completion(raise_on_error=False)
    text = Path(details["logFiles"]["logs/std.log"]).read_text()
    assert details["status"] == "Completed", text[-2000:]
    for rank in range(3):
        assert f"[rank {rank}] rank {rank} local {rank} mpi {rank}" in text, text
    assert "[rank 0] all 3 met" in text


def test_one_failing_process_fails_the_run_with_its_code_and_stops_the_others(workspace, tmp_path: Path):
    env = python_env()
    env.environment_variables = {"FAIL": "1"}
    config = ScriptRunConfig(str(source(tmp_path, "meet.py", MEET)), "meet.py", environment=env,
                             distributed_job_config=MpiConfiguration(process_count_per_node=2))
    started = time.monotonic()
    run = Experiment(workspace, "ddp").submit(config)
    details = run.wait_for_completion(raise_on_error=False)
    assert details["status"] == "Failed" and workspace.store.get(run.id).exit_code == 4
    assert time.monotonic() - started < 90, "the other process was not stopped (it sleeps 120 s)"
