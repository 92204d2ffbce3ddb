"""Install pip requirements with uv inside the image being built: ``python3 uv_install.py OPTIONS``.

This file travels in the uv tool image (``dockyard/tool:uv-…``, next to the ``uv`` binary) and runs
INSIDE the image being built, with whatever ``python3`` the base image has. So it imports nothing of
dockyard and parses as Python 3.8. The builder imports it too, for :data:`UNSUPPORTED` and
:func:`unsupported_lines` (one list of what uv reads differently from pip, used on both sides).

Modes (``--mode``):

* ``venv``: a clean environment. ``python3 -m venv --without-pip PREFIX``, then the seed packages
  ``python3 -m venv`` would have put there (pip, and setuptools before Python 3.12, from the very
  wheels ``ensurepip`` bundles), then the requirements, resolved by ``uv pip compile`` and installed
  by ``uv pip sync``. The environment holds the same packages as one pip made. The venv is made
  while the requirements resolve, and the seeds' bytecode compiled while they install.
* ``near``: a near miss. ``PREFIX`` does not exist and ``--from OLD`` is the environment of the
  neighbour image this build starts from; ``PREFIX`` becomes a link to it, and ``uv pip sync``
  changes only what differs from the new resolution (removes, adds, up- and downgrades), keeping
  the seed packages. The result is the package set a clean build resolves, in a layer that holds
  only the difference.
* ``into``: an existing prefix (a conda environment): the resolution is installed into it with
  ``uv pip install`` (nothing removed: the conda packages stay).

Every mode compiles bytecode as pip does, except for the packages' own test suites, which no run
imports (see :func:`compile_bytecode`); the step's last line says how long each part took.

The resolution (``name==version`` lines, the output of ``uv pip compile``) is written to
``--record`` with a header naming the installer, so that the builder can label the image with it.

uv falls back to pip, saying why, when it cannot do what pip would: a pip configuration file or
``PIP_*`` variable it does not read, a requirements option it does not support, or a ``uv`` binary
that cannot run in this image (it is linked against glibc).

``--fresh NONCE`` (a ``--no-cache`` build): nothing is read from or written to the shared download
cache, uv downloads into a throwaway one of its own and every module is compiled here; the nonce
only makes the step's text new, so that BuildKit's cache cannot answer it.

The download cache (``--cache``, a BuildKit cache mount) is only a cache: when uv fails for any
reason other than the requirements themselves, or when an installed file does not match its
wheel's ``RECORD`` (a damaged cache entry), the step retries once without the shared cache and
then empties it, so a damaged or deleted cache never fails a build nor leaves a broken package.

Exit status: 0 installed; 2 the requirements cannot be resolved or installed (one line on stderr,
starting with ``dockyard-uv: ``, the resolver's own words); 1 anything else (one such line too).
"""

from __future__ import annotations

import argparse
import base64
import csv
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from operator import itemgetter

TAG = "dockyard-uv: "
BAD_SPEC, FAILED = 2, 1
MAX_ERROR = 600

#: Requirements-file options uv ignores (with a warning) or does not have, while pip honours them:
#: such a file is installed by pip, so that its result does not change.
UNSUPPORTED = ("--prefer-binary", "--use-feature", "--use-deprecated", "--no-build-isolation",
               "--global-option", "--config-settings", "--root-user-action", "--no-clean", "--src")
#: Options uv takes on its command line only: moved there (option -> uv's flag).
TRANSLATED = {"--pre": ("--prerelease", "allow"), "--trusted-host": ("--allow-insecure-host", None)}
#: pip's variables uv does not read, mapped onto uv's own (pip's separator is whitespace).
PIP_VARIABLES = {
    "PIP_INDEX_URL": ("UV_DEFAULT_INDEX", None),
    "PIP_EXTRA_INDEX_URL": ("UV_INDEX", " "),
    "PIP_FIND_LINKS": ("UV_FIND_LINKS", ","),
    "PIP_NO_INDEX": ("UV_NO_INDEX", None),
    "PIP_TRUSTED_HOST": ("UV_INSECURE_HOST", " "),
    "PIP_CONSTRAINT": ("UV_CONSTRAINT", " "),
    "PIP_PRE": ("UV_PRERELEASE", None),
}
#: pip's variables that change nothing uv resolves or installs.
PIP_HARMLESS = frozenset({
    "PIP_CERT", "PIP_DISABLE_PIP_VERSION_CHECK", "PIP_NO_CACHE_DIR", "PIP_DEFAULT_TIMEOUT", "PIP_TIMEOUT",
    "PIP_ROOT_USER_ACTION", "PIP_NO_WARN_SCRIPT_LOCATION", "PIP_PROGRESS_BAR", "PIP_NO_COLOR", "PIP_QUIET",
    "PIP_VERBOSE", "PIP_BREAK_SYSTEM_PACKAGES", "PIP_NO_INPUT", "PIP_RETRIES", "PIP_CACHE_DIR",
    "PIP_REQUIRE_VIRTUALENV", "PIP_NO_PYTHON_VERSION_WARNING", "PIP_CONFIG_FILE",
})
_PIP_CONFIGS = ("/etc/pip.conf", "/etc/xdg/pip/pip.conf", "~/.pip/pip.conf", "~/.config/pip/pip.conf")
SEEDS = ("pip", "setuptools", "wheel")
#: Folders holding a package's own test suite, whose modules get no bytecode (see :func:`compile_bytecode`).
TEST_FOLDERS = ("tests", "test")
_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[[^\]]*\])?\s*==\s*([^\s;]+)\s*$")


