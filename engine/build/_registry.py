"""Private base-image registries: pull, push and log in through the Docker Engine API.

Everything goes through the engine socket (``POST /images/create``, ``POST /images/{name}/push``,
``POST /auth``) with the standard library only, so no docker CLI and no docker SDK import is
needed. The engine dials the registry; dockyard hands it the credentials in the
``X-Registry-Auth`` header (URL-safe base64 of ``{"username", "password", "serveraddress"}``).

This module is the one boundary where the engine's registry failures become
:class:`~dockyard.errors.RegistryError` (unreachable, not found) and
:class:`~dockyard.errors.RegistryAuthError` (credentials refused or missing). The password never
leaves this module in text: every message, hint and progress line is passed through
:func:`~dockyard.errors.scrub` with the password and the encoded header.

Reference rule (Azure ML SDK v1 semantics, see :func:`qualify`): ``base_image_registry.address``
``myregistry.azurecr.io`` with ``base_image`` ``fastdotai/fastai2:latest`` pulls
``myregistry.azurecr.io/fastdotai/fastai2:latest``; a base image that already names that
registry is used as it is.
"""

from __future__ import annotations

import base64
import http.client
import json
import re
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from ..dockerd import API_VERSION, EngineClient
from ..errors import EngineError, EngineUnavailable, InputError, RegistryAuthError, RegistryError, scrub

if TYPE_CHECKING:  # pragma: no cover
    from .._environment import ContainerRegistry

__all__ = ["ImageName", "login_check", "parse_image_ref", "pull_image", "push_image", "qualify"]

Progress = Callable[[str], None]
_T = TypeVar("_T")

#: The name Docker gives the registry of references without a host.
DOCKER_HUB = "docker.io"
# The server address the engine (and `docker login`) file Docker Hub credentials under.
_DOCKER_HUB_AUTH = "https://index.docker.io/v1/"
_DOCKER_HUB_ALIASES = {"docker.io", "index.docker.io", "registry-1.docker.io", "registry.hub.docker.com"}

# distribution/reference's grammar, slightly relaxed on the host part (IPv6 hosts are rare here).
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
_HOST = rf"(?:{_LABEL}(?:\.{_LABEL})*|\[[0-9A-Fa-f:]+\])(?::[0-9]+)?"
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_PATH_RE = re.compile(rf"^{_COMPONENT}(?:/{_COMPONENT})*$")
_HOST_RE = re.compile(rf"^{_HOST}$")
_TAG_RE = re.compile(r"^[\w][\w.-]{0,127}$")
_DIGEST_RE = re.compile(r"^[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,}$")

# Socket timeout while reading the engine's pull/push stream: the engine reports progress at
# least every few seconds while data moves, so this long a silence means it is stuck.
DEFAULT_STREAM_TIMEOUT = 600.0


# -- references ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageName:
    """A parsed image reference: ``[host/]path[:tag][@digest]``.

    ``host`` is ``None`` when the reference names no registry (Docker then means Docker Hub).
    """

    host: str | None
    path: str
    tag: str | None = None
    digest: str | None = None

    @property
    def repository(self) -> str:
        """``host/path`` (or ``path``): the name without tag or digest."""
        return f"{self.host}/{self.path}" if self.host else self.path

    @property
    def registry(self) -> str:
        """The registry host this reference is pulled from (``docker.io`` when none is named)."""
        return self.host or DOCKER_HUB

    def __str__(self) -> str:
        text = self.repository
        if self.tag:
            text += f":{self.tag}"
        if self.digest:
            text += f"@{self.digest}"
        return text


