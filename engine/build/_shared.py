"""A shared cache in any OCI registry: a key built anywhere is pulled, never built again.

``DOCKYARD_CACHE_REGISTRY=REG/REPO`` (or ``--cache-registry``) names it. After a build the image
is pushed as ``REG/REPO:<key>``; on a local miss the key's tag is asked for with one manifest
``HEAD`` (registries that rate-limit count GETs, not HEADs), and the answer is one of three:

* **present**: pull it, check its ``dockyard.key`` label is that key (truth from the image, not
  from its name), tag it ``dockyard/env:<key>`` and record it as ``pulled``;
* **absent**: build (the answer is remembered for ``NEGATIVE_TTL`` seconds in this process);
* **unknown** (registry down, 5xx, timeout, a pull that failed): build, with one warning. Unknown
  never counts as present — the opposite of a fail-open check (flytekit PR #1614).

A registry that refuses the credentials is an error, not "unknown": building would hide it.
Credentials come from ``DOCKYARD_CACHE_REGISTRY_USERNAME`` plus the *name* of the variable holding
the password (``DOCKYARD_CACHE_REGISTRY_PASSWORD_ENV``), else from the Docker config file
(``$DOCKER_CONFIG/config.json`` or ``~/.docker/config.json``: ``auths`` entries and credential
helpers). dockyard never stores them; they live in memory only while a request is made.
"""

from __future__ import annotations

import base64
import enum
import http.client
import json
import os
import re
import subprocess
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

from .._environment import ContainerRegistry
from ..errors import InputError, RegistryAuthError

__all__ = ["NEGATIVE_TTL", "CacheRegistry", "Presence", "resolve_cache_registry"]

#: Seconds an "absent" answer is reused in this process (a key being built elsewhere shows up soon).
NEGATIVE_TTL = 30.0
_PROBE_TIMEOUT = 5.0
_MANIFESTS = ", ".join((
    "application/vnd.docker.distribution.manifest.v2+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.oci.image.index.v1+json",
))
_LOOPBACK = re.compile(r"^(?:localhost|127\.\d+\.\d+\.\d+|\[::1\])(?::\d+)?$")
_CHALLENGE = re.compile(r'(\w+)="([^"]*)"')


class Presence(enum.Enum):
    PRESENT = "present"
    ABSENT = "absent"
    UNKNOWN = "unknown"


