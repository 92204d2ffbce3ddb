"""Canonical, versioned content keys (XXH3-128 over named parts).

A key is computed in two steps so that it can be *explained*:

1. every named part of :class:`KeyParts` is canonicalised into a text payload and hashed on its
   own with XXH3-128 (``ContentKey.parts``: part name -> 32 hex);
2. the key is XXH3-128 over ``"dockyard-cache-key/v<SCHEMA_VERSION>\\n"`` followed by one
   ``"<name>=<part hash>\\n"`` line per part, in sorted name order.

Canonicalisation rules of schema 1 (changing any of them changes keys, so it must bump
:data:`SCHEMA_VERSION` and the golden tests):

* **Every part is always present.** Optional parts encode ``None`` as ``"-"`` and a value as
  ``"+"`` followed by its payload, so "no registry" and "some registry" never collide. Empty text
  is rejected where it would be meaningless (an empty Dockerfile cannot build; pass ``None``), so
  "no Dockerfile" and "empty Dockerfile" cannot both exist.
* **Credentials never enter a key.** URL userinfo (``scheme://user:pass@host`` ->
  ``scheme://host``) and anaconda.org path tokens (``/t/<token>/``) are stripped from pip lines,
  conda channels and dependencies, Dockerfile text, build-arg values and the registry address *at
  construction*, so a :class:`KeyParts` never even holds them. Build args whose name looks like a
  secret (``TOKEN``, ``PASSWORD``…) are refused: their hash would still be derived from a secret.
* **base_image / base_digest / platform / registry**: surrounding whitespace stripped; platform and
  registry host lower-cased; the registry loses any ``scheme://`` and trailing ``/``. The image
  reference is kept as written (``busybox`` and ``docker.io/library/busybox:latest`` are different
  keys: the resolved ``base_digest`` is what pins content).
* **dockerfile**: a leading BOM dropped, CRLF and CR turned into LF, trailing whitespace at the end
  of the text (trailing blank lines) dropped. Whitespace *inside* lines is kept, because heredoc
  bodies (``COPY <<EOF``) are file content.
* **conda**: ``name`` and ``prefix`` are excluded (they name the env, they are not content);
  ``channels`` keep their order (it is the solver's priority) with repeats dropped;
  ``dependencies`` are a set (whitespace runs collapsed to one space, sorted, deduplicated); every
  ``{"pip": [...]}`` entry is merged into one set canonicalised like pip requirements;
  ``variables`` (str -> str) are sorted.
* **pip**: lines split on newlines, backslash continuations joined, ``#`` comments (at line start or
  after whitespace) and blank lines dropped, whitespace runs collapsed. Option lines (starting with
  ``-``: ``--index-url``, ``-f``, ``-r``…) are kept as an *ordered* list (repeats dropped) with
  ``--opt=value`` spelled ``--opt value``; requirement lines are a sorted set. Names are not
  case-folded: a spurious miss only costs a build, a wrong hit would cost a wrong image.
* **user_managed**: ``"1"``/``"0"``. **build_args**: sorted by name, length-prefixed values.
* **context** (optional, added within schema 1): the digest of the files a Dockerfile's build
  context contributes (32 lowercase hex, computed by the caller over what it sends). It is the
  one part that is *absent* when unset: its ``context=<hash>`` line is appended after the nine
  fixed lines only when a context is given, so every key without a context is unchanged.
* **lock** (optional, added within schema 1, the same way): the pinned lines of a lock file
  (``dockyard env lock``), canonicalised like pip requirements and prefixed ``+``. Its
  ``lock=<hash>`` line follows the fixed lines (and ``context``'s) only when a lock is given, so
  every key without a lock is unchanged.

What is *not* a part, on purpose: the installer (uv or pip). Both install the same resolution of
the same requirements into the same layout (tests compare ``pip freeze`` of both), so an image
either made stays valid for the other, and switching installers must not make every cache miss.
Which one built an image is recorded next to it (label ``dockyard.installer``, the index).
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from xxhash import xxh3_128_hexdigest

from .errors import InvalidKey, InvalidKeyParts

__all__ = [
    "HEX32",
    "OPTIONAL_PART_NAMES",
    "PART_NAMES",
    "SCHEMA_VERSION",
    "ContentKey",
    "KeyParts",
    "compute_key",
    "diff_keys",
    "unresolved_key",
]

SCHEMA_VERSION: int = 1

#: Every part a schema-1 key is made of, in the order explanations list them.
PART_NAMES: tuple[str, ...] = (
    "base_image",
    "base_digest",
    "dockerfile",
    "conda",
    "pip",
    "user_managed",
    "platform",
    "build_args",
    "registry",
)
#: Parts that are in a key only when set (appended after the fixed ones, see the module docstring).
OPTIONAL_PART_NAMES: tuple[str, ...] = ("context", "lock")
_SORTED_NAMES = tuple(sorted(PART_NAMES))
_KEY_PREFIX = f"dockyard-cache-key/v{SCHEMA_VERSION}\n"

# Regexes are compiled once: compute_key is on the hot path of every cache hit.
#: A content key as text: 32 lowercase hex digits.
HEX32 = re.compile(r"[0-9a-f]{32}")
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
_PLATFORM = re.compile(r"[a-z0-9]+/[a-z0-9_]+(?:/[a-z0-9]+)?")
_REGISTRY = re.compile(r"(?:[a-z0-9](?:[a-z0-9.-]*[a-z0-9])?|\[[0-9a-f:]+\])(?::[0-9]{1,5})?(?:/\S*)?")
_ARG_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# A build arg with one of these words in its name is a secret by intent (BuildKit's own linter
# flags the same names); BuildKit secrets are the way to pass those.
# Matched on "_"-separated words so that TOKENIZERS_PARALLELISM or AUTHOR stay usable.
_SECRET_ARG = re.compile(
    r"(?i)(?:^|_)(?:passw(?:or)?d|secrets?|token|api_?key|credentials?|private_?key|auth)(?:_|$)"
)
# Greedy up to the last "@" before the path so that an unescaped "@" inside a password goes too.
_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.\-]*://)[^/\s]*@")
_CONDA_TOKEN = re.compile(r"(://[^/\s]+)/t/[^/\s]+/")
_SCHEME = re.compile(r"(?i)^[a-z][a-z0-9+.\-]*://")
# pip's own rule: "#" starts a comment at the start of a line or after whitespace only, so
# "pkg @ https://host/x.whl#sha256=..." keeps its fragment.
_PIP_COMMENT = re.compile(r"(?:^|\s)#.*$")
_LONG_OPT_EQ = re.compile(r"(--[A-Za-z0-9-]+)=")

_CONDA_KEYS = frozenset({"name", "prefix", "channels", "dependencies", "variables"})


def _scrub(text: str) -> str:
    """Strip URL userinfo and anaconda.org path tokens; cheap when there is no URL."""
    if "://" not in text:
        return text
    if "@" in text:
        text = _USERINFO.sub(r"\1", text)
    if "/t/" in text:
        text = _CONDA_TOKEN.sub(r"\1/", text)
    return text


def _check_text(field_name: str, value: object, *, hint: str = "") -> str:
    """Return ``value`` if it is a str without NUL (NUL separates payload sections)."""
    if type(value) is not str and not isinstance(value, str):
        raise InvalidKeyParts(
            field_name, f"expected str, got {type(value).__name__}", hint=hint or "pass a string"
        )
    if "\x00" in value:
        raise InvalidKeyParts(field_name, "contains a NUL character", hint="remove it")
    return value


def _bad_line(field_name: str, items: Sequence[object]) -> InvalidKeyParts:
    """Slow path of :func:`_lines`: name the element that made the fast check fail."""
    for i, item in enumerate(items):
        _check_text(f"{field_name}[{i}]", item, hint="pass one string per line")
    return InvalidKeyParts(field_name, "is not a list of strings")  # pragma: no cover


def _lines(field_name: str, value: object) -> tuple[tuple[str, ...], str]:
    """Validate and scrub a list of text lines.

    Returns:
        The frozen, scrubbed lines and the same lines joined by newlines (what payloads need).

    Raises:
        InvalidKeyParts: ``value`` is a bare string (refused, not iterated char by char), not a
            sequence, or holds a non-string or a NUL.
    """
    if type(value) is not tuple and type(value) is not list:
        if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
            raise InvalidKeyParts(
                field_name,
                f"expected a list of strings, got {type(value).__name__}",
                hint="pass one entry per line, e.g. text.splitlines()",
            )
        value = tuple(value)
    try:
        # One C-level join validates every element's type and gives the text to scan.
        text = "\n".join(value)
    except TypeError:
        raise _bad_line(field_name, value) from None
    if "\x00" in text:
        raise _bad_line(field_name, value)
    if "://" in text:
        scrubbed = _scrub(text)  # the patterns never cross a newline: same as line by line
        if scrubbed != text:
            return tuple(_scrub(v) for v in value), scrubbed
    return tuple(value), text


def _pip_payload(text: str) -> str:
    """Options in order, then the sorted set of requirements (rules in the module docstring)."""
    if not text:
        return "o\n\x00r\n"
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    if "\\\n" in text:
        # pip joins a line ending in a backslash with the next one, without a space.
        text = text.replace("\\\n", "")
    options: list[str] = []
    requirements: set[str] = set()
    for line in text.split("\n"):
        if "#" in line:
            line = _PIP_COMMENT.sub("", line)
        line = " ".join(line.split())
        if not line:
            continue
        if line[0] == "-":
            if "=" in line:
                line = _LONG_OPT_EQ.sub(r"\1 ", line, count=1)
            if line not in options:
                options.append(line)
        else:
            requirements.add(line)
    return "o\n" + "\n".join(options) + "\x00r\n" + "\n".join(sorted(requirements))


def _length_prefixed(pairs: Mapping[str, str]) -> str:
    return "".join([f"{len(k)}:{k}{len(v)}:{v}" for k, v in sorted(pairs.items())])


def _conda(spec: object) -> tuple[Mapping[str, Any], str]:
    """Validate a conda spec.

    Returns:
        A read-only, scrubbed copy of the spec, and its canonical payload.

    Raises:
        InvalidKeyParts: naming the offending key or entry.
    """
    if not isinstance(spec, Mapping):
        raise InvalidKeyParts(
            "conda", f"expected a mapping, got {type(spec).__name__}",
            hint='pass the parsed conda file, e.g. {"channels": [...], "dependencies": [...]}',
        )
    if not _CONDA_KEYS.issuperset(spec.keys()):
        unknown = sorted(str(k) for k in spec if k not in _CONDA_KEYS)
        raise InvalidKeyParts(
            f"conda.{unknown[0]}", "is not a supported conda key",
            hint="supported keys: " + ", ".join(sorted(_CONDA_KEYS)),
        )
    frozen: dict[str, Any] = {}
    for name in ("name", "prefix"):
        if spec.get(name) is not None:
            frozen[name] = _check_text(f"conda.{name}", spec[name])
    channels, _ = _lines("conda.channels", spec.get("channels") or ())
    frozen["channels"] = channels
    deps = spec.get("dependencies") or ()
    if isinstance(deps, (str, bytes)) or not isinstance(deps, Sequence):
        raise InvalidKeyParts(
            "conda.dependencies", f"expected a list, got {type(deps).__name__}",
            hint='list entries as strings or {"pip": [...]}',
        )
    entries: list[Any] = []
    names: set[str] = set()
    pip_texts: list[str] = []
    for i, dep in enumerate(deps):
        if type(dep) is str:
            if "\x00" in dep:
                _check_text(f"conda.dependencies[{i}]", dep)
            dep = _scrub(dep)
            entries.append(dep)
            names.add(" ".join(dep.split()))
        elif isinstance(dep, Mapping):
            if set(dep) != {"pip"}:
                raise InvalidKeyParts(
                    f"conda.dependencies[{i}]", "a mapping entry must have exactly the key 'pip'",
                    hint='write {"pip": ["requirement", ...]}',
                )
            pip, pip_text = _lines(f"conda.dependencies[{i}].pip", dep["pip"] or ())
            entries.append(MappingProxyType({"pip": pip}))
            pip_texts.append(pip_text)
        else:
            _check_text(f"conda.dependencies[{i}]", dep, hint='use a string or {"pip": [...]}')
    frozen["dependencies"] = tuple(entries)
    names.discard("")
    # dict.fromkeys keeps the first occurrence's position: channel order is solver priority.
    ordered = dict.fromkeys(c.strip() for c in channels)
    ordered.pop("", None)
    payload = (
        "+c\n" + "\n".join(ordered) + "\x00d\n" + "\n".join(sorted(names))
        + "\x00p\n" + _pip_payload("\n".join(pip_texts))
    )
    variables = spec.get("variables")
    if variables is not None:
        if not isinstance(variables, Mapping):
            raise InvalidKeyParts("conda.variables", "expected a mapping of str to str")
        checked = {
            _check_text("conda.variables", k): _scrub(_check_text(f"conda.variables.{k}", v))
            for k, v in variables.items()
        }
        frozen["variables"] = MappingProxyType(checked)
        if checked:
            payload += "\x00v\n" + _length_prefixed(checked)
    return MappingProxyType(frozen), payload


def _dockerfile_payload(text: str | None) -> str:
    if text is None:
        return "-"
    if text[:1] == "\ufeff":
        text = text[1:]
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    return "+" + text.rstrip()


_has_space = re.compile(r"\s").search
_KNOWN_PLATFORMS = frozenset({"linux/amd64", "linux/arm64"})


@dataclass(frozen=True)
class KeyParts:
    """Everything that decides an image's content; validated, canonicalised and frozen at once.

    URL credentials are stripped from every text field when the object is built (see the module
    docstring), so a ``KeyParts`` can be logged or shown in a traceback safely. The canonical
    payload of every part is computed here, once, so :func:`compute_key` only hashes.

    Attributes:
        base_image: the base image reference as written (``"dockyard/base:bookworm-python3"``).
        base_digest: its resolved ``"sha256:<64 hex>"`` when known.
        dockerfile: full Dockerfile text, when the environment is defined by one.
        conda: a conda spec (``name``, ``channels``, ``dependencies`` with optional
            ``{"pip": [...]}``, ``variables``).
        pip: pip requirement lines.
        user_managed: True when the user's image already has its Python dependencies.
        platform: ``os/arch[/variant]``.
        build_args: Docker build args (name -> value); never secrets.
        registry: the address of the registry the base is pulled from (never credentials).
        context: the 32-hex digest of the build context's files a Dockerfile uses, or None.
        lock: the lines of a lock file (pins and index options) the build installs, or None.

    Raises:
        InvalidKeyParts: a field has the wrong type or value; ``field`` names it and the
            message says how to fix it.
    """

    base_image: str | None
    base_digest: str | None = None
    dockerfile: str | None = None
    conda: Mapping[str, Any] | None = None
    pip: Sequence[str] = ()
    user_managed: bool = False
    platform: str = "linux/amd64"
    build_args: Mapping[str, str] = field(default_factory=dict)
    registry: str | None = None
    context: str | None = None
    lock: Sequence[str] | None = None
    # Canonical payloads in sorted part-name order; derived, so not compared or shown.
    _payloads: tuple[str, ...] = field(init=False, repr=False, compare=False, default=())
    _optional: tuple[str, ...] = field(init=False, repr=False, compare=False, default=())

    def __post_init__(self) -> None:
        put = object.__setattr__  # frozen: the normalised copies are stored once, here
        base_image = self.base_image
        if base_image is not None:
            base_image = _check_text("base_image", base_image).strip()
            if not base_image or _has_space(base_image):
                raise InvalidKeyParts(
                    "base_image", "must be a non-empty image reference without spaces",
                    hint='e.g. "dockyard/base:bookworm-python3", or None with a dockerfile',
                )
            put(self, "base_image", base_image)
        base_digest = self.base_digest
        if base_digest is not None:
            base_digest = _check_text("base_digest", base_digest).strip()
            if not _DIGEST.fullmatch(base_digest):
                raise InvalidKeyParts(
                    "base_digest", "must be 'sha256:' followed by 64 lowercase hex characters",
                    hint="pass the resolved digest, or None when unknown",
                )
            put(self, "base_digest", base_digest)
        dockerfile = self.dockerfile
        if dockerfile is not None:
            dockerfile = _check_text("dockerfile", dockerfile)
            if not dockerfile.strip():
                raise InvalidKeyParts(
                    "dockerfile", "is empty", hint="pass None when there is no Dockerfile"
                )
            dockerfile = _scrub(dockerfile)
            put(self, "dockerfile", dockerfile)
        if base_image is None and dockerfile is None:
            raise InvalidKeyParts(
                "base_image", "is None and there is no dockerfile: the image has no starting point",
                hint="set base_image (the engine's default base, if any) or dockerfile",
            )
        conda_payload = "-"
        if self.conda is not None:
            conda, conda_payload = _conda(self.conda)
            put(self, "conda", conda)
        pip, pip_text = _lines("pip", self.pip)
        put(self, "pip", pip)
        if self.user_managed is not True and self.user_managed is not False:
            raise InvalidKeyParts(
                "user_managed", f"expected bool, got {type(self.user_managed).__name__}",
                hint="pass True or False",
            )
        platform = self.platform
        if platform not in _KNOWN_PLATFORMS:
            platform = _check_text("platform", platform).strip().lower()
            if not _PLATFORM.fullmatch(platform):
                raise InvalidKeyParts(
                    "platform", "must look like os/arch[/variant]", hint='e.g. "linux/amd64"'
                )
            put(self, "platform", platform)
        build_args = self.build_args
        if not isinstance(build_args, Mapping):
            raise InvalidKeyParts(
                "build_args", f"expected a mapping, got {type(build_args).__name__}",
                hint="pass a dict of name -> value",
            )
        args: dict[str, str] = {}
        for name, value in build_args.items():
            if not isinstance(name, str) or not _ARG_NAME.fullmatch(name):
                raise InvalidKeyParts(
                    "build_args", "a name is not a valid build-arg identifier",
                    hint="names are letters, digits and underscores, not starting with a digit",
                )
            if _SECRET_ARG.search(name):
                raise InvalidKeyParts(
                    f"build_args.{name}", "looks like a secret",
                    hint="pass secrets as BuildKit secrets: a build arg would enter the key "
                    "and the image history",
                )
            args[name] = _scrub(_check_text(f"build_args.{name}", value))
        put(self, "build_args", MappingProxyType(args))
        registry = self.registry
        if registry is not None:
            address = _SCHEME.sub("", _check_text("registry", registry).strip())
            # Drop userinfo before anything else looks at it: this field is an address only.
            host, slash, path = address.partition("/")
            host = host.rpartition("@")[2].lower()
            registry = (host + slash + path).rstrip("/")
            if not _REGISTRY.fullmatch(registry):
                raise InvalidKeyParts(
                    "registry", "must be a registry address host[:port][/path]",
                    hint='e.g. "localhost:5000"; credentials belong to the engine, not the key',
                )
            put(self, "registry", registry)
        context = self.context
        if context is not None:
            context = _check_text("context", context).strip().lower()
            if not HEX32.fullmatch(context):
                raise InvalidKeyParts(
                    "context", "must be 32 hex characters (the digest of the context's files)",
                    hint="pass None when the build has no context",
                )
            if dockerfile is None:
                raise InvalidKeyParts(
                    "context", "is set but there is no dockerfile to use it", hint="pass None",
                )
            put(self, "context", context)
        lock_payload = None
        if self.lock is not None:
            lock, lock_text = _lines("lock", self.lock)
            if not any(line.strip() for line in lock):
                raise InvalidKeyParts("lock", "is empty", hint="pass None when there is no lock")
            put(self, "lock", lock)
            lock_payload = "+" + _pip_payload(lock_text)
        # In _SORTED_NAMES order (checked at import, below compute_key).
        put(self, "_payloads", (
            "-" if base_digest is None else "+" + base_digest,
            "-" if base_image is None else "+" + base_image,
            _length_prefixed(args) if args else "",
            conda_payload,
            _dockerfile_payload(dockerfile),
            _pip_payload(pip_text),
            platform,
            "-" if registry is None else "+" + registry,
            "1" if self.user_managed else "0",
            *(() if context is None else ("+" + context,)),
            *(() if lock_payload is None else (lock_payload,)),
        ))
        # Which optional parts follow the fixed ones, in OPTIONAL_PART_NAMES order.
        put(self, "_optional", tuple(n for n, v in (("context", context), ("lock", lock_payload)) if v is not None))

    def __hash__(self) -> int:
        # Mappings inside are unhashable; the payloads are the identity anyway.
        return hash(self._payloads)


@dataclass(frozen=True, eq=False)
class ContentKey:
    """A content key: 32 lowercase hex characters, the schema and every part's hash.

    Two keys are equal when their hex is equal, whatever else they carry (a key parsed from hex
    has no parts).

    Attributes:
        hex: the key, 32 lowercase hex characters.
        schema: the :data:`SCHEMA_VERSION` the key was computed with.
        parts: part name -> that part's 32-hex hash (empty for a parsed key).

    Raises:
        InvalidKey: ``hex`` is not 32 lowercase hex characters.
    """

    hex: str
    schema: int = SCHEMA_VERSION
    parts: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))

    def __post_init__(self) -> None:
        if not isinstance(self.hex, str) or not HEX32.fullmatch(self.hex):
            raise InvalidKey(
                "a content key is 32 lowercase hex characters",
                hint="use ContentKey.parse() for user input, or compute_key()",
            )
        if not isinstance(self.parts, (MappingProxyType, _PartHashes)):
            object.__setattr__(self, "parts", MappingProxyType(dict(self.parts)))

    @classmethod
    def parse(cls, text: str) -> ContentKey:
        """Validate a key written as hex (surrounding whitespace and upper case accepted).

        Args:
            text: the key as a user or another tool wrote it.

        Returns:
            A key without parts, equal to the computed key with the same hex.

        Raises:
            InvalidKey: ``text`` is not 32 hex characters.
        """
        value = text.strip().lower() if isinstance(text, str) else ""
        if not HEX32.fullmatch(value):
            # The text is not echoed: whatever was pasted here might be a secret.
            got = f"{len(text)} characters" if isinstance(text, str) else type(text).__name__
            raise InvalidKey(
                f"not a content key (got {got})",
                hint="a key is 32 hex characters, as printed by `dockyard env key`",
            )
        return cls(value)

    def __str__(self) -> str:
        return self.hex

    def __eq__(self, other: object) -> bool:
        if isinstance(other, ContentKey):
            return self.hex == other.hex
        return NotImplemented

    def __hash__(self) -> int:
        return hash(self.hex)

    def to_json(self) -> dict[str, Any]:
        """``{"key": hex, "schema": int, "parts": {name: hex}}`` (``dockyard env key --json``)."""
        return {"key": self.hex, "schema": self.schema, "parts": dict(self.parts)}


# Payloads of defaults recur in almost every key; hashing them once saves a few hashes per key.
_CONSTANT_HASHES: dict[str, str] = {
    p: xxh3_128_hexdigest(p.encode())
    for p in ("-", "0", "1", "", "o\n\x00r\n", "linux/amd64", "linux/arm64")
}
# The key body with a "%s" per part hash, in sorted name order: one C-level format per key.
_BODY = _KEY_PREFIX + "".join(f"{name}=%s\n" for name in _SORTED_NAMES)
_INDEX = {name: i for i, name in enumerate(_SORTED_NAMES)}
_FIXED = len(_SORTED_NAMES)
_new = object.__new__
_set = object.__setattr__


class _PartHashes(Mapping[str, str]):
    """Read-only part name -> hash view over the tuple :func:`compute_key` made.

    Cheaper to build than a dict behind a MappingProxyType, which matters on every hit.
    """

    __slots__ = ("_hashes", "_optional")

    def __init__(self, hashes: tuple[str, ...], optional: tuple[str, ...] = ()) -> None:
        self._hashes = hashes
        self._optional = optional

    def __getitem__(self, name: str) -> str:
        index = _INDEX.get(name)
        if index is None:
            if name not in self._optional:
                raise KeyError(name)  # an optional part this key does not have
            index = _FIXED + self._optional.index(name)
        return self._hashes[index]

    def __iter__(self) -> Iterator[str]:
        return iter(_SORTED_NAMES if not self._optional else (*_SORTED_NAMES, *self._optional))

    def __len__(self) -> int:
        return len(self._hashes)

    def __repr__(self) -> str:
        return repr(dict(self))


def compute_key(parts: KeyParts) -> ContentKey:
    """Compute the content key of ``parts`` (hot path: it only hashes, a few µs).

    Args:
        parts: validated key parts (canonicalised when they were built).

    Returns:
        The key with every part's hash, so that a miss can be explained with :func:`diff_keys`.

    Raises:
        InvalidKeyParts: ``parts`` is not a :class:`KeyParts`.
    """
    if not isinstance(parts, KeyParts):
        raise InvalidKeyParts(
            "*", f"compute_key() needs KeyParts, got {type(parts).__name__}",
            hint="build a KeyParts(...) first",
        )
    known = _CONSTANT_HASHES
    hashes = tuple([known.get(p) or xxh3_128_hexdigest(p.encode()) for p in parts._payloads])
    optional = parts._optional
    if not optional:
        body = _BODY % hashes
    else:  # optional parts are set: their lines follow the fixed ones (keys without them are unchanged)
        body = _BODY % hashes[:_FIXED] + "".join(f"{n}={h}\n" for n, h in zip(optional, hashes[_FIXED:]))
    # Built without __init__: every field is known valid here, and this is the hot path.
    key = _new(ContentKey)
    _set(key, "hex", xxh3_128_hexdigest(body.encode()))
    _set(key, "schema", SCHEMA_VERSION)
    _set(key, "parts", _PartHashes(hashes, optional))
    return key


if _SORTED_NAMES != (
    "base_digest", "base_image", "build_args", "conda", "dockerfile", "pip", "platform",
    "registry", "user_managed",
):  # pragma: no cover - KeyParts.__post_init__ lists its payloads in this order
    raise ImportError("dockyard.cache: KeyParts payload order does not match PART_NAMES")


def diff_keys(a: ContentKey, b: ContentKey) -> list[str]:
    """Name the parts whose hashes differ between two keys (why a key missed).

    Args:
        a: one key, as computed by :func:`compute_key`.
        b: the other key.

    Returns:
        Differing part names in :data:`PART_NAMES` order (``"schema"`` first when the schemas
        differ); empty when the keys are equal.

    Raises:
        InvalidKey: the keys differ but one of them carries no parts (it was parsed from hex).
    """
    if a.hex == b.hex:
        return []
    if not a.parts or not b.parts:
        raise InvalidKey(
            f"cannot explain {a.hex} vs {b.hex}: a key parsed from hex has no parts",
            hint="compute both keys with compute_key()",
        )
    names = ["schema"] if a.schema != b.schema else []
    order = list(PART_NAMES) + sorted((set(a.parts) | set(b.parts)) - set(PART_NAMES))
    names.extend(n for n in order if a.parts.get(n) != b.parts.get(n))
    return names


def unresolved_key(parts: Mapping[str, str]) -> str:
    """The key the same parts make without a resolved base digest (``base_digest=None``).

    An image's key folds in its base's digest; a spec read where no engine can be asked has none.
    Given an image key's part hashes (``ContentKey.parts``, or a cache entry's ``parts``), this
    is the key of the same spec before resolution, so either form can name the image.

    Raises:
        InvalidKey: ``parts`` lacks one of :data:`PART_NAMES`.
    """
    try:
        hashes = [parts[name] for name in _SORTED_NAMES]
    except KeyError as exc:
        raise InvalidKey(f"part hashes lack {exc.args[0]!r}", hint="pass ContentKey.parts or an entry's parts") from None
    hashes[_INDEX["base_digest"]] = _CONSTANT_HASHES["-"]
    body = _BODY % tuple(hashes)
    for name in OPTIONAL_PART_NAMES:
        if parts.get(name):
            body += f"{name}={parts[name]}\n"
    return xxh3_128_hexdigest(body.encode())
