"""Build each environment once, reuse it forever: key -> index -> (verify) -> single-flight build.

The hit path imports neither grpc nor the docker SDK nor sqlite-utils: the base resolution and the
index lookup are SQLite reads, and verifying the image is one HTTP request on the engine socket.
"""

from __future__ import annotations

import hashlib
import os
import re
import threading
import time
import urllib.parse
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, cast

from .._environment import BuildInputs, ContainerRegistry, Environment
from .._home import dockyard_home, index_path
from ..dockerd import EngineClient
from ..errors import DockyardError, InputError, RegistryAuthError

if TYPE_CHECKING:  # pragma: no cover
    from dockyard.cache import ContentKey, ImageCache, PublishRecord

    from ._buildkit import BuildEvent
    from ._dockerfile import NeighbourImage, RenderedBuild
    from ._resolved import Resolution
    from ._shared import CacheRegistry, Presence

__all__ = ["Builder", "BuiltImage", "SharedStatus", "ensure_image"]

#: How long a base image's resolved digest is trusted before the engine is asked again.
DEFAULT_RESOLVE_TTL = 300.0
#: Published keys whose parts are read (two small GETs each) per near miss; the rest on later misses.
_NEIGHBOURS_READ = 32
_DEFAULT: Any = object()  # "the builder's own" shared cache, told apart from None (none)
_FROM = re.compile(r"^\s*FROM\s+(?:--platform=\S+\s+)?(\S+)(?:\s+AS\s+(\S+))?\s*$", re.I | re.M)


@dataclass(frozen=True)
class BuiltImage:
    """An image ready to run: ``cached`` when no build ran in this call."""

    key: str
    image: str
    image_id: str
    cached: bool
    source: Literal["local-hit", "built", "pulled"]
    seconds: float
    python: str = "python3"
    #: The key of the environment a near miss started from (built now from a neighbour), else None.
    neighbour: str | None = None

    def to_json(self) -> dict[str, object]:
        out: dict[str, object] = {
            "key": self.key,
            "image": self.image,
            "image_id": self.image_id,
            "cached": self.cached,
            "source": self.source,
            "seconds": round(self.seconds, 6),
        }
        if self.neighbour:
            out["neighbour"] = self.neighbour
        return out


def _resolve_ttl() -> float:
    raw = os.environ.get("DOCKYARD_RESOLVE_TTL")
    if raw is None:
        return DEFAULT_RESOLVE_TTL
    try:
        value = float(raw)
    except ValueError:
        raise InputError(f"DOCKYARD_RESOLVE_TTL={raw!r} is not a number of seconds") from None
    if value < 0:
        raise InputError(f"DOCKYARD_RESOLVE_TTL={raw!r} must be >= 0")
    return value


