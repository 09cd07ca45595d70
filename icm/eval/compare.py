"""Compare generators on one evaluation: other runs' variants beside a reference run's,
paired text by text.

A second generator (another ``generator.arch`` or objective) is evaluated in its own storage
root whose upstream stages (zoo, oracles, task vectors) are the reference run's, with
``evaluate.variants`` cut to what it adds (``[generated]``, as scripts/compare_generators.sh
does). `merge_runs` renames every row that comes from that run's generator (``generated``,
``in-context+generated``, ...) to ``name[<label>]``. A run on the same zoo may also score
variants the reference lacks (baselines, adapters stacked on the prompt): those join
unlabelled, since no generator made them. Both runs must have scored the same texts: every
text's token count must match the reference's, and the per-text NLL of any generator-free
variant the two share (``base``, ``oracle``, a baseline) must agree, or the comparison would
not be paired.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pandas as pd

from icm.errors import InputError
from icm.eval.report import KEY
from icm.eval.variants import VARIANTS, registered_name, under_prompt


def labelled(variant: str, label: str) -> str:
    return f"{variant}[{label}]"


def from_generator(variant: str) -> bool:
    """Whether a run's generator made this variant's adapter (so it belongs to that run)."""
    registered = VARIANTS.get(registered_name(variant))
    if registered is None:
        return False
    under = under_prompt(registered)
    return registered.kind == "generated" or (under is not None and under.kind == "generated")


def merge_runs(reference: pd.DataFrame, others: Mapping[str, pd.DataFrame], *,
               rtol: float = 1e-4) -> pd.DataFrame:
    """The reference results; each other run's generator variants as ``name[label]``; and the
    generator-free variants another run scored that no run before it had, unlabelled.

    Raises InputError when another run's shared generator-free variants disagree with the
    rows merged so far on a task both scored (different texts, model or oracle), or when it
    adds nothing.
    """
    merged = reference
    for label, other in others.items():
        _check_shared(merged, other, label, rtol)
        mine = other["variant"].map(from_generator)
        generated = other[mine].copy()
        generated["variant"] = generated["variant"].map(lambda v: labelled(v, label))
        added = other[~mine & ~other["variant"].isin(set(merged["variant"]))]
        if not len(generated) and not len(added):
            raise InputError(f"run {label!r} adds nothing to compare: no generated rows and no "
                             "variant the runs before it lack. Fix: evaluate it with "
                             "evaluate.variants naming what it should add (e.g. 'generated').")
        merged = pd.concat([merged, generated, added], ignore_index=True)
    return merged


def _by_key(frame: pd.DataFrame, variant: str | None, column: str) -> dict:
    """(setting, fold, task) -> ``column`` of a row of ``variant`` (None: any variant)."""
    rows = frame if variant is None else frame[frame["variant"] == variant]
    return {(r["setting"], -1 if pd.isna(r["fold"]) else r["fold"], r["task"]): r[column]
            for _, r in rows.iterrows()}


def _check_shared(reference: pd.DataFrame, other: pd.DataFrame, label: str, rtol: float) -> None:
    shared = (set(reference["variant"]) & set(other["variant"])) - set(filter(from_generator, other["variant"]))
    for variant in sorted(shared):  # one row per task: generator-free variants are not sampled
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