def parse_image_ref(ref: str) -> ImageName:
    """Split an image reference the way Docker does.

    The first ``/``-separated component is a registry host when it contains ``.`` or ``:``, is
    ``localhost``, or has an upper-case letter (``127.0.0.1:5000/team/app:1`` has host
    ``127.0.0.1:5000``; ``team/app:1`` has none).

    Raises:
        InputError: ``ref`` is not a valid image reference.
    """
    text = ref.strip() if isinstance(ref, str) else ""
    bad = InputError(
        f"{ref!r} is not a valid image reference",
        hint="write [registry-host[:port]/]repository[:tag][@sha256:digest], e.g. myregistry.azurecr.io/team/app:1",
    )
    if not text:
        raise bad
    rest, _, digest = text.partition("@")
    host: str | None = None
    first, slash, remainder = rest.partition("/")
    if slash and ("." in first or ":" in first or first == "localhost" or first.lower() != first):
        host, rest = first, remainder
    path, colon, tag = rest.rpartition(":") if ":" in rest else (rest, "", "")
    if not _PATH_RE.match(path) or (host is not None and not _HOST_RE.match(host)):
        raise bad
    if (colon and not _TAG_RE.match(tag)) or ("@" in text and not _DIGEST_RE.match(digest)):
        raise bad
    return ImageName(host=host, path=path, tag=tag or None, digest=digest or None)


def _normalize_address(address: str) -> str:
    """``https://MyReg.azurecr.io/`` → ``MyReg.azurecr.io``: the form references use."""
    text = address.strip()
    for scheme in ("https://", "http://"):
        if text.lower().startswith(scheme):
            text = text[len(scheme):]
    return text.rstrip("/")


def _same_registry(a: str, b: str) -> bool:
    a, b = a.lower(), b.lower()
    return a == b or (a in _DOCKER_HUB_ALIASES and b in _DOCKER_HUB_ALIASES)


def qualify(ref: str, registry: ContainerRegistry | None) -> str:
    """The reference to pull ``ref`` by, given the registry it comes from.

    The rule (Azure ML SDK v1's ``docker.base_image`` + ``docker.base_image_registry.address``):

    * no registry, or a registry without an address: ``ref`` as it is (Docker Hub when it names
      no host);
    * ``ref`` names no registry host: ``<address>/<ref>`` (``myregistry.azurecr.io`` +
      ``fastdotai/fastai2:latest`` → ``myregistry.azurecr.io/fastdotai/fastai2:latest``; an
      address with a path, ``reg.io/team``, prefixes that path too);
    * ``ref`` names the same host as the address: ``ref`` as it is;
    * ``ref`` names another host: refused, because the registry's credentials would be sent to a
      registry they do not belong to.

    A scheme (``https://``) and trailing ``/`` on the address are ignored. Tags are not added:
    :func:`pull_image` pulls ``latest`` when the reference has neither tag nor digest, as
    ``docker pull`` does.

    Raises:
        InputError: ``ref`` or the address is not valid, or they name different registries.
    """
    name = parse_image_ref(ref)
    raw = registry.address if registry is not None else None
    address = _normalize_address(raw) if raw else ""
    if not address:
        return str(name)
    prefix = parse_image_ref(f"{address}/x")  # validates the address; "x" is a placeholder path
    if prefix.host is None:
        raise InputError(
            f"registry address {raw!r} names no registry host",
            hint="use the registry's host name (with a port if it has one), e.g. myregistry.azurecr.io",
        )
    if name.host is None:
        return str(parse_image_ref(f"{address}/{name}"))
    if _same_registry(name.host, prefix.host):
        return str(name)
    raise InputError(
        f"base image {ref!r} names registry {name.host} but base_image_registry.address is {address}",
        hint=f"drop the host from the image (it is then pulled from {address}), "
        "or set the address to the image's registry",
    )


# -- credentials -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Credentials:
    username: str | None
    password: str | None = field(repr=False)
    password_env: str | None
    server: str  # the registry host, as the engine files credentials

    @property
    def given(self) -> bool:
        return bool(self.username and self.password)

    def header(self) -> str:
        """The ``X-Registry-Auth`` value (``{}`` when anonymous: push insists on a header)."""
        if not self.given:
            return _encode_auth(None, None, None)
        return _encode_auth(self.username, self.password, self.server)

    def secrets(self) -> tuple[str, ...]:
        return tuple(s for s in (self.password, self.header() if self.given else None) if s)


