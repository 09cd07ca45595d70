"""EVAL.md's numbers from per-text results: gap to oracle, strongest baseline, intervals."""

from __future__ import annotations

import math
import re

import numpy as np
import pandas as pd
import pytest

from icm.eval.report import (comparison_table, headline_numbers, headline_table, markdown_report,
                             per_text, plot_per_task, seen_table, stacked_table,
                             strongest_baseline, task_log_ppl)


def _results(generated_shift: float = -0.3, seed: int = 0, levels: dict | None = None) -> pd.DataFrame:
    """Per text, log ppl base 4.0, oracle 3.0, generated 4.0 + shift, soup 3.6, nearest 3.8;
    generated has two samples whose mean is that; 12 held-out tasks + 6 fold tasks + 4 seen."""
    rng = np.random.default_rng(seed)
    rows = []
    levels = {"base": 4.0, "oracle": 3.0, "soup": 3.6, "nearest": 3.8, **(levels or {})}
    tasks = [("heldout", None, f"h{i}") for i in range(12)] + [("fold", i % 2, f"f{i}") for i in range(6)]
    tasks += [("seen", None, f"s{i}") for i in range(4)]
    for setting, fold, task in tasks:
        tokens = rng.integers(20, 48, size=32)
        noise = rng.normal(0, 0.05, size=32)
        def add(variant, level, sample=None, **extra):
            nll = (level + noise + rng.normal(0, 0.01, size=32)) * tokens
            rows.append({"task": task, "group": "g", "setting": setting, "fold": fold, "variant": variant,
                         "sample": sample, "text_nll": nll.tolist(), "text_tokens": tokens.tolist(),
                         "perplexity": float(np.exp(nll.sum() / tokens.sum())),
                         "delta_cosine_to_oracle": 0.5, **extra})
        for variant, level in levels.items():
            add(variant, level)
        add("generated", 4.0 + generated_shift - 0.05, sample=0)
        add("generated", 4.0 + generated_shift + 0.05, sample=1)
        if setting == "seen":
            add("replicate", 3.02)
    return pd.DataFrame(rows)


def test_samples_are_pooled_per_text_and_tasks_paired():
    results = _results()
    paired = per_text(results[results["setting"] == "heldout"], ["generated", "base"])
    assert len(paired.keys) == 12 and all(len(t) == 32 for t in paired.tokens)
    table = task_log_ppl(results)
    assert table["generated"].mean() == pytest.approx(3.7, abs=0.02)  # mean of the two samples


def test_headline_gap_and_strongest_baseline_both_ways():
    better = _results(generated_shift=-0.8)  # log ppl 3.2: gap recovered 0.8, beats soup (3.6)
    held = better[better["setting"] == "heldout"]
    assert strongest_baseline(held) == "soup"
    row = headline_table(better, folds=[["a"], ["b"]], resamples=300, seed=0).iloc[0]
    low, high = map(float, row["generated: gap to oracle recovered, median [95% CI]"]
                    .split("[")[1].rstrip("]").split(","))
    assert low < 0.8 < high and high - low < 0.1
    assert row["wins"].startswith("12/12")
    every = comparison_table(held, resamples=200, seed=0).set_index("variant")
    # the same shift on every task (log ppl 3.2 against the soup's 3.6): the typical task's
    # ratio is the geometric mean's, up to the texts' noise
    assert float(every.loc["soup", "median task ratio"]) == pytest.approx(math.exp(-0.4), abs=0.01)
    assert every.loc["generated", "median task ratio"] == ""
    worse = _results(generated_shift=-0.2)  # log ppl 3.8: worse than the soup, reported as such
    numbers = headline_numbers(worse, resamples=200)
    assert numbers["heldout_ratio_to_strongest_baseline"] > 1.1
    assert numbers["fold_gap_recovered_median"] == pytest.approx(0.2, abs=0.05)


def test_report_has_the_headline_every_setting_the_noise_floor_and_a_plot(tmp_path):
    results = _results()
    text = markdown_report(results, command="icm run --config study", config_yaml="a: 1", title="T",
                           resamples=200, folds=[["g1"], ["g2"]])
    assert "## Headline: tasks the generator never saw" in text and "fixed held-out set" in text
    assert "group folds (2 folds pooled)" in text and "fold 1: g2" in text
    assert "Seen tasks: against their own trained LoRA" in text and "icm run --config study" in text
    # every-variant rows end in the median task ratio, printed to three decimals as computed
    # (generated 3.7 against soup 3.6 -> exp(0.1) = 1.105), not shortened by the markdown writer
    soup_rows = [line for line in text.splitlines()
                 if line.startswith("| soup ") and "| True " in line]  # held-out, folds
    assert len(soup_rows) == 2
    assert all(re.search(r"\| 1\.1\d\d +\|$", line) for line in soup_rows)
    seen = seen_table(results, 200, 0).set_index("variant")
    assert seen.loc["replicate", "ppl / trained LoRA [95% CI]"].startswith("1.0")
    assert plot_per_task(results, tmp_path / "p.png").stat().st_size > 5_000


