"""Evaluate generated adapters against oracles and the strongest baselines, on Ray.

    python -m jobs.evaluate --config study [key=value ...]      (or: icm evaluate ...)

Settings (``icm/eval/inputs.py``): the fixed held-out set against oracle LoRAs (the ``oracles``
stage), group folds (``evaluate.folds``: a generator refit per fold without any task of the
fold's groups, baselines rebuilt from the fold's training tasks; folds alone need no main
generator, `main_generator_record`), and seen tasks against their own zoo LoRA with lookup and
replicate controls. Variants come from the registry in
``icm/eval/variants.py``. One Ray task per (task, setting) loads the base model once and
scores every variant on the task's eval texts, storing per-text NLL; each finished item is
written at once, so a killed evaluation resumes where it stopped. Writes
``<storage.root>/evaluate/``: ``results.parquet`` (one row per task x setting x variant x
sample), ``EVAL.md`` (intervals from a paired bootstrap over tasks and texts), ``per_task.png``,
``folds/fold-K/generator/`` (the fold generators), ``config.resolved.yaml``, ``stage.json``.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
import ray
import yaml

from icm.config import EvalConfig, GeneratorConfig, PipelineConfig, shareable_dump
from icm.eval.folds import fold_suite, fold_tasks, suite_folds
from icm.eval.inputs import MODES, SettingPlan, build_items
from icm.eval.report import markdown_report, plot_per_task
from icm.eval.scoring import evaluate_item
from icm.eval.variants import baseline_names, reads_generator, variants_for
from icm.errors import InputError
from icm.io import (fingerprint_matches, sha256_json, write_bytes_atomic, write_json_atomic,
                    write_text_atomic)
from icm.progress import Progress
from icm.stages import open_suite, pull_stages, stage
from icm.tasks import Suite
from icm.zoo import replicate_tasks
from jobs.common import ensure_writable_root, parse_job_args, user_errors_exit_2
from jobs.generator import PLANNED, RECONSTRUCTED, build_generator
from jobs.ray_setup import as_completed, cpus_each, init_ray, with_reserved_threads

log = logging.getLogger("jobs.evaluate")
ROWS_DIR = "rows"  # one parquet per finished (setting, task): what a resumed run skips


def _upstream(cfg: PipelineConfig, name: str, *, required: bool = True) -> dict | None:
    path = cfg.storage.path(name) / "stage.json"
    if not path.is_file():
        if not required:
            return None
        raise InputError(f"stage '{name}' has no finished output under {cfg.storage.path(name)}. "
                         f"Fix: run it first (icm run --config ... runs every stage in order).")
    return json.loads(path.read_text())


def load_task_means(cfg: PipelineConfig, tasks: Sequence[str], pooling: str | None = None) -> dict:
    """mode -> task -> (D,) task-mean vector, at the generator's layer and ``pooling`` (default:
    the generator's)."""
    from icm.task_vectors import load_task_means as load

    g = cfg.generator
    return {mode: load(cfg.storage.path("task_vectors"), mode=mode, layer=g.condition_layer,
                       pooling=pooling or g.condition_pooling, tasks=tasks)
            for mode in MODES if mode in cfg.task_vectors.modes}


# ----------------------------------------------------------------------------- fold generators


def train_fold_generator(config: dict, generator_config: dict, suite: Suite,
                         held_groups: list[str], out: str, fingerprint: str) -> dict:
    """Ray task: a generator trained by reconstruction without any task of ``held_groups``,
    as the main one is: checkpointed beside ``out`` (a rerun with the same ``fingerprint``
    resumes) and written atomically."""
    summary = build_generator(config, generator_config, fold_suite(suite, held_groups), None,
                              fingerprint, out=out, work=f"{out}-checkpoint")
    return {"trained_on": sorted(summary["trained_on"]["tasks"]), "held_groups": held_groups}


