"""The generator's end-to-end objective on Ray Train (``generator.objective: lm | hybrid``).

Called by the ``generator`` stage after the reconstruction-trained start is written to
``<storage.root>/generator-reconstruction/``. A ``TorchTrainer`` with ``generator.lm_workers``
data-parallel workers runs `lm_train_func`: each loads the frozen base model and the start,
draws its own training tasks per step, and back-propagates the LM loss of their generated LoRAs
on their *train* texts (`icm.generator.lm`); gradients are averaged over workers. Rank 0
checkpoints every ``generator.report_every`` steps into Ray Train's storage
(``<storage.root>/generator-lm/``), and a rerun with the same config resumes from the last
checkpoint; so does one that asks only for more ``lm_steps`` (`lm_run_name`), while one that
changes only LM settings reuses the reconstruction-trained start. Held-out tasks never enter:
the texts come from the suite's training tasks that the generator was trained on, eval texts
are never read.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import ray
import ray.train
import ray.train.torch
import torch

from icm import storage
from icm.config import GeneratorConfig, PipelineConfig
from icm.errors import InputError
from icm.stages import push_local
from icm.tasks import Suite, load_task
from jobs.ray_setup import cpus_each, train_logging, trainers_that_fit, use_reserved_cpus

log = logging.getLogger("jobs.generator_lm")
LM_DIR = "generator-lm"
STATE_FILE = "lm_state.pt"


def lm_train_texts(suite: Suite, tasks: list[str], limit: int) -> dict[str, list[str]]:
    """Train-split texts of ``tasks`` (at most ``limit`` each); a held-out task is refused."""
    held = sorted(set(tasks) & set(suite.heldout))
    if held:
        raise ValueError(f"held-out tasks {held} may not train the generator")
    return {task: load_task(suite.tasks[task].path).train_texts()[:limit] for task in tasks}


def lm_train_prompts(cfg: PipelineConfig, gen_cfg: GeneratorConfig, suite: Suite,
                     tasks: Sequence[str]) -> dict | None:
    """With ``generator.lm_context: prompt`` or a teacher (``lm_teacher_weight``), each task's
    episode prompts, one per condition row of `load_task_conditions` (the task-vectors stage's
    prompts those rows were read from); None otherwise."""
    from icm.generator.lm import stage_episode_prompts

    if not gen_cfg.reads_prompts:
        return None
    return stage_episode_prompts(cfg.storage.path("task_vectors"),
                                 {task: suite.tasks[task] for task in tasks}, cfg.task_vectors,
                                 cfg.generator.condition_modes)


def lm_inputs(cfg: PipelineConfig, gen_cfg: GeneratorConfig, suite: Suite, trained_on: list[str],
              fold_groups: Sequence[str] = ()) -> tuple[dict, dict, dict | None, list[str]]:
    """The LM phase's data over the zoo's tasks ``trained_on`` plus ``generator.lm_extra_root``'s
    outside ``fold_groups``: task -> train texts, task -> (E x modes, D) condition rows, (with
    lm_context prompt or a teacher, else None) task -> each row's `EpisodePrompt`, and the extra
    tasks."""
    from icm.generator.inputs import load_task_conditions
    from icm.generator.lm_corpus import extra_lm_tasks

    texts = lm_train_texts(suite, trained_on, gen_cfg.lm_max_texts)
    conditions = load_task_conditions(cfg, trained_on)
    extra = extra_lm_tasks(cfg, gen_cfg.lm_extra_root, suite, fold_groups,
                           max_texts=gen_cfg.lm_max_texts,  # conditioned like the zoo's tasks
                           with_prompts=gen_cfg.reads_prompts)
    prompts = lm_train_prompts(cfg, gen_cfg, suite, trained_on)
    if prompts is not None:  # the extra tasks read the prompts their own root's stage read
        prompts |= extra.prompts or {}
    return (texts | extra.texts, conditions | extra.conditions, prompts, sorted(extra.texts))


def lm_train_func(loop: dict) -> None:
    """One data-parallel worker of the LM fine-tuning (see the module docstring)."""
    from icm.generator import LoraGenerator
    from icm.generator.lm import fit_lm, lm_setup

    use_reserved_cpus()
    cfg = PipelineConfig.model_validate(loop["config"])
    gen_cfg = GeneratorConfig.model_validate(loop["generator_config"])
    rank = ray.train.get_context().get_world_rank()
    device = ray.train.torch.get_device()  # cuda:<local rank> on a GPU worker, else cpu
    generator = LoraGenerator.load(loop["start"]).to(device)
    if loop["anchor_offset"] is not None:  # generator.lm_anchor: multitask (fixed or trained)
        generator.residual = loop["anchor_offset"].to(device)
    setup = lm_setup(generator, cfg.model, loop["texts"], loop["conditions"], gen_cfg, str(device),
                     loop["prompts"])

    resume = None
    if (checkpoint := ray.train.get_checkpoint()) is not None:
        with checkpoint.as_directory() as folder:
            resume = torch.load(Path(folder) / STATE_FILE, weights_only=False)
        print(f"[generator-lm] rank {rank} resuming from step {resume['step']}", flush=True)

    def report(metrics: dict, state: dict) -> None:
        if rank == 0:  # the same line from every rank would only repeat it
            print(f"[generator-lm] step {metrics['lm_step']}/{gen_cfg.lm_steps} LM nll "
                  f"{metrics['train_lm_nll']:.4f}" + (f" recon {metrics['train_recon']:.4g}"
                                                      if metrics["train_recon"] is not None else ""),
                  flush=True)
        with tempfile.TemporaryDirectory() as folder:
            if rank == 0:  # every rank holds the same network: one checkpoint is enough
                torch.save(state, Path(folder) / STATE_FILE)
            checkpoint = ray.train.Checkpoint.from_directory(folder) if rank == 0 else None
            ray.train.report({k: v for k, v in metrics.items() if v is not None}, checkpoint=checkpoint)

    fit_lm(generator, setup.applier, setup.tasks, gen_cfg, pad_id=setup.pad_id,
           reconstruction=reconstruction_term(cfg, gen_cfg, loop["suite"]), rank=rank,
           report=report, resume_state=resume)


def reconstruction_term(cfg: PipelineConfig, gen_cfg: GeneratorConfig, suite: Suite):
    """`fit_lm`'s ``reconstruction`` argument for ``gen_cfg`` (None unless hybrid): the zoo's
    samples, read by the caller itself (never through Ray's object store)."""
    from icm.generator.data import prepare_data
    from icm.generator.inputs import load_generator_inputs
    from icm.generator.lm import hybrid_term

    def zoo_data():
        inputs = load_generator_inputs(cfg, suite)
        return prepare_data(inputs.zoo, inputs.conditions, gen_cfg, validation=False,
                            init_state=inputs.init_state, condition_spec=inputs.condition_spec)

    return hybrid_term(gen_cfg, zoo_data)


def anchor(cfg: PipelineConfig, gen_cfg: GeneratorConfig, generator, fold: int | None = None
           ) -> torch.Tensor | None:
    """``generator.lm_anchor: multitask``: the shared residual (L_gen,) that moves the zoo's mean
    onto a multi-task LoRA (its final snapshot): the zoo's, or for group fold ``fold`` the
    oracles stage's one trained without the fold's groups. None for ``zoo-mean``."""
    from icm.eval.inputs import final_snapshots
    from icm.generator.lm import anchor_offset
    from icm.zoo import MULTITASK, fold_multitask_name, load_vector

    if gen_cfg.lm_anchor == "zoo-mean":
        return None
    stage, name = ("zoo", MULTITASK) if fold is None else ("oracles", fold_multitask_name(fold))
    snapshot = final_snapshots(cfg.storage.path(stage)).get(name)
    if snapshot is None:
        fix = ("set zoo.multitask: true and rerun the zoo stage" if fold is None else
               "set oracles.fold_multitask: true and rerun the oracles stage")
        raise InputError(f"generator.lm_anchor: multitask needs the LoRA {name!r} in "
                         f"{cfg.storage.path(stage)}, and it is not there. Fix: {fix}, or use "
                         "generator.lm_anchor: zoo-mean.")
    return anchor_offset(generator, load_vector(snapshot)).cpu()


def lm_run_name(cfg: PipelineConfig, gen_cfg: GeneratorConfig, run_key: str) -> str:
    """The Ray Train run to resume, by name: one per ``run_key`` (the LM settings but
    ``lm_steps``), so a run asked for more steps continues the checkpoint of fewer. Only the
    last checkpoint is kept and none can be rewound: one past ``lm_steps`` gets a run of its own."""
    name = f"lm-{run_key[:12]}"
    # Ray Train's own record of the run's last checkpoint (what a resume would load)
    snapshot = storage.read_json(cfg.storage.uri(LM_DIR, name, "checkpoint_manager_snapshot.json"))
    latest = ((snapshot or {}).get("latest_checkpoint_result") or {}).get("metrics") or {}
    return name if latest.get("lm_step", 0) <= gen_cfg.lm_steps else f"{name}-{gen_cfg.lm_steps}"


def finetune(cfg: PipelineConfig, gen_cfg: GeneratorConfig, suite: Suite, start: Path,
             run_key: str, out: Path | None = None, fold: int | None = None,
             fold_groups: Sequence[str] = (), cpus_per_worker: float | None = None) -> dict:
    """Run the TorchTrainer from the reconstruction-trained ``start`` (trained on ``suite``'s
    training tasks, plus ``generator.lm_extra_root``'s tasks outside ``fold_groups``); write the
    final generator to ``out`` (default: the stage folder) with the LM history in its training
    summary. Each worker holds ``cpus_per_worker`` CPUs (default: `lm_worker_cpus`, alone);
    ``run_key`` names the Ray Train run it resumes (`lm_run_name`)."""
    from ray.train.torch import TorchConfig, TorchTrainer

    from icm.generator import LoraGenerator

    started = time.perf_counter()
    generator = LoraGenerator.load(start)  # the start: its training tasks now, its weights at the end
    texts, conditions, prompts, extra = lm_inputs(
        cfg, gen_cfg, suite, generator.summary["trained_on"]["tasks"], fold_groups)
    offset = anchor(cfg, gen_cfg, generator, fold)
    loop = {"config": cfg.model_dump(mode="json"), "generator_config": gen_cfg.model_dump(mode="json"),
            "start": str(start), "texts": texts, "conditions": conditions,
            "suite": suite, "anchor_offset": offset, "prompts": prompts}
    log.info("generator: %s fine-tuning on %d tasks (%d without a LoRA, from %s)", gen_cfg.objective,
             len(texts), len(extra), gen_cfg.lm_extra_root)
    condition = ("mean, no task's" if gen_cfg.lm_condition == "mean" else
                 f"task from {gen_cfg.lm_condition_episodes} episodes, dropped "
                 f"{100 * gen_cfg.lm_condition_dropout:.0f}%")
    log.info("generator: %s fine-tuning, %d steps x %d workers x %d tasks x %d texts of %d "
             "tokens (read after: %s; condition: %s; prompt as teacher: weight %g)",
             gen_cfg.objective, gen_cfg.lm_steps, gen_cfg.lm_workers, gen_cfg.lm_tasks,
             gen_cfg.lm_texts, gen_cfg.lm_seq_len, gen_cfg.lm_context, condition,
             gen_cfg.lm_teacher_weight)
    gpus, cpus = gen_cfg.lm_gpus_per_worker, cpus_per_worker or lm_worker_cpus(gen_cfg)
    trainer = TorchTrainer(
        lm_train_func, train_loop_config=loop,
        torch_config=TorchConfig(backend="nccl" if gpus else "gloo"),
        scaling_config=ray.train.ScalingConfig(
            num_workers=gen_cfg.lm_workers, use_gpu=gpus > 0,
            resources_per_worker={"CPU": cpus, **({"GPU": gpus} if gpus else {})}),
        run_config=ray.train.RunConfig(
            name=lm_run_name(cfg, gen_cfg, run_key), storage_path=cfg.storage.uri(LM_DIR),
            failure_config=ray.train.FailureConfig(max_failures=2), logging_config=train_logging(),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=1)))
    result = trainer.fit()
    with result.checkpoint.as_directory() as folder:
        state = torch.load(Path(folder) / STATE_FILE, weights_only=False)
    generator.model.load_state_dict({k: v.cpu() for k, v in state["model"].items()})
    if state.get("residual") is not None:  # generator.lm_shared_residual
        generator.residual = state["residual"].cpu()
    elif offset is not None:  # a fixed anchor: the offset as computed
        generator.residual = offset
    generator.config = gen_cfg
    generator.summary = {**generator.summary, "objective": gen_cfg.objective,
                         "lm": {"steps": state["step"], "history": state["history"],
                                "train_seconds": state["train_seconds"],
                                "wall_seconds": time.perf_counter() - started,
                                "workers": gen_cfg.lm_workers, "cpus_per_worker": cpus,
                                "tasks": sorted(texts), "extra_tasks": extra}}
    out = generator.save(out or cfg.storage.path("generator"), resolved_config=cfg)
    push_local(cfg, out)
    meta = json.loads((out / "generator.json").read_text())
    final = state["history"][-1] if state["history"] else {}
    return {"trained_on": generator.summary["trained_on"], "final": {**generator.summary["final"], **final},
            "samples_per_s": generator.summary["samples_per_s"], "size": meta["size"],
            "objective": gen_cfg.objective}


