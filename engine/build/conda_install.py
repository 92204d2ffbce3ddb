"""Install a conda spec into a prefix with rattler, no conda binary: ``python3 conda_install.py SPEC_JSON PREFIX``.

This file is copied into the build context and run INSIDE the image being built, by whatever Python the
base image has, with ``rattler`` (the ``py-rattler`` wheel) on its path. So it imports nothing of
dockyard and parses as Python 3.8 (rattler itself needs 3.10+; an older Python gets a clear message).

SPEC_JSON is the environment's conda section as JSON::

    {"channels": ["conda-forge", "file:///channel"], "dependencies": ["numpy>=1.26", {"pip": ["..."]}]}

The ``{"pip": [...]}`` entry is skipped: a later build step installs it. Channels may be names
(``conda-forge``), URLs, or local channels (``file:///abs/path`` or ``/abs/path``); with only local
channels nothing touches the network.

Exit status: 0 installed; 2 the spec cannot be installed (a bad spec, a package no channel has, a
conflict, an install error); 3 a channel cannot be read. Every failure is ONE line on stderr that
starts with ``dockyard-conda: ``, short enough to show as a build error as is.

Environment:
    DOCKYARD_CONDA_CACHE     where downloaded packages and repodata are cached (kept); default a
                             temporary folder, removed afterwards.
    DOCKYARD_CONDA_PLATFORM  the conda subdir to install for (default ``linux-64``); ``noarch`` is
                             always added.
    CONDA_OVERRIDE_CUDA etc. conda's usual virtual-package overrides (a build has no GPU to detect).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path
from urllib.parse import unquote, urlparse

TAG = "dockyard-conda: "
BAD_SPEC, BAD_CHANNEL = 2, 3
MAX_ERROR = 400  # characters of one error line
MAX_LISTED = 30  # packages named in the "installing" line

# conda's "defaults" is Anaconda's repository, not a channel of anaconda.org (where rattler would look).
_DEFAULTS = ("https://repo.anaconda.com/pkgs/main", "https://repo.anaconda.com/pkgs/r")


class Failure(Exception):
    """A failure to report as one line and an exit status."""

    def __init__(self, message: str, status: int = BAD_SPEC) -> None:
        super().__init__(message)
        self.status = status


# Channel URL as the build sees it -> as the user wrote it (a local channel is mounted elsewhere in
# the build): messages name what the user wrote. From the spec's "dockyard_channel_names".
SHOWN: dict = {}


def shown(message: str) -> str:
    for inside, outside in SHOWN.items():
        message = message.replace(inside, outside)
    return message


def say(message: str) -> None:
    print(TAG + shown(message), flush=True)


def shorten(message: object, limit: int = MAX_ERROR, lines: int = 6) -> str:
    """One line out of a multi-line (solver) message: its first meaningful lines, tree drawing removed."""
    kept = []
    for line in str(message).splitlines():
        line = line.strip().lstrip("│├└─ ").strip()
        for noise in ("Cannot solve the request because of:", "Caused by:"):
            if line.startswith(noise):
                line = line[len(noise):].strip()
        if line:
            kept.append(line)
    text = kept[0] if kept else ""
    for line in kept[1:lines]:
        text += (" " if text.endswith(":") else "; ") + line  # "options: x 1.0", "x; y"
    text += " …" if len(kept) > lines else ""
    return text if len(text) <= limit else text[: limit - 1].rstrip() + "…"


def read_spec(path: str) -> tuple[list[str], list[str]]:
    """The channels and conda specs (the pip entry left out) of the JSON spec file."""
    try:
        spec = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise Failure(f"cannot read the conda spec {path}: {error}") from None
    if not isinstance(spec, dict):
        raise Failure(f"the conda spec {path} is not a JSON object")
    channels = spec.get("channels") or []
    dependencies = spec.get("dependencies") or []
    names = spec.get("dockyard_channel_names") or {}
    if isinstance(names, dict):
        SHOWN.update({str(k): str(v) for k, v in names.items()})
    if not isinstance(channels, list) or not all(isinstance(c, str) and c.strip() for c in channels):
        raise Failure("'channels' must be a list of channel names or URLs")
    if not isinstance(dependencies, list):
        raise Failure("'dependencies' must be a list")
    specs = []
    for entry in dependencies:
        if isinstance(entry, dict) and set(entry) == {"pip"}:
            continue  # installed by pip in a later step
        if not isinstance(entry, str) or not entry.strip():
            raise Failure(f"a conda dependency must be a string, not {json.dumps(entry)[:80]}")
        specs.append(entry.strip())
    return [c.strip() for c in channels], specs


def expand_channels(channels: list[str]) -> list[str]:
    out: list[str] = []
    for channel in channels or ["conda-forge"]:  # none named: conda-forge, the channel CondaDependencies.create names
        for name in _DEFAULTS if channel == "defaults" else (channel,):
            if name not in out:
                out.append(name)
    return out


def local_path(channel: str) -> Path | None:
    """The folder of a local channel (``file://`` URL or absolute path), None for a named or remote one."""
    if channel.startswith("file://"):
        return Path(unquote(urlparse(channel).path))
    if channel.startswith("/"):
        return Path(channel)
    return None


def check_local(channel: str) -> None:
    # noarch/ is the one subdir every channel must have; checked here so a wrong path gets a plain
    # message instead of the gateway's two-line one.
    folder = local_path(channel)
    if folder is not None and not (folder / "noarch" / "repodata.json").is_file():
        why = "no such folder" if not folder.is_dir() else "no noarch/repodata.json there (is it indexed?)"
        raise Failure(f"cannot read channel {channel}: {why}", BAD_CHANNEL)


def virtual_packages() -> list:
    """The machine's __glibc, __linux, __unix, __archspec (honouring CONDA_OVERRIDE_*): conda-forge's
    binaries depend on them. A failed detection is no reason to stop; the solver will name what is missing."""
    import rattler
    from rattler.exceptions import DetectVirtualPackageError

    try:
        return rattler.VirtualPackage.detect(rattler.VirtualPackageOverrides.from_env())
    except DetectVirtualPackageError as error:
        say(f"warning: no virtual packages detected ({shorten(error, 120, 1)})")
        return []


_NAME = re.compile(r"^\s*([A-Za-z0-9_.\-]+)")
_FROM_BASE = ("python", "pip")


def spec_name(spec: str) -> str:
    m = _NAME.match(spec)
    return m.group(1).lower() if m else ""


async def _python_from_base(specs: list, matchspecs: list, sources: list, subdirs: list, gateway: object) -> tuple:
    """Azure-style specs pin ``python=3.x`` and ``pip``. When the channels carry no Python at all (a
    local channel of tools), the base image's Python runs the environment instead, provided it meets
    the pin; then those two specs are dropped from the solve (a venv over the base Python follows).

    Raises:
        Failure: the channels have no Python and the base image's does not meet the pin.
    """
    import platform

    import rattler

    if not any(spec_name(s) in _FROM_BASE for s in specs):
        return specs, matchspecs
    found = await gateway.query(sources, subdirs, ["python"], recursive=False)  # type: ignore[attr-defined]
    if any(len(list(records)) for records in found):
        return specs, matchspecs  # the channels have Python: the solver decides, as conda would
    base = platform.python_version()
    build_string = getattr(rattler, "BuildString", None)
    if build_string is None:
        from rattler.package.build_string import BuildString as build_string
    record = rattler.PackageRecord(name="python", version=base, build=build_string("0"), build_number=0,
                                   subdir="noarch")
    pins = [(s, m) for s, m in zip(specs, matchspecs) if spec_name(s) == "python"]
    for text, spec in pins:
        if not spec.matches(record):
            raise Failure(f"the spec asks for {text}, the channels have no python, and the base image's "
                          f"Python is {base}: use a base image with a matching Python, or a channel that has it")
    say(f"the channels have no python: the base image's Python {base} runs the environment"
        + (f" (it meets {', '.join(t for t, _ in pins)})" if pins else ""))
    kept = [(s, m) for s, m in zip(specs, matchspecs) if spec_name(s) not in _FROM_BASE]
    return [s for s, _ in kept], [m for _, m in kept]


async def solve_and_install(channels: list[str], specs: list[str], prefix: Path, cache: Path) -> None:
    import rattler
    from rattler.exceptions import (
        FetchRepoDataError,
        GatewayError,
        InstallerError,
        InvalidChannelError,
        InvalidMatchSpecError,
        LinkError,
        ParseSubdirError,
        SolverError,
        TransactionError,
    )

    try:
        matchspecs = [rattler.MatchSpec(s) for s in specs]
    except InvalidMatchSpecError as error:
        raise Failure(f"invalid conda spec: {shorten(error)}") from None
    try:
        sources = [rattler.Channel(c) for c in channels]
    except InvalidChannelError as error:
        raise Failure(f"invalid channel: {shorten(error)}", BAD_CHANNEL) from None
    platform = os.environ.get("DOCKYARD_CONDA_PLATFORM") or "linux-64"
    try:
        subdirs = [rattler.Subdir(platform), rattler.Subdir("noarch")]
    except ParseSubdirError as error:
        raise Failure(f"DOCKYARD_CONDA_PLATFORM: {shorten(error)}") from None

    gateway = rattler.Gateway(cache_dir=cache / "repodata")
    try:
        specs, matchspecs = await _python_from_base(specs, matchspecs, sources, subdirs, gateway)
    except (GatewayError, FetchRepoDataError) as error:
        raise Failure(f"cannot read the channels: {shorten(error, lines=2)}", BAD_CHANNEL) from None
    if not specs:
        say("no conda packages to install besides the base image's Python")
        return
    say(f"solving {len(specs)} specs from channels {', '.join(channels)} for {platform}")
    try:
        records = await rattler.solve(
            sources,
            matchspecs,
            gateway=gateway,
            platforms=subdirs,
            virtual_packages=virtual_packages(),
            # Exactly the channels named: no CEP-42 relations followed to other channels.
            channel_relations="disabled",
        )
    except (GatewayError, FetchRepoDataError) as error:
        raise Failure(f"cannot read the channels: {shorten(error, lines=2)}", BAD_CHANNEL) from None
    except SolverError as error:
        raise Failure(f"cannot solve the conda spec: {shorten(error)}") from None

    names = sorted(f"{r.name.normalized}-{r.version}" for r in records)
    more = f" … and {len(names) - MAX_LISTED} more" if len(names) > MAX_LISTED else ""
    say(f"installing {len(names)} packages: {', '.join(names[:MAX_LISTED])}{more}")
    try:
        await rattler.install(
            records,
            target_prefix=prefix,
            cache_dir=cache / "pkgs",
            platform=subdirs[0],
            show_progress=False,
            # requested_specs is left out: py-rattler 0.28's install() passes its MatchSpec wrappers on
            # unconverted and fails; conda-meta then has no "requested_spec", which nothing here reads.
        )
    except (InstallerError, LinkError, TransactionError, FetchRepoDataError, OSError) as error:
        raise Failure(f"install into {prefix} failed: {shorten(error, lines=2)}") from None
    say(f"installed into {prefix}")


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(f"{TAG}usage: {Path(sys.argv[0]).name} SPEC_JSON PREFIX", file=sys.stderr)
        return BAD_SPEC
    spec_path, prefix = argv
    if sys.version_info < (3, 10):  # noqa: UP036 - the image's Python runs this, not dockyard's
        print(f"{TAG}rattler needs Python 3.10 or newer; this is {sys.version.split()[0]}", file=sys.stderr)
        return BAD_SPEC
    try:
        import rattler  # noqa: F401 - imported here only to fail early with a clear message
    except ImportError as error:
        print(f"{TAG}cannot import rattler (py-rattler): {error}", file=sys.stderr)
        return BAD_SPEC

    own_cache = not os.environ.get("DOCKYARD_CONDA_CACHE")
    cache = Path(tempfile.mkdtemp(prefix="dockyard-conda-")) if own_cache else Path(os.environ["DOCKYARD_CONDA_CACHE"])
    try:
        channels, specs = read_spec(spec_path)
        if not specs:
            say("no conda packages to install")
            return 0
        channels = expand_channels(channels)
        for channel in channels:
            check_local(channel)
        asyncio.run(solve_and_install(channels, specs, Path(prefix).absolute(), cache))
    except Failure as failure:
        print(TAG + shown(str(failure)), file=sys.stderr, flush=True)
        return failure.status
    finally:
        # The prefix's files are hard links to (or copies of) the cache's, so removing it loses nothing.
        if own_cache:
            shutil.rmtree(cache, ignore_errors=True)
    return 0


if __name__ == "__main__":
    status = main(sys.argv[1:])
    sys.stdout.flush()
    sys.stderr.flush()
    # Not sys.exit: rattler's tokio threads hand the last result back to Python and may still be dropping
    # their references when the interpreter finalizes, which crashes the process (SIGSEGV/SIGABRT, about
    # one exit in five; PyO3/pyo3-async-runtimes#40). All work is done here, so skip finalization.
    os._exit(status)
