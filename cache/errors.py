"""The ``dockyard.cache`` error tree.

``dockyard.cache`` never imports the engine package, so it has its own root. Every error it
raises on purpose is a :class:`CacheError`; ``sqlite3.Error`` is translated in exactly one place
(:func:`dockyard.cache._db.translate`), always with ``raise … from exc``. Each error carries the
data a caller needs, ``hint`` says what to do next, and ``exit_code`` is what a CLI should exit
with (same convention as the engine: 1 job failed, 2 bad input, 3 environment problem)::

    CacheError                     exit 1
    ├── CacheInputError            exit 2  the caller passed something unusable; nothing changed
    │   ├── InvalidKeyParts                a KeyParts field is invalid (``field``)
    │   └── InvalidKey                     not a 32-hex content key, or a key without parts
    ├── IndexUnavailable           exit 3  the SQLite index cannot be opened, read or written (``path``)
    │   └── IndexCorrupt                   the file is not a sound index (``path``, ``problems``)
    ├── LeaseLost                  exit 1  our build lease was taken over; the build was not recorded
    └── WaitTimeout                exit 1  another process held the build lease past ``wait_timeout``

Messages never contain credentials: key parts are only ever shown as hashes, and URL userinfo
is stripped before anything is hashed or stored.
"""

from __future__ import annotations

__all__ = [
    "CacheError",
    "CacheInputError",
    "IndexCorrupt",
    "IndexUnavailable",
    "InvalidKey",
    "InvalidKeyParts",
    "LeaseLost",
    "WaitTimeout",
]


class CacheError(Exception):
    """Root of every error ``dockyard.cache`` raises on purpose.

    Attributes:
        message: one line saying what went wrong.
        hint: what to do next (may be empty).
        exit_code: the exit status a CLI should use for this error.
    """

    exit_code: int = 1

    def __init__(self, message: str, *, hint: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message} ({self.hint})" if self.hint else self.message


class CacheInputError(CacheError):
    """The caller passed something the cache cannot use; nothing was changed."""

    exit_code = 2


class InvalidKeyParts(CacheInputError):
    """A :class:`~dockyard.cache.KeyParts` field is invalid.

    Attributes:
        field: the offending field, dotted for nested values (``"conda.dependencies[2]"``).
        part: the key part it belongs to (``"conda"``), to map back onto a caller's own fields.
    """

    def __init__(self, field: str, problem: str, *, hint: str = "") -> None:
        super().__init__(f"KeyParts.{field}: {problem}", hint=hint)
        self.field = field
        self.part = field.split(".", 1)[0].split("[", 1)[0]


class InvalidKey(CacheInputError):
    """A value is not a usable content key (not 32 hex characters, or it carries no parts)."""


class IndexUnavailable(CacheError):
    """The SQLite index cannot be opened, read or written.

    Attributes:
        path: the index file.
    """

    exit_code = 3

    def __init__(self, message: str, *, path: str, hint: str = "") -> None:
        super().__init__(message, hint=hint)
        self.path = path


class IndexCorrupt(IndexUnavailable):
    """The index file exists but is not a sound index.

    Attributes:
        path: the index file.
        problems: what ``PRAGMA integrity_check`` or the schema check reported.
    """

    def __init__(
        self, message: str, *, path: str, problems: tuple[str, ...] = (), hint: str = ""
    ) -> None:
        super().__init__(message, path=path, hint=hint)
        self.problems = problems


class LeaseLost(CacheError):
    """This process's build lease was taken over before the build was recorded.

    That only happens when the heartbeat could not run for longer than ``lease_timeout`` (the
    process was stopped or starved). The result was not recorded; another builder owns the key.

    Attributes:
        key: the content key (hex).
        holder: the owner token now holding the lease, or ``None`` when nobody does.
    """

    def __init__(self, key: str, holder: str | None) -> None:
        super().__init__(
            f"build lease on {key} was lost before the result was recorded"
            + (f" (now held by {holder})" if holder else ""),
            hint="the process stalled longer than lease_timeout; raise lease_timeout or retry",
        )
        self.key = key
        self.holder = holder


class WaitTimeout(CacheError):
    """Another process held the build lease for a key longer than ``wait_timeout``.

    Attributes:
        key: the content key (hex).
        holder: the owner token of the lease (``host:pid:random``).
        holder_pid: the process id of the holder.
        waited: seconds spent waiting.
    """

    def __init__(self, key: str, *, holder: str, holder_pid: int, waited: float) -> None:
        super().__init__(
            f"waited {waited:.1f} s for {key}, still being built by pid {holder_pid} ({holder})",
            hint="wait longer (wait_timeout) or check that process; a dead holder on this "
            "machine is taken over at once, one elsewhere once its lease_timeout passes",
        )
        self.key = key
        self.holder = holder
        self.holder_pid = holder_pid
        self.waited = waited
