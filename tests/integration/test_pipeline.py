"""The main job end to end on a real local Ray: every stage, stage skipping, kill-and-resume, and
the rule that held-out tasks never reach a training input."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from tests.conftest import REPO_ROOT, make_suite
from tests.integration.smoke_pipeline import FAST

STAGES = ("prepare", "base_eval", "zoo", "oracles", "task_vectors", "tune", "generator", "evaluate")


@pytest.mark.slow
def test_every_stage_runs_and_writes_its_outputs(smoke_run):
    root, first = smoke_run.root, smoke_run.resumed
    for stage in STAGES:
        record = json.loads((root / stage / "stage.json").read_text())
        assert record["stage"] == stage and record["fingerprint"]
        resolved = yaml.safe_load((root / stage / "config.resolved.yaml").read_text())
        assert resolved["model"]["spec"] == "tiny-llama" and resolved["storage"]["root"] == f"file://{root}"
    results = pd.read_parquet(root / "evaluate" / "results.parquet")
    assert sorted(results["task"].unique()) == ["cats", "code", "dogs", "sums"]
    settings = results.groupby("setting")["task"].unique().map(sorted).to_dict()
    assert settings["heldout"] == ["dogs"] and sorted(settings["seen"]) == ["cats", "code", "sums"]
    fold_tasks = set(settings["fold"])  # one fold: one whole group, every task of it
    groups = {"cats": "animals", "dogs": "animals", "sums": "math", "code": "code"}
    assert len({groups[t] for t in fold_tasks}) == 1 and fold_tasks == {t for t, g in groups.items()
                                                                        if g == groups[min(fold_tasks)]}
    held = set(results.query("setting == 'heldout'")["variant"])
    assert {"base", "oracle", "generated", "generated-best-of-k", "soup", "similarity-soup", "nearest",
            "ridge", "multitask", "in-context", "cond-description", "control-shuffled",
            "in-context+generated"} <= held  # the last opt-in, named by the smoke preset
    assert "in-context+soup" not in set(results["variant"])  # opt-in, not named
    assert {"lookup", "replicate"} <= set(results.query("setting == 'seen'")["variant"])
    assert "multitask" not in set(results.query("setting == 'fold'")["variant"])
    for _, row in results.iterrows():  # per-text NLL stored: intervals can be computed from it
        assert len(row["text_nll"]) == row["texts"] and sum(row["text_tokens"]) == row["tokens"]
    assert results["perplexity"].between(1, 1e7).all()
    report = (root / "evaluate" / "EVAL.md").read_text()
    assert "## Headline: tasks the generator never saw" in report and "fixed held-out set" in report
    assert "group folds (1 folds pooled)" in report and "## Adapters stacked on the prompt" in report
    assert "Produced by `icm run --config smoke " in report  # the exact command, once
    assert (root / "evaluate" / "per_task.png").stat().st_size > 5_000
    assert (root / "evaluate" / "folds" / "fold-0" / "generator" / "generator.json").is_file()
    assert "Generated adapters on unseen tasks" in first.stdout and "Artifacts under" in first.stdout


def _icm(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "jobs", *args], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.slow
def test_generate_writes_a_peft_adapter_for_a_task_folder_or_a_description(smoke_run, tmp_path):
    root, suite = smoke_run.root, smoke_run.suite
    examples = tmp_path / "examples.jsonl"
    examples.write_text('{"text": "A small brown dog ran after the ball."}\n'
                        '{"text": "The puppy barked twice and wagged its tail."}\n')
    by_task = _icm("generate", "--generator", str(root / "generator"), "--task", str(suite / "dogs"),
                   "--out", str(tmp_path / "from-task"))
    assert by_task.returncode == 0, by_task.stderr[-3000:]
    by_text = _icm("generate", "--generator", str(root / "generator"), "--description",
                   "Short texts about dogs.", "--examples", str(examples), "--samples", "3",
                   "--select", "demo-ppl", "--seed", "1", "--out", str(tmp_path / "from-text"))
    assert by_text.returncode == 0, by_text.stderr[-3000:]
    chosen = json.loads(by_text.stdout)
    assert len(chosen["demo_perplexities"]) == 3
    assert chosen["demo_perplexities"][chosen["chosen_sample"]] == min(chosen["demo_perplexities"])
    import torch
    from peft import PeftModel

    from icm.models import load_base_model

    model, tokenizer = load_base_model("tiny-llama")
    ids = tokenizer("The dog sat.", return_tensors="pt")
    with torch.inference_mode():
        base = model(**ids).logits
        adapted = PeftModel.from_pretrained(model, str(tmp_path / "from-text"))(**ids).logits
    assert not torch.allclose(base, adapted)  # the unchanged base model + the generated adapter
    half = _icm("generate", "--generator", str(root / "generator"), "--task", str(suite / "dogs"),
                "--condition-scale", "0.5", "--out", str(tmp_path / "half"))
    assert half.returncode == 0, half.stderr[-3000:]
    record = json.loads((tmp_path / "half" / "icm_generation.json").read_text())
    assert record["condition_scale"] == 0.5
    from safetensors.torch import load_file

    weights = [load_file(tmp_path / name / "adapter_model.safetensors")
               for name in ("from-task", "half")]
    assert any(not torch.equal(weights[0][key], weights[1][key]) for key in weights[0])
    scored = _icm("score", "--adapter", str(tmp_path / "from-task"), "--task", str(suite / "dogs"),
                  "--model", "tiny-llama", "--config", "smoke")
    assert scored.returncode == 0 and json.loads(scored.stdout)["perplexity"] > 1
    # The smoke preset's evaluate section sets the defaults (max_texts 4, max_length 64): what
    # the evaluate stage scores.
    from icm.tasks import load_task

    assert json.loads(scored.stdout)["texts"] == min(4, len(load_task(suite / "dogs").eval_texts()))
    old = _icm("evaluate", "--adapter", str(tmp_path / "from-task"), "--task", str(suite / "dogs"),
               "--model", "tiny-llama", "--config", "smoke")  # the previous name, for one release
    assert old.returncode == 0 and "is now 'icm score'" in old.stderr
    assert json.loads(old.stdout)["perplexity"] == json.loads(scored.stdout)["perplexity"]


def test_generate_rejects_a_request_without_context(tmp_path):
    out = _icm("generate", "--generator", str(tmp_path), "--out", str(tmp_path / "a"))
    assert out.returncode == 2 and "Traceback" not in out.stderr and "--description" in out.stderr
    missing = _icm("generate", "--generator", str(tmp_path), "--description", "x", "--out", str(tmp_path / "a"))
    assert missing.returncode == 2 and "not a generator" in missing.stderr


@pytest.mark.slow
def test_heldout_tasks_never_reach_a_training_input(smoke_run):
    root = smoke_run.root
    assert set(pd.read_parquet(root / "zoo" / "manifest.parquet")["task"]) == {"cats", "code", "sums", "multitask"}
    split = json.loads((root / "tune" / "split.json").read_text())  # what every Tune trial trains on
    assert sorted(split["train_tasks"] + split["val_tasks"]) == ["cats", "code", "sums"]
    assert split["heldout_excluded"] == ["dogs"]
    generator = json.loads((root / "generator" / "generator.json").read_text())
    assert generator["training"]["trained_on"]["tasks"] == ["cats", "code", "sums"]
    # ... while the held-out task still gets a task vector (that is how it gets an adapter)
    from icm.task_vectors import load_task_means

    assert "dogs" in load_task_means(root / "task_vectors", mode="both", layer=-1, pooling="mean")


@pytest.mark.slow
def test_oracles_are_measurement_only(smoke_run):
    """Oracle and replicate LoRAs live in oracles/; nothing that trains or feeds the generator
    opens a file there (every open() while the generator's inputs load and it trains is watched)."""
    root, suite = smoke_run.root, smoke_run.suite
    oracles = pd.read_parquet(root / "oracles" / "manifest.parquet")
    assert set(oracles["task"]) == {"dogs", "replicate-of-cats"}
    assert "dogs" not in set(pd.read_parquet(root / "zoo" / "manifest.parquet")["task"])
    import sys as _sys

    from icm.config import load_config
    from icm.generator import train_generator
    from icm.generator.inputs import load_generator_inputs
    from icm.tasks import load_suite

    opened: list[str] = []
    watching = [True]

    def hook(event, args):
        if watching[0] and event == "open" and args and isinstance(args[0], (str, bytes, os.PathLike)):
            opened.append(os.fsdecode(args[0]))

    _sys.addaudithook(hook)  # cannot be removed: switched off below
    try:
        cfg = load_config("smoke", [*FAST, f"suite.path={suite}", f"storage.root={root}"])
        inputs = load_generator_inputs(cfg, load_suite(suite))
        train_generator(inputs.zoo, inputs.conditions, cfg.generator.model_copy(update={"steps": 5}),
                        condition_spec=inputs.condition_spec, init_state=inputs.init_state)
    finally:
        watching[0] = False
    assert any("/zoo/" in path for path in opened)  # the hook saw the zoo being read
    assert not [path for path in opened if str(root / "oracles") in path]


@pytest.mark.slow
def test_killed_pipeline_resumed_from_a_uri_root_on_a_fresh_mirror(smoke_run):
    root, resumed = smoke_run.root, smoke_run.resumed
    assert "zoo: up to date" in resumed.stderr and f"Artifacts under file://{root}" in resumed.stdout
    for stage in STAGES:  # every stage on the URI, each with its commit marker and config
        assert json.loads((root / stage / "stage.json").read_text())["stage"] == stage
        assert (root / stage / "config.resolved.yaml").is_file()
    # What Ray workers wrote went up too: every snapshot (with its snapshot.json), task vectors.
    manifest = pd.read_parquet(root / "zoo" / "manifest.parquet")
    assert set(manifest["task"]) == {"cats", "code", "sums", "multitask"}
    assert len(list((root / "zoo" / "tasks").glob("*/snapshots/*/snapshot.json"))) == len(manifest)
    assert list((root / "task_vectors" / "vectors").glob("shard-*/_shard.json"))
    assert (root / "zoo" / "ray").is_dir() and (root / "tune" / "ray").is_dir()
    assert not (smoke_run.base / "mirror-2" / "zoo" / "ray").exists()  # Ray's own storage is not mirrored


@pytest.mark.slow
def test_rerun_skips_every_stage_and_a_changed_section_reruns_only_its_stage(smoke_run):
    """Yet another fresh mirror: nothing is redone, the summary's results are pulled from the URI;
    a changed evaluate section reruns that stage only."""
    again = smoke_run.rerun("mirror-3")
    for stage in STAGES:
        assert f"{stage}: up to date" in again.stderr, stage
    assert (smoke_run.base / "mirror-3" / "evaluate" / "results.parquet").is_file()  # pulled for the summary
    assert "Generated adapters on unseen tasks" in again.stdout
    changed = smoke_run.rerun("mirror-4", "evaluate.max_texts=1")
    assert "evaluate: up to date" not in changed.stderr and "zoo: up to date" in changed.stderr
    assert "generator: up to date" in changed.stderr
    assert (pd.read_parquet(smoke_run.root / "evaluate" / "results.parquet")["texts"] == 1).all()


def test_pipeline_rejects_an_unwritable_storage_root(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    out = subprocess.run([sys.executable, "-m", "jobs.pipeline", "--config", "smoke",
                          f"storage.root={blocker}/run"], cwd=REPO_ROOT, capture_output=True, text=True)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "storage.root" in out.stderr and "not writable" in out.stderr


def test_pipeline_rejects_bad_config_before_starting_ray(tmp_path):
    out = subprocess.run([sys.executable, "-m", "jobs", "run", "--config", "smoke",
                          "model.spec_typo=1"], cwd=REPO_ROOT, capture_output=True, text=True)
    assert out.returncode == 2 and "unknown key 'model.spec_typo'" in out.stderr
    assert "Traceback" not in out.stderr
    direct = subprocess.run([sys.executable, "-m", "jobs.pipeline", "--config", "smoke",
                             "model.max_length=-1"], cwd=REPO_ROOT, capture_output=True, text=True)
    assert direct.returncode == 2 and "'model.max_length'" in direct.stderr
    assert "Traceback" not in direct.stderr


@pytest.mark.slow
def test_generator_lm_objective_fine_tunes_on_ray_train_and_skips_when_done(smoke_run, tmp_path):
    """objective=hybrid: the reconstruction-trained start, then 4 LM steps on 2 Ray Train
    workers; the artifact records the LM history and loads like any generator; the fold
    generators of the evaluate stage get the same fine-tuning, as many at once as the cluster
    holds (one pipeline run, one Ray of 4 logical CPUs: two 2-worker fine-tunes fit). With
    generator.cpus_per_task unset the CPUs are shared out: the main generator, alone, trains
    on all 4 threads and its 2 LM workers on 2 each; the 3 folds side by side get 1 each."""
    from icm.generator import LoraGenerator

    root, suite = smoke_run.root, smoke_run.suite
    lm_root = tmp_path / "lm"
    lm_root.mkdir()
    for upstream in ("zoo", "oracles", "task_vectors"):  # the smoke run's inputs, generators anew
        (lm_root / upstream).symlink_to(root / upstream)
    args = [f"suite.path={suite}", f"storage.root={lm_root}", "tune.enabled=false",
            "generator.objective=hybrid", "generator.lm_steps=4", "generator.lm_workers=2",
            "generator.report_every=2", "generator.lm_seq_len=24",
            "stages=[generator,evaluate]", "evaluate.variants=[generated]",
            "evaluate.extra_variants=[]", "evaluate.seen_tasks=0",  # not the preset's variants
            "evaluate.folds=3", "ray.num_cpus=4"]  # 3 fine-tunes of 2 x 1 CPU each: 2 at once
    command = [sys.executable, "-m", "jobs.pipeline", "--config", "smoke", *FAST, *args]
    first = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=900)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-6000:]
    meta = json.loads((lm_root / "generator" / "generator.json").read_text())
    lm = meta["training"]["lm"]
    assert meta["training"]["objective"] == "hybrid" and lm["steps"] == 4 and lm["workers"] == 2
    assert [h["lm_step"] for h in lm["history"]] == [2, 4] and "dogs" not in lm["tasks"]
    assert all(h["train_recon"] > 0 for h in lm["history"])
    assert (lm_root / "generator-lm").is_dir() and (lm_root / "generator-reconstruction").is_dir()
    start = LoraGenerator.load(lm_root / "generator-reconstruction")
    tuned = LoraGenerator.load(lm_root / "generator")
    vector = start.model.state_dict()["decoder.linears.0.weight"]
    assert not torch.equal(vector, tuned.model.state_dict()["decoder.linears.0.weight"])
    assert start.summary["threads"] == 4  # alone: the whole (4-CPU) cluster
    assert lm["cpus_per_worker"] == 2 and {h["threads"] for h in lm["history"]} == {2}
    # The fold generator: the same fine-tuning, from the fold's training tasks only.
    fold = lm_root / "evaluate" / "folds" / "fold-0"
    fold_lm = json.loads((fold / "generator" / "generator.json").read_text())["training"]["lm"]
    assert (fold / "reconstruction").is_dir() and fold_lm["steps"] == 4
    fold_start = json.loads((fold / "reconstruction" / "generator.json").read_text())["training"]
    assert fold_start["threads"] == 1 and fold_lm["cpus_per_worker"] == 1  # 3 folds share 4 CPUs
    assert {h["threads"] for h in fold_lm["history"]} == {1}
    held = json.loads((lm_root / "evaluate" / "baselines.json").read_text())["folds"][0]
    groups = {"cats": "animals", "dogs": "animals", "sums": "math", "code": "code"}
    assert not {t for t in fold_lm["tasks"] if groups[t] in held}  # never a task of the fold
    # Every fold's reconstruction is written before the first fold's LM fine-tune starts (a Ray
    # Train worker group started while reconstructions hold the CPUs would wait for them).
    folds = sorted((lm_root / "evaluate" / "folds").glob("fold-*"))
    assert len(folds) == 3
    reconstructed = max((f / "reconstruction" / "generator.json").stat().st_mtime for f in folds)
    spans = sorted(fine_tune_span(f / "generator") for f in folds)  # (start, end) per fold
    assert reconstructed <= spans[0][0]
    # Two fine-tunes ran side by side, and the third waited for one of them: at most 2 at once.
    assert spans[1][0] < spans[0][1]
    assert spans[2][0] >= min(spans[0][1], spans[1][1]) - 1.0  # file times: 1 s of slack
    assert set(pd.read_parquet(lm_root / "evaluate" / "results.parquet")["variant"]) == {"generated"}
    # A kill during fold 0's fine-tune: its reconstruction is reused, not trained again; the
    # main generator and the other folds are up to date and untouched.
    reconstruction = fold / "reconstruction" / "generator.json"
    written = reconstruction.stat().st_mtime_ns
    others = {f: (f / "fold.json").stat().st_mtime_ns for f in folds[1:]}
    for gone in (fold / "fold.json", lm_root / "evaluate" / "stage.json"):
        gone.unlink()
    shutil.rmtree(fold / "generator")
    resumed = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "generator: up to date" in resumed.stderr
    assert "1 fold reconstructions reused, 0 trained" in resumed.stderr
    assert reconstruction.stat().st_mtime_ns == written and (fold / "generator" / "generator.json").is_file()
    assert {f: (f / "fold.json").stat().st_mtime_ns for f in folds[1:]} == others
    # More LM steps, nothing else: every reconstruction is reused, and every fine-tune continues
    # its own Ray Train run from its step-4 checkpoint (no new run folder) to step 6.
    runs = sorted(p.name for p in (lm_root / "generator-lm").iterdir())
    longer = [a.replace("generator.lm_steps=4", "generator.lm_steps=6") for a in command]
    more = subprocess.run(longer, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert more.returncode == 0, more.stderr[-3000:]
    said = more.stdout + more.stderr
    assert "generator: reconstruction-trained start reused" in said
    assert "3 fold reconstructions reused, 0 trained" in said and "resuming from step 4" in said
    assert sorted(p.name for p in (lm_root / "generator-lm").iterdir()) == runs and len(runs) == 4
    assert reconstruction.stat().st_mtime_ns == written
    for generator in [lm_root / "generator", *(f / "generator" for f in folds)]:
        lm = json.loads((generator / "generator.json").read_text())["training"]["lm"]
        assert [h["lm_step"] for h in lm["history"]] == [2, 4, 6], generator


def _two_lm_steps_on_smoke_inputs(smoke_run, lm_root: Path, args: list[str]
                                  ) -> tuple[Path, subprocess.CompletedProcess]:
    """The pipeline on the smoke run's zoo, oracles and task vectors (linked) into ``lm_root``:
    a hybrid generator with 2 LM steps of 24 tokens, reported each step, plus ``args``."""
    lm_root.mkdir()
    for upstream in ("zoo", "oracles", "task_vectors"):
        (lm_root / upstream).symlink_to(smoke_run.root / upstream)
    command = [sys.executable, "-m", "jobs.pipeline", "--config", "smoke", *FAST,
               f"suite.path={smoke_run.suite}", f"storage.root={lm_root}", "tune.enabled=false",
               "generator.objective=hybrid", "generator.lm_steps=2", "generator.report_every=1",
               "generator.lm_seq_len=24", *args]
    run = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-6000:]
    return lm_root, run


