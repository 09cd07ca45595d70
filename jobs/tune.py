"""Search generator hyperparameters with Ray Tune (ASHA + Optuna), then re-score by perplexity.

    python -m jobs.tune --config smoke [key=value ...]     (or: icm tune ...)

Data: the zoo's training tasks x their episode task vectors (held-out tasks never enter), split
once on the driver: ``generator.val_tasks`` whole tasks and the last ``generator.val_snapshots``
snapshots of every other task are kept out of training. Each Tune function trial trains one
generator (`icm.generator.fit_generator`) and reports every ``generator.report_every`` steps with a
checkpoint; ASHA stops weak trials on ``val_mse`` = mean of ``val_seen_mse`` (held-out
snapshots of seen tasks) and ``val_unseen_mse`` (validation tasks), the per-element MSE of the
z = 0 adapter in normalised weight space. The ``tune.rescore_top`` best trials then generate
adapters for the validation tasks, scored by eval perplexity on the base model; the best wins.
With end-to-end objectives in ``tune.objectives`` (lm, hybrid), the best of those is then
fine-tuned by each of them in a second Tune experiment (a grid, one trial per objective,
``generator.lm_steps`` on the search's training tasks' train texts; validation tasks never
train) and scored the same way: the objective is searched by what it is for, perplexity.
A killed search resumes (``tune.Tuner.restore``) when rerun with the same config.
Outputs under ``<storage.root>/tune/``: ``best_config.json``, ``trials.parquet``, ``split.json``,
``ray/cvae-search/`` and ``ray/objective-search/`` (Tune's experiments: checkpoints, results).
"""

from __future__ import annotations

import functools
import json
import logging
import math
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ray import tune
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search.optuna import OptunaSearch

from icm.config import GeneratorConfig, PipelineConfig
from icm.eval.folds import fold_tasks, suite_folds
from icm.errors import InputError
from icm.generator.archs import architecture
from icm.generator.training import load_checkpoint
from icm.generator import fit_generator, generator_from_state
from icm.generator.data import PreparedData, prepare_data
from icm.generator.inputs import GeneratorInputs, load_both_means, load_generator_inputs
from icm.io import write_bytes_atomic, write_json_atomic
from icm.logs import verbose
from icm.progress import Progress
from icm.stages import RAY_DIR, open_suite, pull_stages, stage
from icm.storage import delete, join, read_json, write_json
from icm.tasks import Suite
from jobs.common import ensure_writable_root, parse_job_args, user_errors_exit_2
from jobs.ray_setup import init_ray, use_reserved_cpus

log = logging.getLogger("jobs.tune")
EXPERIMENT = "cvae-search"
OBJECTIVE_EXPERIMENT = "objective-search"
LM_STATE_FILE = "lm_state.pt"
METRIC = "val_mse"
# Value sets of the categorical dimensions; the configured value is always added.
LATENTS, NOISES = (8, 16, 32, 64), (0.0, 0.01, 0.05, 0.1)


def _choices(values: Sequence, configured) -> list:
    return sorted(set(values) | {configured})


def search_space(trial, archs: tuple[str, ...], defaults: dict[str, Any]) -> None:
    """Optuna define-by-run space: lr, beta, latent size, noise, architecture, width, depth."""
    arch = trial.suggest_categorical("arch", list(archs))
    trial.suggest_float("lr", min(1e-4, defaults["lr"]), max(1e-2, defaults["lr"]), log=True)
    trial.suggest_float("beta", 1e-6, max(1e-1, defaults["beta"]), log=True)
    trial.suggest_categorical("latent_dim", _choices(LATENTS, defaults["latent_dim"]))
    trial.suggest_categorical("noise", _choices(NOISES, defaults["noise"]))
    entry = architecture(arch)  # the registry's widths and depth: every registered arch is searchable
    own = defaults["width"] if defaults["arch"] == arch else entry.tune_widths[0]
    trial.suggest_categorical(f"width_{arch}", _choices(entry.tune_widths, own))  # per-arch name: other values
    if entry.has_depth:
        trial.suggest_int("depth", 1, max(3, defaults["depth"]))


