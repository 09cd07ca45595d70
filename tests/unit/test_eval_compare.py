"""Comparing generators: another run's generated rows beside the reference's baselines, only
when both runs scored the same texts (icm eval-compare)."""

from __future__ import annotations

import pandas as pd
import pytest

from jobs.cli import main
from icm.errors import InputError
from icm.eval.compare import merge_runs
from icm.eval.report import generators_table, markdown_report
from tests.unit.test_eval_report import _results


def _other_run(shift: float) -> pd.DataFrame:
    """A second evaluation of the same tasks and texts (same seed: same base and oracle NLL)
    with a generator whose log ppl is 4.0 + shift."""
    other = _results(generated_shift=shift)
    return other[other["variant"].isin(["base", "oracle", "generated"])]


def test_merged_generator_is_compared_with_every_baseline():
    merged = merge_runs(_results(generated_shift=-0.3), {"hyper": _other_run(-0.8)})
    assert {"generated", "generated[hyper]"} <= set(merged["variant"])
    assert (merged["variant"] == "base").sum() == (_results()["variant"] == "base").sum()  # not twice
    table = generators_table(merged, resamples=200, seed=0).set_index(["setting", "generator"])
    hyper = table.loc[("held-out", "generated[hyper]")]
    assert hyper["gap recovered"].startswith("0.8") and hyper["/ soup"].endswith("(12/12)")
    assert float(table.loc[("held-out", "generated"), "/ soup"].split()[0]) > 1  # 3.7 vs 3.6
    text = markdown_report(merged, command="c", config_yaml="", title="T", resamples=100)
    assert "## Each generator against each baseline" in text and "from the generator of run 'hyper'" in text


def test_runs_on_other_texts_are_refused():
    other = _other_run(-0.8)
    other.loc[other["variant"] == "base", "text_nll"] = other.loc[
        other["variant"] == "base", "text_nll"].map(lambda v: [x * 1.01 for x in v])
    with pytest.raises(InputError, match="scored 'base'.*not be paired"):
        merge_runs(_results(), {"hyper": other})
    shorter = _other_run(-0.8).query("variant == 'generated'").copy()  # generated rows only
    shorter["text_tokens"] = shorter["text_tokens"].map(lambda v: [x - 1 for x in v])
    with pytest.raises(InputError, match="other texts"):
        merge_runs(_results(), {"hyper": shorter})
    alone = _other_run(-0.8).query("variant == 'generated'")  # no base rows: token counts pair it
    assert "generated[hyper]" in set(merge_runs(_results(), {"hyper": alone})["variant"])
    no_generator = _other_run(-0.8).query("variant != 'generated'")
    with pytest.raises(InputError, match="adds nothing"):
        merge_runs(_results(), {"hyper": no_generator})
    other_soup = _results(levels={"soup": 3.5}).query("variant == 'soup'")  # a baseline differs
    with pytest.raises(InputError, match="scored 'soup'.*not be paired"):
        merge_runs(_results(), {"baselines": other_soup})


def test_baselines_scored_by_another_run_join_unlabelled_and_judge_every_generator():
    """A reference that scored only base, oracle and its generator, a run on the same zoo that
    scored the baselines, and a second generator's run: one table, every pair."""
    full = _results(generated_shift=-0.3)
    reference = full[full["variant"].isin(["base", "oracle", "generated"])]
    baselines = full[full["variant"].isin(["base", "soup", "nearest"])]
    merged = merge_runs(reference, {"baselines": baselines, "hyper": _other_run(-0.8)})
    assert set(merged["variant"]) == {"base", "oracle", "generated", "soup", "nearest", "generated[hyper]"}
    assert (merged["variant"] == "base").sum() == (reference["variant"] == "base").sum()
    table = generators_table(merged, resamples=200, seed=0).set_index(["setting", "generator"])
    assert table.loc[("held-out", "generated[hyper]"), "/ soup"].endswith("(12/12)")
    assert float(table.loc[("held-out", "generated"), "/ nearest"].split()[0]) < 1  # 3.7 vs 3.8


def test_a_stacked_generator_is_labelled_by_its_run_and_stacked_baselines_join_as_they_are():
    from icm.eval.report import stacked_table

    levels = {"in-context": 3.4, "in-context+generated": 3.2, "in-context+soup": 3.3}
    full = _results(levels=levels)
    reference = full[full["variant"].isin(["base", "oracle", "generated", "in-context"])]
    stacked = full[full["variant"].isin(["base", "in-context+generated", "in-context+soup"])]
    merged = merge_runs(reference, {"hybrid": stacked})
    assert {"in-context+generated[hybrid]", "in-context+soup"} <= set(merged["variant"])
    assert "in-context+generated" not in set(merged["variant"])  # another run's generator made it
    table = stacked_table(merged, 200, 0).set_index(["setting", "variant"])
    ratio = table.loc[("held-out", "in-context+generated[hybrid]"), "/ in-context+soup"]
    assert float(ratio.split()[0]) < 1 and ratio.endswith("(12/12)")


def test_eval_compare_command_writes_the_report(tmp_path, capsys):
    _results().to_parquet(tmp_path / "reference.parquet")
    (tmp_path / "hyper").mkdir()
    _other_run(-0.8).to_parquet(tmp_path / "hyper" / "results.parquet")
    out = tmp_path / "compare.md"
    assert main(["eval-compare", "--reference", str(tmp_path / "reference.parquet"),
                 "--run", f"hyper={tmp_path / 'hyper'}", "--out", str(out), "--bootstrap", "50"]) == 0
    assert "generated[hyper]" in out.read_text() and out.with_suffix(".png").is_file()
    full = _results()
    full.query("variant in ['base', 'soup']").to_parquet(tmp_path / "baselines.parquet")
    full.query("variant != 'soup'").to_parquet(tmp_path / "reference.parquet")
    capsys.readouterr()
    assert main(["eval-compare", "--reference", str(tmp_path / "reference.parquet"), "--run",
                 f"baselines={tmp_path / 'baselines.parquet'}", "--out", str(out), "--bootstrap", "50"]) == 0
    assert "generators ['generated'] ->" in capsys.readouterr().out  # no generated[baselines]
    assert "| soup " in out.read_text()
    assert main(["eval-compare", "--reference", str(tmp_path / "reference.parquet"),
                 "--run", "hyper", "--out", str(out)]) == 2
    assert "must be LABEL=FOLDER" in capsys.readouterr().err
