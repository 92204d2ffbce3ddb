"""The dockyard error tree.

Every error dockyard raises on purpose is a :class:`DockyardError`; foreign errors (``grpc.RpcError``,
``docker.errors.APIError``, ``sqlite3.Error``, ``OSError`` from sockets) are translated once, at the
module that talks to that component, always with ``raise … from exc``. Each error carries the data
a caller needs (``hint`` says what to do next) and an ``exit_code`` the CLI uses::

    DockyardError                      exit 1 unless a subclass says otherwise
    ├── InputError                     exit 2  bad input or usage: the caller must change something
    │   ├── SpecError                          an environment/run file is invalid (file, line, field)
    │   ├── SnapshotTooLarge                   a run's source directory is over the snapshot budget
    │   ├── RunNotFound                        no run has that id
    │   ├── NotSupportedHere                   an Azure ML name dockyard does not have (the hint: what instead)
    │   └── ComputeTargetException             no such compute target (Azure ML's name)
    ├── EnvironmentProblem             exit 3  the machine lacks a part: install or start it
    │   ├── EngineUnavailable                  no Docker Engine answers at DOCKER_HOST
    │   ├── BuildKitUnavailable                the engine answers but its BuildKit does not
    │   ├── EngineError                        the engine refused or failed a request
    │   ├── ToolMissing                        a host tool (debootstrap, busybox) is absent
    │   ├── ClusterUnavailable                 a Ray cluster cannot be reached or refused the token
    │   └── RegistryError                      a registry is unreachable or refused
    │       └── RegistryAuthError              … because the credentials were refused
    └── JobFailed                      exit 1  the work itself failed
        ├── BootstrapError                     making a base image failed (step, log tail)
        ├── BuildError                         an image build failed (step, exit code, log tail, line)
        └── RunFailed                          a run ended Failed (run id, exit code, log tail)

``dockyard.cache`` has its own root, ``CacheError``, because it never imports this package; the CLI
maps both roots. Messages never contain secrets: values that could hold one are scrubbed with
:func:`scrub` before they are put into an error.
"""

from __future__ import annotations

import re

__all__ = [
    "BootstrapError",
    "BuildError",
    "BuildKitUnavailable",
    "ClusterUnavailable",
    "ComputeTargetException",
    "DockyardError",
    "EngineError",
    "EngineUnavailable",
    "EnvironmentProblem",
    "InputError",
    "JobFailed",
    "NotSupportedHere",
    "RegistryAuthError",
    "RegistryError",
    "RunFailed",
    "RunNotFound",
    "SnapshotTooLarge",
    "SpecError",
    "ToolMissing",
    "scrub",
]


class DockyardError(Exception):
    """Root of every error dockyard raises on purpose.

    Attributes:
        message: one line saying what went wrong.
        hint: what to do next (may be empty).
        exit_code: the CLI's exit status for this error.
    """

    exit_code: int = 1

    def __init__(self, message: str, *, hint: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message} ({self.hint})" if self.hint else self.message


class InputError(DockyardError):
    """The caller gave something dockyard cannot use; nothing was changed."""

    exit_code = 2


class NotSupportedHere(InputError, NotImplementedError):
    """An Azure ML SDK v1 name that dockyard does not implement; the hint names the local way.

    Also a ``NotImplementedError``, so ported code that guards with it keeps working.
    """


class SpecError(InputError):
    """A spec file is invalid. Carries where: ``path``, ``line`` (1-based or None), ``field``."""

    def __init__(
        self,
        message: str,
        *,
        path: str | None = None,
        line: int | None = None,
        field: str | None = None,
        hint: str = "",
    ) -> None:
        where = ":".join(str(p) for p in (path, line) if p is not None)
        prefix = " ".join(p for p in (where, f"field '{field}'" if field else "") if p)
        super().__init__(f"{prefix}: {message}" if prefix else message, hint=hint)
        self.path = path
        self.line = line
        self.field = field


class SnapshotTooLarge(InputError):
    """A run's source directory holds more than the snapshot budget; nothing was stored.

    Attributes:
        source: the source directory.
        total_bytes: what the snapshot would have held.
        max_bytes: the budget.
        largest: the biggest files as ``(relative path, bytes)``, largest first.
    """

    def __init__(
        self,
        message: str,
        *,
        source: str,
        total_bytes: int,
        max_bytes: int,
        largest: tuple[tuple[str, int], ...],
        hint: str = "",
    ) -> None:
        super().__init__(message, hint=hint)
        self.source = source
        self.total_bytes = total_bytes
        self.max_bytes = max_bytes
        self.largest = largest