def default_point(defaults: dict[str, Any], archs: Sequence[str]) -> list[dict[str, Any]]:
    """The configured generator as the first trial, so the search never does worse than it."""
    if defaults["arch"] not in archs:
        return []
    point = {"arch": defaults["arch"], "lr": defaults["lr"], "beta": max(defaults["beta"], 1e-6),
             "latent_dim": defaults["latent_dim"], "noise": defaults["noise"],
             f"width_{defaults['arch']}": defaults["width"]}
    return [point | ({"depth": defaults["depth"]} if architecture(defaults["arch"]).has_depth else {})]


def trial_config(base: dict[str, Any], params: dict[str, Any]) -> GeneratorConfig:
    """The generator config of one trial: ``base`` with the sampled hyperparameters."""
    params = params.get("params", params)  # grid runs (the benchmark) nest them
    update = {k: params[k] for k in ("arch", "lr", "beta", "latent_dim", "noise")}
    update["width"] = params[f"width_{params['arch']}"]
    for key in ("depth", "objective"):
        if key in params:
            update[key] = params[key]
    return GeneratorConfig.model_validate({**base, **update})


def trainable(config: dict[str, Any], data: PreparedData, base: dict[str, Any]) -> None:
    """One Tune trial: train a generator, report (with a checkpoint) every report_every steps."""
    use_reserved_cpus()
    cfg = trial_config(base, config)
    resume = None
    if (checkpoint := tune.get_checkpoint()) is not None:
        with checkpoint.as_directory() as folder:
            resume = load_checkpoint(folder)

    def report(metrics: dict, save) -> None:
        with tempfile.TemporaryDirectory() as folder:
            save(folder)
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(folder))

    fit_generator(data, cfg, report=report, resume_state=resume)


class TrialProgress(tune.Callback):
    """The search's progress line: finished trials (ASHA-stopped ones included) of all, rate, ETA.
    Tune's own trial tables are left to ``-v``."""

    def __init__(self, total: int):
        self.total, self.finished, self.progress = total, 0, None

    def setup(self, **info) -> None:  # on the driver, when the experiment starts
        self.progress = Progress("tune", self.total, "trials")

    def on_trial_complete(self, iteration: int, trials, trial, **info) -> None:
        self.finished += 1
        if self.progress is not None:
            self.progress.update(self.finished)

    on_trial_error = on_trial_complete

    def on_experiment_end(self, trials, **info) -> None:
        if self.progress is not None:
            self.progress.close()


def make_tuner(cfg: PipelineConfig, data: PreparedData, storage: str | Path, *, name: str = EXPERIMENT,
               asha: bool = True, grid: list[dict] | None = None) -> tune.Tuner:
    """A new Tuner, or the restored one when ``storage/name`` holds an unfinished experiment.

    ``storage``: a local folder or a URI (s3://...; Tune writes there itself, from any node).
    ``grid`` (the benchmark's full-budget reference) runs exactly those trials, no early stop.
    """
    g, t = cfg.generator, cfg.tune
    resources = {"cpu": t.cpus_per_trial}
    fn = tune.with_resources(tune.with_parameters(trainable, data=data, base=g.model_dump(mode="json")),
                             resources)
    location = str(storage.resolve()) if isinstance(storage, Path) else storage
    path = join(location, name)
    if tune.Tuner.can_restore(path):
        log.info("tune: restoring the experiment at %s", path)
        return tune.Tuner.restore(path, trainable=fn, resume_errored=True)
    reports = math.ceil(g.steps / g.report_every)
    # metric/mode are set exactly once: on the searcher and the scheduler, which need them
    # (a define-by-run Optuna space ignores TuneConfig's), never also on TuneConfig (ValueError).
    objective = {"metric": METRIC, "mode": "min"}
    scheduler = (ASHAScheduler(time_attr="training_iteration", max_t=reports,
                               grace_period=min(t.grace_period, reports),
                               reduction_factor=t.reduction_factor, **objective) if asha else None)
    defaults = g.model_dump(mode="json")
    if not verbose():  # "A new study created in memory ..." (optuna sets its level on first use)
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
    searcher = None if grid else OptunaSearch(
        space=functools.partial(search_space, archs=tuple(t.archs), defaults=defaults),
        points_to_evaluate=default_point(defaults, t.archs), seed=t.seed, **objective)
    return tune.Tuner(
        fn, param_space={"params": tune.grid_search(grid)} if grid else {},
        tune_config=tune.TuneConfig(search_alg=searcher, scheduler=scheduler,
                                    num_samples=1 if grid else t.num_samples,
                                    max_concurrent_trials=t.max_concurrent),
        run_config=tune.RunConfig(name=name, storage_path=location, verbose=1 if verbose() else 0,
                                  callbacks=[TrialProgress(len(grid) if grid else t.num_samples)],
                                  checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
                                  failure_config=tune.FailureConfig(max_failures=1)))


