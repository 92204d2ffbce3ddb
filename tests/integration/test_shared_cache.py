"""The shared cache in a registry, with real parts: Debian's docker-registry (htpasswd) on loopback
and a second Docker Engine standing in for a second machine. Engine A builds and publishes;
engine B, whose image store holds only the base, gets the key from the registry with no Solve."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from dockyard import Environment
from dockyard.build._builder import Builder
from dockyard.build._buildkit import BuildKitClient
from dockyard.errors import InputError, RegistryAuthError
from helpers.engine2 import second_engine_fixture
from helpers.registry import local_registry_fixture

pytestmark = pytest.mark.engine

BUSYBOX = "dockyard/base:bookworm-busybox"
local_registry = local_registry_fixture(scope="module")
second_engine = second_engine_fixture(scope="module")


@pytest.fixture(scope="module")
def engine_b(second_engine):
    from dockyard.build._base_images import bootstrap

    bootstrap("busybox")  # a no-op where the set-up made it
    second_engine.load_image(BUSYBOX)  # the same image ID as on A: both resolve the same key
    return second_engine


@pytest.fixture
def shared(local_registry, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("DOCKYARD_CACHE_REGISTRY_USERNAME", local_registry.username)
    monkeypatch.setenv("DOCKYARD_CACHE_REGISTRY_PASSWORD_ENV", "TEST_CACHE_PASSWORD")
    monkeypatch.setenv("TEST_CACHE_PASSWORD", local_registry.password)
    return f"{local_registry.address}/team/dockyard-cache"


@pytest.fixture
def solves(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    calls: list[str] = []
    real = BuildKitClient.solve

    def counting(self, spec, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(spec.exporter_attrs.get("name", ""))
        return real(self, spec, **kwargs)

    monkeypatch.setattr(BuildKitClient, "solve", counting)
    return calls


def unique_env() -> Environment:
    env = Environment(f"shared-{uuid.uuid4().hex[:6]}")
    env.docker.base_dockerfile = f"FROM {BUSYBOX}\nARG STAMP\nRUN echo $STAMP > /stamp\n"
    env.docker.build_args = {"STAMP": uuid.uuid4().hex}
    return env


def test_engine_b_pulls_what_engine_a_published_and_runs_no_build_step(tmp_path, shared, engine_b, solves,
                                                                       local_registry):
    env = unique_env()
    a = Builder(tmp_path / "home-a", cache_registry=shared)
    try:
        built = a.ensure_image(env)
    finally:
        a.close()  # waits for the push
    assert built.source == "built" and a.published == {built.key: None}
    assert "team/dockyard-cache" in local_registry.catalog()
    notes: list[str] = []
    b = Builder(tmp_path / "home-b", engine=engine_b.client, cache_registry=shared)
    try:
        got = b.ensure_image(env, progress=notes.append)
        again = b.ensure_image(env)
        entry = b.cache.lookup(got.key)
    finally:
        b.close()
    assert got.key == built.key and got.source == "pulled" and not got.cached
    assert solves == [built.image], "engine B ran a build"
    assert again.cached and again.source == "local-hit"
    assert entry is not None and entry.builder == "pulled"
    labels = engine_b.client.image_labels(got.image)
    assert labels["dockyard.key"] == built.key and labels["dockyard.name"] == env.name
    assert engine_b.client.inspect_image(f"{shared}:{built.key}") is None, "the registry's name is not left behind"
    assert any("shared cache" in n for n in notes)


def test_wrong_password_is_one_clear_error_with_no_secret_anywhere(tmp_path, shared, engine_b, monkeypatch):
    monkeypatch.setenv("TEST_CACHE_PASSWORD", "not-the-password-4711")
    env = unique_env()
    b = Builder(tmp_path / "home-b", engine=engine_b.client, cache_registry=shared)
    try:
        with pytest.raises(RegistryAuthError) as err:
            b.ensure_image(env)
        assert b.cache.entries() == [], "nothing was recorded"
    finally:
        b.close()
    text = f"{err.value} {err.value.hint}"
    assert "refused" in text and "not-the-password-4711" not in text
    index = (tmp_path / "home-b" / "index.db").read_bytes()
    assert b"not-the-password-4711" not in index


def test_an_unreachable_registry_builds_with_one_warning(tmp_path, engine_b, solves, monkeypatch):
    from helpers.registry import free_port

    monkeypatch.delenv("DOCKYARD_CACHE_REGISTRY_USERNAME", raising=False)
    env = unique_env()
    notes: list[str] = []
    b = Builder(tmp_path / "home-b", engine=engine_b.client, cache_registry=f"127.0.0.1:{free_port()}/team/cache")
    try:
        got = b.ensure_image(env, progress=notes.append)
    finally:
        b.close()
    assert got.source == "built" and len(solves) == 1
    warnings = [n for n in notes if n.startswith("warning: the shared cache")]
    assert len(warnings) == 1 and "building instead" in warnings[0]
    assert b.published.get(got.key), "the failed push is reported, not raised"


def test_the_cli_reports_the_push_and_env_push_publishes_an_existing_entry(tmp_path, shared, local_registry):
    spec = tmp_path / "env.yml"
    spec.write_text(f"name: cli-shared\ndocker:\n  base_dockerfile: |\n    FROM {BUSYBOX}\n    RUN echo {uuid.uuid4().hex}\n")
    home = tmp_path / "home"
    environ = {**os.environ, "DOCKYARD_HOME": str(home)}

    def dockyard(*args: str, **extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "dockyard", *args], capture_output=True, text=True,
                              timeout=300, env={**environ, **extra})

    plain = dockyard("env", "build", str(spec), "--json")  # no registry configured: nothing pushed
    assert plain.returncode == 0, plain.stderr
    assert "shared_cache" not in json.loads(plain.stdout)
    pushed = dockyard("env", "push", str(spec), "--cache-registry", shared, "--json")
    assert pushed.returncode == 0, pushed.stderr
    doc = json.loads(pushed.stdout)
    assert doc["pushed"] == f"{shared}:{doc['key']}" and doc["digest"].startswith("sha256:")
    assert local_registry.password not in pushed.stdout + pushed.stderr
    nothing = dockyard("env", "push", str(spec))
    assert nothing.returncode == 2 and "DOCKYARD_CACHE_REGISTRY" in nothing.stderr


def test_bad_cache_registry_settings_are_clear_errors():
    from dockyard.build._shared import CacheRegistry

    for bad in ("https://reg.example/x", "user:pw@reg.example/x", "noport/x", "reg.example:5000"):
        with pytest.raises(InputError):
            CacheRegistry.parse(bad)
    with pytest.raises(InputError, match="NAME of a variable"):
        CacheRegistry.parse("reg.example/x", password_env="pw=secret")
    assert str(CacheRegistry.parse("Reg.Example:5000/team/cache")) == "reg.example:5000/team/cache"


def test_a_local_hit_never_asks_the_registry(tmp_path, monkeypatch):
    from dockyard.build._shared import CacheRegistry

    env = unique_env()
    b = Builder(tmp_path / "home", cache_registry="127.0.0.1:9/team/cache")  # nothing listens there
    try:
        b.ensure_image(env)  # a miss: asks (unknown), builds, tries to push
        b.close()
        asked: list[str] = []
        monkeypatch.setattr(CacheRegistry, "presence", lambda self, key: asked.append(key) or (None, ""))
        monkeypatch.setattr(Builder, "publish", lambda self, *a, **k: asked.append("push"))
        b = Builder(tmp_path / "home", cache_registry="127.0.0.1:9/team/cache")
        hit = b.ensure_image(env)
    finally:
        b.close()
    assert hit.cached and asked == [], "a local hit made a registry call"


def test_the_reuse_benchmark_prints_its_ratios():
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    done = subprocess.run([sys.executable, "benchmarks/registry_reuse.py", "--n", "1", "--json"], cwd=root,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    doc = json.loads(done.stdout)
    assert doc["ratios"]["full_build_over_pull"] > 0 and doc["ratios"]["hit_with_over_without_registry"] > 0
    assert set(doc["rows"]) == {"b_pull_via_registry", "b_full_build", "b_near_miss_import", "b_near_miss_build",
                                "hit_without_registry", "hit_with_registry"}
    assert doc["ratios"]["near_miss_build_over_import"] > 0


def test_kill_9_during_a_pull_records_nothing_and_the_next_call_finishes(tmp_path, shared, engine_b):
    """A process pulling from the shared cache is SIGKILLed mid-pull: no index entry, no
    dockyard/env tag; the next call (its lease holder is dead) pulls again and records it."""
    import signal
    import time

    spec = tmp_path / "env.yml"
    # The python base is ~150 MB: a pull long enough to be killed in the middle.
    spec.write_text("name: killed-pull\ndocker:\n  base_image: dockyard/base:bookworm-python3\n"
                    f"  build_args: {{STAMP: {uuid.uuid4().hex}}}\npython:\n  pip_requirements: []\n")
    a_home = tmp_path / "home-a"
    environ = {**os.environ, "DOCKYARD_CACHE_REGISTRY": shared}
    built = subprocess.run([sys.executable, "-m", "dockyard", "env", "build", str(spec), "--json"],
                           capture_output=True, text=True, timeout=300, env={**environ, "DOCKYARD_HOME": str(a_home)})
    assert built.returncode == 0, built.stderr
    key = json.loads(built.stdout)["key"]
    assert json.loads(built.stdout)["shared_cache"]["pushed"] is True
    b_env = {**environ, "DOCKYARD_HOME": str(tmp_path / "home-b"), "DOCKER_HOST": engine_b.docker_host}
    # B needs the same base image (same ID, hence the same key); the rest comes from the registry.
    engine_b.load_image("dockyard/base:bookworm-python3")
    puller = subprocess.Popen([sys.executable, "-m", "dockyard", "env", "build", str(spec), "--progress", "plain"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=b_env)
    deadline = time.monotonic() + 120
    seen = ""
    while time.monotonic() < deadline:
        line = puller.stderr.readline()
        seen += line
        if "pulling" in line and "shared cache" in line:
            break
    else:  # pragma: no cover - the test's own precondition
        puller.kill()
        raise AssertionError(f"the pull never started:\n{seen}")
    os.kill(puller.pid, signal.SIGKILL)
    puller.wait(timeout=30)
    from dockyard.cache import ImageCache

    index = ImageCache(tmp_path / "home-b" / "index.db")
    try:
        assert index.lookup(key) is None, "a killed pull left an entry"
    finally:
        index.close()
    assert engine_b.client.inspect_image(f"dockyard/env:{key}") is None, "a killed pull left the tag"
    again = subprocess.run([sys.executable, "-m", "dockyard", "env", "build", str(spec), "--json"],
                           capture_output=True, text=True, timeout=300, env=b_env)
    assert again.returncode == 0, again.stderr
    doc = json.loads(again.stdout)
    assert doc["key"] == key and doc["source"] == "pulled"


def test_a_submit_pulls_from_the_shared_cache_itself_since_the_agent_holds_no_password(tmp_path, shared,
                                                                                      monkeypatch):
    from dockyard import Experiment, ScriptRunConfig, Workspace
    from dockyard.cache import ImageCache
    from dockyard.compute import agent_status, stop_agent
    from dockyard.dockerd import EngineClient

    env = unique_env()
    env.docker.base_dockerfile = env.docker.base_dockerfile.replace(BUSYBOX, "dockyard/base:bookworm-python3")
    a = Builder(tmp_path / "home-a", cache_registry=shared)
    try:
        built = a.ensure_image(env)
    finally:
        a.close()
    engine = EngineClient.from_env()
    engine.request("DELETE", f"/images/{built.image}")  # this machine has it no more: only the registry does
    home = tmp_path / "home-b"
    monkeypatch.setenv("DOCKYARD_HOME", str(home))
    monkeypatch.delenv("DOCKYARD_CACHE_REGISTRY", raising=False)  # the workspace's setting names it
    src = tmp_path / "src"
    src.mkdir()
    (src / "show.py").write_text("print(open('/stamp').read().strip())\n")
    ws = Workspace(f"sc{uuid.uuid4().hex[:6]}", home=home, cache_registry={
        "address": shared, "username": os.environ["DOCKYARD_CACHE_REGISTRY_USERNAME"],
        "password_env": "TEST_CACHE_PASSWORD"})
    try:
        run = Experiment(ws, "shared").submit(ScriptRunConfig(str(src), "show.py", environment=env))
        record = ws.store.get(run.id)
        assert record.runtime["shared_cache"] == {"registry": shared, "username": ws.cache_registry.username,
                                                  "password_env": "TEST_CACHE_PASSWORD"}
        details = run.wait_for_completion(raise_on_error=False)
        log = Path(details["logFiles"]["logs/std.log"]).read_text()
        assert details["status"] == "Completed", log
        assert env.docker.build_args["STAMP"] in log
        # The agent lives long: neither its environment nor its command line holds the password.
        status = agent_status(home)
        assert status.running and status.pid
        secret = os.environ["TEST_CACHE_PASSWORD"].encode()
        for name in ("environ", "cmdline"):
            assert secret not in Path(f"/proc/{status.pid}/{name}").read_bytes(), f"the agent's {name}"
        assert secret not in (home / "agent.log").read_bytes() and secret not in log.encode()
    finally:
        stop_agent(home)
    index = ImageCache(home / "index.db")
    try:
        entry = index.lookup(built.key)
    finally:
        index.close()
    assert entry is not None and entry.builder == "pulled", "the run's image was built, not pulled"
    password = os.environ["TEST_CACHE_PASSWORD"].encode()
    assert password not in (ws.directory / "runs.db").read_bytes()


def test_a_failed_push_shows_in_cache_status_and_push_failed_retries_it(tmp_path, monkeypatch):
    """The workspace's config.json names the shared cache (no variable, no flag). The registry is
    down while the image is built: the build succeeds, the push fails and is recorded; once the
    registry is back, `cache status` asks it (absent) and `cache push --failed` publishes."""
    from helpers.registry import LocalRegistry

    monkeypatch.delenv("DOCKYARD_CACHE_REGISTRY", raising=False)
    with LocalRegistry() as reg:
        project = tmp_path / "project"
        project.mkdir()
        (project / "config.json").write_text(json.dumps({"workspace_name": "team", "cache_registry": {
            "address": f"{reg.address}/team/cache", "username": reg.username, "password_env": "TEAM_CACHE_PW"}}))
        spec = project / "env.yml"
        spec.write_text(f"name: failed-push\ndocker:\n  base_dockerfile: |\n    FROM {BUSYBOX}\n"
                        f"    RUN echo {uuid.uuid4().hex}\n")
        environ = {**os.environ, "DOCKYARD_HOME": str(tmp_path / "home"), "TEAM_CACHE_PW": reg.password}

        def dockyard(*args: str) -> subprocess.CompletedProcess[str]:
            done = subprocess.run([sys.executable, "-m", "dockyard", *args], capture_output=True, text=True,
                                  timeout=300, env=environ, cwd=project)
            assert reg.password not in done.stdout + done.stderr
            return done

        reg.pause()
        built = dockyard("env", "build", str(spec), "--json")
        assert built.returncode == 0, built.stderr
        doc = json.loads(built.stdout)
        assert doc["source"] == "built" and doc["shared_cache"]["pushed"] is False
        assert doc["shared_cache"]["registry"] == f"{reg.address}/team/cache" and doc["shared_cache"]["push_error"]
        down = json.loads(dockyard("cache", "status", "--json").stdout)
        (row,) = [e for e in down["entries"] if e["key"] == doc["key"]]
        assert row["in_registry"] == "unknown" and row["last_push"]["ok"] is False
        assert down["failed_pushes"] == 1

        reg.resume()
        back = json.loads(dockyard("cache", "status", "--json").stdout)
        (row,) = [e for e in back["entries"] if e["key"] == doc["key"]]
        assert row["in_registry"] == "absent", "unknown became a real answer once the registry is back"
        text = dockyard("cache", "status")
        assert "FAILED" in text.stdout and "cache push --failed" in text.stderr
        retried = dockyard("cache", "push", "--failed", "--json")
        assert retried.returncode == 0, retried.stderr
        (pushed,) = json.loads(retried.stdout)["pushed"]
        assert pushed["key"] == doc["key"] and pushed["digest"].startswith("sha256:") and pushed["error"] is None
        after = json.loads(dockyard("cache", "status", "--json").stdout)
        (row,) = [e for e in after["entries"] if e["key"] == doc["key"]]
        assert row["in_registry"] == "present" and row["last_push"]["ok"] is True and after["failed_pushes"] == 0
        assert json.loads(dockyard("cache", "push", "--failed", "--json").stdout)["pushed"] == []
        index = (tmp_path / "home" / "index.db").read_bytes()
        assert reg.password.encode() not in index


def test_a_near_miss_on_engine_b_reuses_the_published_neighbours_layers(tmp_path, shared, engine_b):
    """Same user Dockerfile, another build argument: engine B has never built either key, pulls
    the published neighbour and BuildKit reuses its steps before the argument (inline cache)."""
    stamp = uuid.uuid4().hex

    def env_with(last: str) -> Environment:
        env = Environment(f"near-{stamp[:6]}")
        env.docker.base_dockerfile = (f"FROM {BUSYBOX}\nRUN echo heavy-{stamp} > /heavy\n"
                                      "ARG LAST\nRUN echo $LAST > /last\n")
        env.docker.build_args = {"LAST": last}
        return env

    a = Builder(tmp_path / "home-a", cache_registry=shared)
    try:
        first = a.ensure_image(env_with("one"))
    finally:
        a.close()
    assert a.published == {first.key: None}
    notes: list[str] = []
    events: list = []
    b = Builder(tmp_path / "home-b", engine=engine_b.client, cache_registry=shared)
    try:
        got = b.ensure_image(env_with("two"), progress=notes.append, on_event=events.append)
        remembered = b.cache.remote_parts(shared)
    finally:
        b.close()
    assert got.source == "built" and got.key != first.key
    assert any(f"reusing the layers of {first.key[:12]}" in n for n in notes), notes
    cached = {e.name for e in events if e.kind == "step" and e.state == "cached"}
    assert any(f"heavy-{stamp}" in name for name in cached), f"the step before ARG ran again: {cached}"
    assert not any("$LAST" in name for name in cached), "the step that reads the argument must run"
    # B learnt the neighbour's parts from its labels, and they are A's parts for that key.
    assert remembered[first.key] == parts_in(tmp_path / "home-a", first.key)
    assert engine_b.client.inspect_image(f"{shared}:{first.key}") is None, "the neighbour's name is not kept"


def parts_in(home: Path, key: str) -> dict[str, str]:
    from dockyard.cache import ImageCache

    index = ImageCache(home / "index.db")
    try:
        entry = index.lookup(key)
        assert entry is not None
        return dict(entry.parts)
    finally:
        index.close()