class Failure(Exception):
    """A failure to report as one line and an exit status."""

    def __init__(self, message: str, status: int = FAILED) -> None:
        super().__init__(message)
        self.status = status


class UsePip(Exception):
    """uv cannot install these requirements as pip would: the reason, for the build's output."""


class Clock:
    """How long each part of the step took, for one line of the build's output."""

    def __init__(self) -> None:
        self.last = time.monotonic()
        self.laps = []

    def lap(self, name: str) -> None:
        now = time.monotonic()
        self.laps.append((name, now - self.last))
        self.last = now

    def line(self) -> str:
        return ", ".join(f"{name} {seconds:.2f} s" for name, seconds in self.laps)


def say(message: str) -> None:
    print(TAG + message, flush=True)


def normalize(name: str) -> str:
    """PEP 503's form of a project name (``Scikit_Learn`` -> ``scikit-learn``)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def shorten(text: str, limit: int = MAX_ERROR) -> str:
    """One line out of uv's error output: its ``error:``/``cause:`` lines, without the hints."""
    kept = []
    for line in str(text).splitlines():
        line = line.strip().lstrip("×╰─▶│├└ ").strip()
        if not line or line.startswith(("warning:", "hint:", "help:", "Using Python", "Resolved", "Prepared")):
            continue
        for prefix in ("error: ", "cause: ", "Caused by: "):
            if line.startswith(prefix):
                line = line[len(prefix):]
        if kept and line == kept[-1]:
            continue
        kept.append(line.rstrip(":"))
    if len(kept) > 1 and kept[0].startswith("No solution found"):
        kept = kept[1:]  # the cause says which package and which constraint; that is the message
    text = ": ".join(kept)
    return text if len(text) <= limit else text[: limit - 1].rstrip() + "…"


def is_spec_error(output: str) -> bool:
    """The requirements themselves are wrong (retrying without the cache cannot help)."""
    markers = ("No solution found", "Failed to parse", "Couldn't parse", "is not a valid", "unsatisfiable",
               "Unsupported requirement", "Distribution not found", "not found in the provided package locations",
               "Failed to build", "Failed to download and build", "is not supported")
    return any(m in output for m in markers)


# -- what uv reads differently from pip -----------------------------------------------------------


def _option(line: str) -> tuple[str, str]:
    """(option, value) of a requirements-file option line (``--opt=value`` and ``--opt value``)."""
    head, _, rest = line.strip().partition(" ")
    if "=" in head and head.startswith("--"):
        head, _, value = head.partition("=")
        return head, value.strip()
    return head, rest.strip()


def unsupported_lines(lines: list) -> list:
    """The requirement lines uv would not read as pip does (see :data:`UNSUPPORTED`)."""
    return [line for line in lines if line.strip().startswith("-") and _option(line)[0] in UNSUPPORTED]


def split_options(lines: list) -> tuple:
    """(lines for uv's requirements file, extra command-line arguments) for ``lines``."""
    kept, args = [], []
    for line in lines:
        if line.strip().startswith("-"):
            option, value = _option(line)
            if option in TRANSLATED:
                flag, fixed = TRANSLATED[option]
                args += [flag, fixed if fixed is not None else value]
                continue
        kept.append(line)
    return kept, args


