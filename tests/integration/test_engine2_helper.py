"""The second-engine helper works and leaves the machine's engine alone.

A private dockerd (``helpers.engine2.SecondEngine``) gets the busybox base image copied from the
first engine, runs containers on its own bridge, survives live-restore restarts and a SIGKILL,
and afterwards the first engine still answers and still networks containers on its ``docker0``.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Any

import pytest
from dockyard.dockerd import EngineClient
from dockyard.errors import EngineUnavailable
from helpers.engine2 import SecondEngine, second_engine_fixture

pytestmark = pytest.mark.engine

second_engine = second_engine_fixture(scope="module")

DOCKER0 = Path("/sys/class/net/docker0/ifindex")


@pytest.fixture(scope="module")
def base_ref() -> str:
    from dockyard.build._base_images import bootstrap

    return bootstrap("busybox").ref  # dockyard/base:<codename>-busybox; made only when missing


def _docker0_index() -> str:
    assert DOCKER0.exists(), "the first engine's docker0 bridge is missing"
    return DOCKER0.read_text().strip()


def _state(eng: SecondEngine, cid: str) -> dict[str, Any]:
    data = eng.inspect_container(cid)
    assert data is not None, f"{cid[:12]} vanished\n{eng.log_tail()}"
    keys = ("Status", "Running", "Pid", "ExitCode", "StartedAt", "FinishedAt", "Error")
    return {k: data["State"][k] for k in keys}


def _first_engine_ids(first: EngineClient) -> set[str]:
    reply = first.request("GET", "/containers/json?all=1")
    assert reply.status == 200, reply.body
    return {c["Id"] for c in reply.json()}


def test_default_network_containers_run_on_the_helpers_bridge(second_engine: SecondEngine, base_ref: str):
    docker0 = _docker0_index()
    second_engine.load_image(base_ref)
    cid = second_engine.run_container(base_ref, ["sleep", "30"])  # no NetworkMode: the default
    try:
        data = second_engine.inspect_container(cid)
        assert data is not None and data["State"]["Running"], second_engine.log_tail()
        assert data["HostConfig"]["NetworkMode"] == "default"
        address = data["NetworkSettings"]["Networks"]["bridge"]["IPAddress"]
        assert second_engine.subnet is not None
        assert ipaddress.ip_address(address) in second_engine.subnet, data["NetworkSettings"]
        assert [c["Id"] for c in second_engine.running_containers()] == [cid]
        assert cid not in _first_engine_ids(second_engine.first)
        isolated = second_engine.run_container(base_ref, ["true"], host_config={"NetworkMode": "none"})
        assert second_engine.inspect_container(isolated) is not None
    finally:
        second_engine.remove_all_containers()
    assert _docker0_index() == docker0, "starting the second engine replaced the host's docker0"


def test_restarts_kill_and_the_first_engine_afterwards(base_ref: str, engine_resources):
    docker0 = _docker0_index()
    first = EngineClient.from_env()
    eng = SecondEngine(first=first)
    try:
        eng.start(live_restore=True)
        eng.load_image(base_ref)
        cid = eng.run_container(base_ref, ["sleep", "30"])
        before = _state(eng, cid)
        assert before["Running"], eng.log_tail()
        assert cid not in _first_engine_ids(first), "the first engine lists the second engine's container"

        eng.restart(live_restore=True)
        after_restart = _state(eng, cid)
        assert after_restart["Running"] and after_restart["Pid"] == before["Pid"], (after_restart, eng.log_tail())
        assert [c["Id"] for c in eng.running_containers()] == [cid]

        eng.kill()  # an outage: the socket is dead, the container lives on
        with pytest.raises(EngineUnavailable):
            eng.client.ping(timeout=1.0)
        first.ping()
        eng.start(live_restore=True)
        after_kill = _state(eng, cid)
        assert after_kill["Running"] and after_kill["Pid"] == before["Pid"], (after_kill, eng.log_tail())

        # The old dockerd (live-restore) leaves the container running; the new one (without)
        # shuts it down while restoring it: SIGTERM, which `sleep` as PID 1 ignores, then SIGKILL.
        eng.restart(live_restore=False)
        after_plain = _state(eng, cid)
        print(f"\nafter restart(live_restore=False): {after_plain}\ntimings: {eng.timings}")
        assert after_plain["Status"] == "exited" and not after_plain["Running"], after_plain
        assert after_plain["ExitCode"] == 137 and after_plain["Error"] == "", after_plain
        assert not after_plain["FinishedAt"].startswith("0001-"), after_plain
        assert eng.running_containers() == []
    finally:
        folder, bridge = eng.folder, eng.bridge
        eng.close()
    assert folder is not None and not folder.exists()
    assert not Path(f"/sys/class/net/{bridge}").exists()
    assert not any(str(folder) in line for line in Path("/proc/mounts").read_text().splitlines())

    # The first engine still answers, and still networks containers on the same docker0.
    first.ping()
    assert _docker0_index() == docker0, "the host's docker0 was replaced"
    code, output = engine_resources.run(
        base_ref, ["sh", "-c", "ip -o -4 addr show eth0 && ping -c1 -W3 $(ip route | awk '/default/ {print $3}')"]
    )
    assert code == 0, output
