"""Pulling base images from a private registry through the engine: a real registry, real auth.

A Debian ``docker-registry`` with htpasswd auth runs on loopback for this module; the busybox
base image is pushed to it under a random tag, the local tag is removed, and each test pulls.
"""

from __future__ import annotations

import traceback
import urllib.parse
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from dockyard._environment import ContainerRegistry
from dockyard.build._base_images import bootstrap
from dockyard.build._registry import login_check, pull_image, push_image
from dockyard.dockerd import EngineClient
from dockyard.errors import InputError, RegistryAuthError, RegistryError
from helpers.registry import LocalRegistry, free_port, local_registry_fixture

pytestmark = pytest.mark.engine

local_registry = local_registry_fixture(scope="module")


def _credentials(reg: LocalRegistry, password: str | None = None) -> ContainerRegistry:
    creds = ContainerRegistry(address=reg.address, username=reg.username)
    creds.password = reg.password if password is None else password
    return creds


def _untag(engine: EngineClient, ref: str) -> None:
    """Remove one tag (never an image ID: the busybox base image keeps its own tag)."""
    reply = engine.request("DELETE", f"/images/{urllib.parse.quote(ref, safe='')}")
    assert reply.status in (200, 404), reply.body


def _tag(engine: EngineClient, source: str, ref: str) -> None:
    repo, _, tag = ref.rpartition(":")
    query = urllib.parse.urlencode({"repo": repo, "tag": tag})
    reply = engine.request("POST", f"/images/{urllib.parse.quote(source, safe='')}/tag?{query}")
    assert reply.status == 201, reply.body


@dataclass(frozen=True)
class Seeded:
    registry: LocalRegistry
    repo_tag: str  # "dockyard-test/busybox:<random>", as a user writes base_image
    full: str  # "<address>/dockyard-test/busybox:<random>"
    image_id: str  # the local busybox image's ID, which the pull must give back
    digest: str


@pytest.fixture(scope="module")
def engine() -> EngineClient:
    return EngineClient.from_env()


@pytest.fixture(scope="module")
def seeded(local_registry: LocalRegistry, engine: EngineClient) -> Iterator[Seeded]:
    """The busybox base image pushed to the registry under a random tag; no local tag left."""
    base = bootstrap("busybox", engine=engine)  # a no-op where the README's set-up made it
    repo_tag = f"dockyard-test/busybox:{uuid.uuid4().hex[:10]}"
    full = f"{local_registry.address}/{repo_tag}"
    _tag(engine, base.ref, full)
    try:
        digest = push_image(repo_tag, _credentials(local_registry), engine=engine)
    except Exception as exc:
        raise AssertionError(f"seeding the registry failed: {exc}\n{local_registry.log_tail()}") from exc
    finally:
        _untag(engine, full)
    assert digest.startswith("sha256:")
    assert "dockyard-test/busybox" in local_registry.catalog()
    # bootstrap() leaves image_id empty when the image existed already: ask the engine.
    image_id = engine.request("GET", f"/images/{urllib.parse.quote(base.ref, safe='')}/json").json()["Id"]
    yield Seeded(local_registry, repo_tag, full, image_id, digest)


def _assert_no_secret(exc: BaseException, *secrets: str) -> None:
    shown = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    texts = [str(exc), repr(exc), repr(exc.args), getattr(exc, "hint", ""), shown]
    cause = exc.__cause__ or exc.__context__
    if cause is not None:
        texts += [str(cause), repr(cause)]
    for secret in secrets:
        for text in texts:
            assert secret not in text


def test_right_password_pulls_the_image(seeded: Seeded, engine: EngineClient):
    lines: list[str] = []
    try:
        creds = _credentials(seeded.registry)
        image_id = pull_image(seeded.repo_tag, creds, engine=engine, progress=lines.append)
        assert image_id == seeded.image_id
        assert engine.image_labels(seeded.full) is not None, "the pulled tag is not in the engine"
        inspected = engine.request("GET", f"/images/{urllib.parse.quote(seeded.full, safe='')}/json").json()
        assert inspected["Id"] == image_id
    finally:
        _untag(engine, seeded.full)
    assert any("Pulling from dockyard-test/busybox" in line for line in lines), lines
    assert not any(seeded.registry.password in line for line in lines)


def test_pull_by_digest_and_with_the_host_already_in_the_reference(seeded: Seeded, engine: EngineClient):
    by_digest = f"{seeded.full.rpartition(':')[0]}@{seeded.digest}"
    try:
        assert pull_image(by_digest, _credentials(seeded.registry), engine=engine) == seeded.image_id
        assert pull_image(seeded.full, _credentials(seeded.registry), engine=engine) == seeded.image_id
    finally:
        _untag(engine, by_digest)
        _untag(engine, seeded.full)


