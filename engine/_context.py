"""A Dockerfile's build context: which files it sends, what they hash to, how they travel.

Only the files a Dockerfile can read go into the key and into the build: the sources of its
``COPY``/``ADD`` lines and of its ``RUN --mount=type=bind`` lines (without ``from=``), after
``.dockerignore``. So a Dockerfile kept next to the training script does not rebuild when the script
changes, and a context folder holding 50 GB of data the Dockerfile never copies costs nothing. When a
source cannot be known before the build (``COPY $DIR``, ``ONBUILD``), the whole context is used.

``.dockerignore`` follows Docker's rules (moby's patternmatcher): one pattern per line, ``#``
comments, ``!`` exceptions, the last matching line wins, ``*`` and ``?`` never cross ``/``, ``**``
matches any number of folders, and a pattern that matches a folder excludes everything inside it.

The digest covers, per selected entry in path order: the kind, the path, the permission bits and
the content (XXH3-128), or a symlink's target. Owners and times are not in it: BuildKit's own cache
ignores them too.
"""

from __future__ import annotations

import os
import re
import stat
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ._units import binary_size, human_bytes
from .errors import SpecError

__all__ = [
    "DEFAULT_MAX_CONTEXT",
    "BuildContext",
    "ContextEntry",
    "IgnoreRules",
    "collect_context",
    "dockerfile_sources",
    "max_context_bytes",
]

#: The largest context dockerd is sent by default (``DOCKYARD_MAX_CONTEXT`` changes it).
DEFAULT_MAX_CONTEXT = 8 << 30
_CHUNK = 1 << 20


def max_context_bytes() -> int:
    """The context size limit: ``DOCKYARD_MAX_CONTEXT`` (``4g``, ``500m``, bytes) or 8 GiB."""
    raw = os.environ.get("DOCKYARD_MAX_CONTEXT")
    if not raw:
        return DEFAULT_MAX_CONTEXT
    size = binary_size(raw)
    if size is None:
        raise SpecError(f"DOCKYARD_MAX_CONTEXT={raw!r} is not a size", hint="write e.g. 4g, 500m or a number of bytes")
    return size


# -- patterns ---------------------------------------------------------------------------------------


def _translate(pattern: str) -> re.Pattern[str]:
    """A Docker path pattern as a regex over a slash-separated relative path."""
    out = ["^"]
    i, n = 0, len(pattern)
    while i < n:
        c = pattern[i]
        if c == "*":
            if i + 1 < n and pattern[i + 1] == "*":
                i += 2
                if i < n and pattern[i] == "/":
                    i += 1
                    out.append("(?:.*/)?")  # "**/" : zero or more folders
                else:
                    out.append(".*")  # a trailing "**" : everything below
                continue
            out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
        elif c == "\\" and i + 1 < n:
            i += 1
            out.append(re.escape(pattern[i]))
        elif c == "[":
            end = pattern.find("]", i + 1)
            if end < 0:
                out.append(re.escape(c))
            else:
                body = pattern[i + 1:end]
                if body.startswith("^") or body.startswith("!"):
                    body = "^" + body[1:]
                out.append("[" + body.replace("\\", "\\\\") + "]")
                i = end
        else:
            out.append(re.escape(c))
        i += 1
    out.append("$")
    return re.compile("".join(out))


def _clean(pattern: str) -> str:
    """Go's filepath.Clean for a relative slash path, without a leading slash."""
    parts: list[str] = []
    for part in pattern.split("/"):  # "\\" is the patterns' escape character on Linux, not a separator
        if part in ("", "."):
            continue
        if part == "..":
            if parts:
                parts.pop()
            continue
        parts.append(part)
    return "/".join(parts) or "."


@dataclass(frozen=True)
class IgnoreRules:
    """The patterns of a ``.dockerignore`` (Docker's semantics, see the module docstring)."""

    patterns: tuple[tuple[bool, str, re.Pattern[str]], ...] = ()  # (is an exception, text, regex)

    @classmethod
    def parse(cls, text: str) -> IgnoreRules:
        out = []
        for raw in text.splitlines():
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            invert = line.startswith("!")
            if invert:
                line = line[1:].strip()
            cleaned = _clean(line)
            if cleaned == ".":
                continue
            out.append((invert, cleaned, _translate(cleaned)))
        return cls(tuple(out))

    @property
    def has_exceptions(self) -> bool:
        return any(invert for invert, _, _ in self.patterns)

    def ignored(self, rel: str) -> bool:
        """True when ``rel`` (or a folder above it) is excluded, after the exceptions."""
        matched = False
        parents = rel.split("/")[:-1]
        for invert, _, regex in self.patterns:
            hit = bool(regex.match(rel))
            if not hit and parents:
                # A pattern naming a folder excludes what is inside it.
                hit = any(regex.match("/".join(parents[: k + 1])) for k in range(len(parents)))
            if hit:
                matched = not invert
        return matched


# -- what a Dockerfile reads from its context -------------------------------------------------------

