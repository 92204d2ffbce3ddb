"""Source snapshots on real files: content addressing, ignore rules, links, budget, concurrency."""

from __future__ import annotations

import json
import multiprocessing
import os
import stat
from pathlib import Path

import pytest
from dockyard.errors import InputError, SnapshotTooLarge
from dockyard.runs._snapshot import MAX_MB_ENV, Snapshot, SnapshotStore


def write(root: Path, files: dict[str, str | bytes]) -> Path:
    for rel, content in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content, encoding="utf-8")
    return root


def blobs(store_root: Path) -> list[Path]:
    return sorted(p for p in (store_root / "blobs").rglob("*") if p.is_file())


def everything(store_root: Path) -> list[str]:
    return sorted(str(p.relative_to(store_root)) for p in store_root.rglob("*"))


def tree(root: Path) -> dict[str, str]:
    """Every path under ``root`` -> "dir", "link:<target>" or the file's text."""
    out: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath, name)
            rel = path.relative_to(root).as_posix()
            if path.is_symlink():
                out[rel] = "link:" + os.readlink(path)
            elif path.is_dir():
                out[rel] = "dir"
            else:
                out[rel] = path.read_text(encoding="utf-8", errors="replace")
    return out


def captured(store: SnapshotStore, source: Path, dest: Path) -> set[str]:
    """Paths of files and links that a snapshot of ``source`` gives back."""
    snap = store.take(source)
    store.materialize(snap.id, dest)
    return {rel for rel, what in tree(dest).items() if what != "dir"}


SOURCE = {"train.py": "print('train')\n", "lib/util.py": "X = 1\n", "lib/same.py": "X = 1\n", "README.md": "# r\n"}


# -- content addressing ----------------------------------------------------------------------------


def test_identical_trees_share_an_id_and_every_blob(tmp_path: Path):
    store = SnapshotStore(tmp_path / "store")
    a = store.take(write(tmp_path / "a", SOURCE))
    b = store.take(write(tmp_path / "b", SOURCE))
    assert a == b
    assert len(a.id) == 32 and a.id == a.id.lower() and int(a.id, 16) >= 0
    assert (a.files, a.total_bytes) == (4, sum(len(v) for v in SOURCE.values()))
    # four files, three distinct contents (util.py == same.py), one manifest for both trees
    assert len(blobs(tmp_path / "store")) == 3
    assert store.ids() == [a.id]
    assert store.get(a.id) == a


def test_one_byte_changed_gives_another_id_and_one_new_blob(tmp_path: Path):
    store = SnapshotStore(tmp_path / "store")
    first = store.take(write(tmp_path / "src", SOURCE))
    (tmp_path / "src" / "train.py").write_text("print('trail')\n")
    second = store.take(tmp_path / "src")
    assert second.id != first.id
    assert len(blobs(tmp_path / "store")) == 4
    assert store.ids() == sorted([first.id, second.id])


def test_a_renamed_file_or_an_exec_bit_changes_the_id(tmp_path: Path):
    store = SnapshotStore(tmp_path / "store")
    base = store.take(write(tmp_path / "a", {"x.py": "1"})).id
    renamed = store.take(write(tmp_path / "b", {"y.py": "1"})).id
    write(tmp_path / "c", {"x.py": "1"})
    (tmp_path / "c" / "x.py").chmod(0o755)
    executable = store.take(tmp_path / "c").id
    assert len({base, renamed, executable}) == 3
    assert len(blobs(tmp_path / "store")) == 1


def test_materialize_round_trips_the_tree_as_copies(tmp_path: Path):
    store = SnapshotStore(tmp_path / "store")
    src = write(tmp_path / "src", SOURCE)
    (src / "empty").mkdir()
    snap = store.take(src)
    out = store.materialize(snap.id, tmp_path / "run" / "wd")
    assert out == tmp_path / "run" / "wd"
    assert tree(out) == tree(src)
    # a run writing into its working directory must not reach the store
    (out / "lib" / "util.py").write_text("X = 2\n")
    again = store.materialize(snap.id, tmp_path / "again")
    assert (again / "lib" / "util.py").read_text() == "X = 1\n"
    assert (out / "lib" / "same.py").stat().st_ino != (again / "lib" / "same.py").stat().st_ino


def test_exec_bit_is_restored(tmp_path: Path):
    src = write(tmp_path / "src", {"run.sh": "#!/bin/sh\necho hi\n", "data.txt": "d"})
    (src / "run.sh").chmod(0o700)
    (src / "data.txt").chmod(0o600)
    store = SnapshotStore(tmp_path / "store")
    out = store.materialize(store.take(src).id, tmp_path / "out")
    assert stat.S_IMODE((out / "run.sh").stat().st_mode) == 0o755
    assert stat.S_IMODE((out / "data.txt").stat().st_mode) == 0o644