def test_wrong_password_is_an_auth_error_that_names_the_registry_and_no_password(
    seeded: Seeded, engine: EngineClient
):
    wrong = f"wrong-{uuid.uuid4().hex}"
    try:
        with pytest.raises(RegistryAuthError) as info:
            pull_image(seeded.repo_tag, _credentials(seeded.registry, wrong), engine=engine)
    finally:
        _untag(engine, seeded.full)
    exc = info.value
    assert exc.registry == seeded.registry.address
    assert seeded.registry.address in str(exc) and exc.hint
    assert exc.exit_code == 3
    _assert_no_secret(exc, wrong, seeded.registry.password)


def test_no_credentials_is_an_auth_error(seeded: Seeded, engine: EngineClient):
    with pytest.raises(RegistryAuthError) as info:
        pull_image(seeded.repo_tag, ContainerRegistry(address=seeded.registry.address), engine=engine)
    assert "requires a login" in str(info.value)


def test_unreachable_registry_is_a_registry_error_not_an_auth_error(engine: EngineClient):
    address = f"127.0.0.1:{free_port()}"  # nothing listens there
    secret = f"pw-{uuid.uuid4().hex}"
    creds = ContainerRegistry(address=address, username="alice")
    creds.password = secret
    with pytest.raises(RegistryError) as info:
        pull_image("dockyard-test/busybox:1", creds, engine=engine)
    assert type(info.value) is RegistryError
    assert info.value.registry == address and "cannot be reached" in str(info.value)
    _assert_no_secret(info.value, secret)


def test_missing_repository_is_a_registry_error_with_a_hint(seeded: Seeded, engine: EngineClient):
    with pytest.raises(RegistryError) as info:
        missing_repo = f"dockyard-test/no-such-repo-{uuid.uuid4().hex[:8]}:1"
        pull_image(missing_repo, _credentials(seeded.registry), engine=engine)
    assert type(info.value) is RegistryError
    assert info.value.registry == seeded.registry.address and "not in" in str(info.value) and info.value.hint
    missing_tag = f"{seeded.repo_tag.rpartition(':')[0]}:no-such-tag"
    with pytest.raises(RegistryError) as info:
        pull_image(missing_tag, _credentials(seeded.registry), engine=engine)
    assert type(info.value) is RegistryError


def test_login_check(seeded: Seeded, engine: EngineClient):
    login_check(_credentials(seeded.registry), engine=engine)
    wrong = f"wrong-{uuid.uuid4().hex}"
    with pytest.raises(RegistryAuthError) as info:
        login_check(_credentials(seeded.registry, wrong), engine=engine)
    _assert_no_secret(info.value, wrong, seeded.registry.password)


def test_pushing_an_image_the_engine_lacks_is_an_input_error(seeded: Seeded, engine: EngineClient):
    with pytest.raises(InputError) as info:
        not_local = f"dockyard-test/not-local-{uuid.uuid4().hex[:8]}:1"
        push_image(not_local, _credentials(seeded.registry), engine=engine)
    assert "docker tag" in info.value.hint


def test_push_with_a_wrong_password_fails_inside_the_stream(seeded: Seeded, engine: EngineClient):
    # The engine answers HTTP 200 and reports the refusal in the JSON stream's errorDetail.
    wrong = f"wrong-{uuid.uuid4().hex}"
    base = f"{seeded.full.rpartition(':')[0]}:push-{uuid.uuid4().hex[:8]}"
    _tag(engine, seeded.image_id, base)
    lines: list[str] = []
    try:
        with pytest.raises(RegistryAuthError) as info:
            push_image(base, _credentials(seeded.registry, wrong), engine=engine, progress=lines.append)
    finally:
        _untag(engine, base)
    assert lines, "the engine's stream started before the refusal"
    _assert_no_secret(info.value, wrong, seeded.registry.password)


