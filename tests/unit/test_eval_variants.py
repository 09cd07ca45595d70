"""Evaluation building blocks: adapter swapping, baselines, and the report's arithmetic."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from icm.adapter_swap import SwappableLora
from icm.adapters import apply_adapter
from icm.baselines import cosine, gap_recovered, model_soup, nearest_task, shuffled_partner
from icm.eval_report import headline, markdown_report, per_task, variant_summary
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
    partners = {t: shuffled_partner(t, list(means)) for t in means}
    assert all(p != t for t, p in partners.items()) and sorted(partners.values()) == sorted(means)
    assert cosine([1, 0], [0, 1]) == 0.0 and cosine([2, 2], [1, 1]) == pytest.approx(1.0)
    assert gap_recovered(100.0, 100.0, 50.0) == 0.0
    assert gap_recovered(100.0, 50.0, 50.0) == pytest.approx(1.0)
    assert gap_recovered(100.0, 200.0, 50.0) < 0
    assert math.isnan(gap_recovered(50.0, 40.0, 60.0))  # the reference does not beat base


def _results() -> pd.DataFrame:
    rows = []
    ppl = {"seen1": {"base": 40, "trained": 20, "generated": [21, 23], "soup": 30, "multitask": 25},
           "seen2": {"base": 10, "trained": 8, "generated": [8.2, 8.2], "soup": 9, "multitask": 8.5},
           "new1": {"base": 50, "generated": [40, 44], "soup": 45, "multitask": 35}}
    for task, variants in ppl.items():
        for variant, values in variants.items():
            for sample, value in enumerate(values if isinstance(values, list) else [values]):
                rows.append({"task": task, "group": "g", "heldout": task.startswith("new"),
                             "variant": variant, "sample": sample, "perplexity": float(value),
                             "bits_per_char": 1.0, "cosine_to_trained": None, "adapter_seconds": 0.1})
    return pd.DataFrame(rows)


def test_report_aggregates_samples_and_relates_to_the_right_reference(tmp_path):
    table = per_task(_results())
    row = table.query("task == 'seen1' and variant == 'generated'").iloc[0]
    assert row.ppl == 22 and row.samples == 2 and row.ppl_std == pytest.approx(np.std([21, 23], ddof=1))
    assert row.ratio_to_reference == pytest.approx(22 / 20)  # seen: the task's trained LoRA
    assert row.gap_recovered == pytest.approx((math.log(40) - math.log(22)) / (math.log(40) - math.log(20)))
    new = table.query("task == 'new1' and variant == 'generated'").iloc[0]
    assert new.ratio_to_reference == pytest.approx(42 / 35)  # held-out: the multi-task LoRA
    numbers = headline(table)
    assert numbers["seen_median_ratio_generated_to_trained"] == pytest.approx(np.median([22 / 20, 8.2 / 8]))
    assert numbers["heldout_share_generated_beats_base"] == 1.0
    assert numbers["heldout_share_generated_beats_multitask"] == 0.0  # reported even when it loses
    summary = variant_summary(table)
    assert set(summary["split"]) == {"seen", "held-out"}
    text = markdown_report(table, command="icm run --config x", config_yaml="a: 1", title="T")
    assert "| seen_median_ratio_generated_to_trained |" in text and "icm run --config x" in text
    from icm.eval_report import plot_gap_by_group, plot_per_task

    for plot in (plot_per_task, plot_gap_by_group):
        assert plot(table, tmp_path / f"{plot.__name__}.png").stat().st_size > 5_000
