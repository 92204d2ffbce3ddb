"""BuildKit's gRPC API: connecting (through dockerd's ``/grpc`` or a buildkitd socket) and calling it.

The only module that imports the generated stubs in ``dockyard.proto`` and the one place that
translates ``grpc.RpcError`` into ``dockyard.errors``.

Docker Engine serves BuildKit's Control service on ``POST /grpc`` after an ``Upgrade: h2c`` switch.
grpcio cannot dial "a socket that someone already upgraded", so :class:`_HijackRelay` listens on a
private unix socket and bridges every connection grpcio opens to a fresh ``/grpc`` hijack.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
import tempfile
import threading
import uuid
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import grpc

from ..dockerd import EngineClient
from ..errors import BuildError, BuildKitUnavailable, DockyardError, EngineUnavailable, InputError

if TYPE_CHECKING:  # pragma: no cover
    from types import TracebackType

__all__ = [
    "BuildEvent",
    "BuildKitClient",
    "SolveResult",
    "SolveSpec",
    "TlsFiles",
    "Worker",
    "files_definition",
    "parse_step",
]

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


@dataclass(frozen=True)
class TlsFiles:
    """Client TLS for a ``tcp://`` buildkitd: CA to trust, our certificate and key, expected name."""

    ca: str | None = None
    cert: str | None = None
    key: str | None = None
    server_name: str | None = None


@dataclass(frozen=True)
class SolveSpec:
    """One dockerfile.v0 build, sent without a session: every input travels in the request."""

    dockerfile: bytes
    context: Mapping[str, bytes]
    exporter: str
    exporter_attrs: Mapping[str, str]
    frontend_attrs: Mapping[str, str] = field(default_factory=dict)
    #: A local image whose filesystem is the context (a large or user context), instead of ``context``.
    context_image: str | None = None
    #: (image, path): large context files, each copied from its own image into the context.
    context_blobs: tuple[tuple[str, str], ...] = ()
    #: Image references whose inline cache the build may reuse (``registry`` cache imports).
    cache_from: tuple[str, ...] = ()
    #: Embed the build's cache metadata in the image (an ``inline`` cache export), so that a later
    #: build elsewhere can import it from the pushed image.
    inline_cache: bool = False


@dataclass(frozen=True)
class SolveResult:
    exporter_response: dict[str, str]
    steps: int
    cached_steps: int


@dataclass(frozen=True)
class BuildEvent:
    """One progress event from BuildKit's Status stream, already merged by vertex.

    ``kind`` is ``step`` (a vertex changed state: ``state`` is started/done/cached/error) or ``log``
    (one line the step printed). ``index``/``total`` come from names like ``[2/4] RUN …``.
    """

    kind: Literal["step", "log"]
    name: str
    state: str = ""
    index: int | None = None
    total: int | None = None
    text: str = ""
    seconds: float | None = None

    def plain(self) -> str:
        """The event as one plain line (``docker build --progress plain``-like), for logs and pipes."""
        if self.kind == "log":
            return f"    | {self.text}"
        if self.state == "started":
            return self.name
        label = {"cached": "CACHED", "error": "ERROR"}.get(self.state)
        if label is None:
            label = f"{self.seconds:.1f}s" if self.state == "done" and self.seconds is not None else self.state
        return f"{self.name}  {label}"


_STEP = re.compile(r"^\[(?:[^\]]*\s)?(\d+)/(\d+)\]\s")


def parse_step(name: str) -> tuple[int | None, int | None]:
    """``"[stage-0 3/5] RUN x"`` -> (3, 5); names without a step number -> (None, None)."""
    m = _STEP.match(name)
    return (int(m.group(1)), int(m.group(2))) if m else (None, None)


