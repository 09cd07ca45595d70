"""The LoRA zoo on a real local Ray with real DeepSpeed (tiny-llama, CPU)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from icm.adapters import apply_adapter
from icm.io import sha256_file
from icm.lora_io import LoraLayout, save_adapter, unflatten
from icm.models import load_base_model
from icm.zoo import MULTITASK, load_vector
from jobs.zoo import main as zoo_main
from tests.conftest import REPO_ROOT, make_suite
from tests.integration.smoke_pipeline import FAST as PIPELINE_FAST

# The smoke pipeline's zoo settings (smoke_zoo reads that run's zoo), the smoke preset's batch
# size and CPUs spelled out.
FAST = [*PIPELINE_FAST, "zoo.batch_size=4", "ray.num_cpus=2"]


def _zoo(suite, root, *extra, timeout=900, **popen):
    return subprocess.run([sys.executable, "-m", "jobs.zoo", "--config", "smoke",
                           f"suite.path={suite}", f"storage.root={root}", *FAST, *extra],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout, **popen)


@pytest.fixture(scope="module")
def smoke_zoo(smoke_run):
    """The zoo stage of the session's smoke pipeline run, read here: the zoo directory, the suite
    and the log of the driver that trained it."""
    return smoke_run.root / "zoo", smoke_run.suite, smoke_run.killed_log


@pytest.mark.slow
def test_zoo_trains_every_training_task_and_the_multitask_lora(smoke_zoo):
    zoo, _, _ = smoke_zoo
    manifest = pd.read_parquet(zoo / "manifest.parquet")
    assert sorted(manifest["task"].unique()) == ["cats", "code", MULTITASK, "sums"]  # "dogs" is held out
    for _, rows in manifest.groupby("task"):
        assert list(rows["snapshot"]) == list(range(8)) and rows["step"].is_unique
        assert rows["step"].min() > 8 and rows["step"].max() == 16  # the later half of training
        # eval perplexity at the last snapshot only (nothing reads the earlier ones)
        assert rows["eval_ppl"].iloc[-1] > 0 and rows["eval_ppl"].iloc[:-1].isna().all()
    assert {"train_loss", "eval_ppl", "path", "adapter_sha256", "node_id"} <= set(manifest.columns)
    summary = pd.read_parquet(zoo / "summary.parquet")
    assert (summary["lora_ppl"] < summary["base_ppl"]).all() and (summary["tokens_per_s"] > 0).all()
    phases = summary[["setup_seconds", "base_eval_seconds", "snapshot_seconds"]]
    assert (phases > 0).all().all() and (phases.sum(axis=1) < summary["wall_seconds"]).all()
    # a task of a few seconds takes no checkpoint under zoo.checkpoint_interval_s (300 s)
    assert (summary["checkpoints"] == 0).all() and (summary["checkpoint_seconds"] == 0).all()
    assert (zoo / "losses.png").stat().st_size > 10_000
    # 4 tasks on 2 CPUs: two TorchTrainers, each training its 2 tasks in the same processes
    assert len([p for p in (zoo / "ray").iterdir() if p.is_dir() and p.name.startswith("lora-")]) == 2
    identity = json.loads((zoo / "zoo.json").read_text())
    assert identity["model_spec"] == "tiny-llama" and identity["lora"]["init_seed"] == 0


@pytest.mark.slow
def test_each_progress_line_reaches_the_driver_once(smoke_zoo):
    _, _, driver_log = smoke_zoo
    log = driver_log.read_text()
    done = [line for line in log.splitlines() if "[zoo cats] done" in line]
    assert len(done) == 1, done  # Ray Train's print patch doubled worker lines
    assert "[zoo cats] step" not in log  # per-step losses are for -v; the driver counts tasks


@pytest.mark.slow
def test_manifest_matches_the_files(smoke_zoo):
    zoo, _, _ = smoke_zoo
    manifest = pd.read_parquet(zoo / "manifest.parquet")
    assert len(manifest) == 4 * 8  # 3 tasks + the multi-task LoRA, 8 snapshots each: not vacuous
    assert len(list(zoo.glob("tasks/*/snapshots/step-*/vector.safetensors"))) == len(manifest)
    for task in manifest["task"].unique():  # each finished task's index, which the manifest reads
        assert len(json.loads((zoo / "tasks" / task / "snapshots.json").read_text())) == 8
    for row in manifest.itertuples():
        assert sha256_file(f"{row.path}/adapter_model.safetensors") == row.adapter_sha256
        assert sha256_file(f"{row.path}/vector.safetensors") == row.vector_sha256


@pytest.mark.slow
def test_snapshot_reloads_in_peft_and_matches_its_vector(smoke_zoo, tmp_path):
    zoo, _, _ = smoke_zoo
    row = pd.read_parquet(zoo / "manifest.parquet").query("task == 'code'").iloc[-1]
    _, tokenizer = load_base_model("tiny-llama")
    ids = tokenizer("def neg(x):\n    return -x", return_tensors="pt")
    from_peft = apply_adapter(load_base_model("tiny-llama")[0], row["path"])
    layout = LoraLayout.load(zoo / "lora_layout.json")
    config = json.loads(open(f"{row['path']}/adapter_config.json").read())
    save_adapter(unflatten(load_vector(row["path"]), layout), config, tmp_path / "from-vector")
    from_vector = apply_adapter(load_base_model("tiny-llama")[0], tmp_path / "from-vector")
    with torch.inference_mode():
        a, b = from_peft(**ids).logits, from_vector(**ids).logits
        base = load_base_model("tiny-llama")[0](**ids).logits
    assert torch.equal(a, b) and not torch.allclose(a, base)


@pytest.mark.slow
def test_rerun_skips_the_finished_zoo(smoke_run):
    """jobs.zoo on its own, against the pipeline's URI root through a fresh local mirror."""
    again = _zoo(smoke_run.suite, f"file://{smoke_run.root}",
                 f"storage.local_mirror={smoke_run.base / 'mirror-zoo'}")
    assert again.returncode == 0 and "zoo: up to date" in again.stderr, again.stderr[-3000:]


