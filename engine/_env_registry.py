"""A workspace's registered environments, with Azure ML SDK v1's behaviour.

``env.register(ws)`` records the environment's file form as version 1, 2, … of its name;
registering an unchanged environment returns the version it already has. ``Environment.get``,
``Environment.list``, ``env.build(ws)``/``build_local`` and ``get_image_details`` read and build
through here. Versions live in the workspace's store (``runs.db``, table ``environments``): one
transaction per registration, so two processes never get the same version.
"""

from __future__ import annotations

import threading
from typing import Any

from ._environment import Environment
from .errors import InputError

__all__ = ["EnvironmentRegistry", "ImageBuildDetails"]


def _spec(env: Environment) -> dict[str, Any]:
    spec = env.to_dict()
    spec.pop("version", None)  # the registry gives versions
    return spec


def _from_spec(spec: dict[str, Any], version: int) -> Environment:
    env = Environment.from_dict(spec)
    env.version = str(version)
    return env


class ImageBuildDetails:
    """An environment's image build, started by ``env.build(ws)`` (Azure's ``ImageBuildDetails``).

    The build runs in a background thread; :meth:`wait_for_completion` follows it.
    """

    def __init__(self, env: Environment, home: Any, *, start: bool = True) -> None:
        self.environment = env
        self._home = home
        self._lines: list[str] = []
        self._done = threading.Event()
        self._cond = threading.Condition()
        self.status = "Queued"
        self.image: str | None = None
        self.key: str | None = None
        self.error: Exception | None = None
        if start:
            threading.Thread(target=self._build, name=f"build-{env.name}", daemon=True).start()

    def _say(self, line: str) -> None:
        with self._cond:
            self._lines.append(line)
            self._cond.notify_all()

    def _build(self) -> None:
        from .build import Builder

        self.status = "Running"
        builder = Builder(self._home)
        try:
            built = builder.ensure_image(self.environment, progress=self._say,
                                         on_event=lambda e: self._say(e.plain()))
            self.image, self.key = built.image, built.key
            self._say(f"{built.image} {'(cache hit)' if built.cached else f'built in {built.seconds:.1f}s'}")
            self.status = "Succeeded"
        except Exception as exc:  # noqa: BLE001 - kept for wait_for_completion to raise in the caller's thread
            self.error, self.status = exc, "Failed"
            self._say(f"error: {exc}")
        finally:
            builder.close()
            with self._cond:
                self._done.set()
                self._cond.notify_all()

    def wait_for_completion(self, show_output: bool = False, raise_on_error: bool = True) -> dict[str, Any]:
        """Wait for the build; with ``show_output`` print its progress as it comes.

        Raises:
            BuildError, SpecError, …: the build failed (unless ``raise_on_error=False``).
        """
        shown = 0
        while True:
            with self._cond:
                while shown == len(self._lines) and not self._done.is_set():
                    self._cond.wait(0.5)
                new, shown = self._lines[shown:], len(self._lines)
                finished = self._done.is_set() and shown == len(self._lines)
            if show_output:
                for line in new:
                    print(line, flush=True)
            if finished:
                break
        if self.error is not None and raise_on_error:
            raise self.error
        return self.get_details()

    def get_details(self) -> dict[str, Any]:
        error = None if self.error is None else getattr(self.error, "message", None) or str(self.error)
        return {"status": self.status, "image": self.image, "key": self.key, "error": error}

    def get_log(self) -> str:
        with self._cond:
            return "\n".join(self._lines)


class EnvironmentRegistry:
    """The registered environments of one workspace (``workspace.store``)."""

    def __init__(self, workspace: Any) -> None:
        self.workspace = workspace

    def register(self, env: Environment) -> Environment:
        """Record ``env`` (a new version unless it equals the latest); returns it with its version.

        Raises:
            SpecError: the environment is invalid.
        """
        env.validate()
        version, _ = self.workspace.store.register_environment(env.name, _spec(env))
        env.version = str(version)
        return _from_spec(_spec(env), version)

    def get(self, name: str, version: str | int | None = None) -> Environment:
        """The registered environment ``name`` (its latest version unless ``version``).

        Raises:
            InputError: no such name or version, with what is registered.
        """
        if version is not None and not str(version).isdigit():
            raise InputError(f"environment version {version!r} is not a number",
                             hint="versions are 1, 2, …; leave it out for the latest")
        found = self.workspace.store.environment(name, int(version) if version is not None else None)
        if found is None:
            known = sorted({n for n, *_ in self.workspace.store.environment_versions()})
            what = f"{name!r}" + (f" version {version}" if version is not None else "")
            raise InputError(
                f"workspace {self.workspace.name!r} has no registered environment {what}",
                hint=(f"registered: {', '.join(known)}" if known else "register one with env.register(workspace)"),
            )
        return _from_spec(found[1], found[0])

    def list(self) -> dict[str, Environment]:
        """name -> the latest registered version (Azure's ``Environment.list``)."""
        latest: dict[str, tuple[int, dict[str, Any]]] = {}
        for name, version, spec, _ in self.workspace.store.environment_versions():
            latest[name] = (version, spec)
        return {name: _from_spec(spec, version) for name, (version, spec) in sorted(latest.items())}

    def versions(self) -> list[tuple[str, int, float]]:
        """Every (name, version, registered at)."""
        return [(n, v, t) for n, v, _, t in self.workspace.store.environment_versions()]

    def build(self, env: Environment, *, wait: bool = False) -> ImageBuildDetails:
        """Build ``env``'s image (in the background unless ``wait``)."""
        details = ImageBuildDetails(env, self.workspace.home, start=not wait)
        if wait:
            details._build()
        return details

    def image_details(self, env: Environment) -> dict[str, Any]:
        """What image names ``env`` and whether the engine holds it (asked now, never assumed).

        Raises:
            EngineUnavailable: the engine cannot be asked (then whether it exists is unknown).
        """
        from .build import Builder, image_tag

        builder = Builder(self.workspace.home)
        try:
            key, why = builder.image_key(env)
            tag = image_tag(key.hex)
            found = builder.engine.inspect_image(tag)
        finally:
            builder.close()
        return {
            "imageExistsInRegistry": found is not None,
            "dockerImage": {"name": tag, "registry": {"address": None}, "id": (found or {}).get("Id")},
            "key": key.hex,
            "keyResolved": why is None,
            "environment": {"name": env.name, "version": env.version},
        }
