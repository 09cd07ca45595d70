"""The evaluate stage's per-item result line names only the variants that item scored."""

from __future__ import annotations

import pandas as pd

from jobs.evaluate import _perplexities


def test_a_generated_only_run_prints_no_nan_columns():
    assert _perplexities(pd.Series({"generated": 27.9}), {"soup"}) == "generated 27.90"


def test_a_full_run_prints_base_oracle_generated_and_the_best_baseline():
    line = _perplexities(pd.Series({"base": 30.0, "oracle": 20.0, "generated": 25.0, "soup": 26.0,
                                    "nearest": 24.5, "control-shuffled": 10.0}), {"soup", "nearest"})
    assert line == "base 30.00  oracle 20.00  generated 25.00  best baseline 24.50"


def test_heldout_false_skips_the_fixed_heldout_set_and_missing_oracles_warn(tiny_suite, caplog):
    """``evaluate.heldout: false`` scores only folds / seen tasks (the folds of a generator whose
    held-out rows another run has); without oracles the held-out set is skipped with a warning."""
    from icm.config import EvalConfig
    from icm.tasks import load_suite
    from jobs.evaluate import scores_heldout

    suite = load_suite(tiny_suite)
    assert suite.heldout
    assert scores_heldout(EvalConfig(), suite, has_oracles=True)
    assert not scores_heldout(EvalConfig(heldout=False), suite, has_oracles=True)
    assert not caplog.records
    assert not scores_heldout(EvalConfig(), suite, has_oracles=False)
    assert "no oracles" in caplog.text
