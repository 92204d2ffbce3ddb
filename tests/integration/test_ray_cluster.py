"""A Ray cluster as a compute target, with real parts: two Ray nodes on 127.0.0.1 (token auth on),
node ``a`` on this machine's Docker Engine and node ``b`` on a second engine (its own image store,
standing in for a second machine), a loopback registry as the shared cache (each node logs in with
its own Docker config), virtual GPUs per node. The agent on "this machine" drives the cluster."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from dockyard import Environment, Experiment, ScriptRunConfig, Workspace
from dockyard.core.compute import ComputeTarget, RayCompute
from dockyard.errors import ClusterUnavailable, InputError
from helpers.engine2 import second_engine_fixture
from helpers.ray_cluster import RayCluster
from helpers.registry import local_registry_fixture

pytestmark = pytest.mark.engine

PYTHON_BASE = "dockyard/base:bookworm-python3"
local_registry = local_registry_fixture(scope="module")
second_engine = second_engine_fixture(scope="module")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, second_engine, local_registry):
    second_engine.load_image(PYTHON_BASE)  # the same image ID on both nodes: both compute the same keys
    root = tmp_path_factory.mktemp("ray-nodes")
    config = root / "docker-config"
    config.mkdir()
    auth = base64.b64encode(f"{local_registry.username}:{local_registry.password}".encode()).decode()
    (config / "config.json").write_text(json.dumps({"auths": {local_registry.address: {"auth": auth}}}))
    nodes = {
        "a": {"gpus": 2, "env": {"DOCKYARD_HOME": str(root / "node-a"), "DOCKER_CONFIG": str(config)}},
        "b": {"gpus": 2, "env": {"DOCKYARD_HOME": str(root / "node-b"), "DOCKER_CONFIG": str(config),
                                 "DOCKER_HOST": second_engine.docker_host}},
    }
    with RayCluster(nodes) as found:
        found.homes = {name: Path(node["env"]["DOCKYARD_HOME"]) for name, node in nodes.items()}
        found.registry = f"{local_registry.address}/ray/cache"
        yield found


@pytest.fixture
def ws(tmp_path, cluster, monkeypatch):
    home = tmp_path / "home"
    monkeypatch.setenv("DOCKYARD_HOME", str(home))
    monkeypatch.setenv("DOCKYARD_CACHE_REGISTRY", cluster.registry)
    for name in ("DOCKYARD_CACHE_REGISTRY_USERNAME", "DOCKYARD_CACHE_REGISTRY_PASSWORD_ENV", "RAY_AUTH_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    workspace = Workspace(f"ray{uuid.uuid4().hex[:6]}", home=home)
    ComputeTarget.attach(workspace, "cluster", RayCompute.attach_configuration(
        cluster.address, max_nodes=8, auth_token_file=str(cluster.token_file)))
    yield workspace
    from dockyard.compute import stop_agent

    stop_agent(home)


def env_with_stamp() -> Environment:
    env = Environment(f"ray-{uuid.uuid4().hex[:6]}")
    env.docker.base_image = PYTHON_BASE
    env.docker.build_args = {"STAMP": uuid.uuid4().hex}  # a key no other test built
    return env


SCRIPT = """\
import os, sys, time
from dockyard.core import Run
run = Run.get_context()
print("gpus", os.environ.get("NVIDIA_VISIBLE_DEVICES"), flush=True)
steps = int(sys.argv[1]) if len(sys.argv) > 1 else 1
for i in range(steps):
    run.log("step", i)
    print("line", i, flush=True)
    time.sleep(float(os.environ.get("PAUSE", "0.3")))