@pytest.mark.slow
def test_two_workers_shard_with_zero2(tmp_path):
    suite = make_suite(tmp_path / "suite")
    out = _zoo(suite, tmp_path / "run", "suite.tasks=[cats]", "zoo.num_workers=2",
               "zoo.cpus_per_worker=1", "zoo.multitask=false", "zoo.zero_stage=2",
               "zoo.snapshots=2",  # steps 12 and 16 of 16
               "zoo.checkpoint_interval_s=0.001")  # rank 0's clock decides for both ranks
    assert out.returncode == 0, out.stderr[-5000:]
    summary = pd.read_parquet(tmp_path / "run/zoo/summary.parquet")
    # A checkpoint at every step once the interval has passed, not only at the 2 snapshot steps:
    # a long LoRA with one snapshot (an oracle, the multi-task LoRA) keeps its progress
    assert summary["workers"].tolist() == [2] and summary["checkpoints"].tolist() == [16]
    # ZeRO-2 partitions the optimizer state: one shard file per rank in the checkpoint
    checkpoints = sorted(p for p in (tmp_path / "run/zoo/ray/lora-cats").glob("checkpoint_*")
                         if p.is_dir())  # named by time: the last is the newest
    # num_to_keep=1 deletes old ones, but Ray Train spares checkpoints still pending when the
    # next one registers, so on a loaded box 2 snapshot steps apart a few can remain
    assert 1 <= len(checkpoints) < 16
    shards = {p.name for p in checkpoints[-1].rglob("*optim_states.pt")}
    assert any("rank_0" in s for s in shards) and any("rank_1" in s for s in shards), shards
    assert len(pd.read_parquet(tmp_path / "run/zoo/manifest.parquet")) == 2