def search(cfg: PipelineConfig, data: PreparedData, storage: str, fingerprint: str):
    """Run (or resume) the search in ``storage`` (a folder or a URI); an experiment left by
    another config is discarded first."""
    marker = join(storage, "search.json")
    if (found := read_json(marker)) is not None and found.get("fingerprint") != fingerprint:
        delete(join(storage, EXPERIMENT))
        delete(join(storage, OBJECTIVE_EXPERIMENT))
    write_json(marker, {"fingerprint": fingerprint})
    results = make_tuner(cfg, data, storage).fit()
    if results.num_errors == len(results):
        raise RuntimeError(f"every Tune trial failed; first error: {results.errors[0]}")
    return results


def trial_rows(results) -> list[dict[str, Any]]:
    """One row per trial: its hyperparameters, its last metrics, its compute."""
    rows = []
    for result in results:
        if result.error is not None or not result.metrics:
            continue
        m = result.metrics
        rows.append({"trial_id": m["trial_id"], "params": result.config.get("params", result.config),
                     "val_mse": m[METRIC], "val_seen_mse": m.get("val_seen_mse"),
                     "val_unseen_mse": m.get("val_unseen_mse"), "steps": m["step"],
                     "samples": m["samples"], "train_seconds": m["train_seconds"],
                     "reports": m["training_iteration"], "checkpoint": result.checkpoint})
    return sorted(rows, key=lambda r: r["val_mse"] if math.isfinite(r["val_mse"]) else math.inf)


def validation_texts(task, count: int) -> list[str]:
    """The texts model selection scores a validation task on: the last ``count`` of its train
    split, never its eval texts (those are what the evaluation reports; selecting on them would
    bias it). The generator never trains on a validation task, so these texts are unseen by it."""
    return task.train_texts()[-count:]


def check_selection_tasks(cfg: PipelineConfig, val_tasks) -> None:
    """Perplexity-based selection needs validation tasks: whole tasks no candidate trained on.
    Without them it would score training tasks on their own train texts (seen data)."""
    if val_tasks:
        return
    if end_to_end := objectives_searched(cfg):
        raise InputError(f"tune.objectives {end_to_end} are compared on validation "
                         "tasks that the LM loss never trains on, and generator.val_tasks is 0. "
                         "Fix: set generator.val_tasks >= 1, or tune.objectives=[reconstruction] "
                         "with generator.objective=reconstruction.")
    if cfg.tune.rescore_top:
        raise InputError(f"tune.rescore_top={cfg.tune.rescore_top} re-scores the best trials by "
                         "perplexity on validation tasks, and generator.val_tasks is 0: it would "
                         "score training tasks on texts every candidate trained on. Fix: set "
                         "generator.val_tasks >= 1, or tune.rescore_top=0 (select by val_mse).")


class ValidationScorer:
    """Model selection's one yardstick: the eval perplexity (base model + adapter) of the z = 0
    adapter a candidate generates for each validation task from its mean 'both' vector, on that
    task's `validation_texts`."""

    def __init__(self, cfg: PipelineConfig, suite: Suite, data: PreparedData,
                 both_means: dict[str, Any]):
        self.tasks = list(data.split.val_tasks)  # never empty: check_selection_tasks
        self.texts = {t: validation_texts(suite.tasks[t], cfg.tune.rescore_max_texts) for t in self.tasks}
        if missing := [t for t in self.tasks if t not in both_means]:
            raise InputError(f"no mean 'both' task vector for validation task(s) {missing}: Tune "
                             "scores candidates as the evaluation does, on that vector. Fix: "
                             "include 'both' in task_vectors.modes and rerun the task-vector stage.")
        # Each task's mean 'both' vector (D,): what the evaluation's `generated` variant and a
        # request with a description and examples condition on. (Not PreparedData.task_means,
        # the mean over every mode's episodes together: no reported number conditions on that
        # blend, so selecting by it picked the best trial for an unused input.)
        self.conditions = {t: both_means[t] for t in self.tasks}
        self.model_cfg = cfg.model
        self.max_length, self.batch_size = cfg.evaluate.max_length, cfg.evaluate.batch_size

    def perplexity(self, adapter_dir: Path | None, task: str) -> float:
        from icm.adapters import apply_adapter
        from icm.evaluation import score_texts
        from icm.models import load_base_model

        m = self.model_cfg
        model, tokenizer = load_base_model(m.spec, cache_dir=m.cache_dir, dtype=m.dtype)
        model = apply_adapter(model, adapter_dir) if adapter_dir else model
        return score_texts(model, tokenizer, self.texts[task], max_length=self.max_length,
                           batch_size=self.batch_size).perplexity

    def generator_perplexities(self, generator) -> dict[str, float]:
        ppl = {}
        for task in self.tasks:
            with tempfile.TemporaryDirectory() as tmp:
                vector = generator.sample(self.conditions[task], z="zero")[0]
                ppl[task] = self.perplexity(generator.write_adapter(vector, Path(tmp) / "adapter"), task)
        return ppl