def _op_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def files_definition(files: Mapping[str, bytes]) -> object:
    """An LLB Definition whose result is a filesystem holding ``files`` (``a/b.txt`` paths make
    their folders), made by one FileOp of chained ``mkdir``/``mkfile`` actions on scratch — no
    session or local source needed.

    Returns a ``pb.Definition``. Timestamps are left unset (-1) so identical files give
    identical digests and BuildKit's cache recognises them.
    """
    from dockyard.proto import ops_pb2

    names = sorted(files) or [".dockyard-empty"]
    steps: list[tuple[str, str]] = []  # ("d" | "f", path)
    made: set[str] = set()
    for name in names:
        parts = name.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            folder = "/".join(parts[:i])
            if folder not in made:
                made.add(folder)
                steps.append(("d", folder))
        steps.append(("f", name))
    actions = []
    for i, (kind, name) in enumerate(steps):
        common = {
            "input": -1 if i == 0 else i - 1,  # chain on the previous action's result
            "secondaryInput": -1,
            "output": 0 if i == len(steps) - 1 else -1,
        }
        if kind == "d":
            action = ops_pb2.FileAction(
                **common, mkdir=ops_pb2.FileActionMkDir(path="/" + name, mode=0o755, makeParents=True, timestamp=-1)
            )
        else:
            action = ops_pb2.FileAction(
                **common,
                mkfile=ops_pb2.FileActionMkFile(path="/" + name, mode=0o644, data=files.get(name, b""), timestamp=-1),
            )
        actions.append(action)
    file_op = ops_pb2.Op(file=ops_pb2.FileOp(actions=actions)).SerializeToString(deterministic=True)
    return _definition(file_op)


def image_definition(ref: str) -> object:
    """An LLB Definition whose result is the filesystem of the engine's local image ``ref``
    (an imported build input: Docker's BuildKit resolves ``docker-image://`` from its own store)."""
    return _definition(_source_op(ref))


def context_definition(bundle: str, blobs: Sequence[tuple[str, str]]) -> object:
    """The filesystem of the local image ``bundle`` plus each ``(image, path)`` blob's ``/blob`` at
    ``path``: large files travel once, as their own content-addressed images, for every later build.

    Two FileOps, so BuildKit's cache does the work: the first lays out the blobs (unchanged blobs:
    the same op, a cache hit, no copy), the second copies the small files on top of it (a thin new
    layer). BuildKit 0.8 has both (``copy`` actions with secondary inputs).
    """
    from dockyard.proto import ops_pb2

    if not blobs:
        return image_definition(bundle)
    blob_sources = [_source_op(image) for image, _ in blobs]
    actions = []
    n = len(blob_sources)
    for i, (_, dest) in enumerate(blobs):
        actions.append(ops_pb2.FileAction(
            input=-1 if i == 0 else n + i - 1,  # scratch, then the previous copy's result
            secondaryInput=i,
            output=0 if i == n - 1 else -1,
            copy=ops_pb2.FileActionCopy(src="/blob", dest="/" + dest, mode=-1, followSymlink=False,
                                        createDestPath=True, timestamp=-1),
        ))
    layout = ops_pb2.Op(inputs=[ops_pb2.Input(digest=_op_digest(op), index=0) for op in blob_sources],
                        file=ops_pb2.FileOp(actions=actions)).SerializeToString(deterministic=True)
    small = _source_op(bundle)
    on_top = ops_pb2.Op(
        inputs=[ops_pb2.Input(digest=_op_digest(layout), index=0), ops_pb2.Input(digest=_op_digest(small), index=0)],
        file=ops_pb2.FileOp(actions=[ops_pb2.FileAction(
            input=0, secondaryInput=1, output=0,
            copy=ops_pb2.FileActionCopy(src="/", dest="/", mode=-1, followSymlink=False, dirCopyContents=True,
                                        createDestPath=True, allowWildcard=False, timestamp=-1),
        )]),
    ).SerializeToString(deterministic=True)
    return _definition(on_top, *blob_sources, layout, small)


def _source_op(ref: str) -> bytes:
    from dockyard.proto import ops_pb2

    name = ref if "/" in ref.split(":", 1)[0] and "." in ref.split("/", 1)[0] else f"docker.io/{ref}"
    return ops_pb2.Op(source=ops_pb2.SourceOp(identifier=f"docker-image://{name}")).SerializeToString(
        deterministic=True
    )


