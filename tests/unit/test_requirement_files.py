"""pip lines that name local files: -r inlined, -c / --find-links / wheel paths sent by content."""

from __future__ import annotations

from pathlib import Path

import pytest
from dockyard import Environment
from dockyard._requirements import SPEC_MOUNT, localize_pip, read_requirements
from dockyard.errors import SpecError


def _project(root: Path) -> Path:
    (root / "reqs").mkdir(parents=True)
    (root / "wheels").mkdir()
    (root / "wheels" / "tiny-1.0-py3-none-any.whl").write_bytes(b"PK-not-really")
    (root / "reqs" / "base.txt").write_text("numpy==2.1.0  # pinned\n")
    (root / "reqs" / "constraints.txt").write_text("scipy<2\n")
    (root / "reqs" / "requirements.txt").write_text(
        "-r base.txt\n-c constraints.txt\n--find-links ../wheels\n../wheels/tiny-1.0-py3-none-any.whl\n")
    return root


def test_includes_are_inlined_and_local_files_sent_by_content(tmp_path):
    root = _project(tmp_path / "p")
    lines = read_requirements(root / "reqs" / "requirements.txt")
    assert lines[0] == "numpy==2.1.0"
    assert lines[1] == f"-c {root / 'reqs' / 'constraints.txt'}"
    done = localize_pip(lines, tmp_path, where=None)
    assert all(str(tmp_path) not in line for line in done.lines), "host paths never reach the build"
    assert done.lines[1].startswith(f"-c {SPEC_MOUNT}/files/") and done.lines[1].endswith("/constraints.txt")
    assert done.lines[2].startswith(f"--find-links {SPEC_MOUNT}/files/")
    assert done.lines[3].endswith("/tiny-1.0-py3-none-any.whl")
    assert set(done.files.values()) == {root / "reqs" / "constraints.txt", root / "wheels",
                                       root / "wheels" / "tiny-1.0-py3-none-any.whl"}


def _key(root: Path):
    spec = root / "env.yml"
    spec.write_text("name: r\npython:\n  pip_requirements_file: reqs/requirements.txt\n")
    return Environment.load(spec).content_key()


def test_the_key_follows_file_contents_not_where_the_project_lives(tmp_path):
    a = _project(tmp_path / "a")
    b = _project(tmp_path / "elsewhere" / "b")
    assert _key(a) == _key(b)
    (b / "reqs" / "constraints.txt").write_text("scipy<1.15\n")
    assert _key(a) != _key(b)
    (b / "reqs" / "constraints.txt").write_text("scipy<2\n")
    (b / "wheels" / "tiny-1.0-py3-none-any.whl").write_bytes(b"PK-rebuilt")
    assert _key(a) != _key(b)


def test_inline_lines_are_relative_to_the_environment_file(tmp_path):
    root = _project(tmp_path / "p")
    spec = root / "env.yml"
    spec.write_text("name: r\npython:\n  pip_requirements: ['-r reqs/base.txt', ./wheels/tiny-1.0-py3-none-any.whl]\n")
    env = Environment.load(spec)
    assert env.python.pip_requirements == ["numpy==2.1.0", str(root / "wheels" / "tiny-1.0-py3-none-any.whl")]
    assert Environment.from_dict(env.to_dict()).content_key() == env.content_key()


def test_missing_and_editable_files_are_clear_errors(tmp_path):
    (tmp_path / "requirements.txt").write_text("six\n-r other.txt\n")
    with pytest.raises(SpecError) as err:
        read_requirements(tmp_path / "requirements.txt")
    assert "other.txt" in err.value.message and err.value.path == str(tmp_path / "requirements.txt")
    (tmp_path / "requirements.txt").write_text("six\n./dist/pkg-1.0.tar.gz\n")
    with pytest.raises(SpecError) as missing:
        read_requirements(tmp_path / "requirements.txt")
    assert missing.value.line == 2 and "dockyard-spec" not in str(missing.value)
    (tmp_path / "pkg").mkdir()
    (tmp_path / "requirements.txt").write_text("-e ./pkg\n")
    with pytest.raises(SpecError, match="editable"):
        read_requirements(tmp_path / "requirements.txt")
    (tmp_path / "requirements.txt").write_text("-r requirements.txt\n")
    with pytest.raises(SpecError, match="include each other"):
        read_requirements(tmp_path / "requirements.txt")
