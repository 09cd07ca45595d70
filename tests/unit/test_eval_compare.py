"""Comparing generators: another run's generated rows beside the reference's baselines, only
when both runs scored the same texts (icm eval-compare)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from jobs.cli import main
from icm.errors import InputError
from icm.eval.compare import merge_runs, pair_across_zoos, zoo_comparison_table
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


def test_a_folds_only_run_joins_a_held_out_only_reference_with_its_own_base_and_oracle():
    """evaluate.heldout=false scores the folds of a generator whose held-out rows another run
    has: the merged report holds both settings, the folds paired by their own base and oracle."""
    full = _results(generated_shift=-0.3)
    heldout_only, folds_only = full[full["setting"] == "heldout"], full[full["setting"] == "fold"]
    merged = merge_runs(heldout_only, {"folds": folds_only})
    fold_rows = merged[merged["setting"] == "fold"]
    assert set(fold_rows["variant"]) == {"base", "oracle", "soup", "nearest", "generated[folds]"}
    assert len(fold_rows) == len(folds_only)  # every fold row, once
    table = generators_table(merged, resamples=200, seed=0).set_index(["setting", "generator"])
    versus_soup = table.loc[("folds", "generated[folds]"), "/ soup"]
    assert float(versus_soup.split()[0]) > 1 and versus_soup.endswith("(0/6)")  # 3.7 vs 3.6: loses
    assert ("held-out", "generated") in table.index
    unpaired = folds_only[folds_only["variant"] != "oracle"]  # nothing to measure the gap by
    with pytest.raises(InputError, match="without base and oracle rows"):
        merge_runs(heldout_only, {"folds": unpaired})
    moved = folds_only.assign(fold=folds_only["fold"] + 1)  # the same tasks, in other folds
    with pytest.raises(InputError, match="same evaluate.fold_groups"):
        merge_runs(full[full["setting"] != "seen"], {"folds": moved})


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


def test_eval_compare_names_the_folds_of_a_folds_only_run(tmp_path):
    """A held-out-only reference has no folds of its own: the headline takes the merged
    folds-only run's groups rather than saying '0 folds pooled', and its generator
    (generated[folds]) rather than 'n/a'."""
    import json

    full = _results()
    for name, setting in (("heldout", "heldout"), ("folds", "fold")):
        (tmp_path / name).mkdir()
        full[full["setting"] == setting].to_parquet(tmp_path / name / "results.parquet")
    (tmp_path / "folds" / "baselines.json").write_text(json.dumps({"folds": [["g0"], ["g1"]]}))
    out = tmp_path / "compare.md"
    assert main(["eval-compare", "--reference", str(tmp_path / "heldout"),
                 "--run", f"folds={tmp_path / 'folds'}", "--out", str(out), "--bootstrap", "100"]) == 0
    text = out.read_text()
    assert "group folds (2 folds pooled), generated[folds]" in text and "fold 1: g1" in text
    fold_lines = [line for line in text.splitlines()
                  if line.startswith(("| group folds", "| fold ")) and "generated[folds]" in line]
    assert len(fold_lines) == 3 and not any("n/a" in line for line in fold_lines), fold_lines
    # the folds' every-variant table compares each variant with that generator too
    every = text.split("## Group folds (pooled): every variant")[1].split("\n## ")[0]
    soup = next(line for line in every.splitlines() if line.startswith("| soup "))
    assert soup.count("[") == 3, soup  # gap, / oracle, and generated[folds] / soup


def _wide_run() -> pd.DataFrame:
    """The same texts and oracles on another zoo: a better soup, folds numbered the other way,
    and only half of the held-out tasks scored (another suite)."""
    wide = _results(levels={"soup": 3.3})
    wide["fold"] = wide["fold"].map(lambda f: None if pd.isna(f) else 1 - f)
    return wide[~wide["task"].isin([f"h{i}" for i in range(6)])]


def test_runs_on_different_zoos_are_paired_on_their_common_tasks_with_every_variant_labelled():
    paired = pair_across_zoos({"core": _results(), "wide": _wide_run()})
    assert {"soup[core]", "soup[wide]", "generated[core]", "generated[wide]"} <= set(paired["variant"])
    assert paired.query("setting == 'heldout' and variant == 'base'")["task"].nunique() == 6
    assert (paired["variant"] == "base").sum() == paired["task"].nunique()  # shared rows once
    table = zoo_comparison_table(paired, ["core", "wide"], resamples=200, seed=0)
    rows = table.set_index(["setting", "variant"])["wide / core ppl [95% CI]"]
    assert float(rows[("fold", "soup")].split()[0]) < 0.8  # exp(3.3 - 3.6): the wider zoo's soup
    assert abs(float(rows[("fold", "generated")].split()[0]) - 1) < 0.02  # same generator level
    assert rows[("heldout", "soup")].startswith("0.7") and table["tasks"].max() == 6


def test_runs_on_different_zoos_must_share_texts_and_oracles():
    other_oracle = _wide_run()
    oracle = other_oracle["variant"] == "oracle"
    other_oracle.loc[oracle, "text_nll"] = other_oracle.loc[oracle, "text_nll"].map(lambda v: [x * 1.1 for x in v])
    with pytest.raises(InputError, match="disagree on 'oracle'"):
        pair_across_zoos({"core": _results(), "wide": other_oracle})
    disjoint = _results().assign(task=lambda d: d["task"] + "-other")
    with pytest.raises(InputError, match="share no"):
        pair_across_zoos({"core": _results(), "wide": disjoint})
    with pytest.raises(InputError, match="at least two"):
        pair_across_zoos({"core": _results()})


def test_eval_compare_zoos_command_merges_same_zoo_folders_and_writes_the_table(tmp_path, capsys):
    full = _results()
    full.query("variant != 'nearest'").to_parquet(tmp_path / "core.parquet")
    full.query("variant in ['base', 'nearest']").to_parquet(tmp_path / "core-extra.parquet")
    _wide_run().to_parquet(tmp_path / "wide.parquet")
    out = tmp_path / "zoos.md"
    assert main(["eval-compare-zoos", "--run", f"core={tmp_path / 'core.parquet'},{tmp_path / 'core-extra.parquet'}",
                 "--run", f"wide={tmp_path / 'wide.parquet'}", "--out", str(out), "--bootstrap", "50"]) == 0
    text = out.read_text()
    assert "| nearest " in text and "wide / core ppl" in text and "- heldout: h10, h11, h6" in text
    capsys.readouterr()
    assert main(["eval-compare-zoos", "--run", "core", "--run", "wide=x", "--out", str(out)]) == 2
    assert "must be LABEL=FOLDER" in capsys.readouterr().err
    wide = f"wide={tmp_path / 'wide.parquet'}"
    assert main(["eval-compare-zoos", "--run", wide, "--run", wide, "--out", str(out)]) == 2
    assert "given twice" in capsys.readouterr().err


def test_generators_are_divided_by_the_zoo_span_yardstick_after_the_baselines_when_it_was_scored():
    """oracle-projection is no rival (it reads the oracle) but the report's test of whether a
    generator left the zoo's span: a column after the baselines, absent when not scored."""
    with_span = _results(generated_shift=-0.8, levels={"oracle-projection": 3.4})  # generated 3.2
    table = generators_table(with_span, resamples=200, seed=0)
    columns = list(table.columns)
    assert columns[-1] == "/ oracle-projection" and columns.index("/ nearest") < columns.index("/ oracle-projection")
    held = table.set_index(["setting", "generator"]).loc[("held-out", "generated")]
    ratio = float(held["/ oracle-projection"].split()[0])
    assert ratio == pytest.approx(float(np.exp(3.2 - 3.4)), abs=0.01) and held["/ oracle-projection"].endswith("(12/12)")
    assert "/ oracle-projection" not in generators_table(_results(), resamples=200, seed=0).columns
    text = markdown_report(with_span, command="c", config_yaml="", title="T", resamples=100)
    assert "yardsticks, not rivals" in text
    assert "oracle-projection" not in list(table["generator"])  # a yardstick is never a generator row