def _definition(op: bytes, *dependencies: bytes) -> object:
    from dockyard.proto import ops_pb2

    terminal = ops_pb2.Op(inputs=[ops_pb2.Input(digest=_op_digest(op), index=0)]).SerializeToString(
        deterministic=True
    )
    definition = ops_pb2.Definition()
    getattr(definition, "def").extend([*dependencies, op, terminal])  # `def` is a Python keyword
    for blob in (*dependencies, op, terminal):
        # Frontends refuse definitions without a metadata entry per op.
        definition.metadata[_op_digest(blob)].CopyFrom(ops_pb2.OpMetadata())
    return definition


_DOCKYARD_RUN = re.compile(r"^(\[[^\]]*\]\s+)?RUN\s+--mount=\S*(?:/tmp/dockyard-spec|/opt/dockyard/tool|/opt/dockyard/uv)")


def _display_name(name: str) -> str:
    """dockyard's own install steps by what they do: their RUN lines are hundreds of characters."""
    m = _DOCKYARD_RUN.match(name)
    if not m:
        return name
    what = []
    if "conda_install.py" in name:
        what.append("conda packages")
    if "requirements.txt" in name:
        what.append("pip requirements")
    return f"{m.group(1) or ''}RUN (dockyard) install {' and '.join(what) or 'dependencies'}"


class _Vertex:
    __slots__ = ("cached", "completed", "error", "finished", "lines", "name", "partial", "raw", "started")

    def __init__(self) -> None:
        self.finished = False  # its completion was reported (BuildKit re-sends vertices)
        self.name = ""
        self.raw = ""  # the name as BuildKit sent it (name may be shortened for display)
        self.cached = False
        self.started = 0.0
        self.completed = 0.0
        self.error = ""
        self.lines: deque[str] = deque(maxlen=40)
        self.partial = ""


def _ts(value: object) -> float:
    return float(getattr(value, "seconds", 0)) + getattr(value, "nanos", 0) / 1e9


class _StatusTracker:
    """Merges the Status stream by vertex digest and turns it into :class:`BuildEvent`\\ s."""

    def __init__(self, on_event: Callable[[BuildEvent], None] | None) -> None:
        self.vertices: dict[str, _Vertex] = {}
        self._emit = on_event or (lambda _e: None)
        self.error: BaseException | None = None

    def feed(self, resp: object) -> None:
        for v in resp.vertexes:  # type: ignore[attr-defined]
            state = self.vertices.setdefault(v.digest, _Vertex())
            before = (state.started, state.completed, state.cached, state.error)
            if v.name:
                state.raw, state.name = v.name, _display_name(v.name)
            state.cached = state.cached or v.cached
            state.started = _ts(v.started) or state.started
            state.completed = _ts(v.completed) or state.completed
            state.error = v.error or state.error
            if (state.started, state.completed, state.cached, state.error) == before or not state.name:
                continue
            if state.name.startswith(("mkfile /", "mkdir /", "copy /", "docker-image://docker.io/dockyard/build-input:",
                                      "FROM docker.io/dockyard/build-input:", "FROM docker.io/dockyard/tool:")):
                continue  # dockyard's own FrontendInputs loaders: noise to a reader
            index, total = parse_step(state.name)
            if state.error:
                kind = "error"
            elif state.finished:
                continue
            elif state.completed or state.cached:
                kind = "cached" if state.cached else "done"
            elif state.started:
                kind = "started"
            else:
                continue
            state.finished = state.finished or kind in ("cached", "done")
            seconds = state.completed - state.started if state.completed and state.started else None
            self._emit(BuildEvent("step", state.name, kind, index, total, seconds=seconds))
        for log in resp.logs:  # type: ignore[attr-defined]
            state = self.vertices.setdefault(log.vertex, _Vertex())
            text = state.partial + log.msg.decode("utf-8", errors="replace").replace("\r\n", "\n")
            *complete, state.partial = text.split("\n")
            for line in complete:
                state.lines.append(line)
                index, total = parse_step(state.name)
                self._emit(BuildEvent("log", state.name, index=index, total=total, text=line))

    def failing(self) -> _Vertex | None:
        return next((v for v in self.vertices.values() if v.error), None)

    def counts(self) -> tuple[int, int]:
        steps = [v for v in self.vertices.values() if parse_step(v.name)[0] is not None]
        return len(steps), sum(1 for v in steps if v.cached)