def test_a_generated_only_run_still_gets_its_report_and_plot(tmp_path):
    """eval-compare's other runs score only `generated`: no base, no oracle, no baselines."""
    results = _results().query("variant == 'generated'")
    text = markdown_report(results, command="c", config_yaml="", title="T", resamples=50)
    assert "## Headline" in text and "n/a" in text
    assert plot_per_task(results, tmp_path / "p.png").is_file()


def _coloured_pixels(png) -> int:
    """Pixels of a saved plot that are neither white, black nor grey: the bars."""
    from matplotlib.image import imread

    rgb = imread(png)[..., :3]  # (H, W, 3) in [0, 1]
    return int(((rgb.max(axis=-1) - rgb.min(axis=-1)) > 0.2).sum())


def test_a_seen_only_run_plots_its_seen_tasks_not_an_empty_frame(tmp_path):
    """evaluate.heldout=false scores seen tasks only; their plot drew nothing before."""
    results = _results()
    seen_only = plot_per_task(results[results["setting"] == "seen"], tmp_path / "seen.png")
    empty = plot_per_task(results.query("variant == 'generated'"), tmp_path / "empty.png")
    assert _coloured_pixels(empty) == 0
    assert _coloured_pixels(seen_only) > 1_000


def test_stacked_adapters_are_judged_against_the_multitask_lora_under_the_prompt_when_scored():
    """in-context+multitask (3.1) is the strongest stacked rival: in-context+generated (3.2)
    loses to it, and the column exists only when that opt-in variant was scored."""
    levels = {"in-context": 3.4, "in-context+generated": 3.2, "in-context+multitask": 3.1}
    results = _results(levels=levels).query("setting == 'heldout'")
    table = stacked_table(results, 300, 0).set_index(["setting", "variant"])
    worse = table.loc[("held-out", "in-context+generated"), "/ in-context+multitask"]
    assert float(worse.split("[")[1].split(",")[0]) > 1.0 and worse.endswith("(0/12)")
    assert table.loc[("held-out", "in-context+multitask"), "/ in-context+multitask"] == ""
    without = stacked_table(results.query("variant != 'in-context+multitask'"), 100, 0)
    assert "/ in-context+multitask" not in without.columns


def test_every_adapter_baseline_under_the_prompt_is_a_rival_of_the_stacked_generator():
    """Similarity-soup, nearest and ridge under the prompt are rival columns where scored (the
    best of them, 3.1, beats in-context+generated 3.2); the oracle under it is not a rival."""
    levels = {"in-context": 3.4, "in-context+generated": 3.2, "in-context+similarity-soup": 3.1,
              "in-context+nearest": 3.3, "in-context+ridge": 3.25, "in-context+oracle": 2.9}
    results = _results(levels=levels).query("setting == 'heldout'")
    table = stacked_table(results, 300, 0).set_index(["setting", "variant"])
    assert [c for c in table.columns if c.startswith("/")] == [
        "/ in-context", "/ in-context+similarity-soup", "/ in-context+nearest",
        "/ in-context+ridge"]
    row = table.loc[("held-out", "in-context+generated")]
    assert row["/ in-context+similarity-soup"].endswith("(0/12)")
    assert row["/ in-context+nearest"].endswith("(12/12)")
    assert row["/ in-context+ridge"].endswith("(12/12)")


def test_an_adapter_under_a_description_only_prompt_is_judged_against_that_prompt_alone():
    """in-context-description+generated 3.3 against in-context-description 3.6 (its rival), not
    against the prompt with demonstrations (3.4); and the 'both' rows get no such column."""
    levels = {"in-context": 3.4, "in-context+generated": 3.2, "in-context-description": 3.6,
              "in-context-description+generated": 3.3}
    results = _results(levels=levels).query("setting == 'heldout'")
    table = stacked_table(results, 300, 0).set_index(["setting", "variant"])
    described = table.loc[("held-out", "in-context-description+generated")]
    assert described["/ in-context-description"].endswith("(12/12)")
    assert described["/ in-context"] == ""
    assert table.loc[("held-out", "in-context+generated"), "/ in-context-description"] == ""
    assert table.loc[("held-out", "in-context+generated"), "/ in-context"].endswith("(12/12)")
    without = stacked_table(results.query("variant != 'in-context-description'"), 100, 0)
    assert "/ in-context-description" not in without.columns


