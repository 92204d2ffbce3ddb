"""A second, private Docker Engine on this machine, for fault tests (restarts, outages, kills).

:class:`SecondEngine` runs another ``dockerd`` next to the machine's engine, with everything of its
own: data-root, exec-root (hence its own containerd), pidfile, unix socket, cgroup parent and a
network bridge the helper creates. The first engine (``/var/run/docker.sock``) is never stopped,
restarted or reconfigured::

    with SecondEngine() as eng:                 # or the fixture: second_engine_fixture()
        eng.load_image("dockyard/base:bookworm-busybox")
        cid = eng.run_container("dockyard/base:bookworm-busybox", ["sleep", "30"])
        eng.restart()                          # same folders: images and containers persist
        eng.kill()                             # SIGKILL dockerd only: an engine outage
        eng.start()

Networking (checked on Debian's docker.io 20.10):

* The engine is started with ``--bridge=<a bridge this helper creates>`` (named ``dy2…``, on a
  free ``10.213.N.0/24``) and ``--iptables=false --ip-masq=false --ip-forward=false``, so it
  never writes the host's iptables or sysctls. Containers created with **no** ``NetworkMode``
  (the API default, i.e. ``"default"`` → ``bridge``) start fine and get an address on that
  bridge; they can reach the host through the bridge's gateway but nothing beyond it (no NAT).
  ``NetworkMode: "none"`` and ``"host"`` work too. Callers need to do nothing special.
* ``--bridge=none`` is deliberately NOT used: dockerd then calls ``removeDefaultBridgeInterface()``,
  which deletes the host's link named ``docker0`` — the *first* engine's bridge — and the first
  engine's next bridged container fails with "could not find bridge docker0". (On such an engine
  default-network containers would start with only ``lo``.) Never start a second dockerd with
  ``--bridge=none`` or on ``docker0`` in the host's network namespace.

Restarts and kills (observed, see ``tests/integration/test_engine2_helper.py``):

* ``restart()`` keeps the live-restore mode. With ``live_restore=True`` both the stopping and the
  starting dockerd have ``--live-restore``, and running containers survive (same ``State.Pid``).
* ``kill()`` SIGKILLs dockerd; its containerd dies with it (Pdeathsig), shims and containers live
  on, and a ``start(live_restore=True)`` adopts them (same pid).
* ``restart(live_restore=False)`` from a live-restore engine, or ``kill()`` then a plain
  ``start()``: the new dockerd shuts the surviving containers down while restoring them
  (SIGTERM, SIGKILL after their stop timeout, 10 s by default) before it answers, so that
  start takes ~10 s. Inspect then says ``Status "exited"``, ``ExitCode 137`` (for a process
  that ignores SIGTERM, e.g. ``sleep`` as PID 1), ``FinishedAt`` set, ``Error ""``.
* A ``stop()`` without live-restore stops the containers the same way (~10 s) before exiting.

Needs root and ``dockerd``/``ip`` on ``PATH`` (or ``/usr/sbin``); the socket and exec-root paths
are kept short (unix socket paths are limited to ~107 bytes) under ``/tmp/dy2-…``.
"""

from __future__ import annotations

import contextlib
import ctypes
import ipaddress
import json
import os
import random
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.parse
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from dockyard.dockerd import API_VERSION, EngineClient
from dockyard.errors import DockyardError

__all__ = ["SecondEngine", "SecondEngineError", "second_engine_fixture"]

DOCKERD_BINARY = "dockerd"
# Private /24s come from here; Docker's default address pools (172.17-31/16, 192.168/16) do not.
SUBNET_POOL = ipaddress.ip_network("10.213.0.0/16")
# Flags the helper owns: passing them through extra_args would break the isolation.
_OWNED_FLAGS = (
    "--bridge", "-b", "--bip", "--iptables", "--ip-masq", "--ip-forward", "--data-root", "--exec-root",
    "--pidfile", "-p", "--host", "-H", "--live-restore", "--config-file", "--cgroup-parent", "--containerd",
)
_MNT_DETACH = 2
_SBIN = ("/usr/local/sbin", "/usr/sbin", "/sbin", "/usr/local/bin", "/usr/bin", "/bin")


