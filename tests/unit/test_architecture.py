"""The rooms' import contracts (import-linter, in pyproject.toml) hold, and would catch a breach."""

from __future__ import annotations

import ast
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _lint_imports(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    if exe is None:
        pytest.fail("lint-imports is missing: it comes with the test extra (pip install -e '.[test]')")
    return subprocess.run([exe, "--no-cache", "--no-logo", *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def test_every_contract_is_kept() -> None:
    out = _lint_imports()
    assert out.returncode == 0, out.stdout + out.stderr
    assert "broken" not in out.stdout.lower().replace("0 broken", "")


# Each pair is a real import of today's tree, declared forbidden: the checker must see it.
_BREACHES = {
    "compute imports runs": ("dockyard.compute", "dockyard.runs"),
    "the CLI imports the facade": ("dockyard.cli", "dockyard._workflow"),
    "build imports the environment model": ("dockyard.build", "dockyard._environment"),
}


@pytest.mark.parametrize("name", sorted(_BREACHES))
def test_a_contract_broken_on_purpose_fails(tmp_path: Path, name: str) -> None:
    source, target = _BREACHES[name]
    config = tmp_path / "contracts.ini"
    config.write_text(
        "[importlinter]\nroot_package = dockyard\n\n"
        "[importlinter:contract:breach]\n"
        f"name = {name}, on purpose\ntype = forbidden\nsource_modules =\n    {source}\nforbidden_modules =\n    {target}\n"
    )
    out = _lint_imports(str(config), cwd=tmp_path)
    assert out.returncode != 0, out.stdout
    assert "BROKEN" in out.stdout and target in out.stdout


def _imported_modules(path: Path, package: str) -> set[str]:
    """Absolute names of what ``path`` (a module of ``package``) imports, resolving relative imports."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")
            base = base[: len(base) - node.level + 1] if node.level else []
            module = ".".join([*base, node.module] if node.module else base) if node.level else node.module or ""
            found |= {module} | {f"{module}.{a.name}" for a in node.names}
    return found


def test_nothing_imports_the_cli() -> None:
    """Only the entry points (``python -m dockyard`` and the console script) start the CLI; the
    layers contract covers the rooms, this covers every other module too (cache, proto, inits)."""
    importers = []
    for path in (ROOT / "engine").rglob("*.py"):
        rel = path.relative_to(ROOT / "engine")
        if rel.parts[0] == "cli" or rel.as_posix() == "__main__.py":
            continue
        package = ".".join(["dockyard", *rel.parent.parts]) if rel.name != "__init__.py" or rel.parent.parts else "dockyard"
        if any(m == "dockyard.cli" or m.startswith("dockyard.cli.") for m in _imported_modules(path, package)):
            importers.append(rel.as_posix())
    assert importers == []


# The public surface of each room (its package __all__): adding a name is a decision, so is removing one.
_SURFACES = {
    "dockyard": ["ComputeTarget", "ContainerRegistry", "DEFAULT_BASE_IMAGE", "DockerSection", "DockyardError",
                 "Environment", "Experiment", "PythonSection", "Run", "ScriptRunConfig", "Workspace", "__version__"],
    "dockyard.core": ["ComputeTarget", "Dataset", "Environment", "Experiment", "Run", "ScriptRunConfig", "Workspace"],
    "dockyard.build": ["BaseImage", "BuildEvent", "BuildKitClient", "Builder", "BuiltImage", "CacheRegistry", "HOST_CA_BUNDLE",
                       "ImageName", "RenderedBuild", "SolveSpec", "Worker", "base_image_ref", "bootstrap",
                       "collect_build_inputs", "collect_garbage", "ensure_image", "image_names", "image_tag", "installer_setting", "lock_environment", "show_environment", "list_base_images", "login_check",
                       "parse_image_ref", "parse_size", "Presence", "prune_build_cache", "pull_image", "push_image", "qualify", "render_dockerfile", "nearest_key", "resolve_cache_registry", "SharedStatus",
                       "spec_fingerprint"],
    "dockyard.runs": ["CONTAINER_LIB", "CONTAINER_META", "CONTAINER_WORK", "ComputeRecord", "DATASETS_ROOT",
                      "DEFAULT_SHM_BYTES", "Distribution", "FINAL", "LOCAL_KIND", "LOG_NAME", "LauncherKind", "RunFolder", "RunMount",
                      "RunRecord", "RunRuntime", "RunStatus", "RunStore", "Snapshot", "SnapshotStore", "Ulimit",
                      "new_run_id"],
    "dockyard.gpu": ["Active", "Gpu", "GpuDiscovery", "GpuRequest", "Lease", "LeaseConflict", "LeaseStore", "Plan",
                     "Policy", "Reservation", "RunQueue", "Topology", "Waiting", "check_fits", "discover_gpus", "inventory",
                     "place", "placement_score", "plan"],
    "dockyard.launch": ["BindMount", "ContainerLauncher", "LaunchHandle", "LaunchSpec", "Launcher", "Observation",
                        "ProcessLauncher", "RUN_ID_VARIABLE", "container_name", "pid_alive"],
    "dockyard.compute": ["Agent", "AgentRun", "AgentStatus", "ClusterReport", "ComputeBackend", "FrontDoor",
                         "GpuStatus", "LOCAL_COMPUTE", "LocalBackend", "QueuedGpuRun", "RayBackend", "Reply", "Request",
                         "RunEvents", "agent_status", "backend_class", "check_cluster", "default_max_nodes",
                         "ensure_agent", "gpu_status", "stop_agent", "wake_agent"],
    "dockyard.dockerd": ["API_VERSION", "EngineClient", "EngineInfo", "HttpReply", "translate_docker_error",
                         "unix_image_id"],
    "dockyard.cli": ["cli", "main"],
}


@pytest.mark.parametrize("package", sorted(_SURFACES))
def test_each_room_exposes_exactly_its_surface_and_every_name_resolves(package: str) -> None:
    code = (f"import importlib, json; p = importlib.import_module({package!r}); "
            "print(json.dumps([sorted(p.__all__), [n for n in p.__all__ if not hasattr(p, n)]]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    names, missing = json.loads(out.stdout)
    assert names == sorted(_SURFACES[package])
    assert missing == []
