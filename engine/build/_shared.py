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

__all__ = ["NEGATIVE_TTL", "CacheRegistry", "Presence", "docker_config_credentials", "nearest_key", "resolve_cache_registry"]

#: Seconds an "absent" answer is reused in this process (a key being built elsewhere shows up soon).
NEGATIVE_TTL = 30.0
_PROBE_TIMEOUT = 5.0
_MANIFESTS = ", ".join((
    "application/vnd.docker.distribution.manifest.v2+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.oci.image.index.v1+json",
))
_SINGLE_MANIFESTS = "application/vnd.docker.distribution.manifest.v2+json, application/vnd.oci.image.manifest.v1+json"
_KEY = re.compile(r"[0-9a-f]{32}")
#: Tags read per listing, and the largest registry document read (a manifest or an image config).
_MAX_TAGS = 1000
_MAX_DOCUMENT = 4 << 20
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
        found = docker_config_credentials(self.address)
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
        return self._authed("HEAD", f"/v2/{self.repository}/manifests/{key_hex}", {"Accept": _MANIFESTS}, creds)[0]

    def _authed(self, method: str, path: str, headers: dict[str, str], creds: ContainerRegistry) -> tuple[int, bytes]:
        """One request, answering the registry's challenge (Basic or a bearer token) if it sends one."""
        status, challenge, body = self._request(method, path, headers)
        if status != 401 or not challenge:
            return status, body
        scheme, _, params = challenge.partition(" ")
        password = creds.password
        if scheme.lower() == "basic":
            if not (creds.username and password):
                return 401, b""
            token = base64.b64encode(f"{creds.username}:{password}".encode()).decode()
            return self._request(method, path, {**headers, "Authorization": f"Basic {token}"})[::2]
        if scheme.lower() == "bearer":
            bearer = self._token(dict(_CHALLENGE.findall(params)), creds)
            if bearer is None:
                return 401, b""
            return self._request(method, path, {**headers, "Authorization": f"Bearer {bearer}"})[::2]
        return status, body

    def _request(self, method: str, path: str, headers: dict[str, str]) -> tuple[int, str, bytes]:
        conn = self._connection()
        try:
            conn.request(method, path, headers=headers)
            resp = conn.getresponse()
            body = resp.read(_MAX_DOCUMENT + 1)
            return resp.status, resp.getheader("WWW-Authenticate", "") or "", body
        finally:
            conn.close()

    # -- published keys, for a near miss ---------------------------------------------------------

    def published_keys(self) -> list[str]:
        """The content keys the repository holds (its tags that look like keys), or [] when it
        cannot be asked: a near miss is an optimisation, never a reason to fail.

        Raises:
            RegistryAuthError: the registry refused the credentials.
        """
        try:
            creds = self.credentials()
            status, body = self._authed("GET", f"/v2/{self.repository}/tags/list?n={_MAX_TAGS}", {}, creds)
        except RegistryAuthError:
            raise
        except (OSError, http.client.HTTPException):
            return []
        if status in (401, 403):
            raise RegistryAuthError(f"the cache registry {self.address} refused to list {self.repository}",
                                    registry=self.address, hint="check the cache registry's credentials")
        if status != 200:
            return []
        try:
            tags = json.loads(body).get("tags") or []
        except (ValueError, AttributeError):
            return []
        return sorted(t for t in tags if isinstance(t, str) and _KEY.fullmatch(t))

    def published_parts(self, key_hex: str) -> dict[str, str] | None:
        """The key parts a published image carries in its labels (``dockyard.part.*``), or None
        when they cannot be read or the image is not that key's (its ``dockyard.key`` label)."""
        try:
            creds = self.credentials()
            status, body = self._authed("GET", f"/v2/{self.repository}/manifests/{key_hex}",
                                        {"Accept": _SINGLE_MANIFESTS}, creds)
            if status != 200:
                return None
            digest = json.loads(body)["config"]["digest"]
            if not isinstance(digest, str) or not re.fullmatch(r"sha256:[0-9a-f]{64}", digest):
                return None
            status, body = self._authed("GET", f"/v2/{self.repository}/blobs/{digest}", {}, creds)
            if status != 200:
                return None  # (a registry that redirects blobs to a store: not followed, skipped)
            labels = (json.loads(body).get("config") or {}).get("Labels") or {}
        except (OSError, http.client.HTTPException, ValueError, KeyError, TypeError, AttributeError,
                RegistryAuthError):
            return None
        if labels.get("dockyard.key") != key_hex:
            return None
        parts = {k[len("dockyard.part."):]: v for k, v in labels.items() if k.startswith("dockyard.part.")}
        if not parts or not all(isinstance(v, str) and _KEY.fullmatch(v) for v in parts.values()):
            return None
        return parts

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


def docker_config_credentials(address: str) -> tuple[str, str] | None:
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


#: Parts that must be equal for a published key's layers to be worth pulling as a cache: the same
#: base content on the same platform (otherwise no layer of it can be reused).
_SAME_BASE = ("base_image", "base_digest", "platform")


def nearest_key(parts: dict[str, str], published: dict[str, dict[str, str]]) -> tuple[str, int] | None:
    """The published key whose layers a build of ``parts`` may reuse, with how many parts are equal.

    A candidate needs the same base and platform, and either the same Dockerfile (the context,
    build arguments or dependencies changed: every step before the first that reads them is
    reused) or everything but the Dockerfile equal (an edited Dockerfile: the steps before the edit
    are reused). Anything else would pull an image for nothing. Among candidates the most equal
    parts win, then the smallest key (the same answer on every machine).
    """
    best: tuple[int, str] | None = None
    names = set(parts)
    for key_hex, theirs in published.items():
        if any(parts.get(n) != theirs.get(n) for n in _SAME_BASE) or set(theirs) - names - {"context"}:
            continue
        different = {n for n in names | set(theirs) if parts.get(n) != theirs.get(n)}
        if not different or not ("dockerfile" not in different or different == {"dockerfile"}):
            continue  # the same key (a hit, not a near miss), or too far to reuse
        equal = len(names) - len(different & names)
        if best is None or (equal, -int(key_hex, 16)) > (best[0], -int(best[1], 16)):
            best = (equal, key_hex)
    return (best[1], best[0]) if best else None