os.makedirs("outputs", exist_ok=True)
open("outputs/done.txt", "w").write("ok\\n")
sys.exit(int(sys.argv[2]) if len(sys.argv) > 2 else 0)
"""


def source(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    src.mkdir(exist_ok=True)
    (src / "train.py").write_text(SCRIPT)
    return src


def submit(ws, tmp_path, env, *args, gpus: int = 1, pause: float = 0.3):
    from dockyard.core.runconfig import DockerConfiguration

    env.environment_variables = {"PAUSE": str(pause)}
    config = ScriptRunConfig(str(source(tmp_path)), "train.py", arguments=[str(a) for a in args],
                             compute_target="cluster", environment=env,
                             docker_runtime_config=DockerConfiguration(use_docker=True))
    config.gpus = gpus
    return Experiment(ws, "ray").submit(config)


def node_of(run) -> str:
    record = run.experiment.workspace.store.get(run.id)
    assert record.container_id.startswith("ray:run-") and "@" in record.container_id, record.container_id
    return record.container_id.rpartition("@")[2]


def test_runs_land_on_both_nodes_and_the_second_node_pulls_the_key_never_rebuilds(ws, tmp_path, cluster):
    env = env_with_stamp()
    first = submit(ws, tmp_path, env, 2)
    details = first.wait_for_completion(raise_on_error=False)
    assert details["status"] == "Completed", Path(details["logFiles"]["logs/std.log"]).read_text()
    burst = [submit(ws, tmp_path, env, 6, pause=0.5) for _ in range(4)]  # 4 GPUs wanted at once: both nodes
    for run in burst:
        assert run.wait_for_completion(raise_on_error=False)["status"] == "Completed"
    runs = [first, *burst]
    assert len({node_of(r) for r in runs}) == 2, "the runs did not land on both nodes"
    from dockyard.cache import ImageCache

    builders = []
    for home in cluster.homes.values():
        index = ImageCache(home / "index.db")
        try:
            builders += [e.builder for e in index.entries() if e.parts and json.dumps(dict(e.parts))]
            keys = {e.key for e in index.entries()}
        finally:
            index.close()
        assert keys, f"{home} has no image"
    assert sorted(builders).count("buildkit") == 1 and "pulled" in builders, builders
    # Every line, metric and output came back to this machine's run folder.
    for run in runs:
        log = run.get_details()["logFiles"]["logs/std.log"]
        text = Path(log).read_text()
        steps = 2 if run is first else 6
        assert [line for line in text.splitlines() if line.startswith("line ")] == [f"line {i}" for i in range(steps)]
        assert run.get_metrics()["step"] == list(range(steps)) if steps > 1 else True
        assert "outputs/done.txt" in run.get_file_names()
    # GPU audit: no UUID of a node held by two runs at once; each container saw exactly its GPUs.
    records = [ws.store.get(r.id) for r in runs]
    for i, a in enumerate(records):
        seen = [line for line in Path(a.folder.log).read_text().splitlines() if line.startswith("gpus ")]
        assert seen == [f"gpus {','.join(a.gpus)}"], (seen, a.gpus)
        assert len(a.gpus) == 1
        for b in records[i + 1:]:
            same_node = a.container_id.rpartition("@")[2] == b.container_id.rpartition("@")[2]
            overlap = a.started < b.ended and b.started < a.ended
            if same_node and overlap:
                assert not set(a.gpus) & set(b.gpus), f"{a.id} and {b.id} shared {a.gpus}"


def test_output_and_metrics_stream_while_the_run_runs(ws, tmp_path):
    run = submit(ws, tmp_path, env_with_stamp(), 12, pause=0.5)
    log = Path(ws.store.get(run.id).folder.log)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if "line 1" in (log.read_text() if log.exists() else ""):
            break
        time.sleep(0.2)
    assert ws.store.get(run.id).status.value == "Running", "the output arrived only at the end"
    assert run.get_metrics().get("step", [])[:1] == [0], "metrics arrive during the run"
    assert run.wait_for_completion(raise_on_error=False)["status"] == "Completed"


def test_a_failing_script_fails_with_its_exit_code_and_is_not_retried(ws, tmp_path):
    run = submit(ws, tmp_path, env_with_stamp(), 1, 7)
    details = run.wait_for_completion(raise_on_error=False)
    record = ws.store.get(run.id)
    assert details["status"] == "Failed" and record.exit_code == 7
    assert "exited with code 7" in record.reason
    assert Path(record.folder.log).read_text().count("line 0") == 1, "it ran once"


def test_cancel_stops_the_container_on_its_node(ws, tmp_path, cluster, second_engine):
    run = submit(ws, tmp_path, env_with_stamp(), 200, pause=0.5)
    log = Path(ws.store.get(run.id).folder.log)
    deadline = time.monotonic() + 120
    while "line 0" not in (log.read_text() if log.exists() else "") and time.monotonic() < deadline:
        time.sleep(0.2)
    run.cancel()
    details = run.wait_for_completion(raise_on_error=False)
    assert details["status"] == "Canceled"
    from dockyard.dockerd import EngineClient
    from dockyard.launch import ContainerLauncher

    for engine in (EngineClient.from_env(), second_engine.client):
        deadline = time.monotonic() + 30
        while ContainerLauncher(engine).find(run.id) is not None and time.monotonic() < deadline:
            time.sleep(0.5)  # the actor removes it once the agent has everything
        assert ContainerLauncher(engine).find(run.id) is None, "the canceled run's container is left on its node"


# Two stand-ins for node daemons left by another dockyard version (a name ending in another
# code's id): "busy" answers 1 (still following a run), the other 0.
_OLD_DAEMONS = """\
import json, sys, time, ray
address, namespace, idle, busy, wait = sys.argv[1:6]
ray.init(address=address, namespace=namespace, log_to_driver=False)
if float(wait) == 0:
    @ray.remote(num_cpus=0)
    class Old:
        def __init__(self, units):
            self.units = units
        def busy(self):
            return self.units
    made = [Old.options(name=name, lifetime="detached").remote(units) for units, name in enumerate((idle, busy))]
    ray.get([actor.busy.remote() for actor in made])
    sys.exit(0)
