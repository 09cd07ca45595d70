"""Group folds: whole groups held out from the generator, to measure transfer to a kind of text
it never saw (the fixed held-out set always has siblings of its tasks in training).

The fold assignment is fixed by the config and a seed before any result is seen: the suite's
groups in name order, shuffled by ``evaluate.fold_seed``, dealt ``groups_per_fold`` at a time;
or named outright by ``evaluate.fold_groups``.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Sequence

from icm.tasks import Suite


def group_folds(groups: Sequence[str], folds: int, groups_per_fold: int, seed: int) -> list[list[str]]:
    """``folds`` disjoint lists of ``groups_per_fold`` groups each."""
    if folds * groups_per_fold > len(set(groups)):
        raise ValueError(f"evaluate.folds={folds} x evaluate.groups_per_fold={groups_per_fold} needs "
                         f"that many groups; the suite has {len(set(groups))}. Fix: lower either.")
    shuffled = sorted(set(groups))
    random.Random(f"folds:{seed}").shuffle(shuffled)
    return [shuffled[i * groups_per_fold:(i + 1) * groups_per_fold] for i in range(folds)]


def explicit_folds(groups: Sequence[str], fold_groups: Sequence[Sequence[str]]) -> list[list[str]]:
    """``evaluate.fold_groups``, checked against the suite's ``groups`` (disjointness is the
    config's check)."""
    unknown = sorted({group for fold in fold_groups for group in fold} - set(groups))
    if unknown:
        raise ValueError(f"evaluate.fold_groups names {unknown}, which the suite does not have (its "
                         f"groups: {sorted(set(groups))}). Fix: name groups of this suite.")
    return [list(fold) for fold in fold_groups]


def suite_folds(suite: Suite, evaluate) -> list[list[str]]:
    """The evaluate stage's folds for ``suite`` (``evaluate``: an `EvalConfig`): each fold's held-out
    groups; [] when ``evaluate.folds`` is 0. The oracles stage's per-fold multi-task LoRAs and the
    evaluate stage's fold generators must agree on them, so both call this."""
    if not evaluate.folds:
        return []
    groups = [task.group for task in suite.tasks.values()]
    if evaluate.fold_groups is not None:
        return explicit_folds(groups, evaluate.fold_groups)
    return group_folds(groups, evaluate.folds, evaluate.groups_per_fold, evaluate.fold_seed)


def fold_suite(suite: Suite, held_groups: Sequence[str]) -> Suite:
    """The suite as a fold's generator sees it: every task of ``held_groups`` is held out too."""
    held = {name for name, task in suite.tasks.items() if task.group in set(held_groups)}
    if len(held | set(suite.heldout)) == len(suite.tasks):
        raise ValueError(f"holding out groups {list(held_groups)} leaves no training task")
    ordered = tuple(suite.heldout) + tuple(sorted(held - set(suite.heldout)))
    return dataclasses.replace(suite, heldout=ordered)


def fold_tasks(suite: Suite, held_groups: Sequence[str]) -> list[str]:
    """The tasks a fold evaluates: every task of its groups (training and held-out alike)."""
    return sorted(name for name, task in suite.tasks.items() if task.group in set(held_groups))
