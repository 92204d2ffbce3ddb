"""Faults around building, without an engine: names that cannot become run folders, and telling
a broken connection to BuildKit from a build that failed."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
from dockyard import ComputeTarget, Experiment, Workspace
from dockyard.build import _buildkit
from dockyard.build._buildkit import BuildKitClient, _StatusTracker, _Vertex
from dockyard.errors import BuildError, BuildKitUnavailable, EngineUnavailable, InputError
from dockyard.runs import new_run_id

# -- names ---------------------------------------------------------------------------------------


def test_the_longest_experiment_name_still_gives_a_run_id_that_is_a_folder_name(tmp_path: Path) -> None:
    ws = Workspace("w", home=tmp_path)
    longest = "e" * 235
    assert Experiment(ws, longest).name == longest
    run_id = new_run_id(longest)
    assert len(run_id.encode()) == 255
    (tmp_path / run_id).mkdir()  # the run's folder can be made
    with pytest.raises(OSError):  # one more character and it could not: the limit is tight
        (tmp_path / new_run_id(longest + "e")).mkdir()


@pytest.mark.parametrize("length", [236, 255, 256, 1000])
def test_a_longer_experiment_name_is_refused_naming_the_limit(tmp_path: Path, length: int) -> None:
    ws = Workspace("w", home=tmp_path)
    with pytest.raises(InputError) as info:
        Experiment(ws, "e" * length)
    err = info.value
    assert err.exit_code == 2
    assert f"{length} characters" in err.message and "the limit is 235" in err.message
    assert "235" in err.hint and "run id" in err.hint
    assert len(str(err)) < 400  # the name is shortened, not echoed whole
    assert list(tmp_path.iterdir()) == []  # refused before anything was written


def test_workspace_and_compute_target_names_keep_their_limit(tmp_path: Path) -> None:
    # A workspace is one folder (<home>/workspaces/<name>); a compute target is only stored.
    ws = Workspace("w" * 255, home=tmp_path)
    ws.directory.mkdir(parents=True)
    with pytest.raises(InputError, match="the limit is 255"):
        Workspace("w" * 256, home=tmp_path)
    with pytest.raises(InputError, match="the limit is 255"):
        ComputeTarget(Workspace("w", home=tmp_path), "c" * 256)


@pytest.mark.parametrize("name", ["", "-x", "a/b", "a..b", "exp\n", "ünï"])
def test_bad_characters_are_still_refused(tmp_path: Path, name: str) -> None:
    with pytest.raises(InputError, match="is not valid"):
        Experiment(Workspace("w", home=tmp_path), name)


# -- a broken stream versus a failed build -------------------------------------------------------


class _RpcError(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details

    def trailing_metadata(self) -> tuple[()]:
        return ()


class _Engine:
    url = "unix:///run/test-docker.sock"

    def __init__(self, up: bool) -> None:
        self.up = up

    def ping(self) -> None:
        if not self.up:
            raise EngineUnavailable(self.url, "connection refused")


def _client(engine_up: bool | None) -> BuildKitClient:
    """A client as after connecting; ``None``: a standalone buildkitd (no engine in between)."""
    client = BuildKitClient.__new__(BuildKitClient)
    client.target = "docker" if engine_up is not None else "unix:///run/buildkit/buildkitd.sock"
    client._relay = object() if engine_up is not None else None  # type: ignore[assignment]
    if engine_up is not None:
        client._engine = _Engine(engine_up)  # type: ignore[assignment]
    return client


def _mid_build() -> _StatusTracker:
    tracker = _StatusTracker(None)
    step = tracker.vertices.setdefault("sha256:1", _Vertex())
    step.name, step.started = "[2/2] RUN sleep 20", 1.0
    return tracker


BROKEN = [
    (grpc.StatusCode.UNAVAILABLE, "Stream removed (Socket closed)"),
    (grpc.StatusCode.UNKNOWN, "Stream removed"),
    (grpc.StatusCode.UNAVAILABLE, "Socket closed"),
    (grpc.StatusCode.UNAVAILABLE, "recvmsg:Connection reset by peer"),
    (grpc.StatusCode.INTERNAL, "Received RST_STREAM with error code 2"),
    (grpc.StatusCode.CANCELLED, "context canceled"),  # the daemon shut down the job
]


@pytest.mark.parametrize(("code", "details"), BROKEN)
def test_a_stream_that_breaks_mid_build_is_the_engine_going_away(code: grpc.StatusCode, details: str) -> None:
    err = _client(engine_up=False)._build_error(_RpcError(code, details), _mid_build(), b"FROM x\n")
    assert isinstance(err, EngineUnavailable) and err.exit_code == 3
    assert "the Docker Engine went away during the build" in err.message and details in err.message
    assert "build again" in err.hint


def test_an_engine_that_answers_again_is_still_not_a_build_error() -> None:
    exc = _RpcError(grpc.StatusCode.UNAVAILABLE, "Stream removed (Socket closed)")
    err = _client(engine_up=True)._build_error(exc, _mid_build(), b"FROM x\n")
    assert type(err) is BuildKitUnavailable and err.exit_code == 3
    assert "went away during the build" in err.message and "answers again" in err.message


def test_a_standalone_buildkitd_going_away_names_it() -> None:
    exc = _RpcError(grpc.StatusCode.UNAVAILABLE, "Socket closed")
    err = _client(engine_up=None)._build_error(exc, _mid_build(), b"FROM x\n")
    assert type(err) is BuildKitUnavailable and "buildkitd.sock went away during the build" in err.message


@pytest.mark.parametrize(
    "details",
    [
        'process "/bin/sh -c exit 7" did not complete successfully: exit code: 7',
        "failed to solve with frontend dockerfile.v0: failed to solve: executor failed running "
        "[/bin/sh -c exit 7]: exit code: 7",
        # A registry's reset connection is the build's (pull's) failure, not the engine's.
        "failed to solve: failed to do request: Head https://reg/v2/x: connection reset by peer",
    ],
)
def test_a_failing_step_is_still_a_build_error(details: str) -> None:
    err = _client(engine_up=False)._build_error(_RpcError(grpc.StatusCode.UNKNOWN, details), _mid_build(), b"FROM x\n")
    assert type(err) is BuildError and err.exit_code == 1


def test_our_own_cancel_is_not_the_engine_going_away() -> None:
    exc = _RpcError(grpc.StatusCode.CANCELLED, "Cancelled")
    err = _client(engine_up=False)._build_error(exc, _mid_build(), b"FROM x\n", cancelled_by_us=True)
    assert not isinstance(err, EngineUnavailable)


def test_unknown_errors_without_transport_wording_stay_build_errors() -> None:
    assert not _buildkit._stream_broke(grpc.StatusCode.UNKNOWN, "something odd happened")
    assert _buildkit._stream_broke(grpc.StatusCode.UNKNOWN, "Stream removed")
