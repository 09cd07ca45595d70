"""Evaluate generated adapters against the base model, trained LoRAs and baselines, on Ray.

    python -m jobs.evaluate --config demo [key=value ...]      (or: icm eval-all ...)

One Ray task per suite task (``evaluate.cpus_per_task`` CPUs, ``gpus_per_task`` GPUs) loads the
base model once and scores every variant (see ``icm/eval_task.py``) on the task's eval split.
Needs the zoo, task-vector and generator stages. Writes ``<storage.root>/evaluate/``:
``results.parquet`` (one row per task x variant x sample), ``per_task.parquet``, ``EVAL.md``,
``per_task.png``, ``gap_by_group.png``, ``config.resolved.yaml``, ``stage.json``.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Sequence

import pandas as pd
import ray
import yaml

from icm.config import PipelineConfig, shareable_dump
from icm.eval_inputs import MODES, gather_inputs, random_conditions
from icm.eval_report import markdown_report, per_task, plot_gap_by_group, plot_per_task
from icm.eval_task import evaluate_task
from icm.io import write_bytes_atomic, write_text_atomic
from icm.stages import open_suite, pull_stages, stage
from icm.tasks import Suite
from icm.zoo import write_manifest
from jobs.common import ensure_writable_root, parse_job_args, user_errors_exit_2
from jobs.ray_setup import init_ray

log = logging.getLogger("jobs.evaluate")


def _upstream(cfg: PipelineConfig, name: str) -> dict:
    record = json.loads((cfg.storage.path(name) / "stage.json").read_text()) \
        if (cfg.storage.path(name) / "stage.json").is_file() else None
    if record is None:
        from icm.errors import InputError

        raise InputError(f"stage '{name}' has no finished output under {cfg.storage.path(name)}. "
                         f"Fix: run it first (icm run --config ... runs every stage in order).")
    return record


def load_task_means(cfg: PipelineConfig, tasks: Sequence[str]) -> dict:
    """mode -> task -> (D,) task-mean vector, with the generator's layer and pooling."""
    from icm.task_vectors import load_task_means as load

    g = cfg.generator
    return {mode: load(cfg.storage.path("task_vectors"), mode=mode, layer=g.condition_layer,
                       pooling=g.condition_pooling, tasks=tasks)
            for mode in MODES if mode in cfg.task_vectors.modes}


def evaluate_on_node(pipeline: PipelineConfig, *args, **kwargs) -> list[dict]:
    """`evaluate_task` on any node: with a URI root, this node's mirror first gets the zoo and
    the generator (no-op where they are already current, e.g. the driver's node)."""
    pull_stages(pipeline, "zoo", "generator")
    return evaluate_task(*args, **kwargs)


def run(cfg: PipelineConfig, suite: Suite, *, command: str = "python -m jobs.evaluate") -> dict:
    pull_stages(cfg, "zoo", "task_vectors", "generator")  # a URI root: the inputs, into the mirror
    upstream = [_upstream(cfg, name)["fingerprint"] for name in ("zoo", "task_vectors", "generator")]
    if cfg.storage.is_remote:  # snapshot paths as this mirror holds them (it may be a new one)
        write_manifest(cfg.storage.path("zoo"))
    current = stage(cfg, "evaluate", suite.fingerprint(), sorted(suite.tasks), upstream,
                    sections=("model", "evaluate"))
    if current.is_current():
        log.info("evaluate: up to date, skipping (%s)", current.directory)
        return current.record()
    init_ray(cfg.ray, cache_dir=cfg.model.cache_dir)
    started = current.begin(cfg)
    means = load_task_means(cfg, sorted(suite.tasks))
    inputs, shared = gather_inputs(suite, cfg.storage.path("zoo"), means)
    training = {t.name for t in suite.training_tasks()}
    control = random_conditions({t: v for t, v in means["both"].items() if t in training},
                                count=1, seed=cfg.evaluate.seed)[0]
    remote = ray.remote(num_cpus=cfg.evaluate.cpus_per_task,
                        num_gpus=cfg.evaluate.gpus_per_task)(evaluate_on_node)
    shared_ref = ray.put(shared)
    generator_dir = str(cfg.storage.path("generator").resolve())
    pending = {remote.remote(cfg, item, shared_ref, generator_dir, model=cfg.model, cfg=cfg.evaluate,
                             random_condition=control): item.task for item in inputs}
    rows = []
    while pending:
        done, _ = ray.wait(list(pending), num_returns=1)
        task = pending.pop(done[0])
        task_rows = ray.get(done[0])
        rows += task_rows
        by = {r["variant"]: r["perplexity"] for r in task_rows}
        log.info("evaluate %d/%d %-24s base %.2f trained %s generated %.2f soup %.2f",
                 len(inputs) - len(pending), len(inputs), task, by["base"],
                 f"{by['trained']:.2f}" if "trained" in by else "-", by.get("generated", float("nan")),
                 by.get("soup", float("nan")))
    return _write_outputs(cfg, current, started, pd.DataFrame(rows), command)


def _write_outputs(cfg: PipelineConfig, current, started: float, results: pd.DataFrame,
                   command: str) -> dict:
    out = current.directory
    write_bytes_atomic(out / "results.parquet", results.to_parquet(index=False))
    table = per_task(results)
    write_bytes_atomic(out / "per_task.parquet", table.to_parquet(index=False))
    plot_per_task(table, out / "per_task.png")
    plot_gap_by_group(table, out / "gap_by_group.png")
    report = markdown_report(table, command=command, title=f"icm-ray evaluation: run {cfg.name!r}",
                             config_yaml=yaml.safe_dump(shareable_dump(cfg), sort_keys=False))
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