def mean_log(perplexities: dict[str, float]) -> float:
    return sum(math.log(p) for p in perplexities.values()) / len(perplexities)


def rescore(scorer: ValidationScorer, data: PreparedData, base_cfg: GeneratorConfig,
            rows: list[dict]) -> list[dict]:
    """Eval perplexity of each candidate's z = 0 adapter on the validation tasks."""
    base = {t: scorer.perplexity(None, t) for t in scorer.tasks}
    out = []
    for row in rows:
        # what the trial trained by (the base config may name an LM phase still to come)
        params = {**row["params"], "objective": "reconstruction"}
        gen_cfg = trial_config(base_cfg.model_dump(mode="json"), params)
        with row["checkpoint"].as_directory() as folder:
            generator = generator_from_state(data, gen_cfg, load_checkpoint(folder)["model"])
        ppl = scorer.generator_perplexities(generator)
        out.append({"trial_id": row["trial_id"], "objective": "reconstruction", "params": params,
                    "perplexity": ppl, "base_perplexity": base, "mean_log_perplexity": mean_log(ppl)})
        log.info("tune: trial %s val_mse %.4g -> eval perplexity %s (base %s)", row["trial_id"],
                 row["val_mse"], {t: round(p, 3) for t, p in ppl.items()},
                 {t: round(p, 3) for t, p in base.items()})
    return out


def objectives_searched(cfg: PipelineConfig) -> list[str]:
    """The end-to-end objectives of the second phase (the configured one always included)."""
    return [o for o in _choices(cfg.tune.objectives, cfg.generator.objective) if o != "reconstruction"]


def objective_trainable(config: dict[str, Any], data: PreparedData, base: dict[str, Any],
                        start: dict[str, Any], lm_data: dict[str, Any], scorer: ValidationScorer) -> None:
    """One objective-search trial: the best reconstruction trial's network (``start``, with its
    hyperparameters in ``base``) fine-tuned by ``config["objective"]``, checkpointed every
    ``report_every`` LM steps, then scored by validation perplexity."""
    import torch

    from icm.generator.lm import fit_lm, hybrid_term, lm_setup

    use_reserved_cpus()
    cfg = GeneratorConfig.model_validate({**base, "objective": config["objective"]})
    generator = generator_from_state(data, cfg, start)
    setup = lm_setup(generator, scorer.model_cfg, lm_data["texts"], lm_data["conditions"], cfg,
                     prompts=lm_data["prompts"])
    resume = None
    if (checkpoint := tune.get_checkpoint()) is not None:
        with checkpoint.as_directory() as folder:
            resume = torch.load(Path(folder) / LM_STATE_FILE, weights_only=False)

    def report(metrics: dict, state: dict) -> None:
        with tempfile.TemporaryDirectory() as folder:
            torch.save(state, Path(folder) / LM_STATE_FILE)
            tune.report({k: v for k, v in metrics.items() if v is not None},
                        checkpoint=tune.Checkpoint.from_directory(folder))

    fit_lm(generator, setup.applier, setup.tasks, cfg, pad_id=setup.pad_id,
           reconstruction=hybrid_term(cfg, lambda: data), report=report, resume_state=resume)
    ppl = scorer.generator_perplexities(generator)
    tune.report({"val_log_perplexity": mean_log(ppl), "perplexity": ppl, "lm_step": cfg.lm_steps})