_INSTRUCTION = re.compile(r"^\s*([A-Za-z]+)\s*(.*)$", re.S)
_URL = re.compile(r"^(?:[a-z][a-z0-9+.-]*://|git@)", re.I)


def _logical_lines(text: str) -> Iterator[str]:
    """Dockerfile lines with ``\\`` continuations joined and comment lines dropped."""
    current: list[str] = []
    for raw in text.splitlines():
        stripped = raw.strip()
        if stripped.startswith("#") and not current:
            continue
        if current and stripped.startswith("#"):
            continue  # comments inside a continued instruction are dropped, as Docker does
        if raw.rstrip().endswith("\\"):
            current.append(raw.rstrip()[:-1])
            continue
        current.append(raw)
        yield " ".join(current)
        current = []
    if current:
        yield " ".join(current)


def _args(rest: str) -> list[str]:
    rest = rest.strip()
    if rest.startswith("["):
        import json

        try:
            value = json.loads(rest)
            if isinstance(value, list) and all(isinstance(v, str) for v in value):
                return value
        except ValueError:
            pass
    return rest.split()


def dockerfile_sources(text: str) -> list[str] | None:
    """The context paths (patterns) a Dockerfile reads, or None when they cannot be known.

    An empty list means the Dockerfile reads nothing from its context.
    """
    sources: list[str] = []
    for line in _logical_lines(text):
        m = _INSTRUCTION.match(line)
        if not m:
            continue
        op, rest = m.group(1).upper(), m.group(2)
        if op == "ONBUILD":
            return None
        if op in ("COPY", "ADD"):
            words = rest.split()
            flags = []
            while words and words[0].startswith("--"):
                flags.append(words.pop(0))
            if any(f.startswith("--from") for f in flags):
                continue  # from another stage or image, not the context
            paths = _args(" ".join(words))[:-1]  # the last one is the destination
            for src in paths:
                if op == "ADD" and _URL.match(src):
                    continue
                if "$" in src:
                    return None
                sources.append(src)
        elif op == "RUN":
            for word in rest.split():
                if not word.startswith("--mount="):
                    if not word.startswith("--"):
                        break
                    continue
                opts = dict(
                    (kv.split("=", 1) + [""])[:2] for kv in word[len("--mount="):].split(",")  # noqa: RUF005
                )
                if opts.get("type", "bind") != "bind" or opts.get("from"):
                    continue
                src = opts.get("source") or opts.get("src") or "."
                if "$" in src:
                    return None
                sources.append(src)
    return [_clean(s.lstrip("/")) for s in sources]


def _segments_match(pattern: list[str], path: list[str]) -> bool:
    return all(_translate(p).match(s) for p, s in zip(pattern, path))


class _Selection:
    """Which context paths a list of Dockerfile sources selects (None: all of them)."""

    def __init__(self, sources: list[str] | None) -> None:
        self.all = sources is None or "." in sources
        self.sources = [] if self.all else [s.split("/") for s in sorted(set(sources or ()))]

    def selects(self, rel: str) -> bool:
        """``rel`` is a source, matches one, or is inside a folder that does."""
        if self.all:
            return True
        segs = rel.split("/")
        return any(len(s) <= len(segs) and _segments_match(s, segs[: len(s)]) for s in self.sources)

    def may_hold(self, rel: str) -> bool:
        """A folder ``rel`` may hold selected paths (or be one): worth walking into."""
        if self.all:
            return True
        segs = rel.split("/")
        return any(_segments_match(s[: len(segs)], segs[: len(s)]) for s in self.sources)


# -- the context ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ContextEntry:
    """One path the build receives: ``kind`` is ``f`` (file), ``d`` (folder) or ``l`` (symlink)."""

    rel: str
    kind: str
    mode: int
    size: int = 0
    target: str = ""
    content: str = ""  # XXH3-128 of a file's bytes


@dataclass(frozen=True)
class BuildContext:
    """The selected files of a context folder, with their digest (the key's ``context`` part)."""

    root: Path
    entries: tuple[ContextEntry, ...]
    digest: str
    size: int

    def write_tar(self, fileobj: object) -> None:
        """Stream the context as an uncompressed tar (owner root, times kept) into ``fileobj``."""
        with tarfile.open(fileobj=fileobj, mode="w|", format=tarfile.PAX_FORMAT) as tar:  # type: ignore[call-overload]
            for entry in self.entries:
                full = self.root / entry.rel
                info = tarfile.TarInfo(entry.rel)
                info.mode = entry.mode
                info.uid = info.gid = 0
                info.uname = info.gname = "root"
                try:
                    info.mtime = int(full.lstat().st_mtime)
                except OSError:
                    info.mtime = 0
                if entry.kind == "d":
                    info.type = tarfile.DIRTYPE
                    tar.addfile(info)
                elif entry.kind == "l":
                    info.type = tarfile.SYMTYPE
                    info.linkname = entry.target
                    tar.addfile(info)
                else:
                    info.size = entry.size
                    with open(full, "rb") as fh:
                        tar.addfile(info, fh)