def test_zoos_trained_longer_keep_their_own_oracles_and_share_the_prompt():
    """A zoo of longer-trained LoRAs (zoo.steps) has better oracles on the same texts: refused
    unless asked, then each run's gap is against its own oracle, and the prompt (no LoRA) is
    shared and checked like the base model."""
    short = _results(levels={"in-context": 3.3})
    longer = _results(levels={"in-context": 3.3, "oracle": 2.5, "soup": 3.1})  # same seed: same base
    with pytest.raises(InputError, match="disagree on 'oracle'.*--own-oracles"):
        pair_across_zoos({"z12": short, "z48": longer})
    paired = pair_across_zoos({"z12": short, "z48": longer}, own_oracles=True)
    assert {"oracle[z12]", "oracle[z48]", "soup[z12]", "soup[z48]"} <= set(paired["variant"])
    assert (paired["variant"] == "in-context").sum() == paired["task"].nunique()  # shared, once
    assert "oracle" not in set(paired["variant"])
    table = zoo_comparison_table(paired, ["z12", "z48"], resamples=200, seed=0)
    held = table[table["setting"] == "heldout"].set_index("variant")
    assert held.loc["soup", "gap [z12]"].startswith("0.4")  # (4 - 3.6) / (4 - 3.0)
    assert held.loc["soup", "gap [z48]"].startswith("0.6")  # (4 - 3.1) / (4 - 2.5): its own oracle
    assert held.loc["oracle", "z48 / z12 ppl [95% CI]"].startswith("0.60")  # exp(-0.5)
    assert held.loc["oracle", "gap [z48]"] == ""
    assert held.loc["soup", "z48 / in-context"].startswith("0.8")  # exp(3.1 - 3.3)
    other_prompt = _results(levels={"in-context": 3.2, "oracle": 2.5})
    with pytest.raises(InputError, match="disagree on 'in-context'"):
        pair_across_zoos({"z12": short, "z48": other_prompt}, own_oracles=True)


