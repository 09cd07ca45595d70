"""Uncertainty for paired perplexity comparisons: bootstrap CIs, gap recovered and sign tests.

One comparison scores two adapters (variant A and comparator B) on the **same** texts of each
held-out task. Per task ``i`` it holds the per-text summed NLL of A and of B and the per-text
token counts, arrays of shape ``(n_i,)``; tasks may have different text counts. A variant's task
perplexity is ``exp(sum nll / sum tokens)``; we work with its log, ``l = sum nll / sum tokens``.

Two sources of noise enter every headline number: which tasks were held out (another draw of
tasks would give another mean) and which texts were scored within each task (another sample of
texts would give another task perplexity). The CIs therefore come from a two-level bootstrap:
resample tasks with replacement, then resample texts with replacement inside every resampled
task. The text indices are shared by all variants of a comparison, so the pairing is kept and
text difficulty, which moves A and B together, cancels out of the ratio.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike

DEFAULT_RESAMPLES = 2000
# Values gathered per bootstrap chunk (resamples x tasks x max texts): bounds memory to tens of MB.
CHUNK_ELEMENTS = 4_000_000

PerTask = Sequence[ArrayLike]  # one (n_i,) array per task


@dataclass(frozen=True)
class RatioCI:
    """Geometric-mean perplexity ratio ppl_A / ppl_B over tasks (< 1: A is better)."""

    estimate: float
    low: float
    high: float
    wins: int  # tasks where ppl_A < ppl_B
    ties: int  # tasks where ppl_A == ppl_B, left out of the sign test
    n: int  # tasks
    sign_p: float  # exact two-sided sign test of wins among the n - ties untied tasks
    level: float
    resamples: int
    # exp(median_i (lA_i - lB_i)), no interval: the typical task's ratio, which one task far off
    # cannot move the way it moves the geometric mean
    median_task_ratio: float


@dataclass(frozen=True)
class GapRecoveredCI:
    """Median over tasks of the fraction of the base-to-oracle log-perplexity gap closed."""

    estimate: float
    low: float
    high: float
    n: int  # tasks used
    excluded: int  # tasks where the oracle does not beat the base (gap <= 0)
    level: float
    resamples: int


@dataclass(frozen=True)
class PaddedTasks:
    """Ragged per-task text arrays padded to one matrix; padding is zero and never drawn."""

    nll: np.ndarray  # (variants, tasks, max_n) summed NLL per text
    tokens: np.ndarray  # (tasks, max_n) tokens per text
    counts: np.ndarray  # (tasks,) texts per task, n_i

    def log_ppl(self) -> np.ndarray:
        """Per-task log perplexity of every variant on all its texts: (variants, tasks)."""
        return self.nll.sum(axis=2) / self.tokens.sum(axis=1)


def sign_test_p(wins: int, n: int) -> float:
    """Exact two-sided binomial sign test: P(a split at least as uneven as wins/n | p = 1/2)."""
    if not 0 <= wins <= n:
        raise ValueError(f"wins must lie in [0, n], got wins={wins}, n={n}")
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(wins, n - wins) + 1))
    return min(1.0, 2 * tail / 2**n)  # exact integer arithmetic until the final division


def ratio_ci(nll_a: PerTask, nll_b: PerTask, tokens: PerTask, *,
             resamples: int = DEFAULT_RESAMPLES, seed: int = 0, level: float = 0.95) -> RatioCI:
    """Geometric mean over tasks of ppl_A / ppl_B, with a two-level paired bootstrap CI.

    The estimate is ``exp(mean_i (lA_i - lB_i))``. The CI is the percentile interval of the same
    statistic over ``resamples`` draws that resample tasks, then texts within each task, using the
    same text indices for A and B.
    """
    _check_options(resamples, level)
    padded = pad_tasks([nll_a, nll_b], tokens)
    log_a, log_b = padded.log_ppl()  # (tasks,) each
    boot_a, boot_b = bootstrap_log_ppl(padded, resamples, seed)  # (resamples, tasks) each
    estimate = math.exp(float(np.mean(log_a - log_b)))
    low, high = _percentile_interval(np.exp(np.mean(boot_a - boot_b, axis=1)), level)
    wins, ties = int(np.sum(log_a < log_b)), int(np.sum(log_a == log_b))
    n = len(log_a)
    return RatioCI(estimate, low, high, wins, ties, n, sign_test_p(wins, n - ties), level,
                   resamples, median_task_ratio=math.exp(float(np.median(log_a - log_b))))


def gap_recovered_ci(nll_variant: PerTask, nll_base: PerTask, nll_oracle: PerTask,
                     tokens: PerTask, *, resamples: int = DEFAULT_RESAMPLES, seed: int = 0,
                     level: float = 0.95) -> GapRecoveredCI:
    """Median over tasks of ``(l_base - l_var) / (l_base - l_oracle)``, with a bootstrap CI.

    1 means the variant matches the task's own (oracle) adapter, 0 that it is no better than the
    base model. Tasks where the oracle does not beat the base on all their texts have no gap to
    recover; they are excluded before resampling (and counted in ``excluded``), so the bootstrap
    answers "how uncertain is the median over the tasks that have a gap". Within one resample a
    task whose resampled gap is <= 0 is left out of that resample's median, as it would be from
    the estimate.
    """
    _check_options(resamples, level)
    padded = pad_tasks([nll_variant, nll_base, nll_oracle], tokens)
    log_var, log_base, log_oracle = padded.log_ppl()  # (tasks,) each
    has_gap = log_base - log_oracle > 0  # (tasks,)
    excluded = int(np.sum(~has_gap))
    if not has_gap.any():
        nan = float("nan")
        return GapRecoveredCI(nan, nan, nan, 0, excluded, level, resamples)
    estimate = float(np.median(_gap_fraction(log_var, log_base, log_oracle)[has_gap]))
    kept = _select_tasks(padded, has_gap)
    boot = bootstrap_log_ppl(kept, resamples, seed)  # (3, resamples, tasks)
    with warnings.catch_warnings():  # a resample where no task keeps a gap gives NaN, not a warning
        warnings.simplefilter("ignore", RuntimeWarning)
        medians = np.nanmedian(_gap_fraction(*boot), axis=1)  # (resamples,)
    low, high = _percentile_interval(medians, level)
    return GapRecoveredCI(estimate, low, high, int(has_gap.sum()), excluded, level, resamples)


def pad_tasks(nll_per_variant: Sequence[PerTask], tokens: PerTask) -> PaddedTasks:
    """Check that every variant has the same texts per task as ``tokens`` and pad to a matrix."""
    token_arrays = [np.asarray(t, dtype=np.float64).reshape(-1) for t in tokens]
    if not token_arrays:
        raise ValueError("no tasks to compare")
    counts = np.array([len(t) for t in token_arrays])  # (tasks,)
    if counts.min() == 0:
        raise ValueError(f"task {int(np.argmin(counts))} has no texts")
    if any(np.any(t <= 0) for t in token_arrays):
        raise ValueError("every text needs at least one scored token (a resample could draw "
                         "only empty texts)")
    padded_tokens = _pad(token_arrays, counts)
    padded_nll = np.stack([_pad(_check_variant(v, counts, i), counts)
                           for i, v in enumerate(nll_per_variant)])
    return PaddedTasks(padded_nll, padded_tokens, counts)


def bootstrap_log_ppl(padded: PaddedTasks, resamples: int, seed: int) -> np.ndarray:
    """Per-task log perplexity of every variant under two-level resampling.

    Returns ``(variants, resamples, tasks)``: column ``j`` of resample ``r`` is a task drawn with
    replacement, scored on ``n_i`` of its texts drawn with replacement (indices shared across
    variants). Drawn in chunks so memory stays bounded for large ``resamples``.
    """
    _check_options(resamples, 0.5)
    rng = np.random.default_rng(seed)
    tasks, max_n = padded.tokens.shape
    chunk = max(1, CHUNK_ELEMENTS // (tasks * max_n))
    pieces = [_resample_chunk(padded, rng, min(chunk, resamples - start))
              for start in range(0, resamples, chunk)]
    return np.concatenate(pieces, axis=1)


def draw_indices(rng: np.random.Generator, counts: np.ndarray,
                 resamples: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Task indices ``(resamples, tasks)``, text indices and a validity mask ``(resamples,
    tasks, max_n)``: scaling one uniform by the drawn task's ``n_i`` gives a uniform index below
    ``n_i``, so ragged tasks are resampled in one vectorised draw."""
    tasks, max_n = len(counts), int(counts.max())
    task_idx = rng.integers(0, tasks, size=(resamples, tasks))  # (R, T)
    drawn_counts = counts[task_idx][..., None]  # (R, T, 1)
    uniforms = rng.random((resamples, tasks, max_n))  # (R, T, max_n) in [0, 1)
    text_idx = (uniforms * drawn_counts).astype(np.intp)  # (R, T, max_n), < n_i
    mask = np.arange(max_n) < drawn_counts  # (R, T, max_n): only the first n_i draws count
    return task_idx, text_idx, mask


