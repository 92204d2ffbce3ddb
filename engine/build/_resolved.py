"""What a build resolved its requirements to: read from the image, kept as a label and in the index,
shown by ``dockyard env show`` and frozen into a lock by ``dockyard env lock``.

Unpinned requirements (``numpy``) are resolved once, by the build that first misses, and from then
on the cache serves that image: the versions are frozen silently (Azure ML has the same trap). So
every build records what it installed: the installing step writes ``/opt/dockyard/resolved/<key>.txt``
(``name==version`` lines under a header naming the installer), the builder reads it from the
image and puts it in the image's labels (``dockyard.resolved``, a JSON list;
``dockyard.installer``; ``dockyard.neighbour`` for a near miss) and in the index
(``ImageCache.record_packages``). A pulled image brings its labels along.
"""

from __future__ import annotations

import io
import json
import os
import re
import tarfile
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import EngineError, InputError

if TYPE_CHECKING:  # pragma: no cover
    from .._environment import Environment
    from ..dockerd import EngineClient
    from ._builder import Builder

__all__ = ["INSTALLERS", "EnvironmentReport", "LockReport", "Resolution", "installer_setting", "lock_environment",
           "parse_record", "read_image_file", "resolution_labels", "resolution_of", "show_environment"]

INSTALLERS = ("uv", "pip")
_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)(\[[^\]]*\])?\s*==\s*(\S+)$")


def installer_setting(environ: dict[str, str] | None = None) -> str:
    """``DOCKYARD_INSTALLER``: ``uv`` (the default) or ``pip`` (how dockyard installed before uv).

    Raises:
        InputError: another value.
    """
    raw = (os.environ if environ is None else environ).get("DOCKYARD_INSTALLER", "").strip().lower()
    if not raw:
        return "uv"
    if raw not in INSTALLERS:
        raise InputError(f"DOCKYARD_INSTALLER={raw!r} is not an installer dockyard knows",
                         hint="use DOCKYARD_INSTALLER=uv (the default) or DOCKYARD_INSTALLER=pip")
    return raw


def _normalize_line(line: str) -> str:
    """``Scikit_Learn==1.5`` -> ``scikit-learn==1.5``; other lines (``name @ url``) unchanged."""
    m = _PIN.match(line.strip())
    if not m:
        return " ".join(line.split())
    return f"{re.sub(r'[-_.]+', '-', m.group(1)).lower()}{m.group(2) or ''}=={m.group(3)}"


@dataclass(frozen=True)
class Resolution:
    """What one build installed.

    Attributes:
        installer: ``"uv 0.13.9"``, ``"pip"`` (and why, when uv could not be used).
        packages: ``name==version`` lines (names normalised), sorted.
        mode: ``venv``, ``near``, ``into`` (a conda prefix), or ``conda``/``""`` for pip's.
        neighbour: the key a near miss started from, else "".
        source: where this was read: ``index``, ``label`` or ``image``.
    """

    installer: str
    packages: tuple[str, ...]
    mode: str = ""
    neighbour: str = ""
    source: str = "image"
    note: str = field(default="", compare=False)

    def to_json(self) -> dict[str, Any]:
        return {"installer": self.installer, "packages": list(self.packages), "neighbour": self.neighbour or None,
                "source": self.source}

    def pins(self) -> dict[str, str]:
        """name -> version of the ``name==version`` lines."""
        out = {}
        for line in self.packages:
            m = _PIN.match(line)
            if m:
                out[m.group(1)] = m.group(3)
        return out


def parse_record(text: str, *, neighbour: str = "") -> Resolution:
    """A resolution file written by the installing step (see the module docstring)."""
    installer, mode, note, packages = "", "", "", []
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("#"):
            head, _, value = line.lstrip("# ").partition(":")
            if head == "installer":
                installer = value.strip()
            elif head == "mode":
                mode = value.strip()
            elif head == "note":
                note = value.strip()
        elif line:
            packages.append(_normalize_line(line))
    if installer == "pip" and note:
        installer = f"pip ({note})"
    return Resolution(installer or "unknown", tuple(sorted(set(packages), key=str.lower)), mode, neighbour, "image",
                      note)


