"""Pure parts of dockyard.build._registry: references, the auth header, error sorting, scrubbing."""

from __future__ import annotations

import http.server
import socketserver
import threading
import traceback
from typing import ClassVar

import pytest
from dockyard._environment import ContainerRegistry
from dockyard.build._registry import (
    _classify,
    _credentials,
    _decode_auth,
    _encode_auth,
    _registry_error,
    parse_image_ref,
    pull_image,
    qualify,
)
from dockyard.dockerd import EngineClient
from dockyard.errors import EngineError, InputError, RegistryAuthError, RegistryError

SECRET = "s3cr3t-Pa55-w0rd"


def _registry(
    address: str | None = "reg.example.com:5000", username: str | None = "alice", password: str | None = SECRET
) -> ContainerRegistry:
    reg = ContainerRegistry(address=address, username=username)
    reg.password = password
    return reg


@pytest.mark.parametrize(
    ("ref", "host", "path", "tag", "digest"),
    [
        ("busybox", None, "busybox", None, None),
        ("dockyard/base:bookworm-busybox", None, "dockyard/base", "bookworm-busybox", None),
        ("127.0.0.1:5000/team/app:1", "127.0.0.1:5000", "team/app", "1", None),
        ("localhost/app", "localhost", "app", None, None),
        ("myreg.azurecr.io/fastdotai/fastai2:latest", "myreg.azurecr.io", "fastdotai/fastai2", "latest", None),
        ("Registry/app", "Registry", "app", None, None),  # an upper-case first component is a host
        ("reg.io/app@sha256:" + "a" * 64, "reg.io", "app", None, "sha256:" + "a" * 64),
        ("reg.io:443/a/b:v1@sha256:" + "b" * 64, "reg.io:443", "a/b", "v1", "sha256:" + "b" * 64),
    ],
)
def test_parse_image_ref_splits_like_docker(ref, host, path, tag, digest):
    name = parse_image_ref(ref)
    assert (name.host, name.path, name.tag, name.digest) == (host, path, tag, digest)
    assert str(name) == ref
    assert name.registry == (host or "docker.io")


@pytest.mark.parametrize(
    "ref", ["", "  ", "UPPER", "a//b", "app:", "app@", "app@sha256:short", "reg.io/", ":tag", "a b"]
)
def test_parse_image_ref_refuses_bad_references(ref):
    with pytest.raises(InputError) as info:
        parse_image_ref(ref)
    assert "image reference" in str(info.value)


@pytest.mark.parametrize(
    ("ref", "address", "expected"),
    [
        ("fastdotai/fastai2:latest", "myregistry.azurecr.io", "myregistry.azurecr.io/fastdotai/fastai2:latest"),
        ("busybox", "127.0.0.1:5000", "127.0.0.1:5000/busybox"),
        ("app:1", "https://MyReg.azurecr.io/", "MyReg.azurecr.io/app:1"),
        ("app:1", "reg.io/team", "reg.io/team/app:1"),
        ("myreg.azurecr.io/fastdotai/fastai2:latest", "myreg.azurecr.io", "myreg.azurecr.io/fastdotai/fastai2:latest"),
        ("MYREGISTRY.azurecr.io/x:1", "myregistry.azurecr.io", "MYREGISTRY.azurecr.io/x:1"),
        ("docker.io/library/busybox:1", "index.docker.io", "docker.io/library/busybox:1"),
        ("app@sha256:" + "c" * 64, "reg.io", "reg.io/app@sha256:" + "c" * 64),
        ("dockyard/base:bookworm-busybox", None, "dockyard/base:bookworm-busybox"),
        ("dockyard/base:bookworm-busybox", "", "dockyard/base:bookworm-busybox"),
    ],
)
def test_qualify(ref, address, expected):
    assert qualify(ref, _registry(address)) == expected


def test_qualify_without_registry_keeps_the_reference():
    assert qualify("team/app:2", None) == "team/app:2"


def test_qualify_refuses_another_registrys_image_so_credentials_stay_home():
    with pytest.raises(InputError) as info:
        qualify("other.io/app:1", _registry("myregistry.azurecr.io"))
    assert "other.io" in str(info.value) and "myregistry.azurecr.io" in str(info.value)
    assert SECRET not in str(info.value)


def test_qualify_refuses_an_address_without_a_host():
    with pytest.raises(InputError):
        qualify("app:1", _registry("just-a-name"))


