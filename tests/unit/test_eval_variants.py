"""Evaluation building blocks: adapter swapping and the simple baselines (the report: test_eval_report.py)."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

from icm.adapter_swap import SwappableLora
from icm.adapters import apply_adapter
from icm.baselines import (cosine, gap_recovered, model_soup, nearest_task, other_group_partner,
                           shuffled_partner)
from icm.evaluation import score_texts
from icm.lora_io import LoraLayout, adapter_state_dict, peft_config_json, save_adapter
from icm.models import load_base_model

TEXTS = ["The cat sat on the mat.", "def add(a, b):\n    return a + b\n", "Dogs bark at night."]


def _random_adapters(count: int) -> tuple[list[torch.Tensor], LoraLayout, dict]:
    from peft import LoraConfig, get_peft_model

    model, _ = load_base_model("tiny-llama")
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    state = adapter_state_dict(peft_model)
    layout = LoraLayout.of(state)
    generator = torch.Generator().manual_seed(0)
    vectors = [torch.randn(layout.numel, generator=generator) * 0.3 for _ in range(count)]
    return vectors, layout, peft_config_json(peft_model.peft_config["default"])


def test_swapped_adapters_score_exactly_like_fresh_peft_loads(tmp_path):
    vectors, layout, config = _random_adapters(2)
    model, tokenizer = load_base_model("tiny-llama")
    swap = SwappableLora(model, config, layout)
    base_alone = score_texts(load_base_model("tiny-llama")[0], tokenizer, TEXTS).perplexity
    assert swap.score(tokenizer, TEXTS, max_length=64, batch_size=2, base=True).perplexity == \
        pytest.approx(base_alone, rel=1e-6)
    for index, vector in enumerate(vectors):
        from icm.lora_io import unflatten

        save_adapter(unflatten(vector, layout), config, tmp_path / f"a{index}")
        fresh = apply_adapter(load_base_model("tiny-llama")[0], tmp_path / f"a{index}")
        expected = score_texts(fresh, tokenizer, TEXTS, max_length=64).perplexity
        swap.load(vector)
        got = swap.score(tokenizer, TEXTS, max_length=64, batch_size=2).perplexity
        assert got == pytest.approx(expected, rel=1e-5) and not math.isclose(got, base_alone, rel_tol=1e-3)
    # the base model stays reachable after adapters were loaded
    assert swap.score(tokenizer, TEXTS, max_length=64, batch_size=2, base=True).perplexity == \
        pytest.approx(base_alone, rel=1e-6)


def test_swap_rejects_a_vector_of_another_layout():
    vectors, layout, config = _random_adapters(1)
    swap = SwappableLora(load_base_model("tiny-llama")[0], config, layout)
    from icm.lora_io import LayoutError

    with pytest.raises(LayoutError, match="1-D vector"):
        swap.load(torch.zeros(layout.numel + 1))


def test_soup_nearest_shuffled_and_gap():
    soup = model_soup({"a": torch.tensor([1.0, 3.0]), "b": torch.tensor([3.0, 5.0])})
    assert torch.equal(soup, torch.tensor([2.0, 4.0]))
    means = {"a": np.array([1.0, 0.0]), "b": np.array([0.0, 1.0]), "c": np.array([0.9, 0.1])}
    assert nearest_task(np.array([1.0, 0.05]), means) == "a"
    assert nearest_task(means["a"], means, exclude=["a"]) == "c"  # never the task itself
    frozen = {t: v.copy() for t, v in means.items()}
    for vector in frozen.values():
        vector.flags.writeable = False  # task vectors read from parquet are read-only
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch warns when it cannot share a read-only array
        assert nearest_task(frozen["a"], frozen, exclude=["a"]) == "c"
    partners = {t: shuffled_partner(t, list(means)) for t in means}
    assert all(p != t for t, p in partners.items()) and sorted(partners.values()) == sorted(means)
    groups = {"a1": "a", "a2": "a", "b1": "b", "c1": "c", "c2": "c"}
    assert other_group_partner("a1", groups, ["a2", "b1", "c1"]) == "b1"
    assert other_group_partner("c1", groups, ["a1", "b1", "c2"]) == "a1"  # wraps, never c2
    assert other_group_partner("b1", groups, ["b1", "c2", "a2"]) == "c2"  # only the candidates
    with pytest.raises(ValueError, match="control-other-group: 'a1' has no training task outside"):
        other_group_partner("a1", groups, ["a2"])
    assert cosine([1, 0], [0, 1]) == 0.0 and cosine([2, 2], [1, 1]) == pytest.approx(1.0)
    assert gap_recovered(100.0, 100.0, 50.0) == 0.0
    assert gap_recovered(100.0, 50.0, 50.0) == pytest.approx(1.0)
    assert gap_recovered(100.0, 200.0, 50.0) < 0
    assert math.isnan(gap_recovered(50.0, 40.0, 60.0))  # the reference does not beat base
