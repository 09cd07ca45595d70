"""Bootstrap CIs, gap recovered and sign tests for paired perplexity comparisons."""

from __future__ import annotations

import math

import numpy as np
import pytest

from icm.eval.stats import (draw_indices, gap_recovered_ci, gather_sums, pad_tasks, ratio_ci,
                            sign_test_p)


def _tasks(tasks: int, texts: int | list[int], *, seed: int = 0, text_noise: float = 0.3):
    """Per-task token counts and a base per-text NLL: task difficulty plus text-level noise."""
    rng = np.random.default_rng(seed)
    counts = [texts] * tasks if isinstance(texts, int) else texts
    tokens = [rng.integers(20, 200, size=n).astype(float) for n in counts]
    difficulty = rng.uniform(1.5, 3.0, size=len(counts))
    nll = [tok * (d + rng.normal(0, text_noise, size=len(tok)))
           for tok, d in zip(tokens, difficulty)]
    return tokens, nll


def _noisy_pair(tasks: int, texts: int, seed: int):
    """A and B equal in expectation per task, differing only by independent text-level noise."""
    tokens, base = _tasks(tasks, texts, seed=seed, text_noise=0.0)
    rng = np.random.default_rng(seed + 1)
    nll_a = [b + tok * rng.normal(0, 0.3, size=len(tok)) for b, tok in zip(base, tokens)]
    nll_b = [b + tok * rng.normal(0, 0.3, size=len(tok)) for b, tok in zip(base, tokens)]
    return nll_a, nll_b, tokens


def test_sign_test_known_values():
    assert sign_test_p(5, 8) == pytest.approx(0.7265625, abs=1e-15)
    assert sign_test_p(10, 10) == pytest.approx(0.001953125, abs=1e-15)
    assert sign_test_p(0, 10) == pytest.approx(0.001953125, abs=1e-15)
    assert sign_test_p(4, 8) == 1.0 and sign_test_p(0, 0) == 1.0
    with pytest.raises(ValueError):
        sign_test_p(3, 2)


def test_identical_variants_give_ratio_one_and_no_wins():
    tokens, nll = _tasks(12, 8)
    result = ratio_ci(nll, nll, tokens, resamples=300)
    assert result.estimate == pytest.approx(1.0)
    # Paired resampling draws the same texts for A and B, so every resample's ratio is exactly 1.
    assert result.low == pytest.approx(1.0) and result.high == pytest.approx(1.0)
    assert (result.wins, result.ties, result.n, result.sign_p) == (0, 12, 12, 1.0)


def test_uniformly_lower_nll_gives_the_expected_ratio_and_a_ci_below_one():
    tokens, nll_b = _tasks(20, 16, seed=1)
    nll_a = [0.9 * b for b in nll_b]  # 10% lower NLL per token on every text
    result = ratio_ci(nll_a, nll_b, tokens, resamples=500)
    log_b = np.array([b.sum() / t.sum() for b, t in zip(nll_b, tokens)])  # (tasks,)
    assert result.estimate == pytest.approx(math.exp(-0.1 * log_b.mean()), rel=1e-12)
    assert result.low <= result.estimate <= result.high < 1.0
    assert result.wins == 20 and result.ties == 0
    assert result.sign_p == pytest.approx(2 / 2**20)


def test_median_task_ratio_is_the_typical_task_where_one_task_carries_the_geometric_mean():
    tokens, nll_b = _tasks(10, 8, seed=3)
    # nine tasks 10% lower NLL per token for A, one task three times higher: the outlier
    # pushes the geometric mean above 1 while the typical task is better with A
    nll_a = [0.9 * b for b in nll_b[:9]] + [3.0 * nll_b[9]]
    result = ratio_ci(nll_a, nll_b, tokens, resamples=200)
    log_b = np.array([b.sum() / t.sum() for b, t in zip(nll_b, tokens)])  # (tasks,)
    log_ratio = np.concatenate([-0.1 * log_b[:9], [2.0 * log_b[9]]])  # (tasks,) lA - lB
    assert result.median_task_ratio == pytest.approx(math.exp(np.median(log_ratio)), rel=1e-12)
    assert result.median_task_ratio < 1.0 < result.estimate
    assert result.wins == 9


def test_ci_narrows_with_more_texts_per_task():
    widths = {}
    for texts in (4, 64):
        result = ratio_ci(*_noisy_pair(30, texts, seed=3), resamples=1000)
        widths[texts] = result.high - result.low
        assert result.low <= result.estimate <= result.high
    assert widths[64] < 0.5 * widths[4]


