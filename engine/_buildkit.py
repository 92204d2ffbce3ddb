"""BuildKit's gRPC API: connecting (through dockerd's ``/grpc`` or a buildkitd socket) and calling it.

The only module that imports the generated stubs in ``dockyard.proto`` and the one place that
translates ``grpc.RpcError`` into ``dockyard.errors``.

Docker Engine serves BuildKit's Control service on ``POST /grpc`` after an ``Upgrade: h2c`` switch.
grpcio cannot dial "a socket that someone already upgraded", so :class:`_HijackRelay` listens on a
private unix socket and bridges every connection grpcio opens to a fresh ``/grpc`` hijack.
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import grpc

from ._engine import EngineAddress
from .errors import BuildKitUnavailable, DockyardError, EngineUnavailable, InputError

if TYPE_CHECKING:  # pragma: no cover
    from types import TracebackType

__all__ = ["BuildKitClient", "Worker"]

# BuildKit's own clients raise both limits to 16 MiB; responses (Status streams with logs) can be big.
_CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", 16 << 20),
    ("grpc.max_send_message_length", 16 << 20),
]


@dataclass(frozen=True)
class Worker:
    """One BuildKit worker (``moby`` for Docker's embedded BuildKit)."""

    id: str
    platforms: tuple[str, ...]
    labels: dict[str, str] = field(default_factory=dict)

    @property
    def embedded_in_docker(self) -> bool:
        return self.id == "moby"


class _HijackRelay:
    """Bridges grpcio's connections on a private unix socket to ``POST /grpc`` hijacks on the engine."""

    def __init__(self, engine: EngineAddress) -> None:
        self._engine = engine
        self._dir = tempfile.mkdtemp(prefix="dockyard-grpc-")
        self.path = os.path.join(self._dir, "relay.sock")
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(self.path)
        self._listener.listen(8)
        self._closed = threading.Event()
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._accept_loop, name="dockyard-grpc-relay", daemon=True).start()

    def _accept_loop(self) -> None:
        while not self._closed.is_set():
            try:
                local, _ = self._listener.accept()
            except OSError:
                return  # listener closed
            try:
                upstream = self._engine.hijack("/grpc")
            except DockyardError:
                local.close()  # grpcio sees the hang-up as UNAVAILABLE; the client reports why
                continue
            with self._lock:
                self._conns += [local, upstream]
            for src, dst in ((local, upstream), (upstream, local)):
                threading.Thread(target=_pump, args=(src, dst), daemon=True).start()

    def close(self) -> None:
        self._closed.set()
        self._listener.close()
        with self._lock:
            for conn in self._conns:
                try:
                    conn.close()
                except OSError:
                    pass
            self._conns.clear()
        shutil.rmtree(self._dir, ignore_errors=True)


def _pump(src: socket.socket, dst: socket.socket) -> None:
    try:
        while chunk := src.recv(65536):
            dst.sendall(chunk)
    except OSError:
        pass
    finally:
        try:
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass


class BuildKitClient:
    """A connection to BuildKit's Control service.

    Targets: ``docker`` (the engine at ``DOCKER_HOST``, through ``/grpc``),
    ``unix:///run/buildkit/buildkitd.sock`` and ``tcp://host:port`` for a standalone buildkitd.

    Use as a context manager, or call :meth:`close`.
    """

    def __init__(self, target: str = "docker", *, engine: EngineAddress | None = None) -> None:
        self.target = target
        self._relay: _HijackRelay | None = None
        if target == "docker":
            self._engine = engine or EngineAddress.from_env()
            self._engine.ping()  # a clear EngineUnavailable beats a vague gRPC UNAVAILABLE
            self._relay = _HijackRelay(self._engine)
            dial = f"unix:{self._relay.path}"
        elif target.startswith("unix://"):
            dial = f"unix:{target.removeprefix('unix://')}"
        elif target.startswith("tcp://"):
            dial = target.removeprefix("tcp://")
        else:
            raise InputError(
                f"unknown BuildKit target {target!r}",
                hint="use 'docker', unix:///run/buildkit/buildkitd.sock or tcp://host:port",
            )
        self._channel = grpc.insecure_channel(dial, options=_CHANNEL_OPTIONS)
        from dockyard.proto import control_pb2_grpc

        self._control = control_pb2_grpc.ControlStub(self._channel)

    def list_workers(self, timeout: float = 10.0) -> list[Worker]:
        """``Control.ListWorkers``: the liveness probe that works on every BuildKit since v0.3.

        Raises:
            BuildKitUnavailable: BuildKit did not answer.
        """
        from dockyard.proto import control_pb2

        try:
            reply = self._control.ListWorkers(control_pb2.ListWorkersRequest(), timeout=timeout)
        except grpc.RpcError as exc:
            raise self._translate(exc, "ListWorkers") from exc
        return [
            Worker(
                id=rec.ID,
                platforms=tuple(
                    "/".join(p for p in (pl.OS, pl.Architecture, pl.Variant) if p) for pl in rec.platforms
                ),
                labels=dict(rec.Labels),
            )
            for rec in reply.record
        ]

    def _translate(self, exc: grpc.RpcError, method: str) -> DockyardError:
        code = exc.code() if hasattr(exc, "code") else None
        details = exc.details() if hasattr(exc, "details") else str(exc)
        if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
            if self._relay is not None:
                try:
                    self._engine.ping()
                except EngineUnavailable as down:
                    return down
            return BuildKitUnavailable(
                f"BuildKit at {self.target} did not answer {method}: {details}",
                hint="check that the engine has BuildKit (Docker 18.09+) or that buildkitd runs",
            )
        name = code.name if code is not None else "UNKNOWN"
        return BuildKitUnavailable(f"BuildKit {method} failed ({name}): {details}")

    def close(self) -> None:
        self._channel.close()
        if self._relay is not None:
            self._relay.close()

    def __enter__(self) -> BuildKitClient:
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