def test_auth_header_round_trips_and_is_url_safe():
    password = "p+/w?=~" * 5  # bytes that standard base64 would turn into '+' and '/'
    header = _encode_auth("alice", password, "reg.io:5000")
    assert "+" not in header and "/" not in header
    assert _decode_auth(header) == {"username": "alice", "password": password, "serveraddress": "reg.io:5000"}
    assert _decode_auth(header.rstrip("=")) == _decode_auth(header)
    assert _decode_auth(_encode_auth(None, None, None)) == {}


def test_credentials_use_the_image_host_and_docker_hubs_server_name():
    creds = _credentials(_registry("reg.io:5000"), parse_image_ref("reg.io:5000/app:1"))
    assert creds.given and _decode_auth(creds.header())["serveraddress"] == "reg.io:5000"
    hub = _credentials(_registry(None), parse_image_ref("busybox"))
    assert _decode_auth(hub.header())["serveraddress"] == "https://index.docker.io/v1/"
    assert SECRET not in repr(creds)


def test_half_credentials_are_an_auth_error_naming_the_variable(monkeypatch):
    monkeypatch.delenv("DY_UNIT_REG_PW", raising=False)
    reg = ContainerRegistry(address="reg.io", username="alice", password_env="DY_UNIT_REG_PW")
    with pytest.raises(RegistryAuthError) as info:
        _credentials(reg, parse_image_ref("reg.io/app"))
    assert info.value.registry == "reg.io" and "DY_UNIT_REG_PW" in str(info.value)
    with pytest.raises(RegistryAuthError):
        _credentials(_registry("reg.io", username=None), parse_image_ref("reg.io/app"))
    anonymous = _credentials(_registry("reg.io", username=None, password=None), parse_image_ref("reg.io/app"))
    assert not anonymous.given and anonymous.secrets() == ()


# What Docker 20.10 answered in tests/integration/test_registry.py, and other registries' shapes.
@pytest.mark.parametrize(
    ("message", "kind"),
    [
        ("unauthorized: authentication required", "auth"),
        ('Head "http://127.0.0.1:5000/v2/a/manifests/t": no basic auth credentials', "auth"),
        ("login attempt to http://127.0.0.1:5000/v2/ failed with status: 401 Unauthorized", "auth"),
        ("Get https://reg.io/v2/: unauthorized: incorrect username or password", "auth"),
        ("denied: requested access to the resource is denied", "auth"),
        ("manifest for 127.0.0.1:5000/a/b:x not found: manifest unknown: manifest unknown", "not_found"),
        (
            "pull access denied for nosuch/repo, repository does not exist or may require 'docker login': "
            "denied: requested access to the resource is denied",
            "not_found",
        ),
        ('Get "http://127.0.0.1:1/v2/": dial tcp 127.0.0.1:1: connect: connection refused', "unreachable"),
        ('Get "https://x.invalid/v2/": dial tcp: lookup x.invalid on 10.0.0.53:53: no such host', "unreachable"),
        ('Get "https://10.255.255.1/v2/": dial tcp 10.255.255.1:443: i/o timeout', "unreachable"),
        (
            'Get "https://reg.io/v2/": net/http: request canceled while waiting for connection '
            "(Client.Timeout exceeded while awaiting headers)",
            "unreachable",
        ),
        ('Get "https://reg.io:5000/v2/": http: server gave HTTP response to HTTPS client', "insecure"),
        ('Get "https://reg.io/v2/": x509: certificate signed by unknown authority', "tls"),
        ("received unexpected HTTP status: 502 Bad Gateway", "registry"),
        ("failed to register layer: write /usr/lib/x: no space left on device", "other"),
        ("open /var/lib/docker/tmp/x: permission denied", "other"),
    ],
)
def test_classify_engine_messages(message, kind):
    assert _classify(message) == kind


def test_error_types_follow_the_kind():
    creds = _credentials(_registry("reg.io"), parse_image_ref("reg.io/app:1"))
    auth = _registry_error("pulling", "reg.io/app:1", "reg.io", "unauthorized: authentication required", creds)
    assert isinstance(auth, RegistryAuthError) and auth.registry == "reg.io" and "alice" in str(auth)
    missing = _registry_error("pulling", "reg.io/app:1", "reg.io", "manifest unknown", creds)
    assert type(missing) is RegistryError and missing.hint
    down = _registry_error("pulling", "reg.io/app:1", "reg.io", "connect: connection refused", creds)
    assert type(down) is RegistryError and "cannot be reached" in str(down)
    disk = _registry_error("pulling", "reg.io/app:1", "reg.io", "no space left on device", creds, status=500)
    assert type(disk) is EngineError and disk.status == 500
    anonymous = _credentials(_registry("reg.io", username=None, password=None), parse_image_ref("reg.io/app"))
    login = _registry_error("pulling", "reg.io/app", "reg.io", "no basic auth credentials", anonymous)
    assert isinstance(login, RegistryAuthError) and "requires a login" in str(login)


