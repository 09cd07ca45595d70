"""Compare generators on one evaluation: another run's generated variants beside a reference
run's baselines, paired text by text.

A second generator (another ``generator.arch`` or objective) is evaluated in its own storage
root whose upstream stages (zoo, oracles, task vectors) are the reference run's, with
``evaluate.variants`` cut to what it adds (``[generated]``, as scripts/compare_generators.sh
does). `merge_runs` takes its generated rows, renames them ``generated[<label>]``, and checks
that both runs scored the same texts: every text's token count must match the reference's, and
the per-text NLL of any variant the two share (``base``, ``oracle``) must agree, or the
comparison would not be paired.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pandas as pd

from icm.errors import InputError
from icm.eval.report import KEY
from icm.eval.variants import VARIANTS

SHARED_CHECK = ("base", "oracle")  # scored identically by both runs when both have them


def labelled(variant: str, label: str) -> str:
    return f"{variant}[{label}]"


def merge_runs(reference: pd.DataFrame, others: Mapping[str, pd.DataFrame], *,
               rtol: float = 1e-4) -> pd.DataFrame:
    """The reference results plus each other run's generated variants as ``name[label]``.

    Raises InputError when another run's shared variants disagree with the reference on a
    task both scored (different texts, model or oracle), or when it has no generated rows.
    """
    frames = [reference]
    for label, other in others.items():
        _check_shared(reference, other, label, rtol)
        kinds = other["variant"].map(lambda v: VARIANTS[v].kind if v in VARIANTS else None)
        generated = other[kinds == "generated"].copy()
        if not len(generated):
            raise InputError(f"run {label!r} has no generated rows to compare. Fix: evaluate it "
                             "with evaluate.variants including 'generated'.")
        generated["variant"] = generated["variant"].map(lambda v: labelled(v, label))
        frames.append(generated)
    return pd.concat(frames, ignore_index=True)


def _by_key(frame: pd.DataFrame, variant: str | None, column: str) -> dict:
    """(setting, fold, task) -> ``column`` of a row of ``variant`` (None: any variant)."""
    rows = frame if variant is None else frame[frame["variant"] == variant]
    return {(r["setting"], -1 if pd.isna(r["fold"]) else r["fold"], r["task"]): r[column]
            for _, r in rows.iterrows()}


def _check_shared(reference: pd.DataFrame, other: pd.DataFrame, label: str, rtol: float) -> None:
    for variant in SHARED_CHECK:  # one row per task: base and oracle are not sampled
        mine, theirs = _by_key(reference, variant, "text_nll"), _by_key(other, variant, "text_nll")
        for key in sorted(set(mine) & set(theirs)):
            a, b = np.asarray(mine[key], dtype=np.float64), np.asarray(theirs[key], dtype=np.float64)
            if a.shape != b.shape or not np.allclose(a, b, rtol=rtol):
                raise InputError(f"run {label!r} scored {variant!r} on {key} differently from the "
                                 "reference run: not the same texts, model or oracle, so the "
                                 "comparison would not be paired. Fix: evaluate it on the "
                                 "reference run's zoo, oracles, task vectors and evaluate config.")
    tokens = {key: tuple(r) for key, r in _by_key(reference, "base", "text_tokens").items()}
    for key, counts in _by_key(other, None, "text_tokens").items():
        if key in tokens and tuple(counts) != tokens[key]:
            raise InputError(f"run {label!r} scored other texts than the reference on {key} (token "
                             "counts differ), so the comparison would not be paired. Fix: evaluate "
                             "it with the reference run's suite and evaluate config.")
    missing = set(map(tuple, other[KEY].fillna(-1).values)) - set(map(tuple, reference[KEY].fillna(-1).values))
    if missing:
        raise InputError(f"run {label!r} scored {len(missing)} (setting, fold, task) the reference "
                         f"did not, e.g. {sorted(missing)[0]}. Fix: use the same evaluate settings.")
