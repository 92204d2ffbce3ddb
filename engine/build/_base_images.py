"""Base images made with no registry: a Debian rootfs from debootstrap, or a static busybox.

This is what an air-gapped GPU site needs too: everything comes from the machine's Debian mirror
(read from its apt configuration, never hard-coded) and is imported straight into the engine.
"""

from __future__ import annotations

import datetime as _dt
import io
import json
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
import urllib.parse
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ..dockerd import EngineClient
from ..errors import BootstrapError, EngineError, InputError, ToolMissing

__all__ = [
    "HOST_CA_BUNDLE",
    "PYTHON_PACKAGES",
    "BaseImage",
    "Flavor",
    "base_image_ref",
    "bootstrap",
    "find_mirror",
    "host_suite",
    "list_base_images",
    "missing_certificates",
]

Flavor = Literal["python", "busybox"]
FLAVORS: tuple[Flavor, ...] = ("python", "busybox")
PYTHON_PACKAGES = ("python3", "python3-pip", "python3-venv", "ca-certificates")
HOST_CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"
# Where pip, requests and OpenSSL look for trust; set in every base image so a venv's own pip
# (which would otherwise use its vendored certifi) trusts the extra certificates we add.
_TRUST_ENV = ("SSL_CERT_FILE", "PIP_CERT", "REQUESTS_CA_BUNDLE")
LABEL = "dockyard.base"

Progress = Callable[[str], None]


@dataclass(frozen=True)
class BaseImage:
    """A base image in the engine, as its labels describe it."""

    ref: str
    flavor: str
    suite: str
    packages: tuple[str, ...]
    created: str
    image_id: str = ""
    existed: bool = False
    seconds: float = 0.0

    def to_json(self) -> dict[str, object]:
        return {
            "image": self.ref,
            "image_id": self.image_id,
            "flavor": self.flavor,
            "suite": self.suite,
            "packages": list(self.packages),
            "created": self.created,
            "existed": self.existed,
            "seconds": round(self.seconds, 3),
        }

    @classmethod
    def from_labels(cls, ref: str, labels: dict[str, str], image_id: str = "", existed: bool = True) -> BaseImage:
        return cls(
            ref=ref,
            flavor=labels.get(f"{LABEL}.flavor", ""),
            suite=labels.get(f"{LABEL}.suite", ""),
            packages=tuple(p for p in labels.get(f"{LABEL}.packages", "").split(",") if p),
            created=labels.get(f"{LABEL}.created", ""),
            image_id=image_id,
            existed=existed,
        )


def base_image_ref(flavor: Flavor, suite: str) -> str:
    """``dockyard/base:<suite>-python3`` or ``dockyard/base:<suite>-busybox``."""
    return f"dockyard/base:{suite}-{'python3' if flavor == 'python' else 'busybox'}"


def host_suite(os_release: str = "/etc/os-release") -> str:
    """The host's Debian/Ubuntu codename, else ``bookworm``."""
    try:
        text = Path(os_release).read_text()
    except OSError:
        return "bookworm"
    m = re.search(r"^VERSION_CODENAME=\"?([a-z]+)\"?$", text, re.M)
    return m.group(1) if m else "bookworm"


# -- apt configuration --------------------------------------------------------------------------


@dataclass(frozen=True)
class _AptSource:
    uri: str
    suites: tuple[str, ...]


def _one_line_sources(text: str) -> Iterator[_AptSource]:
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line.startswith("deb "):
            continue
        line = re.sub(r"\[[^\]]*\]", "", line[4:]).split()  # drop [arch=… signed-by=…]
        if len(line) >= 2:
            yield _AptSource(uri=line[0], suites=(line[1],))