@dataclass(frozen=True)
class CacheRegistry:
    """Where the shared cache lives: ``address`` (host[:port]) and ``repository`` (a path)."""

    address: str
    repository: str
    username: str | None = None
    password_env: str | None = None
    _negative: dict[str, float] = field(default_factory=dict, repr=False, compare=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    @classmethod
    def parse(cls, text: str, *, username: str | None = None, password_env: str | None = None) -> CacheRegistry:
        """``REG/REPO`` (``127.0.0.1:5000/team/cache``).

        Raises:
            InputError: not a registry address followed by a repository, or credentials in it.
        """
        value = text.strip()
        if "://" in value or "@" in value.split("/", 1)[0]:
            raise InputError(f"cache registry {value!r} must be REG/REPO, without a scheme or credentials",
                             hint="e.g. DOCKYARD_CACHE_REGISTRY=registry.example:5000/team/dockyard-cache; "
                             "credentials come from DOCKYARD_CACHE_REGISTRY_USERNAME/_PASSWORD_ENV or docker login")
        host, _, repo = value.partition("/")
        if not host or not repo or ("." not in host and ":" not in host and host != "localhost") \
                or not re.fullmatch(r"[a-z0-9]+(?:[._/-][a-z0-9]+)*", repo):
            raise InputError(f"cache registry {value!r} is not REG/REPO",
                             hint="a registry host (with a '.' or a ':port') and a lowercase repository path")
        if password_env is not None and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", password_env):
            raise InputError("DOCKYARD_CACHE_REGISTRY_PASSWORD_ENV must be the NAME of a variable",
                             hint="e.g. DOCKYARD_CACHE_REGISTRY_PASSWORD_ENV=CACHE_PASSWORD")
        return cls(host.lower(), repo, username or None, password_env or None)

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> CacheRegistry | None:
        env = os.environ if environ is None else environ
        text = env.get("DOCKYARD_CACHE_REGISTRY", "").strip()
        if not text:
            return None
        return cls.parse(text, username=env.get("DOCKYARD_CACHE_REGISTRY_USERNAME"),
                         password_env=env.get("DOCKYARD_CACHE_REGISTRY_PASSWORD_ENV"))

    @classmethod
    def from_setting(cls, value: object, where: str) -> CacheRegistry:
        """A workspace config's ``"cache_registry"``: ``"REG/REPO"``, or an object
        ``{"address": "REG/REPO", "username": "...", "password_env": "VARIABLE_NAME"}``.

        Raises:
            InputError: the value has the wrong shape (named with ``where``), or holds a password.
        """
        if isinstance(value, str):
            return cls.parse(value)
        if not isinstance(value, dict):
            raise InputError(f"{where}: cache_registry must be \"REG/REPO\" or an object, got {type(value).__name__}",
                             hint='e.g. "cache_registry": {"address": "127.0.0.1:5000/team/cache", '
                             '"username": "ci", "password_env": "CACHE_PASSWORD"}')
        if "password" in value:
            # A password in a project's config file ends up in version control: refuse it outright.
            raise InputError(f"{where}: cache_registry must not hold a password",
                             hint="name the variable that holds it instead: \"password_env\": \"CACHE_PASSWORD\"")
        unknown = sorted(set(value) - {"address", "username", "password_env"})
        if unknown:
            raise InputError(f"{where}: cache_registry has unknown field(s) {', '.join(unknown)}",
                             hint="the fields are address, username and password_env")
        for name in ("address", "username", "password_env"):
            if value.get(name) is not None and not isinstance(value[name], str):
                raise InputError(f"{where}: cache_registry.{name} must be a string")
        if not value.get("address"):
            raise InputError(f"{where}: cache_registry.address is missing", hint='"address": "REG/REPO"')
        try:
            return cls.parse(value["address"], username=value.get("username"), password_env=value.get("password_env"))
        except InputError as exc:
            raise InputError(f"{where}: {exc.message}", hint=exc.hint) from None

    def __str__(self) -> str:
        return f"{self.address}/{self.repository}"

    def ref(self, key_hex: str) -> str:
        return f"{self.address}/{self.repository}:{key_hex}"

    # -- credentials (in memory only, read when a request needs them) ------------------------------

    def credentials(self) -> ContainerRegistry:
        """The registry with its credentials, for the engine's pull/push (``X-Registry-Auth``).

        Raises:
            RegistryAuthError: a username is set but its password variable is not.
        """
        reg = ContainerRegistry(address=self.address, username=self.username, password_env=self.password_env)
        if self.username:
            if not reg.password:
                raise RegistryAuthError(
                    f"no password for the cache registry user {self.username!r}: "
                    f"{self.password_env or 'DOCKYARD_CACHE_REGISTRY_PASSWORD_ENV'} is not set",
                    registry=self.address,
                    hint="export the variable that DOCKYARD_CACHE_REGISTRY_PASSWORD_ENV names, or use docker login",
                )
            return reg
        found = _docker_config_credentials(self.address)
        if found is not None:
            reg.username = found[0]
            reg.password = found[1]
        return reg

    # -- presence --------------------------------------------------------------------------------

    def presence(self, key_hex: str) -> tuple[Presence, str]:
        """Whether the registry holds the key's tag: (answer, why when unknown).

        Raises:
            RegistryAuthError: the registry refused the credentials (or wants some).
        """
        with self._lock:
            seen = self._negative.get(key_hex)
            if seen is not None and time.monotonic() - seen < NEGATIVE_TTL:
                return Presence.ABSENT, ""
        try:
            creds = self.credentials()
        except RegistryAuthError as exc:
            # This process cannot hold the password (the agent never inherits one): it cannot ask,
            # which is "unknown", not a refusal by the registry.
            return Presence.UNKNOWN, exc.message
        try:
            status = self._head(key_hex, creds)
        except (OSError, http.client.HTTPException) as exc:
            return Presence.UNKNOWN, f"{type(exc).__name__}: {exc}"
        if status == 200:
            return Presence.PRESENT, ""
        if status == 404:
            with self._lock:
                self._negative[key_hex] = time.monotonic()
            return Presence.ABSENT, ""
        if status in (401, 403):
            raise RegistryAuthError(
                f"the cache registry {self.address} refused "
                + (f"the credentials of {creds.username!r}" if creds.username else "anonymous access"),
                registry=self.address,
                hint="check DOCKYARD_CACHE_REGISTRY_USERNAME and the password variable, or `docker login`",
            )
        return Presence.UNKNOWN, f"HTTP {status}"

    def forget_absent(self, key_hex: str) -> None:
        with self._lock:
            self._negative.pop(key_hex, None)

    def _connection(self) -> http.client.HTTPConnection:
        if _LOOPBACK.match(self.address):  # the engine treats loopback registries as insecure too
            return http.client.HTTPConnection(self.address, timeout=_PROBE_TIMEOUT)
        return http.client.HTTPSConnection(self.address, timeout=_PROBE_TIMEOUT)

    def _head(self, key_hex: str, creds: ContainerRegistry) -> int:
        path = f"/v2/{self.repository}/manifests/{key_hex}"
        headers = {"Accept": _MANIFESTS}
        status, challenge = self._request(path, headers)
        if status != 401 or not challenge:
            return status
        scheme, _, params = challenge.partition(" ")
        password = creds.password
        if scheme.lower() == "basic":
            if not (creds.username and password):
                return 401
            token = base64.b64encode(f"{creds.username}:{password}".encode()).decode()
            return self._request(path, {**headers, "Authorization": f"Basic {token}"})[0]
        if scheme.lower() == "bearer":
            bearer = self._token(dict(_CHALLENGE.findall(params)), creds)
            if bearer is None:
                return 401
            return self._request(path, {**headers, "Authorization": f"Bearer {bearer}"})[0]
        return status

    def _request(self, path: str, headers: dict[str, str]) -> tuple[int, str]:
        conn = self._connection()
        try:
            conn.request("HEAD", path, headers=headers)
            resp = conn.getresponse()
            resp.read()
            return resp.status, resp.getheader("WWW-Authenticate", "") or ""
        finally:
            conn.close()

    def _token(self, challenge: dict[str, str], creds: ContainerRegistry) -> str | None:
        """A registry token for pulling the repository (Docker's token protocol)."""
        realm = challenge.get("realm")
        if not realm:
            return None
        query = {"service": challenge.get("service", ""), "scope": f"repository:{self.repository}:pull"}
        url = urllib.parse.urlsplit(realm)
        conn_cls = http.client.HTTPSConnection if url.scheme == "https" else http.client.HTTPConnection
        conn = conn_cls(url.netloc, timeout=_PROBE_TIMEOUT)
        headers = {}
        if creds.username and creds.password:
            basic = base64.b64encode(f"{creds.username}:{creds.password}".encode()).decode()
            headers["Authorization"] = f"Basic {basic}"
        try:
            conn.request("GET", f"{url.path}?{urllib.parse.urlencode(query)}", headers=headers)
            resp = conn.getresponse()
            body = resp.read()
            if resp.status != 200:
                return None
            data = json.loads(body)
            return str(data.get("token") or data.get("access_token") or "") or None
        except (OSError, ValueError, http.client.HTTPException):
            return None
        finally:
            conn.close()


def _docker_config_credentials(address: str) -> tuple[str, str] | None:
    """(username, password) for ``address`` from the Docker config file: an ``auths`` entry, or a
    credential helper (``credHelpers`` / ``credsStore``: ``docker-credential-<name> get``)."""
    folder = Path(os.environ.get("DOCKER_CONFIG") or Path.home() / ".docker")
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(config, dict):
        return None
    helper = (config.get("credHelpers") or {}).get(address) or config.get("credsStore")
    if helper:
        try:
            done = subprocess.run([f"docker-credential-{helper}", "get"], input=address, capture_output=True,
                                  text=True, timeout=10)
            if done.returncode == 0:
                data = json.loads(done.stdout)
                if data.get("Username") and data.get("Secret"):
                    return str(data["Username"]), str(data["Secret"])
        except (OSError, ValueError, subprocess.TimeoutExpired):
            pass
    for name, entry in (config.get("auths") or {}).items():
        host = re.sub(r"^https?://", "", str(name)).split("/", 1)[0].lower()
        if host == address and isinstance(entry, dict) and entry.get("auth"):
            try:
                user, _, password = base64.b64decode(entry["auth"]).decode().partition(":")
            except (ValueError, UnicodeDecodeError):
                continue
            if user and password:
                return user, password
    return None


def resolve_cache_registry(
    flag: str | None, workspace: CacheRegistry | None, environ: dict[str, str] | None = None
) -> CacheRegistry | None:
    """The shared cache in effect: ``--cache-registry`` (``""`` turns it off), else
    ``DOCKYARD_CACHE_REGISTRY``, else the workspace's setting, else none.

    The credential variables (``DOCKYARD_CACHE_REGISTRY_USERNAME``/``_PASSWORD_ENV``) go with a
    registry named by the flag or the variable; a workspace's setting carries its own.

    Raises:
        InputError: the flag or the variable is not ``REG/REPO``.
    """
    env = os.environ if environ is None else environ
    if flag is not None:
        if not flag.strip():
            return None
        return CacheRegistry.from_env({**env, "DOCKYARD_CACHE_REGISTRY": flag})
    if env.get("DOCKYARD_CACHE_REGISTRY", "").strip():
        return CacheRegistry.from_env(dict(env))
    return workspace
