"""How a build's files reach BuildKit without a session: in the request, or as an imported image.

Docker 20.10's BuildKit gets no local files from dockyard's session-less Solve, so every input
travels one of two ways (measured in ``benchmarks/context_transport.py``):

* **in the request** (``mkfile`` actions of one FileOp): no engine state, nothing to clean up, but a
  gRPC message is limited to ~4 MiB, so only small dependency files go this way (≤ 1 MiB);
* **as an image**: the files are streamed as a tar into ``POST /images/create?fromSrc=-`` (no size
  limit, constant memory) under a per-build tag, and the build reads it as a ``docker-image://``
  source, which the engine's BuildKit resolves from its own image store. The tag is removed when
  the build ends, whatever the outcome. A Dockerfile's context always goes this way (modes,
  symlinks and times are kept exactly as Docker's own context tar keeps them).

A context's large files (≥ ``BLOB_MIN`` bytes: weights, archives) each travel once, as their own
content-addressed image ``dockyard/build-input:blob-<hash>-<mode>``, kept for later builds and
copied into the context inside BuildKit. So a rebuild after editing a small file sends only the
small files — the way ``docker build``'s file-sync session sends only what changed — and BuildKit's
cache still recognises the unchanged large file's ``COPY``. ``dockyard cache gc`` removes blobs
unused for ``--keep-days``.
"""

from __future__ import annotations

import os
import queue
import threading
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from .._context import BuildContext
from ..dockerd import EngineClient

__all__ = ["BLOB_MIN", "INLINE_LIMIT", "SpecTree", "import_context", "import_tree", "input_tag", "tar_chunks"]

#: Dependency files up to this size travel inside the Solve request.
INLINE_LIMIT = 1 << 20
#: Context files this large travel as their own reusable image.
BLOB_MIN = 8 << 20
_REPO = "dockyard/build-input"


def input_tag(key_hex: str, what: str) -> str:
    """A tag no other build uses: builds of other keys may share content, never a tag."""
    return f"{_REPO}:{key_hex[:16]}-{what}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


@dataclass(frozen=True)
class SpecTree:
    """Dependency files: relative path -> bytes, or a host file or folder."""

    items: Mapping[str, bytes | Path]

    def flat(self) -> dict[str, tuple[bytes | Path, int]]:
        """Every file as (content or host file, mode), folders expanded."""
        out: dict[str, tuple[bytes | Path, int]] = {}
        for rel, value in sorted(self.items.items()):
            if isinstance(value, bytes):
                out[rel] = (value, 0o644)
            elif value.is_dir():
                for folder, dirs, files in os.walk(value):
                    dirs.sort()
                    for name in sorted(files):
                        full = Path(folder, name)
                        out[f"{rel}/{full.relative_to(value)}"] = (full, full.stat().st_mode & 0o777)
            else:
                out[rel] = (value, value.stat().st_mode & 0o777)
        return out

    def size(self) -> int:
        return sum(len(v) if isinstance(v, bytes) else v.stat().st_size for v, _ in self.flat().values())

    def inline(self) -> dict[str, bytes] | None:
        """The files as bytes when they are small enough for the request, else None."""
        if self.size() > INLINE_LIMIT:
            return None
        return {rel: v if isinstance(v, bytes) else v.read_bytes() for rel, (v, _) in self.flat().items()}

    def write_tar(self, fileobj: object) -> None:
        import io
        import tarfile

        with tarfile.open(fileobj=fileobj, mode="w|", format=tarfile.PAX_FORMAT) as tar:  # type: ignore[call-overload]
            dirs: set[str] = set()
            for rel, (value, mode) in self.flat().items():
                parts = rel.split("/")[:-1]
                for i in range(1, len(parts) + 1):
                    d = "/".join(parts[:i])
                    if d not in dirs:
                        dirs.add(d)
                        info = tarfile.TarInfo(d)
                        info.type, info.mode = tarfile.DIRTYPE, 0o755
                        tar.addfile(info)
                info = tarfile.TarInfo(rel)
                info.mode = mode
                if isinstance(value, bytes):
                    info.size = len(value)
                    tar.addfile(info, io.BytesIO(value))
                else:
                    info.size = value.stat().st_size
                    with open(value, "rb") as fh:
                        tar.addfile(info, fh)