def objective_search(cfg: PipelineConfig, suite: Suite, data: PreparedData, inputs: GeneratorInputs,
                     scorer: ValidationScorer, start_row: dict, objectives: list[str],
                     storage: str) -> list[dict]:
    """Phase two: ``start_row``'s generator fine-tuned by each end-to-end objective (a Tune grid)."""
    from jobs.generator_lm import lm_train_prompts, lm_train_texts

    base = trial_config(cfg.generator.model_dump(mode="json"), start_row["params"])
    train = list(data.split.train_tasks)  # never a validation or held-out task
    lm_data = {"texts": lm_train_texts(suite, train, base.lm_max_texts),
               "conditions": {t: inputs.conditions[t] for t in train},
               "prompts": lm_train_prompts(cfg, base, suite, train)}
    with start_row["checkpoint"].as_directory() as folder:
        start = load_checkpoint(folder)["model"]
    fn = tune.with_resources(tune.with_parameters(
        objective_trainable, data=data, base=base.model_dump(mode="json"), start=start,
        lm_data=lm_data, scorer=scorer), {"cpu": cfg.tune.cpus_per_trial})
    path = join(storage, OBJECTIVE_EXPERIMENT)
    log.info("tune: fine-tuning trial %s by %s (%d LM steps each)", start_row["trial_id"],
             objectives, base.lm_steps)
    if tune.Tuner.can_restore(path):
        tuner = tune.Tuner.restore(path, trainable=fn, resume_errored=True)
    else:
        tuner = tune.Tuner(fn, param_space={"objective": tune.grid_search(objectives)},
                           tune_config=tune.TuneConfig(max_concurrent_trials=cfg.tune.max_concurrent),
                           run_config=tune.RunConfig(
                               name=OBJECTIVE_EXPERIMENT, storage_path=storage, verbose=1 if verbose() else 0,
                               checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
                               failure_config=tune.FailureConfig(max_failures=1)))
    rows = []
    for result in tuner.fit():
        metrics = result.metrics or {}
        if result.error is not None or "val_log_perplexity" not in metrics:
            log.warning("tune: objective trial %s failed: %s", result.config, result.error)
            continue
        objective = result.config["objective"]
        rows.append({"trial_id": start_row["trial_id"], "objective": objective,
                     "params": {**start_row["params"], "objective": objective},
                     "perplexity": metrics["perplexity"], "mean_log_perplexity": metrics["val_log_perplexity"],
                     "lm_steps": metrics["lm_step"], "lm_tasks": sorted(lm_data["texts"])})
        log.info("tune: trial %s + %s -> eval perplexity %s", start_row["trial_id"], objective,
                 {t: round(p, 3) for t, p in metrics["perplexity"].items()})
    return rows


def _write_outputs(directory: Path, cfg: PipelineConfig, data: PreparedData, rows, rescored) -> dict:
    """``rescored``: every candidate scored by validation perplexity (re-scored trials, and
    their end-to-end fine-tunes); the lowest wins, else the lowest val_mse."""
    import pandas as pd

    chosen = min(rescored, key=lambda r: r["mean_log_perplexity"]) if rescored else None
    best_id = chosen["trial_id"] if chosen else rows[0]["trial_id"]
    best = next(r for r in rows if r["trial_id"] == best_id)
    params = chosen["params"] if chosen else best["params"]
    gen_cfg = trial_config(cfg.generator.model_dump(mode="json"), params)
    frame = pd.DataFrame([{k: v for k, v in r.items() if k != "checkpoint"}
                          | {"params": json.dumps(r["params"])} for r in rows])
    write_bytes_atomic(directory / "trials.parquet", frame.to_parquet(index=False))
    rep = data.representation(gen_cfg)
    record = {"trial_id": best_id, "selected_by": "perplexity" if rescored else METRIC,
              "objective": gen_cfg.objective, "hyperparameters": params,
              "generator_config": gen_cfg.model_dump(mode="json"),
              "metrics": {k: best[k] for k in ("val_mse", "val_seen_mse", "val_unseen_mse", "steps")},
              "rescored": rescored, "baselines": rep.baselines, "representation": rep.info,
              "compute": {"trials": len(rows), "samples": sum(r["samples"] for r in rows),
                          "full_budget_samples": len(rows) * cfg.generator.steps * cfg.generator.batch_size,
                          "objective_trials": sum(1 for r in rescored if r["objective"] != "reconstruction")}}
    write_json_atomic(directory / "best_config.json", record)
    return record