def alive(name):
    try:
        ray.get_actor(name, namespace=namespace)
        return True
    except ValueError:
        return False
deadline = time.monotonic() + float(wait)
while alive(idle) and time.monotonic() < deadline:
    time.sleep(1)
found = {"idle": alive(idle), "busy": alive(busy)}
if found["busy"]:
    ray.kill(ray.get_actor(busy, namespace=namespace))
print(json.dumps(found))
"""


def test_node_daemons_of_other_code_are_ended_once_they_follow_no_run(ws, tmp_path, cluster):
    from dockyard.compute._ray_node import NAMESPACE

    run = submit(ws, tmp_path, env_with_stamp())  # the agent drives the cluster from now on
    assert run.wait_for_completion(raise_on_error=False)["status"] == "Completed"
    tag = uuid.uuid4().hex[:8]
    idle, busy = f"node-old{tag}-000000000000", f"node-busy{tag}-000000000000"
    env = {**os.environ, **cluster.environment()}
    env.pop("RAY_AUTH_TOKEN", None)

    def driver(wait: float) -> str:
        done = subprocess.run([sys.executable, "-c", _OLD_DAEMONS, cluster.address, NAMESPACE, idle, busy, str(wait)],
                              capture_output=True, text=True, env=env, timeout=wait + 120)
        assert done.returncode == 0, done.stderr[-3000:]
        return done.stdout

    driver(0)
    # The agent sweeps the cluster every 15 s: within a few sweeps the idle one is gone.
    found = json.loads(driver(90).strip().splitlines()[-1])
    agent_log = (ws.home / "agent.log").read_text()
    assert found == {"idle": False, "busy": True}, f"{found}\n{agent_log[-3000:]}"
    assert f"ended the node daemon {idle} (other dockyard code, following no run)" in agent_log
    assert busy not in agent_log


def kill_the_agent_once(ws, log: Path, text: str) -> None:
    """kill -9 the agent once ``text`` is in the run's log; the run goes on on its nodes meanwhile."""
    from dockyard.compute import agent_status

    deadline = time.monotonic() + 120
    while text not in (log.read_text() if log.exists() else "") and time.monotonic() < deadline:
        time.sleep(0.2)
    status = agent_status(ws.home)
    assert status.running and status.pid
    os.kill(status.pid, signal.SIGKILL)
    time.sleep(2.0)


def test_a_killed_agent_re_attaches_and_nothing_is_lost_or_repeated(ws, tmp_path):
    run = submit(ws, tmp_path, env_with_stamp(), 16, pause=0.5)
    log = Path(ws.store.get(run.id).folder.log)
    kill_the_agent_once(ws, log, "line 2")
    details = run.wait_for_completion(raise_on_error=False)  # wakes a new agent, which re-attaches
    assert details["status"] == "Completed"
    lines = [line for line in log.read_text().splitlines() if line.startswith("line ")]
    assert lines == [f"line {i}" for i in range(16)], "a gap or a repeat after the agent was killed"
    assert run.get_metrics()["step"] == list(range(16))


