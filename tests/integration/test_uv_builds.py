"""uv as the installer, near misses, recorded resolutions and locks, against the real engine.

Small pure-Python packages from the package index only (six, idna, tqdm, packaging), so that every
build takes seconds; each test's keys are its own (a build arg nobody else uses), so no earlier run
or other test can answer for it. What is compared is what the images hold (``pip freeze --all``),
never how long anything took.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import uuid
from pathlib import Path

import pytest
from dockyard import Environment
from dockyard.build._builder import Builder
from dockyard.dockerd import EngineClient
from dockyard.errors import BuildError
from helpers.runs import PYTHON

pytestmark = pytest.mark.engine


def env_of(pip: list[str], stamp: str, name: str = "uvtest") -> Environment:
    env = Environment(name)
    env.docker.base_image = PYTHON
    env.python.pip_requirements = pip
    env.docker.build_args = {"UVTEST": stamp}
    return env


def freeze(image: str) -> list[str]:
    done = subprocess.run(["docker", "run", "--rm", image, "python", "-m", "pip", "freeze", "--all"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return sorted(done.stdout.split())


def labels(image: str) -> dict[str, str]:
    return EngineClient.from_env().image_labels(image) or {}


def size(image: str) -> int:
    return int((EngineClient.from_env().inspect_image(image) or {}).get("Size") or 0)


@pytest.fixture
def builder(home: Path):
    b = Builder(home, cache_registry="")
    yield b
    b.close()


def test_uv_builds_hold_the_packages_a_pip_build_holds_and_no_uv(tmp_path: Path) -> None:
    env = env_of(["six", "idna<3.8", "tqdm"], uuid.uuid4().hex)
    by: dict[str, list[str]] = {}
    for installer in ("pip", "uv"):
        b = Builder(tmp_path / installer, installer=installer, cache_registry="")
        try:
            built = b.ensure_image(env, no_cache=True)
            record = b.cache.packages(built.key)
        finally:
            b.close()
        by[installer] = freeze(built.image)
        found = labels(built.image)
        assert found["dockyard.installer"].startswith(installer), found["dockyard.installer"]
        assert record is not None and list(record.packages) == json.loads(found["dockyard.resolved"])
        assert set(record.packages) == {p for p in by[installer] if not p.startswith(("pip==", "setuptools=="))}
    assert by["uv"] == by["pip"], "the same key, the same packages, whichever installer"
    assert any(p.startswith("pip==") for p in by["uv"]), "a uv-made venv keeps the pip a venv comes with"
    leftover = subprocess.run(["docker", "run", "--rm", built.image, "sh", "-c",
                               "command -v uv; ls -A /opt/dockyard/uv; ls -A /tmp/dockyard-uv-cache"],
                              capture_output=True, text=True, timeout=60)
    assert leftover.stdout.strip() == "", "uv and its cache stay out of the image"


def test_a_near_miss_holds_exactly_what_a_clean_build_of_it_holds(builder: Builder) -> None:
    stamp = uuid.uuid4().hex
    neighbour = builder.ensure_image(env_of(["six", "idna<3.8"], stamp))
    near_env = env_of(["six", "tqdm"], stamp)  # idna goes, tqdm comes
    near = builder.ensure_image(near_env)
    assert near.neighbour == neighbour.key and labels(near.image)["dockyard.neighbour"] == neighbour.key
    near_packages = freeze(near.image)
    added = size(near.image) - size(neighbour.image)
    assert 0 < added < 5_000_000, f"a near miss stores only the difference, not a copy ({added} bytes)"
    assert "dockyard.part.lock" not in labels(near.image)
    clean = builder.ensure_image(near_env, no_cache=True)
    assert clean.key == near.key and clean.neighbour is None, "--no-cache always builds clean"
    assert "dockyard.neighbour" not in labels(clean.image)
    assert near_packages == freeze(clean.image)
    assert not any(p.startswith("idna") for p in near_packages)


def test_two_near_misses_at_once_share_the_download_cache_and_both_succeed(builder: Builder, home: Path) -> None:
    stamp = uuid.uuid4().hex
    neighbour = builder.ensure_image(env_of(["six"], stamp))
    results: dict[str, object] = {}

    def build(extra: str) -> None:
        b = Builder(home, cache_registry="")
        try:
            results[extra] = b.ensure_image(env_of(["six", extra], stamp))
        except BaseException as exc:  # noqa: BLE001 - asserted below
            results[extra] = exc
        finally:
            b.close()

    threads = [threading.Thread(target=build, args=(extra,)) for extra in ("tqdm", "packaging")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    for extra, got in results.items():
        assert not isinstance(got, BaseException), f"+{extra}: {got}"
        assert got.neighbour == neighbour.key  # type: ignore[union-attr]
        packages = freeze(got.image)  # type: ignore[union-attr]
        assert any(p.startswith(f"{extra}==") for p in packages) and any(p.startswith("six==") for p in packages)
    assert len(results) == 2


def _dockyard(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DOCKYARD_HOME": str(home)}
    return subprocess.run([sys.executable, "-m", "dockyard", *args], capture_output=True, text=True, env=env,
                          timeout=600)


def test_env_lock_then_env_build_on_a_fresh_home_installs_exactly_the_lock(tmp_path: Path) -> None:
    spec = tmp_path / "environment.yml"
    spec.write_text(f"name: locked\ndocker:\n  base_image: {PYTHON}\n  build_args: {{UVTEST: {uuid.uuid4().hex}}}\n"
                    "python:\n  pip_requirements: [six, 'idna<3.8']\n")
    first = _dockyard(tmp_path / "home1", "env", "build", str(spec), "--json")
    assert first.returncode == 0, first.stderr
    unlocked = json.loads(first.stdout)
    locked = _dockyard(tmp_path / "home1", "env", "lock", str(spec), "--json")
    assert locked.returncode == 0, locked.stderr
    lock = tmp_path / "environment.lock.txt"
    pins = [line for line in lock.read_text().splitlines() if line and not line.startswith("#")]
    assert pins == json.loads(locked.stdout)["packages"] and any(p.startswith("idna==") for p in pins)
    assert set(pins) == {p for p in freeze(unlocked["image"]) if not p.startswith(("pip==", "setuptools=="))}

    fresh = _dockyard(tmp_path / "home2", "env", "build", str(spec), "--json")
    assert fresh.returncode == 0, fresh.stderr
    again = json.loads(fresh.stdout)
    assert again["key"] != unlocked["key"], "the key covers the lock"
    assert freeze(again["image"]) == freeze(unlocked["image"]), "the same versions on a fresh home"

    # The lock, not a new resolution, decides: an older pin it holds is what gets installed.
    lock.write_text(lock.read_text().replace(next(p for p in pins if p.startswith("idna==")), "idna==3.6"))
    older = _dockyard(tmp_path / "home2", "env", "build", str(spec), "--json")
    assert older.returncode == 0, older.stderr
    assert "idna==3.6" in freeze(json.loads(older.stdout)["image"])
    shown = _dockyard(tmp_path / "home2", "env", "show", str(spec), "--json")
    assert shown.returncode == 0, shown.stderr
    report = json.loads(shown.stdout)
    assert report["lock"]["path"] == str(lock) and report["lock"]["stale"] is None
    assert "idna==3.6" in report["resolution"]["packages"]

    spec.write_text(spec.read_text().replace("[six, 'idna<3.8']", "[six, 'idna<3.8', tqdm]"))
    stale = _dockyard(tmp_path / "home2", "env", "build", str(spec))
    assert stale.returncode == 2 and "other requirements" in stale.stderr and "env lock" in stale.stderr


def test_a_requirement_that_does_not_resolve_is_the_resolvers_own_short_message(tmp_path: Path) -> None:
    spec = tmp_path / "environment.yml"
    spec.write_text(f"name: bad\ndocker:\n  base_image: {PYTHON}\n  build_args: {{UVTEST: {uuid.uuid4().hex}}}\n"
                    "python:\n  pip_requirements: [six==0.0.999]\n")
    done = _dockyard(tmp_path / "home", "env", "build", str(spec))
    assert done.returncode == 1, done.stderr
    first = next(line for line in done.stderr.splitlines() if line.startswith("error: "))
    assert first.startswith("error: build failed at ") and "dockyard-uv: cannot resolve the requirements" in first
    assert "six==0.0.999" in first and "Traceback" not in done.stderr and len(first) < 400
    listed = _dockyard(tmp_path / "home", "cache", "ls", "--json")
    assert listed.returncode == 0 and json.loads(listed.stdout)["images"] == [], "nothing recorded"


def _with_the_cache(command: str) -> None:
    """Run ``command`` in a throwaway build that mounts dockyard's uv download cache (as builds do)."""
    from dockyard.build._buildkit import BuildKitClient, SolveSpec
    from dockyard.build._dockerfile import UV_CACHE_MOUNT

    tag = f"dockyard-test/uv-cache:{uuid.uuid4().hex[:12]}"
    dockerfile = f"FROM {PYTHON}\nRUN {UV_CACHE_MOUNT} echo {uuid.uuid4().hex} >/dev/null; {command}\n"
    engine = EngineClient.from_env()
    try:
        with BuildKitClient("docker", engine=engine) as client:
            client.solve(SolveSpec(dockerfile.encode(), {}, "moby", {"name": tag}))
    finally:
        engine.request("DELETE", f"/images/{tag}?force=1")


