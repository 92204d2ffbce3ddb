"""Source snapshots for runs: a run's source directory, content-addressed on disk.

Azure ML's ``ScriptRunConfig`` snapshots ``source_directory`` when a run is submitted, so the run
sees the code as it was then, not as it is when a GPU frees up. dockyard does the same with plain
files (nothing is baked into an image)::

    root/blobs/ab/ab12…            each distinct file content once, named by its XXH3-128
    root/manifests/<id>.json       one snapshot: path -> blob, size, mode; links; directories

The manifest is canonical JSON and the id is the XXH3-128 of its bytes, so identical trees give
the same id and the same manifest file, and identical files in any number of snapshots share a blob.

Every write is a temp file in the target's own folder, then ``os.replace``: another process (two
submits of the same tree at once) or a reader never sees half a blob or half a manifest, and two
writers of the same name write the same bytes. Nothing is fsynced (as with the cache index, a write
lost in a power cut costs a re-snapshot); reads verify instead: a manifest must hash to its id, a
blob to its name, and ``take`` rewrites a stored blob whose size is wrong.
"""

from __future__ import annotations

import json
import os
import posixpath
import re
import secrets
import shutil
import stat
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import xxhash

from .._units import human_bytes
from ..errors import EnvironmentProblem, InputError, SnapshotTooLarge

if TYPE_CHECKING:  # pragma: no cover
    from pathspec import GitIgnoreSpec

__all__ = ["DEFAULT_MAX_BYTES", "MAX_MB_ENV", "Snapshot", "SnapshotStore"]

DEFAULT_MAX_BYTES = 100 * 1024**2
MAX_MB_ENV = "DOCKYARD_SNAPSHOT_MAX_MB"

_SCHEMA = 1
_CHUNK = 1024 * 1024
_ID = re.compile(r"[0-9a-f]{32}\Z")
_LARGEST_SHOWN = 5
# Azure ML's rule: .amlignore if the source root has one, else .gitignore. The choice is made once,
# at the root, and the same file name is then honoured in every subdirectory too.
_IGNORE_FILES = (".amlignore", ".gitignore")


@dataclass(frozen=True)
class Snapshot:
    """One stored snapshot.

    Attributes:
        id: 32 lowercase hex, the XXH3-128 of the manifest (identical trees, identical id).
        files: regular files captured.
        total_bytes: their sizes added up.
        skipped: relative paths seen but not captured: symlinks resolving outside the source
            directory, and special files (sockets, FIFOs, devices). Ignored paths are not listed.
        links: symlinks captured (as links, with their relative target).
    """

    id: str
    files: int
    total_bytes: int
    skipped: tuple[str, ...] = ()
    links: int = 0

    def to_json(self) -> dict[str, object]:
        return {
            "id": self.id,
            "files": self.files,
            "links": self.links,
            "total_bytes": self.total_bytes,
            "skipped": list(self.skipped),
        }


# -- ignore rules --------------------------------------------------------------------------------


class _Rules:
    """The ignore files in force in one directory, outermost first, each with its folder prefix.

    Git's precedence: the deepest file with a matching pattern decides, and within a file the last
    matching pattern does (so ``!keep.log`` after ``*.log`` re-includes). An ignored directory is
    never entered, so, as in git, nothing under it can be re-included.
    """

    def __init__(self, layers: tuple[tuple[str, GitIgnoreSpec], ...] = ()) -> None:
        self.layers = layers

    def add(self, prefix: str, spec: GitIgnoreSpec) -> _Rules:
        return _Rules((*self.layers, (prefix, spec)))

    def ignored(self, rel: str, *, is_dir: bool) -> bool:
        for prefix, spec in reversed(self.layers):
            sub = rel[len(prefix):]
            # "dir/" patterns match only directories: pathspec tells them apart by the slash.
            include = spec.check_file(sub + "/" if is_dir else sub).include
            if include is not None:
                return include
        return False


def _load_rules(path: str) -> GitIgnoreSpec | None:
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            lines = fh.read().splitlines()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise _read_error(path, exc) from exc
    # Imported only when an ignore file exists: pathspec costs a submit more than the snapshot.
    from pathspec import GitIgnoreSpec

    return GitIgnoreSpec.from_lines(lines)


# -- scanning ------------------------------------------------------------------------------------


@dataclass
class _Entry:
    path: str  # relative, "/"-separated
    kind: str  # "file" | "link" | "dir"
    size: int = 0
    executable: bool = False
    target: str = ""  # links only
    source: str = ""  # files only: where to read it