def _encode_auth(username: str | None, password: str | None, server: str | None) -> str:
    """URL-safe base64 of the auth JSON the engine reads from ``X-Registry-Auth``."""
    payload = {} if username is None else {"username": username, "password": password or "", "serveraddress": server}
    return base64.urlsafe_b64encode(json.dumps(payload).encode()).decode("ascii")


def _decode_auth(header: str) -> dict[str, Any]:
    """The inverse of :func:`_encode_auth` (tests; padding tolerated missing, as the engine does)."""
    raw = base64.urlsafe_b64decode(header + "=" * (-len(header) % 4))
    value = json.loads(raw)
    return dict(value) if isinstance(value, dict) else {}


def _credentials(registry: ContainerRegistry | None, name: ImageName) -> _Credentials:
    """Read the registry's credentials once (``password`` may read the environment).

    Raises:
        RegistryAuthError: only half of the credentials are there (a username without password,
            e.g. ``password_env`` names an unset variable, or a password without username).
    """
    host = name.registry
    server = _DOCKER_HUB_AUTH if host.lower() in _DOCKER_HUB_ALIASES else host
    if registry is None:
        return _Credentials(None, None, None, server)
    username, password, password_env = registry.username or None, registry.password or None, registry.password_env
    if username and not password:
        # This process holds no password (a cluster node, an agent): the machine's own login for
        # that registry (`docker login`, the Docker config file) is used, as `docker pull` would.
        from ._shared import docker_config_credentials

        found = docker_config_credentials(host.lower())
        if found is not None:
            return _Credentials(found[0], found[1], None, server)
    creds = _Credentials(username, password, password_env, server)
    if username and not password:
        where = (
            f"the environment variable {password_env} is not set or empty"
            if password_env
            else "no password (or password_env) is set"
        )
        raise RegistryAuthError(
            f"no password for user {username!r} at {host}: {where}",
            registry=host,
            hint=(f"export {password_env}=… before running" if password_env
                  else "set base_image_registry.password_env") + f", or `docker login {host}` on this machine",
        )
    if password and not username:
        raise RegistryAuthError(
            f"a password but no username is set for {host}",
            registry=host,
            hint="set base_image_registry.username",
        )
    return creds


# -- classifying the engine's registry errors ------------------------------------------------------

ErrorKind = Literal["auth", "not_found", "unreachable", "insecure", "tls", "registry", "other"]

# Checked in this order; the first match wins. Texts are matched lower-cased.
_KINDS: tuple[tuple[ErrorKind, tuple[str, ...]], ...] = (
    # Docker Hub answers this for a missing repository as well as a private one.
    ("not_found", ("repository does not exist", "manifest unknown", "name unknown", "not found")),
    (
        "auth",
        (
            "unauthorized",
            "authentication required",
            "no basic auth credentials",
            "incorrect username or password",
            "401 unauthorized",
            "requested access to the resource is denied",
            "access denied",
            "403 forbidden",
        ),
    ),
    ("insecure", ("server gave http response to https client",)),
    ("tls", ("x509:", "certificate", "tls: ")),
    (
        "unreachable",
        (
            "connection refused",
            "no such host",
            "i/o timeout",
            "timeout exceeded",
            "context deadline exceeded",
            "handshake timeout",
            "network is unreachable",
            "no route to host",
            "connection reset by peer",
            "temporary failure in name resolution",
            "server misbehaving",
        ),
    ),
    (
        "registry",
        ("unexpected http status", "toomanyrequests", "service unavailable", "bad gateway", "error parsing http"),
    ),
)


def _classify(message: str) -> ErrorKind:
    """Sort an engine error message about a registry into one of a few kinds."""
    text = message.lower()
    for kind, needles in _KINDS:
        if any(n in text for n in needles):
            return kind
    return "other"


