"""The CLI's fast lane for `env build` hits must never serve a stale or missing image."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

pytestmark = pytest.mark.engine


def build(home: Path, spec: Path, **env: str) -> dict:
    out = subprocess.run([sys.executable, "-m", "dockyard", "env", "build", str(spec), "--json"],
                         capture_output=True, text=True, timeout=300,
                         env={**os.environ, "DOCKYARD_HOME": str(home), **env})
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def write_spec(tmp_path: Path, run_id: str) -> Path:
    spec = tmp_path / "env.yml"
    spec.write_text(f"name: fast\ndocker:\n  base_image: dockyard/base:bookworm-busybox\n  build_args:\n    RUN_ID: {run_id}\n")
    return spec


def test_fast_hit_matches_the_full_path_and_counts_the_hit(home: Path, tmp_path: Path, engine_resources):
    spec = write_spec(tmp_path, uuid.uuid4().hex)
    first = build(home, spec)
    engine_resources.track_image(first["image"])
    second = build(home, spec)
    assert second == {**first, "cached": True, "source": "local-hit", "seconds": second["seconds"]}
    stats = subprocess.run([sys.executable, "-m", "dockyard", "cache", "stats", "--json"], capture_output=True,
                           text=True, env={**os.environ, "DOCKYARD_HOME": str(home)}, timeout=60)
    assert json.loads(stats.stdout)["hits"] >= 1


def test_an_edited_spec_never_gets_the_old_image(home: Path, tmp_path: Path, engine_resources):
    spec = write_spec(tmp_path, uuid.uuid4().hex)
    first = build(home, spec)
    engine_resources.track_image(first["image"])
    spec.write_text(spec.read_text().replace("RUN_ID: ", "RUN_ID: x"))
    second = build(home, spec)
    engine_resources.track_image(second["image"])
    assert second["key"] != first["key"] and second["source"] == "built"


def test_a_deleted_image_is_rebuilt_not_reported(home: Path, tmp_path: Path, engine_resources):
    spec = write_spec(tmp_path, uuid.uuid4().hex)
    first = build(home, spec)
    engine_resources.track_image(first["image"])
    engine_resources.client.images.remove(first["image"], force=True)
    again = build(home, spec)
    assert again["key"] == first["key"] and again["source"] == "built"


def test_an_expired_resolution_takes_the_full_path(home: Path, tmp_path: Path, engine_resources):
    spec = write_spec(tmp_path, uuid.uuid4().hex)
    first = build(home, spec)
    engine_resources.track_image(first["image"])
    # TTL 0: the base must be resolved again; same base, so the same key and a hit.
    again = build(home, spec, DOCKYARD_RESOLVE_TTL="0")
    assert again["key"] == first["key"] and again["cached"] is True


def test_a_moved_base_tag_is_noticed_after_the_ttl(home: Path, tmp_path: Path, engine_resources):
    from dockyard.build._base_images import bootstrap

    suite = f"t{uuid.uuid4().hex[:8]}"
    base = bootstrap("busybox", suite=suite)
    engine_resources.track_image(base.ref)
    spec = tmp_path / "env.yml"
    spec.write_text(f"name: moved\ndocker:\n  base_image: {base.ref}\n")
    first = build(home, spec)
    engine_resources.track_image(first["image"])
    moved = bootstrap("busybox", suite=suite, force=True)  # same tag, new image (new created label)
    assert moved.image_id != base.image_id
    assert build(home, spec)["key"] == first["key"], "within the TTL the remembered digest is used"
    after = build(home, spec, DOCKYARD_RESOLVE_TTL="0")
    engine_resources.track_image(after["image"])
    assert after["key"] != first["key"] and after["source"] == "built"


def test_explain_names_what_changed_since_the_last_build(home: Path, tmp_path: Path, engine_resources):
    spec = write_spec(tmp_path, uuid.uuid4().hex)
    built = build(home, spec)
    engine_resources.track_image(built["image"])
    env = {**os.environ, "DOCKYARD_HOME": str(home)}
    explain = lambda: subprocess.run([sys.executable, "-m", "dockyard", "env", "key", str(spec), "--explain"],
                                     capture_output=True, text=True, env=env, timeout=60).stdout
    assert "no part changed" in explain()
    spec.write_text(spec.read_text().replace("RUN_ID: ", "RUN_ID: changed-"))
    out = explain()
    assert "changed build_args (docker.build_args)" in out and built["key"] in out
