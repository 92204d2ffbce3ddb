"""The agent's front door without an agent: the wire format, the request reader, the uid check, and
which `dockyard run` command lines it takes (everything else is the click command's)."""

from __future__ import annotations

import os
import shutil
import socket
import stat
import tempfile
import threading
from pathlib import Path

import pytest
from dockyard import _wire
from dockyard.cli._remote import config_of, parse_run_args
from dockyard.compute import FrontDoor


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["run", "t.py"], {"script": "t.py", "args": [], "source": ".", "env_file": None, "as_json": False}),
        (["run", "t.py", "--source", "src", "--env=e.yml", "--json", "--", "--epochs", "5"],
         {"script": "t.py", "args": ["--epochs", "5"], "source": "src", "env_file": "e.yml", "as_json": True}),
        (["run", "--workspace", "w", "--experiment", "x", "t.py", "--detach"],
         {"script": "t.py", "workspace": "w", "experiment": "x", "detach": True}),
        (["run", "t.py", "--", "--json"], {"script": "t.py", "args": ["--json"], "as_json": False}),
    ],
)
def test_plain_runs_are_taken(argv, expected):
    parsed = parse_run_args(argv)
    assert parsed is not None
    assert {k: getattr(parsed, k) for k in expected} == expected


@pytest.mark.parametrize(
    "argv",
    [
        ["run"],  # no script: click says what is missing
        ["run", "t.py", "--gpus", "2"],  # GPU requests are checked against this machine by the client
        ["run", "t.py", "extra"],  # a second positional
        ["run", "t.py", "--source"],  # an option without its value
        ["run", "--help"],
        ["runs", "ls"],
        ["env", "build", "e.yml"],
    ],
)
def test_everything_else_is_left_to_the_click_command(argv):
    assert parse_run_args(argv) is None


def test_only_configuration_variables_are_compared():
    a = {"DOCKYARD_HOME": "/h", "DOCKER_HOST": "unix:///s", "DOCKYARD_GPUS": "2", "HOME": "/root", "PATH": "/bin",
         "DOCKYARD_REGISTRY_PASSWORD": "s3cr3t"}
    # DOCKYARD_HOME is not compared: a client reaches an agent through the socket in its own home.
    assert config_of(a) == {"DOCKER_HOST": "unix:///s", "DOCKYARD_GPUS": "2"}


def test_frames_round_trip_over_a_socket():
    a, b = socket.socketpair()
    with a, b:
        a.sendall(_wire.frame(b"R", "x\0é\0") + _wire.frame(b"X", "0"))
        assert _wire.read_frame(b) == (b"R", "x\0é\0".encode())
        assert _wire.fields(b"x\0\xc3\xa9\0") == ["x", "é", ""]
        assert _wire.read_frame(b) == (b"X", b"0")
        a.close()
        assert _wire.read_frame(b) is None  # the end of the stream, not an error


def test_an_oversized_frame_is_refused():
    a, b = socket.socketpair()
    with a, b:
        a.sendall(b"R" + (_wire.MAX_FRAME + 1).to_bytes(4, "big"))
        with pytest.raises(ValueError):
            _wire.read_frame(b)


@pytest.fixture
def door(tmp_path_factory: pytest.TempPathFactory):
    folder = Path(tempfile.mkdtemp(prefix="dockyard-door-"))
    folder.chmod(0o755)  # reachable by another user: only the socket's own checks keep them out
    seen = []

    def handler(request, reply):
        seen.append(request)
        reply.queued("ws", "run-1")
        reply.log(b"hello\n")
        reply.exit(0)

    front = FrontDoor(folder / "agent.sock", handler, log=lambda _line: None)
    front.start()
    yield front, seen
    front.close()
    shutil.rmtree(folder)


def _talk(path: Path, payload: bytes) -> list[tuple[bytes, bytes]]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(str(path))
        sock.sendall(payload)
        frames = []
        try:
            while (got := _wire.read_frame(sock)) is not None:
                frames.append(got)
        except ConnectionResetError:
            pass  # the agent closed with our garbage unread: what it sent before still counts
        return frames


def test_a_request_reaches_the_handler_and_the_reply_comes_back(door):
    front, seen = door
    request = "\0".join([_wire.PROTOCOL, "/work", "1", "DOCKYARD_HOME=/h", "run", "t.py"])
    assert _talk(front.path, _wire.frame(b"R", request)) == [(b"I", b"ws\0run-1"), (b"L", b"hello\n"), (b"X", b"0")]
    assert seen[0].cwd == "/work" and dict(seen[0].environ) == {"DOCKYARD_HOME": "/h"}
    assert seen[0].argv == ("run", "t.py")


@pytest.mark.parametrize(
    "payload",
    [
        _wire.frame(b"R", "\0".join(["another-protocol/9", "/", "0", "run", "t.py"])),
        _wire.frame(b"R", "\0".join([_wire.PROTOCOL, "/", "2", "A=1"])),  # fewer variables than announced
        _wire.frame(b"Q", "nonsense"),
        b"garbage that is not a frame",
    ],
)
def test_anything_else_is_answered_do_it_yourself(door, payload):
    front, seen = door
    frames = _talk(front.path, payload)
    assert [kind for kind, _ in frames] == [b"F"] and seen == []


def test_the_socket_is_for_its_user_alone(door):
    front, _seen = door
    assert stat.S_IMODE(front.path.stat().st_mode) == 0o600


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to connect as another user")
def test_another_user_gets_nothing_even_through_an_open_socket_file(door):
    front, seen = door
    os.chmod(front.path, 0o666)  # past the file mode: the peer check must still refuse
    result: dict[str, object] = {}

    def as_nobody() -> None:
        pid = os.fork()
        if pid == 0:  # the child becomes another user and reports what it got through its exit code
            code = 3
            try:
                os.setuid(65534)
                request = "\0".join([_wire.PROTOCOL, "/", "0", "run", "t.py"])
                try:
                    code = 0 if _talk(front.path, _wire.frame(b"R", request)) == [] else 1
                except (BrokenPipeError, ConnectionResetError):
                    code = 0  # hung up on before the request was even sent: nothing answered
            finally:
                os._exit(code)
        result["status"] = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])

    thread = threading.Thread(target=as_nobody)
    thread.start()
    thread.join(30)
    assert result["status"] == 0, "another user got an answer"
    assert seen == []
