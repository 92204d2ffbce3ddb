"""Build contexts: Docker's .dockerignore rules, what a Dockerfile reads, and what enters the key."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from dockyard import Environment
from dockyard._context import IgnoreRules, collect_context, dockerfile_sources
from dockyard.core.environment import DockerBuildContext
from dockyard.errors import SpecError

BASE = "dockyard/base:bookworm-python3"


@pytest.mark.parametrize(
    ("patterns", "path", "ignored"),
    [
        ("*.txt", "a.txt", True),
        ("*.txt", "sub/a.txt", False),  # "*" never crosses "/": root only, unlike .gitignore
        ("**/*.pyc", "a/b/c.pyc", True),
        ("**/*.pyc", "c.pyc", True),
        ("data", "data/x/y.bin", True),  # a folder pattern excludes what is inside
        ("/data", "data/y.bin", True),  # a leading slash is the root, as without it
        ("data\n!data/keep.txt", "data/keep.txt", False),
        ("data\n!data/keep.txt", "data/other.txt", True),
        ("!a.txt\n*.txt", "a.txt", True),  # the last matching line wins
        ("# comment\n\n  x  ", "x", True),
        ("sub/*/z", "sub/q/z", True),
        ("sub/*/z", "sub/q/r/z", False),
        ("fil?.md", "file.md", True),
        ("[ab].md", "b.md", True),
        ("./build/../dist", "dist/app", True),  # patterns are cleaned like paths
    ],
)
def test_dockerignore_follows_docker_rules(patterns, path, ignored):
    assert IgnoreRules.parse(patterns).ignored(path) is ignored


@pytest.mark.parametrize(
    ("dockerfile", "sources"),
    [
        ("FROM x\nRUN true\n", []),
        ("FROM x\nCOPY hello.txt /h\n", ["hello.txt"]),
        ("FROM x\nCOPY --chown=1:1 a b /dst/\n", ["a", "b"]),
        ('FROM x\nCOPY ["with space.txt", "/d"]\n', ["with space.txt"]),
        ("FROM x AS b\nFROM y\nCOPY --from=b /x /x\n", []),
        ("FROM x\nADD https://example.invalid/f.tgz /f\nADD ./src/ /src\n", ["src"]),
        ("FROM x\nRUN --mount=type=bind,source=req.txt,target=/r pip install -r /r\n", ["req.txt"]),
        ("FROM x\nRUN --mount=type=bind,target=/ctx ls /ctx\n", ["."]),
        ("FROM x\nRUN --mount=type=cache,target=/c true\n", []),
        ("FROM x\nCOPY . /app\n", ["."]),
        ("FROM x\nCOPY \\\n  a.txt \\\n  /a\n", ["a.txt"]),
        ("FROM x\nARG D\nCOPY $D /d\n", None),  # unknown before the build: the whole context
        ("FROM x\nONBUILD COPY . /\n", None),
    ],
)
def test_the_sources_a_dockerfile_reads(dockerfile, sources):
    assert dockerfile_sources(dockerfile) == sources


def _ctx(tmp_path: Path, dockerfile: str, files: dict[str, str]) -> Path:
    root = tmp_path / "ctx"
    root.mkdir(exist_ok=True)
    (root / "Dockerfile").write_text(dockerfile)
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root


def _digest(root: Path, **kw) -> str | None:
    found = collect_context(root, (root / "Dockerfile").read_text(), dockerfile_rel="Dockerfile", where=None, **kw)
    return None if found is None else found.digest


def test_only_what_the_dockerfile_copies_is_in_the_digest(tmp_path):
    root = _ctx(tmp_path, f"FROM {BASE}\nCOPY hello.txt /hello.txt\nCOPY conf/ /conf/\n",
                {"hello.txt": "hi", "conf/a.ini": "a=1", "train.py": "print(1)", "data/big.bin": "x" * 100})
    first = _digest(root)
    (root / "train.py").write_text("print(2)")  # not copied: no rebuild
    (root / "data" / "big.bin").write_text("y")
    assert _digest(root) == first
    (root / "conf" / "a.ini").write_text("a=2")  # copied: a new key
    second = _digest(root)
    assert second != first
    os.chmod(root / "hello.txt", 0o755)  # the mode is content too (COPY keeps it)
    assert _digest(root) not in (first, second)
    entries = collect_context(root, (root / "Dockerfile").read_text(), dockerfile_rel="Dockerfile", where=None).entries
    assert {e.rel for e in entries} == {"hello.txt", "conf", "conf/a.ini"}


def test_dockerignore_removes_files_from_the_digest_and_a_dockerfile_that_reads_nothing_has_none(tmp_path):
    root = _ctx(tmp_path, f"FROM {BASE}\nCOPY . /app\n", {"a.py": "1", "cache/x.pyc": "2"})
    with_cache = _digest(root)
    (root / ".dockerignore").write_text("cache\n")
    without = _digest(root)
    assert without != with_cache
    (root / "cache" / "x.pyc").write_text("3")
    assert _digest(root) == without
    (root / "Dockerfile").write_text(f"FROM {BASE}\nRUN true\n")
    assert _digest(root) is None


def test_a_dockerignore_that_excludes_the_dockerfile_is_a_clear_error(tmp_path):
    root = _ctx(tmp_path, f"FROM {BASE}\nCOPY . /\n", {".dockerignore": "*\n!src\n"})
    with pytest.raises(SpecError) as err:
        _digest(root)
    assert "excludes the Dockerfile" in err.value.message and "!Dockerfile" in err.value.hint


def test_a_context_over_the_limit_lists_its_largest_files(tmp_path):
    root = _ctx(tmp_path, f"FROM {BASE}\nCOPY . /\n", {"small.txt": "s"})
    (root / "weights.pt").write_bytes(b"w" * 5000)
    (root / "frames.npy").write_bytes(b"f" * 3000)
    with pytest.raises(SpecError) as err:
        _digest(root, limit=4096)
    message = err.value.message
    assert "over the 4.0 KiB limit" in message and message.index("weights.pt") < message.index("frames.npy")
    assert ".dockerignore" in err.value.hint and "DOCKYARD_MAX_CONTEXT" in err.value.hint


def test_a_dockerfile_path_makes_its_folder_the_context_of_the_key(tmp_path):
    root = _ctx(tmp_path, f"FROM {BASE}\nCOPY hello.txt /hello.txt\n", {"hello.txt": "hi"})
    spec = tmp_path / "env.yml"
    spec.write_text("name: c\ndocker:\n  base_dockerfile: ctx/Dockerfile\n")
    env = Environment.load(spec)
    key = env.content_key()
    assert "context" in key.parts
    (tmp_path / "outside.txt").write_text("not in the context")
    assert Environment.load(spec).content_key() == key
    (root / "hello.txt").write_text("hello")
    assert Environment.load(spec).content_key() != key
    # The same Dockerfile as text has no context: its key is the context-free one.
    text = Environment("c")
    text.docker.base_dockerfile = (root / "Dockerfile").read_text()
    assert "context" not in text.content_key().parts


def test_from_docker_build_context_and_its_file_form_agree_and_survive_a_round_trip(tmp_path, monkeypatch):
    root = _ctx(tmp_path, f"FROM {BASE}\nCOPY a.txt /a\n", {"a.txt": "a"})
    (root / "Dockerfile").rename(root / "train.Dockerfile")
    env = Environment.from_docker_build_context(
        "ctx", DockerBuildContext.from_local_directory(None, root, dockerfile_path="train.Dockerfile"))
    spec = tmp_path / "env.yml"
    spec.write_text("name: ctx\ndocker:\n  build_context:\n    path: ctx\n    dockerfile_path: train.Dockerfile\n")
    loaded = Environment.load(spec)
    assert loaded.content_key() == env.content_key()
    monkeypatch.chdir(tmp_path / "ctx")  # the stored form means the same from anywhere
    again = Environment.from_dict(env.to_dict())
    assert again.content_key() == env.content_key() and again.to_dict()["docker"]["build_context"]["path"] == str(root)


def test_build_context_bad_inputs(tmp_path):
    with pytest.raises(SpecError, match="not a folder"):
        DockerBuildContext.from_local_directory(None, tmp_path / "missing")
    (tmp_path / "ctx").mkdir()
    with pytest.raises(SpecError) as err:
        DockerBuildContext.from_local_directory(None, tmp_path / "ctx")
    assert "Dockerfile 'Dockerfile' not found" in err.value.message
    spec = tmp_path / "env.yml"
    spec.write_text("name: x\ndocker:\n  build_context:\n    path: nope\n")
    with pytest.raises(SpecError) as bad:
        Environment.load(spec)
    assert bad.value.line == 4 and bad.value.field == "docker.build_context.path"
    spec.write_text(f"name: x\ndocker:\n  base_image: {BASE}\n  build_context:\n    path: ctx\n")
    (tmp_path / "ctx" / "Dockerfile").write_text("FROM x\n")
    with pytest.raises(SpecError, match=r"both docker\.build_context"):
        Environment.load(spec)