def lm_worker_cpus(gen_cfg: GeneratorConfig, side_by_side: int = 1) -> float:
    """CPUs of one LM worker when ``side_by_side`` fine-tunes run at once: ``cpus_per_task``,
    or (None) the cluster's CPUs shared over all their workers (`cpus_each`)."""
    return gen_cfg.cpus_per_task or cpus_each(gen_cfg.lm_workers * side_by_side)


def finetune_concurrency(gen_cfg: GeneratorConfig, resources: Mapping[str, float],
                         cpus_per_worker: float) -> int:
    """Fine-tunes (TorchTrainers) that ``resources`` (the cluster now) run side by side: each
    holds ``lm_workers`` x ``cpus_per_worker`` CPUs (and x ``lm_gpus_per_worker`` GPUs)."""
    fit = trainers_that_fit(resources, gen_cfg.lm_workers, cpus_per_worker,
                            gen_cfg.lm_gpus_per_worker)
    return max(1, min(fit.values()))  # no GPU up yet (autoscaling from zero): one at a time


def finetune_task(config: dict, generator_config: dict, suite: Suite, start: str, run_key: str,
                  out: str, fold: int, fold_groups: list[str], cpus_per_worker: float) -> dict:
    """Ray task around `finetune` for one fold generator, reserving nothing itself (its
    TorchTrainer's workers hold the CPUs), so that several folds fine-tune at once."""
    started = time.perf_counter()
    summary = finetune(PipelineConfig.model_validate(config),
                       GeneratorConfig.model_validate(generator_config), suite, Path(start),
                       run_key, out=Path(out), fold=fold, fold_groups=fold_groups,
                       cpus_per_worker=cpus_per_worker)
    return {**summary, "wall_seconds": time.perf_counter() - started}
