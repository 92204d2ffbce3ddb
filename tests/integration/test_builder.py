"""The BuildKit builder against the real engine: build once, hit after, fail clearly."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
from dockyard import Environment
from dockyard.build._builder import Builder
from dockyard.build._buildkit import BuildKitClient
from dockyard.cache import ImageCache
from dockyard.dockerd import EngineClient
from dockyard.errors import BuildError
from helpers.relay import EngineRelay

pytestmark = pytest.mark.engine

BUSYBOX = "dockyard/base:bookworm-busybox"
PYTHON = "dockyard/base:bookworm-python3"


def unique_env(tmp_path: Path, dockerfile: str | None = None, **python: object) -> Environment:
    """An environment no other test (or earlier run) has built: a unique build arg changes its key."""
    env = Environment(f"t-{uuid.uuid4().hex[:8]}")
    env.docker.build_args = {"DOCKYARD_TEST_RUN": uuid.uuid4().hex}
    if dockerfile is None:
        env.docker.base_image = BUSYBOX
    else:
        env.docker.base_dockerfile = dockerfile
    for name, value in python.items():
        setattr(env.python, name, value)
    return env


@pytest.fixture
def solves(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Counts real Solve calls (the real method still runs)."""
    calls: list[str] = []
    real = BuildKitClient.solve

    def counting(self: BuildKitClient, spec, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(spec.exporter_attrs.get("name", ""))
        return real(self, spec, **kwargs)

    monkeypatch.setattr(BuildKitClient, "solve", counting)
    return calls


@pytest.fixture
def builder(home: Path):
    b = Builder(home)
    yield b
    b.close()


def test_busybox_env_builds_once_then_hits(builder: Builder, tmp_path: Path, solves, engine_resources):
    env = unique_env(tmp_path)
    events: list[object] = []
    first = builder.ensure_image(env, on_event=events.append)
    engine_resources.track_image(first.image)
    assert (first.cached, first.source) == (False, "built")
    assert first.image == f"dockyard/env:{first.key}" and first.image_id.startswith("sha256:")
    assert solves == [first.image]
    labels = EngineClient.from_env().image_labels(first.image)
    assert labels is not None and labels["dockyard.key"] == first.key and labels["dockyard.schema"] == "1"
    assert any(getattr(e, "kind", "") == "step" for e in events), "no progress events"

    second = builder.ensure_image(env)
    assert (second.cached, second.source, second.key, second.image_id) == (True, "local-hit", first.key, first.image_id)
    assert len(solves) == 1, "a hit must not call Solve"


def test_pip_install_in_python_flavor(builder: Builder, tmp_path: Path, engine_resources):
    env = unique_env(tmp_path)
    env.docker.base_image = PYTHON
    env.python.pip_requirements = ["six==1.17.0"]
    built = builder.ensure_image(env)
    engine_resources.track_image(built.image)
    code, out = engine_resources.run(built.image, ["python", "-c", "import six, sys; print(six.__version__, sys.prefix)"])
    assert code == 0, out
    version, prefix = out.split()
    assert version == "1.17.0" and prefix == f"/opt/dockyard/envs/{built.key}"


def test_failing_run_is_a_build_error_and_records_nothing(builder: Builder, tmp_path: Path, solves):
    env = unique_env(tmp_path, dockerfile=f"FROM {BUSYBOX}\nRUN echo fine\nRUN echo boom-on-stderr >&2; exit 7\n")
    with pytest.raises(BuildError) as info:
        builder.ensure_image(env)
    err = info.value
    assert "RUN echo boom-on-stderr" in err.step and err.step.startswith("[3/3]")
    assert err.exit_code_of_step == 7
    assert "boom-on-stderr" in err.log_tail
    assert err.dockerfile_line == 3
    assert builder.cache.lookup(env.content_key(base_digest=builder.resolve_base(env)[0])) is None
    assert len(solves) == 1


def test_dockerfile_syntax_error_names_the_line(builder: Builder, tmp_path: Path):
    env = unique_env(tmp_path, dockerfile=f"FROM {BUSYBOX}\nRUN true\nRUNN echo typo\n")
    with pytest.raises(BuildError) as info:
        builder.ensure_image(env)
    assert info.value.dockerfile_line == 3
    assert "RUNN" in str(info.value)


def test_image_deleted_behind_our_back_is_rebuilt(builder: Builder, tmp_path: Path, solves, engine_resources):
    env = unique_env(tmp_path)
    first = builder.ensure_image(env)
    engine_resources.track_image(first.image)
    engine_resources.client.images.remove(first.image, force=True)
    again = builder.ensure_image(env)
    assert again.source == "built" and again.key == first.key
    assert len(solves) == 2
    assert builder.cache.lookup(again.key).image_id == again.image_id
    assert builder.ensure_image(env).source == "local-hit"


def test_cancel_stops_the_build_and_records_nothing(builder: Builder, tmp_path: Path):
    env = unique_env(tmp_path, dockerfile=f"FROM {BUSYBOX}\nRUN echo started; sleep 60\n")
    cancel = threading.Event()
    seen: list[object] = []

    def watch(event: object) -> None:
        seen.append(event)
        if getattr(event, "kind", "") == "log" and "started" in getattr(event, "text", ""):
            cancel.set()

    began = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        builder.ensure_image(env, on_event=watch, cancel=cancel)
    assert time.monotonic() - began < 50, "cancel did not stop the 60 s step"
    key = env.content_key(base_digest=builder.resolve_base(env)[0])
    assert builder.cache.lookup(key) is None


def test_user_managed_env_skips_python_steps(builder: Builder, tmp_path: Path, engine_resources):
    env = unique_env(tmp_path, user_managed_dependencies=True, pip_requirements=["this-would-fail-to-install"])
    built = builder.ensure_image(env)
    engine_resources.track_image(built.image)
    assert built.source == "built"


def test_conda_packages_on_a_base_without_python_say_what_is_missing(builder: Builder, tmp_path: Path):
    # busybox has no python3 for the rattler installer to run on: one clear line, no conda needed.
    env = unique_env(tmp_path, conda_dependencies={"channels": ["conda-forge"], "dependencies": ["numpy"]})
    with pytest.raises(BuildError) as info:
        builder.ensure_image(env)
    assert info.value.exit_code_of_step == 127
    assert "py-rattler" in info.value.log_tail and "python3" in info.value.log_tail
    assert "conda packages" in info.value.message and "RUN --mount" not in info.value.message


def test_four_processes_one_solve(home: Path, tmp_path: Path, engine_resources):
    spec = tmp_path / "env.yml"
    spec.write_text(
        f"name: race\ndocker:\n  base_image: {BUSYBOX}\n  build_args:\n    RUN_ID: {uuid.uuid4().hex}\n"
    )
    code = (
        "import json, sys; from dockyard import Environment; from dockyard.build._builder import ensure_image;"
        "print(json.dumps(ensure_image(Environment.load(sys.argv[1])).to_json()))"
    )
    env = {**os.environ, "DOCKYARD_HOME": str(home)}
    procs = [
        subprocess.Popen([sys.executable, "-c", code, str(spec)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        for _ in range(4)
    ]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
        results.append(json.loads(out))
    engine_resources.track_image(results[0]["image"])
    assert sorted(r["source"] for r in results) == ["built", "local-hit", "local-hit", "local-hit"]
    assert len({r["image_id"] for r in results}) == 1
    assert len(ImageCache(home / "index.db").entries()) == 1


def test_cli_build_twice(home: Path, tmp_path: Path, engine_resources):
    spec = tmp_path / "env.yml"
    spec.write_text(f"name: cli\ndocker:\n  base_image: {BUSYBOX}\n  build_args:\n    RUN_ID: {uuid.uuid4().hex}\n")
    env = {**os.environ, "DOCKYARD_HOME": str(home)}
    run = lambda *a: subprocess.run([sys.executable, "-m", "dockyard", *a], capture_output=True, text=True, env=env, timeout=300)
    first = run("env", "build", str(spec), "--json", "--progress", "plain")
    assert first.returncode == 0, first.stderr
    built = json.loads(first.stdout)
    engine_resources.track_image(built["image"])
    assert built["cached"] is False and built["source"] == "built"
    assert "[1/1] FROM" in first.stderr  # plain progress on stderr
    second = run("env", "build", str(spec), "--json")
    hit = json.loads(second.stdout)
    assert hit["cached"] is True and hit["key"] == built["key"] and hit["image_id"] == built["image_id"]
    assert second.stderr == ""
    listed = json.loads(run("env", "ls", "--json").stdout)
    assert [i["key"] for i in listed["images"]] == [built["key"]]


def test_cli_build_failure_is_one_clear_error(home: Path, tmp_path: Path):
    spec = tmp_path / "env.yml"
    spec.write_text(f"name: bad\ndocker:\n  base_dockerfile: |\n    FROM {BUSYBOX}\n    RUN exit 3\n  build_args:\n    RUN_ID: {uuid.uuid4().hex}\n")
    out = subprocess.run([sys.executable, "-m", "dockyard", "env", "build", str(spec), "--progress", "plain"],
                         capture_output=True, text=True, env={**os.environ, "DOCKYARD_HOME": str(home)}, timeout=300)
    assert out.returncode == 1
    assert "error: build failed at [2/2] RUN exit 3" in out.stderr
    assert "Traceback" not in out.stderr



# -- waiting for another builder; the engine going away mid-build -------------------------------


def test_a_build_waiting_for_another_process_says_whom_it_waits_for(builder: Builder, tmp_path: Path):
    env = unique_env(tmp_path)
    key, _ = builder.key_for(env)
    has_lease, noted = threading.Event(), threading.Event()
    notes: list[str] = []

    def note(line: str) -> None:
        notes.append(line)
        if line.startswith("waiting for another build"):
            noted.set()

    def other_builder() -> None:  # holds the lease until the waiter has said what it waits for
        with ImageCache(builder.cache.path).building(key) as slot:
            assert slot.must_build
            has_lease.set()
            noted.wait(10)
            slot.record(image=BUSYBOX, image_id="sha256:" + "0" * 64, builder="other")

    holder = threading.Thread(target=other_builder)
    holder.start()
    assert has_lease.wait(10)
    try:
        got = builder.ensure_image(env, progress=note)
    finally:
        holder.join()
    assert (got.source, got.image) == ("local-hit", BUSYBOX)  # the other builder's result
    expected = f"waiting for another build of {key.hex[:12]} (pid {os.getpid()} on this machine)…"
    assert expected in notes, notes


def _cut_when_started(action) -> object:  # type: ignore[no-untyped-def]
    """on_event that runs ``action`` once, when the sleeping step has printed "started"."""
    done = threading.Event()

    def watch(event: object) -> None:
        if getattr(event, "kind", "") == "log" and "started" in getattr(event, "text", "") and not done.is_set():
            done.set()
            action()

    watch.done = done  # type: ignore[attr-defined]
    return watch


@pytest.mark.parametrize("engine_after", ["gone", "back"])
def test_the_engine_going_away_mid_build_is_an_environment_problem(
    home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, engine_after: str
):
    from dockyard.errors import BuildKitUnavailable, EngineUnavailable, EnvironmentProblem

    relay_path = tmp_path / "engine.sock"
    relay = EngineRelay(str(relay_path))
    monkeypatch.setenv("DOCKER_HOST", f"unix://{relay_path}")
    builder = Builder(home)
    env = unique_env(tmp_path, dockerfile=f"FROM {BUSYBOX}\nRUN echo started; sleep 20\n")
    watch = _cut_when_started(relay.close if engine_after == "gone" else relay.cut)
    began = time.monotonic()
    try:
        with pytest.raises(EnvironmentProblem) as info:
            builder.ensure_image(env, on_event=watch)
        key, _ = builder.key_for(env) if engine_after == "back" else (None, None)
    finally:
        relay.close()
        builder.close()
    assert watch.done.is_set(), "the step never started"  # type: ignore[attr-defined]
    assert time.monotonic() - began < 18, "the build was not cut"
    err = info.value
    assert not isinstance(err, BuildError) and err.exit_code == 3
    assert type(err) is (EngineUnavailable if engine_after == "gone" else BuildKitUnavailable)
    assert "Docker Engine" in err.message and "went away during the build" in err.message, err.message
    assert "build again" in err.hint and "nothing was recorded" in err.hint
    cache = ImageCache(home / "index.db")
    assert cache.stats().leases == 0  # the lease was released: the next build starts at once
    if key is not None:
        assert cache.lookup(key) is None


def test_a_failing_step_through_the_same_relay_is_still_a_build_error(
    home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    relay_path = tmp_path / "engine.sock"
    relay = EngineRelay(str(relay_path))
    monkeypatch.setenv("DOCKER_HOST", f"unix://{relay_path}")
    builder = Builder(home)
    env = unique_env(tmp_path, dockerfile=f"FROM {BUSYBOX}\nRUN echo started; exit 5\n")
    try:
        with pytest.raises(BuildError) as info:
            builder.ensure_image(env)
    finally:
        relay.close()
        builder.close()
    assert info.value.exit_code == 1 and info.value.exit_code_of_step == 5


def test_cli_build_whose_engine_goes_away_exits_3_with_one_clear_error(home: Path, tmp_path: Path):
    relay_path = tmp_path / "engine.sock"
    relay = EngineRelay(str(relay_path))
    spec = tmp_path / "env.yml"
    spec.write_text(
        "name: cut\ndocker:\n  base_dockerfile: |\n"
        f"    FROM {BUSYBOX}\n    RUN echo started; sleep 20\n"
        f"  build_args:\n    RUN_ID: {uuid.uuid4().hex}\n"
    )
    env = {**os.environ, "DOCKYARD_HOME": str(home), "DOCKER_HOST": f"unix://{relay_path}"}
    proc = subprocess.Popen([sys.executable, "-m", "dockyard", "env", "build", str(spec), "--progress", "plain"],
                            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env)
    lines: list[str] = []
    try:
        assert proc.stderr is not None
        for line in proc.stderr:
            lines.append(line)
            if "started" in line and "echo" not in line:
                relay.close()
                break
        rest = proc.stderr.read()
        proc.wait(timeout=60)
    finally:
        relay.close()
        proc.kill()
        proc.wait()
    stderr = "".join(lines) + rest
    assert proc.returncode == 3, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "went away during the build" in errors[0], stderr
    assert "Traceback" not in stderr and "Stream removed" not in errors[0].split("(grpc:")[0]