def test_a_lost_node_fails_its_run_and_its_container_goes_when_the_node_returns(ws, tmp_path, cluster,
                                                                                 second_engine):
    from dockyard.launch import ContainerLauncher

    runs = [submit(ws, tmp_path, env_with_stamp(), 400, pause=0.5) for _ in range(4)]  # every GPU: both nodes
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and not all(ws.store.get(r.id).status.value == "Running" for r in runs):
        time.sleep(0.5)
    assert all(ws.store.get(r.id).status.value == "Running" for r in runs)
    on_b = [r for r in runs if ContainerLauncher(second_engine.client).find(r.id) is not None]
    assert len(on_b) == 2, "two of the four runs hold node b's two GPUs"
    cluster.kill_node("b")
    try:
        ended = {}
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and len(ended) < 2:
            for r in runs:
                record = ws.store.get(r.id)
                if record.status.value == "Failed":
                    ended[r.id] = record.reason
            time.sleep(0.5)
        assert set(ended) == {r.id for r in on_b}, f"the runs of node b did not end: {ended}"
        assert all("node lost" in reason for reason in ended.values()), ended
    finally:
        for r in runs:
            r.cancel()
        cluster.add_node("b")
    for r in runs:
        if r.id not in ended:
            assert r.wait_for_completion(raise_on_error=False)["status"] == "Canceled"
    # The node is back: the next run placed there removes the containers its lost actors left.
    again = [submit(ws, tmp_path, env_with_stamp(), 1) for _ in range(4)]
    for r in again:
        record = ws.store.get(r.id)
        assert r.wait_for_completion(raise_on_error=False)["status"] == "Completed", (
            ws.store.get(r.id).reason, Path(record.folder.log).read_text()[-2000:])
    deadline = time.monotonic() + 120  # Ray declares the lost actors dead, then the agent's sweep finds them
    while time.monotonic() < deadline and any(ContainerLauncher(second_engine.client).find(r.id) for r in on_b):
        time.sleep(0.5)
    agent_log = (ws.home / "agent.log").read_text()
    for r in on_b:
        assert ContainerLauncher(second_engine.client).find(r.id) is None, \
            f"{r.id}'s container outlived its node\n{agent_log[-3000:]}"


def test_attach_needs_the_right_token_and_stores_none(tmp_path, cluster, monkeypatch):
    home = tmp_path / "home"
    monkeypatch.setenv("DOCKYARD_HOME", str(home))
    ws = Workspace("tokens", home=home)
    wrong = tmp_path / "wrong-token"
    wrong.write_text("0" * 64)
    with pytest.raises(ClusterUnavailable) as err:
        ComputeTarget.attach(ws, "c", RayCompute.attach_configuration(cluster.address, auth_token_file=str(wrong)))
    assert cluster.address in err.value.message and "0" * 64 not in str(err.value)
    with pytest.raises(ClusterUnavailable):
        ComputeTarget.attach(ws, "c", RayCompute.attach_configuration(cluster.address))
    assert ws.store.compute("c") is None, "a refused attach records nothing"
    ComputeTarget.attach(ws, "c", RayCompute.attach_configuration(cluster.address, auth_token_file=str(cluster.token_file)))
    token = cluster.token_file.read_bytes()
    for path in home.rglob("*"):
        if path.is_file():
            assert token not in path.read_bytes(), f"the token is in {path}"
    cli = subprocess.run([sys.executable, "-m", "dockyard", "compute", "ls", "--workspace", "tokens", "--json"],
                         capture_output=True, text=True, env={**os.environ, "DOCKYARD_HOME": str(home)}, timeout=60)
    assert cli.returncode == 0, cli.stderr
    rows = {r["name"]: r for r in json.loads(cli.stdout)["computes"]}
    assert rows["c"]["kind"] == "ray" and rows["c"]["address"] == cluster.address
    doctor = subprocess.run([sys.executable, "-m", "dockyard", "doctor", "--compute", "c", "--workspace", "tokens",
                             "--json"], capture_output=True, text=True, timeout=180,
                            env={**os.environ, "DOCKYARD_HOME": str(home)})
    checks = json.loads(doctor.stdout)["checks"]
    assert doctor.returncode == 0, doctor.stdout
    nodes = [c for c in checks if c["name"].strip().startswith("node ")]
    assert len(nodes) == 3 and all(c["ok"] for c in nodes), checks  # the head and nodes a and b
    assert len({c["name"] for c in nodes}) == 3
    assert token.decode() not in doctor.stdout + doctor.stderr