def test_unicode_names(tmp_path: Path):
    files = {"données/naïve_模型.py": "π = 3.14\n", "😀 emoji.txt": "smile", "Ω/ß/ﬁle": "x"}
    store = SnapshotStore(tmp_path / "store")
    snap = store.take(write(tmp_path / "src", files))
    assert snap.files == 3
    out = store.materialize(snap.id, tmp_path / "out")
    for rel, text in files.items():
        assert (out / rel).read_text(encoding="utf-8") == text


def test_empty_source_directory(tmp_path: Path):
    (tmp_path / "src").mkdir()
    store = SnapshotStore(tmp_path / "store")
    snap = store.take(tmp_path / "src")
    assert (snap.files, snap.total_bytes, snap.skipped) == (0, 0, ())
    assert snap.to_json() == {"id": snap.id, "files": 0, "links": 0, "total_bytes": 0, "skipped": []}
    out = store.materialize(snap.id, tmp_path / "out")
    assert out.is_dir() and list(out.iterdir()) == []


def test_to_json_is_plain_json(tmp_path: Path):
    store = SnapshotStore(tmp_path / "store")
    snap = store.take(write(tmp_path / "src", SOURCE))
    assert json.loads(json.dumps(snap.to_json())) == {
        "id": snap.id, "files": 4, "links": 0, "total_bytes": snap.total_bytes, "skipped": []
    }
    assert isinstance(store.get(snap.id), Snapshot)


# -- ignore rules --------------------------------------------------------------------------------


def test_git_directory_is_always_skipped(tmp_path: Path):
    src = write(tmp_path / "src", {
        "a.py": "a", ".git/HEAD": "ref", "sub/.git": "gitdir: ../x", ".gitignore": "!.git\n",
    })
    got = captured(SnapshotStore(tmp_path / "store"), src, tmp_path / "out")
    assert got == {"a.py", ".gitignore"}


def test_gitignore_semantics(tmp_path: Path):
    gitignore = "\n".join([
        "# a comment line, and a blank one follow",
        "",
        "*.log",
        "!keep.log",          # negation re-includes
        "build/",             # directories only, at any depth
        "/top.txt",           # anchored to the root
        "docs/**/*.tmp",      # ** spans zero or more folders
        "**/cache",           # leading ** matches at any depth
        "__pycache__/",
    ])
    src = write(tmp_path / "src", {
        ".gitignore": gitignore + "\n",
        "a.log": "", "keep.log": "", "deep/b.log": "", "deep/keep.log": "",
        "build/out.o": "", "deep/build/out.o": "", "files/build": "a file named build is kept",
        "top.txt": "", "deep/top.txt": "",
        "docs/a.tmp": "", "docs/x/y/b.tmp": "", "other/c.tmp": "", "docs/keep.md": "",
        "cache/c1": "", "deep/er/cache/c2": "", "cached.py": "",
        "pkg/__pycache__/m.pyc": "", "pkg/m.py": "",
        "# a comment line, and a blank one follow": "",
    })
    got = captured(SnapshotStore(tmp_path / "store"), src, tmp_path / "out")
    assert got == {
        ".gitignore", "keep.log", "deep/keep.log", "files/build", "deep/top.txt", "other/c.tmp",
        "docs/keep.md", "cached.py", "pkg/m.py", "# a comment line, and a blank one follow",
    }


def test_an_ignored_directory_cannot_be_reincluded_but_its_contents_can(tmp_path: Path):
    src = write(tmp_path / "src", {
        ".gitignore": "data/\n!data/small.csv\nlogs/*\n!logs/keep.txt\n",
        "data/small.csv": "", "data/big.csv": "", "logs/keep.txt": "", "logs/run.txt": "",
    })
    got = captured(SnapshotStore(tmp_path / "store"), src, tmp_path / "out")
    assert got == {".gitignore", "logs/keep.txt"}  # as git: data/ is excluded whole


def test_nested_gitignore_files_apply_below_their_folder_and_win_there(tmp_path: Path):
    src = write(tmp_path / "src", {
        ".gitignore": "*.log\n",
        "sub/.gitignore": "!wanted.log\nlocal.txt\n/anchored.txt\n",
        "a.log": "", "wanted.log": "", "local.txt": "", "anchored.txt": "",
        "sub/wanted.log": "", "sub/other.log": "", "sub/local.txt": "", "sub/anchored.txt": "",
        "sub/deeper/anchored.txt": "", "sub/deeper/local.txt": "",
    })
    got = captured(SnapshotStore(tmp_path / "store"), src, tmp_path / "out")
    assert got == {
        ".gitignore", "sub/.gitignore", "local.txt", "anchored.txt", "sub/wanted.log", "sub/deeper/anchored.txt",
    }


