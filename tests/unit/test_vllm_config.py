"""The LLMServer config the vLLM engine is started with (no engine started: Ray Serve LLM's
LLMConfig only)."""

import importlib.util
from types import SimpleNamespace

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("vllm") is None,
                                reason="vLLM is not installed (scripts/bootstrap.sh installs it)")

GENERATOR = SimpleNamespace(peft_config={"r": 4, "target_modules": ["v_proj", "q_proj"]},
                            model_spec="smollm2-135m")


def _config(**vllm):
    from serve_apps.lora_generator import GeneratorAppArgs
    from serve_apps.vllm_app import llm_config

    args = GeneratorAppArgs.model_validate({
        "generator_dir": "unused", "engine": "vllm",
        "vllm": {"device": "cpu", "adapter_uri": "s3://bucket/adapters", **vllm}})
    return llm_config(args, GENERATOR, "/models/smollm2", {})


def test_lora_layers_only_on_the_modules_the_generator_targets():
    engine = _config().engine_kwargs
    assert engine["lora_target_modules"] == ["q_proj", "v_proj"]
    assert engine["enable_lora"] and engine["max_lora_rank"] == 16


def test_cpu_replica_environment():
    env = _config(cpu_kv_cache_gib=2).runtime_env["env_vars"]
    assert env == {"VLLM_CPU_KVCACHE_SPACE": "2", "VLLM_CPU_OMP_THREADS_BIND": "auto"}
    # unbound replicas get one OpenMP thread per reserved CPU, never torch's one per core
    unbound = _config(cpu_threads_bind="nobind", cpus=0.5).runtime_env["env_vars"]
    assert unbound["OMP_NUM_THREADS"] == "1"
    assert _config(cpu_threads_bind="nobind", cpus=2).runtime_env["env_vars"]["OMP_NUM_THREADS"] == "2"


def test_a_cpu_replica_reserves_only_its_engine_bundle():
    config = _config(cpus=0.8)
    assert config.placement_group_config["bundles"] == [{"CPU": 0.8}]
    assert config.deployment_config["ray_actor_options"]["num_cpus"] == 0