def gather_sums(values: np.ndarray, task_idx: np.ndarray, text_idx: np.ndarray,
                mask: np.ndarray) -> np.ndarray:
    """Sum of the drawn texts' ``values`` (..., tasks, max_n) per resampled task: (..., R, T)."""
    max_n = values.shape[-1]
    flat_idx = task_idx[..., None] * max_n + text_idx  # (R, T, max_n) into the flattened matrix
    flat_values = values.reshape(*values.shape[:-2], -1)  # (..., tasks * max_n)
    drawn = np.take(flat_values, flat_idx, axis=-1)  # (..., R, T, max_n)
    return np.where(mask, drawn, 0.0).sum(axis=-1)


def _resample_chunk(padded: PaddedTasks, rng: np.random.Generator, resamples: int) -> np.ndarray:
    task_idx, text_idx, mask = draw_indices(rng, padded.counts, resamples)
    nll_sums = gather_sums(padded.nll, task_idx, text_idx, mask)  # (V, R, T)
    token_sums = gather_sums(padded.tokens, task_idx, text_idx, mask)  # (R, T)
    return nll_sums / token_sums


def _gap_fraction(log_var: np.ndarray, log_base: np.ndarray, log_oracle: np.ndarray) -> np.ndarray:
    """Fraction of the base-to-oracle gap closed; NaN where there is no positive gap."""
    gap = log_base - log_oracle
    safe_gap = np.where(gap > 0, gap, 1.0)  # avoid dividing by <= 0; those entries become NaN
    return np.where(gap > 0, (log_base - log_var) / safe_gap, np.nan)


