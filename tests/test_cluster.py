"""Offline validation of the cluster definitions in cluster/ (issue 6, part 3).

* Cluster-launcher YAMLs go through Ray's own ``prepare_config`` + ``validate_config`` (as
  ray-project/ray python/ray/tests/test_autoscaler_yaml.py does): the provider's local
  defaults.yaml is merged and the autoscaler JSON schema applied. No cloud call is made
  (``bootstrap_config`` would need credentials and is never called).
* KubeRay manifests parse and carry what KubeRay requires / validates.
* Every shipped job config's worker ranges fit every cluster at full scale.
"""
from __future__ import annotations

import copy
import math
import re
import shlex
from pathlib import Path

import pytest
import ray
import yaml

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
BOX_YAML = CLUSTER / "local-autoscaling.yaml"  # Ray's fake multi-node provider: run by tests/test_cluster_box.py
LAUNCHER_YAMLS = sorted(p for p in CLUSTER.glob("*.yaml") if p != BOX_YAML)
KUBERAY_YAMLS = sorted((CLUSTER / "kuberay").glob("*.yaml"))
JOB_CONFIGS = sorted((REPO / "jobs" / "configs").glob("*.yaml"))
RAY_VERSION = ray.__version__


def _ids(paths):
    return [str(p.relative_to(REPO)) for p in paths]


def _load(path: Path):
    return yaml.safe_load(path.read_text())