@pytest.mark.parametrize(
    "echo",
    [
        f'Get "https://alice:{SECRET}@reg.io/v2/": unauthorized: authentication required',
        f"unauthorized: wrong password {SECRET} for alice",
        f'Head "https://reg.io/v2/app/manifests/1?pw={SECRET}": no basic auth credentials',
        "X-Registry-Auth: {header} was refused: unauthorized",
    ],
)
def test_a_password_echoed_by_the_engine_is_scrubbed_everywhere(echo):
    creds = _credentials(_registry("reg.io"), parse_image_ref("reg.io/app:1"))
    message = echo.format(header=creds.header())
    exc = _registry_error("pulling", "reg.io/app:1", "reg.io", message, creds)
    assert isinstance(exc, RegistryAuthError)
    try:
        raise exc from None
    except RegistryAuthError as raised:
        shown = "".join(traceback.format_exception(type(raised), raised, raised.__traceback__))
    for text in (str(exc), repr(exc), exc.hint, exc.message, repr(exc.args), shown):
        assert SECRET not in text
        assert creds.header() not in text
    assert "***" in str(exc)


# -- the JSON-lines stream, replayed from a socket that answers like the engine did ---------------


class _Replay(http.server.BaseHTTPRequestHandler):
    status: ClassVar[int] = 200
    lines: ClassVar[tuple[bytes, ...]] = ()
    seen: ClassVar[list[tuple[str, dict[str, str]]]] = []

    def do_POST(self) -> None:
        type(self).seen.append((self.path, dict(self.headers)))
        self.send_response(self.status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        for line in self.lines:
            self.wfile.write(b"%x\r\n%s\r\n" % (len(line), line))
        self.wfile.write(b"0\r\n\r\n")

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def replay(tmp_path):
    """A unix socket answering each POST with ``_Replay.status`` and ``_Replay.lines``."""

    class Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
        daemon_threads = True

    path = str(tmp_path / "engine.sock")
    server = Server(path, _Replay)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True)
    thread.start()
    _Replay.seen = []
    try:
        yield EngineClient.parse(f"unix://{path}")
    finally:
        server.shutdown()
        server.server_close()


def test_stream_reports_progress_scrubbed_and_an_error_line_despite_http_200(replay):
    _Replay.status = 200
    _Replay.lines = (
        b'{"status":"Pulling from team/app","id":"1"}\r\n',
        b'{"status":"Downloading","progressDetail":{"current":1},"progress":"[=> ] 1B/2B","id":"abc"}\r\n',
        f'{{"status":"echo https://alice:{SECRET}@reg.io/v2/"}}\r\n'.encode(),
        b'{"errorDetail":{"message":"unauthorized: authentication required"},"error":"unauthorized"}\r\n',
    )
    lines: list[str] = []
    with pytest.raises(RegistryAuthError) as info:
        pull_image("team/app:1", _registry("reg.io"), engine=replay, progress=lines.append)
    assert lines[:2] == ["1: Pulling from team/app", "abc: Downloading [=> ] 1B/2B"]
    assert not any(SECRET in line for line in lines) and "***" in lines[2]
    assert info.value.registry == "reg.io" and SECRET not in repr(info.value.args)
    path, headers = _Replay.seen[0]
    assert path == "/v1.41/images/create?fromImage=reg.io%2Fteam%2Fapp&tag=1"
    sent = {k.lower(): v for k, v in headers.items()}
    assert _decode_auth(sent["x-registry-auth"]) == {"username": "alice", "password": SECRET, "serveraddress": "reg.io"}


def test_an_error_in_the_progress_callback_is_not_mistaken_for_the_engine(replay):
    _Replay.status = 200
    _Replay.lines = (b'{"status":"Pulling from team/app","id":"1"}\r\n',)

    def broken(line: str) -> None:
        raise BrokenPipeError("stdout closed")

    with pytest.raises(BrokenPipeError):
        pull_image("team/app:1", _registry("reg.io"), engine=replay, progress=broken)


def test_anonymous_pull_sends_no_auth_header_and_tags_latest(replay):
    _Replay.status = 404
    _Replay.lines = (b'{"message":"manifest for reg.io/app:latest not found: manifest unknown"}\n',)
    with pytest.raises(RegistryError) as info:
        pull_image("reg.io/app", None, engine=replay)
    assert type(info.value) is RegistryError and "not in reg.io" in str(info.value)
    path, headers = _Replay.seen[0]
    assert path.endswith("fromImage=reg.io%2Fapp&tag=latest")
    assert "x-registry-auth" not in {k.lower() for k in headers}