def resolution_labels(resolution: Resolution) -> dict[str, str]:
    """The image labels that carry a resolution."""
    labels = {"dockyard.installer": resolution.installer, "dockyard.resolved": json.dumps(list(resolution.packages))}
    if resolution.neighbour:
        labels["dockyard.neighbour"] = resolution.neighbour
    return labels


def _from_labels(labels: dict[str, str]) -> Resolution | None:
    raw = labels.get("dockyard.resolved")
    if not raw:
        return None
    try:
        packages = json.loads(raw)
    except ValueError:
        return None
    if not isinstance(packages, list) or not all(isinstance(p, str) for p in packages):
        return None
    return Resolution(labels.get("dockyard.installer", "unknown"), tuple(packages),
                      neighbour=labels.get("dockyard.neighbour", ""), source="label")


def read_image_file(engine: EngineClient, image: str, path: str) -> bytes | None:
    """One file of an image, without running it: a container is created (never started), the file
    read through the archive endpoint, the container removed. None when the image lacks the file.

    Raises:
        EngineError, EngineUnavailable: the engine refused or went away.
    """
    body = json.dumps({"Image": image, "Cmd": ["/dockyard-never-runs"], "Entrypoint": [],
                       "NetworkDisabled": True, "Labels": {"dockyard.reader": "1"}}).encode()
    reply = engine.request("POST", "/containers/create", body=body, headers={"Content-Type": "application/json"})
    if reply.status != 201:
        raise EngineError(f"creating a container of {image} to read {path} answered HTTP {reply.status}",
                          status=reply.status)
    cid = str(reply.json()["Id"])
    try:
        query = urllib.parse.urlencode({"path": path})
        got = engine.request("GET", f"/containers/{cid}/archive?{query}", timeout=60)
        if got.status == 404:
            return None
        if got.status != 200:
            raise EngineError(f"reading {path} from {image} answered HTTP {got.status}", status=got.status)
        with tarfile.open(fileobj=io.BytesIO(got.body)) as tar:
            member = next((m for m in tar.getmembers() if m.isfile()), None)
            handle = tar.extractfile(member) if member is not None else None
            return handle.read() if handle is not None else None
    finally:
        engine.request("DELETE", f"/containers/{cid}?force=1")


def resolution_of(builder: Builder, key: str, image: str | None = None) -> Resolution | None:
    """What the build of ``key`` resolved: from the index, else from the image's labels (a pulled
    image, or one the index of another home built), else None (built before dockyard recorded it,
    or nothing was installed with pip or uv)."""
    record = builder.cache.packages(key)
    if record is not None:
        return Resolution(record.installer, record.packages, "", record.neighbour, "index")
    if image is None:
        return None
    labels = builder.engine.image_labels(image) or {}
    return _from_labels(labels)


@dataclass(frozen=True)
class LockReport:
    """What ``dockyard env lock`` wrote."""

    path: Path
    key: str
    image: str
    packages: tuple[str, ...]
    installer: str
    built: bool
    changed: bool

    def to_json(self) -> dict[str, Any]:
        return {"lock": str(self.path), "key": self.key, "image": self.image, "packages": list(self.packages),
                "installer": self.installer, "built": self.built, "changed": self.changed}


def _host_lines(lines: list[str], files: dict[str, Path]) -> list[str]:
    """Build-side paths (``/tmp/dockyard-spec/files/<hash>/<name>``) back to the host's files."""
    from .._requirements import SPEC_MOUNT

    out = []
    for line in lines:
        for rel, host in files.items():
            line = line.replace(f"{SPEC_MOUNT}/{rel}", str(host))
        out.append(line)
    return out


