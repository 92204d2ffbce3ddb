"""Attaching a Ray cluster: the configuration's checks, what is stored, and a check's verdicts (pure logic)."""

from __future__ import annotations

import pytest
from dockyard.compute import ClusterReport
from dockyard.core.compute import RayCompute
from dockyard.errors import ComputeTargetException
from dockyard.runs import RunStore


@pytest.mark.parametrize("address", ["", "10.0.0.5", "10.0.0.5:http", "10.0.0.5:0", "user@10.0.0.5:6379",
                                     "ray://10.0.0.5", "10.0.0.5:6379/x"])
def test_a_bad_address_is_one_clear_error(address: str) -> None:
    with pytest.raises(ComputeTargetException, match="is not host:port or ray://host:port"):
        RayCompute.attach_configuration(address)


def test_the_token_is_referenced_never_held(tmp_path) -> None:
    token = tmp_path / "token"
    token.write_text("s3cret-token")
    config = RayCompute.attach_configuration("10.0.0.5:6379", max_nodes=3, auth_token_file=str(token))
    assert config.settings == {"address": "10.0.0.5:6379", "auth_token_file": str(token.resolve())}
    assert config.max_nodes == 3 and config.kind == "ray"
    by_env = RayCompute.attach_configuration("ray://head:10001", auth_token_env="RAY_TOKEN")
    assert by_env.settings == {"address": "ray://head:10001", "auth_token_env": "RAY_TOKEN"}
    assert "s3cret-token" not in repr(config.settings)


@pytest.mark.parametrize(("kwargs", "says"), [
    ({"auth_token_file": "/nonexistent/token"}, "does not exist"),
    ({"auth_token_env": "RAY TOKEN"}, "NAME of a variable"),
    ({"auth_token_file": "/x", "auth_token_env": "T"}, "not both"),
    ({"max_nodes": 0}, "max_nodes must be an integer >= 1"),
])
def test_bad_token_references_and_counts(kwargs: dict, says: str) -> None:
    with pytest.raises(ComputeTargetException, match=says):
        RayCompute.attach_configuration("10.0.0.5:6379", **kwargs)


def test_a_targets_settings_are_stored_with_it(tmp_path) -> None:
    store = RunStore(tmp_path)
    store.put_compute("cluster", 4, kind="ray", settings={"address": "10.0.0.5:6379", "auth_token_env": "T"})
    found = store.compute("cluster")
    assert found is not None and found.kind == "ray" and found.max_nodes == 4
    assert found.settings == {"address": "10.0.0.5:6379", "auth_token_env": "T"}
    store.put_compute("box", 2)
    assert store.compute("box").settings == {}


def test_a_node_of_other_code_or_without_an_engine_is_named() -> None:
    report = ClusterReport("10.0.0.5:6379", {"code": "a" * 40, "nodes": [
        {"host": "n1", "node_id": "1" * 40, "address": "10.0.0.6", "code": "a" * 40, "engine_ok": True,
         "buildkit_ok": True},
        {"host": "n2", "node_id": "2" * 40, "address": "10.0.0.7", "code": "b" * 40, "dockyard": "0.0.9",
         "engine_ok": True, "buildkit_ok": True},
        {"host": "n3", "node_id": "3" * 40, "address": "10.0.0.8", "code": "a" * 40, "engine_ok": False,
         "engine": "EngineUnavailable: no socket"},
        {"host": "n4", "node_id": "4" * 40, "address": "10.0.0.9", "error": "dockyard cannot run there: ImportError"},
    ]})
    problems = report.problems()
    assert len(problems) == 3
    assert problems[0].startswith("node n2 22222222 (10.0.0.7)") and "dockyard 0.0.9" in problems[0]
    assert problems[1].startswith("node n3") and "no Docker Engine" in problems[1]
    assert problems[2].startswith("node n4") and "ImportError" in problems[2]


def test_attaching_a_cluster_nothing_answers_for_is_one_quick_clear_error(tmp_path) -> None:
    import socket
    import time

    from dockyard.compute._ray import check_cluster
    from dockyard.errors import ClusterUnavailable

    with socket.socket() as sock:  # a port nothing listens on (bound, never listening)
        sock.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{sock.getsockname()[1]}"
        started = time.monotonic()
        with pytest.raises(ClusterUnavailable) as err:
            check_cluster({"address": address})
    assert "does not answer" in err.value.message and address in err.value.message
    assert time.monotonic() - started < 20, "Ray's own connect (half a minute) was waited for"