def _registered_checkpoint_tasks(ray_dir) -> set[str]:
    """Tasks whose checkpoint is the latest one Ray Train has registered, per trainer."""
    tasks = set()
    for path in ray_dir.glob("*/checkpoint_manager_snapshot.json"):
        try:
            latest = json.loads(path.read_text()).get("latest_checkpoint_result") or {}
        except (OSError, ValueError):  # being rewritten: look again on the next poll
            continue
        tasks.add(latest.get("metrics", {}).get("task"))
    return tasks - {None}


@pytest.mark.slow
def test_kill_and_resume_loses_and_duplicates_nothing_and_is_bit_identical(tmp_path):
    suite = make_suite(tmp_path / "suite")
    args = ["zoo.max_concurrent=1", "zoo.multitask=false", "zoo.steps=24", "zoo.checkpoint_interval_s=0"]
    driver = subprocess.Popen([sys.executable, "-m", "jobs.zoo", "--config", "smoke",
                               f"suite.path={suite}", f"storage.root={tmp_path / 'run'}", *FAST, *args],
                              cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    tasks = tmp_path / "run" / "zoo" / "tasks"
    deadline = time.time() + 600
    # Kill once one task is finished and another is part-way: no task.json, and Ray Train has
    # registered a checkpoint of it (resume starts from the last registered checkpoint; were
    # that one the finished task's, the part-way task would start over, losing nothing).
    while time.time() < deadline:
        finished = {p.parent.name for p in tasks.glob("*/task.json")}
        partial = _registered_checkpoint_tasks(tmp_path / "run/zoo/ray") - finished
        if finished and partial:
            break
        assert driver.poll() is None, "the zoo finished before it could be killed"
        time.sleep(0.2)
    os.killpg(driver.pid, signal.SIGKILL)  # the driver and the local Ray it started
    driver.wait()
    time.sleep(3)
    rerun = _zoo(suite, tmp_path / "run", *args)
    assert rerun.returncode == 0, rerun.stderr[-5000:]
    assert "1 already done" in rerun.stderr or "2 already done" in rerun.stderr
    assert "resuming from step" in rerun.stdout + rerun.stderr
    manifest = pd.read_parquet(tmp_path / "run/zoo/manifest.parquet")
    assert sorted(manifest["task"].unique()) == ["cats", "code", "sums"]
    for _, rows in manifest.groupby("task"):
        assert len(rows) == 8 and rows["step"].is_unique
    # The resumed LoRA is bit-identical to the same task trained uninterrupted, alone in a fresh
    # trainer (its dropout masks are drawn per step, not from the process's RNG): retrain it.
    resumed = re.findall(r"\[zoo (\w+)\] resuming from step", rerun.stdout + rerun.stderr)[0]
    resumed_vectors = _snapshot_vectors(tasks / resumed)
    shutil.rmtree(tasks / resumed)
    shutil.rmtree(tmp_path / "run/zoo/ray")  # Ray Train's checkpoints: no resume, a fresh start
    (tmp_path / "run/zoo/stage.json").unlink()  # the stage is no longer complete
    fresh = _zoo(suite, tmp_path / "run", *args)
    assert fresh.returncode == 0 and "2 already done" in fresh.stderr, fresh.stderr[-5000:]
    fresh_vectors = _snapshot_vectors(tasks / resumed)
    assert len(fresh_vectors) == 8 and fresh_vectors.keys() == resumed_vectors.keys()
    assert all(torch.equal(resumed_vectors[step], fresh_vectors[step]) for step in fresh_vectors)


def _snapshot_vectors(task_folder: Path) -> dict[str, torch.Tensor]:
    return {p.parent.name: load_vector(p.parent) for p in task_folder.glob("snapshots/*/snapshot.json")}


@pytest.mark.parametrize("override, message", [
    ("suite.tasks=[cats,owls]", "unknown task(s) ['owls']"),
    ("zoo.target_modules=[q_proj,qkv_proj]", "zoo.target_modules: ['qkv_proj']"),
    ("zoo.rank=0", "'zoo.rank'"),
    ("zoo.steps=4", "raise zoo.steps"),
])
def test_bad_input_fails_before_training(tmp_path, capsys, override, message):
    suite = make_suite(tmp_path / "suite")
    code = zoo_main(["--config", "smoke", f"suite.path={suite}", f"storage.root={tmp_path / 'run'}",
                             *FAST, override])
    assert code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "run" / "zoo" / "tasks").exists()


