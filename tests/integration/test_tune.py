"""Generator jobs on a real local Ray: a 2-trial ASHA + Optuna Tune search, resume, the final
generator as a Ray task, and bad input. The zoo is real peft files (tiny-llama); the task vectors
are synthetic, written as the task-vector stage's files (its job is tested in test_task_vectors_job)."""

from __future__ import annotations

import json
import logging
import os

import pandas as pd
import pytest
import ray
import torch

from icm.adapters import apply_adapter
from icm.config import load_config
from icm.eval.folds import suite_folds
from icm.generator import LoraGenerator
from icm.generator.inputs import load_generator_inputs
from icm.models import load_base_model
from icm.tasks import load_suite
from jobs import generator as generator_job
from jobs import tune as tune_job
from tests.conftest import make_suite
from tests.unit.test_generator import write_zoo

OVERRIDES = ["zoo.rank=4", "zoo.alpha=8.0", "zoo.dropout=0.0", "suite.tasks=null",
             "generator.steps=40", "generator.report_every=10", "generator.batch_size=16",
             "generator.subspace_dim=6", "generator.width=32", "generator.latent_dim=4",
             "generator.kl_warmup_steps=10", "generator.val_tasks=1", "generator.val_snapshots=1",
             "tune.num_samples=2", "tune.max_concurrent=2", "tune.grace_period=1",
             "tune.reduction_factor=2", "tune.rescore_top=2", "tune.rescore_max_texts=2",
             # the objective searched too: the best re-scored trial fine-tuned by the hybrid loss
             "tune.objectives=[reconstruction,hybrid]", "generator.lm_steps=4", "generator.lm_tasks=1",
             "generator.lm_texts=1", "generator.lm_seq_len=16"]


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, num_gpus=0, object_store_memory=200 * 1024**2, include_dashboard=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    base = tmp_path_factory.mktemp("generator")
    suite = load_suite(make_suite(base / "suite"))  # "dogs" is held out
    # The zoo also holds a held-out task's snapshots and a multi-task LoRA: neither may be used.
    conditions = write_zoo(base / "run" / "zoo", ["cats", "code", "dogs", "sums"], snapshots=4)
    # A relative storage root, as in the presets (Tune once refused one: "URI has empty scheme").
    cwd = os.getcwd()
    os.chdir(base)
    cfg = load_config("smoke", ["storage.root=run", f"suite.path={base / 'suite'}", *OVERRIDES])
    # The synthetic vectors as a task-vector stage's files (every mode alike), so every reader
    # (Tune's scorer, the LM fine-tune's workers) finds them where a real run leaves them.
    rows = [{"task": task, "mode": mode, "layer": cfg.generator.condition_layer,
             "pooling": cfg.generator.condition_pooling, "episode": episode, "vector": vector}
            for task, vectors in conditions.items() for mode in ("description", "demos", "both")
            for episode, vector in enumerate(vectors)]
    (base / "run" / "task_vectors" / "vectors").mkdir(parents=True)
    pd.DataFrame(rows).to_parquet(base / "run" / "task_vectors" / "vectors" / "part-0.parquet")
    inputs = load_generator_inputs(cfg, suite)
    yield cfg, suite, inputs
    os.chdir(cwd)


@pytest.fixture(scope="module")
def tuned(local_ray, workspace):
    cfg, suite, inputs = workspace
    return tune_job.run(cfg, suite, inputs=inputs)