def main_generator_record(cfg: PipelineConfig, suite: Suite) -> dict:
    """The generator stage's record. When that stage has not run and this evaluation scores
    folds only (no held-out set, no seen tasks), the record it will have once trained
    (`jobs.generator.planned_record`): the fold generators derive their settings and
    fingerprints from it, so they need no main generator first, and a later main generator
    with the same inputs leaves them, and this stage, up to date."""
    recorded = _upstream(cfg, "generator", required=False)
    if recorded is not None:
        return recorded
    if _scores_main_generator(cfg, suite):
        raise InputError(
            f"stage 'generator' has no finished output under {cfg.storage.path('generator')}, and "
            f"the held-out set or seen tasks read it. Fix: run it first (add 'generator' to "
            f"stages), or score the folds alone: evaluate.heldout=false evaluate.seen_tasks=0.")
    from jobs.generator import planned_record

    log.info("evaluate: folds only and no main generator trained: the folds follow its settings")
    return planned_record(cfg, suite)


def _scores_main_generator(cfg: PipelineConfig, suite: Suite) -> bool:
    """Whether a setting this run scores reads the main generator: held-out or seen."""
    has_oracles = _upstream(cfg, "oracles", required=False) is not None
    heldout = scores_heldout(cfg.evaluate, suite, has_oracles=has_oracles, warn=False)
    return heldout or bool(_seen_tasks(cfg, suite))


def _seen_tasks(cfg: PipelineConfig, suite: Suite) -> list[str]:
    """The seen tasks scored (`evaluate.seen_tasks`; None: every training task)."""
    count = cfg.evaluate.seen_tasks
    count = len(suite.training_tasks()) if count is None else count
    return [t.name for t in replicate_tasks(suite, count)]


def _generator_config(cfg: PipelineConfig, main_record: dict) -> dict:
    """The main generator's hyperparameters (Tune's winner when Tune ran), for every fold."""
    if main_record.get(PLANNED):
        chosen = main_record["config"]
    else:
        recorded = json.loads((cfg.storage.path("generator") / "generator.json").read_text())
        chosen = recorded.get("config") or cfg.generator.model_dump(mode="json")
    return {**chosen, "cpus_per_task": cfg.generator.cpus_per_task}  # scheduling: this run's


def fold_generators(cfg: PipelineConfig, suite: Suite, folds: list[list[str]], directory: Path,
                    main_record: dict) -> list[str]:
    """Train (or reuse: same fingerprint) one generator per fold; returns their folders. With
    ``generator.objective`` lm/hybrid each is trained by reconstruction into
    ``fold-K/reconstruction`` and then fine-tuned on Ray Train like the main generator, from
    the fold's training tasks only, several folds at once where the cluster holds them.
    ``main_record``: the main generator's record (`main_generator_record`)."""
    gen_cfg = GeneratorConfig.model_validate(_generator_config(cfg, main_record))
    end_to_end = gen_cfg.objective != "reconstruction"
    todo, folders = [], []
    for index, groups in enumerate(folds):
        out = directory / f"fold-{index}"
        folders.append(str(out / "generator"))
        fingerprint, marker = fold_fingerprint(cfg, gen_cfg, groups, main_record), out / "fold.json"
        if not main_record.get(PLANNED):  # no fold can predate a planned fingerprint
            _migrate_fold_marker(cfg, gen_cfg, marker, groups, fingerprint)
        if not fingerprint_matches(marker, fingerprint):
            keys = fold_phase_keys(cfg, gen_cfg, groups, fingerprint, main_record)
            todo.append((out / ("reconstruction" if end_to_end else "generator"),
                         (marker, fingerprint, index, keys)))
    reconstructed = _reconstruct_folds(cfg, gen_cfg, suite, folds, todo, mark=end_to_end)
    if end_to_end and reconstructed:  # the same end-to-end fine-tuning as the main generator
        _finetune_folds(cfg, gen_cfg, suite, folds, directory, reconstructed)
    elif not end_to_end:
        for fold in reconstructed:
            _fold_done(*fold[:4])  # (summary, marker, fingerprint, index); its keys are spent
    return folders


