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



def _stored_adapter(store, adapter_id):
    folder = store.path(adapter_id)
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps({"r": 4}))
    (folder / "adapter_model.safetensors").write_bytes(b"weights")
    return folder


def test_an_adapter_whose_publish_failed_is_not_ready_and_is_published_again(tmp_path):
    """The bug: the generator deployment called any stored adapter cached, so one whose publish to
    the vLLM engine's URI failed once (or that predates the URI) 404'd on completion forever.
    The real deployment class, Ray-free: its store and publish path are plain files here."""
    import asyncio
    import threading

    from icm.serving import AdapterStore
    from serve_apps.lora_generator import AdapterGeneratorDeployment

    store, adapter_id = AdapterStore(tmp_path / "store"), "b" * 24
    _stored_adapter(store, adapter_id)
    blocker = tmp_path / "engine"
    blocker.write_text("a file where the publish folder should be")  # the publish fails
    uri = str(blocker / "adapters")
    deployment = object.__new__(AdapterGeneratorDeployment.func_or_class)
    deployment.store, deployment.publish_uri, deployment.lock_timeout_s = store, uri, 5.0
    deployment.inflight, deployment.lock = {}, threading.Lock()

    def create():
        return asyncio.run(deployment._create_once(adapter_id, None))

    assert store.exists(adapter_id) and not store.ready(adapter_id, uri)
    with pytest.raises(OSError):
        create()
    assert not store.ready(adapter_id, uri)  # still owed a publish
    blocker.unlink()
    first = create()
    assert first["cached"] is True and "publish_s" in first["timings"]
    assert (blocker / "adapters" / adapter_id / "adapter_model.safetensors").read_bytes() == b"weights"
    assert store.ready(adapter_id, uri) and store.published_uris(adapter_id) == [uri]
    assert create() == {"cached": True, "timings": {}}  # published: nothing to do
    assert not store.ready(adapter_id, str(tmp_path / "another-engine"))  # a new URI publishes anew
    assert store.ready(adapter_id)  # the hf engine needs no publish


def test_published_marker_is_not_packed_into_the_adapter(tmp_path):
    import io
    import tarfile

    from icm.serving import AdapterStore, pack_adapter

    store, adapter_id = AdapterStore(tmp_path / "store"), "c" * 24
    _stored_adapter(store, adapter_id)
    store.publish(adapter_id, str(tmp_path / "engine"))
    with tarfile.open(fileobj=io.BytesIO(pack_adapter(store.path(adapter_id), adapter_id))) as packed:
        names = sorted(name.rsplit("/", 1)[-1] for name in packed.getnames())
    assert names == ["adapter_config.json", "adapter_model.safetensors"]


class _GeneratorHandle:
    """Stands in for the AdapterGenerator's Ray handle only: records which ids it was asked for."""

    def __init__(self):
        self.asked = []
        self.create = SimpleNamespace(remote=self._create)

    async def _create(self, adapter_id, spec):
        self.asked.append(adapter_id)
        return {"cached": False, "timings": {}}


def _front(store, *, encoder_dtype, publish_uri=None):
    """The real ingress half (its metrics need no Ray), with the generator handle stood in."""
    from serve_apps.lora_generator import AdapterFront
    from ray.util import metrics

    from icm.serving import ServeLimits

    front = object.__new__(AdapterFront)
    front.generator, front.limits, front.model_prefix = _GeneratorHandle(), ServeLimits(), "m:"
    front.fingerprint, front.encoder_dtype, front.publish_uri = "g" * 64, encoder_dtype, publish_uri
    front.store = store
    front.hits = front.misses = metrics.Counter("test_front_total", description="test")
    front.request_latency = metrics.Histogram("test_front_s", description="test", boundaries=[1],
                                              tag_keys=("cached",))
    return front


def test_ingress_names_adapters_by_encoder_dtype_and_counts_only_published_ones_cached(tmp_path):
    """Two bugs of the ingress: a bfloat16 app sharing a store with a float32 one answered the
    float32 adapter as its own (the id ignored the encoder's dtype), and the vLLM app answered
    'cached' for a stored adapter its engine could not load (never published)."""
    import asyncio

    from icm.serving import AdapterRequest, AdapterStore

    store = AdapterStore(tmp_path / "store")
    request = AdapterRequest(description="Sayings about cats.")
    float32 = _front(store, encoder_dtype="float32")
    first = asyncio.run(float32.create(request))
    assert not first.cached and float32.generator.asked == [first.adapter_id]
    _stored_adapter(store, first.adapter_id)  # what the generator deployment writes
    assert asyncio.run(float32.create(request)).cached  # hf engine: stored is ready

    bfloat16 = _front(store, encoder_dtype="bfloat16")
    other = asyncio.run(bfloat16.create(request))
    assert other.adapter_id != first.adapter_id and bfloat16.generator.asked == [other.adapter_id]

    uri = str(tmp_path / "engine")
    vllm_front = _front(store, encoder_dtype="float32", publish_uri=uri)
    assert not asyncio.run(vllm_front.create(request)).cached  # stored, not published: generator
    store.publish(first.adapter_id, uri)
    assert asyncio.run(vllm_front.create(request)).cached