def test_unwritable_storage_and_foreign_zoo_fail_before_training(tmp_path, capsys, tiny_llama):
    suite = make_suite(tmp_path / "suite")
    (tmp_path / "file").write_text("")
    assert zoo_main(["--config", "smoke", f"suite.path={suite}",
                             f"storage.root={tmp_path / 'file' / 'run'}", *FAST]) == 2
    assert "storage.root" in capsys.readouterr().err
    # a zoo recorded for tiny-llama refuses another base model
    from icm.lora_train import build_lora_model
    from icm.config import ZooConfig
    from icm.lora_io import adapter_state_dict
    from icm.zoo import check_or_create_zoo, zoo_identity

    layout = LoraLayout.of(adapter_state_dict(build_lora_model(load_base_model("tiny-llama")[0], ZooConfig())))
    lora = ZooConfig().model_dump(include={"rank", "alpha", "dropout", "target_modules", "init_seed"})
    check_or_create_zoo(tmp_path / "run" / "zoo", zoo_identity("smollm2-135m", lora, layout), layout)
    assert zoo_main(["--config", "smoke", f"suite.path={suite}",
                             f"storage.root={tmp_path / 'run'}", *FAST]) == 2
    err = capsys.readouterr().err
    assert "model.spec" in err and "smollm2-135m" in err and "tiny-llama" in err


def _jobs(costs: dict[str, int]):
    from icm.zoo import LoraJob

    jobs = [LoraJob(name, (f"/suite/{name}",), (("steps", steps),), f"fp-{name}")
            for name, steps in costs.items()]
    return jobs, costs


def test_trainer_groups_are_stable_and_cover_every_task_once():
    from jobs.zoo import trainer_groups

    jobs, costs = _jobs({name: 16 for name in ["a", "b", "c", "d", "e"]})
    dealt = trainer_groups(jobs, costs, None, concurrency=2)  # default: one trainer per slot
    assert [[row[0] for row in group] for group in dealt.values()] == [["a", "c", "e"], ["b", "d"]]
    assert dealt == trainer_groups(list(jobs), dict(costs), None, concurrency=2)  # same names on a rerun
    chunks = trainer_groups(jobs, costs, 2, concurrency=2)
    assert [[row[0] for row in group] for group in chunks.values()] == [["a", "b"], ["c", "d"], ["e"]]
    assert list(trainer_groups(jobs, costs, 1, concurrency=2)) == [f"lora-{j.name}" for j in jobs]
    assert sorted(row[0] for g in chunks.values() for row in g) == sorted(costs)
    assert trainer_groups(jobs, costs, None, concurrency=8).keys() == trainer_groups(jobs, costs, 1, 8).keys()


def test_trainer_groups_balance_the_compute_matched_multitask_lora():
    """Round-robin dealing put the 4-task multi-task LoRA on top of half the tasks; by steps, its
    trainer gets nothing else while the other trains all the tasks."""
    from jobs.zoo import trainer_groups

    jobs, costs = _jobs({"a": 16, "b": 16, "c": 16, "d": 16, MULTITASK: 64})
    dealt = list(trainer_groups(jobs, costs, None, concurrency=2).values())
    loads = sorted(sum(costs[row[0]] for row in group) for group in dealt)
    assert loads == [64, 64] and [MULTITASK] in [[row[0] for row in g] for g in dealt]


