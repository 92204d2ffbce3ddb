"""`dockyard base bootstrap` against the real engine."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid

import pytest
from dockyard.build._base_images import (
    HOST_CA_BUNDLE,
    base_image_ref,
    bootstrap,
    host_suite,
    list_base_images,
    missing_certificates,
)

pytestmark = pytest.mark.engine


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dockyard", *args], capture_output=True, text=True, timeout=900)


def test_busybox_bootstrap_is_idempotent_and_runs(engine_resources):
    suite = f"t{uuid.uuid4().hex[:8]}"  # a private tag, so the real base image is never touched
    ref = engine_resources.track_image(base_image_ref("busybox", suite))
    lines: list[str] = []
    first = bootstrap("busybox", suite=suite, progress=lines.append)
    assert not first.existed and first.image_id.startswith("sha256:") and first.ref == ref
    assert any("tagged" in line for line in lines), "no progress reported"
    second = bootstrap("busybox", suite=suite)
    assert second.existed and second.flavor == "busybox" and second.suite == suite
    assert ref in {b.ref for b in list_base_images()}
    code, out = engine_resources.run(ref, ["sh", "-c", "echo hello-from-busybox; ls /tmp >/dev/null"])
    assert (code, out.strip()) == (0, "hello-from-busybox")
    forced = bootstrap("busybox", suite=suite, force=True)
    assert not forced.existed


def test_cli_bootstrap_twice_second_is_a_no_op(engine_resources):
    suite = f"t{uuid.uuid4().hex[:8]}"
    engine_resources.track_image(base_image_ref("busybox", suite))
    first = _cli("base", "bootstrap", "--flavor", "busybox", "--suite", suite, "--json")
    assert first.returncode == 0, first.stderr
    assert json.loads(first.stdout)["existed"] is False
    second = _cli("base", "bootstrap", "--flavor", "busybox", "--suite", suite, "--json")
    assert second.returncode == 0 and json.loads(second.stdout)["existed"] is True
    human = _cli("base", "bootstrap", "--flavor", "busybox", "--suite", suite)
    assert "already exists" in human.stdout


@pytest.fixture(scope="module")
def python_base() -> str:
    """The python flavor made by the README's set-up (made here if missing)."""
    if os.geteuid() != 0:
        pytest.skip("the python flavor needs root (debootstrap)")
    return bootstrap("python").ref


def test_python_flavor_has_ssl_venv_and_labels(python_base, engine_resources):
    (image,) = [b for b in list_base_images() if b.ref == python_base]
    assert image.flavor == "python" and image.suite == host_suite()
    assert {"python3", "python3-pip", "python3-venv", "ca-certificates"} <= set(image.packages)
    assert image.created
    code, out = engine_resources.run(python_base, ["python3", "-c", "import ssl, venv; print('ok')"])
    assert (code, out.strip()) == (0, "ok")


def test_python_flavor_trusts_every_host_certificate(python_base, engine_resources):
    code, bundle = engine_resources.run(python_base, ["cat", HOST_CA_BUNDLE])
    assert code == 0
    with open(HOST_CA_BUNDLE) as fh:
        assert missing_certificates(fh.read(), bundle) == []


def test_pip_download_works_inside_the_python_flavor(python_base, engine_resources):
    code, out = engine_resources.run(
        python_base, ["sh", "-c", "cd /tmp && python3 -m pip download --no-deps -q six && ls six-*.whl"]
    )
    assert code == 0, out
    assert "six-" in out
