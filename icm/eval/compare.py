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
not be paired. A run may also bring (setting, fold, task)s the reference did not score, e.g. the
folds (``evaluate.heldout=false``) beside a held-out-only reference: it must score base and
oracle there, since nothing else can pair them, and its generator-free rows join as they are.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pandas as pd

from icm.errors import InputError
from icm.eval.report import KEY, format_ci, gap_row, ratio_row
from icm.eval.variants import (VARIANTS, adapters_needed, prompt_alone, reads_generator,
                               registered_name)


def labelled(variant: str, label: str) -> str:
    return f"{variant}[{label}]"


def from_generator(variant: str) -> bool:
    """Whether a run's generator made this variant's adapter (so it belongs to that run)."""
    registered = VARIANTS.get(registered_name(variant))
    return registered is not None and reads_generator(registered)


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
        scored = set(zip(_keys(merged), merged["variant"]))  # (key, variant) pairs merged so far
        new_row = [pair not in scored for pair in zip(_keys(other), other["variant"])]
        added = other[~mine & np.asarray(new_row, dtype=bool)]
        if not len(generated) and not len(added):
            raise InputError(f"run {label!r} adds nothing to compare: no generated rows and no "
                             "variant the runs before it lack. Fix: evaluate it with "
                             "evaluate.variants naming what it should add (e.g. 'generated').")
        merged = pd.concat([merged, generated, added], ignore_index=True)
    return merged


def _by_key(frame: pd.DataFrame, variant: str | None, column: str) -> dict:
    """(setting, fold, task) -> ``column`` of a row of ``variant`` (None: any variant)."""
    rows = frame if variant is None else frame[frame["variant"] == variant]
    return dict(zip(_keys(rows), rows[column]))


def _first_disagreement(mine: pd.DataFrame, theirs: pd.DataFrame, variant: str, rtol: float, *,
                        both: bool) -> tuple | None:
    """The first (setting, fold, task) whose per-text NLL of ``variant`` differs between the two
    results, or None. ``both``: only keys both have; else a key one lacks also differs."""
    a_rows, b_rows = _by_key(mine, variant, "text_nll"), _by_key(theirs, variant, "text_nll")
    keys = set(a_rows) & set(b_rows) if both else set(a_rows) | set(b_rows)
    for key in sorted(keys):
        a, b = (np.asarray(rows.get(key, ()), dtype=np.float64) for rows in (a_rows, b_rows))
        if a.shape != b.shape or not np.allclose(a, b, rtol=rtol):
            return key
    return None


def _check_shared(reference: pd.DataFrame, other: pd.DataFrame, label: str, rtol: float) -> None:
    shared = (set(reference["variant"]) & set(other["variant"])) - set(filter(from_generator, other["variant"]))
    for variant in sorted(shared):  # one row per task: generator-free variants are not sampled
        key = _first_disagreement(reference, other, variant, rtol, both=True)
        if key is not None:
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
    _check_new_keys(reference, other, label)


def _keys(frame: pd.DataFrame) -> list[tuple]:
    """Each row's (setting, fold, task), the fold -1 where there is none."""
    return list(map(tuple, frame[KEY].fillna(-1).values))


def _check_new_keys(reference: pd.DataFrame, other: pd.DataFrame, label: str) -> None:
    """(setting, fold, task)s the reference lacks may join only with their own base and oracle
    rows (what pairs them), and only where the reference has no row of that (setting, task) under
    another fold (the same task counted twice)."""
    new = set(_keys(other)) - set(_keys(reference))
    anchored = set(_keys(other[other["variant"] == "base"])) & set(_keys(other[other["variant"] == "oracle"]))
    if unanchored := sorted(new - anchored):
        raise InputError(f"run {label!r} scored {len(unanchored)} (setting, fold, task) the reference "
                         f"did not, without base and oracle rows there, e.g. {unanchored[0]}, so "
                         "nothing pairs them. Fix: use the reference's evaluate settings, or score "
                         "base and oracle there too (evaluate.variants).")
    placed = {(setting, task): fold for setting, fold, task in _keys(reference)}
    if clash := sorted(k for k in new if placed.get((k[0], k[2]), k[1]) != k[1]):
        raise InputError(f"run {label!r} puts {clash[0][2]!r} in {clash[0][0]} fold {clash[0][1]}, "
                         f"the reference in fold {placed[(clash[0][0], clash[0][2])]}. Fix: "
                         "compare runs with the same evaluate.fold_groups.")


# --- Runs on different zoos -------------------------------------------------------------------
# Another suite (other training tasks, other groups) gives every adapter variant another zoo, so
# nothing but the zoo-free variants (the base model, the prompt) and the oracles can be shared.
# Such runs are paired on the (setting, task)s all of them scored, with the shared variants
# checked equal (same texts, same oracle LoRA), and every other variant labelled by its run:
# ``soup[wide]`` beside ``soup[core]``. Zoos trained with other settings (``zoo.steps``) have
# other oracles on purpose: with ``own_oracles`` each run keeps its own (``oracle[z48]``), and
# each run's gap is measured against it.
def zoo_free(variant: str) -> bool:
    """Whether scoring ``variant`` reads no LoRA at all (the base model, the prompt alone): runs
    on any zoo score it alike."""
    registered = VARIANTS.get(registered_name(variant))
    return registered is not None and not adapters_needed(registered) and not reads_generator(registered)