class Builder:
    """Turns environments into images in one engine, with an index under ``home``.

    Args:
        home: dockyard's state folder (default ``$DOCKYARD_HOME`` or ``~/.local/share/dockyard``).
        engine: the Docker Engine (default from ``DOCKER_HOST``).
        buildkit: ``docker`` (the engine's BuildKit) or a standalone buildkitd address.
        resolve_ttl: seconds a base image's resolved digest is reused (``DOCKYARD_RESOLVE_TTL``).
        cache_registry: the shared cache (``REG/REPO`` or a :class:`CacheRegistry`; default
            ``DOCKYARD_CACHE_REGISTRY``), see :mod:`._shared`; ``""`` turns it off.
    """

    def __init__(
        self,
        home: str | Path | None = None,
        *,
        engine: EngineClient | None = None,
        buildkit: str | None = None,
        resolve_ttl: float | None = None,
        cache_registry: str | CacheRegistry | None = None,
        installer: str | None = None,
    ) -> None:
        from dockyard.cache import ImageCache

        from ._resolved import INSTALLERS, installer_setting
        from ._shared import CacheRegistry

        self.home = Path(home) if home is not None else dockyard_home()
        self.engine = engine or EngineClient.from_env()
        self.buildkit = buildkit or os.environ.get("DOCKYARD_BUILDKIT", "docker")
        self.resolve_ttl = _resolve_ttl() if resolve_ttl is None else resolve_ttl
        self.cache: ImageCache = ImageCache(index_path(self.home))
        # The credentials' variables apply to a registry given here as to one set in the environment.
        if isinstance(cache_registry, CacheRegistry):
            self.shared: CacheRegistry | None = cache_registry
        else:
            environ = dict(os.environ) if cache_registry is None else {**os.environ, "DOCKYARD_CACHE_REGISTRY": cache_registry}
            self.shared = CacheRegistry.from_env(environ)
        # One object per registry, so its short memory of absent keys lasts across builds.
        self._registries: dict[tuple[str, str, str | None, str | None], CacheRegistry] = {}
        self._publishing: list[threading.Thread] = []
        self._publishing_lock = threading.Lock()  # a node's daemon builds and waits from many threads
        #: What the last publish of each key said (None: pushed), for `dockyard cache` to report.
        self.published: dict[str, str | None] = {}
        #: What installs pip requirements: ``uv`` (default) or ``pip`` (``DOCKYARD_INSTALLER``).
        self.installer = installer_setting() if installer is None else installer
        if self.installer not in INSTALLERS:
            raise InputError(f"installer {self.installer!r} is not one of {', '.join(INSTALLERS)}")
        #: What each build of this builder resolved (by key), until it is recorded in the index.
        self._resolutions: dict[str, Resolution] = {}

    def registry(self, text: str, *, username: str | None = None, password_env: str | None = None) -> CacheRegistry | None:
        """The shared cache named ``text`` (``""``: none), the same object for the same setting.

        Raises:
            InputError: ``text`` is not ``REG/REPO``.
        """
        from ._shared import CacheRegistry

        if not text.strip():
            return None
        found = CacheRegistry.parse(text, username=username, password_env=password_env)
        ident = (found.address, found.repository, found.username, found.password_env)
        return self._registries.setdefault(ident, found)

    def close(self) -> None:
        """Wait for pushes to the shared cache still under way, then close the index."""
        self.wait_published()
        self.cache.close()

    def wait_published(self, key_hex: str = "") -> None:
        """Wait for the push of ``key_hex`` (every push under way if empty) to the shared cache.

        A cluster node reports a run's end only after its image's push: a run submitted after it
        then finds the image in the shared cache on any other node, and pulls instead of building."""
        with self._publishing_lock:
            waiting = [t for t in self._publishing if not key_hex or t.name == f"publish-{key_hex[:12]}"]
        for thread in waiting:
            thread.join()

    # -- resolution -----------------------------------------------------------------------------

    def _local_id(self, ref: str) -> str | None:
        found = self.engine.inspect_image(ref)
        return str(found.get("Id", "")) or None if found is not None else None

    def _resolve_ref(
        self, ref: str, registry: ContainerRegistry | None, progress: Callable[[str], None]
    ) -> tuple[str, bool]:
        """(image ID of ``ref`` in the engine, pulled?) — pulled (with ``registry``'s credentials) if absent."""
        image_id = self._local_id(ref)
        if image_id is not None:
            return image_id, False
        from ._registry import pull_image

        progress(f"pulling {ref}")
        return pull_image(ref, registry, engine=self.engine, progress=progress), True

    def resolve_base(
        self, env: Environment, progress: Callable[[str], None] | None = None
    ) -> tuple[str | None, bool, dict[str, str]]:
        """The digest that pins the environment's base content, whether a pull happened, and
        each base reference with the digest it resolved to.

        A base image resolves to its image ID in the engine (what Docker's BuildKit builds from);
        a Dockerfile resolves to one digest over every ``FROM`` image it names. Results are reused
        for ``resolve_ttl`` seconds, so a hit stays in microseconds and a moved tag is noticed
        within that time.
        """
        report = progress or (lambda _l: None)
        refs = self._base_refs(env)
        resolved: dict[str, str] = {}
        pulled = False
        for ref, registry in refs:
            digest = self.cache.resolution(ref, max_age=self.resolve_ttl)
            if digest is None:
                digest, did_pull = self._resolve_ref(ref, registry, report)
                pulled = pulled or did_pull
                self.cache.remember_resolution(ref, digest)
            resolved[ref] = digest
        return _combined_digest(resolved), pulled, resolved

    def pull_bases(self, env: Environment, progress: Callable[[str], None] | None = None) -> None:
        """Make sure the engine holds every base ``env`` builds from, pulling (with the registry's
        credentials, which only this process may hold) what it lacks, whatever was remembered.

        Raises:
            RegistryAuthError, RegistryError: a base could not be pulled.
        """
        report = progress or (lambda _l: None)
        self.resolve_base(env, report)
        self._bases_refreshed(env, report)

    def _base_refs(self, env: Environment) -> list[tuple[str, ContainerRegistry | None]]:
        """The images a build starts from, each with the registry credentials that apply to it."""
        from ._registry import parse_image_ref, qualify

        registry = env.docker.base_image_registry
        reg = registry if registry.address else None
        base = env.effective_base_image
        if base is not None:
            return [(qualify(base, reg), reg)]
        # A Dockerfile's FROM lines are used as written; the registry's credentials go only to
        # images that name the registry's own host.
        stages: set[str] = set()
        refs: list[tuple[str, ContainerRegistry | None]] = []
        for m in _FROM.finditer(env.dockerfile() or ""):
            image, alias = m.group(1), m.group(2)
            if image.lower() != "scratch" and image not in stages and "$" not in image:
                host = parse_image_ref(image).host
                # qualify() keeps a ref naming the registry's host and refuses any other host.
                same = reg is not None and host is not None and _qualify_or_none(image, reg) is not None
                refs.append((image, reg if same else None))
            if alias:
                stages.add(alias)
        return refs

    def image_key(self, env: Environment) -> tuple[ContentKey, str | None]:
        """The key that names ``env``'s image — the one ``ensure_image`` builds and tags — without
        pulling anything: each base is resolved from what was remembered or from the engine.

        Returns:
            (key, None) when every base resolved; else (the key before resolution, why).
        """
        from ..errors import DockyardError

        inputs = env.build_inputs()
        resolved: dict[str, str] = {}
        for ref, _registry in self._base_refs(env):
            digest = self.cache.resolution(ref, max_age=self.resolve_ttl)
            if digest is None:
                try:
                    digest = self._local_id(ref)
                except DockyardError as exc:
                    why = f"the engine at {self.engine.url} cannot be asked ({exc.message})"
                    return env.content_key(inputs=inputs), why
                if digest is None:
                    why = f"the base {ref} is not in the engine yet (`dockyard env build` pulls it)"
                    return env.content_key(inputs=inputs), why
            resolved[ref] = digest
        return env.content_key(base_digest=_combined_digest(resolved), inputs=inputs), None

    # -- the hit path ---------------------------------------------------------------------------

    def key_for(self, env: Environment, progress: Callable[[str], None] | None = None, *,
                inputs: BuildInputs | None = None) -> tuple[ContentKey, bool]:
        """The image's key (bases resolved, pulled if missing) and whether a pull happened.

        ``inputs`` (``env.build_inputs()``) when the caller has them: they hash the context.
        """
        digest, pulled, refs = self.resolve_base(env, progress)
        key = env.content_key(base_digest=digest, inputs=inputs)
        self._remember(env, key, refs)
        return key, pulled

    def _remember(self, env: Environment, key: ContentKey, refs: dict[str, str]) -> None:
        """Memoise spec file -> key for the CLI's fast lane (see ``dockyard.cli._fastpath``)."""
        spec = env._source_bytes
        if env._source is None or spec is None or env._reads_other_files or self.buildkit != "docker":
            return
        from ._memo import spec_fingerprint

        fingerprint = spec_fingerprint(spec, self.engine.url)
        self.cache.remember_key(os.path.abspath(env._source), fingerprint, key, refs)

    def _verified(self, image: str, image_id: str) -> bool:
        """The tag still exists in the engine and still names the recorded image (one request)."""
        if self.buildkit != "docker":
            return True  # pushed to a registry, not kept in a local engine
        if self.engine.unix_path is not None:
            from ..dockerd._rawhttp import unix_image_id

            return unix_image_id(self.engine.unix_path, image) == image_id
        return self._local_id(image) == image_id

    def ensure_image(
        self,
        env: Environment,
        *,
        no_cache: bool = False,
        verify: bool = True,
        progress: Callable[[str], None] | None = None,
        on_event: Callable[[BuildEvent], None] | None = None,
        cancel: threading.Event | None = None,
        shared: CacheRegistry | object | None = _DEFAULT,
    ) -> BuiltImage:
        """Return the image for ``env``, building it only when no usable one exists.

        Args:
            env: the environment.
            no_cache: rebuild without BuildKit's cache and replace the index entry.
            verify: on an index hit, check the image still exists in the engine (one request);
                an image deleted behind dockyard's back is rebuilt and the index repaired.
            progress: receives one-line notes (pulls, waits for another builder).
            on_event: receives BuildKit's step and log events while building.
            cancel: set it to cancel a running build (as Ctrl-C does).
            shared: the shared cache for this build (None: none), instead of the builder's.

        Raises:
            SpecError: the environment is invalid.
            BuildError: the build failed; nothing was recorded.
            RegistryAuthError, RegistryError: the base could not be pulled.
            EngineUnavailable, BuildKitUnavailable: the engine or BuildKit is down, or went away
                during the build.
        """
        started = time.perf_counter()
        report = progress or (lambda _l: None)
        registry = self.shared if shared is _DEFAULT else cast("CacheRegistry | None", shared)
        # What the build reads, hashed once: the key, a rebuild's key and the build itself use it.
        inputs = env.build_inputs()
        key, _ = self.key_for(env, report, inputs=inputs)
        if no_cache:
            self.cache.remove(key)
        entry = self.cache.lookup(key)
        if entry is not None:
            if not verify or self._verified(entry.image, entry.image_id):
                return self._done(key, entry.image, entry.image_id, True, "local-hit", started)
            report(f"{entry.image} is gone from the engine; rebuilding it")
            self.cache.remove(key)

        # A miss: about to build. BuildKit builds FROM the engine's own copy of each base (it has
        # no session to pull a private one with), so a base removed within resolve_ttl is
        # resolved (pulled) again now, and the key recomputed from what that gave.
        if self._bases_refreshed(env, report):
            key, _ = self.key_for(env, report, inputs=inputs)
            if no_cache:
                self.cache.remove(key)
            entry = self.cache.lookup(key)
            if entry is not None and (not verify or self._verified(entry.image, entry.image_id)):
                return self._done(key, entry.image, entry.image_id, True, "local-hit", started)

        from dockyard.cache import BuildSlot

        slot: BuildSlot
        with self.cache.building(key, on_wait=_wait_note(key.hex, report)) as slot:
            if not slot.must_build:
                assert slot.entry is not None
                return self._done(key, slot.entry.image, slot.entry.image_id, True, "local-hit", started)
            fetched, answer = (None, None) if no_cache or registry is None else self._from_shared(key, report, registry)
            if fetched is not None:
                image, image_id, size = fetched
                slot.record(image=image, image_id=image_id, size=size, parts=dict(key.parts), builder="pulled")
                return self._done(key, image, image_id, False, "pulled", started)
            # A Dockerfile of the user's: its steps may be those of a published neighbour (only the
            # context, an argument or the dependencies changed), whose layers BuildKit can reuse.
            neighbour = None
            user_dockerfile = env.dockerfile() is not None and self.buildkit == "docker"
            if registry is not None and user_dockerfile and answer is not None and answer.value == "absent":
                neighbour = self._near_miss(key, registry, report)
            try:
                image, image_id, size = self._build(env, key, inputs, no_cache=no_cache, on_event=on_event,
                                                    cancel=cancel, cache_from=neighbour,
                                                    inline_cache=user_dockerfile, progress=report)
            finally:
                if neighbour is not None:
                    self._untag(neighbour)
            self._record_resolution(key)  # before the entry: whoever finds the entry finds this too
            slot.record(image=image, image_id=image_id, size=size, parts=dict(key.parts), builder="buildkit")
        if registry is not None and self.buildkit == "docker":
            self._publish_later(key.hex, image, report, registry)
        return self._done(key, image, image_id, False, "built", started)

    # -- the shared cache (see _shared) -----------------------------------------------------------

    def _near_miss(self, key: ContentKey, shared: CacheRegistry, report: Callable[[str], None]) -> str | None:
        """Pull the nearest published neighbour of ``key`` (see :func:`._shared.nearest_key`) so that
        BuildKit imports its inline cache; returns the pulled reference, or None.

        Measured on Docker 20.10 (benchmarks/registry_reuse.py): a registry cache import from an
        authenticated registry, sent without a session, silently reuses nothing; pulled first
        through the Engine API (which holds the credentials), every import reused the layers. So
        the neighbour is pulled, and BuildKit needs no session (moby reads the local store first).
        """
        from ._registry import pull_image
        from ._shared import nearest_key

        try:
            known = self.cache.remote_parts(str(shared))
            unread = [k for k in shared.published_keys() if k not in known and k != key.hex]
            for other in unread[:_NEIGHBOURS_READ]:  # a key's parts never change: read once per home
                parts = shared.published_parts(other)
                if parts is not None:
                    self.cache.remember_remote_parts(str(shared), other, parts)
                    known[other] = parts
            found = nearest_key(dict(key.parts), known)
            if found is None:
                return None
            neighbour, equal = found
            remote = shared.ref(neighbour)
            report(f"reusing the layers of {neighbour[:12]} from the shared cache ({equal} of "
                   f"{len(key.parts)} key parts equal)")
            pull_image(remote, shared.credentials(), engine=self.engine, progress=report)
            return remote
        except DockyardError as exc:  # a hint for BuildKit, never a reason to fail the build
            report(f"warning: no layers reused from the shared cache ({exc.message})")
            return None
        except Exception as exc:  # noqa: BLE001 - the index's own errors (CacheError) included
            report(f"warning: no layers reused from the shared cache ({exc})")
            return None

    def _from_shared(
        self, key: ContentKey, report: Callable[[str], None], shared: CacheRegistry
    ) -> tuple[tuple[str, str, int] | None, Presence]:
        """Pull the key's image from the shared cache: (the image or None to build, what the
        registry answered).

        Raises:
            RegistryAuthError: the registry refused the credentials.
        """
        from ._dockerfile import image_tag
        from ._registry import pull_image
        from ._shared import Presence

        answer, why = shared.presence(key.hex)
        if answer is Presence.ABSENT:
            return None, answer
        if answer is Presence.UNKNOWN:
            report(f"warning: the shared cache {shared} could not be asked ({why}); building instead")
            return None, answer
        remote = shared.ref(key.hex)
        report(f"pulling {remote} from the shared cache")
        try:
            pulled_id = pull_image(remote, shared.credentials(), engine=self.engine, progress=report)
        except RegistryAuthError:
            raise
        except DockyardError as exc:
            report(f"warning: pulling {remote} failed ({exc.message}); building instead")
            return None, Presence.UNKNOWN
        labels = self.engine.image_labels(pulled_id) or {}
        tag = image_tag(key.hex)
        try:
            if labels.get("dockyard.key") != key.hex:
                # Its name says this key, its content does not: never trust a tag over the image.
                report(f"warning: {remote} is not the image of {key.hex} (label dockyard.key "
                       f"{labels.get('dockyard.key')!r}); building instead")
                return None, Presence.UNKNOWN
            self._tag(pulled_id, tag)
        finally:
            self._untag(remote)
        found = self.engine.inspect_image(tag) or {}
        return (tag, str(found.get("Id") or pulled_id), int(found.get("Size") or 0)), answer

    def _tag(self, image_id: str, ref: str) -> None:
        from ..errors import EngineError

        repo, _, tag = ref.rpartition(":")
        query = urllib.parse.urlencode({"repo": repo, "tag": tag})
        reply = self.engine.request("POST", f"/images/{urllib.parse.quote(image_id, safe='')}/tag?{query}")
        if reply.status not in (200, 201):
            raise EngineError(f"tagging {image_id[:19]} as {ref} answered HTTP {reply.status}", status=reply.status)

    def _untag(self, ref: str) -> None:
        from ._image_gc import remove_image

        try:
            remove_image(self.engine, ref)  # only the name goes while another tag holds the image
        except DockyardError:
            pass

    def fetch_shared(self, env: Environment, progress: Callable[[str], None] | None = None) -> BuiltImage | None:
        """Bring ``env``'s image from the shared cache into the engine now, if it is there and not
        here already; build nothing. A submit calls it while it holds the registry's password (the
        agent, which builds, never does). Returns the image, or None when it must be built.

        Raises:
            RegistryAuthError: the registry refused the credentials.
        """
        if self.shared is None:
            return None
        started = time.perf_counter()
        report = progress or (lambda _l: None)
        key, _ = self.key_for(env, report)
        entry = self.cache.lookup(key)
        if entry is not None and self._verified(entry.image, entry.image_id):
            return self._done(key, entry.image, entry.image_id, True, "local-hit", started)
        with self.cache.building(key, on_wait=_wait_note(key.hex, report)) as slot:
            if not slot.must_build:
                assert slot.entry is not None
                return self._done(key, slot.entry.image, slot.entry.image_id, True, "local-hit", started)
            fetched, _ = self._from_shared(key, report, self.shared)
            if fetched is None:
                return None  # leaving the slot unrecorded: the agent's build takes the key
            image, image_id, size = fetched
            slot.record(image=image, image_id=image_id, size=size, parts=dict(key.parts), builder="pulled")
        return self._done(key, image, image_id, False, "pulled", started)

    def publish(
        self, key_hex: str, image: str, report: Callable[[str], None] | None = None,
        shared: CacheRegistry | None = None,
    ) -> str:
        """Push ``image`` to the shared cache (``shared``, else the builder's) as
        ``REG/REPO:<key>``; returns the pushed digest. The outcome, success or failure, is recorded
        in the index (``dockyard cache status`` shows it).

        Raises:
            InputError: no shared cache is configured.
            RegistryAuthError, RegistryError, EngineError: the push failed.
        """
        from ._registry import push_image

        target = shared or self._need_shared()
        remote = target.ref(key_hex)
        try:
            self._tag(image, remote)
            try:
                digest = push_image(remote, target.credentials(), engine=self.engine, progress=report)
            finally:
                self._untag(remote)
        except DockyardError as exc:
            self._record_publish(key_hex, target, ok=False, detail=exc.message)
            raise
        target.forget_absent(key_hex)
        self._record_publish(key_hex, target, ok=True, detail=digest)
        return digest

    def shared_status(self, *, check: bool = True) -> list[SharedStatus]:
        """Each local entry against the shared cache: whether the registry holds its key (asked
        with one HEAD each, unless ``check`` is False: then "unchecked") and how its last push
        from here ended. Most recently used first.

        Raises:
            InputError: no shared cache is configured.
            RegistryAuthError: the registry refused the credentials.
        """
        target = self._need_shared()
        pushes = {p.key: p for p in self.cache.publishes(str(target))}
        found: list[SharedStatus] = []
        for entry in self.cache.entries():
            answer, why = target.presence(entry.key) if check else (None, "")
            found.append(SharedStatus(entry.key, entry.image, answer.value if answer else "unchecked", why,
                                      pushes.get(entry.key)))
        return found

    def republish(self, keys: list[str] | None = None, *, failed: bool = False,
                  report: Callable[[str], None] | None = None) -> list[tuple[str, str | None, str]]:
        """Push local entries to the shared cache now: ``keys`` (full keys or unique prefixes of at
        least 6 characters), or with ``failed`` every entry whose last push failed. Returns
        ``(key, digest or None, error or "")`` per entry; one failure does not stop the others.

        Raises:
            InputError: no shared cache, no key given, or a key that names no local entry.
        """
        target = self._need_shared()
        entries = {e.key: e for e in self.cache.entries()}
        chosen: list[str] = []
        for wanted in keys or ():
            matches = [k for k in entries if k.startswith(wanted.lower())] if len(wanted) >= 6 else []
            if len(matches) != 1:
                raise InputError(f"{wanted!r} names {'several entries' if matches else 'no local entry'}",
                                 hint="give a key (or a longer prefix) from `dockyard cache ls`")
            chosen.append(matches[0])
        if failed:
            chosen += [p.key for p in self.cache.publishes(str(target)) if not p.ok and p.key in entries]
        if not keys and not failed:
            raise InputError("name the keys to push, or pass --failed", hint="keys are listed by `dockyard cache status`")
        results: list[tuple[str, str | None, str]] = []
        for key_hex in dict.fromkeys(chosen):
            try:
                results.append((key_hex, self.publish(key_hex, entries[key_hex].image, report, target), ""))
            except DockyardError as exc:
                results.append((key_hex, None, exc.message))
        return results

    def _need_shared(self) -> CacheRegistry:
        if self.shared is None:
            raise InputError("no shared cache is configured",
                             hint="set DOCKYARD_CACHE_REGISTRY=REG/REPO, pass --cache-registry, or add "
                             "\"cache_registry\" to the workspace's config.json")
        return self.shared

    def _record_publish(self, key_hex: str, target: CacheRegistry, *, ok: bool, detail: str) -> None:
        try:
            self.cache.record_publish(key_hex, str(target), ok=ok, detail=detail)
        except Exception:  # noqa: BLE001 - the push's own outcome matters more than its record
            pass

    def _publish_later(
        self, key_hex: str, image: str, report: Callable[[str], None], shared: CacheRegistry | None = None
    ) -> None:
        """Push in the background: a failed push is a warning, never the run's failure."""

        def push() -> None:
            try:
                self.publish(key_hex, image, shared=shared)
                self.published[key_hex] = None
            except DockyardError as exc:
                self.published[key_hex] = exc.message
                try:
                    report(f"warning: publishing {image} to the shared cache failed: {exc.message}")
                except Exception:  # noqa: BLE001 - the caller's view may be gone; `published` keeps it
                    pass

        thread = threading.Thread(target=push, name=f"publish-{key_hex[:12]}", daemon=True)
        with self._publishing_lock:  # the agent's builder lives for days: keep only pushes under way
            self._publishing = [t for t in self._publishing if t.is_alive()]
            self._publishing.append(thread)
            thread.start()

    def _bases_refreshed(self, env: Environment, report: Callable[[str], None]) -> bool:
        """Resolve again (pull) every base the engine no longer holds: one inspect per base.

        Only on a miss: the hit path never asks the engine about bases. Returns True when a
        remembered resolution was replaced (the key may have changed).

        Raises:
            RegistryAuthError, RegistryError: a base could not be pulled again.
        """
        if self.buildkit != "docker":
            return False  # a standalone buildkitd pulls from the registry itself
        refreshed = False
        for ref, registry in self._base_refs(env):
            if self._local_id(ref) is not None:
                continue
            report(f"{ref} is gone from the engine; resolving it again")
            # The remembered resolution is replaced only by a good one: if the pull fails, other
            # environments' images built on it still hit until resolve_ttl passes.
            digest, _ = self._resolve_ref(ref, registry, report)
            self.cache.remember_resolution(ref, digest)
            refreshed = True
        return refreshed

    def _done(self, key: Any, image: str, image_id: str, cached: bool, source: Any, started: float) -> BuiltImage:
        near = self._resolutions.pop(key.hex, None) if source == "built" else None  # a long-lived builder keeps none
        return BuiltImage(key.hex, image, image_id, cached, source, time.perf_counter() - started,
                          neighbour=(near.neighbour or None) if near is not None else None)

    # -- building -------------------------------------------------------------------------------

    def _build(
        self,
        env: Environment,
        key: ContentKey,
        inputs: BuildInputs,
        *,
        no_cache: bool,
        on_event: Callable[[BuildEvent], None] | None,
        cancel: threading.Event | None,
        cache_from: str | None = None,
        inline_cache: bool = False,
        progress: Callable[[str], None] | None = None,
    ) -> tuple[str, str, int]:
        from ._buildkit import SolveSpec
        from ._dockerfile import image_tag, render_dockerfile
        from ._inputs import import_context, import_tree, input_tag

        report = progress or (lambda _l: None)
        spec_tag = input_tag(key.hex, "spec")
        installer, uv_image = self._installer_for(env, inputs, report)
        neighbour = None if no_cache or installer != "uv" else self._neighbour(env, key, inputs, report)
        # --no-cache of dockyard's own Dockerfile: BuildKit's no-cache would also hand the step a new
        # download cache and keep it (every later build of any environment then starts cold, and
        # dropping the old one cost 1.7 s), so the step is made new instead (see render_dockerfile).
        fresh = uuid.uuid4().hex if no_cache and installer == "uv" and inputs.dockerfile is None else None
        rendered = render_dockerfile(env, key, inputs=inputs, spec_image=spec_tag,
                                     rattler_image=self._rattler_image(env, inputs), installer=installer,
                                     uv_image=uv_image, neighbour=neighbour, fresh=fresh)
        attrs = {f"label:{k}": v for k, v in rendered.labels.items()}
        # Which home's index owns the image: GC of another home sharing this engine leaves it alone.
        attrs["label:dockyard.home"] = home_label(self.home)
        # The name it was first built as, for listings (not in the key: the image serves any name).
        attrs["label:dockyard.name"] = env.name
        attrs.update({f"build-arg:{k}": v for k, v in rendered.build_args.items()})
        attrs["platform"] = env.docker.platform
        if no_cache and not (fresh and rendered.uses_uv):
            attrs["no-cache"] = ""
        tag = image_tag(key.hex)
        if self.buildkit == "docker":
            exporter, exporter_attrs = "moby", {"name": tag}
        else:
            push_to = os.environ.get("DOCKYARD_PUSH_REGISTRY")
            if not push_to:
                raise InputError(
                    f"building on {self.buildkit} needs a registry to push to",
                    hint="set DOCKYARD_PUSH_REGISTRY=host:port (a standalone buildkitd cannot load into Docker)",
                )
            tag = f"{push_to.rstrip('/')}/{tag}"
            exporter, exporter_attrs = "image", {"name": tag, "push": "true"}
        # Inputs too large for the request, and a Dockerfile's context, travel as imported images
        # (see _inputs); each is removed when the build ends, whatever the outcome.
        imported: list[str] = []
        context_image, blobs = None, ()
        try:
            if rendered.user_context is not None:
                context_image = input_tag(key.hex, "context")
                imported.append(context_image)
                blobs = import_context(self.engine, rendered.user_context, context_image)
            elif not rendered.context and rendered.spec.items:
                context_image = spec_tag
            if rendered.spec_from_image or context_image == spec_tag:
                imported.append(spec_tag)
                import_tree(self.engine, rendered.spec, spec_tag)
            spec = SolveSpec(rendered.dockerfile.encode(), rendered.context, exporter, exporter_attrs, attrs,
                             context_image=context_image, context_blobs=blobs,
                             cache_from=(cache_from,) if cache_from else (), inline_cache=inline_cache)
            if rendered.record_path is not None and self.buildkit == "docker":
                return self._solve_recorded(spec, tag, key, rendered, imported, on_event=on_event, cancel=cancel)
            return self._solve(spec, tag, on_event=on_event, cancel=cancel)
        finally:
            self._forget_inputs(imported)

    # -- installers, near misses, resolutions (see _resolved, _nearmiss) ---------------------------

    def _installer_for(self, env: Environment, inputs: BuildInputs, report: Callable[[str], None]) -> tuple[str, str]:
        """(``uv`` or ``pip``, the uv tool image's tag or a placeholder) for this build."""
        from ._dockerfile import UV_PLACEHOLDER
        from ._tools import ensure_uv_image

        if self.installer != "uv" or env.python.user_managed_dependencies:
            return "pip", UV_PLACEHOLDER
        if self.buildkit != "docker":
            # The tool image lives in the engine's store, which a standalone buildkitd cannot read.
            return "pip", UV_PLACEHOLDER
        tag = ensure_uv_image(self.engine)
        if tag is None:
            report("warning: uv is not installed with dockyard (pip install 'uv'); installing with pip")
            return "pip", UV_PLACEHOLDER
        return "uv", tag

    def _neighbour(self, env: Environment, key: ContentKey, inputs: BuildInputs,
                   report: Callable[[str], None]) -> NeighbourImage | None:
        """A built environment this one is a near miss of (see :mod:`._nearmiss`), checked to be in
        the engine, or None (a clean build). Never a reason to fail: anything odd means "clean"."""
        from xxhash import xxh3_128_hexdigest

        from .._environment import pip_lines
        from ._dockerfile import ENV_PREFIX_ROOT, NeighbourImage, needs_rattler
        from ._nearmiss import MAX_LAYERS, Candidate, pick_neighbour, requirement_names
        from .uv_install import unsupported_lines

        lines = list(inputs.lock) if inputs.lock is not None else pip_lines(inputs)
        if (self.buildkit != "docker" or not lines or inputs.dockerfile is not None or needs_rattler(env, inputs)
                or unsupported_lines(lines)):
            return None
        absent = xxh3_128_hexdigest(b"-")
        try:
            candidates = []
            for entry in self.cache.entries():
                if entry.key == key.hex or entry.parts.get("base_digest") != key.parts.get("base_digest"):
                    continue
                record = self.cache.packages(entry.key)
                names = requirement_names(record.packages) if record is not None else set()
                candidates.append(Candidate(entry.key, entry.parts, record.layout if record else "",
                                            frozenset(names), entry.last_used))
            wanted = requirement_names(lines)
            while candidates:
                best = pick_neighbour(dict(key.parts), key.hex, wanted, candidates, no_conda=absent,
                                      no_dockerfile=absent)
                if best is None:
                    return None
                candidates.remove(best)
                entry = self.cache.find(best.key)
                found = self.engine.inspect_image(entry.image) if entry is not None else None
                if entry is None or found is None or found.get("Id") != entry.image_id:
                    continue  # gone or replaced behind the index's back
                if len((found.get("RootFS") or {}).get("Layers") or ()) > MAX_LAYERS:
                    continue
                config = found.get("Config") or {}
                python = (config.get("Labels") or {}).get("dockyard.python") or f"{ENV_PREFIX_ROOT}/{best.key}/bin/python"
                prefix = python.rsplit("/bin/", 1)[0]
                path = next((e[5:] for e in config.get("Env") or () if e.startswith("PATH=")),
                            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
                rest = ":".join(p for p in path.split(":") if p and not p.startswith(ENV_PREFIX_ROOT + "/"))
                report(f"near miss: starting from {entry.image} (only the Python packages differ)")
                return NeighbourImage(best.key, entry.image, prefix, rest)
        except DockyardError as exc:
            report(f"warning: no neighbour looked for ({exc.message}); building from scratch")
        except Exception as exc:  # noqa: BLE001 - the index's own errors (CacheError) included: a hint only
            report(f"warning: no neighbour looked for ({exc}); building from scratch")
        return None

    def _solve_recorded(self, spec: Any, tag: str, key: ContentKey, rendered: RenderedBuild, imported: list[str],
                        *, on_event: Callable[[BuildEvent], None] | None,
                        cancel: threading.Event | None) -> tuple[str, str, int]:
        """Build in two solves: the image itself, under a per-build tag; then, once its resolution is
        read from it, the same image with the resolution in its labels, under the key's tag (a
        metadata-only step: no layer is added)."""
        import dataclasses

        from ._buildkit import BuildKitClient
        from ._inputs import input_tag
        from ._resolved import parse_record, read_image_file, resolution_labels

        assert rendered.record_path is not None
        neighbour = rendered.neighbour.key if rendered.neighbour is not None else ""

        def read(image: str) -> Resolution:
            raw = read_image_file(self.engine, image, rendered.record_path)  # type: ignore[arg-type]
            found = parse_record(raw.decode(errors="replace") if raw else "# installer: unknown", neighbour=neighbour)
            self._resolutions[key.hex] = dataclasses.replace(found, mode=rendered.layout or "")
            return found

        if spec.inline_cache:
            # The inline cache lives in the image's own config, which a second solve would not carry
            # over: one solve, and the resolution goes to the index only.
            built = self._solve(spec, tag, on_event=on_event, cancel=cancel)
            read(tag)
            return built
        stage = input_tag(key.hex, "stage")
        imported.append(stage)
        first = dataclasses.replace(spec, exporter_attrs={"name": stage})
        with BuildKitClient(self.buildkit, engine=self.engine) as client:
            client.solve(first, on_event=on_event, cancel=cancel)
        resolution = read(stage)
        attrs = {k: v for k, v in spec.frontend_attrs.items() if k.startswith("label:") or k == "platform"}
        attrs.update({f"label:{k}": v for k, v in resolution_labels(resolution).items()})
        second = dataclasses.replace(spec, dockerfile=f"FROM {stage}\n".encode(), context={}, frontend_attrs=attrs,
                                     context_image=None, context_blobs=(), cache_from=(), inline_cache=False)
        return self._solve(second, tag, on_event=None, cancel=cancel)

    def _record_resolution(self, key: ContentKey) -> None:
        """Put what the build of ``key`` resolved into the index (a failure only warns: the label has it)."""
        resolution = self._resolutions.get(key.hex)
        if resolution is None:
            return
        try:
            self.cache.record_packages(key, resolution.packages, installer=resolution.installer,
                                       layout="conda" if resolution.mode == "conda" else "venv",
                                       neighbour=resolution.neighbour)
        except Exception:  # noqa: BLE001 - the index's own errors: the image's label keeps the record
            pass

    def _rattler_image(self, env: Environment, inputs: BuildInputs) -> str:
        """The rattler tool image's tag, made now if a conda install needs it (else a placeholder)."""
        from ._dockerfile import RATTLER_PLACEHOLDER, needs_rattler

        if not needs_rattler(env, inputs):
            return RATTLER_PLACEHOLDER
        from ._tools import ensure_rattler_image

        return ensure_rattler_image(self.engine)

    def _forget_inputs(self, tags: list[str]) -> None:
        from ._image_gc import remove_image

        for tag in tags:
            try:
                remove_image(self.engine, tag)
            except DockyardError:
                pass  # best effort: `dockyard cache gc` removes leftover build inputs

    def _solve(
        self,
        spec: Any,
        tag: str,
        *,
        on_event: Callable[[BuildEvent], None] | None,
        cancel: threading.Event | None,
    ) -> tuple[str, str, int]:
        from ._buildkit import BuildKitClient

        replaced = self._local_id(tag) if self.buildkit == "docker" else None
        with BuildKitClient(self.buildkit, engine=self.engine) as client:
            result = client.solve(spec, on_event=on_event, cancel=cancel)
        image_id = result.exporter_response.get("containerimage.digest", "")
        size = 0
        found = self.engine.inspect_image(tag) if self.buildkit == "docker" else None
        if found is not None:
            image_id = str(found.get("Id") or image_id)
            size = int(found.get("Size") or 0)
        if replaced and replaced != image_id:
            self._drop_replaced(replaced)
        return tag, image_id, size

    def _drop_replaced(self, image_id: str) -> None:
        """The image a rebuild (``--no-cache``, a vanished entry) took the tag from is now untagged
        and tracked by nothing: remove it, unless a container or another tag still uses it."""
        from ._image_gc import images_in_use, remove_image

        try:
            if image_id not in images_in_use(self.engine):
                remove_image(self.engine, image_id)
        except DockyardError:
            pass  # still referenced (another tag): the engine keeps it, and so do we


@dataclass(frozen=True)
class SharedStatus:
    """One local entry against the shared cache: ``in_registry`` is what the registry answered
    now (``present``, ``absent``, ``unknown`` with ``why``, or ``unchecked``); ``last_push`` is how
    the last push from this home ended (None: never pushed from here)."""

    key: str
    image: str
    in_registry: str
    why: str
    last_push: PublishRecord | None

    def to_json(self) -> dict[str, object]:
        return {"key": self.key, "image": self.image, "in_registry": self.in_registry, "why": self.why or None,
                "last_push": self.last_push.to_json() if self.last_push else None}


def home_label(home: Path) -> str:
    """The ``dockyard.home`` label value of a home: a digest of its path, not the path itself."""
    return hashlib.sha256(str(Path(home).expanduser().resolve()).encode()).hexdigest()[:16]


def _combined_digest(resolved: dict[str, str]) -> str | None:
    """One digest for the bases of a build: the base's own, or one over every FROM image's."""
    if not resolved:
        return None
    if len(resolved) == 1:
        return next(iter(resolved.values()))
    return "sha256:" + hashlib.sha256("\n".join(sorted(f"{r}@{d}" for r, d in resolved.items())).encode()).hexdigest()


def _wait_note(key: str, report: Callable[[str], None]) -> Callable[[str, int, float], None]:
    """``on_wait`` for ``ImageCache.building``: one progress line naming who builds the key."""
    import socket

    here = socket.gethostname()

    def note(holder: str, pid: int, waited: float) -> None:
        host = holder.split(":", 1)[0]
        where = "on this machine" if host == here else f"on {host}"
        so_far = f", {waited:.0f} s so far" if waited >= 1 else ""
        report(f"waiting for another build of {key[:12]} (pid {pid} {where}{so_far})…")

    return note


def _qualify_or_none(image: str, registry: ContainerRegistry) -> str | None:
    from ._registry import qualify

    try:
        return qualify(image, registry)
    except InputError:
        return None  # another registry's image: no credentials for it


def ensure_image(env: Environment, home: str | Path | None = None, **kwargs: Any) -> BuiltImage:
    """Build ``env`` once and reuse it: see :meth:`Builder.ensure_image` for the arguments."""
    builder = Builder(home)
    try:
        return builder.ensure_image(env, **kwargs)
    finally:
        builder.close()
