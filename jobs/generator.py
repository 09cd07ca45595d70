"""Train the final LoRA generator on every training task and snapshot; write the artifact.

    python -m jobs.generator --config smoke [key=value ...]     (or: icm generator ...)

Hyperparameters: the Tune search's winner (``<storage.root>/tune/best_config.json``; the search
runs first when it is missing or out of date) when ``tune.enabled``, else ``generator`` as
configured. Unlike the search's trials, the final generator sees all training tasks and all their
snapshots (no validation split); held-out tasks never enter. Training runs as one Ray task
(``generator.cpus_per_task`` CPUs) that checkpoints every ``generator.report_every`` steps to
``<storage.root>/generator-checkpoint/`` and resumes from it after a kill (a URI root: in the
local mirror of the node it ran on). Output: ``<storage.root>/generator/`` (see
``icm/generator/``), written atomically.
"""

from __future__ import annotations

import json
import logging
import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import ray

from icm.config import GeneratorConfig, PipelineConfig
from icm.errors import InputError
from icm.generator.training import load_checkpoint
from icm.generator import train_generator
from icm.generator.inputs import GeneratorInputs, load_generator_inputs
from icm.generator.lm_corpus import extra_root_fingerprint
from icm.io import atomic_directory, fingerprint_matches, sha256_json, write_json_atomic
from icm.stages import STAGE_FILE, Stage, open_suite, pull_local, pull_stages, push_local, stage
from icm.tasks import Suite
from jobs import tune as tune_stage
from jobs.common import ensure_writable_root, parse_job_args, user_errors_exit_2
from jobs.ray_setup import cpus_each, init_ray, with_reserved_threads

log = logging.getLogger("jobs.generator")
CHECKPOINT_DIR = "generator-checkpoint"
# objective lm/hybrid: the reconstruction-trained start the LM fine-tuning resumes from
RECONSTRUCTION_DIR = "generator-reconstruction"
# in a reconstruction-trained start (the main one, or a fold's): finished, for this fingerprint
RECONSTRUCTED = "fingerprint.json"
# in a generator stage record that `planned_record` made (no generator trained): true
PLANNED = "planned"


def chosen_config(cfg: PipelineConfig, suite: Suite, inputs: GeneratorInputs) -> tuple[GeneratorConfig, str]:
    """The hyperparameters to train with, and where they came from."""
    if not cfg.tune.enabled:
        return cfg.generator, "the generator config (tune.enabled=false)"
    tune_stage.run(cfg, suite, inputs=inputs)  # skipped when up to date
    best = json.loads(cfg.storage.path("tune", "best_config.json").read_text())
    return GeneratorConfig.model_validate(best["generator_config"]), f"Tune trial {best['trial_id']}"


def build_generator(config: dict, generator_config: dict, suite: Suite, inputs: GeneratorInputs | None,
                    fingerprint: str, out: str | None = None, work: str | None = None) -> dict:
    """Ray task: train on ``suite``'s training tasks by reconstruction, checkpointing into
    ``work`` (default: the stage's checkpoint folder) so that a rerun with the same
    ``fingerprint`` resumes, then write the artifact to ``out`` (default: the stage folder)."""
    cfg = PipelineConfig.model_validate(config)
    gen_cfg = GeneratorConfig.model_validate(generator_config)
    if inputs is None:
        pull_stages(cfg, "zoo", "task_vectors")  # a URI root: this node's mirror may lack them
    inputs = inputs or load_generator_inputs(cfg, suite)
    work = Path(work) if work else cfg.storage.path(CHECKPOINT_DIR)
    marker = work / "fingerprint.json"
    resume = None
    if fingerprint_matches(marker, fingerprint):
        resume = load_checkpoint(work)
        print(f"[generator] resuming from step {resume['step']}", flush=True)

    def report(metrics: dict, save) -> None:
        with atomic_directory(work) as staging:
            save(staging)
            write_json_atomic(staging / "fingerprint.json", {"fingerprint": fingerprint})
        print(f"[generator] step {metrics['step']}/{gen_cfg.steps} recon {metrics['train_recon']:.4g} "
              f"kl {metrics['train_kl']:.3g} gen_mse {metrics['train_gen_mse']:.4g}", flush=True)

    generator = train_generator(inputs.zoo, inputs.conditions, gen_cfg, validation=False,
                                condition_spec=inputs.condition_spec, init_state=inputs.init_state,
                                report=report, resume_state=resume)
    out = generator.save(out or cfg.storage.path("generator"), resolved_config=cfg)
    push_local(cfg, out)  # a URI root: the driver (maybe on another node) pulls it from there
    shutil.rmtree(work, ignore_errors=True)
    meta = json.loads((out / "generator.json").read_text())
    return {"trained_on": generator.summary["trained_on"], "final": generator.summary["final"],
            "samples_per_s": generator.summary["samples_per_s"], "size": meta["size"]}


@dataclass(frozen=True)
class Plan:
    """What the generator stage trains, settled before it trains anything."""

    config: GeneratorConfig
    source: str  # where the hyperparameters came from (the config, or a Tune trial)
    current: Stage  # this run's generator stage; its fingerprint: inputs, settings, extra tasks
    keys: dict[str, str]  # `phase_keys`: the reconstruction and LM-run keys (lm/hybrid)