def test_eval_compare_zoos_command_takes_own_oracles(tmp_path, capsys):
    _results(levels={"oracle": 3.0}).to_parquet(tmp_path / "z12.parquet")
    _results(levels={"oracle": 2.5}).to_parquet(tmp_path / "z48.parquet")
    out = tmp_path / "zoos.md"
    runs = ["--run", f"z12={tmp_path / 'z12.parquet'}", "--run", f"z48={tmp_path / 'z48.parquet'}"]
    assert main(["eval-compare-zoos", *runs, "--out", str(out), "--bootstrap", "50"]) == 2
    assert "--own-oracles" in capsys.readouterr().err
    assert main(["eval-compare-zoos", *runs, "--out", str(out), "--bootstrap", "50", "--own-oracles"]) == 0
    assert "| oracle " in out.read_text()


def test_a_run_without_base_or_oracle_rows_is_refused_and_a_missing_own_oracle_reads_n_a():
    no_oracle = _wide_run().query("variant != 'oracle'")
    with pytest.raises(InputError, match="disagree on 'oracle'"):
        pair_across_zoos({"core": _results(), "wide": no_oracle})
    with pytest.raises(InputError, match="disagree on 'base'"):
        pair_across_zoos({"core": _results(), "wide": _wide_run().query("variant != 'base'")},
                         own_oracles=True)
    paired = pair_across_zoos({"core": _results(), "wide": no_oracle}, own_oracles=True)
    table = zoo_comparison_table(paired, ["core", "wide"], resamples=50, seed=0)
    soup = table[table["setting"] == "heldout"].set_index("variant").loc["soup"]
    assert soup["gap [wide]"] == "n/a" and abs(float(soup["gap [core]"].split()[0]) - 0.4) < 0.01