def _read_error(path: str, exc: OSError) -> InputError:
    return InputError(
        f"cannot read {path} for the snapshot: {exc.strerror or exc}",
        hint="fix its permissions, or exclude it with a pattern in .amlignore (or .gitignore)",
    )


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def _link_target(root: str, abs_link: str, rel: str) -> str | None:
    """The target to record for the symlink at ``rel``, or None when it resolves outside ``root``.

    A relative target that stays inside lexically is kept as written; anything else that resolves
    inside (an absolute path, ``../src/x`` through the root's own name) is rewritten relative to
    the link, so it still points at the same file once materialized elsewhere.
    """
    literal = os.readlink(abs_link)
    real = os.path.realpath(abs_link)
    if not _inside(real, root):
        return None
    parent = posixpath.dirname(rel)
    if not os.path.isabs(literal):
        lexical = posixpath.normpath(posixpath.join(parent, literal))
        if lexical != ".." and not lexical.startswith("../"):
            return literal
    # Directory symlinks are never entered, so the link's folder is really root/parent.
    return os.path.relpath(real, os.path.join(root, parent)).replace(os.sep, "/")


def _scan(root: str, ignore_name: str | None) -> tuple[list[_Entry], list[str]]:
    """Stat every path to capture (no content read yet): entries sorted by path, and skipped."""
    entries: list[_Entry] = []
    skipped: list[str] = []
    stack: list[tuple[str, str, _Rules]] = [(root, "", _Rules())]
    while stack:
        folder, prefix, rules = stack.pop()
        if ignore_name:
            spec = _load_rules(os.path.join(folder, ignore_name))
            if spec is not None:
                rules = rules.add(prefix, spec)
        try:
            with os.scandir(folder) as it:
                children = sorted(it, key=lambda e: e.name)
        except OSError as exc:
            raise _read_error(folder, exc) from exc
        for child in children:
            if child.name == ".git":  # the repository, never the source (a folder, or a worktree's file)
                continue
            rel = prefix + child.name
            try:
                if child.is_symlink():
                    # git's view too: a link is a file, so "dir/" patterns do not match it.
                    if rules.ignored(rel, is_dir=False):
                        continue
                    target = _link_target(root, child.path, rel)
                    if target is None:
                        skipped.append(rel)
                    else:
                        entries.append(_Entry(rel, "link", target=target))
                elif child.is_dir(follow_symlinks=False):
                    if rules.ignored(rel, is_dir=True):
                        continue
                    entries.append(_Entry(rel, "dir"))
                    stack.append((child.path, rel + "/", rules))
                elif rules.ignored(rel, is_dir=False):
                    continue
                elif child.is_file(follow_symlinks=False):
                    st = child.stat(follow_symlinks=False)
                    executable = bool(st.st_mode & 0o111)
                    entries.append(_Entry(rel, "file", st.st_size, executable, source=child.path))
                else:
                    skipped.append(rel)  # socket, FIFO, device: no content to copy
            except OSError as exc:
                raise _read_error(child.path, exc) from exc
    entries.sort(key=lambda e: e.path)
    skipped.sort()
    return entries, skipped


