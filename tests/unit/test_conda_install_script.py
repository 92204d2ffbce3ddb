"""engine/build/conda_install.py installs a conda spec with rattler, no conda, from a local channel of real packages.

The script runs as a subprocess, as it does in a build (``python3 conda_install.py SPEC_JSON PREFIX``), with
this interpreter; the channel is built by tests/helpers/conda_channel.py and read through ``file://``.
"""

from __future__ import annotations

import ast
import json
import os
import stat
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from helpers.conda_channel import CondaPackage, make_channel

SCRIPT = Path(__file__).resolve().parents[2] / "engine" / "build" / "conda_install.py"

LIBA = CondaPackage("liba", "1.0", files={"share/liba/data.txt": b"hello from liba\n"})
TOOL = CondaPackage("tool", "2.0", depends=("liba >=1",), files={"bin/tool": b"#!/bin/sh\necho tool 2.0\n"})


@pytest.fixture(scope="module")
def channel(tmp_path_factory: pytest.TempPathFactory) -> str:
    return make_channel(tmp_path_factory.mktemp("channel"), [LIBA, TOOL]).as_uri()


def _install(tmp_path: Path, channels: list[str], dependencies: list[object]) -> tuple[subprocess.CompletedProcess[str], Path]:
    spec = tmp_path / "conda.json"
    spec.write_text(json.dumps({"channels": channels, "dependencies": dependencies}))
    prefix = tmp_path / "env"
    env = {**os.environ, "DOCKYARD_CONDA_CACHE": str(tmp_path / "cache")}
    out = subprocess.run([sys.executable, str(SCRIPT), str(spec), str(prefix)], capture_output=True, text=True,
                         env=env, timeout=120)
    return out, prefix


def _one_error_line(out: subprocess.CompletedProcess[str]) -> str:
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert lines[0].startswith("dockyard-conda: ")
    assert len(lines[0]) < 500
    return lines[0]


def test_installs_the_package_and_its_dependency(tmp_path: Path, channel: str) -> None:
    out, prefix = _install(tmp_path, [channel], ["tool>=2", {"pip": ["not-a-conda-package"]}])
    assert out.returncode == 0, out.stderr
    assert "dockyard-conda: solving 1 specs from channels" in out.stdout
    assert "installing 2 packages: liba-1.0, tool-2.0" in out.stdout

    assert (prefix / "share/liba/data.txt").read_bytes() == b"hello from liba\n"
    tool = prefix / "bin/tool"
    assert tool.stat().st_mode & stat.S_IXUSR
    assert subprocess.run([str(tool)], capture_output=True, text=True, check=True).stdout == "tool 2.0\n"

    records = {p.name: json.loads(p.read_text()) for p in (prefix / "conda-meta").glob("*.json")}
    assert sorted(records) == ["liba-1.0-0.json", "tool-2.0-0.json"]
    assert records["tool-2.0-0.json"]["depends"] == ["liba >=1"]
    assert "bin/tool" in records["tool-2.0-0.json"]["files"]


def test_a_package_the_channel_lacks_is_one_short_line_and_exit_2(tmp_path: Path, channel: str) -> None:
    out, prefix = _install(tmp_path, [channel], ["tool", "nosuchpkg>=3"])
    assert out.returncode == 2, out.stdout + out.stderr
    assert "nosuchpkg" in _one_error_line(out)
    assert not (prefix / "conda-meta").exists()


def test_a_missing_dependency_of_a_package_names_it(tmp_path: Path) -> None:
    broken = CondaPackage("needy", "1.0", depends=("ghostlib",))
    channel = make_channel(tmp_path / "channel", [broken]).as_uri()
    out, _ = _install(tmp_path, [channel], ["needy"])
    assert out.returncode == 2, out.stdout + out.stderr
    assert "ghostlib" in _one_error_line(out)


def test_a_channel_that_cannot_be_read_is_exit_3(tmp_path: Path, channel: str) -> None:
    missing = (tmp_path / "no-channel-here").as_uri()
    out, _ = _install(tmp_path, [channel, missing], ["tool"])
    assert out.returncode == 3, out.stdout + out.stderr
    assert missing in _one_error_line(out)


def test_a_folder_that_is_not_indexed_is_exit_3(tmp_path: Path) -> None:
    (tmp_path / "unindexed" / "noarch").mkdir(parents=True)
    out, _ = _install(tmp_path, [(tmp_path / "unindexed").as_uri()], ["tool"])
    assert out.returncode == 3, out.stdout + out.stderr
    assert "repodata.json" in _one_error_line(out)


def test_an_invalid_spec_is_exit_2(tmp_path: Path, channel: str) -> None:
    out, _ = _install(tmp_path, [channel], ["tool ==?"])
    assert out.returncode == 2, out.stdout + out.stderr
    assert "invalid conda spec" in _one_error_line(out)


def test_only_a_pip_section_installs_nothing(tmp_path: Path, channel: str) -> None:
    out, prefix = _install(tmp_path, [channel], [{"pip": ["requests"]}])
    assert out.returncode == 0, out.stderr
    assert "no conda packages to install" in out.stdout
    assert not prefix.exists()


def test_the_script_parses_as_python_3_8() -> None:
    ast.parse(SCRIPT.read_text(encoding="utf-8"), feature_version=(3, 8))


def test_packages_are_real_bz2_tarballs_with_executable_bin(tmp_path: Path) -> None:
    root = make_channel(tmp_path / "channel", [TOOL])
    repodata = json.loads((root / "noarch/repodata.json").read_text())
    assert list(repodata["packages"]) == ["tool-2.0-0.tar.bz2"]
    with tarfile.open(root / "noarch/tool-2.0-0.tar.bz2", "r:bz2") as tar:
        members = {m.name: m for m in tar.getmembers()}
    assert {"info/index.json", "info/paths.json", "info/files", "bin/tool"} <= set(members)
    assert members["bin/tool"].mode == 0o755


def test_a_python_pin_is_met_by_the_base_python_when_the_channels_have_none(tmp_path: Path, channel: str) -> None:
    import platform

    major_minor = ".".join(platform.python_version_tuple()[:2])
    out, prefix = _install(tmp_path, [channel], [f"python={major_minor}", "pip", "tool>=2"])
    assert out.returncode == 0, out.stderr
    assert f"the base image's Python {platform.python_version()} runs the environment" in out.stdout
    assert (prefix / "bin/tool").exists()
    (tmp_path / "old").mkdir()
    too_old, _ = _install(tmp_path / "old", [channel], ["python=2.7", "tool"])
    assert too_old.returncode == 2
    line = _one_error_line(too_old)
    assert "python=2.7" in line and "channels have no python" in line
