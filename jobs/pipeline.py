"""The main job: every stage of icm-ray, in order, on a local Ray it starts itself (or a cluster).

    python -m jobs.pipeline --config demo [key=value ...]      (same as: icm run --config demo)

Stages, in order: ``prepare`` (model cache + suite validation) -> ``base_eval`` (base-model
perplexity / bits per char) -> ``zoo`` (a LoRA per training task, Ray Train + DeepSpeed) ->
``oracles`` (measurement-only LoRAs for held-out tasks and seen-task replicates) ->
``task_vectors`` (frozen base LM over in-context episodes, Ray Data) -> ``tune`` (generator
hyperparameter search, Ray Tune; skipped when ``tune.enabled=false``) -> ``generator`` (the
conditional VAE over LoRA weights) -> ``evaluate`` (generated adapters vs trained LoRAs and
baselines, on every task, seen and held out). ``stages=[...]`` picks a subset (in this order).
Each stage writes under ``<storage.root>/<stage>/`` and is skipped when its ``stage.json`` matches
the config and its inputs, so a killed run resumes by running the same command again.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from collections.abc import Sequence

import pandas as pd

from icm.config import PipelineConfig, save_resolved_config
from icm.io import write_text_atomic
from icm.models import load_base_model, resolve_spec
from icm.stages import open_suite, push_local, stage
from icm.tasks import Suite, format_stats_table, validate_suite
from jobs import base_eval, evaluate, generator, oracles, task_vectors, tune, zoo
from jobs.common import ensure_writable_root, parse_job_args, user_errors_exit_2
from jobs.ray_setup import init_ray

log = logging.getLogger("jobs.pipeline")


def run_prepare(config: PipelineConfig, suite: Suite) -> dict:
    """Make sure the base model loads (converting its cache once) and the suite is valid."""
    current = stage(config, "prepare", suite.fingerprint(), sorted(suite.tasks),
                    sections=("model", "suite"))
    if current.is_current():
        log.info("prepare: up to date, skipping")
        return current.record()
    started = current.begin(config)
    model, tokenizer = load_base_model(config.model.spec, cache_dir=config.model.cache_dir,
                                       dtype=config.model.dtype, device="cpu")  # a load check
    count = lambda texts: sum(map(len, tokenizer(texts, add_special_tokens=False)["input_ids"]))  # noqa: E731
    stats = validate_suite(suite, count_tokens=count)
    table = format_stats_table(stats)
    write_text_atomic(current.directory / "suite.txt", f"suite {suite.name} at {suite.path}\n{table}\n")
    log.info("suite %s (%d tasks, %d held out) is valid", suite.name, len(suite.tasks), len(suite.heldout))
    return current.finish(started, {
        "suite_path": str(suite.path), "suite_fingerprint": suite.fingerprint(),
        "tasks": sorted(suite.tasks), "heldout": list(suite.heldout),
        "model": vars(resolve_spec(config.model.spec)),
        "model_parameters": sum(p.numel() for p in model.parameters())})


@user_errors_exit_2
def main(argv: Sequence[str] | None = None) -> int:
    started = time.perf_counter()
    config = parse_job_args(__doc__.split("\n\n")[0], argv)
    root = ensure_writable_root(config)
    push_local(config, save_resolved_config(config, root))
    suite = open_suite(config)
    log.info("run %r -> %s; suite %s, %d tasks", config.name, config.storage.uri(), suite.path, len(suite.tasks))

    timings = {"prepare": _timed(run_prepare, config, suite)}
    init_ray(config.ray, cache_dir=config.model.cache_dir)
    command = "icm run " + " ".join(sys.argv[1:] if argv is None else argv)
    chosen = [name for name in STAGES if name in config.stages and (name != "tune" or config.tune.enabled)]
    for index, name in enumerate(chosen, start=1):
        log.info("[%d/%d] %s", index, len(chosen), name)  # one header line per stage
        kwargs = {"command": command} if name == "evaluate" else {}
        timings[name] = _timed(STAGES[name].run, config, suite, **kwargs)
    _print_summary(config, suite, root, timings, time.perf_counter() - started)
    return 0


# Stage name -> its job module, jobs.<stage name>: one name everywhere.
STAGES = {"base_eval": base_eval, "zoo": zoo, "oracles": oracles, "task_vectors": task_vectors,
          "tune": tune, "generator": generator, "evaluate": evaluate}


def _timed(function, *args, **kwargs) -> float:
    started = time.perf_counter()
    function(*args, **kwargs)
    return time.perf_counter() - started


def _print_summary(config: PipelineConfig, suite: Suite, root, timings: dict, total: float) -> None:
    print("\nStage wall times (s, 0 = up to date): "
          + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()))
    if "base_eval" in timings:
        results = pd.read_parquet(config.storage.path("base_eval", "results.parquet"))
        print(f"\nBase model {config.model.spec} on suite {suite.name} (eval split, per group):")
        print(base_eval.group_summary(results).to_markdown(index=False, floatfmt=".3f"))
    results = config.storage.path("evaluate", "results.parquet")
    if "evaluate" in timings and results.is_file():
        from icm.eval.report import headline_numbers

        print("\nGenerated adapters on unseen tasks (full tables with intervals: evaluate/EVAL.md):")
        numbers = headline_numbers(pd.read_parquet(results))
        print("\n".join(f"  {k}: {v:.3f}" for k, v in numbers.items() if math.isfinite(v)))  # no folds: none
    print(f"\nArtifacts under {config.storage.uri()}: " + ", ".join(
        name for name in ("prepare/suite.txt", "base_eval/summary.md", "zoo/manifest.parquet", "oracles/manifest.parquet",
                          "task_vectors/projection.png", "tune/best_config.json", "generator/",
                          "evaluate/EVAL.md") if (root / name).exists())
          + f". Done in {total:.1f} s.")


if __name__ == "__main__":
    sys.exit(main())
