"""The environment model, with Azure ML SDK v1's names, and its declarative YAML file form.

An :class:`Environment` says what image a run needs: a base image (or a Dockerfile), Python
dependencies (a conda spec and/or pip requirements, unless the image manages its own), a private
registry to pull the base from, build args and run-time environment variables. It reduces to a
:class:`dockyard.cache.KeyParts`, hence to a content key.

File form (``environment.yml``)::

    name: digits
    version: "1"
    docker:
      enabled: true
      base_image: dockyard/base:bookworm-python3   # or base_dockerfile: (text, or a path: its folder
                                                   #    is the build context, .dockerignore honoured)
      base_image_registry:
        address: 127.0.0.1:5000
        username: alice
        password_env: REGISTRY_PASSWORD            # the *name* of a variable, never the password
      platform: linux/amd64
      build_args: {PYTHONHASHSEED: "0"}
      build_context: {path: docker/, dockerfile_path: Dockerfile}   # instead of base_*: a context folder
    python:
      user_managed_dependencies: false
      interpreter_path: python3
      conda_dependencies: {channels: [...], dependencies: [...]}   # or conda_file: path
      pip_requirements: [numpy, scikit-learn]                      # or pip_requirements_file: path
      pip_lock_file: environment.lock.txt   # optional; by default the lock next to the file is used
    environment_variables: {OMP_NUM_THREADS: "2"}
"""

from __future__ import annotations

import difflib
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ._azure_only import AzureNames, instance_getattr
from ._conda import CondaDependencies, absolute_pip_paths, check_conda, conda_spec, read_conda_file
from ._context import BuildContext, collect_context
from ._lockfile import PipLock, lock_path, read_lock
from ._requirements import absolute_pip, localize_pip, read_requirements
from .errors import SpecError

__all__ = [
    "DEFAULT_BASE_IMAGE",
    "BuildInputs",
    "ContainerRegistry",
    "DockerBuildContext",
    "DockerSection",
    "Environment",
    "PythonSection",
]

#: The base image an environment uses when it names neither a base image nor a Dockerfile:
#: the python flavor `dockyard base bootstrap` makes (no registry needed).
DEFAULT_BASE_IMAGE = "dockyard/base:bookworm-python3"

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_ENV_VAR = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_DOCKERFILE_TEXT = re.compile(r"^\s*(#|FROM\b|ARG\b)", re.I)


@dataclass
class ContainerRegistry:
    """A private registry to pull the base image from (``docker.base_image_registry``).

    The password is held in memory only: it is never written to a file, a key, a label, a log or
    the index. In files, ``password_env`` names the environment variable that holds it.
    """

    address: str | None = None
    username: str | None = None
    password_env: str | None = None
    _password: str | None = field(default=None, repr=False, compare=False)

    @property
    def password(self) -> str | None:
        """The password set in code, else the value of ``password_env`` (read when needed)."""
        if self._password is not None:
            return self._password
        return os.environ.get(self.password_env) if self.password_env else None

    @password.setter
    def password(self, value: str | None) -> None:
        self._password = value

    def __repr__(self) -> str:
        shown = "***" if self.password else None
        return (
            f"ContainerRegistry(address={self.address!r}, username={self.username!r}, "
            f"password={shown!r}, password_env={self.password_env!r})"
        )


@dataclass
class DockerBuildContext:
    """A folder with a Dockerfile in it, sent to the build (Azure ML's ``DockerBuildContext``).

    Only what the Dockerfile's ``COPY``/``ADD`` lines read (after ``.dockerignore``) is sent and
    hashed into the key; see :mod:`dockyard._context`.
    """

    location: str
    dockerfile_path: str = "Dockerfile"

    @classmethod
    def from_local_directory(cls, workspace: Any = None, path: str | os.PathLike[str] = ".",
                             dockerfile_path: str = "Dockerfile") -> DockerBuildContext:
        """The folder ``path`` (the workspace argument is Azure's; nothing is uploaded here).

        Raises:
            SpecError: the folder or the Dockerfile inside it does not exist.
        """
        root = Path(path).expanduser().resolve()
        context = cls(str(root), str(dockerfile_path))
        context.dockerfile_file(where=None)  # fail now, at the line that named it
        return context

    def dockerfile_file(self, *, where: str | None) -> Path:
        root = Path(self.location)
        if not root.is_dir():
            raise SpecError(f"build context {self.location!r} is not a folder", path=where,
                            field="docker.build_context.path",
                            hint="give the folder that holds the Dockerfile and the files it copies")
        file = (root / self.dockerfile_path).resolve()
        if not file.is_file():
            raise SpecError(f"Dockerfile {self.dockerfile_path!r} not found in {self.location}", path=where,
                            field="docker.build_context.dockerfile_path", hint=f"looked for {file}")
        return file