def test_ci_reflects_text_noise_even_with_a_single_task():
    # One task: task resampling alone would give a zero-width CI; text resampling must not.
    result = ratio_ci(*_noisy_pair(1, 32, seed=4), resamples=500)
    assert result.high - result.low > 0.01


def test_ci_reflects_task_noise_even_with_a_single_text_per_task():
    # One text per task: text resampling alone would give a zero-width CI; task resampling must not.
    result = ratio_ci(*_noisy_pair(30, 1, seed=5), resamples=500)
    assert result.high - result.low > 0.01


def test_seeded_reproducibility():
    data = _noisy_pair(10, 8, seed=6)
    assert ratio_ci(*data, seed=7, resamples=200) == ratio_ci(*data, seed=7, resamples=200)
    assert ratio_ci(*data, seed=7, resamples=200) != ratio_ci(*data, seed=8, resamples=200)


def test_vectorised_resampling_matches_a_loop_on_ragged_tasks():
    tokens, nll = _tasks(5, [1, 7, 3, 12, 2], seed=8)
    padded = pad_tasks([nll], tokens)
    rng = np.random.default_rng(0)
    task_idx, text_idx, mask = draw_indices(rng, padded.counts, 50)
    sums = gather_sums(padded.nll, task_idx, text_idx, mask)[0]  # (R, T)
    for r in range(50):
        for j, task in enumerate(task_idx[r]):
            drawn = text_idx[r, j, :padded.counts[task]]
            assert drawn.max() < len(nll[task])  # never a padding slot
            assert sums[r, j] == pytest.approx(nll[task][drawn].sum())


def test_unpaired_inputs_are_rejected():
    tokens, nll = _tasks(3, 4)
    with pytest.raises(ValueError, match="paired"):
        ratio_ci(nll, [n[:-1] for n in nll], tokens)
    with pytest.raises(ValueError, match="tasks"):
        ratio_ci(nll, nll[:2], tokens)


def test_gap_recovered_is_one_for_the_oracle_and_zero_for_the_base():
    tokens, base = _tasks(10, 8, seed=9)
    oracle = [0.8 * b for b in base]
    at_oracle = gap_recovered_ci(oracle, base, oracle, tokens, resamples=300)
    assert at_oracle.estimate == pytest.approx(1.0)
    assert at_oracle.low == pytest.approx(1.0) and at_oracle.high == pytest.approx(1.0)
    at_base = gap_recovered_ci(base, base, oracle, tokens, resamples=300)
    assert at_base.estimate == pytest.approx(0.0) and at_base.high == pytest.approx(0.0)
    halfway = gap_recovered_ci([0.9 * b for b in base], base, oracle, tokens, resamples=300)
    assert halfway.estimate == pytest.approx(0.5)
    assert (at_oracle.n, at_oracle.excluded) == (10, 0)


def test_tasks_without_a_gap_are_excluded():
    tokens, base = _tasks(6, 8, seed=10)
    # tasks 0-3: oracle 20% better; task 4: oracle equal to base; task 5: oracle worse
    oracle = [0.8 * b for b in base[:4]] + [base[4], 1.1 * base[5]]
    variant = [0.9 * b for b in base[:4]] + [0.5 * base[4], 0.5 * base[5]]
    result = gap_recovered_ci(variant, base, oracle, tokens, resamples=300)
    assert (result.n, result.excluded) == (4, 2)
    assert result.estimate == pytest.approx(0.5)  # the excluded tasks' huge gains do not count
    none_left = gap_recovered_ci(base, base, base, tokens, resamples=10)
    assert none_left.n == 0 and none_left.excluded == 6 and math.isnan(none_left.estimate)


def test_full_size_comparison_covers_equal_variants_and_every_task():
    """At a study's full size (100 tasks x 32 texts; its speed: tests/bench/bench_eval_stats.py)
    two variants equal in expectation get an interval around 1, and every task counts."""
    nll_a, nll_b, tokens = _noisy_pair(100, 32, seed=11)
    ratio = ratio_ci(nll_a, nll_b, tokens)
    assert ratio.n == 100 and ratio.low < 1.0 < ratio.high and ratio.high - ratio.low < 0.05
    gap = gap_recovered_ci(nll_a, nll_b, [0.8 * b for b in nll_b], tokens)
    assert gap.n == 100 and gap.low < 0.0 < gap.high  # A is no closer to the oracle than B