@pytest.mark.slow
def test_tune_search_with_asha_writes_the_best_config(tuned, workspace):
    cfg, suite, _ = workspace
    root = cfg.storage.path("tune")
    split = json.loads((root / "split.json").read_text())
    assert sorted(split["train_tasks"] + split["val_tasks"]) == ["cats", "code", "sums"]
    assert len(split["val_tasks"]) == 1 and split["heldout_excluded"] == ["dogs"]
    # the smoke preset's fold holds out one group: Tune never validates on its tasks
    folds = suite_folds(suite, cfg.evaluate)
    assert split["fold_groups_not_validated_on"] == folds[0] and len(folds) == 1
    assert suite.tasks[split["val_tasks"][0]].group not in folds[0]
    trials = pd.read_parquet(root / "trials.parquet")
    assert len(trials) == 2 and (trials["steps"] <= 40).all() and (trials["val_mse"] > 0).all()
    trial_dirs = (root / "ray" / "cvae-search").glob("trainable_*")
    assert set(trials["trial_id"]) == {p.name.split("_")[1] for p in trial_dirs}
    best = json.loads((root / "best_config.json").read_text())
    assert best["selected_by"] == "perplexity"
    assert sorted(r["objective"] for r in best["rescored"]) == ["hybrid", "reconstruction", "reconstruction"]
    val_task = split["val_tasks"][0]
    for row in best["rescored"]:
        assert set(row["perplexity"]) == {val_task} and row["perplexity"][val_task] > 1
    # the objective search: one Tune trial, fine-tuned on the search's training tasks only
    hybrid = next(r for r in best["rescored"] if r["objective"] == "hybrid")
    assert hybrid["lm_tasks"] == sorted(split["train_tasks"]) and hybrid["lm_steps"] == 4
    assert hybrid["params"]["objective"] == "hybrid"
    assert len(list((root / "ray" / "objective-search").glob("objective_trainable_*"))) == 1
    winner = min(best["rescored"], key=lambda r: r["mean_log_perplexity"])
    assert best["objective"] == winner["objective"] == best["generator_config"]["objective"]
    assert best["trial_id"] == winner["trial_id"]
    assert best["generator_config"]["arch"] == "mlp" and best["hyperparameters"]["arch"] == "mlp"
    assert best["baselines"]["val_unseen_mean_mse"] > 0
    # trial checkpoints are kept (the last one of each trial)
    assert len(list((root / "ray" / "cvae-search").glob("trainable_*/checkpoint_*"))) == 2


@pytest.mark.slow
def test_rerun_skips_and_a_lost_record_restores_the_experiment(tuned, workspace, caplog):
    cfg, suite, inputs = workspace
    caplog.set_level(logging.INFO, logger="jobs.tune")
    assert tune_job.run(cfg, suite, inputs=inputs)["fingerprint"] == tuned["fingerprint"]
    assert "tune: up to date" in caplog.text
    (cfg.storage.path("tune") / "stage.json").unlink()  # as if killed after the search
    again = tune_job.run(cfg, suite, inputs=inputs)
    assert "restoring the experiment" in caplog.text
    assert again["outputs"]["best_trial"] == tuned["outputs"]["best_trial"]  # same trials, none new


@pytest.mark.slow
def test_final_generator_trains_on_every_training_task_with_the_best_config(tuned, workspace, tmp_path):
    cfg, suite, inputs = workspace
    record = generator_job.run(cfg, suite, inputs=inputs)
    out = cfg.storage.path("generator")
    assert {p.name for p in out.iterdir()} == {"generator.json", "generator.safetensors",
                                                "config.resolved.yaml", "stage.json"}
    assert not cfg.storage.path(generator_job.CHECKPOINT_DIR).exists()
    generator = LoraGenerator.load(out)
    best = json.loads(cfg.storage.path("tune", "best_config.json").read_text())
    assert generator.config.model_dump(mode="json") == best["generator_config"]
    trained = generator.summary["trained_on"]
    assert trained["tasks"] == ["cats", "code", "sums"] and trained["validation_tasks"] == []
    assert trained["snapshots"] == 12 and trained["held_out_snapshots_per_task"] == 0
    assert record["outputs"]["hyperparameters_from"] == f"Tune trial {best['trial_id']}"
    adapter = generator.write_adapter(generator.sample(inputs.conditions["cats"][0])[0], tmp_path / "a")
    model, tokenizer = load_base_model("tiny-llama")
    ids = tokenizer("The cat sat.", return_tensors="pt")
    with torch.inference_mode():
        base_logits = model(**ids).logits
        assert not torch.allclose(apply_adapter(model, adapter)(**ids).logits, base_logits)