def test_a_damaged_or_deleted_download_cache_never_fails_a_build_nor_breaks_a_package(builder: Builder) -> None:
    stamp = uuid.uuid4().hex
    builder.ensure_image(env_of(["six", "tqdm"], stamp + "-warm"))  # both are in the cache now
    # Damaged: every file the cache keeps of them is cut short (what a full disk or a bad copy leaves).
    _with_the_cache("find /tmp/dockyard-uv-cache -path '*six*' -type f -exec truncate -s 0 {} + ; "
                    "find /tmp/dockyard-uv-cache -path '*tqdm*' -type f -exec truncate -s 0 {} + ; true")
    damaged = builder.ensure_image(env_of(["six", "tqdm"], stamp + "-damaged"))
    check = subprocess.run(["docker", "run", "--rm", damaged.image, "python", "-c",
                            "import six, tqdm; print(six.__version__, tqdm.__version__)"],
                           capture_output=True, text=True, timeout=60)
    assert check.returncode == 0 and len(check.stdout.split()) == 2, check.stderr
    # Deleted: nothing left in it at all.
    _with_the_cache("rm -rf /tmp/dockyard-uv-cache/* /tmp/dockyard-uv-cache/.[!.]* ; true")
    deleted = builder.ensure_image(env_of(["six", "tqdm"], stamp + "-deleted"))
    assert freeze(deleted.image) == freeze(damaged.image)


