"""pip requirement lines that name local files: ``-r``, ``-c``, ``--find-links DIR``, wheel paths.

A build runs in BuildKit, which sees none of the host's files, so each local file a requirement
names travels with the build and the line is rewritten to where it lands:
``SPEC_MOUNT/files/<content hash>/<name>``. The content hash in that path puts the file's content
into the content key (editing a constraints file or replacing a wheel rebuilds) while the host path
does not (the same project in another folder hits). ``-r other.txt`` is inlined, as pip itself reads
it. Paths are relative to the file that names them (a requirements file), else to the environment
file's folder.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from .errors import SpecError

__all__ = ["SPEC_MOUNT", "LocalizedPip", "absolute_pip", "localize_pip", "read_requirements"]

#: Where a build's dependency files are mounted while they install (never an image layer).
SPEC_MOUNT = "/tmp/dockyard-spec"

_URL = re.compile(r"^[a-z][a-z0-9+.-]*://", re.I)
_ARCHIVE = (".whl", ".tar.gz", ".tgz", ".zip", ".tar.bz2")
_OPTION = re.compile(
    r"^(-r|--requirement|-c|--constraint|-f|--find-links|-e|--editable)(?:\s*=\s*|\s+)(\S.*)$"
)


@dataclass(frozen=True)
class LocalizedPip:
    """Lines as the build reads them, and the host files they need (spec path -> host path)."""

    lines: tuple[str, ...]
    files: dict[str, Path] = field(default_factory=dict)


def _is_local(value: str, base: Path) -> bool:
    if _URL.match(value):
        return value.lower().startswith("file:")
    if value.startswith((".", "/", "~")) or value.endswith(_ARCHIVE):
        return True
    return "/" in value and (base / value).exists()


def _host_path(value: str, base: Path) -> Path:
    if value.lower().startswith("file://"):
        value = value[len("file://"):]
    elif value.lower().startswith("file:"):
        value = value[len("file:"):]
    return (base / os.path.expanduser(value)).resolve()


def _digest(path: Path) -> str:
    """XXH3-128 (first 16 hex) of a file, or of a folder's files (names, modes, contents)."""
    from xxhash import xxh3_128

    h = xxh3_128()
    if path.is_file():
        with open(path, "rb") as fh:
            while chunk := fh.read(1 << 20):
                h.update(chunk)
        return h.hexdigest()[:16]
    for folder, dirs, files in os.walk(path):
        dirs.sort()
        for name in sorted(files):
            full = Path(folder, name)
            h.update(f"{full.relative_to(path)}\0{full.stat().st_mode & 0o7777:o}\0".encode())
            with open(full, "rb") as fh:
                while chunk := fh.read(1 << 20):
                    h.update(chunk)
    return h.hexdigest()[:16]


def read_requirements(path: Path) -> list[str]:
    """The lines of a requirements file (comments and blank lines dropped), with ``-r`` inlined
    and every local path made absolute, so they mean the same wherever they are read.

    Raises:
        SpecError: the file, or a file it names, is missing (with the line that names it).
    """
    return _read(path.resolve(), seen=())


def _read(path: Path, seen: tuple[Path, ...]) -> list[str]:
    if path in seen:
        raise SpecError(f"requirements files include each other: {' -> '.join(str(p) for p in (*seen, path))}",
                        path=str(seen[-1]), hint="remove one of the -r lines")
    try:
        text = path.read_text()
    except FileNotFoundError as exc:
        where = str(seen[-1]) if seen else None
        raise SpecError(f"requirements file {str(path)!r} not found", path=where or str(path),
                        hint="check the path (relative paths start from the file that names them)") from exc
    except OSError as exc:
        raise SpecError(f"cannot read requirements file: {exc.strerror}", path=str(path)) from exc
    out: list[str] = []
    base = path.parent
    for number, raw in enumerate(text.replace("\\\n", "").splitlines(), start=1):
        line = re.sub(r"(^|\s)#.*$", "", raw).strip()
        if not line:
            continue
        out.extend(_absolute(line, base, where=str(path), line_no=number, seen=(*seen, path)))
    return out