def test_a_finetuned_adapter_is_also_judged_against_the_adapter_it_started_from():
    levels = {"in-context": 3.4, "in-context+generated[M]": 3.2,
              "in-context+generated-finetuned[M]": 3.1}
    results = _results(levels=levels).query("setting == 'heldout'")
    table = stacked_table(results, 300, 0).set_index(["setting", "variant"])
    tuned = table.loc[("held-out", "in-context+generated-finetuned[M]")]
    assert tuned["/ in-context+generated[M]"].endswith("(12/12)")
    assert tuned["/ in-context"].endswith("(12/12)")
    assert table.loc[("held-out", "in-context+generated[M]"), "/ in-context+generated[M]"] == ""


def test_a_draw_with_a_condition_is_also_judged_against_the_same_generators_blind_mode():
    """in-context+generated-half[D] 3.15 beats in-context+generated-blind[D] 3.2 under the same
    prompt (12/12); the blind mode gets no column of its own, nor another run's blind mode."""
    levels = {"in-context": 3.4, "in-context+generated-blind[D]": 3.2,
              "in-context+generated-half[D]": 3.15, "in-context+generated[D]": 3.25,
              "in-context+generated[E]": 3.1}
    results = _results(levels=levels).query("setting == 'heldout'")
    table = stacked_table(results, 300, 0).set_index(["setting", "variant"])
    blind = "/ in-context+generated-blind[D]"
    assert table.loc[("held-out", "in-context+generated-half[D]"), blind].endswith("(12/12)")
    assert table.loc[("held-out", "in-context+generated[D]"), blind].endswith("(0/12)")
    assert table.loc[("held-out", "in-context+generated-blind[D]"), blind] == ""
    assert table.loc[("held-out", "in-context+generated[E]"), blind] == ""


def test_stacked_adapters_are_judged_against_the_prompt_alone_both_ways():
    """in-context+generated 3.2 beats the prompt alone (3.4); in-context+soup 3.5 loses to it."""
    levels = {"in-context": 3.4, "in-context+generated": 3.2, "in-context+soup": 3.5}
    results = _results(levels=levels).query("setting != 'seen'")
    table = stacked_table(results, 300, 0).set_index(["setting", "variant"])
    assert list(table.index.get_level_values("variant")[:2]) == ["in-context+generated", "in-context+soup"]
    better = table.loc[("held-out", "in-context+generated"), "/ in-context"]
    low, high = map(float, better.split("[")[1].split("]")[0].split(","))
    assert high < 1.0 and low > 0.75 and better.endswith("(12/12)")  # exp(-0.2) = 0.82
    worse = table.loc[("folds", "in-context+soup"), "/ in-context"]
    assert float(worse.split(" ")[0]) > 1.05 and worse.endswith("(0/6)")
    assert table.loc[("folds", "in-context+soup"), "/ in-context+soup"] == ""
    assert table.loc[("held-out", "in-context+generated"), "gap recovered"].startswith("0.8")
    text = markdown_report(results, command="c", config_yaml="", title="T", resamples=100)
    assert "## Adapters stacked on the prompt (unseen tasks)" in text


def test_the_report_counts_what_demo_selected_chose_per_setting():
    results = _results()
    picks = {"h": ["draw-2", "soup", "draw-0", "ridge"], "f": ["soup", "soup", "nearest"]}
    extra = []
    for setting, prefix in (("heldout", "h"), ("fold", "f")):
        for index, pick in enumerate(picks[prefix]):
            row = results[(results["task"] == f"{prefix}{index}") & (results["variant"] == "soup")].iloc[0]
            extra.append({**row.to_dict(), "variant": "demo-selected",
                          "selected_candidate": pick})
    text = markdown_report(pd.concat([results, pd.DataFrame(extra)], ignore_index=True), command="c",
                           config_yaml="", title="T", resamples=50)
    assert "demo-selected on heldout (4 tasks) chose: a draw 2, soup 1, ridge 1." in text
    assert "demo-selected on fold (3 tasks) chose: soup 2, nearest 1." in text
    assert "| held-out  | demo-selected" in text  # against each baseline, as the generator is
    assert "chose" not in markdown_report(results, command="c", config_yaml="", title="T", resamples=50)