def test_a_failed_uv_build_records_nothing(builder: Builder) -> None:
    env = env_of(["six==0.0.999"], uuid.uuid4().hex)
    with pytest.raises(BuildError) as err:
        builder.ensure_image(env)
    assert "six==0.0.999" in err.value.message and err.value.exit_code == 1
    key = env.content_key(base_digest=builder.resolve_base(env)[0])
    assert builder.cache.lookup(key) is None and builder.cache.packages(key) is None


def test_the_pip_section_of_a_conda_spec_is_installed_by_uv_into_the_conda_prefix(builder: Builder,
                                                                                   tmp_path: Path) -> None:
    from dockyard.core.conda_dependencies import CondaDependencies
    from helpers.conda_channel import CondaPackage, make_channel

    channel = make_channel(tmp_path / "channel", [CondaPackage("greet", "2.1", files={
        "bin/greet": b"#!/bin/sh\necho hello from greet\n"})])
    spec = CondaDependencies.create(conda_packages=["greet>=2"], pip_packages=["six"], python_version="3.11")
    spec["channels"] = [f"file://{channel}"]
    env = env_of([], uuid.uuid4().hex, name="conda-uv")
    env.python.conda_dependencies = spec
    built = builder.ensure_image(env)
    record = builder.cache.packages(built.key)
    assert record is not None and record.layout == "conda" and record.installer.startswith("uv ")
    assert [p.split("==")[0] for p in record.packages] == ["six"], "the pip section only: conda's are rattler's"
    out = subprocess.run(["docker", "run", "--rm", built.image, "sh", "-c",
                          "greet; python -c 'import six, sys; print(sys.prefix)'"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.splitlines() == ["hello from greet", f"/opt/dockyard/envs/{built.key}"]


def test_a_second_clean_build_takes_its_bytecode_from_the_cache_and_python_uses_it(builder: Builder) -> None:
    stamp = uuid.uuid4().hex
    builder.ensure_image(env_of(["six", "tqdm"], stamp + "-first"))
    said: list[str] = []
    # Other build args: another key and no neighbour, so a clean build with a warm cache.
    second = builder.ensure_image(env_of(["six", "tqdm"], stamp + "-second"),
                                  on_event=lambda e: said.append(e.text) if e.kind == "log" else None)
    assert second.neighbour is None
    # One line for the seeds (pip…), compiled alongside the install, one for the rest.
    counts = [[int(n.replace(",", "")) for n in t.split() if n.replace(",", "").isdigit()]
              for t in said if "modules from the bytecode cache" in t]
    assert len(counts) == 2 and all(reused > 0 and compiled == 0 for reused, compiled in counts), said
    # Python loads those modules from their .pyc as it finds them (-v says so), never recompiling.
    loaded = subprocess.run(["docker", "run", "--rm", second.image, "python", "-v", "-c", "import six, tqdm"],
                            capture_output=True, text=True, timeout=60)
    assert loaded.returncode == 0, loaded.stderr
    assert "code object from '" in loaded.stderr and "/tqdm/__pycache__/" in loaded.stderr
    assert "bytecode is stale" not in loaded.stderr and "# wrote " not in loaded.stderr


def test_a_no_cache_build_builds_anew_and_leaves_the_download_cache_to_the_builds_after_it(builder: Builder) -> None:
    stamp = uuid.uuid4().hex
    builder.ensure_image(env_of(["six", "tqdm", "idna"], stamp + "-warm"))  # all three in the cache
    first = builder.ensure_image(env_of(["six"], stamp + "-a"))
    steps: list[tuple[str, str]] = []
    again = builder.ensure_image(env_of(["six"], stamp + "-a"), no_cache=True,
                                 on_event=lambda e: steps.append((e.name, e.state)) if e.kind == "step" else None)
    assert again.key == first.key and again.image_id != first.image_id, "built anew"
    assert any("install pip requirements" in name and state == "done" for name, state in steps), steps
    assert freeze(again.image) == freeze(first.image)
    # BuildKit's own --no-cache would have handed that step a new download cache, holding six only,
    # and the builds after it would get that one: tqdm's and idna's modules compiled again here.
    said: list[str] = []
    builder.ensure_image(env_of(["tqdm", "idna"], stamp + "-b"),
                         on_event=lambda e: said.append(e.text) if e.kind == "log" else None)
    counts = [[int(n.replace(",", "")) for n in t.split() if n.replace(",", "").isdigit()]
              for t in said if "modules from the bytecode cache" in t]
    assert counts and all(reused > 0 and compiled == 0 for reused, compiled in counts), said