class RunNotFound(InputError):
    """No run has that id."""


class ComputeTargetException(InputError):
    """A compute target does not exist or cannot be used (Azure ML's name for this error)."""


class EnvironmentProblem(DockyardError):
    """A part of the machine dockyard needs is missing or down."""

    exit_code = 3


class EngineUnavailable(EnvironmentProblem):
    """No Docker Engine answered at the configured address."""

    def __init__(self, address: str, reason: str) -> None:
        super().__init__(
            f"no Docker Engine answers at {address}: {reason}",
            hint="start one with `bash scripts/setup-engine` (installs docker.io and starts dockerd "
            "as root on Debian/Ubuntu), or point DOCKER_HOST at a running engine",
        )
        self.address = address
        self.reason = reason


class BuildKitUnavailable(EnvironmentProblem):
    """The engine answered, but its BuildKit gRPC service did not."""


class EngineError(EnvironmentProblem):
    """The engine refused or failed a request (status code and its message)."""

    def __init__(self, message: str, *, status: int | None = None, hint: str = "") -> None:
        super().__init__(message, hint=hint)
        self.status = status


class ToolMissing(EnvironmentProblem):
    """A host tool is not installed (or dockyard lacks the rights to use it)."""


class ClusterUnavailable(EnvironmentProblem):
    """A cluster (Ray) cannot be reached, refused the token, or lacks dockyard on a node. Names the
    address, never the token."""

    def __init__(self, message: str, *, address: str, hint: str = "") -> None:
        super().__init__(message, hint=hint)
        self.address = address


class RegistryError(EnvironmentProblem):
    """A container registry is unreachable or refused a request. Names the registry, never secrets."""

    def __init__(self, message: str, *, registry: str, hint: str = "") -> None:
        super().__init__(message, hint=hint)
        self.registry = registry


class RegistryAuthError(RegistryError):
    """The registry refused the credentials given for it."""


class JobFailed(DockyardError):
    """The requested work ran and failed."""

    exit_code = 1


class BootstrapError(JobFailed):
    """Making a base image failed. ``step`` names the stage, ``log_tail`` the last output lines."""

    def __init__(self, message: str, *, step: str, log_tail: str = "", hint: str = "") -> None:
        super().__init__(message, hint=hint)
        self.step = step
        self.log_tail = log_tail


class BuildError(JobFailed):
    """An image build failed.

    Attributes:
        step: the failing step as BuildKit names it (``[3/5] RUN pip install …``), or "".
        exit_code_of_step: the failing command's exit code, when BuildKit said it.
        log_tail: the last lines the failing step printed.
        dockerfile_line: the 1-based line of the rendered Dockerfile, when known.
        dockerfile: the rendered Dockerfile text (to show the line in context).
    """

    def __init__(
        self,
        message: str,
        *,
        step: str = "",
        exit_code_of_step: int | None = None,
        log_tail: str = "",
        dockerfile_line: int | None = None,
        dockerfile: str = "",
        hint: str = "",
    ) -> None:
        super().__init__(message, hint=hint)
        self.step = step
        self.exit_code_of_step = exit_code_of_step
        self.log_tail = log_tail
        self.dockerfile_line = dockerfile_line
        self.dockerfile = dockerfile


class RunFailed(JobFailed):
    """A run ended ``Failed``: ``run_id``, ``exit_code_of_run`` (None when it never ran), ``log_tail``."""

    def __init__(self, message: str, *, run_id: str, exit_code_of_run: int | None, log_tail: str = "", hint: str = "") -> None:
        super().__init__(message, hint=hint or f"see the whole output with `dockyard runs logs {run_id}`")
        self.run_id = run_id
        self.exit_code_of_run = exit_code_of_run
        self.log_tail = log_tail


# user:password@ in URLs, and common "password=…"/"token: …" shapes in messages from other tools.
_SECRET_PATTERNS = (
    re.compile(r"(?<=://)[^/@\s:]+:[^/@\s]+@"),
    re.compile(r"(?i)\b(password|passwd|secret|token|auth)(\"?\s*[:=]\s*\"?)[^\s\",}]+"),
)


def scrub(text: str, *secrets: str | None) -> str:
    """Return ``text`` with each known secret and credential-shaped substring replaced by ``***``."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    text = _SECRET_PATTERNS[0].sub("***@", text)
    return _SECRET_PATTERNS[1].sub(lambda m: f"{m.group(1)}{m.group(2)}***", text)
