"""`dockyard cache ls|stats|gc|pin` against real images in the real engine."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from dockyard.dockerd import EngineClient

pytestmark = pytest.mark.engine


def cli(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dockyard", *args], capture_output=True, text=True,
                          env={**os.environ, "DOCKYARD_HOME": str(home)}, timeout=300)


def build(home: Path, tmp_path: Path) -> dict:
    spec = tmp_path / f"{uuid.uuid4().hex}.yml"
    spec.write_text(f"name: gc\ndocker:\n  base_image: dockyard/base:bookworm-busybox\n  build_args:\n    RUN_ID: {uuid.uuid4().hex}\n")
    out = cli(home, "env", "build", str(spec), "--json")
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_gc_removes_unpinned_images_and_keeps_pinned(home: Path, tmp_path: Path, engine_resources):
    engine = EngineClient.from_env()
    a, b = build(home, tmp_path), build(home, tmp_path)
    for img in (a, b):
        engine_resources.track_image(img["image"])
    stats = json.loads(cli(home, "cache", "stats", "--json").stdout)
    assert stats["entries"] == 2

    assert cli(home, "cache", "pin", a["key"]).returncode == 0
    dry = json.loads(cli(home, "cache", "gc", "--keep-bytes", "0", "--dry-run", "--json").stdout)
    assert [e["key"] for e in dry["removed"]] == [b["key"]] and dry["dry_run"] is True
    assert engine.image_labels(b["image"]) is not None, "dry run removed an image"

    report = json.loads(cli(home, "cache", "gc", "--keep-bytes", "0", "--json").stdout)
    assert [e["key"] for e in report["removed"]] == [b["key"]]
    assert engine.image_labels(b["image"]) is None, "gc left the image in the engine"
    assert engine.image_labels(a["image"]) is not None, "gc removed a pinned image"
    listed = json.loads(cli(home, "cache", "ls", "--json").stdout)["images"]
    assert [e["key"] for e in listed] == [a["key"]] and listed[0]["pinned"] is True
    assert listed[0]["name"] == "gc", "the listing names the environment it was built as"
    table = cli(home, "cache", "ls").stdout.splitlines()
    assert table[0].split()[:2] == ["KEY", "NAME"] and table[1].split()[:2] == [a["key"], "gc"]


def test_gc_never_removes_an_image_a_container_uses(home: Path, tmp_path: Path, engine_resources):
    img = build(home, tmp_path)
    engine_resources.track_image(img["image"])
    container = engine_resources.client.containers.create(img["image"], ["true"])
    engine_resources.containers.append(container.id)
    report = json.loads(cli(home, "cache", "gc", "--keep-bytes", "0", "--json").stdout)
    assert report["removed"] == [] and report["kept"] == 1


def test_pin_unknown_key_is_usage_error(home: Path):
    out = cli(home, "cache", "pin", "0" * 32)
    assert out.returncode == 2 and "no cached image" in out.stderr