def fold_fingerprint(cfg: PipelineConfig, gen_cfg: GeneratorConfig, groups: list[str],
                     main_record: dict | None = None) -> str:
    """What the generator of the fold holding out ``groups`` is a function of: the main generator
    stage's fingerprint (the zoo's training snapshots, their condition vectors, the generator's
    settings and LM tasks) and, with ``generator.lm_anchor: multitask``, the oracles stage (the
    fold's multi-task LoRA). Not the zoo's or task vectors' whole stage fingerprints: turning on
    the zoo's multi-task LoRA, or a pooling the generator does not read, changes no input of it.
    ``main_record``: the main generator's record (default: its stage.json)."""
    main_record = main_record or _upstream(cfg, "generator")
    return sha256_json([[main_record["fingerprint"], *_anchor_inputs(cfg, gen_cfg)], groups])


def _anchor_inputs(cfg: PipelineConfig, gen_cfg: GeneratorConfig) -> list[str]:
    """With ``generator.lm_anchor: multitask`` a fold's fine-tune also reads the oracles stage
    (the fold's multi-task LoRA): its fingerprint; otherwise nothing."""
    return [_upstream(cfg, "oracles")["fingerprint"]] if gen_cfg.lm_anchor == "multitask" else []


def fold_phase_keys(cfg: PipelineConfig, gen_cfg: GeneratorConfig, groups: list[str],
                    fingerprint: str, main_record: dict) -> dict[str, str]:
    """The fold's own reconstruction and LM-run keys, derived from the main generator's
    (`jobs.generator.phase_keys`): a rerun that changes only LM settings reuses the fold's
    reconstruction, and one asked for more LM steps continues its fine-tune. A main generator
    stage recorded before those keys (2026-12-05) has none: both are then the fold's fingerprint."""
    keys = (main_record.get("outputs") or {}).get("phase_keys")
    if not keys:
        return {"reconstruction": fingerprint, "lm_run": fingerprint}
    return {"reconstruction": sha256_json([[keys["reconstruction"]], groups]),
            "lm_run": sha256_json([[keys["lm_run"], *_anchor_inputs(cfg, gen_cfg)], groups])}


def _migrate_fold_marker(cfg: PipelineConfig, gen_cfg: GeneratorConfig, marker: Path, groups: list[str],
                         fingerprint: str) -> None:
    """A fold generator finished under the fingerprint used up to 2026-12-05 (the zoo's, task
    vectors' and generator's stage fingerprints, same inputs) is kept: its marker is rewritten.
    Not with lm_anchor: multitask, which that fingerprint did not cover."""
    if gen_cfg.lm_anchor == "multitask" or not marker.is_file():
        return
    legacy = sha256_json([[_upstream(cfg, n)["fingerprint"] for n in ("zoo", "task_vectors", "generator")],
                          groups])
    if fingerprint_matches(marker, legacy):
        write_json_atomic(marker, {**json.loads(marker.read_text()), "fingerprint": fingerprint})
        log.info("evaluate: %s, finished under the previous fold fingerprint, is kept", marker.parent.name)