def _deb822_sources(text: str) -> Iterator[_AptSource]:
    for stanza in re.split(r"\n\s*\n", text):
        fields: dict[str, str] = {}
        key = None
        for raw in stanza.splitlines():
            if raw.startswith("#") or not raw.strip():
                continue
            if raw[0].isspace() and key:
                fields[key] += " " + raw.strip()
                continue
            key, _, value = raw.partition(":")
            key = key.strip().lower()
            fields[key] = value.strip()
        if "deb" not in fields.get("types", "").split() or fields.get("enabled", "yes").lower() == "no":
            continue
        suites = tuple(fields.get("suites", "").split())
        for uri in fields.get("uris", "").split():
            yield _AptSource(uri=uri, suites=suites)


def _apt_sources(root: Path) -> list[_AptSource]:
    found: list[_AptSource] = []
    main = root / "etc/apt/sources.list"
    if main.is_file():
        found += _one_line_sources(main.read_text(errors="replace"))
    parts = root / "etc/apt/sources.list.d"
    if parts.is_dir():
        for path in sorted(parts.iterdir()):
            if path.suffix == ".list":
                found += _one_line_sources(path.read_text(errors="replace"))
            elif path.suffix == ".sources":
                found += _deb822_sources(path.read_text(errors="replace"))
    return found


def find_mirror(suite: str, *, root: Path = Path("/")) -> str:
    """The Debian mirror URI the machine's apt configuration uses for ``suite``.

    Prefers an entry that lists ``suite`` itself; otherwise the first entry for a release suite
    (not ``-security``/``-updates``), since debootstrap needs a full archive.

    Raises:
        InputError: the apt configuration names no usable mirror.
    """
    sources = [s for s in _apt_sources(root) if s.uri.startswith(("http://", "https://", "file:/"))]
    for src in sources:
        if suite in src.suites:
            return src.uri
    for src in sources:
        if any("-" not in s and "/" not in s for s in src.suites) and "security" not in src.uri:
            return src.uri
    raise InputError(
        f"no Debian mirror for '{suite}' in {root / 'etc/apt'}",
        hint="pass --mirror URL (a Debian archive such as the one your apt uses)",
    )


# -- certificates -------------------------------------------------------------------------------