@pytest.mark.slow
def test_the_lm_phase_reads_the_prompt_on_ray_train_with_lm_context_prompt(smoke_run, tmp_path):
    """generator.lm_context=prompt through the real pipeline: the Ray Train LM phase reads each
    text after its episode's prompt (the driver built them from the suite's tasks), the artifact
    records the setting, and its adapter is scored under the prompt on the held-out tasks. With
    condition dropout on, the same draw is also scored with the condition scaled to 0 and 0.5.
    Each row reads the mean of its task's other episodes (lm_condition_episodes others). A
    training task is scored under the prompt too (seen)."""
    lm_root, run = _two_lm_steps_on_smoke_inputs(
        smoke_run, tmp_path / "prompted",
        ["generator.lm_context=prompt", "stages=[generator,evaluate]",
         "generator.lm_condition_dropout=0.5", "generator.lm_condition_episodes=others",
         "evaluate.variants=[in-context]",
         "evaluate.extra_variants=[in-context+generated,in-context+generated-half,"
         "in-context+generated-blind]", "evaluate.seen_tasks=1", "evaluate.folds=0"])
    assert ("(read after: prompt; condition: task from others episodes, dropped 50%; prompt as "
            "teacher: weight 0)") in run.stderr
    meta = json.loads((lm_root / "generator" / "generator.json").read_text())
    assert meta["config"]["lm_context"] == "prompt"
    assert meta["config"]["lm_condition_dropout"] == 0.5
    assert meta["config"]["lm_condition_episodes"] == "others"
    lm = meta["training"]["lm"]
    assert [h["lm_step"] for h in lm["history"]] == [1, 2]
    assert all(h["train_lm_nll"] > 0 for h in lm["history"])
    results = pd.read_parquet(lm_root / "evaluate" / "results.parquet")
    scaled = ["in-context+generated", "in-context+generated-half", "in-context+generated-blind"]
    assert set(results["variant"]) == {"in-context", *scaled}
    assert set(results["setting"]) == {"heldout", "seen"}  # stacked on a training task too
    assert set(results.loc[results["setting"] == "seen", "variant"]) == {"in-context", *scaled}
    results = results[results["setting"] == "heldout"]
    nll = {(row.task, row.variant): list(row.text_nll) for row in results.itertuples()}
    for task in set(results["task"]):  # one z draw, three conditions: three adapters
        assert len({tuple(nll[task, variant]) for variant in scaled}) == 3
    report = (lm_root / "evaluate" / "EVAL.md").read_text()
    assert "/ in-context+generated-blind" in report  # each condition judged against none