def test_amlignore_wins_over_gitignore(tmp_path: Path):
    src = write(tmp_path / "src", {
        ".gitignore": "*.py\n", ".amlignore": "*.txt\n", "sub/.gitignore": "*.md\n",
        "a.py": "", "a.txt": "", "sub/b.md": "", "sub/b.txt": "",
    })
    got = captured(SnapshotStore(tmp_path / "store"), src, tmp_path / "out")
    assert got == {".gitignore", ".amlignore", "sub/.gitignore", "a.py", "sub/b.md"}


# -- links and special files -----------------------------------------------------------------------


def test_symlinks_outside_are_skipped_and_not_followed(tmp_path: Path):
    outside = write(tmp_path / "outside", {"secret.txt": "do not copy me"})
    src = write(tmp_path / "src", {"a.py": "a"})
    (src / "passwd").symlink_to("/etc/passwd")
    (src / "outdir").symlink_to(outside)
    (src / "relout").symlink_to("../outside/secret.txt")
    (src / "sub").mkdir()
    (src / "sub" / "up").symlink_to("../../outside")
    store = SnapshotStore(tmp_path / "store")
    snap = store.take(src)
    assert snap.skipped == ("outdir", "passwd", "relout", "sub/up")
    assert (snap.files, snap.links) == (1, 0)
    assert len(blobs(tmp_path / "store")) == 1
    for blob in blobs(tmp_path / "store"):
        assert b"do not copy me" not in blob.read_bytes() and b"root:" not in blob.read_bytes()
    out = store.materialize(snap.id, tmp_path / "out")
    assert set(tree(out)) == {"a.py", "sub"}


def test_symlinks_inside_are_kept_as_links(tmp_path: Path):
    src = write(tmp_path / "src", {"sub/a.py": "A", "sub/b.py": "B"})
    (src / "to_file").symlink_to("sub/a.py")
    (src / "to_dir").symlink_to("sub")
    (src / "absolute").symlink_to(src / "sub" / "b.py")  # rewritten relative, so it still points inside
    (src / "sub" / "sibling").symlink_to("a.py")
    (src / "dangling").symlink_to("not/there")
    store = SnapshotStore(tmp_path / "store")
    snap = store.take(src)
    assert (snap.files, snap.links, snap.skipped) == (2, 5, ())  # to_dir was not entered
    out = store.materialize(snap.id, tmp_path / "out")
    links = {rel: what for rel, what in tree(out).items() if what.startswith("link:")}
    assert links == {
        "to_file": "link:sub/a.py", "to_dir": "link:sub", "absolute": "link:sub/b.py",
        "sub/sibling": "link:a.py", "dangling": "link:not/there",
    }
    assert (out / "to_dir" / "a.py").read_text() == "A"
    assert (out / "absolute").read_text() == "B"


def test_special_files_are_skipped(tmp_path: Path):
    src = write(tmp_path / "src", {"a.py": "a"})
    os.mkfifo(src / "pipe")
    snap = SnapshotStore(tmp_path / "store").take(src)
    assert (snap.files, snap.skipped) == (1, ("pipe",))


# -- budget --------------------------------------------------------------------------------------


def test_oversized_source_names_the_largest_files_and_writes_nothing(tmp_path: Path):
    store_root = tmp_path / "store"
    store = SnapshotStore(store_root)
    store.take(write(tmp_path / "small", {"a.py": "a"}))
    before = everything(store_root)
    sizes = {"weights/model.ckpt": 6000, "data/train.csv": 5000, "b.bin": 4000, "c.bin": 3000, "d.bin": 2000,
             "tiny_not_listed.py": 10}
    src = write(tmp_path / "src", {rel: b"x" * n for rel, n in sizes.items()})
    with pytest.raises(SnapshotTooLarge) as info:
        store.take(src, max_bytes=10_000)
    err = info.value
    assert isinstance(err, InputError) and err.exit_code == 2
    assert err.total_bytes == sum(sizes.values()) and err.max_bytes == 10_000
    assert [p for p, _ in err.largest] == ["weights/model.ckpt", "data/train.csv", "b.bin", "c.bin", "d.bin"]
    for rel in ("weights/model.ckpt (5.9 KiB)", "data/train.csv", "b.bin", "c.bin", "d.bin", "20010 bytes"):
        assert rel in err.message
    assert "tiny_not_listed.py" not in err.message
    assert ".amlignore" in err.hint and ".gitignore" in err.hint and MAX_MB_ENV in err.hint
    assert everything(store_root) == before


