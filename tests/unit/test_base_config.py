"""Pure parts of base bootstrap: the mirror from apt's configuration, certificates, static ELF."""

from __future__ import annotations

from pathlib import Path

import pytest
from dockyard.build._base_images import (
    _is_static_elf,
    base_image_ref,
    find_mirror,
    host_suite,
    missing_certificates,
)
from dockyard.errors import InputError


def _apt(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / "etc/apt" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def test_mirror_from_one_line_sources(tmp_path: Path):
    root = _apt(
        tmp_path,
        {
            "sources.list": "# comment\ndeb-src http://src.invalid/debian bookworm main\n"
            "deb [arch=amd64 signed-by=/k.gpg] http://mirror.invalid/debian bookworm main\n"
        },
    )
    assert find_mirror("bookworm", root=root) == "http://mirror.invalid/debian"


def test_mirror_from_deb822_skips_disabled_and_security(tmp_path: Path):
    root = _apt(
        tmp_path,
        {
            "sources.list.d/debian.sources": (
                "Types: deb\nURIs: http://off.invalid/debian\nSuites: bookworm\nEnabled: no\n\n"
                "Types: deb\nURIs: http://sec.invalid/debian-security\nSuites: bookworm-security\n\n"
                "Types: deb deb-src\nURIs: http://on.invalid/debian\nSuites: bookworm bookworm-updates\n"
                "Components: main\n"
            )
        },
    )
    assert find_mirror("bookworm", root=root) == "http://on.invalid/debian"
    # Another suite: fall back to the release archive, never the security one.
    assert find_mirror("trixie", root=root) == "http://on.invalid/debian"


def test_no_mirror_is_an_input_error_naming_the_flag(tmp_path: Path):
    root = _apt(tmp_path, {"sources.list": "deb http://sec.invalid/debian-security bookworm-security main\n"})
    with pytest.raises(InputError) as info:
        find_mirror("bookworm", root=root)
    assert "--mirror" in info.value.hint


def test_host_suite(tmp_path: Path):
    rel = tmp_path / "os-release"
    rel.write_text('NAME="Debian GNU/Linux"\nVERSION_CODENAME=trixie\n')
    assert host_suite(str(rel)) == "trixie"
    assert host_suite(str(tmp_path / "absent")) == "bookworm"


def test_refs():
    assert base_image_ref("python", "bookworm") == "dockyard/base:bookworm-python3"
    assert base_image_ref("busybox", "bookworm") == "dockyard/base:bookworm-busybox"


CERT_A = "-----BEGIN CERTIFICATE-----\nAAAA\nBBBB\n-----END CERTIFICATE-----\n"
CERT_B = "-----BEGIN CERTIFICATE-----\nCCCC\n-----END CERTIFICATE-----\n"


def test_missing_certificates_ignores_whitespace_and_duplicates():
    present = CERT_A.replace("\n", "\r\n")
    assert missing_certificates(CERT_A + CERT_B + CERT_B, present) == [CERT_B]
    assert missing_certificates(CERT_A, CERT_A + CERT_B) == []


def test_static_elf_detection(tmp_path: Path):
    assert not _is_static_elf(Path("/bin/sh"))  # dynamically linked on Debian
    not_elf = tmp_path / "x"
    not_elf.write_text("#!/bin/sh\n")
    assert not _is_static_elf(not_elf)
    if Path("/bin/busybox").exists() and Path("/usr/share/doc/busybox-static").exists():
        assert _is_static_elf(Path("/bin/busybox"))
