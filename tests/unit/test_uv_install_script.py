"""engine/build/uv_install.py installs pip requirements with uv, as it does inside a build.

The pure parts are tested directly; the script itself runs as a subprocess with this interpreter and
the ``uv`` binary dockyard is installed with, offline (``--no-index --find-links`` of wheels made
here), into temporary prefixes: a clean venv, a near miss of it, a damaged download cache, a
requirement that does not resolve.
"""

from __future__ import annotations

import base64
import hashlib
import io
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from dockyard.build import uv_install as script
from dockyard.build._tools import uv_binary

SCRIPT = Path(script.__file__).resolve()
NO_SOLUTION = (
    "Using Python 3.11.2 environment at: /opt/e\n"
    "error: No solution found when resolving dependencies:\n"
    "  cause: Because there is no version of six==0.0.999 and you require six==0.0.999, we can conclude that "
    "your requirements are unsatisfiable.\n"
)


def test_a_resolver_failure_becomes_its_own_one_line_cause() -> None:
    line = script.shorten(NO_SOLUTION)
    assert line.startswith("Because there is no version of six==0.0.999") and "\n" not in line
    assert script.is_spec_error(NO_SOLUTION)
    assert not script.is_spec_error("error: Failed to initialize cache at `/c`\n  cause: File exists (os error 17)")


def test_options_uv_reads_only_on_its_command_line_move_there_and_unsupported_ones_are_named() -> None:
    lines = ["--pre", "--trusted-host example.org", "--index-url=https://example.org/simple", "six"]
    kept, args = script.split_options(lines)
    assert kept == ["--index-url=https://example.org/simple", "six"]
    assert args == ["--prerelease", "allow", "--allow-insecure-host", "example.org"]
    assert script.unsupported_lines(["six", "--prefer-binary", "--use-feature=fast-deps"]) == [
        "--prefer-binary", "--use-feature=fast-deps"]
    assert script.unsupported_lines(lines) == []