@dataclass(frozen=True)
class BuildInputs:
    """What a build of an environment reads, resolved once: the key covers exactly this.

    ``pip`` and ``conda`` are the lines as the build sees them (host paths replaced by where the
    files land); ``files`` maps those places to host files; ``context`` is what a Dockerfile's
    ``COPY`` lines read.
    """

    dockerfile: str | None
    context: BuildContext | None
    pip: tuple[str, ...]
    conda: dict[str, Any] | None
    files: dict[str, Path]
    #: A lock's lines as the build reads them (it installs these instead of the requirements).
    lock: tuple[str, ...] | None = None


def pip_lines(inputs: BuildInputs) -> list[str]:
    """The pip requirement lines a build installs before any lock: a conda spec's pip section
    (its options, then its packages) first, then ``python.pip_requirements``."""
    if inputs.conda is None:
        return list(inputs.pip)
    spec = CondaDependencies(_underlying_structure=inputs.conda)
    return [*spec.pip_options, *spec.pip_packages, *inputs.pip]


@dataclass
class DockerSection:
    """``environment.docker``: what image to start from and how to build it, and (run time only,
    not part of the image's key) ``shm_size`` (``"2g"`` by default, as Azure ML) and the allowed
    ``docker run`` ``arguments``."""

    enabled: bool = True
    base_image: str | None = None
    base_dockerfile: str | None = None
    base_image_registry: ContainerRegistry = field(default_factory=ContainerRegistry)
    platform: str = "linux/amd64"
    build_args: dict[str, str] = field(default_factory=dict)
    shm_size: str | int | None = None
    arguments: list[str] = field(default_factory=list)
    #: A Dockerfile in a context folder (Azure's ``docker.build_context``), instead of a base.
    build_context: DockerBuildContext | None = None


@dataclass
class PythonSection:
    """``environment.python``: the Python dependencies dockyard installs (unless user-managed)."""

    user_managed_dependencies: bool = False
    interpreter_path: str = "python3"
    # Azure ML's default: an empty spec to add packages to (``add_pip_package``); empty installs nothing.
    conda_dependencies: dict[str, Any] | None = field(default_factory=CondaDependencies)
    pip_requirements: list[str] = field(default_factory=list)