def test_env_build_pulls_a_private_base_and_keeps_the_password_out(
    seeded: Seeded, engine: EngineClient, tmp_path, monkeypatch: pytest.MonkeyPatch, engine_resources
):
    import os
    import subprocess
    import sys

    from dockyard import Environment
    from dockyard.build._builder import Builder

    home = tmp_path / "home"
    spec = tmp_path / "env.yml"
    spec.write_text(
        "name: private-base\ndocker:\n"
        f"  base_image: {seeded.repo_tag}\n"
        "  base_image_registry:\n"
        f"    address: {seeded.registry.address}\n"
        f"    username: {seeded.registry.username}\n"
        "    password_env: DY_TEST_REGISTRY_PASSWORD\n"
        f"  build_args:\n    RUN_ID: {uuid.uuid4().hex}\n"
    )
    wrong = f"wrong-{uuid.uuid4().hex[:8]}"
    cli_env = {**os.environ, "DOCKYARD_HOME": str(home), "DY_TEST_REGISTRY_PASSWORD": wrong}
    try:
        # Wrong password: one clear line, exit 3, the registry named, no password anywhere.
        out = subprocess.run([sys.executable, "-m", "dockyard", "env", "build", str(spec)],
                             capture_output=True, text=True, env=cli_env, timeout=120)
        assert out.returncode == 3, out.stderr
        errors = [line for line in out.stderr.splitlines() if line.startswith("error: ")]
        assert len(errors) == 1 and seeded.registry.address in errors[0], out.stderr
        assert "Traceback" not in out.stderr
        for secret in (wrong, seeded.registry.password):
            assert secret not in out.stdout + out.stderr

        # Right password: the base is pulled, the image built and recorded.
        monkeypatch.setenv("DY_TEST_REGISTRY_PASSWORD", seeded.registry.password)
        builder = Builder(home)
        try:
            built = builder.ensure_image(Environment.load(spec))
            engine_resources.track_image(built.image)
            assert built.source == "built" and not built.cached
            assert builder.ensure_image(Environment.load(spec)).source == "local-hit"
        finally:
            builder.close()
        labels = engine.image_labels(built.image) or {}
        index_bytes = b"".join(p.read_bytes() for p in home.glob("index.db*"))
        for secret in (wrong, seeded.registry.password):
            assert secret not in json_dump(labels)
            assert secret.encode() not in index_bytes
    finally:
        _untag(engine, seeded.full)


def json_dump(obj: object) -> str:
    import json

    return json.dumps(obj)


def test_a_private_base_removed_within_the_resolve_ttl_is_pulled_again_before_building(
    seeded: Seeded, engine: EngineClient, tmp_path, engine_resources, monkeypatch: pytest.MonkeyPatch
):
    from dockyard import Environment
    from dockyard.build._builder import Builder

    def env_with(registry: ContainerRegistry) -> Environment:
        env = Environment(f"t-{uuid.uuid4().hex[:8]}")
        env.docker.base_image = seeded.repo_tag
        env.docker.base_image_registry = registry
        env.docker.build_args = {"RUN_ID": uuid.uuid4().hex}  # a new key each time: a miss
        return env

    monkeypatch.setenv("DOCKYARD_RESOLVE_TTL", "3600")  # the first resolution stays remembered
    builder = Builder(tmp_path / "home")
    try:
        first_env = env_with(_credentials(seeded.registry))
        first = builder.ensure_image(first_env)
        engine_resources.track_image(first.image)
        assert first.source == "built"
        _untag(engine, seeded.full)  # the base leaves the engine; the index still trusts it

        # A hit never asks the engine about its base: still one index read + one engine request.
        inspected: list[str] = []
        real_inspect = EngineClient.inspect_image

        def counting(self: EngineClient, ref: str, *args, **kwargs):  # type: ignore[no-untyped-def]
            inspected.append(ref)
            return real_inspect(self, ref, *args, **kwargs)

        monkeypatch.setattr(EngineClient, "inspect_image", counting)
        assert builder.ensure_image(first_env).source == "local-hit"
        assert inspected == []

        # A miss checks each base (one inspect) and pulls the missing one again, with the credentials.
        notes: list[str] = []
        second = builder.ensure_image(env_with(_credentials(seeded.registry)), progress=notes.append)
        engine_resources.track_image(second.image)
        assert second.source == "built" and not second.cached
        assert inspected.count(seeded.full) >= 1
        assert any(f"{seeded.full} is gone from the engine" in n for n in notes), notes
        assert engine.image_labels(seeded.full) is not None, "the base was not pulled again"

        # Without credentials the build fails with the registry's own refusal, not BuildKit's
        # "no active sessions".
        _untag(engine, seeded.full)
        with pytest.raises(RegistryAuthError) as info:
            builder.ensure_image(env_with(ContainerRegistry(address=seeded.registry.address)))
        assert seeded.registry.address in str(info.value)
        _assert_no_secret(info.value, seeded.registry.password)
    finally:
        builder.close()
        _untag(engine, seeded.full)