def plan(cfg: PipelineConfig, suite: Suite, inputs: GeneratorInputs) -> Plan:
    """The generator stage's settings, fingerprint and phase keys for ``inputs``: the same
    whether the stage itself asks (`run`) or a fold-only evaluation does (`planned_record`)."""
    gen_cfg, source = chosen_config(cfg, suite, inputs)
    extra = extra_root_fingerprint(cfg)  # the LM objective's tasks without a LoRA, when set
    given_fingerprint = inputs.fingerprint()
    current = stage(cfg, "generator", given_fingerprint, gen_cfg.trained_settings(),
                    *([extra] if extra else []), sections=("model",))
    return Plan(gen_cfg, source, current, phase_keys(cfg, gen_cfg, given_fingerprint, extra))


def planned_record(cfg: PipelineConfig, suite: Suite) -> dict:
    """The generator stage's record as it will read once trained (fingerprint, phase keys,
    hyperparameters), without training it: what a fold-only evaluation derives its fold
    generators from, so that it need not train the main generator first."""
    pull_stages(cfg, "zoo", "task_vectors", *(["tune"] if cfg.tune.enabled else []))
    if cfg.tune.enabled and not cfg.storage.path("tune", STAGE_FILE).is_file():
        raise InputError(
            "tune.enabled=true and the tune stage has not run: the folds take the main "
            "generator's hyperparameters, which its search picks. Fix: add 'tune' to stages, "
            "or set tune.enabled=false to train with the generator section as configured.")
    planned = plan(cfg, suite, load_generator_inputs(cfg, suite))
    return {"fingerprint": planned.current.fingerprint, PLANNED: True,
            "config": planned.config.model_dump(mode="json"),
            "outputs": {"phase_keys": planned.keys, "hyperparameters_from": planned.source}}


def run(cfg: PipelineConfig, suite: Suite, *, inputs: GeneratorInputs | None = None) -> dict:
    """The ``generator`` stage (skipped when up to date). ``inputs`` default to storage."""
    given = inputs
    pull_stages(cfg, "zoo", "task_vectors")  # a URI root: the inputs, into the local mirror
    inputs = inputs or load_generator_inputs(cfg, suite)
    planned = plan(cfg, suite, inputs)
    gen_cfg, source, current, keys = planned.config, planned.source, planned.current, planned.keys
    if current.is_current():
        log.info("generator: up to date, skipping (%s)", current.directory)
        return current.record()
    init_ray(cfg.ray, cache_dir=cfg.model.cache_dir)
    started = current.begin(cfg)
    log.info("generator: training %s on all %d training tasks with hyperparameters from %s",
             gen_cfg.arch, len(inputs.zoo.vectors), source)
    # Alone on the cluster: all of one node's CPUs unless generator.cpus_per_task says otherwise.
    task = ray.remote(num_cpus=gen_cfg.cpus_per_task or cpus_each(1))(with_reserved_threads(build_generator))
    end_to_end = gen_cfg.objective != "reconstruction"
    start = cfg.storage.path(RECONSTRUCTION_DIR) if end_to_end else None
    # The task reads the zoo itself (shared storage) unless inputs were handed in (tests).
    if end_to_end and fingerprint_matches(start / RECONSTRUCTED, keys["reconstruction"]):
        log.info("generator: reconstruction-trained start reused (%s)", start)
    else:
        summary = ray.get(task.remote(cfg.model_dump(mode="json"), gen_cfg.model_dump(mode="json"),
                                      suite, given, keys["reconstruction"] if end_to_end
                                      else current.fingerprint, str(start) if start else None))
        if end_to_end:
            write_json_atomic(start / RECONSTRUCTED, {"fingerprint": keys["reconstruction"]})
    if end_to_end:
        from jobs.generator_lm import finetune

        pull_local(cfg, start)  # rewritten when the fingerprint changes
        summary = finetune(cfg, gen_cfg, suite, start, keys["lm_run"])
    pull_local(cfg, current.directory)  # a URI root: the task may have run on another node
    return current.finish(started, {"generator": str(Path(current.directory).resolve()),
                                    "hyperparameters_from": source, "phase_keys": keys, **summary})


def phase_keys(cfg: PipelineConfig, gen_cfg: GeneratorConfig, inputs_fingerprint: str,
               extra: str | None) -> dict[str, str]:
    """Keys finer than the stage's fingerprint for an lm/hybrid generator's two phases, so that
    changing only LM settings does not redo what they do not touch: ``reconstruction`` covers
    what the reconstruction phase reads (its start is reused by any LM setting), ``lm_run``
    everything but ``generator.lm_steps`` (a run asked for more steps continues the Ray Train
    run of fewer; `GeneratorConfig.lm_run_settings`). The fold generators derive theirs."""
    model = cfg.fingerprint("model")
    return {"reconstruction": sha256_json({"config": model, "inputs": [
                inputs_fingerprint, gen_cfg.reconstruction_settings()]}),
            "lm_run": sha256_json({"config": model, "inputs": [
                inputs_fingerprint, gen_cfg.lm_run_settings(), extra]})}


@user_errors_exit_2
def main(argv: Sequence[str] | None = None) -> int:
    cfg = parse_job_args(__doc__.split("\n\n")[0], argv)
    ensure_writable_root(cfg)
    out = run(cfg, open_suite(cfg))["outputs"]
    size, trained = out["size"], out["trained_on"]
    ratio = f"{100 * size['ratio_to_zoo']:.1f}% of" if size["ratio_to_zoo"] else "vs"
    print(f"generator: trained on all {len(trained['tasks'])} training tasks ({trained['snapshots']} "
          f"snapshots x their episodes; hyperparameters from {out['hyperparameters_from']}) -> "
          f"{out['generator']}; {size['generator_bytes'] / 1e6:.2f} MB = {ratio} the zoo's "
          f"{size['zoo_adapter_bytes'] / 1e6:.2f} MB of adapters")
    return 0


if __name__ == "__main__":
    sys.exit(main())