_PEM = re.compile(r"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.S)


def _certs(text: str) -> list[str]:
    return [re.sub(r"\s+", "", m.group(0)) for m in _PEM.finditer(text)]


def missing_certificates(bundle: str, present: str) -> list[str]:
    """PEM certificates in ``bundle`` that ``present`` lacks (order kept, whitespace normalised)."""
    have = set(_certs(present))
    out: list[str] = []
    for match in _PEM.finditer(bundle):
        if re.sub(r"\s+", "", match.group(0)) not in have:
            out.append(match.group(0).strip() + "\n")
            have.add(re.sub(r"\s+", "", match.group(0)))
    return out


def _add_certificates(rootfs: Path, bundle_path: Path) -> int:
    target = rootfs / "etc/ssl/certs/ca-certificates.crt"
    present = target.read_text() if target.exists() else ""
    extra = missing_certificates(bundle_path.read_text(errors="replace"), present)
    if not extra:
        return 0
    local = rootfs / "usr/local/share/ca-certificates"
    local.mkdir(parents=True, exist_ok=True)
    for n, pem in enumerate(extra):
        # Also under usr/local so a later update-ca-certificates inside the image keeps them.
        (local / f"dockyard-extra-{n}.crt").write_text(pem)
    target.parent.mkdir(parents=True, exist_ok=True)
    with target.open("a") as fh:
        fh.write("".join(extra))
    return len(extra)


# -- engine side --------------------------------------------------------------------------------


def list_base_images(engine: EngineClient | None = None) -> list[BaseImage]:
    """Base images dockyard made that the engine holds (one request)."""
    engine = engine or EngineClient.from_env()
    query = urllib.parse.quote(json.dumps({"label": [f"{LABEL}.flavor"]}))
    reply = engine.request("GET", f"/images/json?filters={query}")
    if reply.status != 200:
        raise EngineError(f"listing images answered HTTP {reply.status}", status=reply.status)
    out = []
    for img in reply.json() or []:
        for tag in img.get("RepoTags") or []:
            if tag.startswith("dockyard/base:"):
                out.append(BaseImage.from_labels(tag, img.get("Labels") or {}, img.get("Id", "")))
    return sorted(out, key=lambda b: b.ref)


def _import_rootfs(
    engine: EngineClient, chunks: Iterator[bytes] | bytes, ref: str, changes: list[str]
) -> str:
    repo, tag = ref.rsplit(":", 1)
    query = urllib.parse.urlencode(
        [("fromSrc", "-"), ("repo", repo), ("tag", tag)] + [("changes", c) for c in changes]
    )
    reply = engine.request(
        "POST",
        f"/images/create?{query}",
        body=chunks,
        headers={"Content-Type": "application/x-tar"},
        timeout=None,
    )
    if reply.status != 200:
        raise EngineError(f"importing {ref} answered HTTP {reply.status}: {reply.body[:300]!r}", status=reply.status)
    image_id = ""
    for line in reply.body.decode(errors="replace").splitlines():
        if not line.strip():
            continue
        msg = json.loads(line)
        if "errorDetail" in msg or "error" in msg:
            raise EngineError(f"importing {ref} failed: {msg.get('error') or msg['errorDetail']}")
        status = str(msg.get("status", ""))
        if status.startswith("sha256:"):
            image_id = status
    return image_id


def _changes(labels: dict[str, str], env: dict[str, str], cmd: list[str]) -> list[str]:
    out = [f"LABEL {k}={json.dumps(v)}" for k, v in sorted(labels.items())]
    out += [f"ENV {k}={json.dumps(v)}" for k, v in env.items()]
    out.append(f"CMD {json.dumps(cmd)}")
    return out


# -- flavors ------------------------------------------------------------------------------------


def _run_logged(cmd: list[str], step: str, progress: Progress, log: Path) -> None:
    """Run a command, feeding each output line to ``progress`` and the log; keep a tail for errors."""
    tail: deque[str] = deque(maxlen=20)
    with log.open("a") as fh, subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace"
    ) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            fh.write(line)
            tail.append(line.rstrip())
            progress(line.rstrip())
        code = proc.wait()
    if code != 0:
        raise BootstrapError(
            f"{step} exited with status {code}",
            step=step,
            log_tail="\n".join(tail),
            hint=f"the full log is {log}",
        )