class Environment(metaclass=AzureNames):
    """An environment a run executes in; the same names as Azure ML SDK v1's ``Environment``.

    Example:
        >>> env = Environment("fastai2")
        >>> env.docker.base_image = "fastdotai/fastai2:latest"
        >>> env.python.user_managed_dependencies = True
    """

    __getattr__ = instance_getattr('Environment')

    def __init__(self, name: str, *, _source: str | None = None) -> None:
        self.name = name
        self.version: str | None = None
        self.docker = DockerSection()
        self.python = PythonSection()
        self.environment_variables: dict[str, str] = {}
        # Where relative paths (a Dockerfile path) are resolved from, and what errors name.
        self._source = _source
        self._base_dir = Path(_source).resolve().parent if _source else Path.cwd()
        # True when the file form pulled in other files (a Dockerfile, a conda or pip file): then
        # the spec file's bytes alone do not decide the key (see _fastpath).
        self._reads_other_files = False
        self._source_bytes: bytes | None = None
        #: The pinned lock a build installs instead of the requirements (see ``_lockfile``).
        self._lock: PipLock | None = None

    def __repr__(self) -> str:
        return f"Environment(name={self.name!r}, version={self.version!r})"

    # -- constructors with Azure ML's names -----------------------------------------------------

    @classmethod
    def from_conda_specification(cls, name: str, file_path: str | os.PathLike[str]) -> Environment:
        """An environment whose Python dependencies are the conda spec in ``file_path``.

        Raises:
            SpecError: the file is missing or is not a conda spec.
        """
        env = cls(name)
        env.python.conda_dependencies = CondaDependencies(_underlying_structure=read_conda_file(Path(file_path)))
        return env

    @classmethod
    def from_pip_requirements(cls, name: str, file_path: str | os.PathLike[str]) -> Environment:
        """An environment whose Python dependencies are the requirements file ``file_path``.

        Raises:
            SpecError: the file is missing.
        """
        env = cls(name)
        env.python.pip_requirements = read_requirements(Path(file_path))
        return env

    @classmethod
    def from_docker_build_context(cls, name: str, docker_build_context: DockerBuildContext) -> Environment:
        """An environment built from a Dockerfile in a context folder (``COPY`` reads from it).

        Raises:
            SpecError: the folder or its Dockerfile does not exist.
        """
        docker_build_context.dockerfile_file(where=None)
        env = cls(name)
        env.docker.build_context = docker_build_context
        return env

    @classmethod
    def from_dockerfile(
        cls,
        name: str,
        dockerfile: str | os.PathLike[str],
        conda_specification: str | os.PathLike[str] | None = None,
    ) -> Environment:
        """An environment built from a Dockerfile: text, or a path to one (its folder is then the
        build context).

        Raises:
            SpecError: a path that does not exist, or an invalid conda spec.
        """
        env = cls(name)
        text = str(dockerfile)
        _dockerfile_text(text, Path.cwd(), where=None)  # a missing path fails here
        env.docker.base_dockerfile = text if _is_dockerfile_text(text) else str(Path(text).resolve())
        if conda_specification is not None:
            env.python.conda_dependencies = CondaDependencies(
                _underlying_structure=read_conda_file(Path(conda_specification)))
        return env

    @classmethod
    def from_docker_image(cls, name: str, image: str, container_registry: ContainerRegistry | None = None,
                          conda_specification: str | os.PathLike[str] | None = None,
                          pip_requirements: str | os.PathLike[str] | None = None) -> Environment:
        """An environment on ``image`` (Azure's ``from_docker_image``): with neither a conda spec nor
        requirements, the image's own Python packages are used (user-managed).

        Raises:
            SpecError: a conda or requirements file is missing or invalid.
        """
        env = cls(name)
        env.docker.base_image = image
        if container_registry is not None:
            env.docker.base_image_registry = container_registry
        if conda_specification is not None:
            env.python.conda_dependencies = CondaDependencies(
                _underlying_structure=read_conda_file(Path(conda_specification)))
        if pip_requirements is not None:
            env.python.pip_requirements = read_requirements(Path(pip_requirements))
        env.python.user_managed_dependencies = conda_specification is None and pip_requirements is None
        return env

    # -- a workspace's registered environments (see dockyard._env_registry) -----------------------

    def register(self, workspace: Any) -> Environment:
        """Register this environment in ``workspace``: version 1, 2, … of its name; an unchanged
        environment keeps the version it has. Returns the registered environment."""
        return workspace._environments.register(self)

    @staticmethod
    def get(workspace: Any, name: str, version: str | int | None = None) -> Environment:
        """A registered environment (the latest version unless ``version``).

        Raises:
            InputError: no such name or version (the message lists what is registered).
        """
        return workspace._environments.get(name, version)

    @staticmethod
    def list(workspace: Any) -> dict[str, Environment]:
        """name -> the latest registered version of each environment of ``workspace``."""
        return workspace._environments.list()

    def clone(self, new_name: str) -> Environment:
        """A copy with another name and no version (a password set in code is copied in memory)."""
        copy = Environment.from_dict(self.to_dict(), source=self._source)
        copy.name, copy.version = new_name, None
        copy.docker.base_image_registry._password = self.docker.base_image_registry._password
        return copy

    def build(self, workspace: Any, image_build_compute: Any = None) -> Any:
        """Build this environment's image in the background; ``.wait_for_completion(show_output=True)``
        follows it (Azure's ``ImageBuildDetails``)."""
        return workspace._environments.build(self)

    def build_local(self, workspace: Any, platform: Any = None, **kwargs: Any) -> Any:
        """Build this environment's image now, on this machine's engine."""
        return workspace._environments.build(self, wait=True)

    def get_image_details(self, workspace: Any) -> dict[str, Any]:
        """The image that names this environment and whether the engine holds it (asked now)."""
        return workspace._environments.image_details(self)

    # -- file form ------------------------------------------------------------------------------

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Environment:
        """Read an environment file (YAML), validating every field.

        Raises:
            SpecError: unreadable file, malformed YAML (with its line), an unknown field (with a
                suggestion), a wrong type, an inline password, a missing referenced file.
        """
        import yaml

        path = Path(path)
        try:
            raw = path.read_bytes()
            text = raw.decode()
        except UnicodeDecodeError as exc:
            raise SpecError("is not UTF-8 text", path=str(path), hint="save the file as UTF-8") from exc
        except FileNotFoundError as exc:
            raise SpecError("file not found", path=str(path), hint="check the path") from exc
        except OSError as exc:
            raise SpecError(f"cannot be read: {exc.strerror}", path=str(path)) from exc
        try:
            node = yaml.compose(text, Loader=yaml.SafeLoader)
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
            problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
            raise SpecError(
                f"malformed YAML: {problem}",
                path=str(path),
                line=mark.line + 1 if mark else None,
                hint="fix the YAML syntax at that line",
            ) from exc
        lines = _key_lines(node)
        env = _from_mapping(data, source=str(path), lines=lines)
        env._source_bytes = raw  # exactly what the key was computed from (the fast lane's memo)
        return env

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source: str | None = None) -> Environment:
        """Build an environment from the mapping a file holds (same validation as :meth:`load`)."""
        return _from_mapping(data, source=source, lines={})

    def to_dict(self) -> dict[str, Any]:
        """The file form as a mapping (never a password; ``password_env`` names where it lives)."""
        docker: dict[str, Any] = {"enabled": self.docker.enabled}
        if self.docker.base_image is not None:
            docker["base_image"] = self.docker.base_image
        build = self._build_context()
        if build is not None:
            # A context folder: absolute, so the file form means the same wherever it is read.
            root, dockerfile = build
            rel = os.path.relpath(dockerfile, root)
        elif self.docker.base_dockerfile is not None:
            docker["base_dockerfile"] = self.docker.base_dockerfile
        reg = self.docker.base_image_registry
        if reg.address or reg.username or reg.password_env:
            docker["base_image_registry"] = {
                k: v
                for k, v in (("address", reg.address), ("username", reg.username), ("password_env", reg.password_env))
                if v is not None
            }
        if self.docker.platform != "linux/amd64":
            docker["platform"] = self.docker.platform
        if self.docker.build_args:
            docker["build_args"] = dict(self.docker.build_args)
        if self.docker.shm_size is not None:
            docker["shm_size"] = self.docker.shm_size
        if self.docker.arguments:
            docker["arguments"] = list(self.docker.arguments)
        python: dict[str, Any] = {"user_managed_dependencies": self.python.user_managed_dependencies}
        if self.python.interpreter_path != "python3":
            python["interpreter_path"] = self.python.interpreter_path
        conda = conda_spec(self.python.conda_dependencies)
        if conda is not None:
            conda = absolute_pip_paths(json.loads(json.dumps(conda)), self._base_dir, where=self._source)
            python["conda_dependencies"] = conda  # plain types
        if self.python.pip_requirements:
            python["pip_requirements"] = absolute_pip(self.python.pip_requirements, self._base_dir,
                                                      where=self._source)
        if self._lock is not None:
            python["pip_lock_file"] = str(self._lock.path)  # absolute: a run's agent reads the same lock
        out: dict[str, Any] = {"name": self.name}
        if self.version is not None:
            out["version"] = self.version
        out["docker"] = docker
        out["python"] = python
        if build is not None:
            docker["build_context"] = {"path": str(root), "dockerfile_path": rel}
        if self.environment_variables:
            out["environment_variables"] = dict(self.environment_variables)
        return out

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the file form (atomically: a reader never sees half a file)."""
        import yaml

        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        tmp.write_text(yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True))
        os.replace(tmp, path)
        return path

    # -- content key ----------------------------------------------------------------------------

    def validate(self) -> None:
        """Check the fields that depend on each other.

        Raises:
            SpecError: both base_image and base_dockerfile set, bad names, bad variables.
        """
        where = self._source
        if not isinstance(self.name, str) or not _NAME.match(self.name):
            raise SpecError(
                f"name {self.name!r} is not a valid environment name",
                path=where,
                field="name",
                hint="use letters, digits, '.', '_' or '-' (no '/' or '..'), at most 128 characters",
            )
        if self.docker.build_context is not None and (self.docker.base_dockerfile is not None
                                                      or self.docker.base_image is not None):
            which = "base_dockerfile" if self.docker.base_dockerfile is not None else "base_image"
            raise SpecError(
                f"both docker.build_context (a context folder) and docker.{which} are set",
                path=where,
                field="docker.build_context",
                hint=f"the context's Dockerfile defines the image: set docker.{which} to None",
            )
        if self.docker.base_image is not None and self.docker.base_dockerfile is not None:
            raise SpecError(
                "both base_image and base_dockerfile are set",
                path=where,
                field="docker.base_dockerfile",
                hint="set docker.base_image to None when the image is defined by a Dockerfile",
            )
        for key in self.environment_variables:
            if not isinstance(key, str) or not _ENV_VAR.match(key):
                raise SpecError(
                    f"{key!r} is not a valid variable name",
                    path=where,
                    field="environment_variables",
                    hint="names are letters, digits and '_', not starting with a digit",
                )

    @property
    def effective_base_image(self) -> str | None:
        """The base image builds start from (``None`` when a Dockerfile defines the image)."""
        if self.docker.base_dockerfile is not None or self.docker.build_context is not None:
            return None
        return self.docker.base_image or DEFAULT_BASE_IMAGE

    def _build_context(self) -> tuple[Path, Path] | None:
        """(context folder, Dockerfile file) when the image comes from a Dockerfile on disk."""
        build = self.docker.build_context
        if build is not None:
            return Path(build.location), build.dockerfile_file(where=self._source)
        value = self.docker.base_dockerfile
        if value is None or _is_dockerfile_text(value):
            return None
        file = (self._base_dir / value).expanduser().resolve()
        _dockerfile_text(value, self._base_dir, where=self._source)  # missing -> a clear error
        return file.parent, file

    def dockerfile(self) -> str | None:
        """The Dockerfile text the image is built from (read now when it is a file), or None.

        Raises:
            SpecError: the Dockerfile file is missing or unreadable.
        """
        found = self._build_context()
        if found is not None:
            return _dockerfile_text(str(found[1]), found[0], where=self._source)
        return self.docker.base_dockerfile

    def build_inputs(self) -> BuildInputs:
        """Everything a build reads, resolved and hashed now (see :class:`BuildInputs`).

        Raises:
            SpecError: a missing file, a context over the limit, a .dockerignore that excludes the
                Dockerfile.
        """
        self.validate()
        found = self._build_context()
        dockerfile = self.dockerfile()
        context = None
        if found is not None and dockerfile is not None:
            root, file = found
            inside = file.is_relative_to(root.resolve())
            field = "docker.build_context" if self.docker.build_context else "docker.base_dockerfile"
            context = collect_context(root, dockerfile, dockerfile_rel=os.path.relpath(file, root) if inside else None,
                                      where=self._source, field=field)
        files: dict[str, Path] = {}
        pip: tuple[str, ...] = ()
        conda = None
        if not self.python.user_managed_dependencies:
            localized = localize_pip(self.python.pip_requirements, self._base_dir, where=self._source)
            pip, files = localized.lines, dict(localized.files)
            conda = conda_spec(self.python.conda_dependencies)
            if conda is not None:
                conda = json.loads(json.dumps(conda))
                for dep in conda.get("dependencies") or []:
                    if isinstance(dep, dict) and dep.get("pip"):
                        done = localize_pip(dep["pip"], self._base_dir, where=self._source)
                        dep["pip"] = list(done.lines)
                        files.update(done.files)
        inputs = BuildInputs(dockerfile, context, pip, conda, files)
        if self._lock is not None and not self.python.user_managed_dependencies:
            inputs = self._locked(inputs)
        return inputs

    def _locked(self, inputs: BuildInputs) -> BuildInputs:
        """``inputs`` installing the lock's pins, once the lock is checked to be of these requirements.

        Raises:
            SpecError: the lock was made from other requirements (or names a missing file).
        """
        lock = self._lock
        assert lock is not None
        unlocked = self.content_key(inputs=inputs)
        if (unlocked.parts["pip"], unlocked.parts["conda"]) != (lock.pip_part, lock.conda_part):
            spec = Path(self._source).name if self._source else "the environment"
            raise SpecError(
                f"the lock was made from other requirements than {spec} has now",
                path=str(lock.path), field="python.pip_requirements",
                hint=f"lock again (`dockyard env lock {self._source or 'FILE'}`), or delete {lock.path.name} "
                "to build from the requirements",
            )
        done = localize_pip(list(lock.lines), lock.path.parent, where=str(lock.path))
        return BuildInputs(inputs.dockerfile, inputs.context, inputs.pip, inputs.conda,
                           {**inputs.files, **done.files}, lock=done.lines)

    @property
    def lock(self) -> PipLock | None:
        """The lock builds of this environment install (None: none, the requirements are resolved)."""
        return self._lock

    def unlocked(self) -> Environment:
        """A copy of this environment that ignores its lock (what ``dockyard env lock`` resolves)."""
        import copy

        other = copy.copy(self)
        other._lock = None
        return other

    def key_parts(self, *, base_digest: str | None = None, inputs: BuildInputs | None = None) -> Any:
        """The :class:`dockyard.cache.KeyParts` this environment reduces to.

        Excluded on purpose: name, version and environment variables (run-time), the interpreter
        path (it picks a Python at run time, it does not change the image), and every credential
        (the registry *address* is in, never its username or password). With user-managed
        dependencies the conda spec and pip requirements are not installed, so they are not in.
        Files the build reads are in by content: a Dockerfile's context (what its COPY lines read)
        and the local files pip lines name (see :meth:`build_inputs`).

        Raises:
            SpecError: the environment is invalid (see :meth:`validate`), with the field named.
        """
        from dockyard.cache import CacheInputError, KeyParts

        inputs = self.build_inputs() if inputs is None else inputs
        managed = self.python.user_managed_dependencies
        try:
            return KeyParts(
                base_image=self.effective_base_image,
                base_digest=base_digest,
                dockerfile=inputs.dockerfile,
                conda=None if managed else inputs.conda,
                pip=() if managed else inputs.pip,
                user_managed=bool(managed),
                platform=self.docker.platform,
                build_args=dict(self.docker.build_args),
                registry=self.docker.base_image_registry.address or None,
                context=inputs.context.digest if inputs.context is not None else None,
                lock=None if managed or inputs.lock is None else inputs.lock,
            )
        except CacheInputError as exc:
            part = getattr(exc, "field", None)
            raise SpecError(
                exc.message, path=self._source, field=_FIELD_OF_PART.get(str(part), part), hint=exc.hint
            ) from exc

    def content_key(self, *, base_digest: str | None = None, inputs: BuildInputs | None = None) -> Any:
        """The :class:`dockyard.cache.ContentKey` of this environment."""
        from dockyard.cache import compute_key

        return compute_key(self.key_parts(base_digest=base_digest, inputs=inputs))


# Key part name -> the environment field a user edits.
_FIELD_OF_PART = {
    "base_image": "docker.base_image",
    "dockerfile": "docker.base_dockerfile",
    "conda": "python.conda_dependencies",
    "pip": "python.pip_requirements",
    "platform": "docker.platform",
    "build_args": "docker.build_args",
    "registry": "docker.base_image_registry.address",
    "context": "the build context: files the Dockerfile copies",
    "lock": "the lock file (dockyard env lock)",
}

# -- the file form's schema -----------------------------------------------------------------------

_TOP = {"name", "version", "docker", "python", "environment_variables"}
_BUILD = {"path", "dockerfile_path"}
_DOCKER = {"enabled", "base_image", "base_dockerfile", "base_image_registry", "platform", "build_args", "shm_size",
           "arguments", "build_context"}
_REGISTRY = {"address", "username", "password_env", "password"}
_PYTHON = {
    "user_managed_dependencies",
    "interpreter_path",
    "conda_dependencies",
    "conda_file",
    "pip_requirements",
    "pip_requirements_file",
    "pip_lock_file",
}


def _key_lines(node: Any, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], int]:
    """Map each mapping key's path to its 1-based line, so errors can say where."""
    import yaml

    out: dict[tuple[str, ...], int] = {}
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            path = (*prefix, str(key_node.value))
            out[path] = key_node.start_mark.line + 1
            out.update(_key_lines(value_node, path))
    return out