def test_an_objective_search_without_validation_tasks_is_refused_before_searching(workspace):
    """The objectives are compared on validation tasks the LM loss never reads: with none, the
    stage says so naming the fields, before any trial runs."""
    from icm.errors import InputError

    cfg, suite, inputs = workspace
    cfg = cfg.model_copy(update={"generator": cfg.generator.model_copy(update={"val_tasks": 0}),
                                 "storage": cfg.storage.model_copy(update={"root": "no-validation"})})
    with pytest.raises(InputError, match="generator.val_tasks is 0"):
        tune_job.run(cfg, suite, inputs=inputs)
    assert not cfg.storage.path("tune", "split.json").exists()
    assert not cfg.storage.path("tune", "ray").exists()


@pytest.mark.parametrize("job", [tune_job, generator_job])
def test_jobs_report_a_missing_zoo_as_one_line(job, tmp_path, capsys):
    suite = make_suite(tmp_path / "suite")
    code = job.main(["--config", "smoke", f"storage.root={tmp_path / 'run'}", f"suite.path={suite}",
                     "suite.tasks=null"])
    assert code == 2 and "no LoRA zoo" in capsys.readouterr().err


def _write_task_vectors(folder, conditions) -> None:
    """Episode vectors in the task-vector stage's output format (vectors/shard-*/ parquet)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"task": task, "episode": e, "mode": "both", "layer": -1, "pooling": "mean", "vector": v.tolist()}
            for task, array in conditions.items() for e, v in enumerate(array)]
    rows += [{**row, "mode": "description", "vector": [x + 0.5 for x in row["vector"]]} for row in rows]
    (folder / "vectors" / "shard-0").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows), folder / "vectors" / "shard-0" / "part-0.parquet")


@pytest.mark.slow
def test_train_generator_command_reads_stored_zoo_and_task_vectors(local_ray, workspace, tmp_path, capsys):
    import shutil

    cfg, suite, inputs = workspace
    shutil.copytree(cfg.storage.path("zoo"), tmp_path / "run" / "zoo")
    stored = {**inputs.conditions, "dogs": inputs.conditions["cats"]}  # held-out vectors exist too
    _write_task_vectors(tmp_path / "run" / "task_vectors", stored)
    args = ["--config", "smoke", f"storage.root={tmp_path / 'run'}", f"suite.path={suite.path}",
            *OVERRIDES, "tune.enabled=false", "generator.steps=20",
            "generator.condition_modes=[description,both]"]
    assert generator_job.main(args) == 0
    assert "trained on all 3 training tasks (12 snapshots" in capsys.readouterr().out
    generator = LoraGenerator.load(tmp_path / "run" / "generator")
    assert generator.condition_spec["condition_dim"] == 16 and generator.condition_spec["modes"] == ["description", "both"]
    # both modes' episodes are training contexts of the same task
    episodes = sum(len(stored[t]) for t in ("cats", "code", "sums"))
    assert generator.summary["trained_on"]["episodes"] == 2 * episodes
    assert generator.summary["trained_on"]["tasks"] == ["cats", "code", "sums"]
    assert generator_job.main(args) == 0  # up to date: skipped


def test_model_selection_scores_a_train_slice_never_eval_texts(tiny_suite):
    """Tune's re-scoring read eval_texts()[:8]: exactly the texts the evaluation then reported."""
    from icm.tasks import load_suite
    from jobs.tune import validation_texts

    for task in load_suite(tiny_suite).tasks.values():
        texts = validation_texts(task, 4)
        assert len(texts) == 4 and set(texts) <= set(task.train_texts())
        assert not set(texts) & set(task.eval_texts())