def test_pip_variables_map_onto_uvs_and_pip_configuration_means_pip(tmp_path: Path) -> None:
    environ = {"PIP_CONFIG_FILE": os.devnull, "PIP_INDEX_URL": "https://mirror.example/simple",
               "PIP_EXTRA_INDEX_URL": "https://a.example/simple  https://b.example/simple",
               "PIP_FIND_LINKS": "/w1 /w2", "PIP_NO_INDEX": "0", "PIP_CERT": "/ca.pem",
               "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    settings, why = script.pip_settings(environ, str(tmp_path))
    assert why == "" and settings == {
        "UV_DEFAULT_INDEX": "https://mirror.example/simple",
        "UV_INDEX": "https://a.example/simple https://b.example/simple",
        "UV_FIND_LINKS": "/w1,/w2", "SSL_CERT_FILE": "/ca.pem"}
    config = tmp_path / "pip.conf"
    config.write_text("[global]\nindex-url = https://mirror.example/simple\n")
    settings, why = script.pip_settings({"PIP_CONFIG_FILE": str(config)}, str(tmp_path))
    assert settings is None and str(config) in why
    settings, why = script.pip_settings({"PIP_CONFIG_FILE": os.devnull, "PIP_USE_PEP517": "1"}, str(tmp_path))
    assert settings is None and "PIP_USE_PEP517" in why


def _installed(root: Path, files: dict[str, bytes]) -> Path:
    """A dist-info with a RECORD of ``files`` (their real hashes) under ``root``."""
    dist = root / "pkg-1.0.dist-info"
    dist.mkdir(parents=True)
    rows = []
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        rows.append(f"{rel},sha256={digest},{len(data)}")
    (dist / "RECORD").write_text("\n".join([*rows, "pkg-1.0.dist-info/RECORD,,", "pkg/__pycache__/x.pyc,,"]) + "\n")
    return dist


def test_installed_files_are_checked_against_their_record(tmp_path: Path) -> None:
    dist = _installed(tmp_path, {"pkg/__init__.py": b"X = 1\n", "pkg/data.bin": b"\0" * 1000})
    assert script.damaged_files(str(dist)) == []
    (tmp_path / "pkg/data.bin").write_bytes(b"\0" * 10)  # truncated
    (tmp_path / "pkg/__init__.py").write_bytes(b"X = 2\n")  # same size, other bytes
    assert sorted(script.damaged_files(str(dist))) == ["pkg/__init__.py", "pkg/data.bin"]
    assert script.project_of(str(dist)) == "pkg"


def test_bytecode_is_compiled_for_everything_but_the_packages_own_test_suites(tmp_path: Path) -> None:
    site = tmp_path / "tests" / "site-packages"  # only folders below the site directory count
    sources = {"pkg/__init__.py": "X = 1\n", "pkg/sub/mod.py": "Y = 2\n", "pkg/testing/helpers.py": "Z = 3\n",
               "pkg/test_util.py": "W = 4\n", "pkg/tests/test_a.py": "assert True\n",
               "pkg/sub/test/test_b.py": "assert True\n", "pkg/old.py": "print 'python 2'\n"}
    for rel, text in sources.items():
        (site / rel).parent.mkdir(parents=True, exist_ok=True)
        (site / rel).write_text(text)
    script.compile_bytecode(sys.executable, [str(site)])
    compiled = {p.parent.parent.relative_to(site).as_posix() + "/" + p.name.split(".")[0] + ".py"
                for p in site.rglob("*.pyc")}
    assert compiled == {"pkg/__init__.py", "pkg/sub/mod.py", "pkg/testing/helpers.py", "pkg/test_util.py"}
    # What is compiled is what Python itself would write: an import uses it (no recompiling).
    pyc = next(site.rglob("mod.*.pyc"))
    before = pyc.stat().st_mtime_ns
    subprocess.run([sys.executable, "-c", "import pkg.sub.mod"], cwd=site, check=True, timeout=60)
    assert pyc.stat().st_mtime_ns == before
    # Compiled already: left alone; only the given paths when paths are given.
    script.compile_bytecode(sys.executable, [str(site)], [str(site / "pkg/sub")])
    assert pyc.stat().st_mtime_ns == before


def test_bytecode_work_is_shared_out_by_bytes_and_a_missing_interpreter_is_said(tmp_path: Path,
                                                                             capsys: pytest.CaptureFixture[str]) -> None:
    files = [(size, f"f{size}.py") for size in (900, 500, 400, 300, 100, 100)]
    shares = script.share_out(files, 2)
    assert sorted(p for share in shares for p in share) == sorted(p for _, p in files), "every file once"
    assert sorted(sum(int(p[1:-3]) for p in share) for share in shares) == [1100, 1200], "about equal bytes"
    assert script.share_out(files[:1], 4) == [["f900.py"]], "no empty share"
    site = tmp_path / "site-packages"
    (site / "pkg").mkdir(parents=True)
    (site / "pkg/__init__.py").write_text("X = 1\n")
    script.compile_bytecode(str(tmp_path / "no-such-python"), [str(site)])
    assert "some modules were left without bytecode (cannot start" in capsys.readouterr().out
    assert not (site / "pkg/__pycache__").exists()


def test_compiled_modules_are_kept_by_their_source_and_a_damaged_entry_is_not_used(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cache = tmp_path / "cache"
    sources = {"pkg/__init__.py": "X = 1\n", "pkg/mod.py": "def f():\n    return 2\n"}
    sites = []
    for name in ("one", "two", "three"):
        site = tmp_path / name / "site-packages"
        for rel, text in sources.items():
            (site / rel).parent.mkdir(parents=True, exist_ok=True)
            (site / rel).write_text(text)
        sites.append(site)
    script.compile_bytecode(sys.executable, [str(sites[0])], cache=str(cache))
    assert "0 modules from the bytecode cache, 2 compiled" in capsys.readouterr().out
    script.compile_bytecode(sys.executable, [str(sites[1])], cache=str(cache))
    assert "2 modules from the bytecode cache, 0 compiled" in capsys.readouterr().out
    # What came from the store is what Python itself would write: an import uses it, the path is its own.
    pyc = next(sites[1].rglob("mod.*.pyc"))
    before = pyc.stat().st_mtime_ns
    out = subprocess.run([sys.executable, "-c", "import pkg.mod; print(pkg.mod.f(), pkg.mod.f.__code__.co_filename)"],
                         cwd=sites[1], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.split() == ["2", str(sites[1] / "pkg/mod.py")] and pyc.stat().st_mtime_ns == before
    # An entry cut short is not used: the module is compiled again (and the entry written anew).
    for entry in (cache / script.BYTECODE_STORE).rglob("*"):
        if entry.is_file():
            entry.write_bytes(entry.read_bytes()[:40])
    script.compile_bytecode(sys.executable, [str(sites[2])], cache=str(cache))
    assert "0 modules from the bytecode cache, 2 compiled" in capsys.readouterr().out
    out = subprocess.run([sys.executable, "-c", "import pkg.mod; print(pkg.mod.f())"], cwd=sites[2],
                         capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.strip() == "2"


def test_a_download_cache_is_empty_until_it_holds_a_folder(tmp_path: Path) -> None:
    assert script.cache_is_empty(str(tmp_path / "absent"))
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "CACHEDIR.TAG").write_text("Signature: 8a477f597d28d172789f06886806bc55\n")
    assert script.cache_is_empty(str(cache)), "uv's marker files are no entry"
    (cache / "archive-v0").mkdir()
    assert not script.cache_is_empty(str(cache))


def test_the_top_level_paths_of_a_distribution_come_from_its_record(tmp_path: Path) -> None:
    dist = _installed(tmp_path, {"pkg/__init__.py": b"X = 1\n", "single.py": b"Y = 1\n"})
    with (dist / "RECORD").open("a") as fh:
        fh.write("../../../bin/tool,sha256=x,1\nhook.pth,sha256=y,1\npkg-1.0.data/scripts/s,,\n")
    assert script.top_level_paths(str(dist)) == [str(tmp_path / "pkg"), str(tmp_path / "single.py")]
    assert script.top_level_paths(str(tmp_path / "none.dist-info")) == []


def test_pins_read_compiled_output_with_hashes_and_comments() -> None:
    text = "six==1.17.0 \\\n    --hash=sha256:abc\nIdna_Extra==3.7  # via x\npkg @ file:///w/pkg.whl\n"
    assert script.pins(text) == {"six": "1.17.0", "idna-extra": "3.7"}


# -- the script, run as in a build ------------------------------------------------------------------


def _wheel(folder: Path, name: str, version: str, requires: tuple[str, ...] = (), tests: bool = False) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    dist = f"{name}-{version}.dist-info"
    meta = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n" + "".join(f"Requires-Dist: {r}\n" for r in requires)
    suite = {f"{name}/tests/__init__.py": b"", f"{name}/tests/test_it.py": b"def test_it():\n    pass\n"}
    files = {**(suite if tests else {}), f"{name}/__init__.py": f"VERSION = {version!r}\n".encode(),
             f"{dist}/METADATA": meta.encode(),
             f"{dist}/WHEEL": b"Wheel-Version: 1.0\nGenerator: dockyard-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    record = io.StringIO()
    for path, data in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.write(f"{path},sha256={digest},{len(data)}\n")
    record.write(f"{dist}/RECORD,,\n")
    files[f"{dist}/RECORD"] = record.getvalue().encode()
    with zipfile.ZipFile(folder / f"{name}-{version}-py3-none-any.whl", "w") as zf:
        for rel, data in files.items():
            zf.writestr(rel, data)


@pytest.fixture(scope="module")
def wheels(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("wheels")
    _wheel(folder, "tinya", "1.0")
    _wheel(folder, "tinya", "2.0")
    _wheel(folder, "tinyb", "1.0", requires=("tinya",), tests=True)
    _wheel(folder, "tinyc", "1.0")
    return folder


def _run(tmp_path: Path, cache: Path, lines: list[str], prefix: Path, *extra: str) -> tuple[subprocess.CompletedProcess[str], Path]:
    found = uv_binary()
    if found is None:
        pytest.skip("the uv wheel is not installed with dockyard")
    requirements = tmp_path / f"req-{prefix.name}.txt"
    requirements.write_text("\n".join(lines) + "\n")
    record = tmp_path / "resolved" / f"{prefix.name}.txt"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "UV_"))}
    env["PIP_CONFIG_FILE"] = os.devnull  # this machine's pip configuration is not the image's
    out = subprocess.run([sys.executable, "-s", str(SCRIPT), "--uv", str(found[1]), "--cache", str(cache),
                          "--requirements", str(requirements), "--prefix", str(prefix), "--record", str(record),
                          *extra], capture_output=True, text=True, env=env, timeout=300)
    return out, record


def _freeze(prefix: Path) -> list[str]:
    out = subprocess.run([str(prefix / "bin/python"), "-m", "pip", "freeze", "--all"], capture_output=True,
                         text=True, check=True, timeout=120)
    return sorted(out.stdout.split())


def test_a_clean_venv_then_a_near_miss_of_it_then_a_damaged_cache(tmp_path: Path, wheels: Path) -> None:
    cache = tmp_path / "cache"
    offline = ["--no-index", f"--find-links {wheels}"]
    out, record = _run(tmp_path, cache, [*offline, "tinyb", "tinya<2"], tmp_path / "a")
    assert out.returncode == 0, out.stdout + out.stderr
    frozen = _freeze(tmp_path / "a")
    assert {"tinya==1.0", "tinyb==1.0"} <= set(frozen) and any(p.startswith("pip==") for p in frozen), frozen
    site = next((tmp_path / "a/lib").glob("python*/site-packages"))
    assert any((site / "tinyb/__pycache__").glob("__init__.*.pyc")), "bytecode compiled"
    assert any((site / "pip/__pycache__").glob("__init__.*.pyc")), "the seeds' too"
    assert (site / "tinyb/tests/test_it.py").is_file() and not (site / "tinyb/tests/__pycache__").exists()
    assert re.search(r"\(resolve [0-9.]+ s, venv [0-9.]+ s, install [0-9.]+ s, check [0-9.]+ s, bytecode [0-9.]+ s\)",
                     out.stdout), out.stdout
    assert "a new download cache: nothing installed" in out.stdout, "a new cache holds nothing damaged: no check"
    text = record.read_text()
    assert "# installer: uv " in text and "# mode: venv" in text
    assert [line for line in text.splitlines() if not line.startswith("#")] == ["tinya==1.0", "tinyb==1.0"]

    # A near miss: tinyb goes, tinyc comes, tinya moves up; the seeds (pip…) stay.
    out, record = _run(tmp_path, cache, [*offline, "tinya", "tinyc"], tmp_path / "b", "--mode", "near", "--from",
                       str(tmp_path / "a"))
    assert out.returncode == 0, out.stdout + out.stderr
    assert (tmp_path / "b").is_symlink() and os.path.realpath(tmp_path / "b") == str(tmp_path / "a")
    near = _freeze(tmp_path / "b")
    assert {"tinya==2.0", "tinyc==1.0"} <= set(near) and not any(p.startswith("tinyb") for p in near)
    assert [p for p in near if p.startswith(("pip==", "setuptools=="))] == [
        p for p in frozen if p.startswith(("pip==", "setuptools=="))]

    # Every file uv keeps of tinya is cut short: the install notices, reinstalls without the cache,
    # empties it, and the package is whole.
    damaged = 0
    for path in cache.rglob("tinya/__init__.py"):
        path.write_bytes(b"")
        damaged += 1
    assert damaged, "uv kept no unpacked tinya in its cache"
    out, _ = _run(tmp_path, cache, [*offline, "tinya"], tmp_path / "c")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "damaged files from the download cache (tinya" in out.stdout
    assert "a new download cache: nothing installed" not in out.stdout
    assert (tmp_path / "c/lib").exists()
    code = subprocess.run([str(tmp_path / "c/bin/python"), "-c", "import tinya; print(tinya.VERSION)"],
                          capture_output=True, text=True, timeout=60)
    assert code.stdout.strip() == "2.0", code.stderr
    assert not any(cache.rglob("tinya/__init__.py")) or all(p.stat().st_size for p in cache.rglob("tinya/__init__.py"))


def test_a_requirement_that_does_not_resolve_is_one_line_naming_it(tmp_path: Path, wheels: Path) -> None:
    out, record = _run(tmp_path, tmp_path / "cache", ["--no-index", f"--find-links {wheels}", "tinya>=3"],
                       tmp_path / "bad")
    assert out.returncode == script.BAD_SPEC, out.stdout + out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dockyard-uv: cannot resolve the requirements: ")
    assert "tinya>=3" in lines[0] and len(lines[0]) < 400
    assert not record.exists() and not (tmp_path / "bad").exists(), "resolved first: nothing made"


def test_a_fresh_install_reads_and_writes_nothing_of_the_shared_cache(tmp_path: Path, wheels: Path) -> None:
    cache = tmp_path / "cache"
    offline = ["--no-index", f"--find-links {wheels}"]
    out, _ = _run(tmp_path, cache, [*offline, "tinyb"], tmp_path / "a")
    assert out.returncode == 0, out.stdout + out.stderr
    before = sorted(p.relative_to(cache) for p in cache.rglob("*"))
    assert before, "a plain install fills the cache"
    out, _ = _run(tmp_path, cache, [*offline, "tinyb", "tinyc"], tmp_path / "b", "--fresh", "nonce")
    assert out.returncode == 0, out.stdout + out.stderr
    assert sorted(p.relative_to(cache) for p in cache.rglob("*")) == before, "the shared cache is untouched"
    assert "modules from the bytecode cache" not in out.stdout
    assert {"tinyb==1.0", "tinyc==1.0"} <= set(_freeze(tmp_path / "b"))
    site = next((tmp_path / "b/lib").glob("python*/site-packages"))
    assert any((site / "tinyc/__pycache__").glob("__init__.*.pyc")), "compiled all the same"
