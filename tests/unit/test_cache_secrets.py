"""Credentials in URLs never reach a key, a parts JSON, the index file or an error message."""

from __future__ import annotations

import json
import sqlite3
import traceback
from pathlib import Path

import pytest
from dockyard.cache import (
    BuildResult,
    CacheError,
    ContentKey,
    ImageCache,
    KeyParts,
    compute_key,
)

PASSWORD = "s3cr3tpass"
URL = f"https://user:{PASSWORD}@host/simple"


def _secret_parts() -> KeyParts:
    return KeyParts(
        "dockyard/base:bookworm-python3",
        pip=[f"--index-url {URL}", f"--extra-index-url={URL}", "numpy==2.1.0",
             f"private @ git+https://{PASSWORD}@git.example/org/private.git@v1"],
        conda={
            "name": "env",
            "channels": [f"https://user:{PASSWORD}@conda.example/private", "conda-forge",
                         f"https://conda.anaconda.org/t/{PASSWORD}/private"],
            "dependencies": ["python=3.11", {"pip": [f"--extra-index-url {URL}", "torch"]}],
            "variables": {"PIP_INDEX_URL": URL},
        },
        dockerfile=f"FROM scratch\nRUN pip install --index-url {URL} numpy\n",
        build_args={"PIP_EXTRA_INDEX_URL": URL},
        registry=f"user:{PASSWORD}@registry.example.com:5000",
    )


def _all_bytes(directory: Path) -> bytes:
    # The main file, its WAL and shared-memory files: everything SQLite wrote.
    return b"".join(p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file())


def test_the_password_is_in_no_key_no_parts_no_repr() -> None:
    parts = _secret_parts()
    key = compute_key(parts)
    assert PASSWORD not in repr(parts)
    assert PASSWORD not in json.dumps(key.to_json())
    assert PASSWORD not in repr(key) and PASSWORD not in str(key)
    # and the key is the one without credentials at all
    clean = KeyParts(
        parts.base_image,
        pip=[p.replace(f"user:{PASSWORD}@", "").replace(f"{PASSWORD}@", "") for p in _secret_parts().pip],
        conda=parts.conda, dockerfile=parts.dockerfile, build_args=parts.build_args,
        registry="registry.example.com:5000",
    )
    assert compute_key(clean) == key


def test_the_password_is_nowhere_in_the_index_file(tmp_path: Path) -> None:
    index_dir = tmp_path / "idx"
    cache = ImageCache(index_dir / "index.db")
    key = compute_key(_secret_parts())
    entry, built = cache.get_or_build(
        key, lambda k: BuildResult(image=f"dockyard/env:{k}", image_id="sha256:1")
    )
    assert built
    assert PASSWORD not in json.dumps(entry.to_json())
    cache.lookup(key)
    with cache.building(key) as slot:
        assert not slot.must_build
    rows = [e.to_json() for e in cache.entries()]
    assert rows and PASSWORD not in json.dumps(rows)
    # Dump every byte SQLite wrote, with the WAL still present and after a checkpoint.
    assert PASSWORD.encode() not in _all_bytes(index_dir)
    cache.close()
    conn = sqlite3.connect(index_dir / "index.db")
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    dump = "\n".join(conn.iterdump())
    conn.close()
    assert PASSWORD not in dump
    assert PASSWORD.encode() not in _all_bytes(index_dir)


@pytest.mark.parametrize(
    "bad",
    [
        lambda: KeyParts(f"busybox {URL}"),
        lambda: KeyParts("busybox", registry=f"user:{PASSWORD}@not a host"),
        lambda: KeyParts("busybox", build_args={"TOKEN": PASSWORD}),
        lambda: KeyParts("busybox", build_args={"URL": 3, "X": URL}),
        lambda: KeyParts("busybox", pip=f"--index-url {URL}"),
        lambda: KeyParts("busybox", pip=[URL, None]),
        lambda: KeyParts("busybox", conda={"channels": [URL], "dependencies": [URL, 5]}),
        lambda: KeyParts("busybox", conda={"channels": URL}),
        lambda: KeyParts("busybox", base_digest=URL),
        lambda: KeyParts("busybox", platform=URL),
        lambda: ContentKey.parse(URL),
        lambda: ImageCache("/tmp").lookup(URL),
    ],
)
def test_no_error_message_repeats_the_password(bad) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(CacheError) as info:
        bad()
    text = "".join(traceback.format_exception(info.value, chain=False))
    assert PASSWORD not in text
    assert PASSWORD not in repr(info.value.args) and PASSWORD not in info.value.hint