def _select_tasks(padded: PaddedTasks, keep: np.ndarray) -> PaddedTasks:
    counts = padded.counts[keep]
    max_n = int(counts.max())
    return PaddedTasks(padded.nll[:, keep, :max_n], padded.tokens[keep, :max_n], counts)


def _check_variant(nll: PerTask, counts: np.ndarray, variant: int) -> list[np.ndarray]:
    arrays = [np.asarray(a, dtype=np.float64).reshape(-1) for a in nll]
    if len(arrays) != len(counts):
        raise ValueError(f"variant {variant} has {len(arrays)} tasks, tokens have {len(counts)}")
    for task, (array, count) in enumerate(zip(arrays, counts)):
        if len(array) != count:
            raise ValueError(f"variant {variant}, task {task}: {len(array)} NLL values for "
                             f"{count} texts (the comparison must be paired on the same texts)")
    return arrays


def _pad(arrays: list[np.ndarray], counts: np.ndarray) -> np.ndarray:
    padded = np.zeros((len(arrays), int(counts.max())))  # (tasks, max_n)
    for row, array in enumerate(arrays):
        padded[row, :len(array)] = array
    return padded


def _check_options(resamples: int, level: float) -> None:
    if resamples < 1:
        raise ValueError(f"resamples must be >= 1, got {resamples}")
    if not 0 < level < 1:
        raise ValueError(f"level must lie in (0, 1), got {level}")


def _percentile_interval(samples: np.ndarray, level: float) -> tuple[float, float]:
    tail = 100 * (1 - level) / 2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        low, high = np.nanpercentile(samples, [tail, 100 - tail])
    return float(low), float(high)