def _prepared(path: Path) -> dict:
    """The launcher config as `ray up` sees it after Ray's own preparation + validation."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(copy.deepcopy(_load(path)))
    validate_config(config)
    return config


def _start_commands(config: dict, which: str) -> list[str]:
    cmds = [c for c in config[f"{which}_start_ray_commands"] if "ray start" in c]
    assert cmds, f"no `ray start` in {which}_start_ray_commands"
    return cmds


# ============================================================================ cluster launcher


def test_launcher_yamls_are_there():
    assert {p.name for p in LAUNCHER_YAMLS} >= {"aws.yaml", "gcp.yaml"}


@pytest.mark.parametrize("path", LAUNCHER_YAMLS, ids=_ids(LAUNCHER_YAMLS))
def test_launcher_yaml_validates_against_ray_schema(path):
    config = _prepared(path)
    assert config["provider"]["type"] in ("aws", "gcp", "azure")
    assert config["head_node_type"] in config["available_node_types"]


def test_local_autoscaling_yaml_is_a_cluster_in_a_box():
    """Ray's schema (``prepare_config`` needs the provider's example.yaml, which the wheel does not
    ship; the schema check is what ``ray start --autoscaling-config`` relies on) and the shape the
    box needs: a head that offers no CPUs for work, 1-CPU workers, a cap of 2-3, a short idle timeout."""
    from ray.autoscaler._private.util import validate_config

    config = _load(BOX_YAML)
    validate_config(config)
    assert config["provider"]["type"] == "fake_multinode"
    types = config["available_node_types"]
    assert types[config["head_node_type"]]["resources"]["CPU"] == 0
    workers = [t for name, t in types.items() if name != config["head_node_type"]]
    assert workers and all(t["resources"]["CPU"] == 1 for t in workers)
    assert 2 <= config["max_workers"] <= 3 and config["idle_timeout_minutes"] <= 1


def test_schema_validation_is_not_vacuous():
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    base = _load(CLUSTER / "aws.yaml")
    bad = copy.deepcopy(base)
    bad["available_node_types"]["ray.worker.gpu.1xa10g"]["max_worker"] = 3  # typo'd key
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(bad))
    bad = copy.deepcopy(base)
    bad["available_node_types"]["ray.worker.gpu.1xa10g"]["resources"] = {"GPU": 0.5}  # not an integer
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(bad))
    bad = copy.deepcopy(base)
    bad["head_node_type"] = "no-such-type"
    with pytest.raises(ValueError):
        validate_config(prepare_config(bad))


@pytest.mark.parametrize("path", LAUNCHER_YAMLS, ids=_ids(LAUNCHER_YAMLS))
def test_launcher_head_runs_no_work_and_gpu_workers_autoscale(path):
    config = _prepared(path)
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"].get("CPU") == 0, "the head must advertise CPU: 0 (no tasks/actors on it)"
    assert not head["resources"].get("GPU"), "the head must be a CPU node"
    workers = {k: v for k, v in types.items() if k != config["head_node_type"]}
    gpu_types = {k: v for k, v in workers.items() if v["resources"].get("GPU", 0) > 0}
    assert gpu_types, "at least one GPU worker node type"
    for name, t in workers.items():
        assert 0 <= t["min_workers"] <= t["max_workers"], name
        assert t["max_workers"] >= 1, name
        assert t["resources"].get("CPU", 0) >= 1, f"{name}: state the CPUs of the node type"
    assert any(t["min_workers"] < t["max_workers"] for t in gpu_types.values()), "GPU workers must autoscale"
    assert sum(t["max_workers"] for t in workers.values()) <= config["max_workers"]
    assert 0 < config["idle_timeout_minutes"] <= 60


@pytest.mark.parametrize("path", LAUNCHER_YAMLS, ids=_ids(LAUNCHER_YAMLS))
def test_launcher_token_auth_private_dashboard_metrics(path):
    config = _prepared(path)
    for which in ("head", "worker"):
        for cmd in _start_commands(config, which):
            assert re.search(r"\bRAY_AUTH_MODE=token\b", cmd), f"{which}: ray start without RAY_AUTH_MODE=token"
            assert re.search(r"--metrics-export-port[= ]\d+", cmd), f"{which}: no --metrics-export-port"
            assert "MUST_RAY_MULTI_NODE=1" in cmd, f"{which}: jobs must insist on shared paths"
    for cmd in _start_commands(config, "head"):
        host = re.search(r"--dashboard-host[= ](\S+)", cmd)
        assert host is None or host.group(1) in ("127.0.0.1", "localhost"), \
            f"dashboard bound to {host.group(1)}: reach it through `ray dashboard` instead"
    # the token generated locally by `ray get-auth-token --generate` is copied to every node
    mounts = config["file_mounts"]
    assert any(remote.endswith(".ray/auth_token") and local == "~/.ray/auth_token"
               for remote, local in mounts.items()), mounts
    # no ingress from the world except Ray's own SSH rule
    sg = config["provider"].get("security_group", {})
    for rule in sg.get("IpPermissions", []):
        cidrs = [r.get("CidrIp") for r in rule.get("IpRanges", [])] + \
                [r.get("CidrIpv6") for r in rule.get("Ipv6Ranges", [])]
        if {"0.0.0.0/0", "::/0"} & set(cidrs):
            assert rule.get("FromPort") == rule.get("ToPort") == 22, f"public ingress rule {rule}"


@pytest.mark.parametrize("path", LAUNCHER_YAMLS, ids=_ids(LAUNCHER_YAMLS))
def test_launcher_installs_this_project(path):
    config = _prepared(path)
    repo_mounts = [remote for remote, local in config["file_mounts"].items()
                   if Path(local).expanduser().resolve() == REPO or local in (".", "./")]
    assert repo_mounts, "the repository must be synced to the nodes via file_mounts"
    remote = repo_mounts[0]
    for which in ("head", "worker"):
        cmds = " && ".join(config[f"{which}_setup_commands"])
        assert re.search(rf"pip install .*-e\s+{re.escape(remote)}(\s|$)", cmds), \
            f"{which}_setup_commands must `pip install -e {remote}`"
    all_cmds = " ".join(config["head_setup_commands"] + config["worker_setup_commands"]
                        + config["head_start_ray_commands"] + config["worker_start_ray_commands"])
    assert "ray-wheels" not in all_cmds, "a default (nightly wheel) command leaked in from defaults.yaml"
    head_pkg = {"aws": "boto3", "gcp": "google-api-python-client"}.get(config["provider"]["type"])
    if head_pkg:
        assert head_pkg in " ".join(config["head_setup_commands"]), f"the head's autoscaler needs {head_pkg}"
    assert ".venv" in config["rsync_exclude"]


@pytest.mark.parametrize("path", LAUNCHER_YAMLS, ids=_ids(LAUNCHER_YAMLS))
def test_launcher_images_match_installed_ray(path):
    docker = _prepared(path).get("docker") or {}
    images = [docker[k] for k in ("image", "head_image", "worker_image") if docker.get(k)]
    for t in _prepared(path)["available_node_types"].values():
        if (t.get("docker") or {}).get("worker_image"):
            images.append(t["docker"]["worker_image"])
    for image in images:
        assert image.startswith("rayproject/ray:") and f":{RAY_VERSION}-" in image, \
            f"{image}: use the Ray version of the client ({RAY_VERSION})"
    if docker:
        assert docker.get("worker_image", docker.get("image", "")).endswith("-gpu")


# ============================================================================ KubeRay

_DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_RESOURCE_PARAMS = ("num-cpus", "num-gpus", "memory", "resources")


def _kuberay_docs() -> dict[str, list[tuple[Path, dict]]]:
    docs: dict[str, list[tuple[Path, dict]]] = {}
    for path in KUBERAY_YAMLS:
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                docs.setdefault(doc.get("kind"), []).append((path, doc))
    return docs


def _version_tuple(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", v)[:3])


def _check_group(group: dict, where: str) -> dict:
    params = group.get("rayStartParams")
    assert isinstance(params, dict), f"{where}.rayStartParams must be a mapping"
    for k, v in params.items():
        assert isinstance(v, str), f"{where}.rayStartParams.{k} must be a string (KubeRay: map[string]string)"
    assert "labels" not in params, f"{where}: use the group's labels field, not rayStartParams.labels"
    if any(params.get(k) for k in _RESOURCE_PARAMS):
        assert not group.get("resources"), f"{where}: resources in both rayStartParams and resources"
    containers = group["template"]["spec"]["containers"]
    assert containers, f"{where}: at least one container"
    ray_container = containers[0]
    image = ray_container.get("image", "")
    assert image.startswith("rayproject/ray:") and f":{RAY_VERSION}-" in image, f"{where}: image {image!r}"
    assert ray_container.get("resources", {}).get("limits"), f"{where}: set resource limits"
    assert params.get("metrics-export-port"), f"{where}: metrics-export-port for Prometheus"
    return ray_container


def _check_raycluster_spec(spec: dict, where: str) -> None:
    assert _version_tuple(spec["rayVersion"]) == _version_tuple(RAY_VERSION), f"{where}.rayVersion"
    assert spec.get("authOptions", {}).get("mode") == "token", f"{where}.authOptions.mode must be token"
    assert _version_tuple(spec["rayVersion"]) >= (2, 52, 0), "token auth needs Ray >= 2.52"
    assert spec.get("enableInTreeAutoscaling") is True, f"{where}.enableInTreeAutoscaling"
    head = spec["headGroupSpec"]
    _check_group(head, f"{where}.headGroupSpec")
    assert head["rayStartParams"].get("num-cpus") == "0", f"{where}: no work on the head"
    assert head.get("serviceType", "ClusterIP") == "ClusterIP", f"{where}: never expose the head service"
    head_restart = head["template"]["spec"].get("restartPolicy")
    assert head_restart in (None, "Never")
    groups = spec.get("workerGroupSpecs") or []
    assert groups, f"{where}: worker groups"
    names = [g["groupName"] for g in groups]
    assert len(set(names)) == len(names), f"{where}: duplicate groupName"
    gpu_groups = 0
    for g in groups:
        gw = f"{where}.workerGroupSpecs[{g['groupName']}]"
        assert _DNS1035.match(g["groupName"]), gw
        assert 0 <= g["minReplicas"] <= g.get("replicas", g["minReplicas"]) <= g["maxReplicas"], gw
        assert g["maxReplicas"] >= 1 and not g.get("suspend"), gw
        container = _check_group(g, gw)
        limits = container["resources"]["limits"]
        if int(limits.get("nvidia.com/gpu", 0)) > 0:
            gpu_groups += 1
            assert g["minReplicas"] < g["maxReplicas"], f"{gw}: GPU workers must autoscale"
            assert container["image"].endswith("-gpu"), f"{gw}: CUDA image for GPU pods"
    assert gpu_groups, f"{where}: at least one GPU worker group"


def test_kuberay_manifests_parse_with_required_kinds():
    docs = _kuberay_docs()
    assert {p.name for p in KUBERAY_YAMLS} >= {"raycluster.yaml", "rayjob.yaml"}
    assert docs.get("RayCluster") and docs.get("RayJob")
    for kind in ("RayCluster", "RayJob"):
        for path, doc in docs[kind]:
            assert doc["apiVersion"] == "ray.io/v1", path
            name = doc["metadata"]["name"]
            assert _DNS1035.match(name) and len(name) <= 47, f"{path}: metadata.name {name!r}"


def test_raycluster_fields():
    for path, doc in _kuberay_docs()["RayCluster"]:
        _check_raycluster_spec(doc["spec"], f"{path.name}:spec")
        assert doc["spec"].get("autoscalerOptions", {}).get("idleTimeoutSeconds", 60) > 0


def test_rayjob_fields_and_runtime_env():
    from ray.runtime_env import RuntimeEnv

    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    dep_names = {re.split(r"[\[<>=!~; ]", d, maxsplit=1)[0].lower().replace("_", "-") for d in deps} - {"ray"}
    for path, doc in _kuberay_docs()["RayJob"]:
        spec = doc["spec"]
        _check_raycluster_spec(spec["rayClusterSpec"], f"{path.name}:spec.rayClusterSpec")
        assert spec.get("shutdownAfterJobFinishes") is True
        assert spec.get("ttlSecondsAfterFinished", 0) >= 0
        assert spec.get("activeDeadlineSeconds", 1) > 0 and spec.get("backoffLimit", 0) >= 0
        env = yaml.safe_load(spec["runtimeEnvYAML"])
        RuntimeEnv(**env)  # Ray's own validation of the runtime environment (offline)
        assert env.get("working_dir"), "the job needs the repository as working_dir"
        pip = env.get("pip") or []
        pkgs = pip.get("packages", []) if isinstance(pip, dict) else pip
        pip_names = {re.split(r"[\[<>=!~; ]", p, maxsplit=1)[0].lower().replace("_", "-") for p in pkgs}
        missing = dep_names - pip_names
        assert not missing, f"{path.name}: runtimeEnvYAML pip lacks pyproject dependencies {sorted(missing)}"


def _entrypoint_config(entrypoint: str):
    from must_ray.config import load_config

    argv = shlex.split(entrypoint)
    assert argv[0] == "python" and argv[1].startswith("jobs/"), entrypoint
    config = REPO / argv[argv.index("--config") + 1]
    sets = [argv[i + 1] for i, a in enumerate(argv) if a == "--set"]
    return argv[1], load_config(config, sets)


def test_rayjob_entrypoint_is_a_valid_must_ray_run():
    from must_ray.storage import local_path

    for path, doc in _kuberay_docs()["RayJob"]:
        script, cfg = _entrypoint_config(doc["spec"]["entrypoint"])
        assert script == "jobs/pipeline.py"
        # the cluster sets MUST_RAY_MULTI_NODE=1 and starts from its head: the run must write to a URI
        assert local_path(cfg.paths.root) is None, f"{path.name}: paths.root {cfg.paths.root} is a local path"


def test_rayjob_entrypoint_script_exists():
    for _, doc in _kuberay_docs()["RayJob"]:
        script = shlex.split(doc["spec"]["entrypoint"])[1]
        if not (REPO / script).is_file():
            pytest.skip(f"{script} has not landed yet")


# ============================================================================ capacity


def _quantity(value) -> float:
    """A Kubernetes CPU quantity ("500m", "8", 4) as a number."""
    s = str(value)
    return float(s[:-1]) / 1000 if s.endswith("m") else float(s)


def _node_types(path: Path, doc: dict | None = None) -> list[tuple[str, int, float, float]]:
    """``(name, max nodes, CPUs, GPUs)`` of every node type of a cluster definition, head included."""
    if doc is None:  # cluster launcher
        config = _prepared(path)
        out = []
        for name, t in config["available_node_types"].items():
            count = 1 if name == config["head_node_type"] else t["max_workers"]
            out.append((name, count, float(t["resources"].get("CPU", 0)), float(t["resources"].get("GPU", 0))))
        return out
    spec = doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]
    groups = [("head", 1, spec["headGroupSpec"])] + [(g["groupName"], g["maxReplicas"], g) for g in spec["workerGroupSpecs"]]
    out = []
    for name, count, g in groups:
        params = g.get("rayStartParams", {})
        limits = g["template"]["spec"]["containers"][0].get("resources", {}).get("limits", {})
        cpu = _quantity(params["num-cpus"]) if "num-cpus" in params else _quantity(limits.get("cpu", 0))
        gpu = _quantity(params["num-gpus"]) if "num-gpus" in params else _quantity(limits.get("nvidia.com/gpu", 0))
        out.append((name, count, cpu, gpu))
    return out


def _cluster_defs() -> list[tuple[str, list[tuple[str, int, float, float]]]]:
    defs = [(str(p.relative_to(REPO)), _node_types(p)) for p in LAUNCHER_YAMLS]
    for kind in ("RayCluster", "RayJob"):
        for path, doc in _kuberay_docs().get(kind, []):
            defs.append((f"{path.relative_to(REPO)}:{kind}", _node_types(path, doc)))
    return defs


def _demands(cfg) -> list[tuple[str, int, float, float]]:
    """``(step, max workers, CPUs each, GPUs each)`` of the Ray Train runs and labelling actors."""
    out = []
    for role in ("teacher", "student"):
        scaling = getattr(cfg, role).scaling
        gpus = float(getattr(scaling, "gpus_per_worker", 1.0)) if scaling.use_gpu else 0.0
        out.append((f"{role}.scaling.num_workers", int(scaling.num_workers[1]), float(scaling.cpus_per_worker), gpus))
    lab = cfg.label
    out.append(("label.actors", int(lab.actors[1]), float(lab.num_cpus_per_actor), float(lab.num_gpus_per_actor)))
    return out


def _bundles_per_node(node_cpu: float, node_gpu: float, cpu: float, gpu: float) -> int:
    fits = []
    for have, need in ((node_cpu, cpu), (node_gpu, gpu)):
        if need > 0:
            fits.append(math.floor(have / need + 1e-9))
    return min(fits) if fits else 10**9


def capacity_problems(cfg, node_types) -> list[str]:
    """Why ``cfg``'s workers cannot all be placed on a cluster of ``node_types`` at full scale."""
    problems = []
    for step, n, cpu, gpu in _demands(cfg):
        per_type = {name: count * _bundles_per_node(c, g, cpu, gpu) for name, count, c, g in node_types}
        if not any(_bundles_per_node(c, g, cpu, gpu) >= 1 for _, _, c, g in node_types):
            problems.append(f"{step}: one worker ({cpu:g} CPU, {gpu:g} GPU) fits no node type")
        elif sum(per_type.values()) < n:
            problems.append(f"{step}: max {n} workers ({cpu:g} CPU, {gpu:g} GPU each) > {sum(per_type.values())} "
                            f"that fit at full scale ({per_type})")
    return problems


