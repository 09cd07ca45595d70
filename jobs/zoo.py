"""The LoRA zoo: one Ray Train + DeepSpeed LoRA fine-tune per training task, many at once.

    python -m jobs.zoo --config smoke [key=value ...]     (or: icm zoo ...)

A ``TorchTrainer`` (``zoo.num_workers`` workers) runs `train_func` over its share of the tasks
(``zoo.tasks_per_trainer``; default: the tasks dealt over the trainers that run at once), one
after another in the same worker processes: per task, a peft LoRA trained through
``deepspeed.initialize`` (ZeRO ``zoo.zero_stage``; gloo on CPU, NCCL + bf16 on GPU), and at each
snapshot step a snapshot, and, at any step where ``zoo.checkpoint_interval_s`` has passed since
the task's last one, a Ray Train checkpoint (0: at every snapshot step). Trainers are launched
from ``num_cpus=0`` tasks, at most ``zoo.max_concurrent`` at once (default: what the cluster's
CPUs/GPUs hold). Held-out tasks never enter. Rerunning after a kill skips finished tasks (their ``task.json``)
and resumes the interrupted one from its trainer's last checkpoint (or from its start where
it had none; same
``RunConfig(name, storage_path)``: trainer names come from the whole task list).
Outputs: ``<storage.root>/zoo/`` (see ``icm/zoo.py``), ``summary.parquet``, ``losses.png``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import ray
import ray.train
import torch

from icm.config import PipelineConfig
from icm.errors import InputError
from icm.eval.folds import suite_folds
from icm.evaluation import score_texts
from icm.io import write_bytes_atomic, write_json_atomic
from icm.logs import verbose
from icm.lora_io import LoraLayout, adapter_state_dict
from icm.lora_train import (TrainInputError, batch_for_step, build_lora_model, deepspeed_config,
                            exclude_tied_frozen_params_from_checkpoints, iterate_steps, release_engine,
                            skip_deepspeed_shm_build, snapshot_steps, step_seed, tokenize_texts,
                            train_step)
from icm.models import load_base_model
from icm.progress import FileCountWatcher, Progress
from icm.stages import RAY_DIR, open_suite, pull_local, push_local, stage
from icm.tasks import Suite, load_task
from icm.zoo import (LAYOUT_FILE, SNAPSHOT_FILE, SNAPSHOT_INDEX_FILE, TASK_DONE_FILE, ZOO_FILE,
                     LoraJob, check_or_create_zoo, oracle_jobs, plot_losses, snapshot_dir, task_dir,
                     task_finished, write_manifest, write_snapshot, write_task_index, zoo_identity,
                     zoo_jobs)
from jobs.common import ensure_writable_root, parse_job_args, user_errors_exit_2
from jobs.ray_setup import (as_completed, init_ray, train_logging, trainers_that_fit,
                            use_reserved_cpus)

log = logging.getLogger("jobs.zoo")


# ----------------------------------------------------------------------------- worker side


def _progress(message: str) -> None:
    """One progress line in the driver's terminal. Ray Train patches ``print`` on workers to tee
    into its logger as well as to ``sys.stdout`` (which Ray has wrapped), so a plain print shows
    up twice; writing to the process's real stdout goes through Ray's log streaming once."""
    print(message, file=sys.__stdout__, flush=True)


def _texts(task_paths: Sequence[str], split: str, limit: int | None = None) -> list[str]:
    texts = [t for path in task_paths for t in load_task(path).texts(split)]
    return texts[:limit] if limit else texts


def _write_snapshot(engine, cfg: PipelineConfig, loop: dict, task: str, *, step: int, rank: int,
                    progress: dict, layout: LoraLayout, eval_texts, tokenizer) -> None:
    """Rank 0 writes the snapshot (and, at the last step only, its eval perplexity: nothing
    downstream reads the earlier ones)."""
    import deepspeed

    zoo_root = Path(loop["zoo_root"])
    gather = (deepspeed.zero.GatheredParameters(list(engine.module.parameters()))
              if cfg.zoo.zero_stage == 3 else contextlib.nullcontext())
    phase_started = time.perf_counter()
    with gather:
        if rank == 0:
            ppl = None
            if step == cfg.zoo.steps:
                engine.module.eval()
                ppl = score_texts(engine.module, tokenizer, eval_texts, max_length=cfg.zoo.seq_len).perplexity
                engine.module.train()
                progress["eval_ppl"] = ppl
            write_snapshot(engine.module, layout, zoo_root, task=task, step=step, record={
                "train_loss": progress["losses"][-1][1], "eval_ppl": ppl,
                "node_id": ray.get_runtime_context().get_node_id()})
            write_json_atomic(task_dir(zoo_root, task) / "losses.json", progress["losses"])
            # A URI root: this node's mirror is not the driver's; snapshot.json goes up last.
            push_local(cfg, snapshot_dir(zoo_root, task, step), last=(SNAPSHOT_FILE,))
            push_local(cfg, task_dir(zoo_root, task) / "losses.json")
    progress["snapshot_seconds"] = progress.get("snapshot_seconds", 0.0) + time.perf_counter() - phase_started


def _checkpoint_wanted(at_snapshot: bool, since: float, interval_s: float) -> bool:
    """A checkpoint at a snapshot step when ``interval_s`` is 0, else at any step once
    ``interval_s`` has passed since the last one."""
    if interval_s == 0:
        return at_snapshot
    return _checkpoint_due(since, interval_s)


def _checkpoint_due(since: float, interval_s: float) -> bool:
    """Whether ``interval_s`` has passed since ``since`` (perf_counter), by rank 0's clock: the
    save and the report are collective, so every rank must take the same answer."""
    if interval_s == 0:
        return True
    answer = [time.perf_counter() - since >= interval_s]
    torch.distributed.broadcast_object_list(answer, src=0)
    return bool(answer[0])


def _checkpoint(engine, task: str, *, step: int, rank: int, progress: dict) -> None:
    """Every rank saves its DeepSpeed shard; a Ray Train report (a barrier) registers the merged
    checkpoint, the one a rerun after a kill resumes this task from."""
    saving_started = time.perf_counter()
    progress["checkpoints"] = progress.get("checkpoints", 0) + 1
    with tempfile.TemporaryDirectory() as tmp:
        # Leave the frozen base out (538 MB for SmolLM2), tied weights included (see
        # exclude_tied_frozen_params_from_checkpoints); only the last checkpoint is kept.
        engine.save_checkpoint(tmp, tag="ckpt", exclude_frozen_parameters=True)
        if rank == 0:
            write_json_atomic(Path(tmp) / "progress.json", {**progress, "task": task, "step": step})
        torch.distributed.barrier()
        ray.train.report({"task": task, "step": step, "loss": progress["losses"][-1][1]},
                         checkpoint=ray.train.Checkpoint.from_directory(tmp))
    # DeepSpeed save + Ray Train's copy into its storage (a resumed run loses its last one).
    progress["checkpoint_seconds"] = progress.get("checkpoint_seconds", 0.0) + time.perf_counter() - saving_started


def _restored_task() -> str | None:
    """The task the trainer's restored Ray Train checkpoint belongs to (None: no checkpoint)."""
    if (checkpoint := ray.train.get_checkpoint()) is None:
        return None
    with checkpoint.as_directory() as folder:
        return json.loads((Path(folder) / "progress.json").read_text()).get("task")