def pair_across_zoos(runs: Mapping[str, pd.DataFrame], *, rtol: float = 1e-4,
                     own_oracles: bool = False) -> pd.DataFrame:
    """Rows of ``runs`` (label -> results) on their common (setting, task)s: the shared variants
    once (base, the prompt, and the oracle unless ``own_oracles``), every other variant as
    ``name[label]``. The fold index is dropped (-1): folds are numbered per run, and a task sits
    in one fold of a setting. Raises InputError when a shared variant differs between runs."""
    if len(runs) < 2:
        raise InputError("pairing across zoos needs at least two runs. Fix: pass two --run LABEL=FOLDER.")
    frames = {label: frame.assign(fold=-1.0) for label, frame in runs.items()}
    common = set.intersection(*(set(zip(f["setting"], f["task"])) for f in frames.values()))
    if not common:
        raise InputError(f"runs {sorted(runs)} share no (setting, task). Fix: compare runs that "
                         "scored some of the same tasks (e.g. the same evaluate.fold_groups).")
    frames = {label: f[[pair in common for pair in zip(f["setting"], f["task"])]]
              for label, f in frames.items()}
    # base (and the oracle, unless each run keeps its own) must be there to pair the runs at all;
    # the prompt is shared where every run scored it
    required = {"base"} | (set() if own_oracles else {"oracle"})
    scored_by_all = set.intersection(*(set(f["variant"]) for f in frames.values()))
    shared = sorted(required | {v for v in scored_by_all if zoo_free(v)})
    first_label, first = next(iter(frames.items()))
    for label, frame in list(frames.items())[1:]:
        for variant in shared:
            key = _first_disagreement(first, frame, variant, rtol, both=False)
            if key is not None:
                hint = (" If the zoos were trained with other settings on purpose (e.g. "
                        "zoo.steps), pass --own-oracles." if variant == "oracle" else "")
                raise InputError(f"runs {first_label!r} and {label!r} disagree on {variant!r} for "
                                 f"{key}: not the same texts or oracle, so no pairing. Fix: "
                                 "evaluate both with the same suite texts, evaluate config and "
                                 f"oracles.{hint}")
    labelled_rows = [f[~f["variant"].isin(shared)].assign(
        variant=lambda d, label=label: d["variant"].map(lambda v: labelled(v, label)))
        for label, f in frames.items()]
    return pd.concat([first[first["variant"].isin(shared)], *labelled_rows], ignore_index=True)


def _against_own_oracle(frame: pd.DataFrame, label: str) -> pd.DataFrame:
    """``frame`` with run ``label``'s own oracle (``oracle[label]``, when the runs kept their
    own) as the ``oracle`` its gaps are measured against."""
    own = labelled("oracle", label)
    if own not in set(frame["variant"]):
        return frame
    others = frame["variant"].str.startswith("oracle[") & (frame["variant"] != own)
    return frame[~others].replace({"variant": {own: "oracle"}})


def zoo_comparison_table(paired: pd.DataFrame, labels: list[str], resamples: int, seed: int) -> pd.DataFrame:
    """Per setting and variant scored by every run: each run's gap recovered (against its own
    oracle where the runs kept theirs), and the last run's perplexity over the first's (paired
    bootstrap, below 1: the last run's zoo did better)."""
    rows = []
    first, last = labels[0], labels[-1]
    for setting, frame in paired.groupby("setting", sort=True):
        variants = set(frame["variant"])
        names = sorted({v.rsplit("[", 1)[0] for v in variants if v.endswith("]")})
        for name in names:
            if not all(labelled(name, label) in variants for label in labels):
                continue
            gaps = {f"gap [{label}]": "" if name == "oracle" else format_ci(gap_row(
                _against_own_oracle(frame, label), labelled(name, label), resamples, seed))
                for label in labels}  # a run's own oracle recovers its own gap by definition
            ratio = ratio_row(frame, labelled(name, last), labelled(name, first), resamples, seed)
            row = {"setting": setting, "tasks": frame["task"].nunique(), "variant": name, **gaps,
                   f"{last} / {first} ppl [95% CI]": format_ci(ratio)}
            alone = prompt_alone(name)  # the prompt of the same kind, alone
            if alone in variants:  # the prompt reads no zoo: one row for every run
                row[f"{last} / {alone}"] = format_ci(
                    ratio_row(frame, labelled(name, last), alone, resamples, seed))
            rows.append(row)
    return pd.DataFrame(rows).fillna("")  # a prompt of another kind: no entry