def _file_hash(path: Path) -> str:
    from xxhash import xxh3_128

    h = xxh3_128()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def collect_context(
    root: Path,
    dockerfile: str,
    *,
    dockerfile_rel: str | None,
    where: str | None,
    field: str = "build",
    limit: int | None = None,
) -> BuildContext | None:
    """The part of the folder ``root`` that the Dockerfile text ``dockerfile`` reads.

    Args:
        root: the context folder.
        dockerfile: the Dockerfile's text (its COPY/ADD/RUN --mount sources select the files).
        dockerfile_rel: the Dockerfile's path inside ``root``, when it is inside.
        where: the file errors name (the environment file), if any.
        field: the environment field errors name.
        limit: the largest total size accepted (default: :func:`max_context_bytes`).

    Returns:
        None when the Dockerfile reads nothing from its context (the key then has no context part).

    Raises:
        SpecError: the folder is missing; ``.dockerignore`` excludes the Dockerfile; a file cannot
            be read; the selected files exceed the limit (the largest ones are listed).
    """
    from xxhash import xxh3_128

    if not root.is_dir():
        raise SpecError(f"build context {str(root)!r} is not a folder", path=where, field=field,
                        hint="give the folder that holds the Dockerfile and the files it copies")
    rules = IgnoreRules()
    ignore_file = root / ".dockerignore"
    if ignore_file.is_file():
        try:
            rules = IgnoreRules.parse(ignore_file.read_text(errors="replace"))
        except OSError as exc:
            raise SpecError(f"{ignore_file} cannot be read: {exc.strerror}", path=where, field=field) from exc
    if dockerfile_rel is not None and rules.ignored(dockerfile_rel):
        raise SpecError(
            f"{ignore_file} excludes the Dockerfile {dockerfile_rel!r}",
            path=where, field=field,
            hint=f"add a line `!{dockerfile_rel}` to .dockerignore, or remove the pattern that matches it",
        )
    sources = dockerfile_sources(dockerfile)
    if sources is not None and not sources:
        return None
    selection = _Selection(sources)
    limit = max_context_bytes() if limit is None else limit
    entries: list[ContextEntry] = []
    total = 0
    prune = not rules.has_exceptions  # an ignored folder can hold nothing un-ignored

    def walk(folder: Path, prefix: str) -> None:
        nonlocal total
        try:
            with os.scandir(folder) as it:
                items = sorted(it, key=lambda e: e.name)
        except OSError as exc:
            raise SpecError(f"cannot list {folder}: {exc.strerror}", path=where, field=field) from exc
        for item in items:
            rel = f"{prefix}{item.name}"
            try:
                st = item.stat(follow_symlinks=False)
            except OSError as exc:
                raise SpecError(f"cannot read {folder / item.name}: {exc.strerror}", path=where, field=field) from exc
            is_ignored = rules.ignored(rel)
            if stat.S_ISDIR(st.st_mode):
                if (is_ignored and prune) or not selection.may_hold(rel):
                    continue
                before = len(entries)
                walk(Path(item.path), rel + "/")
                if (not is_ignored and selection.selects(rel)) or len(entries) > before:
                    # A folder travels when selected, or to hold a selected path deeper down.
                    entries.insert(before, ContextEntry(rel, "d", stat.S_IMODE(st.st_mode)))
                continue
            if is_ignored or not selection.selects(rel):
                continue
            if stat.S_ISLNK(st.st_mode):
                entries.append(ContextEntry(rel, "l", 0o777, target=os.readlink(item.path)))
            elif stat.S_ISREG(st.st_mode):
                entries.append(ContextEntry(rel, "f", stat.S_IMODE(st.st_mode), st.st_size))
                total += st.st_size
            # Sockets, pipes and devices are not sent (Docker's client skips them too).

    walk(root, "")
    if total > limit:
        largest = sorted((e for e in entries if e.kind == "f"), key=lambda e: e.size, reverse=True)[:5]
        listing = ", ".join(f"{e.rel} ({human_bytes(e.size)})" for e in largest)
        raise SpecError(
            f"the build context {root} is {human_bytes(total)}, over the {human_bytes(limit)} limit; largest files: {listing}",
            path=where, field=field,
            hint="list what the image does not need in .dockerignore (data belongs in a mount or a Dataset), "
            "or raise DOCKYARD_MAX_CONTEXT",
        )
    h = xxh3_128()
    for i, e in enumerate(entries):
        if e.kind == "f":
            try:
                content = _file_hash(root / e.rel)
            except OSError as exc:
                raise SpecError(f"cannot read {root / e.rel}: {exc.strerror}", path=where, field=field) from exc
            entries[i] = e = ContextEntry(e.rel, e.kind, e.mode, e.size, content=content)
            h.update(f"f\0{e.rel}\0{e.mode:o}\0{content}\n".encode())
        elif e.kind == "l":
            h.update(f"l\0{e.rel}\0{e.target}\n".encode())
        else:
            h.update(f"d\0{e.rel}\0{e.mode:o}\n".encode())
    return BuildContext(root, tuple(entries), h.hexdigest(), total)