def _reconstruct_folds(cfg: PipelineConfig, gen_cfg: GeneratorConfig, suite: Suite,
                       folds: list[list[str]], todo: list[tuple], *, mark: bool) -> list[tuple]:
    """Train each fold generator of ``todo`` (its folder, (marker, fingerprint, index, keys)) by
    reconstruction, side by side, each with its share of the CPUs. With ``mark`` (lm/hybrid,
    fine-tuned next) a finished one is marked with its reconstruction key, so that neither a kill
    during the fine-tunes nor a change of LM settings redoes it. Returns (summary, marker,
    fingerprint, index, keys) per fold, in fold order."""
    done = [(json.loads((first / RECONSTRUCTED).read_text())["summary"], *meta) for first, meta in todo
            if mark and fingerprint_matches(first / RECONSTRUCTED, meta[3]["reconstruction"])]
    reused = {fold[3] for fold in done}
    todo = [(first, meta) for first, meta in todo if meta[2] not in reused]
    remote = ray.remote(num_cpus=gen_cfg.cpus_per_task or cpus_each(len(todo)))(
        with_reserved_threads(train_fold_generator))
    pending = {remote.remote(cfg.model_dump(mode="json"), gen_cfg.model_dump(mode="json"), suite,
                             folds[meta[2]], str(first), meta[3]["reconstruction"]): (first, meta)
               for first, meta in todo}
    for summary, (first, meta) in zip(ray.get(list(pending)), pending.values()):
        if mark:
            write_json_atomic(first / RECONSTRUCTED, {"fingerprint": meta[3]["reconstruction"],
                                                      "summary": summary})
        done.append((summary, *meta))
    if mark and len(done) > len(pending):
        log.info("evaluate: %d fold reconstructions reused, %d trained", len(done) - len(pending),
                 len(pending))
    return sorted(done, key=lambda fold: fold[3])


def _fold_done(summary: dict, marker: Path, fingerprint: str, index: int) -> None:
    """Mark fold ``index``'s generator finished: a rerun with the same fingerprint reuses it."""
    write_json_atomic(marker, {"fingerprint": fingerprint, **summary})
    log.info("evaluate: fold %d generator trained on %d tasks (held out: %s)", index,
             len(summary["trained_on"]), ", ".join(summary["held_groups"]))


def _finetune_folds(cfg: PipelineConfig, gen_cfg: GeneratorConfig, suite: Suite,
                    folds: list[list[str]], directory: Path, reconstructed: list[tuple]) -> None:
    """Fine-tune each reconstructed fold generator (summary, marker, fingerprint, index, keys) on
    Ray Train, as many at once as the cluster holds side by side; a fold is marked done as soon as
    its fine-tune returns, so a kill loses only the fine-tunes in flight (and those resume
    from their checkpoints)."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from jobs.generator_lm import finetune_concurrency, finetune_task, lm_worker_cpus

    # On the driver's node: the fold folders are the driver's, as for the main generator.
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    launcher = ray.remote(num_cpus=0, scheduling_strategy=here)(finetune_task)
    cpus = lm_worker_cpus(gen_cfg, side_by_side=len(reconstructed))
    concurrency = finetune_concurrency(gen_cfg, ray.cluster_resources(), cpus)
    log.info("evaluate: fine-tuning %d fold generators, %d at a time, %g CPUs per worker",
             len(reconstructed), concurrency, cpus)

    def submit(job: tuple):
        _, _, _, index, keys = job
        out = directory / f"fold-{index}"
        return launcher.remote(cfg.model_dump(mode="json"), gen_cfg.model_dump(mode="json"),
                               fold_suite(suite, folds[index]), str(out / "reconstruction"),
                               keys["lm_run"], str(out / "generator"), index,  # anchor: the fold's
                               folds[index], cpus)  # no extra LM task of the fold's groups either

    for job, tuned in as_completed(submit, reconstructed, concurrency):
        log.info("evaluate: fold %d generator fine-tuned (%s) in %.0f s", job[3], gen_cfg.objective,
                 tuned["wall_seconds"])
        _fold_done(*job[:4])


# ----------------------------------------------------------------------------- plans and items


def scores_heldout(e: EvalConfig, suite: Suite, *, has_oracles: bool, warn: bool = True) -> bool:
    """Whether the fixed held-out set is scored: asked for (``evaluate.heldout``), the suite has
    one, and the oracles stage ran (with ``warn``, a warning says so when it did not)."""
    if not (e.heldout and suite.heldout):
        return False
    if not has_oracles and warn:
        log.warning("evaluate: no oracles stage output; held-out tasks are not scored (add "
                    "'oracles' to stages)")
    return has_oracles


def plans_for(cfg: PipelineConfig, suite: Suite, directory: Path,
              main_record: dict) -> tuple[list[SettingPlan], list]:
    """The settings this run scores: held-out (when oracles exist), folds, seen. ``main_record``:
    the main generator's record (`main_generator_record`)."""
    e, main_generator = cfg.evaluate, str(cfg.storage.path("generator").resolve())
    training = [t.name for t in suite.training_tasks()]
    plans = []
    if scores_heldout(e, suite, has_oracles=bool(_upstream(cfg, "oracles", required=False))):
        plans.append(SettingPlan("heldout", list(suite.heldout), training, main_generator))
    folds = suite_folds(suite, e)
    fold_dirs = _fold_generator_dirs(cfg, suite, folds, directory, main_record)
    for index, (groups, folder) in enumerate(zip(folds, fold_dirs)):
        held = set(fold_tasks(suite, groups))
        plans.append(SettingPlan("fold", sorted(held), [t for t in training if t not in held],
                                 folder, fold=index))
    if seen := _seen_tasks(cfg, suite):
        plans.append(SettingPlan("seen", seen, training, main_generator))
    return plans, folds


