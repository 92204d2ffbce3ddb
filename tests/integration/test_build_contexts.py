"""Dockerfiles that read files, large contexts, pip files and conda packages, against the real engine.

Nothing here reaches a package index or a conda channel: the wheel is made here, pip runs with
``--no-index``, and the conda channel is a local one of real packages (tests/helpers/conda_channel).
"""

from __future__ import annotations

import base64
import hashlib
import io
import os
import subprocess
import sys
import uuid
import zipfile
from pathlib import Path

import pytest
from dockyard import Environment, Experiment, ScriptRunConfig
from dockyard.build._builder import Builder
from dockyard.core import Dataset
from dockyard.core.conda_dependencies import CondaDependencies
from dockyard.dockerd import EngineClient
from dockyard.errors import BuildError
from helpers.conda_channel import CondaPackage, make_channel
from helpers.runs import PYTHON, source

pytestmark = pytest.mark.engine


@pytest.fixture
def builder(home: Path):
    b = Builder(home)
    yield b
    b.close()


def in_image(image: str, command: str) -> str:
    done = subprocess.run(["docker", "run", "--rm", image, "sh", "-c", command], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout


def build_inputs_left() -> list[str]:
    out = subprocess.run(["docker", "images", "--format", "{{.Repository}}:{{.Tag}}", "dockyard/build-input"],
                         capture_output=True, text=True, timeout=30).stdout
    return [line for line in out.splitlines() if line.strip() and f"-{os.getpid()}-" in line]


def context(tmp_path: Path, dockerfile: str, files: dict[str, bytes]) -> Path:
    root = tmp_path / "ctx"
    root.mkdir()
    (root / "Dockerfile").write_text(dockerfile)
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return root


def test_a_dockerfile_builds_with_its_folder_as_context_and_dockerignore(builder, tmp_path):
    stamp = uuid.uuid4().hex
    root = context(tmp_path, f"FROM {PYTHON}\nCOPY . /app\nRUN test -x /app/run.sh\n", {
        "hello.txt": stamp.encode(), "run.sh": b"#!/bin/sh\necho ran\n", "secret.env": b"TOKEN=x",
        "cache/junk.pyc": b"junk", ".dockerignore": b"secret.env\ncache\n"})
    os.chmod(root / "run.sh", 0o755)
    env_file = tmp_path / "env.yml"
    env_file.write_text("name: ctx\ndocker:\n  base_dockerfile: ctx/Dockerfile\npython:\n  pip_requirements: []\n")
    built = builder.ensure_image(Environment.load(env_file))
    assert not built.cached
    listing = in_image(built.image, "cat /app/hello.txt; echo; ls -A /app; /app/run.sh")
    assert stamp in listing and "ran" in listing
    assert "secret.env" not in listing and "cache" not in listing, "ignored files stay out"
    assert build_inputs_left() == [], "the imported context is removed after the build"
    env = Environment.load(env_file)
    assert built.key != env.content_key().hex, "the base's digest is in the image's key"
    assert builder.image_key(env) == (env.content_key(base_digest=builder.resolve_base(env)[0]), None)
    assert builder.image_key(env)[0].hex == built.key
    (tmp_path / "notes.txt").write_text("outside the context")
    assert builder.ensure_image(Environment.load(env_file)).cached
    (root / "hello.txt").write_text("edited")
    rebuilt = builder.ensure_image(Environment.load(env_file))
    assert not rebuilt.cached and "edited" in in_image(rebuilt.image, "cat /app/hello.txt")


def test_a_context_of_one_gigabyte_builds(builder, tmp_path):
    root = context(tmp_path, f"FROM {PYTHON}\nCOPY weights.bin /weights.bin\nCOPY tag.txt /tag.txt\n",
                   {"tag.txt": uuid.uuid4().hex.encode()})
    with open(root / "weights.bin", "wb") as fh:
        fh.truncate(1 << 30)  # 1 GiB (sparse here; 1 GiB of bytes through the engine all the same)
    env = Environment.from_dockerfile("big", str(root / "Dockerfile"))
    built = builder.ensure_image(env)
    assert in_image(built.image, "stat -c %s /weights.bin").strip() == str(1 << 30)
    assert build_inputs_left() == []
    engine = EngineClient.from_env()
    engine.request("DELETE", f"/images/{built.image}")
    for blob in blobs():
        engine.request("DELETE", f"/images/{blob}")


def blobs() -> set[str]:
    out = subprocess.run(["docker", "images", "--format", "{{.Repository}}:{{.Tag}}", "dockyard/build-input"],
                         capture_output=True, text=True, timeout=30).stdout
    return {line for line in out.split() if ":blob-" in line}


def test_a_large_file_travels_once_and_gc_removes_it_when_unused(builder, tmp_path):
    from dockyard.build import collect_build_inputs

    root = context(tmp_path, f"FROM {PYTHON}\nCOPY model.bin /model.bin\nCOPY config.txt /config.txt\n",
                   {"model.bin": os.urandom(9 << 20), "config.txt": b"lr=0.1"})
    env_file = tmp_path / "env.yml"
    env_file.write_text("name: blob\ndocker:\n  base_dockerfile: ctx/Dockerfile\n")
    before = blobs()
    first = builder.ensure_image(Environment.load(env_file))
    mine = blobs() - before
    assert len(mine) == 1, "the large file became one content-addressed blob"
    blob_id = EngineClient.from_env().inspect_image(next(iter(mine)))["Id"]
    (root / "config.txt").write_text("lr=0.01")
    second = builder.ensure_image(Environment.load(env_file))
    assert second.key != first.key and blobs() - before == mine
    assert EngineClient.from_env().inspect_image(next(iter(mine)))["Id"] == blob_id, "not sent again"
    assert in_image(second.image, "cat /config.txt; md5sum /model.bin").startswith("lr=0.01")
    assert build_inputs_left() == []
    assert not any(i["image"] in mine for i in collect_build_inputs(keep_days=30, dry_run=True)), "recent: kept"
    removed = collect_build_inputs(keep_days=0)
    assert mine <= {str(i["image"]) for i in removed} and not (blobs() & mine)
    third = builder.ensure_image(Environment.load(env_file), no_cache=True)  # a removed blob is sent again
    assert in_image(third.image, "cat /config.txt") == "lr=0.01"
    assert blobs() - before == mine, "the same content, the same blob"
    for blob in mine:
        EngineClient.from_env().request("DELETE", f"/images/{blob}")


def _wheel(folder: Path, name: str, version: str, module: str) -> Path:
    """A real (tiny) wheel: pip installs it offline."""
    folder.mkdir(parents=True, exist_ok=True)
    dist = f"{name}-{version}.dist-info"
    files = {
        f"{name}/__init__.py": module.encode(),
        f"{dist}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n".encode(),
        f"{dist}/WHEEL": b"Wheel-Version: 1.0\nGenerator: dockyard-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = io.StringIO()
    for path, data in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.write(f"{path},sha256={digest},{len(data)}\n")
    record.write(f"{dist}/RECORD,,\n")
    files[f"{dist}/RECORD"] = record.getvalue().encode()
    path = folder / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as zf:
        for rel, data in files.items():
            zf.writestr(rel, data)
    return path


def test_pip_files_with_includes_constraints_and_local_wheels_install_offline(builder, tmp_path):
    stamp = uuid.uuid4().hex[:8]
    _wheel(tmp_path / "wheels", "tinya", "1.0", f"WHO = 'a-{stamp}'\n")
    _wheel(tmp_path / "wheels", "tinya", "2.0", "WHO = 'too new'\n")
    wheel_b = _wheel(tmp_path / "dist", "tinyb", "1.0", "WHO = 'b'\n")
    reqs = tmp_path / "reqs"
    reqs.mkdir()
    (reqs / "base.txt").write_text("--no-index\n--find-links ../wheels\ntinya\n")
    (reqs / "constraints.txt").write_text("tinya<2\n")
    (reqs / "requirements.txt").write_text(f"-r base.txt\n-c constraints.txt\n{os.path.relpath(wheel_b, reqs)}\n")
    env_file = tmp_path / "env.yml"
    env_file.write_text(f"name: pipfiles\ndocker:\n  base_image: {PYTHON}\npython:\n"
                        "  pip_requirements_file: reqs/requirements.txt\n")
    built = builder.ensure_image(Environment.load(env_file))
    out = in_image(built.image, "python -c 'import tinya, tinyb; print(tinya.WHO, tinyb.WHO)'")
    assert out.strip() == f"a-{stamp} b", "the constraint picked 1.0 from the local folder"
    assert build_inputs_left() == []


def test_a_missing_requirement_file_fails_before_any_build(builder, tmp_path):
    (tmp_path / "requirements.txt").write_text("six\n-c missing-constraints.txt\n")
    env_file = tmp_path / "env.yml"
    env_file.write_text("name: bad\npython:\n  pip_requirements_file: requirements.txt\n")
    from dockyard.errors import SpecError

    with pytest.raises(SpecError) as err:
        builder.ensure_image(Environment.load(env_file))
    assert "missing-constraints.txt" in str(err.value) and err.value.line == 2
    assert "dockyard-spec" not in str(err.value)


@pytest.fixture
def channel(tmp_path: Path) -> Path:
    stamp = uuid.uuid4().hex[:8]
    return make_channel(tmp_path / "channel", [
        CondaPackage("libgreet", "1.0", files={"share/greet/words.txt": f"hello {stamp}\n".encode()}),
        CondaPackage("greet", "2.1", depends=("libgreet >=1.0",),
                     files={"bin/greet": b"#!/bin/sh\ncat \"$(dirname \"$0\")/../share/greet/words.txt\"\n"}),
    ])


def test_conda_packages_install_from_a_local_channel_without_conda(builder, tmp_path, channel):
    # Azure ML's usual shape: a python pin and pip next to the packages; the local channel has no
    # Python, so the base image's (3.11) runs the environment.
    spec = CondaDependencies.create(conda_packages=["pip", "greet>=2"], pip_packages=[], python_version="3.11")
    spec["channels"] = [f"file://{channel}"]
    env = Environment("conda-local")
    env.docker.base_image = PYTHON
    env.python.conda_dependencies = spec
    built = builder.ensure_image(env)
    out = in_image(built.image, "command -v conda mamba micromamba || true; greet; python -c 'import sys; print(sys.prefix)'")
    words = (channel / "noarch").glob("libgreet-*.tar.bz2")
    assert next(words, None) is not None
    assert out.splitlines()[0].startswith("hello ") and "/opt/dockyard/envs/" in out
    assert "conda" not in out.splitlines()[0], "no conda binary was needed"
    assert build_inputs_left() == []


def test_a_conda_package_the_channel_lacks_is_a_short_build_error(builder, tmp_path, channel):
    env = Environment("conda-missing")
    env.docker.base_image = PYTHON
    env.python.conda_dependencies = CondaDependencies(_underlying_structure={
        "channels": [f"file://{channel}"], "dependencies": ["greet", "nosuchpkg>=3"]})
    with pytest.raises(BuildError) as err:
        builder.ensure_image(env)
    text = str(err.value)
    assert "nosuchpkg" in err.value.log_tail and "No candidates" in err.value.log_tail
    assert str(channel) in err.value.log_tail and "dockyard-spec/channels" not in err.value.log_tail
    assert text.count("RUN --mount") <= 1 and len(err.value.message) < 300
    assert builder.cache.lookup(env.content_key(base_digest=builder.resolve_base(env)[0])) is None


TRAIN = """
import os, sys
from dockyard import Run
run = Run.get_context()
data = run.input_datasets["pets"]
assert data == sys.argv[sys.argv.index("--data") + 1], (data, sys.argv)
print("LABELS", open(os.path.join(data, "labels.txt")).read().strip())
print("BAKED", open("/opt/app/config.txt").read().strip())
with open("/dev/shm/batch", "wb") as fh:  # DataLoader workers share batches through /dev/shm
    for _ in range(1024):
        fh.write(b"\\1" * (1 << 20))
os.remove("/dev/shm/batch")
print("SHM 1GiB OK")
"""


def test_a_pytorch_style_job_runs_unchanged_in_a_custom_dockerfile_environment(workspace, tmp_path):
    stamp = uuid.uuid4().hex
    docker_dir = tmp_path / "docker"
    docker_dir.mkdir()
    (docker_dir / "config.txt").write_text(stamp)
    (docker_dir / "Dockerfile").write_text(f"FROM {PYTHON}\nCOPY config.txt /opt/app/config.txt\n")
    pets = tmp_path / "pets"
    pets.mkdir()
    (pets / "labels.txt").write_text("cat,dog\n")
    env = Environment.from_dockerfile("fastai-like", str(docker_dir / "Dockerfile"))
    config = ScriptRunConfig(str(source(tmp_path, "train.py", TRAIN)), "train.py", environment=env,
                             arguments=["--data", Dataset.File.from_files(str(pets)).as_named_input("pets").as_mount()])
    run = Experiment(workspace, "pets").submit(config)
    details = run.wait_for_completion(raise_on_error=False)
    log = Path(details["logFiles"]["logs/std.log"]).read_text()
    assert details["status"] == "Completed", log
    assert "LABELS cat,dog" in log and f"BAKED {stamp}" in log and "SHM 1GiB OK" in log
    assert log.index("COPY config.txt") < log.index("LABELS"), "the build's progress comes first"


def test_dockyard_env_render_lists_the_context_and_dependency_files(tmp_path):
    context(tmp_path, f"FROM {PYTHON}\nCOPY a.txt /a\n", {"a.txt": b"a"})
    env_file = tmp_path / "env.yml"
    env_file.write_text("name: r\ndocker:\n  base_dockerfile: ctx/Dockerfile\npython:\n  pip_requirements: [six]\n")
    done = subprocess.run([sys.executable, "-m", "dockyard", "env", "render", str(env_file)], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "COPY a.txt /a" in done.stdout and "# --- build context" in done.stdout and "1 files" in done.stdout
    assert "requirements.txt" in done.stdout and "six" in done.stdout


def test_the_context_benchmark_prints_its_ratios(tmp_path):
    done = subprocess.run([sys.executable, "benchmarks/context_transport.py", "--sizes", "1", "--n", "1", "--json"],
                          capture_output=True, text=True, timeout=300, cwd=Path(__file__).parents[2])
    assert done.returncode == 0, done.stderr
    import json

    doc = json.loads(done.stdout)
    assert {r["scenario"] for r in doc["rows"]} == {"near_miss", "cold"}
    assert all(r["dockyard"] > 0 and r["key_only"] >= 0 for r in doc["rows"])
    if doc["docker_cli"]:
        assert all(r["ratio_docker_over_dockyard"] > 0 for r in doc["rows"])


def test_every_env_command_shows_the_key_env_build_tags_and_cache_pin_takes_either_form(tmp_path):
    env_file = tmp_path / "env.yml"
    env_file.write_text(f"name: k\ndocker:\n  base_image: {PYTHON}\n  build_args: {{STAMP: {uuid.uuid4().hex}}}\n")

    home = tmp_path / "home"  # its own index: a default home another checkout wrote must not matter

    def dockyard(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "dockyard", *args], capture_output=True, text=True, timeout=120,
                              env={**os.environ, "DOCKYARD_HOME": str(home), **env})

    built = dockyard("env", "build", str(env_file), "--json")
    assert built.returncode == 0, built.stderr
    import json

    image_key = json.loads(built.stdout)["key"]
    shown = dockyard("env", "key", str(env_file))
    assert shown.stdout.strip() == image_key and "note" not in shown.stderr
    assert f"content key {image_key}" in dockyard("env", "render", str(env_file)).stdout
    assert dockyard("cache", "pin", shown.stdout.strip()).returncode == 0
    # Where no engine can be asked (and nothing was remembered): the key before resolution, said so.
    offline = dockyard("env", "key", str(env_file), "--json", DOCKER_HOST="unix:///nonexistent/docker.sock",
                       DOCKYARD_HOME=str(tmp_path / "other-home"))
    doc = json.loads(offline.stdout)
    assert doc["resolved"] is False and "cannot be asked" in doc["note"] and doc["key"] != image_key
    unpinned = dockyard("cache", "unpin", doc["key"])  # the spec's key names the same image
    assert unpinned.returncode == 0 and image_key in unpinned.stdout, unpinned.stderr


def test_no_cache_rebuild_removes_the_image_it_replaced_and_gc_spares_another_homes_image(builder, tmp_path):
    from dockyard.build import collect_garbage

    env = Environment("nc")
    env.docker.base_image = PYTHON
    env.docker.build_args = {"STAMP": uuid.uuid4().hex}
    env.docker.base_dockerfile = None
    first = builder.ensure_image(env)
    engine = EngineClient.from_env()
    second = builder.ensure_image(env, no_cache=True)
    assert second.image == first.image
    if second.image_id != first.image_id:
        assert engine.inspect_image(first.image_id) is None, "the replaced image was left dangling"
    assert engine.image_labels(second.image).get("dockyard.home"), "the image says which home owns it"
    # Another home built the same key last: its label wins, and this home's GC only forgets its row.
    other = Builder(tmp_path / "other-home")
    try:
        other.ensure_image(env, no_cache=True)
    finally:
        other.close()
    report = collect_garbage(keep_days=0, home=builder.home)
    assert first.key in [e.key for e in report.removed]
    assert engine.inspect_image(second.image) is not None, "GC removed an image another home owns"
    assert builder.cache.lookup(first.key) is None


def test_cache_gc_dry_run_alone_shows_the_default_policy_and_prune_build_cache_reports(tmp_path):
    import json

    def dockyard(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "dockyard", *args], capture_output=True, text=True, timeout=300,
                              env={**os.environ, "DOCKYARD_HOME": str(tmp_path / "home")})

    dry = dockyard("cache", "gc", "--dry-run")
    assert dry.returncode == 0 and "default policy: --keep-days 30" in dry.stdout, dry.stderr
    refused = dockyard("cache", "gc")
    assert refused.returncode == 2 and "--dry-run alone" in refused.stderr
    pruned = dockyard("cache", "prune-build-cache", "--keep-bytes", "1000G", "--json")
    assert pruned.returncode == 0, pruned.stderr
    assert json.loads(pruned.stdout)["freed_bytes"] >= 0