def _registry_error(
    action: str, target: str, host: str, message: str, creds: _Credentials, *, status: int | None = None
) -> Exception:
    """The dockyard error for the engine's failure ``message`` while ``action`` ``target``.

    ``action`` is a gerund phrase (``"pulling"``, ``"logging in to"``), ``host`` the registry.
    The message is scrubbed of the password (the engine may echo URLs or headers).
    """
    msg = scrub(message.strip(), *creds.secrets()) or f"HTTP {status}"
    doing = f"{action} {target}"
    kind = _classify(msg)
    if kind == "auth":
        if creds.given:
            where = f" (from ${creds.password_env})" if creds.password_env else ""
            return RegistryAuthError(
                f"{host} refused the credentials of user {creds.username!r} {doing}: {msg}",
                registry=host,
                hint=f"check the username and the password{where} for {host}",
            )
        return RegistryAuthError(
            f"{host} requires a login {doing}: {msg}",
            registry=host,
            hint=f"set base_image_registry.username and password_env for {host}",
        )
    if kind == "not_found":
        return RegistryError(
            f"{target} is not in {host}: {msg}",
            registry=host,
            hint="check the repository and the tag, or push the image first; some registries "
            "also answer 'not found' to a user who may not read the repository",
        )
    if kind == "unreachable":
        return RegistryError(
            f"{host} cannot be reached {doing}: {msg}",
            registry=host,
            hint="check the address and port, that the registry runs, and DNS and the network as seen "
            "from the Docker Engine's host: the engine dials the registry, not dockyard",
        )
    if kind == "insecure":
        return RegistryError(
            f"{host} speaks plain HTTP but the engine expects HTTPS {doing}: {msg}",
            registry=host,
            hint=f'add "{host}" to "insecure-registries" in /etc/docker/daemon.json and restart dockerd, '
            "or serve the registry over TLS",
        )
    if kind == "tls":
        return RegistryError(
            f"the engine does not trust {host}'s TLS certificate {doing}: {msg}",
            registry=host,
            hint=f"install the registry's CA certificate as /etc/docker/certs.d/{host}/ca.crt",
        )
    if kind == "registry":
        return RegistryError(f"{host} failed {doing}: {msg}", registry=host, hint="retry later")
    return EngineError(f"{doing} failed: {msg}", status=status)


# -- the engine's JSON-lines stream ----------------------------------------------------------------


@dataclass
class _Outcome:
    status: int
    error: str | None = None  # the reply's "message" (non-2xx) or the stream's errorDetail
    aux: list[dict[str, Any]] = field(default_factory=list)


def _format_progress(event: dict[str, Any]) -> str | None:
    status = event.get("status")
    if not status:
        return None
    parts = [f"{event['id']}:" if event.get("id") else "", str(status), str(event.get("progress") or "")]
    return " ".join(p for p in parts if p)


