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


def test_a_fold_generators_fingerprint_follows_its_inputs_not_the_zoos_other_jobs(tmp_path, caplog):
    """Turning on the zoo's multi-task LoRA changes the zoo stage's fingerprint but no fold
    generator's input: the folds are kept. A new main generator, or with lm_anchor: multitask a
    new oracles stage, changes them. A fold finished under the previous fingerprint (the zoo's,
    task vectors' and generator's stage fingerprints) is kept, its marker rewritten."""
    import json
    import logging

    from icm.config import GeneratorConfig, PipelineConfig
    from icm.io import sha256_json
    from jobs.evaluate import _migrate_fold_marker, fold_fingerprint

    cfg = PipelineConfig.model_validate({"storage": {"root": str(tmp_path / "run")}})

    def finished(stage: str, fingerprint: str) -> None:
        (tmp_path / "run" / stage).mkdir(parents=True, exist_ok=True)
        (tmp_path / "run" / stage / "stage.json").write_text(json.dumps({"fingerprint": fingerprint}))

    for stage in ("zoo", "task_vectors", "generator", "oracles"):
        finished(stage, f"{stage}-1")
    plain, anchored = GeneratorConfig(), GeneratorConfig(lm_anchor="multitask")
    first = {g.lm_anchor: fold_fingerprint(cfg, g, ["bible"]) for g in (plain, anchored)}
    assert fold_fingerprint(cfg, plain, ["code"]) != first["zoo-mean"]  # another fold
    marker = tmp_path / "run" / "evaluate" / "folds" / "fold-0" / "fold.json"
    marker.parent.mkdir(parents=True)
    legacy = sha256_json([["zoo-1", "task_vectors-1", "generator-1"], ["bible"]])
    marker.write_text(json.dumps({"fingerprint": legacy, "wall_seconds": 9.0}))
    with caplog.at_level(logging.INFO, logger="jobs.evaluate"):
        _migrate_fold_marker(cfg, plain, marker, ["bible"], first["zoo-mean"])
    assert json.loads(marker.read_text()) == {"fingerprint": first["zoo-mean"], "wall_seconds": 9.0}
    assert "kept" in caplog.text
    finished("zoo", "zoo-2")  # + the multi-task LoRA
    finished("task_vectors", "task_vectors-2")  # + a pooling
    assert {g.lm_anchor: fold_fingerprint(cfg, g, ["bible"]) for g in (plain, anchored)} == first
    finished("oracles", "oracles-2")  # a new fold multi-task LoRA: only the anchored folds change
    assert fold_fingerprint(cfg, plain, ["bible"]) == first["zoo-mean"]
    assert fold_fingerprint(cfg, anchored, ["bible"]) != first["multitask"]
    finished("generator", "generator-2")
    assert fold_fingerprint(cfg, plain, ["bible"]) != first["zoo-mean"]
    stale = sha256_json([["zoo-2", "task_vectors-2", "generator-1"], ["bible"]])  # an old generator's
    marker.write_text(json.dumps({"fingerprint": stale}))
    _migrate_fold_marker(cfg, plain, marker, ["bible"], fold_fingerprint(cfg, plain, ["bible"]))
    assert json.loads(marker.read_text()) == {"fingerprint": stale}  # not migrated: retrained


def test_the_main_generator_is_required_unless_only_folds_are_scored(tiny_suite, tmp_path,
                                                                      monkeypatch):
    """The held-out set (with oracles) and seen tasks read the main generator: without its
    stage the error names the stage and both fixes. Folds alone get its plan instead
    (tests/integration/test_pipeline.py trains folds from it); with Tune on, only once the
    search has run, since the plan's hyperparameters are its pick."""
    import pytest

    import jobs.generator
    from icm.config import PipelineConfig
    from icm.errors import InputError
    from icm.tasks import load_suite
    from jobs.evaluate import main_generator_record

    suite = load_suite(tiny_suite)

    def config(tune=False, **evaluate):
        return PipelineConfig.model_validate({"storage": {"root": str(tmp_path)},
                                              "tune": {"enabled": tune}, "evaluate": evaluate})

    (tmp_path / "oracles").mkdir()
    (tmp_path / "oracles" / "stage.json").write_text('{"fingerprint": "oracles-1"}')
    needs = "stage 'generator' has no finished output.*evaluate.heldout=false evaluate.seen_tasks=0"
    for asks in ({"seen_tasks": 0}, {"heldout": False, "seen_tasks": 2}):  # held out; seen
        with pytest.raises(InputError, match=needs):
            main_generator_record(config(**asks), suite)
    with pytest.raises(InputError, match="tune.enabled=true and the tune stage has not run"):
        main_generator_record(config(tune=True, heldout=False, seen_tasks=0), suite)
    planned = {"fingerprint": "planned-1", jobs.generator.PLANNED: True}
    monkeypatch.setattr(jobs.generator, "planned_record", lambda cfg, suite: planned)
    assert main_generator_record(config(heldout=False, seen_tasks=0), suite) is planned
    (tmp_path / "oracles" / "stage.json").unlink()  # no oracles: no held-out set to score
    assert main_generator_record(config(seen_tasks=0), suite) is planned
    (tmp_path / "generator").mkdir()
    (tmp_path / "generator" / "stage.json").write_text('{"fingerprint": "trained-1"}')
    assert main_generator_record(config(), suite) == {"fingerprint": "trained-1"}