def lock_environment(builder: Builder, env: Environment, target: Path, **build: Any) -> LockReport:
    """Write the lock of ``env`` to ``target``: the versions its image (built now if needed, from
    the requirements, ignoring any lock) resolved to, with the spec's index options.

    Raises:
        InputError: nothing to lock (no pip requirements), or no recorded resolution to lock.
        SpecError, BuildError, EngineUnavailable…: as ``Builder.ensure_image``.
    """
    from .._environment import pip_lines
    from .._lockfile import format_lock, lock_options

    env = env.unlocked()
    inputs = env.build_inputs()
    lines = pip_lines(inputs)
    if env.python.user_managed_dependencies or not lines:
        raise InputError(f"{env.name} installs no pip requirements: there is nothing to lock",
                         hint="add python.pip_requirements (or a conda spec's pip section)")
    built = builder.ensure_image(env, **build)
    resolution = resolution_of(builder, built.key, built.image)
    if resolution is None:
        raise InputError(
            f"the image {built.image} was built before dockyard recorded resolutions",
            hint="rebuild it once (`dockyard env build --no-cache FILE`), then lock again")
    if resolution.installer.startswith("pip") and inputs.conda is not None and not _pip_only(inputs):
        raise InputError("pip's record of a conda environment lists the conda packages too; lock it with uv",
                         hint="unset DOCKYARD_INSTALLER (uv is the default), rebuild, then lock again")
    key = env.content_key(base_digest=None, inputs=inputs)
    text = format_lock(
        spec_name=Path(env._source or "environment.yml").name,
        options=_host_lines(lock_options(lines), inputs.files),
        pins=_host_lines(list(resolution.packages), inputs.files),
        pip_part=key.parts["pip"], conda_part=key.parts["conda"],
        source=f"the build of {built.image} ({resolution.installer})",
    )
    old = target.read_text(encoding="utf-8") if target.exists() else None
    if old != text:
        tmp = target.with_name(f".{target.name}.tmp{os.getpid()}")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, target)
    return LockReport(target, built.key, built.image, resolution.packages, resolution.installer,
                      not built.cached, old != text)


def _pip_only(inputs: Any) -> bool:
    from .._conda import CondaDependencies

    return CondaDependencies(_underlying_structure=inputs.conda)._is_pip_only()


@dataclass(frozen=True)
class EnvironmentReport:
    """What ``dockyard env show`` prints: the key, the image, its lock and what it resolved."""

    name: str
    key: str
    image: str | None
    note: str | None
    lock: Path | None
    lock_pins: int
    stale: str | None
    resolution: Resolution | None

    def to_json(self) -> dict[str, Any]:
        lock = None if self.lock is None else {"path": str(self.lock), "pins": self.lock_pins, "stale": self.stale}
        return {"name": self.name, "key": self.key, "image": self.image, "built": self.image is not None,
                "note": self.note, "lock": lock, "resolution": self.resolution.to_json() if self.resolution else None}


def show_environment(builder: Builder, env: Environment) -> EnvironmentReport:
    """The key of ``env``'s image, whether it is built, its lock (and whether it is stale) and what
    its build resolved (see :func:`resolution_of`). Builds nothing, pulls nothing.

    Raises:
        SpecError: the environment is invalid (a stale lock is reported, not raised).
        IndexUnavailable: the index cannot be read.
    """
    from ..errors import SpecError

    lock, stale = env.lock, None
    try:
        key, note = builder.image_key(env)
    except SpecError as exc:
        if lock is None or exc.path != str(lock.path):
            raise
        stale = "it was made from other requirements than the file has now"  # show the spec without it
        key, note = builder.image_key(env.unlocked())
    entry = builder.cache.find(key) if note is None else builder.cache.find(key.hex)
    image = None
    if entry is not None and builder.engine.inspect_image(entry.image) is not None:
        image = entry.image
    resolution = resolution_of(builder, entry.key, image) if entry is not None else None
    return EnvironmentReport(env.name, entry.key if entry is not None else key.hex, image, note,
                             lock.path if lock is not None else None, len(lock.pins) if lock is not None else 0,
                             stale, resolution)