@pytest.mark.slow
def test_the_lm_phase_distils_the_prompt_on_ray_train_with_a_teacher_weight(smoke_run, tmp_path):
    """generator.lm_teacher_weight through the real pipeline: the driver hands the Ray Train LM
    phase each row's prompt though the texts are read alone (lm_context none), the loss is the
    distilled one (finite, positive), and the artifact records the weight."""
    lm_root, run = _two_lm_steps_on_smoke_inputs(
        smoke_run, tmp_path / "distilled",
        ["generator.lm_teacher_weight=0.5", "stages=[generator]", "evaluate.folds=0"])
    assert "(read after: none; condition: task from own episodes, dropped 0%; prompt as " \
        "teacher: weight 0.5)" in run.stderr
    meta = json.loads((lm_root / "generator" / "generator.json").read_text())
    assert meta["config"]["lm_teacher_weight"] == 0.5 and meta["config"]["lm_context"] == "none"
    lm = meta["training"]["lm"]
    assert [h["lm_step"] for h in lm["history"]] == [1, 2]
    assert all(0 < h["train_lm_nll"] < 50 for h in lm["history"])


def test_a_baseline_only_evaluation_trains_no_fold_generator(smoke_run, tmp_path):
    """Variants that read no generator (base, soup, the prompt with the soup's adapter): the folds
    are scored without training a fold generator, and the fold rows equal those the smoke run
    scored beside its fold generator."""
    root, suite = smoke_run.root, smoke_run.suite
    only = tmp_path / "baselines"
    only.mkdir()
    for upstream in ("zoo", "oracles", "task_vectors", "generator"):  # the smoke run's, read only
        (only / upstream).symlink_to(root / upstream)
    variants = ["base", "soup", "in-context+soup"]
    out = subprocess.run(
        [sys.executable, "-m", "jobs.pipeline", "--config", "smoke", *FAST, f"suite.path={suite}",
         f"storage.root={only}", "tune.enabled=false", "stages=[evaluate]", "evaluate.seen_tasks=0",
         f"evaluate.variants=[{','.join(variants[:2])}]", f"evaluate.extra_variants=[{variants[2]}]"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-6000:]
    assert "no fold generator is trained" in out.stderr
    assert not (only / "evaluate" / "folds").exists()
    rows = pd.read_parquet(only / "evaluate" / "results.parquet")
    fold = rows.query("setting == 'fold'")
    assert set(fold["variant"]) == set(variants) and fold["task"].nunique() >= 1
    smoke = pd.read_parquet(root / "evaluate" / "results.parquet").query("setting == 'fold'")
    for _, row in fold.iterrows():  # same adapters, same texts: the same NLLs
        same = smoke[(smoke["task"] == row["task"]) & (smoke["variant"] == row["variant"])]
        if len(same):  # on the texts both scored (another test reruns the smoke run on fewer)
            theirs, mine = list(same.iloc[0]["text_nll"]), list(row["text_nll"])
            shared = min(len(theirs), len(mine))
            assert shared and theirs[:shared] == pytest.approx(mine[:shared], rel=1e-5)
    assert set(smoke["variant"]) & set(variants) >= {"base", "soup"}


def test_a_fold_only_evaluation_needs_no_main_generator(smoke_run, tmp_path):
    """Folds only (no held-out set, no seen tasks) and no main generator: the fold generator is
    trained from the main generator's planned settings, and no main generator is trained. One
    trained later on the same inputs records the fingerprint planned: the evaluate stage then
    finds its fold generator and every scored row current, and retrains and rescores nothing."""
    root, suite = smoke_run.root, smoke_run.suite
    only = tmp_path / "folds-only"
    only.mkdir()
    for upstream in ("zoo", "oracles", "task_vectors"):  # the smoke run's, read only
        (only / upstream).symlink_to(root / upstream)
    command = [sys.executable, "-m", "jobs.pipeline", "--config", "smoke", *FAST,
               f"suite.path={suite}", f"storage.root={only}", "tune.enabled=false",
               "evaluate.seen_tasks=0", "evaluate.variants=[generated]",
               "evaluate.extra_variants=[]", "stages=[evaluate]"]
    run = lambda *extra: subprocess.run([*command, *extra], cwd=REPO_ROOT,  # noqa: E731
                                        capture_output=True, text=True, timeout=600)
    first = run("evaluate.heldout=false")  # (with held-out or seen tasks: an error; unit-tested)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-6000:]
    assert "folds only and no main generator trained" in first.stderr
    assert not (only / "generator").exists()
    marker = only / "evaluate" / "folds" / "fold-0" / "fold.json"
    written = marker.stat().st_mtime_ns
    rows = pd.read_parquet(only / "evaluate" / "results.parquet")
    assert set(rows["setting"]) == {"fold"} and set(rows["variant"]) == {"generated"}
    (only / "evaluate" / "stage.json").unlink()  # so that the stage recomputes what it reads
    later = run("evaluate.heldout=false", "stages=[generator,evaluate]")
    assert later.returncode == 0, later.stderr[-3000:]
    assert (only / "generator" / "generator.json").is_file()
    assert "folds only and no main generator" not in later.stderr
    assert marker.stat().st_mtime_ns == written  # the fold generator's fingerprint: unchanged
    assert f"({rows.groupby(['setting', 'task']).ngroups} done before)" in later.stderr  # rows too


def fine_tune_span(generator: Path) -> tuple[float, float]:
    """When the LM fine-tune that wrote ``generator`` began and ended: its file time less its
    wall time, and its file time."""
    end = (generator / "generator.json").stat().st_mtime
    wall = json.loads((generator / "generator.json").read_text())["training"]["lm"]["wall_seconds"]
    return end - wall, end


def test_lm_texts_are_train_texts_of_training_tasks_only(tmp_path):
    from icm.tasks import load_suite
    from jobs.generator_lm import lm_train_texts

    suite = load_suite(make_suite(tmp_path / "suite"))
    texts = lm_train_texts(suite, ["cats", "sums"], limit=3)
    assert texts["cats"] == load_task_texts(suite, "cats")[:3]
    with pytest.raises(ValueError, match="held-out tasks \\['dogs'\\]"):
        lm_train_texts(suite, ["cats", "dogs"], limit=3)


def load_task_texts(suite, task):
    from icm.tasks import load_task

    task = load_task(suite.tasks[task].path)
    assert not set(task.train_texts()) & set(task.eval_texts())
    return task.train_texts()


def test_lm_anchor_multitask_starts_from_the_zoos_multitask_lora(smoke_run, tmp_path):
    """generator.lm_anchor: multitask: the offset the LM stage starts from moves the zoo's mean
    exactly onto the smoke zoo's multi-task LoRA (final snapshot), so a network output of zero
    generates that LoRA; zoo-mean adds nothing; a zoo without one is a clear error."""
    from icm.config import PipelineConfig
    from icm.errors import InputError
    from icm.eval.inputs import final_snapshots
    from icm.generator import LoraGenerator
    from icm.zoo import MULTITASK, load_vector
    from jobs.generator_lm import anchor

    root = smoke_run.root
    cfg = PipelineConfig(storage={"root": str(root)}, stages=["generator"],
                         generator={"objective": "lm", "lm_anchor": "multitask"})
    generator = LoraGenerator.load(root / "generator")
    offset = anchor(cfg, cfg.generator, generator)  # (L_gen,)
    multitask = load_vector(final_snapshots(root / "zoo")[MULTITASK])  # (L,)
    zero = torch.zeros(1, generator.model.spec.input_dim)
    with torch.no_grad():
        at_zero = generator.full_vectors(generator.codec.decode(zero) + offset)[0]
    assert torch.allclose(at_zero, multitask, atol=1e-5)
    assert anchor(cfg, cfg.generator.model_copy(update={"lm_anchor": "zoo-mean"}), generator) is None
    bare = tmp_path / "no-multitask"
    (bare / "zoo").mkdir(parents=True)
    with pytest.raises(InputError, match="zoo.multitask"):
        anchor(cfg.model_copy(update={"storage": cfg.storage.model_copy(update={"root": str(bare)})}),
               cfg.generator, generator)


def test_lm_extra_tasks_are_another_roots_tasks_never_this_suites_a_folds_or_held_out(smoke_run,
                                                                                   tmp_path):
    """generator.lm_extra_root: the smoke run's task vectors cover cats, dogs (held out), sums
    and code. A run whose suite lacks `code` gets `code` for its LM objective (its train texts,
    its episode vectors); a fold holding out code's group, a suite that has it, and a task held
    out by its own suite get nothing; other task-vector settings and a root without the stage
    are refused, naming the field; the generator stage depends on that root's vectors. Under
    lm_context prompt, each of its condition rows reads the prompt that root's stage read."""
    from icm.config import PipelineConfig
    from icm.errors import InputError
    from icm.generator.inputs import load_task_conditions
    from icm.generator.lm_corpus import extra_lm_tasks, extra_root_fingerprint
    from icm.task_vectors import load_episode_prompts
    from icm.tasks import load_suite
    from jobs.generator_lm import lm_inputs

    root = smoke_run.root
    resolved = yaml.safe_load((root / "task_vectors" / "config.resolved.yaml").read_text())
    cfg = PipelineConfig.model_validate(resolved | {"generator": {"lm_extra_root": str(root)}})
    extra_root = cfg.generator.lm_extra_root
    suite = load_suite(smoke_run.suite)
    without_code = suite.select(["cats", "dogs", "sums"])
    extra = extra_lm_tasks(cfg, extra_root, without_code, max_texts=3)
    assert sorted(extra.texts) == sorted(extra.conditions) == ["code"]
    assert extra.texts["code"] == load_task_texts(suite, "code")[:3]
    own = load_task_conditions(cfg, ["code"])["code"]  # (E x modes, D), read from the root itself
    assert extra.conditions["code"].shape == own.shape and (extra.conditions["code"] == own).all()
    assert extra.prompts is None  # asked for only under generator.lm_context: prompt
    # Under the prompt, each condition row reads the prompt that root's stage read for it: in
    # this run's condition_modes order (not the stage's), from that root (not this run's storage).
    modes = ["both", "description"]
    elsewhere = cfg.model_copy(update={
        "storage": cfg.storage.model_copy(update={"root": str(tmp_path / "empty")}),
        "generator": cfg.generator.model_copy(update={"condition_modes": modes})})
    prompted = extra_lm_tasks(elsewhere, extra_root, without_code, max_texts=3, with_prompts=True)
    read = load_episode_prompts(root / "task_vectors", ["code"])["code"]
    rows = prompted.prompts["code"]
    assert len(rows) == len(prompted.conditions["code"])  # one prompt per (E x modes) row
    order = [(mode, episode) for mode in modes
             for episode in sorted(e for m, e in read if m == mode)]
    assert [row.prompt for row in rows] == [read[key][0] for key in order]
    assert all(bool(row.demos) == (mode != "description") for row, (mode, _) in zip(rows, order))
    # What the LM phase gets: every task, the zoo's and the extra one, has a prompt per row.
    prompt_cfg = cfg.model_copy(update={
        "generator": cfg.generator.model_copy(update={"lm_context": "prompt"})})
    texts, conditions, prompts, extra_names = lm_inputs(
        prompt_cfg, prompt_cfg.generator, without_code, ["cats", "sums"])
    assert extra_names == ["code"] and sorted(prompts) == sorted(texts) == ["cats", "code", "sums"]
    assert all(len(prompts[task]) == len(conditions[task]) for task in texts)
    assert lm_inputs(cfg, cfg.generator, without_code, ["cats", "sums"])[2] is None
    assert not extra_lm_tasks(cfg, extra_root, without_code, ["code"], max_texts=3).texts  # a fold's
    assert not extra_lm_tasks(cfg, extra_root, suite, max_texts=3).texts  # all in this suite
    # `dogs` is held out by its own suite: never an extra task, even for a suite without it.
    assert sorted(extra_lm_tasks(cfg, extra_root, suite.select(["cats", "sums"]), max_texts=3).texts) == ["code"]
    assert extra_lm_tasks(cfg, None, without_code, max_texts=3).texts == {}
    stage_record = json.loads((root / "task_vectors" / "stage.json").read_text())
    assert extra_root_fingerprint(cfg) == stage_record["fingerprint"]
    other_k = cfg.model_copy(update={"task_vectors": cfg.task_vectors.model_copy(update={"k": 9})})
    with pytest.raises(InputError, match=r"generator.lm_extra_root.*task_vectors\.k=\d+, this run uses 9"):
        extra_lm_tasks(other_k, extra_root, without_code, max_texts=3)
    with pytest.raises(InputError, match="no finished task_vectors stage"):
        extra_lm_tasks(cfg, str(root / "zoo"), without_code, max_texts=3)