def test_budget_from_the_environment_and_an_explicit_one_wins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    src = write(tmp_path / "src", {"big.bin": b"x" * 3 * 1024**2})
    store = SnapshotStore(tmp_path / "store")
    monkeypatch.setenv(MAX_MB_ENV, "2")
    with pytest.raises(SnapshotTooLarge, match=r"3\.0 MiB"):
        store.take(src)
    assert store.take(src, max_bytes=4 * 1024**2).total_bytes == 3 * 1024**2
    monkeypatch.setenv(MAX_MB_ENV, "3.5")
    assert store.take(src).files == 1
    monkeypatch.setenv(MAX_MB_ENV, "lots")
    with pytest.raises(InputError, match=MAX_MB_ENV):
        store.take(src)


def test_ignored_files_do_not_count_against_the_budget(tmp_path: Path):
    src = write(tmp_path / "src", {".amlignore": "*.ckpt\n", "model.ckpt": b"x" * 5000, "a.py": "a"})
    snap = SnapshotStore(tmp_path / "store").take(src, max_bytes=1000)
    assert snap.files == 2


# -- bad input -------------------------------------------------------------------------------------


def test_missing_or_file_source_names_the_path(tmp_path: Path):
    store = SnapshotStore(tmp_path / "store")
    with pytest.raises(InputError, match="does not exist") as info:
        store.take(tmp_path / "nope")
    assert str(tmp_path / "nope") in info.value.message
    (tmp_path / "file.py").write_text("x")
    with pytest.raises(InputError, match="not a directory"):
        store.take(tmp_path / "file.py")


def test_materialize_into_a_non_empty_folder_is_refused(tmp_path: Path):
    store = SnapshotStore(tmp_path / "store")
    snap = store.take(write(tmp_path / "src", SOURCE))
    dest = write(tmp_path / "dest", {"already.txt": "mine"})
    with pytest.raises(InputError, match="not empty"):
        store.materialize(snap.id, dest)
    assert tree(dest) == {"already.txt": "mine"}
    with pytest.raises(InputError, match="not a directory"):
        store.materialize(snap.id, dest / "already.txt")
    (tmp_path / "empty").mkdir()
    assert tree(store.materialize(snap.id, tmp_path / "empty")) == tree(tmp_path / "src")


def test_unknown_or_malformed_ids(tmp_path: Path):
    store = SnapshotStore(tmp_path / "store")
    with pytest.raises(InputError, match="no snapshot"):
        store.get("0" * 32)
    with pytest.raises(InputError, match="no snapshot"):
        store.materialize("0" * 32, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with pytest.raises(InputError, match="not a snapshot id"):
        store.get("../../etc/passwd")
    assert store.ids() == []


def test_a_damaged_blob_is_caught_on_materialize_and_healed_by_take(tmp_path: Path):
    store = SnapshotStore(tmp_path / "store")
    src = write(tmp_path / "src", {"a.py": "print('a')\n"})
    snap = store.take(src)
    (blob,) = blobs(tmp_path / "store")
    blob.chmod(0o644)
    blob.write_text("print('b')\n")  # same size, other bytes
    with pytest.raises(InputError, match="damaged"):
        store.materialize(snap.id, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    blob.write_text("")  # truncated, as a crash could leave it
    assert store.take(src) == snap
    assert tree(store.materialize(snap.id, tmp_path / "out")) == {"a.py": "print('a')\n"}


# -- concurrency -----------------------------------------------------------------------------------


def _take_in_child(store_root: str, source: str, barrier, results) -> None:  # type: ignore[no-untyped-def]
    barrier.wait()
    results.put(SnapshotStore(store_root).take(source).id)


def test_two_processes_take_the_same_tree_at_once(tmp_path: Path):
    files = {f"pkg{i % 7}/m{i}.py": f"V = {i}\n" * (i % 50 + 1) for i in range(300)}
    files.update({f"copy{i}.txt": "same content\n" for i in range(20)})
    src = write(tmp_path / "src", files)
    ctx = multiprocessing.get_context("fork")
    barrier, results = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_take_in_child, args=(str(tmp_path / "store"), str(src), barrier, results))
             for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0]
    ids = {results.get(timeout=5), results.get(timeout=5)}
    assert len(ids) == 1
    store = SnapshotStore(tmp_path / "store")
    assert store.ids() == list(ids)
    assert len(blobs(tmp_path / "store")) == 301
    assert not [p for p in (tmp_path / "store").rglob(".tmp-*")]
    assert tree(store.materialize(ids.pop(), tmp_path / "out")) == tree(src)