def _absolute(line: str, base: Path, *, where: str | None, line_no: int | None,
              seen: tuple[Path, ...] = ()) -> list[str]:
    """One line with ``-r`` inlined and local paths made absolute (checked to exist)."""
    m = _OPTION.match(line)
    if m:
        opt, value = m.group(1), m.group(2).strip()
        if opt in ("-r", "--requirement"):
            return _read(_host_path(value, base), seen or ((Path(where),) if where else ()))
        if opt in ("-e", "--editable") and _is_local(value, base):
            raise SpecError(
                f"editable install {value!r} cannot be part of an image (its source is not in the image)",
                path=where, line=line_no, field="python.pip_requirements",
                hint=f"install it normally: write {value!r} without -e, or mount the source at run time",
            )
        if opt in ("-c", "--constraint") and (not _URL.match(value) or value.lower().startswith("file:")):
            return [f"{opt} {_existing(value, base, where, line_no)}"]  # always a file, however it is named
        if opt in ("-f", "--find-links") and (_is_local(value, base) or (base / value).is_dir()):
            return [f"{opt} {_existing(value, base, where, line_no)}"]
        return [line]
    if line.startswith("-"):
        return [line]
    name, at, url = line.partition(" @ ")
    if at and url.strip().lower().startswith("file:"):
        return [f"{name} @ file://{_existing(url.strip(), base, where, line_no)}"]
    if _is_local(line.split(";")[0].split("[")[0].strip(), base):
        target, marker = (line.split(";", 1) + [""])[:2]  # noqa: RUF005
        extras = ""
        if "[" in target and target.rstrip().endswith("]"):
            target, extras = target.split("[", 1)
            extras = "[" + extras
        path = _existing(target.strip(), base, where, line_no)
        return [f"{path}{extras}" + (f"; {marker.strip()}" if marker.strip() else "")]
    return [line]


def _existing(value: str, base: Path, where: str | None, line_no: int | None) -> Path:
    path = _host_path(value, base)
    if not path.exists():
        raise SpecError(
            f"{value!r} does not exist", path=where, line=line_no, field="python.pip_requirements",
            hint=f"looked for {path}; relative paths start from the file that names them",
        )
    return path


def absolute_pip(lines: list[str] | tuple[str, ...], base: Path, *, where: str | None) -> list[str]:
    """``lines`` with ``-r`` inlined and local paths made absolute (relative ones start at ``base``).

    Raises:
        SpecError: a named file is missing, or is an editable install.
    """
    return [out for raw in lines if raw.strip() for out in _absolute(raw.strip(), base, where=where, line_no=None)]


def localize_pip(lines: list[str] | tuple[str, ...], base: Path, *, where: str | None) -> LocalizedPip:
    """The lines as a build reads them: host paths replaced by ``SPEC_MOUNT/files/<hash>/<name>``.

    Raises:
        SpecError: a named file is missing, or is an editable install.
    """
    out: list[str] = []
    files: dict[str, Path] = {}

    def place(path: Path) -> str:
        rel = f"files/{_digest(path)}/{path.name}"
        files[rel] = path
        return f"{SPEC_MOUNT}/{rel}"

    for raw in lines:
        for line in _absolute(raw.strip(), base, where=where, line_no=None):
            m = _OPTION.match(line)
            if m and m.group(1) in ("-c", "--constraint", "-f", "--find-links") and m.group(2).startswith("/"):
                out.append(f"{m.group(1)} {place(Path(m.group(2)))}")
                continue
            name, at, url = line.partition(" @ file://")
            if at:
                out.append(f"{name} @ file://{place(Path(url))}")
                continue
            if line.startswith("/"):
                target, _, rest = line.partition(";")
                extras = ""
                if "[" in target:
                    target, extras = target.split("[", 1)
                    extras = "[" + extras
                localized = place(Path(target.strip())) + extras
                out.append(localized + (f";{rest}" if rest else ""))
                continue
            out.append(line)
    return LocalizedPip(tuple(out), files)
