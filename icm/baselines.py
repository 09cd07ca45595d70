"""Honest baselines and comparison metrics for generated adapters.

Every generated adapter is judged beside what a user could do without a generator: average the
zoo (model soup), reuse the adapter of the most similar known task (nearest neighbour by task
vector), or use one multi-task LoRA. Controls feed the generator a random or another task's
vector, which shows whether the condition is used at all.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch


def model_soup(vectors: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The element-wise mean of the training adapters' flat vectors, (L,)."""
    if not vectors:
        raise ValueError("model soup needs at least one adapter")
    return torch.stack(list(vectors.values())).mean(dim=0)


def cosine(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor) -> float:
    a = _float64_vector(a)
    b = _float64_vector(b)
    denominator = float(a.norm() * b.norm())
    return float(a @ b) / denominator if denominator > 0 else float("nan")


def _float64_vector(values: np.ndarray | torch.Tensor) -> torch.Tensor:
    """A flat float64 tensor; NumPy input is copied (a read-only array, as parquet gives,
    would make torch warn that it cannot share it)."""
    if isinstance(values, torch.Tensor):
        return values.to(torch.float64).reshape(-1)
    return torch.from_numpy(np.array(values, dtype=np.float64)).reshape(-1)


def nearest_task(query: np.ndarray, candidates: Mapping[str, np.ndarray], *,
                 exclude: Sequence[str] = ()) -> str:
    """The candidate task whose vector has the highest cosine similarity to ``query``."""
    scored = [(cosine(query, vec), name) for name, vec in sorted(candidates.items())
              if name not in exclude]
    if not scored:
        raise ValueError("no candidate task left for nearest-neighbour lookup")
    return max(scored)[1]


def shuffled_partner(task: str, tasks: Sequence[str]) -> str:
    """A fixed other task for the shuffled-condition control: the next one in name order,
    so every task is paired with a different task (a derangement)."""
    ordered = sorted(tasks)
    if len(ordered) < 2:
        raise ValueError("the shuffled-condition control needs at least two tasks")
    return ordered[(ordered.index(task) + 1) % len(ordered)]


def other_group_partner(task: str, group_of: Mapping[str, str], candidates: Sequence[str]) -> str:
    """A fixed task of another group for the other-group control: of ``candidates`` (the
    setting's training tasks) outside ``task``'s group, the first after ``task`` in name order
    (wrapping). Unlike `shuffled_partner`, whose partner is usually a sibling of the same group,
    this asks whether the condition of a *different kind* of text changes the adapter."""
    others = sorted(t for t in candidates if group_of[t] != group_of[task])
    if not others:
        raise ValueError(f"variant control-other-group: {task!r} has no training task outside its "
                         f"group {group_of[task]!r}; drop it from evaluate.extra_variants")
    return next((t for t in others if t > task), others[0])


def gap_recovered(ppl_base: float, ppl_variant: float, ppl_reference: float) -> float:
    """Share of the base -> reference log-perplexity gap that the variant closes.

    1.0 = as good as the reference (e.g. the task's own trained LoRA), 0.0 = no better than the
    base model, negative = worse than base. NaN when the reference does not beat the base.
    """
    gap = math.log(ppl_base) - math.log(ppl_reference)
    if not gap > 0:
        return float("nan")
    return (math.log(ppl_base) - math.log(ppl_variant)) / gap