CLUSTER_DEFS = _cluster_defs()


@pytest.mark.parametrize("config_path", JOB_CONFIGS, ids=_ids(JOB_CONFIGS))
@pytest.mark.parametrize("cluster", CLUSTER_DEFS, ids=[c[0] for c in CLUSTER_DEFS])
def test_job_config_worker_ranges_fit_the_cluster(config_path, cluster):
    from must_ray.config import load_config

    name, node_types = cluster
    problems = capacity_problems(load_config(config_path), node_types)
    assert not problems, f"{config_path.name} on {name}: " + "; ".join(problems)


@pytest.mark.parametrize("cluster", CLUSTER_DEFS, ids=[c[0] for c in CLUSTER_DEFS])
def test_capacity_check_catches_oversized_configs(cluster):
    from must_ray.config import load_config

    _, node_types = cluster
    demo = REPO / "jobs" / "configs" / "demo.yaml"
    # the GPU settings cluster/README.md suggests fit every cluster ...
    ok = load_config(demo, ["student.scaling.use_gpu=true", "student.scaling.num_workers=[1,8]",
                            "label.num_gpus_per_actor=1", "label.actors=[1,8]"])
    assert not capacity_problems(ok, node_types)
    # ... a GPU worker count beyond the node types' max_workers x GPUs does not
    too_many = load_config(demo, ["student.scaling.use_gpu=true", "student.scaling.num_workers=[1,1000]",
                                  "student.global_batch_size=4096"])
    assert any("student.scaling.num_workers" in p for p in capacity_problems(too_many, node_types))
    # ... nor an actor larger than every node
    too_big = load_config(demo, ["label.num_gpus_per_actor=64"])
    assert any("fits no node type" in p for p in capacity_problems(too_big, node_types))
