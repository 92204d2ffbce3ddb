"""uv as the installer, near misses, recorded resolutions and locks: the pure parts (no engine)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from dockyard import Environment
from dockyard.build import render_dockerfile
from dockyard.build._buildkit import _display_name
from dockyard.build._dockerfile import NeighbourImage
from dockyard.build._nearmiss import Candidate, pick_neighbour, requirement_names
from dockyard.build._resolved import installer_setting, parse_record, resolution_labels
from dockyard.core.conda_dependencies import CondaDependencies
from dockyard.errors import InputError, SpecError
from xxhash import xxh3_128_hexdigest

PY = "dockyard/base:bookworm-python3"
ABSENT = xxh3_128_hexdigest(b"-")


def h(c: str) -> str:
    return c * 32


BASE = {"base_image": h("1"), "base_digest": h("2"), "platform": h("3"), "dockerfile": ABSENT, "conda": ABSENT,
        "pip": h("6"), "user_managed": h("7"), "build_args": h("8"), "registry": h("9")}


def cand(key: str, parts: dict[str, str], layout: str = "venv", packages: tuple[str, ...] = (),
         used: float = 0.0) -> Candidate:
    return Candidate(key, parts, layout, frozenset(packages), used)


def pick(parts: dict[str, str], candidates: list[Candidate], wanted: set[str] | None = None) -> str | None:
    found = pick_neighbour(parts, h("f"), wanted or set(), candidates, no_conda=ABSENT, no_dockerfile=ABSENT)
    return found.key if found is not None else None


def test_a_neighbour_differs_only_in_its_dependencies_and_shares_the_most_requirements() -> None:
    mine = {**BASE, "pip": h("a")}
    few = cand(h("b"), BASE, packages=("numpy",), used=9.0)
    many = cand(h("c"), {**BASE, "pip": h("d")}, packages=("numpy", "scikit-learn", "scipy"), used=1.0)
    assert pick(mine, [few, many], {"numpy", "scikit-learn", "tqdm"}) == h("c")
    assert pick(mine, [few, many], set()) == h("b"), "a tie goes to the most recently used"


def test_another_base_platform_build_arg_or_a_dockerfile_is_never_a_neighbour() -> None:
    mine = {**BASE, "pip": h("a")}
    for name in ("base_image", "base_digest", "platform", "build_args", "registry", "user_managed"):
        assert pick(mine, [cand(h("b"), {**BASE, name: h("e")})]) is None, name
    with_dockerfile = {**BASE, "dockerfile": h("e")}
    assert pick({**with_dockerfile, "pip": h("a")}, [cand(h("b"), with_dockerfile)]) is None
    assert pick(mine, [cand(h("f"), BASE)]) is None, "never the key itself"


def test_conda_packages_or_an_unknown_layout_with_a_conda_spec_are_no_neighbours() -> None:
    mine = {**BASE, "pip": h("a")}
    assert pick(mine, [cand(h("b"), BASE, layout="conda")]) is None
    conda = {**BASE, "conda": h("c")}
    assert pick(mine, [cand(h("b"), conda, layout="")]) is None, "built before records: a conda spec is unknown"
    assert pick(mine, [cand(h("b"), conda, layout="venv")]) == h("b"), "a conda spec of pip packages only"
    assert pick(mine, [cand(h("b"), BASE, layout="")]) == h("b"), "no conda spec: a venv for sure"


def test_a_locked_neighbour_serves_a_locked_build_only() -> None:
    locked = {**BASE, "lock": h("c")}
    assert pick({**BASE, "pip": h("a")}, [cand(h("b"), locked)]) is None, "its lock label would outlive it"
    assert pick({**BASE, "lock": h("d")}, [cand(h("b"), BASE)]) == h("b")
    assert pick({**BASE, "lock": h("d")}, [cand(h("b"), locked)]) == h("b")


def test_requirement_names_are_normalised_and_skip_options_and_paths() -> None:
    lines = ["--index-url https://x/simple", "Scikit_Learn>=1.5", "numpy==2.1; python_version>'3'", "/w/a.whl",
             "tqdm[notebook]", "pkg @ file:///w/pkg.whl"]
    assert requirement_names(lines) == {"scikit-learn", "numpy", "tqdm", "pkg"}


def test_the_installer_setting_is_uv_by_default_and_refuses_others() -> None:
    assert installer_setting({}) == "uv" and installer_setting({"DOCKYARD_INSTALLER": " PIP "}) == "pip"
    with pytest.raises(InputError, match="DOCKYARD_INSTALLER"):
        installer_setting({"DOCKYARD_INSTALLER": "conda"})


def test_a_record_becomes_labels_with_normalised_names() -> None:
    record = "# dockyard resolution\n# installer: uv 0.13.9\n# mode: near\nScikit_Learn==1.5.0\nnumpy==2.1.0\n"
    found = parse_record(record, neighbour=h("b"))
    assert found.packages == ("numpy==2.1.0", "scikit-learn==1.5.0") and found.installer == "uv 0.13.9"
    labels = resolution_labels(found)
    assert json.loads(labels["dockyard.resolved"]) == ["numpy==2.1.0", "scikit-learn==1.5.0"]
    assert labels["dockyard.neighbour"] == h("b") and labels["dockyard.installer"] == "uv 0.13.9"
    pip = parse_record("# installer: pip\n# note: pip is configured by /etc/pip.conf\nsix==1.17.0\n")
    assert pip.installer == "pip (pip is configured by /etc/pip.conf)"


# -- rendering ---------------------------------------------------------------------------------------


def _env(pip: list[str]) -> Environment:
    env = Environment("r")
    env.docker.base_image = PY
    env.python.pip_requirements = pip
    return env


def test_uv_installs_in_one_step_with_the_tool_mounted_and_its_cache_shared() -> None:
    env = _env(["numpy"])
    built = render_dockerfile(env, env.content_key())
    assert "--mount=type=bind,from=dockyard/tool:uv,target=/opt/dockyard/uv" in built.dockerfile
    assert "--mount=type=cache,id=dockyard-uv,target=/tmp/dockyard-uv-cache,sharing=shared" in built.dockerfile
    assert "uv_install.py" in built.dockerfile and "--mode venv" in built.dockerfile
    assert "COPY" not in built.dockerfile and "pip install" not in built.dockerfile, "uv never lands in the image"
    assert (built.installer, built.layout, built.record_path) == (
        "uv", "venv", f"/opt/dockyard/resolved/{env.content_key().hex}.txt")
    run = built.dockerfile.split("\n", 2)[2].split("\nENV")[0].replace("\\\n", "")  # as BuildKit names the step
    assert _display_name(f"[2/2] {run}") == "[2/2] RUN (dockyard) install pip requirements"
    pip = render_dockerfile(env, env.content_key(), installer="pip")
    assert "-m pip install --no-cache-dir" in pip.dockerfile and "dockyard-uv" not in pip.dockerfile
    assert "pip freeze" in pip.dockerfile and pip.installer == "pip"


def test_a_near_miss_starts_from_its_neighbour_and_keeps_the_base_path() -> None:
    env = _env(["numpy", "tqdm"])
    key = env.content_key()
    near = NeighbourImage(h("b"), f"dockyard/env:{h('b')}", f"/opt/dockyard/envs/{h('b')}", "/usr/bin:/bin")
    built = render_dockerfile(env, key, uv_image="dockyard/tool:uv-x", neighbour=near)
    assert f"FROM dockyard/env:{h('b')}\n" in built.dockerfile and built.neighbour == near
    assert f"--mode near --from /opt/dockyard/envs/{h('b')}" in built.dockerfile
    assert f'ENV PATH="/opt/dockyard/envs/{key.hex}/bin:/usr/bin:/bin"' in built.dockerfile
    pip = render_dockerfile(env, key, installer="pip", neighbour=near)
    assert f"FROM {PY}\n" in pip.dockerfile and pip.neighbour is None, "pip cannot sync: a clean build"
    conda = Environment("c")
    conda.docker.base_image = PY
    conda.python.conda_dependencies = CondaDependencies.create(conda_packages=["greet"], pip_packages=["six"])
    mixed = render_dockerfile(conda, conda.content_key(), neighbour=near)
    assert f"FROM {PY}\n" in mixed.dockerfile and "--mode into" in mixed.dockerfile and mixed.layout == "conda"


# -- locks -------------------------------------------------------------------------------------------


def _spec(tmp_path: Path, pip: list[str]) -> Path:
    path = tmp_path / "environment.yml"
    path.write_text(f"name: locked\ndocker:\n  base_image: {PY}\npython:\n  pip_requirements: {json.dumps(pip)}\n")
    return path


def _lock(tmp_path: Path, spec: Path, pins: list[str]) -> Path:
    from dockyard._lockfile import format_lock, lock_path

    key = Environment.load(spec).content_key()
    path = lock_path(spec)
    path.write_text(format_lock(spec_name=spec.name, options=["--index-url https://mirror.example/simple"],
                                pins=pins, pip_part=key.parts["pip"], conda_part=key.parts["conda"], source="a test"))
    return path


def test_a_lock_next_to_the_spec_is_installed_and_covered_by_the_key(tmp_path: Path) -> None:
    spec = _spec(tmp_path, ["six", "idna"])
    unlocked = Environment.load(spec).content_key()
    path = _lock(tmp_path, spec, ["six==1.16.0", "idna==3.6"])
    assert path.name == "environment.lock.txt"
    env = Environment.load(spec)
    assert env.lock is not None and env.lock.pins == ("idna==3.6", "six==1.16.0")
    key = env.content_key()
    assert key.hex != unlocked.hex and "lock" in key.parts
    assert {n: d for n, d in key.parts.items() if n != "lock"} == dict(unlocked.parts), "only the lock part is new"
    built = render_dockerfile(env, key)
    (requirements,) = [data for name, (data, _) in built.spec.flat().items() if name == "requirements.txt"]
    assert requirements.decode().splitlines() == ["--index-url https://mirror.example/simple", "idna==3.6",
                                                  "six==1.16.0"]
    assert env.unlocked().content_key().hex == unlocked.hex
    again = Environment.from_dict(env.to_dict())
    assert again.content_key().hex == key.hex, "a run's agent reads the same lock"
    path.write_text(path.read_text().replace("six==1.16.0", "six==1.15.0"))
    assert Environment.load(spec).content_key().hex != key.hex, "editing a pin changes the key"


def test_a_lock_of_other_requirements_is_refused_with_what_to_do(tmp_path: Path) -> None:
    spec = _spec(tmp_path, ["six"])
    _lock(tmp_path, spec, ["six==1.16.0"])
    spec.write_text(spec.read_text().replace('["six"]', '["six", "tqdm"]'))
    with pytest.raises(SpecError) as err:
        Environment.load(spec).content_key()
    assert "other requirements" in err.value.message and "dockyard env lock" in err.value.hint
    assert err.value.exit_code == 2


def test_a_file_that_is_not_a_lock_is_an_error_naming_it(tmp_path: Path) -> None:
    spec = _spec(tmp_path, ["six"])
    (tmp_path / "environment.lock.txt").write_text("six==1.16.0\n")
    with pytest.raises(SpecError, match="dockyard-lock"):
        Environment.load(spec)


def test_the_fast_lane_leaves_a_locked_spec_to_the_full_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from dockyard.cli import _fastpath

    spec = _spec(tmp_path, ["six"])
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "index.db").write_bytes(b"")
    monkeypatch.setenv("DOCKYARD_HOME", str(tmp_path / "home"))
    calls: list[str] = []
    monkeypatch.setattr("dockyard.cache._fastread.fast_hit", lambda *a: calls.append("memo") or None)
    assert _fastpath.try_env_build_hit(["env", "build", str(spec)]) is None and calls == ["memo"]
    _lock(tmp_path, spec, ["six==1.16.0"])
    assert _fastpath.try_env_build_hit(["env", "build", str(spec)]) is None and calls == ["memo"], "no memo read"