def run(cfg: PipelineConfig, suite: Suite, *, inputs: GeneratorInputs | None = None) -> dict:
    """The ``tune`` stage (skipped when up to date). ``inputs`` default to the stored zoo + task vectors."""
    pull_stages(cfg, "zoo", "task_vectors")  # a URI root: the inputs, into the local mirror
    inputs = inputs or load_generator_inputs(cfg, suite)
    # Scheduling knobs change nothing that is searched: a resumed search may use other values.
    knobs = cfg.tune.model_dump(mode="json", exclude={"max_concurrent", "cpus_per_trial"})
    generator = cfg.generator.trained_settings()
    fold_groups = sorted({group for fold in suite_folds(suite, cfg.evaluate) for group in fold})
    current = stage(cfg, "tune", inputs.fingerprint(), generator, knobs, fold_groups,
                    cfg.evaluate.max_length, cfg.evaluate.batch_size, sections=("model",))
    if current.is_current():
        log.info("tune: up to date, skipping (%s)", current.directory)
        return current.record()
    # The fold generators reuse the hyperparameters chosen here: no validation task of a fold's group.
    data = prepare_data(inputs.zoo, inputs.conditions, cfg.generator, validation=True, archs=cfg.tune.archs,
                        init_state=inputs.init_state, condition_spec=inputs.condition_spec,
                        val_excluded=fold_tasks(suite, fold_groups))
    split = {"train_tasks": list(data.split.train_tasks), "val_tasks": list(data.split.val_tasks),
             "val_snapshots_per_task": data.split.val_snapshots, "heldout_excluded": list(suite.heldout),
             "fold_groups_not_validated_on": fold_groups}
    end_to_end = objectives_searched(cfg)
    check_selection_tasks(cfg, data.split.val_tasks)
    started = current.begin(cfg)
    write_json_atomic(current.directory / "split.json", split)
    log.info("tune: %d trials over %s; train tasks %s, validation tasks %s", cfg.tune.num_samples,
             cfg.tune.archs, split["train_tasks"], split["val_tasks"])
    init_ray(cfg.ray, cache_dir=cfg.model.cache_dir)
    rows = trial_rows(search(cfg, data, cfg.storage.uri("tune", RAY_DIR), current.fingerprint))
    finite = [r for r in rows if math.isfinite(r["val_mse"])]  # diverged trials are not candidates
    top = max(cfg.tune.rescore_top, 1 if end_to_end else 0)  # the objectives compare by perplexity
    scorer = (ValidationScorer(cfg, suite, data, load_both_means(cfg, data.split.val_tasks))
              if top else None)  # top > 0: validation tasks exist (check_selection_tasks)
    rescored = rescore(scorer, data, cfg.generator, finite[:top]) if top else []
    if end_to_end:
        start = min(rescored, key=lambda r: r["mean_log_perplexity"])
        start_row = next(r for r in finite if r["trial_id"] == start["trial_id"])
        rescored += objective_search(cfg, suite, data, inputs, scorer, start_row, end_to_end,
                                     cfg.storage.uri("tune", RAY_DIR))
    record = _write_outputs(current.directory, cfg, data, rows, rescored)
    return current.finish(started, {"best_config": "tune/best_config.json", "trials": len(rows),
                                    "best_trial": record["trial_id"], "selected_by": record["selected_by"],
                                    "objective": record["objective"],
                                    "best_val_mse": record["metrics"]["val_mse"], **split})


@user_errors_exit_2
def main(argv: Sequence[str] | None = None) -> int:
    cfg = parse_job_args(__doc__.split("\n\n")[0], argv)
    ensure_writable_root(cfg)
    if not cfg.tune.enabled:
        print("tune: tune.enabled is false; nothing to search (the generator stage uses `generator`).")
        return 0
    out = run(cfg, open_suite(cfg))["outputs"]
    best = json.loads(cfg.storage.path("tune", "best_config.json").read_text())
    print(f"tune: {out['trials']} trials; best {out['best_trial']} (by {out['selected_by']}, val_mse "
          f"{out['best_val_mse']:.4g}): {best['hyperparameters']} -> "
          f"{cfg.storage.path('tune', 'best_config.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