class _HijackRelay:
    """Bridges grpcio's connections on a private unix socket to ``POST /grpc`` hijacks on the engine."""

    def __init__(self, engine: EngineClient) -> None:
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


def _read(path: str | None) -> bytes | None:
    if path is None:
        return None
    try:
        with open(path, "rb") as fh:
            return fh.read()
    except OSError as exc:
        raise InputError(f"cannot read TLS file {path}: {exc.strerror}") from exc


def _summarise(details: str) -> str:
    """The useful tail of BuildKit's wrapped Go error chain, without the failing command line
    itself (the step names it; a rendered install step is a thousand characters)."""
    ran = re.search(r"executor failed running \[.*\]: (.*)$", details, re.S)
    if ran:
        return f"its command failed: {ran.group(1)}"
    process = re.search(r'process ".*" did not complete successfully: (.*)$', details, re.S)
    if process:
        return f"its command did not complete successfully: {process.group(1)}"
    for marker in ("did not complete successfully: ", "dockerfile parse error "):
        if marker in details:
            return details[details.index(marker) :]
    return details.rsplit(": failed to solve: ", 1)[-1]


def _error_line(exc: grpc.RpcError, details: str) -> int | None:
    """The Dockerfile line from the message (v0.8) or the errdefs.Source detail (newer daemons)."""
    m = re.search(r"dockerfile parse error (?:on )?line (\d+)", details, re.I)
    if m:
        return int(m.group(1))
    try:
        from dockyard.proto import rpcstatus_pb2

        trailers = dict(exc.trailing_metadata() or ())  # type: ignore[attr-defined]
        raw = trailers.get("grpc-status-details-bin")
        if not raw:
            return None
        for detail in rpcstatus_pb2.RpcStatus.FromString(raw).details:
            if detail.type_url.endswith("errdefs.Source+json"):
                data = json.loads(detail.value)
                for rng in data.get("ranges") or []:
                    start = {k.lower(): v for k, v in (rng.get("start") or {}).items()}
                    if start.get("line"):
                        return int(start["line"])
    except (ValueError, AttributeError, TypeError):
        return None
    return None


def _instruction_line(dockerfile: str, step: str) -> int | None:
    """Find the line a step like ``[2/3] RUN pip install x`` came from."""
    instruction = _STEP.sub("", step).strip()
    if not instruction:
        return None
    joined: list[tuple[int, str]] = []
    start, buf = 0, ""
    for number, raw in enumerate(dockerfile.splitlines(), 1):
        if not buf:
            start = number
        if raw.rstrip().endswith("\\"):
            buf += raw.rstrip()[:-1] + " "
            continue
        joined.append((start, " ".join((buf + raw).split())))
        buf = ""
    wanted = " ".join(instruction.split())
    for number, text in joined:
        if text and (text == wanted or wanted.startswith(text) or text.startswith(wanted[:60])):
            return number
    return None


# What grpc-core says when the transport under a call breaks (the server never sends these).
_TRANSPORT_GONE = re.compile(
    r"stream removed|socket closed|connection reset|broken pipe|connection refused|failed to connect|"
    r"end of tcp stream|connection closed|transport is closing|goaway|rst_stream|unexpected eof",
    re.I,
)
# What only a build that ran and failed says (BuildKit's own error chain).
_BUILD_SAID = ("failed to solve", "executor failed running", "did not complete successfully", "dockerfile parse error")