def _stream(
    engine: EngineClient,
    path: str,
    *,
    headers: dict[str, str],
    timeout: float | None,
    progress: Progress | None,
    secrets: tuple[str, ...],
    what: str,
    registry: str,
) -> _Outcome:
    """``POST path`` and read the engine's JSON-lines reply as it comes (progress as it happens).

    ``EngineClient.request`` reads whole bodies; a pull can stream for minutes, so this reads
    line by line over the same connection class.

    Raises:
        EngineUnavailable: the engine cannot be reached or hung up.
        RegistryError: the engine went silent for ``timeout`` seconds.
    """
    conn = engine.http_connection(timeout)

    def io(call: Callable[[], _T]) -> _T:
        # Only socket/HTTP work is translated: an error raised by ``progress`` (say a
        # BrokenPipeError) must reach the caller as it is, not as "engine unavailable".
        try:
            return call()
        except EngineUnavailable:
            raise
        except TimeoutError as exc:  # the socket's timeout (socket.timeout is this class)
            raise RegistryError(
                f"the engine reported nothing for {timeout}s while {what}",
                registry=registry,
                hint="the registry may be very slow: pass a larger timeout, or check the engine's log",
            ) from exc
        except (OSError, http.client.HTTPException) as exc:
            # Socket and HTTP-parsing errors carry no request data, hence no secret.
            raise EngineUnavailable(engine.url, f"{what}: {type(exc).__name__}: {exc}") from exc

    try:
        io(lambda: conn.request("POST", f"/v{API_VERSION}{path}", headers=headers))
        resp = io(conn.getresponse)
        if resp.status >= 300:
            body = io(resp.read)
            try:
                message = str((json.loads(body) or {}).get("message") or "")
            except (ValueError, AttributeError):
                message = body.decode("utf-8", "replace")
            return _Outcome(resp.status, error=message or f"HTTP {resp.status}")
        outcome = _Outcome(resp.status)
        while line := io(resp.readline):
            try:
                event = json.loads(line)
            except ValueError:
                event = {"status": line.decode("utf-8", "replace").strip()}
            if not isinstance(event, dict):
                continue
            if event.get("errorDetail") or event.get("error"):
                detail = event.get("errorDetail")
                reported = detail.get("message") if isinstance(detail, dict) else None
                outcome.error = str(reported or event.get("error") or "unknown error")
                return outcome
            if isinstance(event.get("aux"), dict):
                outcome.aux.append(event["aux"])
            text = _format_progress(event)
            if text and progress is not None:
                progress(scrub(text, *secrets))
        return outcome
    finally:
        conn.close()


# -- the public operations -------------------------------------------------------------------------


def pull_image(
    ref: str,
    registry: ContainerRegistry | None = None,
    *,
    engine: EngineClient | None = None,
    progress: Progress | None = None,
    timeout: float | None = DEFAULT_STREAM_TIMEOUT,
) -> str:
    """Pull ``ref`` (from ``registry`` when given) into the engine and return the local image ID.

    The reference is qualified with :func:`qualify` (``address/ref`` when ``ref`` names no host).
    Without tag or digest, ``latest`` is pulled. The engine's progress lines (``"<layer>: Downloading
    [==>  ] 1.2MB/3MB"``) go to ``progress`` as they arrive, scrubbed of the password.

    Args:
        ref: the image reference, e.g. ``fastdotai/fastai2:latest``.
        registry: where to pull from, and the credentials for it (anonymous without a username).
        engine: the Docker Engine (default: from ``DOCKER_HOST``).
        progress: called with each progress line.
        timeout: seconds of engine silence after which the pull is abandoned.

    Returns:
        The image ID (``sha256:…``) the engine now holds for the reference.

    Raises:
        InputError: the reference is invalid, or names a registry other than ``registry.address``.
        RegistryAuthError: the registry refused the credentials, needs some, or they are incomplete.
        RegistryError: the registry cannot be reached, or it has no such repository/tag.
        EngineUnavailable: no engine answers.
        EngineError: the engine failed for a reason that is not the registry's.
    """
    engine = engine or EngineClient.from_env()
    full = qualify(ref, registry)
    name = parse_image_ref(full)
    creds = _credentials(registry, name)
    # With an empty tag the engine would pull every tag of the repository.
    tag = name.digest or name.tag or "latest"
    query = urllib.parse.urlencode({"fromImage": name.repository, "tag": tag})
    headers = {"X-Registry-Auth": creds.header()} if creds.given else {}
    outcome = _stream(
        engine,
        f"/images/create?{query}",
        headers=headers,
        timeout=timeout,
        progress=progress,
        secrets=creds.secrets(),
        what=f"pulling {full}",
        registry=name.registry,
    )
    local = f"{name.repository}@{name.digest}" if name.digest else f"{name.repository}:{tag}"
    if outcome.error is not None:
        raise _registry_error("pulling", local, name.registry, outcome.error, creds, status=outcome.status)
    reply = engine.request("GET", f"/images/{urllib.parse.quote(local, safe='')}/json")
    if reply.status != 200:
        raise EngineError(
            f"the engine reported pulling {local} but cannot inspect it (HTTP {reply.status})", status=reply.status
        )
    return str(reply.json()["Id"])


