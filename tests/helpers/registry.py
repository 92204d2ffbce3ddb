"""A real, private container registry on loopback for integration tests.

:class:`LocalRegistry` runs Debian's ``docker-registry`` (distribution 2.x) on ``127.0.0.1`` at a
free port, with htpasswd (bcrypt) authentication and storage in a temporary directory. Docker
treats every ``127.0.0.0/8`` registry as insecure by default, so the engine talks plain HTTP to it
and no certificate is needed::

    with LocalRegistry() as reg:
        ref = f"{reg.address}/team/app:1"        # push/pull with reg.username / reg.password
"""

from __future__ import annotations

import http.client
import json
import os
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import TracebackType
from typing import Any

REGISTRY_BINARY = "docker-registry"  # Debian's package name for distribution's `registry`
HTPASSWD_BINARY = "htpasswd"  # apache2-utils

__all__ = ["LocalRegistry", "RegistryStartError", "free_port", "local_registry_fixture"]


class RegistryStartError(RuntimeError):
    """The registry could not be started; the message carries its log."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now (the kernel picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class LocalRegistry:
    """``docker-registry`` on ``127.0.0.1:<free port>`` with htpasswd auth; a context manager.

    Attributes:
        address: ``"127.0.0.1:PORT"``, the registry host to put in image references.
        username: the one user in the htpasswd file.
        password: that user's password (random unless given).
        log: the registry's log, kept after it stopped (for failure messages).
    """

    def __init__(
        self,
        *,
        username: str = "dockyard",
        password: str | None = None,
        binary: str = REGISTRY_BINARY,
        start_timeout: float = 15.0,
    ) -> None:
        self.username = username
        self.password = password if password is not None else f"pw-{secrets.token_hex(12)}"
        self.binary = binary
        self.start_timeout = start_timeout
        self.port = 0
        self.log = ""
        self._dir: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def __repr__(self) -> str:  # never show the password
        return f"LocalRegistry(address={self.address!r}, username={self.username!r}, running={self.running})"

    # -- life cycle ------------------------------------------------------------------------------

    def start(self) -> LocalRegistry:
        """Start the registry and wait until ``GET /v2/`` answers 401 (auth is on).

        Raises:
            RegistryStartError: a tool is missing, or the registry did not come up (log attached).
        """
        for tool in (self.binary, HTPASSWD_BINARY):
            if shutil.which(tool) is None:
                raise RegistryStartError(
                    f"{tool} is not installed (apt-get install docker-registry apache2-utils, "
                    "or run ./scripts/setup-engine)"
                )
        self._dir = Path(tempfile.mkdtemp(prefix="dockyard-registry-"))
        htpasswd = self._dir / "htpasswd"
        htpasswd.write_bytes(self._bcrypt_line())
        (self._dir / "storage").mkdir()
        # The free port is released before the registry binds it; another process may take it in
        # between, so a start that fails on a taken port is retried with a new one.
        for attempt in range(3):
            self.port = free_port()
            config = self._dir / "config.yml"
            config.write_text(self._config(htpasswd))
            try:
                self._launch(config)
                return self
            except RegistryStartError:
                self._kill()
                if "address already in use" not in self._read_log() or attempt == 2:
                    self.stop()
                    raise
        raise AssertionError("unreachable")  # pragma: no cover

    def pause(self) -> None:
        """Stop the registry's process but keep its port and storage (a registry that is down)."""
        self._kill()

    def resume(self) -> None:
        """Start it again after :meth:`pause`, on the same port with the same storage.

        Raises:
            RegistryStartError: it did not come up (another process took the port meanwhile).
        """
        assert self._dir is not None, "resume() after start() and pause()"
        self._launch(self._dir / "config.yml")

    def stop(self) -> None:
        """Stop the registry (terminate, then kill) and delete its storage; keep its log."""
        self._kill()
        if self._dir is not None:
            self.log = self._read_log()
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def __enter__(self) -> LocalRegistry:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # -- queries -------------------------------------------------------------------------------

    def push_local(self, source: str, name: str, engine: Any = None) -> str:
        """Push the local image ``source`` as ``<address>/<name>`` with this registry's user, and
        drop that name from the engine again; returns the pushed reference."""
        import urllib.parse

        from dockyard._environment import ContainerRegistry
        from dockyard.build._registry import push_image
        from dockyard.dockerd import EngineClient

        engine = engine or EngineClient.from_env()
        remote = f"{self.address}/{name}"
        repo, _, tag = remote.rpartition(":")
        reply = engine.request("POST", f"/images/{urllib.parse.quote(source, safe='')}/tag?"
                               + urllib.parse.urlencode({"repo": repo, "tag": tag}))
        assert reply.status == 201, reply.body
        creds = ContainerRegistry(address=self.address, username=self.username)
        creds.password = self.password
        try:
            push_image(name, creds, engine=engine)
        finally:
            engine.request("DELETE", f"/images/{urllib.parse.quote(remote, safe='')}")
        return remote

    def log_tail(self, lines: int = 40) -> str:
        """The last lines of the registry's log (live while running, kept after stop)."""
        text = self._read_log() if self._dir is not None else self.log
        return "\n".join(text.splitlines()[-lines:])

    def catalog(self) -> list[str]:
        """Repositories the registry holds (``GET /v2/_catalog`` with the right credentials)."""
        status, body = self._get("/v2/_catalog", auth=True)
        if status != 200:
            raise RegistryStartError(f"GET /v2/_catalog answered {status}\n{self.log_tail()}")
        return list(json.loads(body).get("repositories") or [])

    # -- internals -----------------------------------------------------------------------------

    def _bcrypt_line(self) -> bytes:
        # -i reads the password from stdin, so it never shows in the process list.
        out = subprocess.run(
            [HTPASSWD_BINARY, "-B", "-i", "-n", self.username],
            input=self.password.encode(),
            capture_output=True,
            check=True,
            timeout=30,
        )
        return out.stdout.strip() + b"\n"

    def _config(self, htpasswd: Path) -> str:
        assert self._dir is not None
        # JSON strings are valid YAML scalars: paths with odd characters stay safe.
        q = json.dumps
        return (
            "version: 0.1\n"
            "log:\n"
            "  level: info\n"
            "  accesslog:\n"
            "    disabled: false\n"
            "storage:\n"
            "  filesystem:\n"
            f"    rootdirectory: {q(str(self._dir / 'storage'))}\n"
            "  delete:\n"
            "    enabled: true\n"
            "http:\n"
            f"  addr: {q(self.address)}\n"
            f"  secret: {q(secrets.token_hex(16))}\n"
            "auth:\n"
            "  htpasswd:\n"
            "    realm: dockyard-test-registry\n"
            f"    path: {q(str(htpasswd))}\n"
        )

    def _launch(self, config: Path) -> None:
        assert self._dir is not None
        with open(self._dir / "registry.log", "ab") as log:
            self._proc = subprocess.Popen(
                [self.binary, "serve", str(config)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self._dir,
                start_new_session=True,  # a Ctrl-C in the test run does not reach it half-way
            )
        deadline = time.monotonic() + self.start_timeout
        last = "no answer yet"
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RegistryStartError(
                    f"{self.binary} exited with {self._proc.returncode} before answering\n{self.log_tail()}"
                )
            try:
                status, _ = self._get("/v2/", auth=False, timeout=1.0)
            except OSError as exc:
                last = f"{type(exc).__name__}: {exc}"
            else:
                if status == 401:
                    return
                last = f"GET /v2/ answered {status}, expected 401 (auth off?)"
            time.sleep(0.05)
        raise RegistryStartError(
            f"{self.binary} did not answer on {self.address} within {self.start_timeout}s ({last})\n"
            f"{self.log_tail()}"
        )

    def _get(self, path: str, *, auth: bool, timeout: float = 5.0) -> tuple[int, bytes]:
        import base64

        headers = {}
        if auth:
            token = base64.b64encode(f"{self.username}:{self.password}".encode()).decode()
            headers["Authorization"] = f"Basic {token}"
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            conn.request("GET", path, headers=headers)
            resp = conn.getresponse()
            return resp.status, resp.read()
        finally:
            conn.close()

    def _kill(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)

    def _read_log(self) -> str:
        if self._dir is None:
            return self.log
        try:
            return (self._dir / "registry.log").read_text(errors="replace")
        except FileNotFoundError:
            return ""


def local_registry_fixture(*, scope: str = "module", name: str = "local_registry") -> Callable[..., Any]:
    """A pytest fixture that yields a running :class:`LocalRegistry` and stops it afterwards.

    Use it in a test module (or conftest) as ``local_registry = local_registry_fixture()``.
    Where the registry tools are missing the tests skip, unless ``DOCKYARD_REQUIRE_ENGINE=1``
    (CI), where they fail.
    """
    import pytest

    def _fixture() -> Iterator[LocalRegistry]:
        registry = LocalRegistry()
        try:
            registry.start()
        except RegistryStartError as exc:
            missing = "not installed" in str(exc)
            if missing and os.environ.get("DOCKYARD_REQUIRE_ENGINE") != "1":
                pytest.skip(str(exc))
            pytest.fail(f"the local registry did not start: {exc}", pytrace=False)
        try:
            yield registry
        finally:
            registry.stop()

    return pytest.fixture(scope=scope, name=name)(_fixture)  # type: ignore[call-overload,no-any-return]
