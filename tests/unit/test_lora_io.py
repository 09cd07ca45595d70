"""The LoRA weight contract: flat vector round trips and peft-loadable files."""

from __future__ import annotations

import json

import pytest
import torch

from icm.adapters import apply_adapter
from icm.lora_io import (LayoutError, LoraLayout, adapter_state_dict, flatten,
                         load_adapter_tensors, natural_key, save_adapter, unflatten)
from icm.models import load_base_model

PROMPT = "def add(a, b):\n    return a + b"


def _peft_tiny(rank=4, targets=("q_proj", "v_proj"), seed=0):
    """A fresh tiny-llama with a LoRA whose B is non-zero, so the adapter changes outputs."""
    from peft import LoraConfig, get_peft_model

    model, tokenizer = load_base_model("tiny-llama")
    torch.manual_seed(seed)
    peft_model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank,
                                                  target_modules=list(targets)))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.3)
    return peft_model.eval(), tokenizer


def _logits(model, tokenizer):
    with torch.inference_mode():
        return model(**tokenizer(PROMPT, return_tensors="pt")).logits


def test_natural_order_puts_layer_2_before_layer_10():
    keys = ["m.layers.10.q.lora_A.weight", "m.layers.2.q.lora_B.weight", "m.layers.2.q.lora_A.weight"]
    assert sorted(keys, key=natural_key) == [keys[2], keys[1], keys[0]]


def test_flatten_unflatten_round_trip_and_layout_file(tmp_path):
    peft_model, _ = _peft_tiny()
    state = adapter_state_dict(peft_model)
    layout = LoraLayout.of(state)
    # 2 layers x (q: A 4x64 + B 64x4, v: A 4x64 + B 32x4) for the tiny model (2 KV heads of 16)
    assert layout.numel == 2 * (4 * 64 + 64 * 4 + 4 * 64 + 32 * 4)
    vector = flatten(state, layout)  # (numel,)
    assert vector.shape == (layout.numel,) and vector.dtype == torch.float32
    back = unflatten(vector, layout)
    assert all(torch.equal(back[k], state[k]) for k in state)
    layout.save(tmp_path / "layout.json")
    assert LoraLayout.load(tmp_path / "layout.json") == layout
    assert json.loads((tmp_path / "layout.json").read_text())["numel"] == layout.numel


def test_saved_vector_loads_in_peft_with_identical_logits(tmp_path):
    peft_model, tokenizer = _peft_tiny()
    state = adapter_state_dict(peft_model)
    layout = LoraLayout.of(state)
    rebuilt = unflatten(flatten(state, layout), layout)
    save_adapter(rebuilt, peft_model.peft_config["default"], tmp_path / "adapter",
                 extra_files={"lora_layout.json": layout.to_json()})
    assert {p.name for p in (tmp_path / "adapter").iterdir()} == {
        "adapter_config.json", "adapter_model.safetensors", "lora_layout.json"}
    fresh_base, _ = load_base_model("tiny-llama")
    loaded = apply_adapter(fresh_base, tmp_path / "adapter")
    assert torch.equal(_logits(loaded, tokenizer), _logits(peft_model, tokenizer))
    plain_base, _ = load_base_model("tiny-llama")
    assert not torch.allclose(_logits(plain_base, tokenizer), _logits(loaded, tokenizer))
    tensors, config = load_adapter_tensors(tmp_path / "adapter")
    assert config["r"] == 4 and sorted(config["target_modules"]) == ["q_proj", "v_proj"]
    assert torch.equal(flatten(tensors, layout), flatten(state, layout))


def test_mismatches_name_what_differs():
    state = adapter_state_dict(_peft_tiny(rank=4)[0])
    layout = LoraLayout.of(state)
    with pytest.raises(LayoutError, match=r"shape \(8, 64\), the layout says \(4, 64\)"):
        flatten(adapter_state_dict(_peft_tiny(rank=8)[0]), layout)
    with pytest.raises(LayoutError, match=r"missing \[.*v_proj.*other target modules"):
        flatten(adapter_state_dict(_peft_tiny(targets=("q_proj",))[0]), layout)
    with pytest.raises(LayoutError, match=f"1-D vector of {layout.numel} values"):
        unflatten(torch.zeros(layout.numel + 1), layout)


def test_smollm2_layout_size_matches_the_method_notes():
    """r=8 on q_proj, v_proj of SmolLM2-135M: 460,800 LoRA parameters (icm-method.md)."""
    from peft import LoraConfig, get_peft_model

    model, _ = load_base_model("smollm2-135m")
    peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    layout = LoraLayout.of(adapter_state_dict(peft_model))
    assert layout.numel == 460_800 and len(layout.keys) == 30 * 2 * 2