class _Reader:
    """Validates one file's mapping, with errors that name the file, line and field."""

    def __init__(self, source: str | None, lines: dict[tuple[str, ...], int]) -> None:
        self.source = source
        self.lines = lines
        self.base_dir = Path(source).resolve().parent if source else Path.cwd()

    def error(self, path: tuple[str, ...], message: str, hint: str = "") -> SpecError:
        line = None
        for n in range(len(path), 0, -1):
            if path[:n] in self.lines:
                line = self.lines[path[:n]]
                break
        return SpecError(message, path=self.source, line=line, field=".".join(path) or None, hint=hint)

    def mapping(self, value: Any, path: tuple[str, ...], allowed: set[str]) -> dict[str, Any]:
        if value is None:
            return {}
        if not isinstance(value, Mapping):
            raise self.error(path, f"expected a mapping, got {type(value).__name__}")
        for key in value:
            if key not in allowed:
                close = difflib.get_close_matches(str(key), sorted(allowed), n=1)
                hint = f"did you mean '{close[0]}'?" if close else f"known fields: {', '.join(sorted(allowed))}"
                raise self.error((*path, str(key)), "unknown field", hint=hint)
        return dict(value)

    def typed(self, value: Any, path: tuple[str, ...], kind: type | tuple[type, ...], what: str) -> Any:
        kinds = _as_tuple(kind)
        # YAML's `yes`/`true` are bools, and bool is an int: refuse it where a number/string is meant.
        if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
            raise self.error(path, f"expected {what}, got {type(value).__name__}")
        return value

    def strings(self, value: Any, path: tuple[str, ...]) -> list[str]:
        if value is None:
            return []
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise self.error(path, "expected a list of strings")
        return list(value)

    def str_map(self, value: Any, path: tuple[str, ...]) -> dict[str, str]:
        value = self.mapping(value, path, set(value) if isinstance(value, Mapping) else set())
        out = {}
        for k, v in value.items():
            if isinstance(v, bool) or not isinstance(v, (str, int, float)):
                raise self.error((*path, str(k)), "expected a string value", hint='quote it: "value"')
            out[str(k)] = str(v)
        return out

    def path(self, value: Any, path: tuple[str, ...]) -> Path:
        rel = self.typed(value, path, str, "a file path")
        full = (self.base_dir / rel).resolve()
        if not full.is_file():
            raise self.error(path, f"file {rel!r} does not exist", hint=f"looked for {full}")
        return full