class SecondEngineError(RuntimeError):
    """The second engine could not be started, stopped or used; the message carries its log tail."""


class SecondEngine:
    """A second ``dockerd`` with its own folders, socket and bridge; a context manager.

    Attributes:
        folder: the engine's folder (``/tmp/dy2-…``): ``data/``, ``exec/``, ``docker.sock``,
            ``dockerd.log``; removed by :meth:`close`.
        first: the machine's engine, where :meth:`load_image` copies images from.
        live_restore: whether the running (or last started) dockerd has ``--live-restore``.
        timings: ``(event, seconds)`` for every start, stop and kill, for reports.
        log: dockerd's log, kept after :meth:`close` (for failure messages).
    """

    def __init__(
        self,
        *,
        first: EngineClient | None = None,
        extra_args: Sequence[str] = (),
        start_timeout: float = 60.0,
        stop_timeout: float = 45.0,
        binary: str = DOCKERD_BINARY,
    ) -> None:
        for arg in extra_args:
            if arg.split("=", 1)[0] in _OWNED_FLAGS:
                raise ValueError(f"{arg!r}: SecondEngine sets this flag itself")
        self.first = first if first is not None else EngineClient.from_env()
        self.extra_args = list(extra_args)
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout
        self.binary = binary
        self.live_restore = False
        self.timings: list[tuple[str, float]] = []
        self.log = ""
        self.folder: Path | None = None
        self.bridge = ""
        self.subnet: ipaddress.IPv4Network | None = None
        self._tag = ""
        self._proc: subprocess.Popen[bytes] | None = None
        self._starts = 0

    # -- addresses -------------------------------------------------------------------------------

    @property
    def socket_path(self) -> str:
        if self.folder is None:
            raise SecondEngineError("the second engine has no folder yet (call start())")
        return str(self.folder / "docker.sock")

    @property
    def url(self) -> str:
        """``unix:///tmp/dy2-…/docker.sock``."""
        return f"unix://{self.socket_path}"

    @property
    def docker_host(self) -> str:
        """The ``DOCKER_HOST`` value that points the docker CLI, docker-py or dockyard here."""
        return self.url

    @property
    def client(self) -> EngineClient:
        """An :class:`EngineClient` for this engine."""
        return EngineClient.parse(self.url)

    @property
    def pid(self) -> int | None:
        """dockerd's pid while it runs, else ``None``."""
        return self._proc.pid if self.running and self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def __repr__(self) -> str:
        return f"SecondEngine(url={self.url if self.folder else None!r}, running={self.running}, live_restore={self.live_restore})"

    # -- life cycle ------------------------------------------------------------------------------

    def start(self, live_restore: bool = False) -> SecondEngine:
        """Start dockerd (creating its folder and bridge the first time) and wait for ``/_ping``.

        Args:
            live_restore: pass ``--live-restore``: containers keep running while dockerd is down,
                and are adopted again when a live-restore dockerd starts.

        Raises:
            SecondEngineError: not root, a tool is missing, or dockerd exited or did not answer
                within ``start_timeout`` (its log tail attached).
        """
        if self.running:
            raise SecondEngineError(f"the second engine already runs (pid {self.pid})")
        if os.geteuid() != 0:
            raise SecondEngineError("a second dockerd needs root")
        binary = _which(self.binary)
        if self.folder is None:
            self._create_folder()
        assert self.folder is not None
        self._starts += 1
        self.live_restore = live_restore
        args = [
            binary,
            f"--data-root={self.folder / 'data'}",
            f"--exec-root={self.folder / 'exec'}",
            f"--pidfile={self.folder / 'dockerd.pid'}",
            f"--host=unix://{self.socket_path}",
            f"--config-file={self.folder / 'daemon.json'}",  # never /etc/docker/daemon.json
            f"--bridge={self.bridge}",
            "--iptables=false",
            "--ip-masq=false",
            "--ip-forward=false",
            f"--cgroup-parent=/{self._tag}",
            *(["--live-restore"] if live_restore else []),
            *self.extra_args,
        ]
        self._forget_dead_containerd()
        env = dict(os.environ)
        env["PATH"] = os.pathsep.join([*env.get("PATH", "").split(os.pathsep), *_SBIN])
        env.pop("DOCKER_HOST", None)
        began = time.monotonic()
        with open(self.folder / "dockerd.log", "ab") as log:
            log.write(f"\n--- SecondEngine: start #{self._starts} live_restore={live_restore} ---\n".encode())
            log.flush()
            self._proc = subprocess.Popen(
                args, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
                start_new_session=True,  # a Ctrl-C in pytest does not reach dockerd first
            )
        self._wait_ready(began)
        self.timings.append((f"start(live_restore={live_restore})", time.monotonic() - began))
        return self

    def stop(self, timeout: float | None = None) -> None:
        """SIGTERM dockerd and wait for it to exit; SIGKILL it after ``timeout`` (``stop_timeout``).

        Without live-restore, dockerd stops its running containers first (their stop timeout,
        10 s by default); with it they keep running. Folders, images and containers are kept.
        """
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return
        began = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=self.stop_timeout if timeout is None else timeout)
            event = "stop"
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)
            event = "stop (SIGKILL after timeout)"
        self.timings.append((f"{event}(live_restore={self.live_restore})", time.monotonic() - began))

    def restart(self, live_restore: bool | None = None) -> SecondEngine:
        """:meth:`stop`, then :meth:`start` on the same folders (images and containers persist).

        Args:
            live_restore: the new dockerd's mode; ``None`` keeps the current one. Containers
                survive only when both the old and the new dockerd have live-restore.
        """
        mode = self.live_restore if live_restore is None else live_restore
        began = time.monotonic()
        self.stop()
        self.start(live_restore=mode)
        self.timings.append((f"restart(live_restore={mode})", time.monotonic() - began))
        return self

    def kill(self) -> None:
        """SIGKILL dockerd only (an engine crash). Its containerd, shims and containers are left
        as the kernel leaves them; :meth:`start` adopts what still runs."""
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return
        began = time.monotonic()
        proc.kill()
        proc.wait(timeout=30)
        # dockerd starts its containerd with Pdeathsig=SIGKILL, so containerd dies with it; wait
        # for that, so the "crash" is complete when kill() returns. Shims and containers live on.
        pid = self._containerd_pid()
        deadline = time.monotonic() + 10
        while pid is not None and _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        self.timings.append(("kill", time.monotonic() - began))

    def close(self) -> None:
        """Remove every container, stop dockerd, kill leftovers, unmount, delete the folder and bridge.

        Safe to call more than once, and after :meth:`kill` (dockerd is started once more so the
        engine itself removes its containers). Keeps the log in :attr:`log`.
        """
        if self.folder is None:
            return
        try:
            if not self.running:
                with contextlib.suppress(SecondEngineError, OSError):
                    self.start(live_restore=False)  # a non-live-restore start kills what survived
            if self.running:
                with contextlib.suppress(DockyardError, SecondEngineError):
                    self.remove_all_containers()
            self.stop(timeout=20)
        finally:
            self.log = self._read_log()
            self._kill_leftovers()
            _unmount_under(self.folder)
            shutil.rmtree(self.folder, ignore_errors=True)
            self._remove_cgroups()
            if self.bridge:
                subprocess.run([_which("ip"), "link", "del", self.bridge], capture_output=True, check=False)
            self.folder = None
            self._proc = None

    def __enter__(self) -> SecondEngine:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # -- the engine ------------------------------------------------------------------------------

    def load_image(self, ref: str, timeout: float = 300.0) -> str:
        """Copy image ``ref`` from the first engine into this one, streamed through the engine API
        (``GET /images/{ref}/get`` → ``POST /images/load``); returns its image ID here.

        Raises:
            SecondEngineError: the first engine has no such image, or the load failed.
        """
        quoted = urllib.parse.quote(ref, safe="")
        conn = self.first.http_connection(timeout=timeout)
        try:
            conn.request("GET", f"/v{API_VERSION}/images/{quoted}/get")
            resp = conn.getresponse()
            if resp.status != 200:
                raise SecondEngineError(
                    f"the first engine ({self.first.url}) cannot export {ref}: HTTP {resp.status} "
                    f"{resp.read()[:300]!r}"
                )

            def chunks() -> Iterator[bytes]:
                while block := resp.read(1 << 20):
                    yield block

            reply = self.client.request(
                "POST", "/images/load?quiet=1", body=chunks(),
                headers={"Content-Type": "application/x-tar"}, timeout=timeout,
            )
        finally:
            conn.close()
        errors = [m.get("error") for m in _json_lines(reply.body) if m.get("error")]
        if reply.status != 200 or errors:
            raise SecondEngineError(f"loading {ref} answered HTTP {reply.status}: {errors or reply.body[:300]!r}")
        data = self.client.inspect_image(ref)
        if data is None:
            raise SecondEngineError(f"{ref} was loaded but the second engine does not list it\n{self.log_tail()}")
        return str(data["Id"])

    def run_container(
        self,
        image: str,
        cmd: Sequence[str],
        *,
        name: str | None = None,
        host_config: dict[str, Any] | None = None,
        labels: dict[str, str] | None = None,
    ) -> str:
        """Create and start a container (no ``NetworkMode`` unless ``host_config`` says); its ID.

        Raises:
            SecondEngineError: the engine refused to create or start it.
        """
        body: dict[str, Any] = {"Image": image, "Cmd": list(cmd), "Labels": labels or {}}
        if host_config:
            body["HostConfig"] = host_config
        query = f"?{urllib.parse.urlencode({'name': name})}" if name else ""
        reply = self.client.request(
            "POST", f"/containers/create{query}", body=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        if reply.status != 201:
            raise SecondEngineError(f"create {image} {list(cmd)} answered HTTP {reply.status}: {reply.body[:300]!r}")
        cid = str(reply.json()["Id"])
        reply = self.client.request("POST", f"/containers/{cid}/start", timeout=60)
        if reply.status not in (204, 304):
            raise SecondEngineError(
                f"start {cid[:12]} answered HTTP {reply.status}: {reply.body[:300]!r}\n{self.log_tail()}"
            )
        return cid

    def inspect_container(self, cid: str) -> dict[str, Any] | None:
        """``GET /containers/{id}/json``, or ``None`` when there is no such container."""
        reply = self.client.request("GET", f"/containers/{cid}/json")
        if reply.status == 404:
            return None
        if reply.status != 200:
            raise SecondEngineError(f"inspect {cid[:12]} answered HTTP {reply.status}: {reply.body[:300]!r}")
        return dict(reply.json())

    def running_containers(self) -> list[dict[str, Any]]:
        """Inspect dicts of the containers running on this engine."""
        return [c for c in (self.inspect_container(i) for i in self._container_ids(all_=False)) if c]

    def remove_all_containers(self) -> None:
        """Force-remove every container (running ones are SIGKILLed) with its anonymous volumes."""
        for cid in self._container_ids(all_=True):
            self.client.request("DELETE", f"/containers/{cid}?force=1&v=1", timeout=60)

    def log_tail(self, lines: int = 40) -> str:
        """The last lines of dockerd's log (live while the folder exists, kept after close)."""
        return "\n".join(self._read_log().splitlines()[-lines:])

    # -- internals -------------------------------------------------------------------------------

    def _container_ids(self, *, all_: bool) -> list[str]:
        reply = self.client.request("GET", f"/containers/json?all={int(all_)}")
        if reply.status != 200:
            raise SecondEngineError(f"listing containers answered HTTP {reply.status}")
        return [str(c["Id"]) for c in reply.json()]

    def _create_folder(self) -> None:
        ip = _which("ip")
        self.folder = Path(tempfile.mkdtemp(prefix="dy2-", dir="/tmp"))
        (self.folder / "daemon.json").write_text("{}\n")
        self._tag = f"dy2{secrets.token_hex(4)}"  # 11 chars: a link name may have 15
        self.bridge = self._tag
        self.subnet = _free_subnet()
        gateway = f"{next(self.subnet.hosts())}/{self.subnet.prefixlen}"
        try:
            for cmd in (
                ["link", "add", "name", self.bridge, "type", "bridge"],
                ["addr", "add", gateway, "dev", self.bridge],
                ["link", "set", "dev", self.bridge, "up"],
            ):
                subprocess.run([ip, *cmd], capture_output=True, check=True)
        except subprocess.CalledProcessError as exc:
            subprocess.run([ip, "link", "del", self.bridge], capture_output=True, check=False)
            shutil.rmtree(self.folder, ignore_errors=True)
            self.folder, self.bridge = None, ""
            raise SecondEngineError(f"ip {' '.join(exc.cmd[1:])} failed: {exc.stderr.decode(errors='replace')}") from exc

    def _wait_ready(self, began: float) -> None:
        assert self._proc is not None
        client = self.client
        last = "no answer yet"
        while time.monotonic() - began < self.start_timeout:
            if self._proc.poll() is not None:
                raise SecondEngineError(
                    f"dockerd exited with {self._proc.returncode} before answering\n{self.log_tail()}"
                )
            try:
                client.ping(timeout=2.0)
                return
            except DockyardError as exc:
                last = str(exc)
            time.sleep(0.05)
        self.kill()
        raise SecondEngineError(
            f"dockerd did not answer /_ping on {self.url} within {self.start_timeout}s ({last})\n{self.log_tail()}"
        )

    def _containerd_pid(self) -> int | None:
        assert self.folder is not None
        try:
            return int((self.folder / "exec" / "containerd" / "containerd.pid").read_text().strip())
        except (OSError, ValueError):
            return None

    def _forget_dead_containerd(self) -> None:
        """Remove containerd's pidfile when that containerd is dead but not yet reaped.

        After :meth:`kill`, the killed containerd is an orphan, and where PID 1 reaps orphans
        late (as on this project's machines) it lingers as a zombie. dockerd tests the pidfile's
        pid with ``kill(pid, 0)``, which a zombie passes: it would log "containerd is still
        running", wait for a socket nobody serves and exit after ~15 s.
        """
        pid = self._containerd_pid()
        if pid is not None and not _alive(pid):
            assert self.folder is not None
            with contextlib.suppress(FileNotFoundError):
                (self.folder / "exec" / "containerd" / "containerd.pid").unlink()

    def _read_log(self) -> str:
        if self.folder is None:
            return self.log
        try:
            return (self.folder / "dockerd.log").read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def _kill_leftovers(self) -> None:
        """SIGKILL whatever is still alive of this engine: container processes (by our cgroup
        parent), then containerd and shims (by our folder in their command line)."""
        assert self.folder is not None
        marker, needle = f"/{self._tag}/", str(self.folder).encode()
        for pid in _pids():
            with contextlib.suppress(OSError):
                in_cgroup = marker in Path(f"/proc/{pid}/cgroup").read_text()
                if in_cgroup or needle in Path(f"/proc/{pid}/cmdline").read_bytes():
                    os.kill(pid, signal.SIGKILL)

    def _remove_cgroups(self) -> None:
        if not self._tag:
            return
        # The cgroup parent is top-level: /sys/fs/cgroup/<controller>/dy2… (v1) or /sys/fs/cgroup/dy2… (v2).
        for top in [*Path("/sys/fs/cgroup").glob(f"*/{self._tag}"), Path("/sys/fs/cgroup") / self._tag]:
            for dirpath, _dirs, _files in os.walk(top, topdown=False):
                with contextlib.suppress(OSError):
                    os.rmdir(dirpath)


# -- module helpers --------------------------------------------------------------------------------


def _which(tool: str) -> str:
    found = shutil.which(tool) or shutil.which(tool, path=os.pathsep.join(_SBIN))
    if found is None:
        raise SecondEngineError(f"{tool} is not installed (apt-get install docker.io iproute2)")
    return found


def _free_subnet() -> ipaddress.IPv4Network:
    """A random /24 of :data:`SUBNET_POOL` that no address or route on this machine overlaps."""
    out = subprocess.run([_which("ip"), "-4", "-o", "route", "show", "table", "all"], capture_output=True, text=True)
    used = []
    for line in out.stdout.splitlines():
        for token in line.split()[:2]:  # "10.0.0.0/8 dev …", or a type first: "local 10.1.2.3 …"
            try:
                used.append(ipaddress.ip_network(token, strict=False))
                break
            except ValueError:
                continue
    candidates = list(SUBNET_POOL.subnets(new_prefix=24))
    random.shuffle(candidates)
    for net in candidates:
        if not any(net.overlaps(u) for u in used):
            return net
    raise SecondEngineError(f"no free /24 left in {SUBNET_POOL}")


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie does not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def _pids() -> list[int]:
    me = os.getpid()
    return [int(p) for p in os.listdir("/proc") if p.isdigit() and int(p) != me]


def _unmount_under(folder: Path) -> None:
    """Lazily unmount every mount at or below ``folder`` (overlay layers, netns, dockerd's own
    bind mount of its data-root), deepest first."""
    root = str(folder)
    libc = ctypes.CDLL(None, use_errno=True)
    for _ in range(3):  # a mount may hide another at the same point
        with open("/proc/mounts") as fh:
            points = [_unescape(line.split()[1]) for line in fh if len(line.split()) > 1]
        mine = [p for p in points if p == root or p.startswith(root + "/")]
        if not mine:
            return
        for point in sorted(mine, key=len, reverse=True):
            libc.umount2(point.encode(), _MNT_DETACH)


def _unescape(field: str) -> str:
    # /proc/mounts writes space, tab, newline and backslash as octal escapes (\040 …).
    return field.encode().decode("unicode_escape") if "\\" in field else field


def _json_lines(body: bytes) -> list[dict[str, Any]]:
    out = []
    for line in body.splitlines():
        with contextlib.suppress(ValueError):
            item = json.loads(line)
            if isinstance(item, dict):
                out.append(item)
    return out


def second_engine_fixture(
    *, scope: str = "module", name: str = "second_engine", live_restore: bool = False
) -> Callable[..., Any]:
    """A pytest fixture that yields a started :class:`SecondEngine` and always closes it.

    Use it in a test module as ``second_engine = second_engine_fixture()``. Where dockerd is
    missing or the tests do not run as root they skip, unless ``DOCKYARD_REQUIRE_ENGINE=1`` (CI),
    where they fail. On a failure the engine's log tail is in the error message.
    """
    import pytest

    def _fixture() -> Iterator[SecondEngine]:
        engine = SecondEngine()
        try:
            engine.start(live_restore=live_restore)
        except SecondEngineError as exc:
            engine.close()
            unavailable = "not installed" in str(exc) or "needs root" in str(exc)
            if unavailable and os.environ.get("DOCKYARD_REQUIRE_ENGINE") != "1":
                pytest.skip(str(exc))
            pytest.fail(f"the second engine did not start: {exc}", pytrace=False)
        try:
            yield engine
        finally:
            engine.close()

    return pytest.fixture(scope=scope, name=name)(_fixture)  # type: ignore[call-overload,no-any-return]