def test_lora_jobs_fingerprint_their_own_texts_and_settings(tmp_path):
    """A finished LoRA is reused when the suite grows: a job's fingerprint is its own texts and
    weight-changing settings, not the whole suite; scheduling knobs never retrain anything."""
    from icm.config import OracleConfig, ZooConfig
    from icm.tasks import load_suite
    from icm.zoo import REPLICATE_PREFIX, oracle_jobs, zoo_jobs

    suite = load_suite(make_suite(tmp_path / "suite"))
    zoo = ZooConfig(steps=16)
    jobs = {j.name: j for j in zoo_jobs(suite, zoo, "tiny-llama")}
    assert sorted(jobs) == ["cats", "code", MULTITASK, "sums"]  # "dogs" is held out
    assert jobs[MULTITASK].cost(zoo) == 16
    matched = {j.name: j for j in zoo_jobs(suite, zoo.model_copy(update={"multitask_steps": "matched"}),
                                           "tiny-llama")}
    assert matched[MULTITASK].cost(zoo) == 16 * 3 and matched[MULTITASK].fingerprint != jobs[MULTITASK].fingerprint
    assert matched["cats"] == jobs["cats"]  # multitask compute is not a per-task setting
    smaller = {j.name: j for j in zoo_jobs(suite.select(["cats", "code", "dogs"]), zoo, "tiny-llama")}
    assert smaller["cats"] == jobs["cats"] and smaller[MULTITASK].fingerprint != jobs[MULTITASK].fingerprint
    rescheduled = zoo.model_copy(update={"max_concurrent": 1, "tasks_per_trainer": 3})
    assert zoo_jobs(suite, rescheduled, "tiny-llama")[0] == jobs["cats"]
    assert zoo_jobs(suite, zoo.model_copy(update={"lr": 0.1}), "tiny-llama")[0] != jobs["cats"]
    oracles = {j.name: j for j in oracle_jobs(suite, zoo, OracleConfig(replicates=2), "tiny-llama")}
    assert sorted(oracles) == ["dogs", REPLICATE_PREFIX + "cats", REPLICATE_PREFIX + "code"]
    replicate = oracles[REPLICATE_PREFIX + "cats"].zoo_config(zoo)
    assert replicate.data_seed == zoo.data_seed + 1 and replicate.snapshots == 1
    assert oracles["dogs"].zoo_config(zoo).data_seed == zoo.data_seed  # the zoo's own settings


def test_fold_multitask_loras_train_without_their_folds_groups_with_matched_compute(tmp_path):
    """oracles.fold_multitask: one multi-task LoRA per fold, over the training tasks outside
    the fold's groups (never a held-out task), its steps matched to those tasks; off by default."""
    from icm.config import OracleConfig, ZooConfig
    from icm.tasks import load_suite
    from icm.zoo import fold_multitask_name, oracle_jobs

    suite = load_suite(make_suite(tmp_path / "suite"))
    zoo = ZooConfig(steps=16, multitask_steps="matched")
    folds = [["animals"], ["code"]]
    assert oracle_jobs(suite, zoo, OracleConfig(heldout=False), "tiny-llama", folds) == []
    jobs = {j.name: j for j in oracle_jobs(suite, zoo, OracleConfig(heldout=False, fold_multitask=True),
                                           "tiny-llama", folds)}
    assert sorted(jobs) == [fold_multitask_name(0), fold_multitask_name(1)]
    trained = {name: sorted(Path(p).name for p in job.paths) for name, job in jobs.items()}
    assert trained == {fold_multitask_name(0): ["code", "sums"],  # no cats (its group), no dogs
                       fold_multitask_name(1): ["cats", "sums"]}
    assert jobs[fold_multitask_name(0)].cost(zoo) == 16 * 2


def test_oracles_stage_with_nothing_to_train_finishes_empty(tmp_path, capsys):
    """A suite without held-out tasks and no replicates: the oracles stage (in the default
    stages) records an empty stage instead of failing on an empty summary."""
    from jobs.oracles import main as oracles_main

    suite = make_suite(tmp_path / "suite", heldout=())
    code = oracles_main(["--config", "smoke", f"suite.path={suite}", f"storage.root={tmp_path / 'run'}",
                         *FAST, "oracles.replicates=0"])
    assert code == 0 and "oracles: 0 LoRAs" in capsys.readouterr().out
    assert json.loads((tmp_path / "run" / "oracles" / "stage.json").read_text())["outputs"]["tasks"] == 0