def _as_tuple(kind: type | tuple[type, ...]) -> tuple[type, ...]:
    return kind if isinstance(kind, tuple) else (kind,)


def _from_mapping(data: Any, *, source: str | None, lines: dict[tuple[str, ...], int]) -> Environment:
    r = _Reader(source, lines)
    if data is None:
        raise r.error((), "the file is empty", hint="an environment needs at least a name")
    top = r.mapping(data, (), _TOP)
    if "name" not in top:
        raise r.error(("name",), "is missing", hint="add `name: my-env` at the top")
    env = Environment(str(r.typed(top["name"], ("name",), (str, int), "a string")), _source=source)
    if top.get("version") is not None:
        env.version = str(r.typed(top["version"], ("version",), (str, int, float), "a string"))

    docker = r.mapping(top.get("docker"), ("docker",), _DOCKER)
    if "enabled" in docker:
        env.docker.enabled = r.typed(docker["enabled"], ("docker", "enabled"), bool, "true or false")
    if docker.get("base_image") is not None:
        env.docker.base_image = r.typed(docker["base_image"], ("docker", "base_image"), str, "an image reference")
    if docker.get("base_dockerfile") is not None:
        raw = r.typed(docker["base_dockerfile"], ("docker", "base_dockerfile"), str, "Dockerfile text or a path")
        try:
            _dockerfile_text(raw, r.base_dir, where=source)  # a missing file fails here, at its line
        except SpecError as exc:
            raise r.error(("docker", "base_dockerfile"), exc.message.split(": ", 1)[-1], exc.hint) from None
        if _is_dockerfile_text(raw):
            env.docker.base_dockerfile = raw
        else:  # a path: kept (its folder is the build context), made absolute
            env.docker.base_dockerfile = str((r.base_dir / raw).expanduser().resolve())
            env._reads_other_files = True
    if "platform" in docker:
        env.docker.platform = r.typed(docker["platform"], ("docker", "platform"), str, "os/arch")
    if "build_args" in docker:
        env.docker.build_args = r.str_map(docker["build_args"], ("docker", "build_args"))
    if docker.get("shm_size") is not None:
        env.docker.shm_size = r.typed(docker["shm_size"], ("docker", "shm_size"), (str, int), "a size like 2g")
    if "arguments" in docker:
        env.docker.arguments = r.strings(docker["arguments"], ("docker", "arguments"))
    reg = r.mapping(docker.get("base_image_registry"), ("docker", "base_image_registry"), _REGISTRY)
    if "password" in reg:
        raise r.error(
            ("docker", "base_image_registry", "password"),
            "registry passwords are never stored in files",
            hint="put the password in an environment variable and name it: password_env: MY_REGISTRY_PASSWORD",
        )
    for attr in ("address", "username", "password_env"):
        if reg.get(attr) is not None:
            value = r.typed(reg[attr], ("docker", "base_image_registry", attr), str, "a string")
            setattr(env.docker.base_image_registry, attr, value)
    if reg.get("password_env") is not None and not _ENV_VAR.match(reg["password_env"]):
        raise r.error(
            ("docker", "base_image_registry", "password_env"),
            "must be the NAME of an environment variable",
            hint="e.g. password_env: MY_REGISTRY_PASSWORD",
        )

    python = r.mapping(top.get("python"), ("python",), _PYTHON)
    if "user_managed_dependencies" in python:
        env.python.user_managed_dependencies = r.typed(
            python["user_managed_dependencies"], ("python", "user_managed_dependencies"), bool, "true or false"
        )
    if "interpreter_path" in python:
        env.python.interpreter_path = r.typed(
            python["interpreter_path"], ("python", "interpreter_path"), str, "a path"
        )
    for inline, from_file in (("conda_dependencies", "conda_file"), ("pip_requirements", "pip_requirements_file")):
        if python.get(inline) is not None and python.get(from_file) is not None:
            raise r.error(("python", from_file), f"both {inline} and {from_file} are set", hint="keep one of them")
    if python.get("conda_dependencies") is not None:
        checked = check_conda(
            python["conda_dependencies"], lambda m, h="": r.error(("python", "conda_dependencies"), m, h)
        )
        try:
            checked = absolute_pip_paths(checked, r.base_dir, where=source)
        except SpecError as exc:
            raise r.error(("python", "conda_dependencies"), exc.message.split(": ", 1)[-1], exc.hint) from None
        env.python.conda_dependencies = CondaDependencies(_underlying_structure=checked)
    if python.get("conda_file") is not None:
        env.python.conda_dependencies = CondaDependencies(
            _underlying_structure=read_conda_file(r.path(python["conda_file"], ("python", "conda_file"))))
        env._reads_other_files = True
    if python.get("pip_requirements") is not None:
        lines = r.strings(python["pip_requirements"], ("python", "pip_requirements"))
        try:
            env.python.pip_requirements = absolute_pip(lines, r.base_dir, where=source)
        except SpecError as exc:
            raise r.error(("python", "pip_requirements"), exc.message.split(": ", 1)[-1], exc.hint) from None
        env._reads_other_files = env._reads_other_files or env.python.pip_requirements != lines
    if python.get("pip_requirements_file") is not None:
        env._reads_other_files = True
        env.python.pip_requirements = read_requirements(
            r.path(python["pip_requirements_file"], ("python", "pip_requirements_file"))
        )
    if env.python.pip_requirements and any(_requirements_name_files(env.python.pip_requirements)):
        env._reads_other_files = True
    if python.get("pip_lock_file") is not None:
        env._lock = read_lock(r.path(python["pip_lock_file"], ("python", "pip_lock_file")))
        if env._lock is None:
            raise r.error(("python", "pip_lock_file"), "file not found",
                          hint="write it with `dockyard env lock FILE`, or remove pip_lock_file")
    elif source is not None:
        env._lock = read_lock(lock_path(source))  # the lock next to the file, when there is one
    if env._lock is not None:
        env._reads_other_files = True
    at = ("docker", "build_context")
    build = r.mapping(docker.get("build_context"), at, _BUILD)
    if build:
        if "path" not in build:
            raise r.error((*at, "path"), "is missing", hint="the folder that holds the Dockerfile")
        folder = r.typed(build["path"], (*at, "path"), str, "a folder path")
        name = r.typed(build.get("dockerfile_path", "Dockerfile"), (*at, "dockerfile_path"), str, "a path")
        env.docker.build_context = DockerBuildContext(str((r.base_dir / folder).expanduser().resolve()), name)
        env._reads_other_files = True
        try:
            env.docker.build_context.dockerfile_file(where=source)
        except SpecError as exc:
            raise r.error(tuple((exc.field or "docker.build_context").split(".")), exc.message.split(": ", 1)[-1],
                          exc.hint) from None
    if "environment_variables" in top:
        env.environment_variables = r.str_map(top["environment_variables"], ("environment_variables",))
    try:
        env.validate()
    except SpecError as exc:
        raise r.error(tuple((exc.field or "").split(".")), exc.message.split(": ", 1)[-1], exc.hint) from None
    return env


def _is_dockerfile_text(value: str) -> bool:
    """``base_dockerfile`` is Dockerfile text, or (one line, not an instruction) a path to one."""
    return "\n" in value or bool(_DOCKERFILE_TEXT.match(value))


def _requirements_name_files(lines: list[str]) -> list[str]:
    """The lines that name a local path (after :func:`absolute_pip`, those are absolute)."""
    return [line for line in lines if line.startswith("/") or " /" in line or "file:/" in line]


def _dockerfile_text(value: str, base_dir: Path, *, where: str | None) -> str:
    """The Dockerfile text of ``base_dockerfile``: the value itself, or the file it names."""
    if _is_dockerfile_text(value):
        return value
    path = (base_dir / value).expanduser()
    try:
        return path.read_text()
    except FileNotFoundError as exc:
        raise SpecError(
            f"Dockerfile {value!r} does not exist",
            path=where,
            field="docker.base_dockerfile",
            hint=f"looked for {path.resolve()}; give Dockerfile text or an existing path",
        ) from exc
    except OSError as exc:
        raise SpecError(f"Dockerfile {value!r} cannot be read: {exc.strerror}", path=where,
                        field="docker.base_dockerfile") from exc


