"""The S3-compatible server on loopback and adapter publishing: a real moto server, real pyarrow
S3 and boto3 clients over HTTP."""

from __future__ import annotations

import importlib.util
import json
import os
from types import SimpleNamespace

import pytest

from icm.errors import InputError

needs_moto = pytest.mark.skipif(importlib.util.find_spec("moto") is None,
                                reason="moto is not installed (the vllm-cpu extra)")


@needs_moto
def test_published_adapter_is_read_back_by_boto3_like_rays_loader(tmp_path):
    import boto3

    from icm.object_store import LocalS3
    from icm.serving import publish_adapter

    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"r": 4, "max_length": None}))
    (folder / "adapter_model.safetensors").write_bytes(b"weights" * 100)
    (folder / "icm_generation.json").write_text("{}")  # the engine needs only the peft files
    adapter_id = "a" * 24
    before = os.environ.get("AWS_ENDPOINT_URL_S3")
    with LocalS3(bucket="test-adapters") as s3:
        uri = publish_adapter(folder, f"{s3.uri}/adapters", adapter_id)
        assert uri == f"s3://test-adapters/adapters/{adapter_id}"
        client = boto3.client("s3")  # endpoint and credentials from the environment
        listed = client.list_objects_v2(Bucket="test-adapters", Prefix=f"adapters/{adapter_id}/")
        names = sorted(o["Key"].rsplit("/", 1)[-1] for o in listed["Contents"])
        assert names == ["adapter_config.json", "adapter_model.safetensors"]
        body = client.get_object(Bucket="test-adapters",
                                 Key=f"adapters/{adapter_id}/adapter_model.safetensors")["Body"]
        assert body.read() == b"weights" * 100
    assert os.environ.get("AWS_ENDPOINT_URL_S3") == before  # the environment is restored


def test_publish_refuses_a_bad_adapter_id(tmp_path):
    from icm.serving import publish_adapter

    with pytest.raises(InputError):
        publish_adapter(tmp_path, "s3://bucket/adapters", "../escape")


def test_engine_refuses_a_generator_it_cannot_load():
    from serve_apps.vllm_args import VllmArgs, check_engine_takes as check

    ok = SimpleNamespace(peft_config={"r": 8, "target_modules": ["q_proj", "v_proj"]})
    check(ok, VllmArgs(max_lora_rank=8))
    too_big = SimpleNamespace(peft_config={"r": 32, "target_modules": ["q_proj"]})
    with pytest.raises(InputError, match="vllm.max_lora_rank is 16 .* rank 32"):
        check(too_big, VllmArgs(max_lora_rank=16))
    odd_module = SimpleNamespace(peft_config={"r": 8, "target_modules": ["q_proj", "lm_head"]})
    with pytest.raises(InputError, match="lm_head"):
        check(odd_module, VllmArgs())


def test_vllm_args_refuse_a_rank_vllm_does_not_take():
    from pydantic import ValidationError

    from serve_apps.vllm_args import VllmArgs

    with pytest.raises(ValidationError, match="max_lora_rank"):
        VllmArgs(max_lora_rank=12)


def test_vllm_args_take_the_kv_cache_in_whole_gib():
    """vLLM parses VLLM_CPU_KVCACHE_SPACE with int(): 0.5 must be refused here, naming the
    field, not crash the engine replica at start-up."""
    from pydantic import ValidationError

    from serve_apps.vllm_args import VllmArgs

    with pytest.raises(ValidationError, match="cpu_kv_cache_gib"):
        VllmArgs(cpu_kv_cache_gib=0.5)
    assert VllmArgs(cpu_kv_cache_gib=2).cpu_kv_cache_gib == 2