def _open_regular(path: str) -> BinaryIO:
    """Open a scanned file for reading, refusing one swapped for a link or a FIFO since the scan."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise InputError(f"{path} changed while it was being snapshotted", hint="take the snapshot again")
    return os.fdopen(fd, "rb")


def _chunks(fh: BinaryIO) -> Iterator[bytes]:
    while chunk := fh.read(_CHUNK):
        yield chunk


def _budget(max_bytes: int | None) -> int:
    if max_bytes is not None:
        if max_bytes < 0:
            raise InputError(f"max_bytes must be >= 0, not {max_bytes}")
        return max_bytes
    raw = os.environ.get(MAX_MB_ENV, "").strip()
    if not raw:
        return DEFAULT_MAX_BYTES
    try:
        mib = float(raw)
    except ValueError:
        mib = -1.0
    if not mib >= 0:  # also refuses NaN
        raise InputError(
            f"{MAX_MB_ENV}={raw!r} is not a number of MiB",
            hint=f"set it to e.g. 500, or unset it for the {DEFAULT_MAX_BYTES // 1024**2} MiB default",
        )
    return int(mib * 1024**2)


def _too_large(
    source: Path, entries: list[_Entry], total: int, budget: int, ignore_name: str | None
) -> SnapshotTooLarge:
    files = sorted((e for e in entries if e.kind == "file"), key=lambda e: (-e.size, e.path))
    largest = tuple((e.path, e.size) for e in files[:_LARGEST_SHOWN])
    shown = ", ".join(f"{path} ({human_bytes(size)})" for path, size in largest)
    if ignore_name == ".amlignore":
        where = f"add patterns to {source / '.amlignore'}"
    else:
        where = (
            f"add patterns to {source / '.amlignore'} (which then replaces .gitignore for snapshots) "
            f"or to {source / '.gitignore'}"
        )
    return SnapshotTooLarge(
        f"source directory {source} holds {human_bytes(total)} ({total} bytes) to snapshot, over the budget of "
        f"{human_bytes(budget)} ({budget} bytes); largest files: {shown}",
        hint=f"exclude what the run does not need: {where}, e.g. `data/` or `*.ckpt`; "
        f"or raise the budget with {MAX_MB_ENV}=<MiB> (or take(..., max_bytes=...))",
        source=str(source),
        total_bytes=total,
        max_bytes=budget,
        largest=largest,
    )


# -- the store -----------------------------------------------------------------------------------


class SnapshotStore:
    """Content-addressed snapshots under ``root`` (created on first write)."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self._blobs = self.root / "blobs"
        self._manifests = self.root / "manifests"

    def take(self, source_dir: str | os.PathLike[str], *, max_bytes: int | None = None) -> Snapshot:
        """Snapshot ``source_dir`` and return it (an identical tree returns the existing snapshot).

        Honours ``.amlignore`` in the root of ``source_dir``, else ``.gitignore``, with gitignore
        semantics, nested files of the same name included; always skips ``.git``. Symlinks are
        never followed: one resolving inside is recorded as a link, one resolving outside is
        listed in ``skipped``. The budget is checked on sizes alone, before anything is written.

        Args:
            source_dir: the directory to capture.
            max_bytes: the budget for the files' total size; default ``DOCKYARD_SNAPSHOT_MAX_MB``
                MiB when that is set, else 100 MiB.

        Raises:
            SnapshotTooLarge: the files to capture add up to more than the budget (nothing written).
            InputError: ``source_dir`` is missing or not a directory, a path in it cannot be read,
                or the budget is invalid.
            EnvironmentProblem: the store cannot be written (disk full, permissions).
        """
        budget = _budget(max_bytes)
        source = Path(source_dir)
        if not source.is_dir():
            what = "does not exist" if not source.exists() else "is not a directory"
            raise InputError(f"source directory {source} {what}", hint="pass the folder holding the run's script")
        root = os.path.realpath(source)
        ignore_name = next((n for n in _IGNORE_FILES if os.path.isfile(os.path.join(root, n))), None)
        entries, skipped = _scan(root, ignore_name)

        total = sum(e.size for e in entries if e.kind == "file")
        if total > budget:
            raise _too_large(source, entries, total, budget, ignore_name)

        # New blobs and the manifest are written to temp files first and published together at the
        # end (renames need no space): a take that fails (a full disk) leaves no orphan blob behind.
        staged: list[tuple[Path, Path]] = []
        try:
            records: list[dict[str, Any]] = []
            for entry in entries:
                if entry.kind == "file":
                    blob, size = self._store_blob(entry, staged)
                    mode = "755" if entry.executable else "644"
                    records.append({"path": entry.path, "type": "file", "blob": blob, "size": size, "mode": mode})
                elif entry.kind == "link":
                    records.append({"path": entry.path, "type": "link", "target": entry.target})
                else:
                    records.append({"path": entry.path, "type": "dir"})
            body = {"schema": _SCHEMA, "entries": records, "skipped": skipped}
            data = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()
            snapshot_id = xxhash.xxh3_128_hexdigest(data)
            manifest = self._manifests / f"{snapshot_id}.json"
            manifest_tmp = None if self._holds(manifest, data) else self._write_tmp(manifest.parent, [data], 0o444)
        except BaseException:
            for tmp, _final in staged:
                tmp.unlink(missing_ok=True)
            raise
        for tmp, final in staged:
            self._publish(tmp, final)
        if manifest_tmp is not None:
            self._publish(manifest_tmp, manifest)
        return _summary(snapshot_id, body)

    def get(self, snapshot_id: str) -> Snapshot:
        """The snapshot stored under ``snapshot_id``.

        Raises:
            InputError: not an id, no such snapshot here, or its manifest is damaged.
        """
        return _summary(snapshot_id, self._load(snapshot_id))

    def ids(self) -> list[str]:
        """Every snapshot id in the store, sorted."""
        try:
            names = os.listdir(self._manifests)
        except FileNotFoundError:
            return []
        return sorted(n[:-5] for n in names if n.endswith(".json") and _ID.match(n[:-5]))

    def collect(self, keep: set[str], *, min_age_s: float = 3600.0) -> tuple[int, int]:
        """Remove snapshots not in ``keep`` (the ids runs still name) and the blobs only they used.

        Anything younger than ``min_age_s`` stays: a submit writes its snapshot before its run row,
        and a snapshot being taken writes blobs before its manifest.

        Returns:
            (snapshots removed, bytes freed).
        """
        now = time.time()
        removed, freed = 0, 0
        for snapshot_id in self.ids():
            path = self._manifests / f"{snapshot_id}.json"
            try:
                young = now - path.stat().st_mtime < min_age_s
            except OSError:
                continue
            if snapshot_id in keep or young:
                continue
            path.unlink(missing_ok=True)
            removed += 1
        used: set[str] = set()
        for snapshot_id in self.ids():
            try:
                body = self._load(snapshot_id)
            except InputError:
                continue  # a damaged manifest: its blobs stay (doctor's business, not GC's)
            used.update(e["blob"] for e in body["entries"] if e.get("type") == "file")
        if not self._blobs.is_dir():
            return removed, freed
        for folder in self._blobs.iterdir():
            for blob in folder.iterdir() if folder.is_dir() else ():
                try:
                    st = blob.stat()
                except OSError:
                    continue
                if blob.name in used or now - st.st_mtime < min_age_s:
                    continue
                blob.unlink(missing_ok=True)
                freed += st.st_size
        return removed, freed

    def materialize(self, snapshot_id: str, dest: str | os.PathLike[str]) -> Path:
        """Recreate the snapshot's tree in ``dest`` (created if absent) and return ``dest``.

        Files are copies, never links into the store, so a run writing into its working directory
        cannot change a snapshot; each copy is checked against its blob's hash. Exec bits and
        symlinks are restored; modification times are not (as with git).

        Raises:
            InputError: unknown or damaged snapshot, or ``dest`` is not an empty or absent folder.
            EnvironmentProblem: ``dest`` cannot be written.
        """
        body = self._load(snapshot_id)
        out = Path(dest)
        if out.exists() or out.is_symlink():
            if not out.is_dir():
                raise InputError(f"cannot materialize snapshot {snapshot_id} into {out}: it is not a directory")
            if any(out.iterdir()):
                raise InputError(
                    f"cannot materialize snapshot {snapshot_id} into {out}: the folder is not empty",
                    hint="pass an empty or absent folder",
                )
            created = False
        else:
            created = True
        try:
            out.mkdir(parents=True, exist_ok=True)
            links = []
            for record in body["entries"]:
                path = _safe_path(snapshot_id, record["path"])
                if record["type"] == "dir":
                    (out / path).mkdir(exist_ok=True)
                elif record["type"] == "file":
                    self._copy_blob(snapshot_id, record, out / path)
                else:
                    links.append((out / path, record["target"]))
            # Links last, so no file is ever written through one.
            for at, target in links:
                os.symlink(target, at)
        except BaseException as exc:
            if created:
                shutil.rmtree(out, ignore_errors=True)
            elif out.is_dir():
                for child in out.iterdir():
                    if child.is_dir() and not child.is_symlink():
                        shutil.rmtree(child, ignore_errors=True)
                    else:
                        child.unlink(missing_ok=True)
            if isinstance(exc, OSError):
                raise EnvironmentProblem(
                    f"cannot materialize snapshot {snapshot_id} into {out}: {exc.strerror or exc}",
                    hint="check free space and permissions there",
                ) from exc
            raise
        return out

    # -- internals ---------------------------------------------------------------------------------

    def _blob_path(self, digest: str) -> Path:
        return self._blobs / digest[:2] / digest

    def _store_blob(self, entry: _Entry, staged: list[tuple[Path, Path]]) -> tuple[str, int]:
        """Stage one file's content unless an equal blob is there; return (hash, size) of what is stored.

        A new blob is written to a temp file and appended to ``staged`` as (temp, final path).
        """
        try:
            with _open_regular(entry.source) as fh:
                hasher = xxhash.xxh3_128()
                size = 0
                for chunk in _chunks(fh):
                    hasher.update(chunk)
                    size += len(chunk)
        except OSError as exc:
            raise _read_error(entry.source, exc) from exc
        digest = hasher.hexdigest()
        try:
            if os.stat(self._blob_path(digest)).st_size == size:
                return digest, size  # the common case: an unchanged file of an earlier snapshot
        except FileNotFoundError:
            pass
        # Copy, hashing what is copied: a file edited since the first read is stored as copied,
        # under the hash of the bytes really stored.
        hasher = xxhash.xxh3_128()
        size = 0
        try:
            fh = _open_regular(entry.source)
        except OSError as exc:
            raise _read_error(entry.source, exc) from exc

        def counted() -> Iterator[bytes]:
            nonlocal size
            try:
                for chunk in _chunks(fh):
                    hasher.update(chunk)
                    size += len(chunk)
                    yield chunk
            except OSError as exc:
                raise _read_error(entry.source, exc) from exc

        with fh:
            tmp = self._write_tmp(self._blobs, counted(), 0o444)
        digest = hasher.hexdigest()
        staged.append((tmp, self._blob_path(digest)))
        return digest, size

    def _holds(self, path: Path, data: bytes) -> bool:
        try:
            return path.read_bytes() == data
        except OSError:
            return False

    def _write_tmp(self, folder: Path, chunks: Any, mode: int) -> Path:
        """Write ``chunks`` to a fresh temp file in ``folder`` (same filesystem as its target)."""
        tmp = folder / f".tmp-{os.getpid()}-{secrets.token_hex(6)}"
        try:
            folder.mkdir(parents=True, exist_ok=True)
            with open(tmp, "xb") as out:
                for chunk in chunks:
                    out.write(chunk)
            os.chmod(tmp, mode)
        except OSError as exc:  # reading the source is translated where it is read, so this is the store
            tmp.unlink(missing_ok=True)
            raise self._store_error(exc) from exc
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return tmp

    def _publish(self, tmp: Path, path: Path) -> None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp, path)  # atomic; a concurrent writer of the same name wrote the same bytes
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise self._store_error(exc) from exc

    def _store_error(self, exc: OSError) -> EnvironmentProblem:
        return EnvironmentProblem(
            f"cannot write the snapshot store at {self.root}: {exc.strerror or exc}",
            hint="free disk space there, or fix its permissions",
        )

    def _load(self, snapshot_id: str) -> dict[str, Any]:
        if not isinstance(snapshot_id, str) or not _ID.match(snapshot_id):
            raise InputError(f"{snapshot_id!r} is not a snapshot id", hint="ids are 32 lowercase hex digits")
        path = self._manifests / f"{snapshot_id}.json"
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise InputError(
                f"no snapshot {snapshot_id} in {self.root}", hint="SnapshotStore.ids() lists the ones stored"
            ) from None
        except OSError as exc:
            raise InputError(f"cannot read snapshot {snapshot_id}: {exc.strerror or exc}") from exc
        if xxhash.xxh3_128_hexdigest(data) != snapshot_id:
            raise _damaged(snapshot_id, f"its manifest {path} does not match its id")
        body: dict[str, Any] = json.loads(data)
        if body.get("schema") != _SCHEMA:
            raise InputError(f"snapshot {snapshot_id} has manifest schema {body.get('schema')}, not {_SCHEMA}")
        return body

    def _copy_blob(self, snapshot_id: str, record: dict[str, Any], to: Path) -> None:
        blob = self._blob_path(record["blob"])
        hasher = xxhash.xxh3_128()
        mode = 0o755 if record["mode"] == "755" else 0o644
        try:
            src = open(blob, "rb")
        except FileNotFoundError:
            raise _damaged(snapshot_id, f"blob {blob} of {record['path']} is missing") from None
        with src, open(os.open(to, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600), "wb") as out:
            for chunk in _chunks(src):
                hasher.update(chunk)
                out.write(chunk)
            os.fchmod(out.fileno(), mode)  # exactly 755/644, whatever the umask
        if hasher.hexdigest() != record["blob"]:
            raise _damaged(snapshot_id, f"blob {blob} of {record['path']} does not match its hash")


def _damaged(snapshot_id: str, why: str) -> InputError:
    return InputError(f"snapshot {snapshot_id} is damaged: {why}", hint="take the snapshot again from its source")


def _safe_path(snapshot_id: str, path: str) -> str:
    parts = path.split("/")
    if not path or path.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise _damaged(snapshot_id, f"its manifest holds the unsafe path {path!r}")
    return path


def _summary(snapshot_id: str, body: dict[str, Any]) -> Snapshot:
    files = [e for e in body["entries"] if e["type"] == "file"]
    return Snapshot(
        id=snapshot_id,
        files=len(files),
        total_bytes=sum(e["size"] for e in files),
        skipped=tuple(body["skipped"]),
        links=sum(1 for e in body["entries"] if e["type"] == "link"),
    )