def push_image(
    ref: str,
    registry: ContainerRegistry | None = None,
    *,
    engine: EngineClient | None = None,
    progress: Progress | None = None,
    timeout: float | None = DEFAULT_STREAM_TIMEOUT,
) -> str:
    """Push the local image ``ref`` to its registry and return the pushed manifest's digest.

    The reference is qualified like :func:`pull_image`'s, and the engine must hold an image under
    that exact name (``docker tag`` it first). Without a tag, ``latest`` is pushed.

    Returns:
        The digest (``sha256:…``) the registry stored the manifest under.

    Raises:
        InputError: the reference is invalid, has a digest, or no local image has that name.
        RegistryAuthError: the registry refused the credentials, needs some, or they are incomplete.
        RegistryError: the registry cannot be reached or failed.
        EngineUnavailable: no engine answers.
        EngineError: the engine failed for a reason that is not the registry's.
    """
    engine = engine or EngineClient.from_env()
    full = qualify(ref, registry)
    name = parse_image_ref(full)
    if name.digest:
        raise InputError(f"cannot push {full}: a digest names content, not a tag", hint="push a tag instead")
    creds = _credentials(registry, name)
    tag = name.tag or "latest"
    outcome = _stream(
        engine,
        f"/images/{urllib.parse.quote(name.repository, safe='')}/push?{urllib.parse.urlencode({'tag': tag})}",
        headers={"X-Registry-Auth": creds.header()},  # the engine refuses a push without the header
        timeout=timeout,
        progress=progress,
        secrets=creds.secrets(),
        what=f"pushing {full}",
        registry=name.registry,
    )
    if outcome.status == 404 or "does not exist locally" in (outcome.error or "").lower():
        raise InputError(
            f"no local image is named {name.repository}:{tag}",
            hint=f"tag the image first: docker tag <image> {name.repository}:{tag}",
        )
    if outcome.error is not None:
        raise _registry_error("pushing", full, name.registry, outcome.error, creds, status=outcome.status)
    for aux in outcome.aux:
        if aux.get("Digest"):
            return str(aux["Digest"])
    raise EngineError(f"the engine pushed {full} but reported no digest")


def login_check(
    registry: ContainerRegistry, *, engine: EngineClient | None = None, timeout: float = 30.0
) -> None:
    """Check that ``registry`` accepts its credentials (``POST /auth``; nothing is stored).

    Raises:
        RegistryAuthError: the credentials are refused, missing or incomplete.
        RegistryError: the registry cannot be reached.
        InputError: the address is not valid.
        EngineUnavailable: no engine answers.
    """
    engine = engine or EngineClient.from_env()
    address = _normalize_address(registry.address or DOCKER_HUB)
    name = parse_image_ref(f"{address}/x")
    creds = _credentials(registry, name)
    if not creds.given:
        raise RegistryAuthError(
            f"no credentials are set for {name.registry}",
            registry=name.registry,
            hint="set base_image_registry.username and password_env",
        )
    body = json.dumps({"username": creds.username, "password": creds.password, "serveraddress": creds.server})
    reply = engine.request(
        "POST", "/auth", body=body.encode(), headers={"Content-Type": "application/json"}, timeout=timeout
    )
    if reply.status == 200:
        return
    try:
        message = str((reply.json() or {}).get("message") or "")
    except (ValueError, AttributeError):
        message = reply.body.decode("utf-8", "replace")
    raise _registry_error(
        "logging in to", name.registry, name.registry, message or f"HTTP {reply.status}", creds, status=reply.status
    )