def test_a_cluster_run_refuses_this_machines_paths(ws, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    from dockyard.core.runconfig import DockerConfiguration

    config = ScriptRunConfig(str(source(tmp_path)), "train.py", compute_target="cluster", environment=env_with_stamp(),
                             docker_runtime_config=DockerConfiguration(use_docker=True, arguments=[
                                 "-v", f"{data}:/data:ro"]))
    with pytest.raises(InputError, match="cannot mount this machine's paths"):
        Experiment(ws, "ray").submit(config)
    assert ws.store.list() == [], "nothing was queued"


def test_an_image_that_cannot_be_built_on_the_node_fails_the_run_with_the_build_error(ws, tmp_path):
    env = Environment(f"ray-broken-{uuid.uuid4().hex[:6]}")
    env.docker.base_dockerfile = f"FROM {PYTHON_BASE}\nRUN echo broken-{uuid.uuid4().hex[:6]} && exit 3\n"
    run = submit(ws, tmp_path, env, 1)
    details = run.wait_for_completion(raise_on_error=False)
    record = ws.store.get(run.id)
    assert details["status"] == "Failed" and record.started is None, "it never started"
    assert "exit code 3" in record.reason or "exit code: 3" in record.reason, record.reason
    assert "broken-" in Path(record.folder.log).read_text(), "the build's output is in the run's log"


def test_dockyard_run_on_the_cluster_from_the_cli(ws, tmp_path, monkeypatch):
    spec = tmp_path / "env.yml"
    spec.write_text(f"name: cli-ray\ndocker:\n  base_image: {PYTHON_BASE}\n  build_args: {{STAMP: {uuid.uuid4().hex}}}\n")
    (tmp_path / "config.json").write_text(json.dumps({"workspace_name": ws.name, "home": str(ws.home)}))
    done = subprocess.run([sys.executable, "-m", "dockyard", "run", "--compute", "cluster", "--source",
                           str(source(tmp_path)), "--env", str(spec), "--json", "train.py", "3"],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path,
                          env={**os.environ, "DOCKYARD_HOME": str(ws.home)})
    assert done.returncode == 0, done.stderr[-2000:]
    doc = json.loads(done.stdout.strip().splitlines()[-1])
    assert doc["status"] == "Completed" and doc["compute"] == "cluster", doc
    record = ws.store.get(doc["id"])
    assert record.container_id.startswith("ray:") and record.exit_code == 0


def test_the_seed_code_runs_on_the_attached_cluster_with_only_its_imports_changed(tmp_path, cluster,
                                                                                  local_registry, monkeypatch):
    """The seed's code, unchanged but for ``azureml`` -> ``dockyard`` and the registry placeholders,
    with ``gpu-cluster`` attached as the Ray target: it finds the target, and each node pulls the
    private base with its own login (the password in the code never leaves this machine)."""
    local_registry.push_local(PYTHON_BASE, "fastdotai/fastai2:latest")
    root = Path(__file__).resolve().parents[2]
    code = (root / "tests" / "data" / "seed_snippet.py.txt").read_text().replace("azureml", "dockyard")
    code = code.replace('"myregistry.azurecr.io"', repr(local_registry.address))
    code = code.replace('"username"', repr(local_registry.username)).replace('"password"', repr(local_registry.password))
    project = tmp_path / "project"
    (project / "fastai-example").mkdir(parents=True)
    (project / "fastai-example" / "train.py").write_text(
        "from dockyard.core.run import Run\nrun = Run.get_context()\n"
        "for epoch in range(3):\n    run.log('accuracy', 0.5 + epoch / 10)\n    print(f'epoch {epoch} done', flush=True)\n")
    name = f"seed{uuid.uuid4().hex[:6]}"
    (project / "config.json").write_text(json.dumps({"subscription_id": "0", "resource_group": "rg",
                                                     "workspace_name": name}))
    (project / "port.py").write_text(code)
    home = tmp_path / "home"
    monkeypatch.setenv("DOCKYARD_HOME", str(home))
    ws = Workspace(name, home=home)
    ComputeTarget.attach(ws, "gpu-cluster", RayCompute.attach_configuration(
        cluster.address, max_nodes=4, auth_token_file=str(cluster.token_file)))
    try:
        out = subprocess.run([sys.executable, "port.py"], cwd=project, capture_output=True, text=True,
                             env={**os.environ, "DOCKYARD_HOME": str(home)}, timeout=600)
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
        assert "Found existing compute target." in out.stdout
        assert "epoch 2 done" in out.stdout and "Status: Completed" in out.stdout
        assert local_registry.password not in out.stdout + out.stderr
        (record,) = ws.store.list()
        assert record.container_id.startswith("ray:") and record.compute == "gpu-cluster"
    finally:
        from dockyard.compute import stop_agent

        stop_agent(home)


def test_a_node_pulls_a_private_base_with_its_own_login(tmp_path, second_engine, local_registry, monkeypatch):
    """What a node does for a base whose password stayed on the submitting machine: the username
    travels, the password does not, and the node's Docker config supplies its own credentials."""
    import urllib.parse

    from dockyard._environment import ContainerRegistry
    from dockyard.build._registry import pull_image
    from dockyard.errors import RegistryAuthError

    name = f"private/busybox:{uuid.uuid4().hex[:8]}"
    remote = local_registry.push_local("dockyard/base:bookworm-busybox", name)
    no_password = ContainerRegistry(address=local_registry.address, username=local_registry.username)
    empty = tmp_path / "no-login"
    empty.mkdir()
    monkeypatch.setenv("DOCKER_CONFIG", str(empty))
    with pytest.raises(RegistryAuthError, match="docker login"):
        pull_image(name, no_password, engine=second_engine.client)
    login = tmp_path / "login"
    login.mkdir()
    auth = base64.b64encode(f"{local_registry.username}:{local_registry.password}".encode()).decode()
    (login / "config.json").write_text(json.dumps({"auths": {local_registry.address: {"auth": auth}}}))
    monkeypatch.setenv("DOCKER_CONFIG", str(login))
    image_id = pull_image(name, no_password, engine=second_engine.client)
    assert image_id.startswith("sha256:") and second_engine.client.inspect_image(remote) is not None
    second_engine.client.request("DELETE", f"/images/{urllib.parse.quote(remote, safe='')}")


RENDEZVOUS = """\
import os, socket, sys, time
rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
addr, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
print("env", rank, os.environ["LOCAL_RANK"], os.environ["NODE_RANK"], world,
      os.environ.get("NVIDIA_VISIBLE_DEVICES"), flush=True)
if rank == int(os.environ.get("FAIL_RANK", "-1")):
    sys.exit(3)
if os.environ.get("FAIL_RANK"):
    time.sleep(300)  # the others wait: the failed rank must stop them
if rank == 0:
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("0.0.0.0", port))
    server.listen()
    server.settimeout(120)
    joined = []
    while len(joined) < world - 1:
        conn, _ = server.accept()
        joined.append(int(conn.recv(16)))
        conn.sendall(b"ok")
        conn.close()
    print("rendezvous", sorted(joined), flush=True)
else:
    deadline = time.time() + 120
    while True:
        try:
            conn = socket.create_connection((addr, port), timeout=5)
            break
        except OSError:
            if time.time() > deadline:
                raise
            time.sleep(0.2)
    conn.sendall(str(rank).encode())
    assert conn.recv(2) == b"ok"
    print("joined", rank, flush=True)
"""


def submit_distributed(ws, tmp_path, env, fail_rank: int | None = None):
    from dockyard.core.runconfig import PyTorchConfiguration

    src = source(tmp_path)
    (src / "ddp.py").write_text(RENDEZVOUS)
    env.environment_variables = {"FAIL_RANK": str(fail_rank)} if fail_rank is not None else {}
    config = ScriptRunConfig(str(src), "ddp.py", compute_target="cluster", environment=env,
                             distributed_job_config=PyTorchConfiguration(process_count=4, node_count=2))
    config.gpus = 1  # per node
    return Experiment(ws, "ddp").submit(config)


def test_a_distributed_run_spans_both_nodes_and_its_ranks_find_each_other(ws, tmp_path):
    run = submit_distributed(ws, tmp_path, env_with_stamp())
    details = run.wait_for_completion(raise_on_error=False)
    record = ws.store.get(run.id)
    text = Path(record.folder.log).read_text()
    assert details["status"] == "Completed", (record.reason, text[-3000:])
    nodes = record.container_id.rpartition("@")[2].split(",")
    assert len(nodes) == 2 and nodes[0] != nodes[1], f"the two nodes of the run are not distinct: {record.container_id}"
    # Every rank's lines are in the run's one log, prefixed with its rank, and whole.
    envs = {}
    for line in text.splitlines():
        prefix, _, rest = line.partition("] ")
        if rest.startswith("env "):
            assert prefix == f"[rank {rest.split()[1]}", line
            _env, rank, local, node, world, gpus = rest.split()
            envs[int(rank)] = (int(local), int(node), int(world), gpus)
    assert sorted(envs) == [0, 1, 2, 3], text
    assert all(world == 4 for *_x, world, _g in envs.values())
    assert {r: (local, node) for r, (local, node, _w, _g) in envs.items()} == {0: (0, 0), 1: (1, 0), 2: (0, 1), 3: (1, 1)}
    assert "[rank 0] rendezvous [1, 2, 3]" in text, text
    assert sum(f"] joined {r}" in text for r in (1, 2, 3)) == 3
    # Each node's container saw one GPU, its own.
    assert len({g for *_x, g in envs.values()}) >= 1 and all(g and g != "void" for *_x, g in envs.values())
    assert len(record.gpus) == 2


def test_one_failing_rank_fails_the_run_and_stops_the_others(ws, tmp_path, cluster, second_engine):
    from dockyard.dockerd import EngineClient
    from dockyard.launch import ContainerLauncher

    run = submit_distributed(ws, tmp_path, env_with_stamp(), fail_rank=3)
    started = time.monotonic()
    details = run.wait_for_completion(raise_on_error=False)
    record = ws.store.get(run.id)
    assert details["status"] == "Failed", record.reason
    assert record.exit_code == 3 and "node rank 1" in record.reason, (record.exit_code, record.reason)
    assert time.monotonic() - started < 200, "the other ranks were not stopped (they sleep 300 s)"
    for engine in (EngineClient.from_env(), second_engine.client):
        for rank in (0, 1):
            deadline = time.monotonic() + 30
            while ContainerLauncher(engine).find(f"{run.id}.r{rank}") is not None and time.monotonic() < deadline:
                time.sleep(0.5)
            assert ContainerLauncher(engine).find(f"{run.id}.r{rank}") is None, "a rank's container is left"


def test_a_distributed_run_wider_than_the_target_is_refused_at_submit(ws, tmp_path):
    from dockyard.core.runconfig import PyTorchConfiguration

    src = source(tmp_path)
    config = ScriptRunConfig(str(src), "train.py", compute_target="cluster", environment=env_with_stamp(),
                             distributed_job_config=PyTorchConfiguration(node_count=9))
    with pytest.raises(InputError, match="max_nodes"):
        Experiment(ws, "ddp").submit(config)
    assert not [r for r in ws.store.list(limit=100) if r.experiment == "ddp"], "a refused submit left a run"


COUNT = """\
import os, time
rank = int(os.environ["RANK"])
for i in range(12):
    print("line", rank, i, flush=True)
    time.sleep(0.5)
"""


def test_a_killed_agent_re_attaches_to_a_distributed_run_and_no_rank_loses_or_repeats_a_line(ws, tmp_path):
    from dockyard.core.runconfig import MpiConfiguration

    src = source(tmp_path)
    (src / "count.py").write_text(COUNT)
    config = ScriptRunConfig(str(src), "count.py", compute_target="cluster", environment=env_with_stamp(),
                             distributed_job_config=MpiConfiguration(process_count_per_node=2, node_count=2))
    run = Experiment(ws, "ddp").submit(config)
    log = Path(ws.store.get(run.id).folder.log)
    kill_the_agent_once(ws, log, "line 0 2")
    details = run.wait_for_completion(raise_on_error=False)
    assert details["status"] == "Completed", ws.store.get(run.id).reason
    lines = [line for line in log.read_text().splitlines() if "] line " in line]
    for rank in range(4):
        mine = [line for line in lines if line.startswith(f"[rank {rank}] ")]
        assert mine == [f"[rank {rank}] line {rank} {i}" for i in range(12)], f"rank {rank}: a gap or a repeat"


def test_a_cluster_that_goes_away_leaves_the_agent_serving_this_machine(tmp_path, monkeypatch):
    """Ray's driver ends its process 60 s after the GCS stops answering, unless told otherwise; the
    agent (the driver) must live on: its cluster run stays as it is (unknown is not gone) and
    local runs still run."""
    from dockyard.compute import agent_status, stop_agent

    home = tmp_path / "home"
    monkeypatch.setenv("DOCKYARD_HOME", str(home))
    monkeypatch.delenv("DOCKYARD_CACHE_REGISTRY", raising=False)
    lonely = RayCluster({"a": {"gpus": 1, "env": {"DOCKYARD_HOME": str(tmp_path / "node-a")}}}).start()
    try:
        ws = Workspace("lonely", home=home)
        ComputeTarget.attach(ws, "cluster", RayCompute.attach_configuration(
            lonely.address, auth_token_file=str(lonely.token_file)))
        run = submit(ws, tmp_path, env_with_stamp(), 400, pause=0.5, gpus=0)
        deadline = time.monotonic() + 120
        while ws.store.get(run.id).status.value != "Running" and time.monotonic() < deadline:
            time.sleep(0.5)
        assert ws.store.get(run.id).status.value == "Running", ws.store.get(run.id).reason
        agent = agent_status(home).pid
        lonely.kill()
        time.sleep(75)  # past Ray's 60 s
        assert agent_status(home).pid == agent, "the agent died with the cluster"
        record = ws.store.get(run.id)
        assert record.status.value == "Running", "a run on a cluster that cannot be asked was ended"
        assert "does not answer since" in record.reason, record.reason
        later = submit(ws, tmp_path, env_with_stamp(), 1, gpus=0)  # submitted while the cluster is away
        deadline = time.monotonic() + 30
        while "does not answer" not in ws.store.get(later.id).reason and time.monotonic() < deadline:
            time.sleep(0.5)
        record = ws.store.get(later.id)
        assert record.status.value == "Queued" and lonely.address in record.reason, (record.status, record.reason)
        env = Environment("here")
        env.docker.enabled = False
        env.python.interpreter_path = sys.executable
        (tmp_path / "src" / "hello.py").write_text("print('still here')\n")
        here = Experiment(ws, "local").submit(ScriptRunConfig(str(tmp_path / "src"), "hello.py", environment=env))
        assert here.wait_for_completion(raise_on_error=False)["status"] == "Completed"
        assert agent_status(home).pid == agent
    finally:
        stop_agent(home)
        lonely.stop()
        from dockyard.dockerd import EngineClient
        from dockyard.launch import ContainerLauncher, LaunchHandle

        for left in [r for r in ws.store.list(limit=10) if r.compute == "cluster"]:  # no node sweeps it now
            ContainerLauncher(EngineClient.from_env()).remove(LaunchHandle("container", f"dockyard-{left.id}", left.id))


def test_a_run_canceled_while_it_waits_for_room_never_starts(ws, tmp_path, cluster, second_engine):
    import urllib.parse

    from dockyard.dockerd import EngineClient
    from dockyard.launch import ContainerLauncher

    env = env_with_stamp()
    busy = [submit(ws, tmp_path, env, 200, pause=0.5, gpus=2) for _ in range(2)]  # every GPU of both nodes
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not all(ws.store.get(r.id).status.value == "Running" for r in busy):
        time.sleep(0.3)
    since = int(time.time()) - 1
    late = submit(ws, tmp_path, env, 1, gpus=2)
    try:
        # It waits on this machine ("waiting for room") or, when Ray's view of the free GPUs lagged
        # behind the busy runs' placement, in Ray's queue ("waiting for the Ray cluster to place it").
        deadline = time.monotonic() + 120
        while "waiting for" not in ws.store.get(late.id).reason and time.monotonic() < deadline:
            time.sleep(0.3)
        assert "waiting for" in ws.store.get(late.id).reason, ws.store.get(late.id).reason
        late.cancel()  # a queued run is Canceled at once; its follower must not start it later
    finally:
        for run in busy:
            run.cancel()
    assert late.wait_for_completion(raise_on_error=False)["status"] == "Canceled"
    for run in busy:
        assert run.wait_for_completion(raise_on_error=False)["status"] == "Canceled"
    time.sleep(5)  # room again: a follower that missed the cancel would start it now
    record = ws.store.get(late.id)
    assert record.status.value == "Canceled" and record.started is None
    assert "@" not in record.container_id, f"the canceled run was placed on a node: {record.container_id}"
    assert "line 0" not in (Path(record.folder.log).read_text() if Path(record.folder.log).exists() else "")
    # The engines' own record: no container of the canceled run was ever created on either node.
    query = urllib.parse.urlencode({"since": since, "until": int(time.time()) + 1,
                                    "filters": json.dumps({"container": [f"dockyard-{late.id}"]})})
    for engine in (EngineClient.from_env(), second_engine.client):
        assert ContainerLauncher(engine).find(late.id) is None, "the canceled run was started"
        events = [json.loads(line) for line in engine.request("GET", f"/events?{query}").body.decode().splitlines() if line]
        assert not [e for e in events if e.get("Action") == "create"], f"the canceled run's container was made: {events}"