def pip_settings(environ: dict, home: str) -> tuple:
    """(uv's variables for pip's, or None when pip must install: the reason)."""
    named = environ.get("PIP_CONFIG_FILE") or ""
    # pip's own rule: PIP_CONFIG_FILE=/dev/null means "read no configuration file at all".
    for path in () if named == os.devnull else (named, *_PIP_CONFIGS):
        full = home + path[1:] if path.startswith("~") else path
        if path and os.path.isfile(full):
            return None, f"pip is configured by {path}, which uv does not read"
    out = {}
    for name, value in environ.items():
        if not name.startswith("PIP_") or name in PIP_HARMLESS:
            continue
        if name not in PIP_VARIABLES:
            return None, f"{name} is set, and uv has no equivalent"
        uv_name, separator = PIP_VARIABLES[name]
        if name in ("PIP_NO_INDEX", "PIP_PRE"):
            if value.strip().lower() in ("", "0", "false", "no", "off"):
                continue
            value = "1" if name == "PIP_NO_INDEX" else "allow"
        elif separator is not None:
            value = separator.join(value.split())
        out[uv_name] = value
    if environ.get("PIP_CERT") and not environ.get("SSL_CERT_FILE"):
        out["SSL_CERT_FILE"] = environ["PIP_CERT"]
    return out, ""


# -- reading and checking an environment -----------------------------------------------------------


