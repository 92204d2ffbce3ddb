"""The Docker Engine client: its address, one-request HTTP, the ``/grpc`` hijack, docker-py.

This is the one boundary where ``docker.errors`` and socket ``OSError``\\ s become
``dockyard.errors``. The raw HTTP helpers import only the standard library, so a health check or a
cache-hit verification costs one request, not the ~300 ms import of the docker SDK.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import ssl
import urllib.parse
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..errors import EngineError, EngineUnavailable, InputError

if TYPE_CHECKING:  # pragma: no cover
    import docker

__all__ = ["API_VERSION", "EngineClient", "EngineInfo", "HttpReply", "translate_docker_error"]

DEFAULT_UNIX_SOCKET = "/var/run/docker.sock"
# The API version every call pins: Docker 20.10 speaks 1.41, newer engines still accept it.
API_VERSION = "1.41"


@dataclass(frozen=True)
class HttpReply:
    status: int
    headers: Mapping[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body or b"null")


@dataclass(frozen=True)
class EngineInfo:
    """What ``GET /version`` says about the engine."""

    version: str
    api_version: str
    os: str
    arch: str


@dataclass(frozen=True)
class EngineClient:
    """A Docker Engine, where it listens (``unix:///path`` or ``tcp://host:port``, TLS per env) and
    the requests dockyard makes to it.

    Built from ``DOCKER_HOST`` (default ``unix:///var/run/docker.sock``), ``DOCKER_TLS_VERIFY``
    and ``DOCKER_CERT_PATH``, the variables the docker CLI honours.
    """

    url: str
    unix_path: str | None = None
    host: str | None = None
    port: int | None = None
    tls_verify: bool = False
    cert_path: str | None = None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> EngineClient:
        """Parse the engine address from the environment.

        Raises:
            InputError: ``DOCKER_HOST`` has a scheme dockyard cannot dial (e.g. ``ssh://``).
        """
        env = os.environ if environ is None else environ
        raw = env.get("DOCKER_HOST") or f"unix://{DEFAULT_UNIX_SOCKET}"
        tls = env.get("DOCKER_TLS_VERIFY", "") not in ("", "0")
        return cls.parse(raw, tls_verify=tls, cert_path=env.get("DOCKER_CERT_PATH") or None)

    @classmethod
    def parse(cls, raw: str, *, tls_verify: bool = False, cert_path: str | None = None) -> EngineClient:
        parsed = urllib.parse.urlsplit(raw)
        if parsed.scheme == "unix":
            path = (parsed.netloc + parsed.path) or DEFAULT_UNIX_SOCKET
            return cls(url=f"unix://{path}", unix_path=path)
        if parsed.scheme == "tcp" and parsed.hostname:
            port = parsed.port or (2376 if tls_verify else 2375)
            return cls(
                url=f"tcp://{parsed.hostname}:{port}",
                host=parsed.hostname,
                port=port,
                tls_verify=tls_verify,
                cert_path=cert_path,
            )
        raise InputError(
            f"DOCKER_HOST={raw!r} is not an address dockyard can dial",
            hint="use unix:///path/to/docker.sock or tcp://host:port",
        )

    # -- sockets -------------------------------------------------------------------------------

    def connect(self, timeout: float | None = 5.0) -> socket.socket:
        """Open a stream socket to the engine.

        Raises:
            EngineUnavailable: nothing accepts connections there.
        """
        try:
            if self.unix_path is not None:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.settimeout(timeout)
                sock.connect(self.unix_path)
                return sock
            sock = socket.create_connection((self.host, self.port), timeout=timeout)
            if self.tls_verify or self.cert_path:
                sock = self._tls_context().wrap_socket(sock, server_hostname=self.host)
            return sock
        except FileNotFoundError as exc:
            raise EngineUnavailable(self.url, "the socket does not exist") from exc
        except PermissionError as exc:
            raise EngineUnavailable(
                self.url, "permission denied (add yourself to the 'docker' group, or run as root)"
            ) from exc
        except OSError as exc:
            raise EngineUnavailable(self.url, exc.strerror or str(exc)) from exc

    def _tls_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context()
        if self.cert_path:
            ca = os.path.join(self.cert_path, "ca.pem")
            if os.path.exists(ca):
                ctx.load_verify_locations(ca)
            ctx.load_cert_chain(
                os.path.join(self.cert_path, "cert.pem"), os.path.join(self.cert_path, "key.pem")
            )
        if not self.tls_verify:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        return ctx

    # -- one-request HTTP ----------------------------------------------------------------------

    def request(
        self,
        method: str,
        path: str,
        *,
        body: bytes | Iterable[bytes] | None = None,
        headers: Mapping[str, str] | None = None,
        timeout: float | None = 10.0,
    ) -> HttpReply:
        """Send one HTTP request to the engine API (path without the version prefix).

        ``body`` may be an iterable of chunks (sent with chunked encoding, e.g. a rootfs tarball).

        Raises:
            EngineUnavailable: the engine cannot be reached or hung up.
        """
        conn = _SocketHTTPConnection(self, timeout)
        try:
            chunked = body is not None and not isinstance(body, (bytes, bytearray))
            conn.request(
                method,
                f"/v{API_VERSION}{path}",
                body=body,
                headers=dict(headers or {}),
                encode_chunked=chunked,
            )
            resp = conn.getresponse()
            return HttpReply(resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read())
        except EngineUnavailable:
            raise
        except (OSError, http.client.HTTPException) as exc:
            raise EngineUnavailable(self.url, f"{type(exc).__name__}: {exc}") from exc
        finally:
            conn.close()

    def http_connection(self, timeout: float | None = 10.0) -> http.client.HTTPConnection:
        """An ``http.client`` connection to the engine, for replies read as they stream (pulls)."""
        return _SocketHTTPConnection(self, timeout)

    def ping(self, timeout: float = 3.0) -> str:
        """``GET /_ping``; returns the API version header.

        Raises:
            EngineUnavailable: no engine, or it did not answer OK.
        """
        reply = self.request("GET", "/_ping", timeout=timeout)
        if reply.status != 200:
            raise EngineUnavailable(self.url, f"/_ping answered HTTP {reply.status}")
        return reply.headers.get("api-version", "")

    def info(self, timeout: float = 5.0) -> EngineInfo:
        """``GET /version``: engine version, API version, OS and architecture."""
        reply = self.request("GET", "/version", timeout=timeout)
        if reply.status != 200:
            raise EngineError(f"GET /version answered HTTP {reply.status}", status=reply.status)
        data = reply.json()
        return EngineInfo(
            version=str(data.get("Version", "")),
            api_version=str(data.get("ApiVersion", "")),
            os=str(data.get("Os", "")),
            arch=str(data.get("Arch", "")),
        )

    def inspect_image(self, ref: str, timeout: float = 5.0) -> dict[str, Any] | None:
        """``GET /images/<ref>/json``, or ``None`` when the engine has no such image (one request)."""
        reply = self.request("GET", f"/images/{urllib.parse.quote(ref, safe='')}/json", timeout=timeout)
        if reply.status == 404:
            return None
        if reply.status != 200:
            raise EngineError(f"inspecting image {ref} answered HTTP {reply.status}", status=reply.status)
        return dict(reply.json())

    def image_labels(self, ref: str, timeout: float = 5.0) -> dict[str, str] | None:
        """Labels of a local image, or ``None`` when the engine has no such image."""
        data = self.inspect_image(ref, timeout)
        return None if data is None else dict((data.get("Config") or {}).get("Labels") or {})

    def hijack(self, path: str, headers: Mapping[str, str] | None = None, timeout: float = 10.0) -> socket.socket:
        """``POST path`` with ``Upgrade: h2c`` and return the raw socket after ``101``.

        Used for BuildKit's ``/grpc`` endpoint: after the switch the socket speaks HTTP/2 and the
        caller is the HTTP/2 client. Headers are read byte by byte so no HTTP/2 byte the engine
        sends right after the switch is swallowed.

        Raises:
            EngineUnavailable: no engine.
            EngineError: the engine did not switch protocols (e.g. an engine without BuildKit).
        """
        sock = self.connect(timeout)
        extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
        req = f"POST {path} HTTP/1.1\r\nHost: docker\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n{extra}\r\n"
        try:
            sock.sendall(req.encode("ascii"))
            head = bytearray()
            while not head.endswith(b"\r\n\r\n"):
                chunk = sock.recv(1)
                if not chunk:
                    raise EngineError(f"the engine closed the connection during POST {path}")
                head += chunk
                if len(head) > 65536:
                    raise EngineError(f"oversized reply header to POST {path}")
        except OSError as exc:
            sock.close()
            raise EngineUnavailable(self.url, f"POST {path}: {exc}") from exc
        except EngineError:
            sock.close()
            raise
        status_line = head.split(b"\r\n", 1)[0].decode("latin-1")
        if " 101 " not in f"{status_line} ":
            sock.close()
            raise EngineError(
                f"the engine refused POST {path}: {status_line}",
                hint="the engine must be Docker 18.09+ with BuildKit built in",
            )
        sock.settimeout(None)
        return sock

    # -- docker-py -------------------------------------------------------------------------------

    def docker_client(self, timeout: int = 600, max_pool_size: int = 10) -> docker.DockerClient:
        """A docker-py client for the same engine (imported lazily: it costs ~300 ms)."""
        import docker

        tls: Any = False
        if self.tls_verify or self.cert_path:
            cp = self.cert_path or os.path.expanduser("~/.docker")
            tls = docker.tls.TLSConfig(
                client_cert=(os.path.join(cp, "cert.pem"), os.path.join(cp, "key.pem")),
                ca_cert=os.path.join(cp, "ca.pem") if self.tls_verify else None,
                verify=self.tls_verify,
            )
        return docker.DockerClient(base_url=self.url, version=API_VERSION, timeout=timeout, tls=tls,
                                   max_pool_size=max_pool_size)


class _SocketHTTPConnection(http.client.HTTPConnection):
    """``http.client`` over whatever socket :meth:`EngineClient.connect` opens."""

    def __init__(self, address: EngineClient, timeout: float | None) -> None:
        super().__init__("docker", timeout=timeout)
        self._address = address

    def connect(self) -> None:
        self.sock = self._address.connect(self.timeout)


def translate_docker_error(exc: Exception, action: str) -> Exception:
    """Map a docker-py/requests exception raised while doing ``action`` onto dockyard's tree.

    Callers write ``raise translate_docker_error(exc, "importing X") from exc``.
    """
    import docker.errors
    import requests.exceptions

    if isinstance(exc, docker.errors.APIError):
        status = exc.status_code
        explanation = exc.explanation or str(exc)
        return EngineError(f"{action} failed: {explanation}", status=status)
    if isinstance(exc, (requests.exceptions.ConnectionError, docker.errors.DockerException)):
        return EngineUnavailable(EngineClient.from_env().url, f"{action}: {exc}")
    return EngineError(f"{action} failed: {exc}")