def _stream_broke(code: grpc.StatusCode | None, details: str) -> bool:
    """Whether a Solve ended because the connection to the daemon broke, not because the build failed.

    UNAVAILABLE and CANCELLED (when we did not cancel) come from the transport or from the daemon
    shutting down; UNKNOWN/INTERNAL count only with grpc-core's own wording ("Stream removed").
    """
    if any(marker in details.lower() for marker in _BUILD_SAID):
        return False
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED):
        return True
    return code in (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL, None) and bool(_TRANSPORT_GONE.search(details))


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

    def __init__(
        self, target: str = "docker", *, engine: EngineClient | None = None, tls: TlsFiles | None = None
    ) -> None:
        self.target = target
        self._relay: _HijackRelay | None = None
        options = list(_CHANNEL_OPTIONS)
        if target == "docker":
            self._engine = engine or EngineClient.from_env()
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
        if tls is not None:
            if not target.startswith("tcp://"):
                raise InputError("TLS applies to tcp:// BuildKit targets only", hint=f"target was {target}")
            creds = grpc.ssl_channel_credentials(
                root_certificates=_read(tls.ca), private_key=_read(tls.key), certificate_chain=_read(tls.cert)
            )
            if tls.server_name:
                options.append(("grpc.ssl_target_name_override", tls.server_name))
            self._channel = grpc.secure_channel(dial, creds, options=options)
        else:
            self._channel = grpc.insecure_channel(dial, options=options)
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

    def solve(
        self,
        spec: SolveSpec,
        *,
        on_event: Callable[[BuildEvent], None] | None = None,
        cancel: threading.Event | None = None,
    ) -> SolveResult:
        """Run one dockerfile.v0 build and follow it on the Status stream.

        Ctrl-C (``KeyboardInterrupt``) or setting ``cancel`` cancels the solve on the daemon
        before the exception propagates.

        Raises:
            BuildError: the build failed (step, exit code, log tail, Dockerfile line attached).
            BuildKitUnavailable, EngineUnavailable: the daemon could not be reached, or the
                connection to it broke during the build (the engine went away).
        """
        from dockyard.proto import control_pb2

        ref = f"dockyard-{uuid.uuid4().hex}"
        attrs = {"filename": "Dockerfile", **spec.frontend_attrs}
        imports = [{"Type": "registry", "Attrs": {"ref": r}} for r in spec.cache_from]
        if imports:  # the frontend reads its imports from this attr; the Go client sends both forms
            attrs["cache-imports"] = json.dumps(imports)
        request = control_pb2.SolveRequest(
            Ref=ref,
            Frontend="dockerfile.v0",
            FrontendAttrs=attrs,
            Exporter=spec.exporter,  # daemons < v0.13 read only these two fields …
            ExporterAttrs=dict(spec.exporter_attrs),
            FrontendInputs={
                "dockerfile": files_definition({"Dockerfile": spec.dockerfile}),
                "context": (context_definition(spec.context_image, spec.context_blobs) if spec.context_image
                            else files_definition(spec.context)),
            },
        )
        # … newer ones read the list; the official client sends both.
        request.Exporters.add(Type=spec.exporter, Attrs=dict(spec.exporter_attrs))
        for entry in imports:
            request.Cache.Imports.add(Type=entry["Type"], Attrs=entry["Attrs"])
        if spec.inline_cache:
            request.Cache.Exports.add(Type="inline")
        tracker = _StatusTracker(on_event)
        future = self._control.Solve.future(request)
        follower = threading.Thread(target=self._follow, args=(ref, tracker), name="dockyard-status", daemon=True)
        follower.start()
        try:
            while True:
                if cancel is not None and cancel.is_set():
                    raise KeyboardInterrupt
                try:
                    reply = future.result(timeout=0.2)
                    break
                except grpc.FutureTimeoutError:
                    continue
        except KeyboardInterrupt:
            future.cancel()  # cancels the job on the daemon: no half-exported image
            follower.join(timeout=2)
            raise
        except grpc.RpcError as exc:
            follower.join(timeout=5)
            ours = cancel is not None and cancel.is_set()
            raise self._build_error(exc, tracker, spec.dockerfile, cancelled_by_us=ours) from exc
        follower.join(timeout=5)
        steps, cached = tracker.counts()
        return SolveResult(dict(reply.ExporterResponse), steps, cached)

    def _follow(self, ref: str, tracker: _StatusTracker) -> None:
        from dockyard.proto import control_pb2

        try:
            for resp in self._control.Status(control_pb2.StatusRequest(Ref=ref)):
                tracker.feed(resp)
        except grpc.RpcError as exc:
            tracker.error = exc  # progress is best-effort; the Solve result decides success
        except Exception as exc:  # noqa: BLE001 - a renderer bug must not hide the build result
            tracker.error = exc

    def _build_error(
        self, exc: grpc.RpcError, tracker: _StatusTracker, dockerfile: bytes, *, cancelled_by_us: bool = False
    ) -> DockyardError:
        code = exc.code() if hasattr(exc, "code") else None
        if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED) and not tracker.vertices:
            return self._translate(exc, "Solve")
        details = (exc.details() if hasattr(exc, "details") else "") or str(exc)
        if not cancelled_by_us and _stream_broke(code, details):
            return self._went_away(details)
        text = dockerfile.decode(errors="replace")
        failing = tracker.failing()
        step = failing.name if failing else ""
        exit_match = re.search(r"exit code: (\d+)", (failing.error if failing else "") + " " + details)
        line = _error_line(exc, details) or (_instruction_line(text, failing.raw) if failing and step else None)
        tail = "\n".join(failing.lines) if failing else ""
        if failing and failing.partial:
            tail = f"{tail}\n{failing.partial}".strip("\n")
        # dockyard's uv step says what went wrong in one tagged line (the resolver's own words).
        said = [t for t in tail.splitlines() if t.startswith("dockyard-uv: ")]
        summary = said[-1] if said else _summarise(details)
        # A rendered RUN line is long (the install steps): the message names it short; the full
        # step stays in .step, its Dockerfile line and the last output lines come as details.
        named = step if len(step) <= 100 else step[:99].rstrip() + "…"
        message = f"build failed at {named}: {summary}" if step else f"build failed: {summary}"
        return BuildError(
            message,
            step=step,
            exit_code_of_step=int(exit_match.group(1)) if exit_match else None,
            log_tail=tail,
            dockerfile_line=line,
            dockerfile=text,
            hint="see the step's last lines above; `dockyard env render FILE` shows the Dockerfile",
        )

    def _went_away(self, details: str) -> DockyardError:
        """The error for a build whose connection to the daemon broke half-way (not the build's fault)."""
        what = f"grpc: {details.strip() or 'connection lost'}"
        again = "then build again: the steps BuildKit finished are cached, and nothing was recorded"
        if self._relay is None:
            return BuildKitUnavailable(
                f"BuildKit at {self.target} went away during the build ({what})",
                hint=f"check that buildkitd runs, {again}",
            )
        try:
            self._engine.ping()
        except EngineUnavailable:
            down = EngineUnavailable(self._engine.url, f"the Docker Engine went away during the build ({what})")
            down.hint = f"start it again (`bash scripts/setup-engine` or `systemctl start docker`), {again}"
            return down
        return BuildKitUnavailable(
            f"the Docker Engine at {self._engine.url} went away during the build ({what}) and answers again now",
            hint=f"it restarted or dropped the connection; {again}",
        )

    def disk_usage(self, timeout: float = 30.0) -> list[dict[str, object]]:
        """``Control.DiskUsage``: BuildKit's cache records (id, size, in use, description)."""
        from dockyard.proto import control_pb2

        try:
            reply = self._control.DiskUsage(control_pb2.DiskUsageRequest(), timeout=timeout)
        except grpc.RpcError as exc:
            raise self._translate(exc, "DiskUsage") from exc
        return [
            {"id": r.ID, "size": r.Size, "in_use": r.InUse, "description": r.Description, "type": r.RecordType}
            for r in reply.record
        ]

    def prune(self, *, keep_bytes: int = 0, keep_seconds: float = 0, all_records: bool = False) -> int:
        """``Control.Prune``: drop BuildKit cache records; returns the bytes freed."""
        from dockyard.proto import control_pb2

        request = control_pb2.PruneRequest(
            all=all_records, keepBytes=keep_bytes, keepDuration=int(keep_seconds * 1e9)
        )
        try:
            return sum(r.Size for r in self._control.Prune(request, timeout=600))
        except grpc.RpcError as exc:
            raise self._translate(exc, "Prune") from exc

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
