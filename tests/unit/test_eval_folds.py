"""Group folds: fixed, disjoint, whole groups held out from the fold's generator."""

from __future__ import annotations

import pytest

from icm.config import EvalConfig
from icm.eval.folds import fold_suite, fold_tasks, group_folds, suite_folds
from icm.tasks import load_suite


def test_group_folds_are_disjoint_fixed_by_seed_and_checked():
    groups = ["a", "b", "c", "d", "e", "a", "b"]
    folds = group_folds(groups, folds=2, groups_per_fold=2, seed=0)
    assert len(folds) == 2 and all(len(f) == 2 for f in folds)
    assert len({g for f in folds for g in f}) == 4  # disjoint
    assert folds == group_folds(list(reversed(groups)), 2, 2, seed=0)  # order of tasks does not matter
    assert any(group_folds(groups, 2, 2, seed=s) != folds for s in range(1, 5))  # the seed does
    with pytest.raises(ValueError, match="evaluate.folds"):
        group_folds(groups, folds=3, groups_per_fold=2, seed=0)


def test_fold_suite_holds_out_whole_groups_and_keeps_the_fixed_heldout(tiny_suite):
    suite = load_suite(tiny_suite)  # cats, dogs (held out): animals; sums: math; code: code
    fold = fold_suite(suite, ["animals"])
    assert sorted(t.name for t in fold.training_tasks()) == ["code", "sums"]
    assert set(fold.heldout) == {"cats", "dogs"} and fold_tasks(suite, ["animals"]) == ["cats", "dogs"]
    math_fold = fold_suite(suite, ["math"])
    assert sorted(t.name for t in math_fold.training_tasks()) == ["cats", "code"]
    assert "dogs" in math_fold.heldout  # the suite's own held-out tasks stay out of every fold
    with pytest.raises(ValueError, match="no training task"):
        fold_suite(suite, ["animals", "math", "code"])


def test_suite_folds_follow_the_evaluate_config(tiny_suite):
    """The oracles stage's per-fold multi-task LoRAs and the evaluate stage's fold generators
    both take their folds from here: none without evaluate.folds, else the config's fixed ones."""
    suite = load_suite(tiny_suite)  # groups: animals, math, code
    assert suite_folds(suite, EvalConfig(folds=0)) == []
    for seed in range(3):
        folds = suite_folds(suite, EvalConfig(folds=3, groups_per_fold=1, fold_seed=seed))
        assert folds == group_folds(["animals", "math", "code"], 3, 1, seed)
        assert sorted(g for f in folds for g in f) == ["animals", "code", "math"]


def test_explicit_fold_groups_replace_the_dealing_and_are_checked(tiny_suite):
    """evaluate.fold_groups names the folds outright (to compare runs on different suites on the
    same groups): it overrides a preset's fold count, and wrong names fail by the field's name."""
    suite = load_suite(tiny_suite)  # groups: animals, math, code
    config = EvalConfig(folds=4, fold_seed=3, fold_groups=[["code"], ["animals", "math"]])
    assert config.folds == 2  # a preset's `folds: 4` does not contradict the explicit list
    assert suite_folds(suite, config) == [["code"], ["animals", "math"]]
    with pytest.raises(ValueError, match=r"evaluate.fold_groups names \['poetry'\].*Fix"):
        suite_folds(suite, EvalConfig(fold_groups=[["poetry"]]))
    for bad, message in (([["code"], ["code", "math"]], "more than one fold"), ([], "non-empty"),
                         ([["code"], []], "non-empty")):
        with pytest.raises(ValueError, match=message):
            EvalConfig(fold_groups=bad)
    assert EvalConfig(folds=2).fold_groups is None and EvalConfig(folds=2).folds == 2