def _tar_stream(rootfs: Path) -> Iterator[bytes]:
    # GNU tar keeps device nodes, hard links and xattrs the way debootstrap made them.
    proc = subprocess.Popen(
        ["tar", "--numeric-owner", "--xattrs", "-C", str(rootfs), "-cf", "-", "."],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None
    while chunk := proc.stdout.read(1 << 20):
        yield chunk
    if proc.wait() != 0:
        raise BootstrapError("tar of the rootfs failed", step="tar", log_tail=proc.stderr.read().decode()[-2000:])


def _bootstrap_python(
    suite: str, mirror: str, ca_bundle: Path | None, work: Path, progress: Progress
) -> tuple[Iterator[bytes], dict[str, str], dict[str, str]]:
    if os.geteuid() != 0:
        raise ToolMissing(
            "the python flavor needs root (debootstrap chroots into the new rootfs)",
            hint="run `sudo dockyard base bootstrap`, or use --flavor busybox",
        )
    if shutil.which("debootstrap") is None:
        raise ToolMissing(
            "debootstrap is not installed", hint="install it: apt-get install debootstrap"
        )
    rootfs = work / "rootfs"
    log = work / "debootstrap.log"
    progress(f"debootstrap {suite} (minbase + {', '.join(PYTHON_PACKAGES)})")
    _run_logged(
        [
            "debootstrap",
            "--variant=minbase",
            f"--include={','.join(PYTHON_PACKAGES)}",
            suite,
            str(rootfs),
            mirror,
        ],
        "debootstrap",
        progress,
        log,
    )
    extra = _add_certificates(rootfs, ca_bundle) if ca_bundle else 0
    if extra:
        progress(f"added {extra} certificate(s) from {ca_bundle} that the rootfs lacked")
    # Package caches and lists are a third of the rootfs and stale the day after.
    for junk in ("var/cache/apt/archives", "var/lib/apt/lists"):
        for entry in (rootfs / junk).glob("*"):
            if entry.is_file():
                entry.unlink()
    for entry in (rootfs / "var/cache/apt").glob("*.bin"):
        entry.unlink()
    python = _dpkg_version(rootfs, "python3")
    labels = {
        f"{LABEL}.python": python,
        f"{LABEL}.extra-certificates": str(extra),
    }
    env = {
        "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "LANG": "C.UTF-8",
        **{k: HOST_CA_BUNDLE for k in _TRUST_ENV},
    }
    progress("importing the rootfs into the engine")
    return _tar_stream(rootfs), labels, env


def _dpkg_version(rootfs: Path, package: str) -> str:
    status = rootfs / "var/lib/dpkg/status"
    text = status.read_text(errors="replace") if status.exists() else ""
    m = re.search(rf"^Package: {re.escape(package)}\n(?:[^\n]+\n)*?Version: (\S+)", text, re.M)
    return m.group(1) if m else ""


def _is_static_elf(path: Path) -> bool:
    """True for an ELF executable without a PT_INTERP segment (needs no dynamic loader)."""
    import struct

    try:
        data = path.read_bytes()
    except OSError:
        return False
    if data[:4] != b"\x7fELF" or data[4] != 2:  # 64-bit only; Debian's busybox-static is
        return False
    phoff, = struct.unpack_from("<Q", data, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    return all(struct.unpack_from("<I", data, phoff + i * phentsize)[0] != 3 for i in range(phnum))


def _find_busybox(work: Path, progress: Progress) -> tuple[Path, str]:
    """Debian's busybox-static binary: the installed one, else `apt-get download` of the package."""
    installed = Path("/bin/busybox")
    version = ""
    if shutil.which("dpkg-query"):
        q = subprocess.run(
            ["dpkg-query", "-W", "-f=${Version}", "busybox-static"], capture_output=True, text=True
        )
        version = q.stdout.strip() if q.returncode == 0 else ""
    if version and _is_static_elf(installed):
        return installed, version
    if shutil.which("apt-get") and shutil.which("dpkg-deb"):
        progress("apt-get download busybox-static")
        got = subprocess.run(
            ["apt-get", "download", "busybox-static"], cwd=work, capture_output=True, text=True
        )
        debs = sorted(work.glob("busybox-static_*.deb"))
        if got.returncode == 0 and debs:
            subprocess.run(["dpkg-deb", "-x", str(debs[0]), str(work / "deb")], check=True)
            version = debs[0].name.split("_")[1]
            return work / "deb/bin/busybox", urllib.parse.unquote(version)
    raise ToolMissing(
        "no static busybox found",
        hint="install Debian's busybox-static (apt-get install busybox-static)",
    )


def _bootstrap_busybox(work: Path, progress: Progress) -> tuple[bytes, dict[str, str], dict[str, str]]:
    binary, version = _find_busybox(work, progress)
    applets = subprocess.run([str(binary), "--list"], capture_output=True, text=True, check=True).stdout.split()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:

        def add_dir(name: str, mode: int = 0o755) -> None:
            info = tarfile.TarInfo(name)
            info.type, info.mode = tarfile.DIRTYPE, mode
            tar.addfile(info)

        def add_file(name: str, data: bytes, mode: int = 0o644) -> None:
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), mode
            tar.addfile(info, io.BytesIO(data))

        for d in ("bin", "etc", "root", "proc", "sys", "dev", "var", "usr", "usr/bin"):
            add_dir(d, 0o700 if d == "root" else 0o755)
        add_dir("tmp", 0o1777)
        add_file("bin/busybox", binary.read_bytes(), 0o755)
        for applet in applets:
            if applet != "busybox":
                link = tarfile.TarInfo(f"bin/{applet}")
                link.type, link.linkname, link.mode = tarfile.SYMTYPE, "busybox", 0o777
                tar.addfile(link)
        add_file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n")
        add_file("etc/group", b"root:x:0:\nnogroup:x:65534:\n")
    labels = {f"{LABEL}.busybox": version}
    env = {"PATH": "/bin"}
    return buf.getvalue(), labels, env


def bootstrap(
    flavor: Flavor = "python",
    *,
    suite: str | None = None,
    mirror: str | None = None,
    ca_bundle: str | Path | None = HOST_CA_BUNDLE,
    force: bool = False,
    engine: EngineClient | None = None,
    progress: Progress | None = None,
    workdir: str | Path | None = None,
) -> BaseImage:
    """Make the base image of ``flavor`` in the engine unless it is already there.

    Args:
        flavor: ``python`` (Debian minbase + python3, pip, venv, CA certificates) or ``busybox``.
        suite: Debian suite; default the host's codename.
        mirror: Debian archive URI; default the one the host's apt configuration uses.
        ca_bundle: PEM bundle whose certificates the image must trust (those the rootfs lacks are
            added); ``None`` adds none. Default: the host's bundle.
        force: rebuild even when the image exists.
        engine: engine address (default from ``DOCKER_HOST``).
        progress: called with one line of text per step or tool output line.
        workdir: scratch folder (default a temporary folder under /var/tmp, removed afterwards).

    Returns:
        The image, with ``existed=True`` when nothing had to be made.

    Raises:
        InputError: unknown flavor, unreadable CA bundle, no mirror configured.
        ToolMissing: debootstrap/busybox/root missing.
        BootstrapError: a tool failed (step and log tail attached).
        EngineUnavailable, EngineError: the engine could not take the image.
    """
    import time

    started = time.monotonic()
    if flavor not in FLAVORS:
        raise InputError(f"unknown flavor {flavor!r}", hint=f"choose one of: {', '.join(FLAVORS)}")
    report = progress or (lambda _line: None)
    engine = engine or EngineClient.from_env()
    suite = suite or host_suite()
    ref = base_image_ref(flavor, suite)
    if not force:
        found = engine.inspect_image(ref)
        if found is not None:
            labels = dict((found.get("Config") or {}).get("Labels") or {})
            return BaseImage.from_labels(ref, labels, image_id=str(found.get("Id", "")), existed=True)
    bundle = Path(ca_bundle) if ca_bundle else None
    if bundle is not None and not bundle.is_file():
        raise InputError(f"CA bundle {bundle} is not a readable file", hint="pass --ca-bundle FILE or --ca-bundle none")
    if flavor == "python":
        mirror = mirror or find_mirror(suite)
    scratch = Path(tempfile.mkdtemp(prefix="dockyard-base-", dir=workdir or "/var/tmp"))
    try:
        if flavor == "python":
            assert mirror is not None
            body, labels, env = _bootstrap_python(suite, mirror, bundle, scratch, report)
            packages = PYTHON_PACKAGES
            cmd = ["python3"]
        else:
            body, labels, env = _bootstrap_busybox(scratch, report)
            packages = ("busybox-static",)
            cmd = ["sh"]
        created = _dt.datetime.now(_dt.UTC).replace(microsecond=0).isoformat()
        labels.update(
            {
                f"{LABEL}.flavor": flavor,
                f"{LABEL}.suite": suite,
                f"{LABEL}.packages": ",".join(packages),
                f"{LABEL}.created": created,
            }
        )
        image_id = _import_rootfs(engine, body, ref, _changes(labels, env, cmd))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    report(f"tagged {ref} ({image_id[:19]})")
    base = BaseImage.from_labels(ref, labels, image_id=image_id, existed=False)
    return BaseImage(**{**base.__dict__, "seconds": time.monotonic() - started})