def _fold_generator_dirs(cfg: PipelineConfig, suite: Suite, folds: list[list[str]],
                         directory: Path, main_record: dict) -> list[str | None]:
    """Each fold's generator folder, trained (or reused) only when a variant chosen for the folds
    reads it: a baseline-only evaluation trains no fold generator (None)."""
    chosen = variants_for("fold", cfg.evaluate.variants, cfg.evaluate.extra_variants)
    if not folds or any(reads_generator(v) for v in chosen):
        return fold_generators(cfg, suite, folds, directory / "folds", main_record)
    log.info("evaluate: no variant chosen for the folds reads a generator (%s): no fold generator "
             "is trained", ", ".join(v.name for v in chosen) or "none")
    return [None] * len(folds)


def _item_file(directory: Path, item) -> Path:
    fold = "" if item.fold is None else str(item.fold)
    return directory / ROWS_DIR / f"{item.setting}{fold}--{item.task}.parquet"


def _perplexities(by_variant: pd.Series, baselines: set[str]) -> str:
    """One item's result line: the variants it scored (a generated-only run has no base)."""
    parts = [f"{name} {by_variant[name]:.2f}" for name in ("base", "oracle", "generated")
             if name in by_variant.index]
    if scored := [by_variant[v] for v in by_variant.index if v in baselines]:
        parts.append(f"best baseline {min(scored):.2f}")
    return "  ".join(parts)


def run(cfg: PipelineConfig, suite: Suite, *, command: str = "python -m jobs.evaluate") -> dict:
    pull_stages(cfg, "zoo", "oracles", "task_vectors", "generator")  # a URI root: into the mirror
    records = [_upstream(cfg, name, required=name != "oracles")
               for name in ("zoo", "oracles", "task_vectors")]
    main_record = main_generator_record(cfg, suite)  # planned, for a fold-only run without one
    upstream = [(r or {}).get("fingerprint") for r in (*records, main_record)]
    current = stage(cfg, "evaluate", suite.fingerprint(), sorted(suite.tasks), upstream,
                    sections=("model", "evaluate", "task_vectors"))
    if current.is_current():
        log.info("evaluate: up to date, skipping (%s)", current.directory)
        return current.record()
    init_ray(cfg.ray, cache_dir=cfg.model.cache_dir)
    started = current.begin(cfg)
    marker = current.directory / ROWS_DIR / "fingerprint.json"
    if not fingerprint_matches(marker, current.fingerprint):
        for old in (current.directory / ROWS_DIR).glob("*.parquet"):  # another config's rows
            old.unlink()
        write_json_atomic(marker, {"fingerprint": current.fingerprint})
    plans, folds = plans_for(cfg, suite, current.directory, main_record)
    means = load_task_means(cfg, sorted(suite.tasks))
    baseline_pooling = cfg.evaluate.baseline_pooling
    baseline_means = (load_task_means(cfg, sorted(suite.tasks), baseline_pooling)
                      if baseline_pooling not in (None, cfg.generator.condition_pooling) else None)
    items, record, finals = build_items(
        suite, plans, means, baseline_means=baseline_means,
        zoo_root=cfg.storage.path("zoo"), oracle_root=cfg.storage.path("oracles"),
        options={"soup_k": cfg.evaluate.soup_k, "soup_temperature": cfg.evaluate.soup_temperature},
        variant_names=cfg.evaluate.variants, extra_variants=cfg.evaluate.extra_variants)
    results = _score_items(cfg, current.directory, items, finals)
    return _write_outputs(cfg, current, started, results, command,
                          {**record, "folds": folds, "settings": [vars(p) for p in plans]})


