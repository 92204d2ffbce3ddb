"""EngineClient against real sockets (a tiny HTTP server on a unix socket), no Docker needed."""

from __future__ import annotations

import socket
import threading
from pathlib import Path

import pytest
from dockyard.dockerd import EngineClient
from dockyard.errors import EngineError, EngineUnavailable, InputError


@pytest.mark.parametrize(
    ("raw", "url"),
    [
        ("unix:///var/run/docker.sock", "unix:///var/run/docker.sock"),
        ("unix:///tmp/other.sock", "unix:///tmp/other.sock"),
        ("tcp://127.0.0.1:2375", "tcp://127.0.0.1:2375"),
        ("tcp://engine.example", "tcp://engine.example:2375"),
    ],
)
def test_parse(raw, url):
    assert EngineClient.parse(raw).url == url


def test_from_env_defaults_and_tls_port():
    assert EngineClient.from_env({}).unix_path == "/var/run/docker.sock"
    addr = EngineClient.from_env({"DOCKER_HOST": "tcp://10.0.0.1", "DOCKER_TLS_VERIFY": "1"})
    assert addr.port == 2376 and addr.tls_verify


@pytest.mark.parametrize("raw", ["ssh://user@host", "npipe:////./pipe/docker", "tcp://", "nonsense"])
def test_unsupported_addresses_are_input_errors(raw):
    with pytest.raises(InputError, match="DOCKER_HOST"):
        EngineClient.parse(raw)


def test_missing_socket_is_engine_unavailable(tmp_path: Path):
    addr = EngineClient.parse(f"unix://{tmp_path}/none.sock")
    with pytest.raises(EngineUnavailable, match="does not exist"):
        addr.ping()


class _FakeEngine:
    """Answers each connection with one canned reply (real unix socket, real bytes)."""

    def __init__(self, path: Path, reply: bytes) -> None:
        self.requests: list[bytes] = []
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.bind(str(path))
        self._sock.listen(4)
        self._reply = reply
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            with conn:
                data = b""
                while b"\r\n\r\n" not in data:
                    chunk = conn.recv(4096)
                    if not chunk:
                        break
                    data += chunk
                self.requests.append(data)
                conn.sendall(self._reply)

    def close(self) -> None:
        self._sock.close()


@pytest.fixture
def fake(tmp_path: Path):
    made: list[_FakeEngine] = []

    def start(reply: bytes) -> EngineClient:
        server = _FakeEngine(tmp_path / f"e{len(made)}.sock", reply)
        made.append(server)
        return EngineClient.parse(f"unix://{tmp_path}/e{len(made) - 1}.sock")

    yield start, made
    for server in made:
        server.close()


def test_ping_reads_api_version(fake):
    start, made = fake
    addr = start(b"HTTP/1.1 200 OK\r\nApi-Version: 1.41\r\nContent-Length: 2\r\nConnection: close\r\n\r\nOK")
    assert addr.ping() == "1.41"
    assert made[0].requests[0].startswith(b"GET /v1.41/_ping HTTP/1.1")


def test_ping_non_200_is_unavailable(fake):
    start, _ = fake
    addr = start(b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
    with pytest.raises(EngineUnavailable, match="HTTP 500"):
        addr.ping()


def test_hijack_keeps_bytes_sent_right_after_the_switch(fake):
    start, made = fake
    addr = start(b"HTTP/1.1 101 UPGRADED\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\nH2-SETTINGS")
    sock = addr.hijack("/grpc")
    try:
        assert sock.recv(100) == b"H2-SETTINGS"
    finally:
        sock.close()
    assert b"Upgrade: h2c" in made[0].requests[0]


def test_hijack_refused_is_engine_error(fake):
    start, _ = fake
    addr = start(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
    with pytest.raises(EngineError, match="refused POST /grpc"):
        addr.hijack("/grpc")


def test_raw_image_id_reads_the_id_and_treats_anything_else_as_absent(fake, tmp_path: Path):
    from dockyard.dockerd._rawhttp import unix_image_id

    start, made = fake
    image_id = "sha256:" + "ab" * 32
    body = f'{{"Id":"{image_id}","RepoTags":["x/y:1"]}}'.encode()
    ok = start(b"HTTP/1.0 200 OK\r\nContent-Type: application/json\r\n\r\n" + body)
    assert unix_image_id(ok.unix_path, "dockyard/env:abc") == image_id
    assert made[0].requests[0].startswith(b"GET /v1.41/images/dockyard%2Fenv:abc/json HTTP/1.0")
    missing = start(b'HTTP/1.0 404 Not Found\r\n\r\n{"message":"No such image"}')
    assert unix_image_id(missing.unix_path, "x") is None
    assert unix_image_id(str(tmp_path / "no.sock"), "x") is None
