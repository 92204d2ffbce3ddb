import pytest
from dockyard.build import spec_fingerprint
from dockyard.cli._fastpath import _parse


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["env", "build", "e.yml"], ("e.yml", False)),
        (["env", "build", "e.yml", "--json"], ("e.yml", True)),
        (["env", "build", "--progress", "plain", "e.yml"], ("e.yml", False)),
        (["env", "build", "e.yml", "--progress=json", "--json"], ("e.yml", True)),
        (["env", "build", "e.yml", "--no-cache"], None),
        (["env", "build", "--help"], None),
        (["env", "build"], None),
        (["env", "build", "a.yml", "b.yml"], None),
        (["--debug", "env", "build", "e.yml"], None),
        (["env", "key", "e.yml"], None),
    ],
)
def test_only_plain_env_build_takes_the_fast_lane(args, expected):
    assert _parse(args) == expected


def test_fingerprint_depends_on_bytes_and_engine():
    a = spec_fingerprint(b"name: x\n", "unix:///var/run/docker.sock")
    assert a == spec_fingerprint(b"name: x\n", "unix:///var/run/docker.sock")
    assert a != spec_fingerprint(b"name: y\n", "unix:///var/run/docker.sock")
    assert a != spec_fingerprint(b"name: x\n", "unix:///other.sock")


def test_a_client_holding_the_cache_password_never_hands_a_run_to_the_agent(tmp_path, monkeypatch):
    """The agent holds no password: a client that has the shared cache's must submit itself (it
    pulls a published key before queueing), so it does not even connect to the front door."""
    import socket
    import threading

    from dockyard._codeid import code_id
    from dockyard.cli._fastpath import try_run_via_agent

    monkeypatch.setenv("DOCKYARD_HOME", str(tmp_path))
    (tmp_path / "agent.code").write_text(code_id())
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(tmp_path / "agent.sock"))
    server.listen(4)
    connections: list[bytes] = []

    def accept() -> None:
        conn, _ = server.accept()
        connections.append(conn.recv(1))
        conn.close()  # a torn connection before "queued": the client reports it, queues nothing

    monkeypatch.setenv("DOCKYARD_CACHE_REGISTRY_PASSWORD_ENV", "CACHE_PW")
    monkeypatch.setenv("CACHE_PW", "s3cret")
    try:
        assert try_run_via_agent(["run", "t.py"]) is None
        assert connections == []
        monkeypatch.delenv("CACHE_PW")
        waiter = threading.Thread(target=accept, daemon=True)
        waiter.start()
        try_run_via_agent(["run", "t.py"])
        waiter.join(timeout=5)
        assert len(connections) == 1, "without the password the front door is used"
    finally:
        server.close()