def _score_items(cfg: PipelineConfig, directory: Path, items: list, finals: dict) -> pd.DataFrame:
    """Every item on Ray, a few in flight at once (each holds its adapters' arguments)."""
    remote = ray.remote(num_cpus=cfg.evaluate.cpus_per_task,
                        num_gpus=cfg.evaluate.gpus_per_task)(with_reserved_threads(evaluate_item))
    finals_ref = ray.put(finals)
    todo = [item for item in items if not _item_file(directory, item).is_file()]
    log.info("evaluate: %d items (%d done before), %s", len(items), len(items) - len(todo),
             ", ".join(f"{s} {sum(i.setting == s for i in items)}" for s in ("heldout", "fold", "seen")))
    limit = max(2, int(ray.cluster_resources().get("CPU", 2) // cfg.evaluate.cpus_per_task) + 1)
    done, baselines = len(items) - len(todo), set(baseline_names())
    progress = Progress("evaluate", len(items), "items", initial=done)

    def submit(item):
        return remote.remote(item, finals_ref, model=cfg.model, cfg=cfg.evaluate,
                             task_vectors=cfg.task_vectors)

    for item, result in as_completed(submit, todo, limit):
        rows = pd.DataFrame(result)
        write_bytes_atomic(_item_file(directory, item), rows.to_parquet(index=False))
        done += 1
        progress.update(done)
        log.info("evaluate %d/%d %-7s %-26s %s", done, len(items),
                 item.setting + ("" if item.fold is None else str(item.fold)), item.task,
                 _perplexities(rows.groupby("variant")["perplexity"].mean(), baselines))
    progress.close()
    files = [_item_file(directory, item) for item in items]
    return pd.concat([pd.read_parquet(f) for f in files], ignore_index=True)


def _write_outputs(cfg: PipelineConfig, current, started: float, results: pd.DataFrame,
                   command: str, record: dict) -> dict:
    out = current.directory
    write_bytes_atomic(out / "results.parquet", results.to_parquet(index=False))
    write_json_atomic(out / "baselines.json", record)
    plot_per_task(results, out / "per_task.png")
    report = markdown_report(results, command=command, title=f"icm-ray evaluation: run {cfg.name!r}",
                             config_yaml=yaml.safe_dump(shareable_dump(cfg), sort_keys=False),
                             resamples=cfg.evaluate.bootstrap, seed=cfg.evaluate.seed,
                             folds=record["folds"])
    write_text_atomic(out / "EVAL.md", report)
    return current.finish(started, {"results": "results.parquet", "report": "EVAL.md",
                                    "tasks": int(results["task"].nunique()), "rows": len(results)})


@user_errors_exit_2
def main(argv: Sequence[str] | None = None) -> int:
    cfg = parse_job_args(__doc__.split("\n\n")[0], argv)
    ensure_writable_root(cfg)
    started = time.perf_counter()
    record = run(cfg, open_suite(cfg), command="python -m jobs.evaluate " + " ".join(argv or sys.argv[1:]))
    print(f"evaluate: {record['outputs']['tasks']} tasks in {time.perf_counter() - started:.1f} s -> "
          f"{cfg.storage.path('evaluate', 'EVAL.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