def _is_done(cfg: PipelineConfig, zoo_root: str, task: str, fingerprint: str) -> bool:
    """Rank 0's view (the node that writes the summaries), shared with every rank."""
    if torch.distributed.get_rank() == 0:  # a URI root: finished on another node before a kill
        pull_local(cfg, task_dir(Path(zoo_root), task) / TASK_DONE_FILE)
    answer = [task_finished(Path(zoo_root), task, fingerprint)]
    torch.distributed.broadcast_object_list(answer, src=0)
    return bool(answer[0])


def train_func(loop: dict) -> list[dict]:
    """Runs on every worker of one TorchTrainer: its tasks one after another, in the same
    processes (process start, imports and the process group are paid once per trainer, not per
    task). A task finished earlier (its ``task.json`` carries this run's fingerprint) is skipped;
    the task of a restored checkpoint resumes from it. Returns rank 0's per-task summaries."""
    entered = time.perf_counter()
    use_reserved_cpus()
    import deepspeed

    cfg = PipelineConfig.model_validate(loop["config"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    on_gpu = torch.cuda.is_available() and cfg.zoo.gpus_per_worker > 0
    if not on_gpu:
        skip_deepspeed_shm_build()
    deepspeed.init_distributed(dist_backend="nccl" if on_gpu else "gloo")
    pull_local(cfg, Path(loop["zoo_root"]) / LAYOUT_FILE, write_once=True)  # a URI root: maybe another node
    layout = LoraLayout.load(Path(loop["zoo_root"]) / LAYOUT_FILE)
    restored = _restored_task()
    summaries = []
    for job in map(LoraJob.from_list, loop["tasks"]):
        if _is_done(cfg, loop["zoo_root"], job.name, job.fingerprint):
            continue
        job_cfg = cfg.model_copy(update={"zoo": job.zoo_config(cfg.zoo)})  # its steps, seed, snapshots
        summaries.append(_train_task(job_cfg, loop, job.name, list(job.paths), rank=rank, world=world,
                                     on_gpu=on_gpu, layout=layout, resume=job.name == restored,
                                     entered=entered, fingerprint=job.fingerprint))
        entered = time.perf_counter()  # the next task's set-up starts now
    return summaries


def _train_task(cfg: PipelineConfig, loop: dict, task: str, task_paths: list[str], *, rank: int,
                world: int, on_gpu: bool, layout: LoraLayout, resume: bool, entered: float,
                fingerprint: str) -> dict:
    """One task's LoRA: fresh base model + DeepSpeed engine, steps, snapshots, ``task.json``."""
    import deepspeed

    model, tokenizer = load_base_model(cfg.model.spec, cache_dir=cfg.model.cache_dir,
                                       dtype=cfg.model.dtype)
    peft_model = build_lora_model(model, cfg.zoo)
    engine, *_ = deepspeed.initialize(
        model=peft_model, config=deepspeed_config(cfg.zoo, world_size=world, bf16=on_gpu),
        model_parameters=[p for p in peft_model.parameters() if p.requires_grad])
    exclude_tied_frozen_params_from_checkpoints(engine)
    sequences = tokenize_texts(tokenizer, _texts(task_paths, "train"), cfg.zoo.seq_len)
    eval_texts = _texts(task_paths, "eval", cfg.zoo.eval_max_texts)
    progress: dict = {"losses": [], "tokens": 0, "train_seconds": 0.0}
    if resume:
        with ray.train.get_checkpoint().as_directory() as folder:
            engine.load_checkpoint(folder, tag="ckpt", load_module_strict=False)
            progress = json.loads((Path(folder) / "progress.json").read_text())
        if rank == 0:
            _progress(f"[zoo {task}] resuming from step {progress['step']}")
    elif rank == 0:
        base_eval_started = time.perf_counter()
        progress["base_ppl"] = score_texts(model, tokenizer, eval_texts,
                                           max_length=cfg.zoo.seq_len).perplexity
        progress["base_eval_seconds"] = time.perf_counter() - base_eval_started
    setup_seconds = time.perf_counter() - entered - progress.get("base_eval_seconds", 0.0)
    snaps = set(snapshot_steps(cfg.zoo.steps, cfg.zoo.snapshots, cfg.zoo.snapshot_start))
    every = max(1, cfg.zoo.steps // 10)
    last_checkpoint = time.perf_counter()  # this attempt's start: zoo.checkpoint_interval_s counts from it
    for step in iterate_steps(progress.get("step", 0), cfg.zoo.steps):
        batch = batch_for_step(sequences, step=step, batch_size=cfg.zoo.batch_size,
                               seed=cfg.zoo.data_seed, rank=rank, world_size=world,
                               pad_id=tokenizer.pad_token_id)
        started = time.perf_counter()
        loss = train_step(engine, batch, seed=step_seed(cfg.zoo.data_seed, step, rank))
        progress["train_seconds"] += time.perf_counter() - started
        progress["tokens"] += int(batch["attention_mask"].sum()) * world
        progress["losses"].append([step, loss])
        if rank == 0 and step % every == 0 and verbose():  # the driver's progress counts tasks
            _progress(f"[zoo {task}] step {step}/{cfg.zoo.steps} loss {loss:.3f}")
        if step in snaps:
            _write_snapshot(engine, cfg, loop, task, step=step, rank=rank, progress=progress,
                            layout=layout, eval_texts=eval_texts, tokenizer=tokenizer)
        # Any step, not only a snapshot's: a LoRA with one snapshot (an oracle, a multi-task
        # LoRA of 1,404 steps) would otherwise lose all of its training to a kill.
        if _checkpoint_wanted(step in snaps, last_checkpoint, cfg.zoo.checkpoint_interval_s):
            _checkpoint(engine, task, step=step, rank=rank, progress=progress)
            last_checkpoint = time.perf_counter()
    summary = {"task": task, "base_ppl": progress.get("base_ppl"),
               "lora_ppl": progress.get("eval_ppl"), "train_seconds": progress["train_seconds"],
               "tokens": progress["tokens"],
               "tokens_per_s": progress["tokens"] / max(progress["train_seconds"], 1e-9),
               "workers": world,
               # Where a task's time goes besides the steps (this attempt's setup; the rest summed
               # over attempts): model load, DeepSpeed init (+ imports and the process group for
               # a trainer's first task) = setup.
               "setup_seconds": setup_seconds,
               "base_eval_seconds": progress.get("base_eval_seconds", 0.0),
               "snapshot_seconds": progress.get("snapshot_seconds", 0.0),
               "checkpoint_seconds": progress.get("checkpoint_seconds", 0.0),
               "checkpoints": progress.get("checkpoints", 0),
               "wall_seconds": time.perf_counter() - entered}
    if rank == 0:  # the task is done once this lands: a rerun skips it
        index = write_task_index(Path(loop["zoo_root"]), task)  # the manifest reads this, not S files
        push_local(cfg, task_dir(Path(loop["zoo_root"]), task) / SNAPSHOT_INDEX_FILE)
        done = task_dir(Path(loop["zoo_root"]), task) / TASK_DONE_FILE
        write_json_atomic(done, {**summary, "fingerprint": fingerprint, "snapshots": len(index)})
        push_local(cfg, done)
        _progress(f"[zoo {task}] done: eval ppl {summary['base_ppl']:.2f} -> {summary['lora_ppl']:.2f}")
    torch.distributed.barrier()
    release_engine(engine)  # DeepSpeed's global tables held every task's model alive
    del engine, peft_model, model  # the next task builds its own
    return summary


# ----------------------------------------------------------------------------- driver side


def fit_tasks(config: dict, name: str, tasks: list[list], zoo_root: str, stage_name: str) -> dict:
    """Launcher (a ``num_cpus=0`` Ray task): one TorchTrainer for ``tasks`` (`LoraJob.as_list`
    rows), resumable by its ``name``."""
    from ray.train.torch import TorchConfig, TorchTrainer

    cfg = PipelineConfig.model_validate(config)
    z = cfg.zoo
    resources = {"CPU": z.cpus_per_worker, **({"GPU": z.gpus_per_worker} if z.gpus_per_worker else {})}
    started = time.perf_counter()
    trainer = TorchTrainer(
        train_func,
        train_loop_config={"config": config, "tasks": tasks, "zoo_root": zoo_root},
        torch_config=TorchConfig(backend="nccl" if z.gpus_per_worker else "gloo"),
        scaling_config=ray.train.ScalingConfig(num_workers=z.num_workers,
                                               use_gpu=z.gpus_per_worker > 0,
                                               resources_per_worker=resources),
        run_config=ray.train.RunConfig(
            name=name, storage_path=cfg.storage.uri(stage_name, RAY_DIR),  # a URI as is
            failure_config=ray.train.FailureConfig(max_failures=2),
            logging_config=train_logging(),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=1)))  # resume needs the last only
    summaries = trainer.fit().return_value
    return {"summaries": summaries, "wall_seconds": time.perf_counter() - started}


def trainer_groups(jobs: Sequence[LoraJob], costs: dict[str, int], tasks_per_trainer: int | None,
                   concurrency: int) -> dict[str, list[list]]:
    """Trainer name -> its jobs (`LoraJob.as_list` rows). Built from the whole job list (never
    from what is left), so a rerun after a kill finds the same trainer names and checkpoints.

    Default (``tasks_per_trainer=None``): the jobs dealt over the trainers that run at once,
    longest first to the least-loaded trainer (by optimizer steps, ``costs``), so one trainer
    never gets the compute-matched multi-task LoRA on top of an even share of the tasks.
    """
    if tasks_per_trainer:  # contiguous chunks of the given size
        groups = [list(jobs[i:i + tasks_per_trainer]) for i in range(0, len(jobs), tasks_per_trainer)]
    else:
        count = min(concurrency, len(jobs))
        groups, loads = [[] for _ in range(count)], [0] * count
        for job in sorted(jobs, key=lambda j: -costs[j.name]):  # stable: ties keep list order
            lightest = loads.index(min(loads))
            groups[lightest].append(job)
            loads[lightest] += costs[job.name]

    def trainer_name(group: list[LoraJob]) -> str:
        if len(group) == 1:
            return f"lora-{group[0].name}"
        digest = hashlib.sha256("\n".join(j.name for j in group).encode()).hexdigest()[:8]
        return f"lora-{group[0].name}-and-{len(group) - 1}-more-{digest}"

    return {trainer_name(group): [job.as_list() for job in group] for group in groups if group}


def _concurrency(cfg: PipelineConfig) -> int:
    return trainer_concurrency(cfg, ray.cluster_resources())


def trainer_concurrency(cfg: PipelineConfig, resources: dict[str, float]) -> int:
    """Trainers at once: ``zoo.max_concurrent``, else what ``resources`` (the cluster now) hold.

    A GPU zoo on a cluster that has no GPU node up yet (one that autoscales from zero) would
    run one trainer at a time for the whole stage: that is refused with the fix, not guessed.
    """
    if cfg.zoo.max_concurrent:
        return cfg.zoo.max_concurrent
    z = cfg.zoo
    fit = trainers_that_fit(resources, z.num_workers, z.cpus_per_worker, z.gpus_per_worker)
    if fit.get("GPU") == 0:
        raise InputError("zoo.max_concurrent is unset and no GPU is up yet, so the cluster's size "
                         "is unknown (an autoscaling cluster starts with no GPU node). Fix: set "
                         "zoo.max_concurrent to the trainers its largest size holds (the gpu "
                         "preset: 16).")
    return max(1, min(fit.values()))


def prepare_zoo(cfg: PipelineConfig, root: Path) -> LoraLayout:
    """Check every input before any training: model, target modules, schedule, zoo identity."""
    snapshot_steps(cfg.zoo.steps, cfg.zoo.snapshots, cfg.zoo.snapshot_start)
    if cfg.zoo.batch_size % cfg.zoo.num_workers:
        raise TrainInputError(f"zoo.batch_size ({cfg.zoo.batch_size}) must be divisible by "
                              f"zoo.num_workers ({cfg.zoo.num_workers}).")
    # The driver only reads the LoRA layout: CPU, leaving a GPU it may see to the trainers.
    model, _ = load_base_model(cfg.model.spec, cache_dir=cfg.model.cache_dir, dtype=cfg.model.dtype,
                               device="cpu")
    peft_model = build_lora_model(model, cfg.zoo)
    layout = LoraLayout.of(adapter_state_dict(peft_model))
    lora = cfg.zoo.model_dump(include={"rank", "alpha", "dropout", "target_modules", "init_seed"})
    check_or_create_zoo(root, zoo_identity(cfg.model.spec, lora, layout), layout)
    return layout


def run(cfg: PipelineConfig, suite: Suite) -> dict:
    """The ``zoo`` stage: a LoRA per training task (+ the multi-task LoRA)."""
    return train_jobs(cfg, "zoo", zoo_jobs(suite, cfg.zoo, cfg.model.spec))


def run_oracles(cfg: PipelineConfig, suite: Suite) -> dict:
    """The ``oracles`` stage: measurement-only LoRAs in ``<root>/oracles/`` (see `oracle_jobs`)."""
    folds = suite_folds(suite, cfg.evaluate) if cfg.oracles.fold_multitask else []
    return train_jobs(cfg, "oracles", oracle_jobs(suite, cfg.zoo, cfg.oracles, cfg.model.spec, folds))


def train_jobs(cfg: PipelineConfig, stage_name: str, jobs: list[LoraJob]) -> dict:
    """Train ``jobs`` into ``<root>/<stage_name>/``; a finished job (its ``task.json`` carries
    its own fingerprint) is never retrained, whatever else changed in the suite."""
    current = stage(cfg, stage_name, sorted(j.fingerprint for j in jobs), sections=("model",))
    if current.is_current():
        log.info("%s: up to date, skipping (%s)", stage_name, current.directory)
        return current.record()
    root = cfg.storage.path(stage_name).resolve()
    if not jobs:  # e.g. oracles for a suite without held-out tasks and no replicates asked for
        log.info("%s: nothing to train", stage_name)
        return current.finish(current.begin(cfg), {"zoo": str(root), "tasks": 0, "snapshots": 0})
    prepare_zoo(cfg, root)  # every input check, before Ray or training starts
    for name in (ZOO_FILE, LAYOUT_FILE):  # workers on other nodes read the layout from the URI
        push_local(cfg, root / name)
    init_ray(cfg.ray, cache_dir=cfg.model.cache_dir)
    started = current.begin(cfg)
    for job in jobs:  # a URI root: tasks finished on other nodes before a kill
        pull_local(cfg, task_dir(root, job.name) / TASK_DONE_FILE)
    done = {job.name for job in jobs if task_finished(root, job.name, job.fingerprint)}
    concurrency = _concurrency(cfg)
    costs = {job.name: job.cost(cfg.zoo) for job in jobs}
    groups = trainer_groups(jobs, costs, cfg.zoo.tasks_per_trainer, concurrency)
    todo = [name for name, rows in groups.items() if any(row[0] not in done for row in rows)]
    log.info("%s: %d LoRAs (%d already done) in %d trainers, %d at a time", stage_name, len(jobs),
             len(done), len(groups), concurrency)
    launcher = ray.remote(num_cpus=0)(fit_tasks)
    finished = len(done)
    progress = Progress(stage_name, len(jobs), "LoRAs", initial=len(done))
    # Trainers return when all their tasks are done; a task's task.json lands as it finishes.
    with FileCountWatcher(progress, _finished_counter(root, jobs, done)):
        _run_trainers(cfg, stage_name, root, jobs, groups, todo, concurrency, launcher, finished)
    return _finish(current, started, root, [job.name for job in jobs])


def _finished_counter(root: Path, jobs: list[LoraJob], done: set[str]):
    """A count of finished jobs that reads only the task.json files of jobs not yet seen
    finished: each poll costs the unfinished tasks, not the whole zoo."""
    finished = set(done)

    def count() -> int:
        finished.update(j.name for j in jobs
                        if j.name not in finished and task_finished(root, j.name, j.fingerprint))
        return len(finished)

    return count


def _run_trainers(cfg: PipelineConfig, stage_name: str, root: Path, jobs: list[LoraJob],
                  groups: dict, todo: list[str], concurrency: int, launcher, finished: int) -> None:
    """Launch trainers, ``concurrency`` at a time, and log each one's LoRAs as it returns."""
    config_dict = cfg.model_dump(mode="json")

    def submit(name: str):
        return launcher.remote(config_dict, name, groups[name], str(root), stage_name)

    for trainer, result in as_completed(submit, todo, concurrency):
        log.info("%s: trainer %s finished %d LoRA(s) in %.0f s", stage_name, trainer,
                 len(result["summaries"]), result["wall_seconds"])
        for summary in result["summaries"]:
            name = summary["task"]
            # Trained on another node; every file fetched: a retrained task rewrites its
            # snapshots under the same names and sizes.
            pull_local(cfg, task_dir(root, name), last=(SNAPSHOT_FILE, TASK_DONE_FILE))
            finished += 1
            log.info("%s %d/%d %-24s base ppl %.2f -> LoRA %.2f  (%.0f tok/s, %.0f s)", stage_name,
                     finished, len(jobs), name, summary["base_ppl"], summary["lora_ppl"],
                     summary["tokens_per_s"], summary["wall_seconds"])
    # The manifest is built once, at the end (_finish), from one index file per task.


def _finish(current, started: float, zoo_root: Path, names: list[str]) -> dict:
    import pandas as pd

    manifest = write_manifest(zoo_root)
    summary = pd.DataFrame([json.loads((task_dir(zoo_root, n) / TASK_DONE_FILE).read_text()) for n in names])
    write_bytes_atomic(zoo_root / "summary.parquet", summary.drop(columns=["fingerprint"]).to_parquet(index=False))
    plot_losses(zoo_root)
    return current.finish(started, {"zoo": str(zoo_root), "tasks": len(names),
                                    "snapshots": len(manifest), "manifest": f"{current.name}/manifest.parquet"},
                          pushed=("tasks",))  # uploaded task by task as they finished


@user_errors_exit_2
def main(argv: Sequence[str] | None = None) -> int:
    cfg = parse_job_args(__doc__.split("\n\n")[0], argv)
    ensure_writable_root(cfg)
    record = run(cfg, open_suite(cfg))
    print(f"zoo: {record['outputs']['tasks']} LoRAs, {record['outputs']['snapshots']} snapshots -> "
          f"{record['outputs']['zoo']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