def site_dirs(python: str) -> list:
    code = "import json, sysconfig; p = sysconfig.get_paths(); print(json.dumps(sorted({p['purelib'], p['platlib']})))"
    out = subprocess.run([python, "-I", "-c", code], capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise Failure(f"cannot ask {python} where packages go: {shorten(out.stderr)}")
    import json

    return json.loads(out.stdout)


def dist_infos(dirs: list) -> set:
    found = set()
    for folder in dirs:
        try:
            found.update(os.path.join(folder, n) for n in os.listdir(folder) if n.endswith(".dist-info"))
        except OSError:
            pass
    return found


def damaged_files(dist_info: str) -> list:
    """Files of an installed distribution that do not match its ``RECORD`` (size or hash)."""
    root = os.path.dirname(dist_info)
    bad = []
    try:
        with open(os.path.join(dist_info, "RECORD"), newline="", encoding="utf-8") as fh:
            rows = list(csv.reader(fh))
    except OSError:
        return [os.path.join(os.path.basename(dist_info), "RECORD")]
    for row in rows:
        if len(row) < 3 or not row[1] or "=" not in row[1]:
            continue
        path = os.path.normpath(os.path.join(root, row[0]))
        algorithm, _, want = row[1].partition("=")
        try:
            if row[2] and os.path.getsize(path) != int(row[2]):
                bad.append(row[0])
                continue
            digest = hashlib.new(algorithm)
            with open(path, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    digest.update(chunk)
        except (OSError, ValueError):
            bad.append(row[0])
            continue
        if base64.urlsafe_b64encode(digest.digest()).rstrip(b"=").decode() != want:
            bad.append(row[0])
    return bad


def project_of(dist_info: str) -> str:
    name = os.path.basename(dist_info)[: -len(".dist-info")]
    return normalize(name.rsplit("-", 1)[0])


def pins(text: str) -> dict:
    """``name -> version`` of the ``name==version`` lines in ``text`` (other lines skipped)."""
    out = {}
    for line in text.replace("\\\n", " ").splitlines():
        m = _PIN.match(re.sub(r"\s+--hash=\S+", "", line.split(" #", 1)[0]).strip())
        if m:
            out[normalize(m.group(1))] = m.group(2)
    return out


def seed_wheels() -> tuple:
    """(folder, {name: version}) of the wheels ``ensurepip`` installs into a new venv, or None."""
    try:
        import ensurepip
    except ImportError:
        return None
    bundled = os.path.join(os.path.dirname(ensurepip.__file__), "_bundled")
    get = getattr(ensurepip, "_get_packages", None)
    found = {}
    folder = None
    if get is not None:  # Python 3.10 and 3.11 (Debian's own WHEEL_PKG_DIR included)
        try:
            for name, package in get().items():
                path = getattr(package, "wheel_path", None) or os.path.join(bundled, package.wheel_name)
                found[name] = package.version
                folder = os.path.dirname(path)
        except Exception:  # noqa: BLE001 - a private API: anything wrong means "the slow way"
            return None
    else:  # Python 3.12+: pip only
        try:
            version = ensurepip.version()
        except Exception:  # noqa: BLE001
            return None
        for candidate in (getattr(ensurepip, "_WHEEL_PKG_DIR", None), "/usr/share/python-wheels", bundled):
            if candidate and os.path.isfile(os.path.join(candidate, f"pip-{version}-py3-none-any.whl")):
                folder, found = candidate, {"pip": version}
                break
    if not found or folder is None:
        return None
    for name, version in found.items():
        if not any(n.startswith(f"{name}-{version}-") and n.endswith(".whl") for n in os.listdir(folder)):
            return None
    return folder, found


# -- the installer ---------------------------------------------------------------------------------


class Uv:
    """``uv`` run with the build's cache and pip's settings, retrying once without the cache."""

    def __init__(self, binary: str, cache: str, settings: dict) -> None:
        self.binary = binary
        self.cache = cache
        self.env = dict(os.environ)
        self.env.update(settings)
        self.env.update({
            "UV_CACHE_DIR": cache, "UV_LINK_MODE": "copy", "UV_NO_PROGRESS": "1", "UV_PYTHON_DOWNLOADS": "never",
            # pip's rule for several indexes: the best version from any of them, not the first index's.
            "UV_INDEX_STRATEGY": "unsafe-best-match", "UV_NO_CONFIG": "1", "NO_COLOR": "1",
        })
        if not self.env.get("SSL_CERT_FILE"):
            self.env["UV_NATIVE_TLS"] = "1"  # the image's own trust store, as Debian's pip uses
        self.damaged = False

    def version(self) -> str:
        out = subprocess.run([self.binary, "--version"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True, env=self.env, check=False)
        if out.returncode != 0:
            raise UsePip(f"uv cannot run in this image ({shorten(out.stdout, 160) or f'exit {out.returncode}'})")
        text = out.stdout.split("(")[0].strip()  # "uv 0.13.9 (x86_64-unknown-linux-gnu)"
        return text[3:].strip() if text.startswith("uv ") else text

    def run(self, args: list, what: str, echo: bool = True) -> str:
        """Run ``uv ARGS``; on a failure the requirements did not cause, once more without the cache."""
        first = self._call(args, echo)
        if first.returncode == 0:
            return first.stdout
        if is_spec_error(first.stdout):
            raise Failure(f"{what}: {shorten(first.stdout)}", BAD_SPEC)
        say(f"uv failed ({shorten(first.stdout, 200)}); trying again without the download cache")
        self.damaged = True
        second = self._call(["--no-cache", *args], echo)
        if second.returncode == 0:
            return second.stdout
        status = BAD_SPEC if is_spec_error(second.stdout) else FAILED
        raise Failure(f"{what}: {shorten(second.stdout)}", status)

    def _call(self, args: list, echo: bool) -> subprocess.CompletedProcess:
        out = subprocess.run([self.binary, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True, env=self.env, check=False)
        for line in out.stdout.splitlines() if echo or out.returncode else ():
            if line.strip():
                print(line, flush=True)
        return out

    def clean(self) -> None:
        """Empty the shared cache (its mount point stays): the next build downloads afresh."""
        for name in os.listdir(self.cache) if os.path.isdir(self.cache) else ():
            path = os.path.join(self.cache, name)
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                try:
                    os.remove(path)
                except OSError:
                    pass


#: Options of a requirements file that say where packages come from: the install reads them too.
_SOURCE_OPTIONS = ("-i", "--index-url", "--extra-index-url", "--no-index", "-f", "--find-links", "--only-binary",
                   "--no-binary", "--require-hashes")


def resolve(uv: Uv, python: str, requirements: list, extra: list, work: str) -> str:
    """``uv pip compile``: the pins for ``requirements`` with this interpreter (nothing installed).

    Also writes ``resolved.txt`` for the install: the pins after the options saying where packages
    come from (an index, ``--no-index --find-links DIR``), which the pins alone do not carry.
    """
    source = os.path.join(work, "requirements.in")
    target = os.path.join(work, "compiled.txt")
    with open(source, "w", encoding="utf-8") as fh:
        fh.write("\n".join(requirements) + "\n")
    hashes = any("--hash" in line or line.startswith("--require-hashes") for line in requirements)
    uv.run(["pip", "compile", source, "--python", python, "--no-header", "--no-annotate", "--quiet",
            *(["--generate-hashes"] if hashes else []), "--output-file", target, *extra],
           "cannot resolve the requirements")
    with open(target, encoding="utf-8") as fh:
        compiled = fh.read()
    options = [line for line in requirements if line.startswith("-") and _option(line)[0] in _SOURCE_OPTIONS]
    with open(os.path.join(work, "resolved.txt"), "w", encoding="utf-8") as fh:
        fh.write("".join(f"{line}\n" for line in options) + compiled)
    return compiled


def install(uv: Uv, python: str, resolved: str, *, mode: str, extra: list, work: str, before: set | None = None,
            have: dict | None = None, clock: Clock | None = None, meanwhile: threading.Thread | None = None,
            new_cache: bool = False, store: str | None = None) -> None:
    """Install ``resolved`` (``sync``: exactly it plus the seeds there are; ``into``: add it), check
    every distribution installed since ``before`` (default: now) against its wheel's RECORD, then
    compile the environment's bytecode (see :func:`compile_bytecode`).

    ``have``: what the environment holds (default: ``uv pip freeze`` says); ``meanwhile``: work on
    the environment running alongside the install (the seeds' bytecode), joined before the check;
    ``new_cache``: the download cache held nothing when this build began (:func:`cache_is_empty`),
    or it is uv's throwaway one (``--fresh``), so no file can come from a damaged entry and the
    check is left out (it hashes every installed byte: 0.56 s of the digits example's cold build,
    measured); ``store``: the download cache whose compiled modules are reused
    (:func:`compile_bytecode`; None: none).
    """
    clock = clock or Clock()
    dirs = site_dirs(python)
    before = dist_infos(dirs) if before is None else before
    files = [os.path.join(work, "resolved.txt")]
    wanted = pins(resolved)
    if mode != "into":
        if have is None:
            have = pins(uv.run(["pip", "freeze", "--python", python], "cannot list the environment", echo=False))
        seeds = {n: v for n, v in have.items() if n in SEEDS and n not in wanted}
        if seeds:
            files.append(os.path.join(work, "seeds.txt"))
            with open(files[-1], "w", encoding="utf-8") as fh:
                fh.write("".join(f"{n}=={v}\n" for n, v in sorted(seeds.items())))
    verb = ["pip", "install", "-r", files[0]] if mode == "into" else ["pip", "sync", *files]
    uv.run([*verb, "--python", python, *extra], "cannot install the requirements")
    if meanwhile is not None:
        meanwhile.join()
    clock.lap("install")
    if new_cache:
        say("a new download cache: nothing installed came from an earlier entry, nothing to check")
    new = [] if new_cache else sorted(dist_infos(dirs) - before)
    bad = {project_of(d): damaged_files(d) for d in new}
    bad = {name: files for name, files in bad.items() if files}
    if bad:
        say(f"damaged files from the download cache ({', '.join(sorted(bad))}: {sum(map(len, bad.values()))} "
            "files); installing them again without it")
        uv.damaged = True
        again = [a for name in sorted(bad) for a in ("--reinstall-package", name)]
        uv.run(["--no-cache", *verb, "--python", python, *again, *extra], "cannot install the requirements")
        still = [name for name in bad for d in dist_infos(dirs) if project_of(d) == name and damaged_files(d)]
        if still:
            raise Failure(f"installed files of {', '.join(sorted(set(still)))} do not match their RECORD")
    clock.lap("check")
    compile_bytecode(python, dirs, cache=store)
    clock.lap("bytecode")


def cache_is_empty(cache: str) -> bool:
    """The download cache holds no entry: a new cache mount, one ``--no-cache`` gave the step, or one
    :meth:`Uv.clean` emptied (uv keeps every entry in a folder: loose files are only markers)."""
    try:
        return not any(entry.is_dir() for entry in os.scandir(cache))
    except OSError:
        return not os.path.exists(cache)


#: Where compiled modules are kept across builds, inside the download cache (see :func:`compile_bytecode`).
BYTECODE_STORE = "dockyard-bytecode"

#: Each compiling process: ``STORE`` (or empty) as its argument, NUL-separated source paths on stdin;
#: prints how many modules it took from the store and how many it compiled. A file whose bytecode is
#: current (the header compileall compares: magic, flags 0, the source's mtime) is left as it is; a
#: file that does not compile, or whose bytecode cannot be written, is left without, silently, as
#: pip leaves it. The store holds, per interpreter (its magic number) and per source (the SHA-256 of
#: its bytes, computed here: never a RECORD's word), the SHA-256 of the code then the code itself,
#: which is all a timestamp ``.pyc`` holds after its 16-byte header (the module's path is set again
#: by every import); an entry that does not match its own hash is not used.
_COMPILER = r"""
import hashlib, importlib.util, os, py_compile, struct, sys
magic = importlib.util.MAGIC_NUMBER
store = sys.argv[1] if len(sys.argv) > 1 and not os.environ.get("SOURCE_DATE_EPOCH") else ""
if store:
    store = os.path.join(store, magic.hex())
    try:
        os.makedirs(store, exist_ok=True)
    except OSError:
        store = ""
reused = compiled = 0
for source in sys.stdin.buffer.read().decode("utf-8", "surrogateescape").split("\0"):
    if not source:
        continue
    try:
        stat = os.stat(source)
        header = struct.pack("<4sLLL", magic, 0, int(stat.st_mtime) & 0xFFFFFFFF, stat.st_size & 0xFFFFFFFF)
        target = importlib.util.cache_from_source(source)
        try:
            with open(target, "rb") as fh:
                if fh.read(12) == header[:12]:
                    continue
        except OSError:
            pass
        kept = ""
        if store:
            with open(source, "rb") as fh:
                kept = os.path.join(store, hashlib.sha256(fh.read()).hexdigest())
            try:
                with open(kept, "rb") as fh:
                    entry = fh.read()
            except OSError:
                entry = b""
            if len(entry) > 32 and hashlib.sha256(entry[32:]).digest() == entry[:32]:
                os.makedirs(os.path.dirname(target), exist_ok=True)
                part = f"{target}.{os.getpid()}.part"
                with open(part, "wb") as fh:
                    fh.write(header + entry[32:])
                os.replace(part, target)
                reused += 1
                continue
        py_compile.compile(source, doraise=False, quiet=2)
        compiled += 1
        if kept:
            with open(target, "rb") as fh:
                data = fh.read()
            if data[:16] == header:
                part = f"{kept}.{os.getpid()}.part"
                with open(part, "wb") as fh:
                    fh.write(hashlib.sha256(data[16:]).digest() + data[16:])
                os.replace(part, kept)
    except (OSError, ValueError):  # unreadable, or its bytecode cannot be written: left without
        pass
print(reused, compiled)
"""


def bytecode_sources(roots: list) -> list:
    """``(size, path)`` of the ``.py`` files below ``roots`` (files or folders), leaving out folders
    named as in :data:`TEST_FOLDERS` and symbolic links to folders, as ``compileall`` walks."""
    found = []
    for root in roots:
        if os.path.isfile(root):
            walked = [(os.path.dirname(root), [], [os.path.basename(root)])]
        elif os.path.basename(root.rstrip("/")) in TEST_FOLDERS:
            continue
        else:
            walked = os.walk(root)
        for folder, subfolders, names in walked:
            subfolders[:] = [d for d in subfolders if d not in TEST_FOLDERS and d != "__pycache__"]
            for name in names:
                if name.endswith(".py"):
                    path = os.path.join(folder, name)
                    try:
                        found.append((os.path.getsize(path), path))
                    except OSError:
                        pass
    return found


def share_out(files: list, workers: int) -> list:
    """``files`` (``(size, path)``) cut into ``workers`` lists of about equal bytes, largest first."""
    shares = [[0, []] for _ in range(max(1, workers))]
    for size, path in sorted(files, reverse=True):
        emptiest = min(shares, key=itemgetter(0))
        emptiest[0] += size
        emptiest[1].append(path)
    return [paths for _, paths in shares if paths]


def compile_bytecode(python: str, dirs: list, paths: list | None = None, cache: str | None = None) -> None:
    """Compile the environment's modules to bytecode as pip does (the default ``.pyc`` of ``python``,
    files already compiled left as they are), on every core, except the packages' own test suites
    (:data:`TEST_FOLDERS`).

    Why compile at all: each run is a fresh container, so a module without bytecode is compiled again
    by every run's first import (measured, the digits example's imports: 0.84 s with bytecode, 1.94 s
    without). Why not the test suites: no run imports them (the same imports took 0.82-0.88 s without
    their bytecode), and they are about a third of the sources (948 of the digits example's 3,099
    files, 32 of its 75 MB of ``.pyc``): compiling them cost every build about 1.2 s. Which bytecode
    exists is no part of the result ``pip freeze`` reads. A file that does not compile (pip's rule,
    e.g. Python 2 syntax in a package's examples) is left without bytecode.

    Why not ``compileall -j0``: its pool hands out files a few at a time, in walking order; one
    process per core, each given an equal share of the bytes up front, compiled the digits
    example's 2,124 files in 3.6-4.5 s where ``compileall -j0`` took 5.2-7.1 s (2 cores, measured
    in the same container, alternating).

    Compiled modules are kept in the download cache (``cache``, :data:`BYTECODE_STORE`) by the hash of
    their source, and a module compiled before is written from there: the digits example's clean
    build with a warm cache took its 2,124 modules from the store in about 0.4 s instead of
    compiling them in 3-4.6 s, and a near miss compiles only what it adds. Keyed by the content, an
    entry serves any environment, path and package version holding the same file.

    ``paths``: only these files and folders (below ``dirs``), not the whole of ``dirs``.
    """
    files = bytecode_sources([d for d in (dirs if paths is None else paths) if os.path.exists(d)])
    if not files:
        return
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    # Fewer processes than cores for a few files: starting an interpreter costs ~20 ms.
    shares = share_out(files, min(cores, max(1, len(files) // 50)))
    failed = []
    try:
        store = os.path.join(cache, BYTECODE_STORE) if cache else ""
        workers = [subprocess.Popen([python, "-c", _COMPILER, store], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE) for _ in shares]
    except OSError as exc:
        workers, failed = [], [f"cannot start {python} ({exc})"]
    for worker, share in zip(workers, shares):
        try:
            worker.stdin.write("\0".join(share).encode("utf-8", "surrogateescape"))
            worker.stdin.close()
        except OSError:
            pass
    counts = [0, 0]
    for worker in workers:
        errors = worker.stderr.read().decode("utf-8", "replace")
        said = worker.stdout.read().decode("utf-8", "replace").split()
        if worker.wait() != 0:
            failed.append(shorten(errors, 200) or f"exit {worker.returncode}")
        elif len(said) == 2 and all(n.isdigit() for n in said):
            counts = [counts[0] + int(said[0]), counts[1] + int(said[1])]
    if failed:
        say(f"some modules were left without bytecode ({failed[0]})")
    if cache and any(counts):
        say(f"bytecode: {counts[0]:,} modules from the bytecode cache, {counts[1]:,} compiled")


def seed(uv: Uv, prefix: str, python: str) -> dict | None:
    """The packages ``python3 -m venv`` puts in a new environment, from the same wheels: returns them
    (``name -> version``; None: ensurepip put them there, whatever they are)."""
    found = seed_wheels()
    if found is None:
        say("no seed wheels found; running ensurepip")
        out = subprocess.run([python, "-m", "ensurepip", "--default-pip"], stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, check=False)
        if out.returncode != 0:
            raise Failure(f"ensurepip failed in {prefix}: {shorten(out.stdout)}")
        return None
    folder, packages = found
    specs = [f"{n}=={v}" for n, v in sorted(packages.items())]
    uv.run(["pip", "install", "--python", python, "--no-index", "--find-links", folder, *specs],
           "cannot install the seed packages")
    return dict(packages)


def top_level_paths(dist_info: str) -> list:
    """The files and folders directly below the site directory that a distribution's RECORD names
    (its packages and modules; not its dist-info, nor scripts outside the site directory)."""
    root = os.path.dirname(dist_info)
    found = set()
    try:
        with open(os.path.join(dist_info, "RECORD"), newline="", encoding="utf-8") as fh:
            for row in csv.reader(fh):
                head = row[0].replace("\\", "/").split("/", 1)[0] if row and row[0] else ""
                if head and head != ".." and not head.endswith((".dist-info", ".data", ".pth")):
                    found.add(os.path.join(root, head))
    except OSError:
        return []
    return sorted(found)


class Background(threading.Thread):
    """A function run alongside the main work; :meth:`join` raises what it raised."""

    def __init__(self, target, *args) -> None:
        super().__init__(daemon=True)
        self._call = (target, args)
        self.result = None
        self.error = None

    def run(self) -> None:
        target, args = self._call
        try:
            self.result = target(*args)
        except BaseException as exc:  # noqa: BLE001 - handed to whoever joins
            self.error = exc

    def join(self, timeout=None) -> None:
        super().join(timeout)
        if self.error is not None:
            error, self.error = self.error, None
            raise error


def make_venv(uv: Uv, python3: str, prefix: str, python: str) -> dict | None:
    """A new venv at ``prefix`` with the seed packages: returns them, as :func:`seed` does."""
    created = subprocess.run([python3, "-m", "venv", "--without-pip", prefix])
    if created.returncode != 0:
        raise Failure(f"python3 -m venv --without-pip {prefix} failed (exit {created.returncode})")
    return seed(uv, prefix, python)


def seed_paths(dirs: list) -> list:
    """The packages and modules of every distribution in ``dirs`` (a new venv: the seeds)."""
    return [p for d in sorted(dist_infos(dirs)) for p in top_level_paths(d)]


def pip_install(python3: str, prefix: str, requirements_file: str, mode: str, why: str) -> str:
    """The pip path, as dockyard built before uv: returns ``pip freeze``."""
    say(f"installing with pip: {why}")
    if mode == "near" and os.path.islink(prefix):
        os.remove(prefix)  # a neighbour's environment cannot be changed in place by pip: a clean one
    if mode != "into":
        venv = subprocess.run([python3, "-m", "venv", prefix])
        if venv.returncode != 0:
            raise Failure(f"python3 -m venv {prefix} failed (exit {venv.returncode})")
    python = os.path.join(prefix, "bin", "python")
    done = subprocess.run([python, "-m", "pip", "install", "--no-cache-dir", "-r", requirements_file])
    if done.returncode != 0:
        raise Failure(f"pip install failed (exit {done.returncode}): see its output above", BAD_SPEC)
    frozen = subprocess.run([python, "-m", "pip", "freeze"], stdout=subprocess.PIPE, text=True)
    return frozen.stdout


def write_record(path: str, installer: str, mode: str, resolved: str, note: str = "") -> None:
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    lines = ["# dockyard resolution", f"# installer: {installer}", f"# mode: {mode}"]
    if note:
        lines.append(f"# note: {note}")
    # One line per package: continuations joined, hashes (--generate-hashes) left out of the record.
    joined = resolved.replace("\\\n", " ")
    body = [re.sub(r"\s+--hash=\S+", "", line).strip() for line in joined.splitlines()
            if line.strip() and not line.lstrip().startswith(("#", "-"))]
    with open(path, "w", encoding="utf-8") as fh:
        fh.write("\n".join(lines + body) + "\n")


def main(argv: list) -> int:
    parser = argparse.ArgumentParser(prog="uv_install.py")
    parser.add_argument("--uv", required=True)
    parser.add_argument("--cache", required=True)
    parser.add_argument("--requirements", required=True)
    parser.add_argument("--prefix", required=True)
    parser.add_argument("--record", required=True)
    parser.add_argument("--mode", choices=("venv", "near", "into"), default="venv")
    parser.add_argument("--from", dest="old", default=None)
    parser.add_argument("--fresh", default=None, help="a --no-cache build (a nonce): no shared cache read or written")
    args = parser.parse_args(argv)
    prefix = args.prefix
    python3 = sys.executable or "python3"
    try:
        with open(args.requirements, encoding="utf-8") as fh:
            lines = [line.strip() for line in fh.read().splitlines() if line.strip()]
        if args.mode == "near":
            if not args.old or not os.path.isdir(args.old):
                raise Failure(f"the neighbour's environment {args.old} is not in this image")
            if os.path.lexists(prefix):
                raise Failure(f"{prefix} exists already")
            # The neighbour's folder is changed in place (in this image's layer only), under the new
            # name too: its scripts keep working, and only the changed files enter the new layer.
            os.symlink(os.path.realpath(args.old), prefix)
        settings, why = pip_settings(dict(os.environ), os.path.expanduser("~"))
        odd = unsupported_lines(lines)
        try:
            if settings is None:
                raise UsePip(why)
            if odd:
                raise UsePip(f"uv does not support {_option(odd[0])[0]}")
            if args.fresh:
                # Everything downloaded and compiled afresh, in uv's own throwaway cache; the shared
                # one is left as it is for the builds after this one.
                settings = {**settings, "UV_NO_CACHE": "1"}
            uv = Uv(args.uv, args.cache, settings)
            installer = f"uv {uv.version()}"
        except UsePip as reason:
            frozen = pip_install(python3, prefix, args.requirements, args.mode, str(reason))
            write_record(args.record, "pip", args.mode, frozen, note=str(reason))
            return 0
        python = os.path.join(prefix, "bin", "python")
        if args.mode != "venv" and not os.path.exists(python):
            raise Failure(f"{prefix} has no bin/python to install into")
        requirements, extra = split_options(lines)
        work = tempfile.mkdtemp(prefix="dockyard-uv-")
        clock = Clock()
        new_cache = bool(args.fresh) or cache_is_empty(args.cache)  # before the seeds and the resolver write to it
        store = None if args.fresh else args.cache
        try:
            # A new venv is made (from the base's python3, which therefore resolves for it) while the
            # requirements are resolved, and the seeds' bytecode compiled while they are installed:
            # the one waits on the network, the other on the CPU. Requirements that cannot be met still
            # leave nothing behind: the venv is removed again.
            venv = Background(make_venv, uv, python3, prefix, python) if args.mode == "venv" else None
            if venv is not None:
                venv.start()
            try:
                resolved = resolve(uv, python3 if args.mode == "venv" else python, requirements, extra, work)
            except BaseException:
                if venv is not None:
                    try:
                        venv.join()
                    except BaseException:  # noqa: BLE001 - the resolver's failure is the one to report
                        pass
                    shutil.rmtree(prefix, ignore_errors=True)
                raise
            clock.lap("resolve")
            have = meanwhile = None
            if venv is not None:
                venv.join()
                have = venv.result
                clock.lap("venv")
                if have is not None:  # the seeds' files, found before uv adds any of its own
                    dirs = site_dirs(python)
                    meanwhile = Background(compile_bytecode, python, dirs, seed_paths(dirs), store)
                    meanwhile.start()
            # A new environment: every distribution in it is checked, the seeds too.
            install(uv, python, resolved, mode="into" if args.mode == "into" else "sync", extra=extra,
                    work=work, before=set() if args.mode == "venv" else None, have=have, clock=clock,
                    meanwhile=meanwhile, new_cache=new_cache, store=store)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        if uv.damaged and not args.fresh:
            say("emptying the download cache, which failed this build once")
            uv.clean()
        write_record(args.record, installer, args.mode, resolved)
        say(f"resolved {len(pins(resolved))} packages with {installer} ({clock.line()})")
    except Failure as failure:
        print(TAG + str(failure), file=sys.stderr, flush=True)
        return failure.status
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