class _QueueWriter:
    """A write-only file object feeding a bounded queue: the tar is made while it is sent."""

    def __init__(self, q: queue.Queue[bytes | BaseException | None]) -> None:
        self._q = q

    def write(self, data: bytes) -> int:
        if data:
            self._q.put(bytes(data))
        return len(data)


def tar_chunks(write: object) -> Iterator[bytes]:
    """Chunks of the tar that ``write(fileobj)`` produces, made in a thread (memory stays flat)."""
    q: queue.Queue[bytes | BaseException | None] = queue.Queue(maxsize=64)

    def run() -> None:
        try:
            write(_QueueWriter(q))  # type: ignore[operator]
            q.put(None)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the consuming thread
            q.put(exc)

    thread = threading.Thread(target=run, name="dockyard-tar", daemon=True)
    thread.start()
    pending = bytearray()
    while True:
        item = q.get()
        if item is None:
            break
        if isinstance(item, BaseException):
            raise item
        pending += item
        if len(pending) >= 1 << 20:
            yield bytes(pending)
            pending.clear()
    if pending:
        yield bytes(pending)
    thread.join()


def import_tree(engine: EngineClient, tree: BuildContext | SpecTree, tag: str) -> str:
    """Import ``tree`` into the engine as the image ``tag``; returns its ID.

    Raises:
        EngineError, EngineUnavailable: the engine refused or went away.
        SpecError: a context file could not be read while it was sent.
    """
    from ._base_images import _import_rootfs

    return _import_rootfs(engine, tar_chunks(tree.write_tar), tag, ["LABEL dockyard.build-input=1"])


class _OneFile:
    """A tar holding one context file as ``/blob`` (its mode kept)."""

    def __init__(self, path: Path, mode: int, size: int) -> None:
        self.path, self.mode, self.size = path, mode, size

    def write_tar(self, fileobj: object) -> None:
        import tarfile

        with tarfile.open(fileobj=fileobj, mode="w|", format=tarfile.PAX_FORMAT) as tar:  # type: ignore[call-overload]
            info = tarfile.TarInfo("blob")
            info.mode, info.size, info.mtime = self.mode, self.size, int(self.path.stat().st_mtime)
            with open(self.path, "rb") as fh:
                tar.addfile(info, fh)


def import_context(engine: EngineClient, context: BuildContext, tag: str) -> tuple[tuple[str, str], ...]:
    """Import ``context`` as the image ``tag`` without its large files, and each large file as its
    blob image (skipped when the engine has it already). Returns the (blob image, path) pairs.

    Raises:
        EngineError, EngineUnavailable: the engine refused or went away.
    """
    from dataclasses import replace

    from ._base_images import _import_rootfs

    big = [e for e in context.entries if e.kind == "f" and e.size >= BLOB_MIN and e.content]
    blobs = []
    for entry in big:
        ref = f"{_REPO}:blob-{entry.content}-{entry.mode:o}"
        if engine.inspect_image(ref) is None:
            one = _OneFile(context.root / entry.rel, entry.mode, entry.size)
            _import_rootfs(engine, tar_chunks(one.write_tar), ref, ["LABEL dockyard.build-input=blob"])
        blobs.append((ref, entry.rel))
    skip = {e.rel for e in big}
    rest = replace(context, entries=tuple(e for e in context.entries if e.rel not in skip))
    _import_rootfs(engine, tar_chunks(rest.write_tar), tag, ["LABEL dockyard.build-input=1"])
    return tuple(blobs)
