"""Base-model perplexity and bits per character on every task's eval split, fanned out on Ray.

    python -m jobs.base_eval --config demo [key=value ...]

One Ray task per suite task (``base_eval.cpus_per_task`` CPUs each, ``gpus_per_task`` GPUs);
writes ``<storage.root>/base_eval/{results.parquet, summary.md, config.resolved.yaml, stage.json}``.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Sequence

import pandas as pd
import ray

from icm.config import PipelineConfig
from icm.evaluation import evaluate_task_base
from icm.io import write_bytes_atomic, write_text_atomic
from icm.stages import open_suite, stage
from icm.tasks import Suite
from jobs.common import ensure_writable_root, parse_job_args, user_errors_exit_2
from jobs.ray_setup import init_ray, with_reserved_threads

log = logging.getLogger("jobs.base_eval")


def group_summary(results: pd.DataFrame) -> pd.DataFrame:
    """Per group: tasks, median perplexity, bits per character over all the group's characters."""
    grouped = results.groupby("group")
    return pd.DataFrame({
        "tasks": grouped.size(),
        "median_ppl": grouped["perplexity"].median(),
        "bits_per_char": grouped["nll_nats"].sum() / (grouped["characters"].sum() * 0.6931471805599453),
        "eval_tokens": grouped["tokens"].sum(),
    }).reset_index()


def run(config: PipelineConfig, suite: Suite) -> dict:
    """Run (or skip) the stage; returns its stage record."""
    current = stage(config, "base_eval", suite.fingerprint(), sorted(suite.tasks),
                    sections=("model", "base_eval"))
    if current.is_current():
        log.info("base_eval: up to date, skipping (%s)", current.directory)
        return current.record()
    started = current.begin(config)
    m, e = config.model, config.base_eval
    remote = ray.remote(num_cpus=e.cpus_per_task, num_gpus=e.gpus_per_task)(
        with_reserved_threads(evaluate_task_base))
    pending = {remote.remote(str(task.path), model_spec=m.spec, cache_dir=m.cache_dir, dtype=m.dtype,
                             max_length=m.max_length, batch_size=e.batch_size,
                             max_texts=e.max_texts): name for name, task in suite.tasks.items()}
    rows = []
    while pending:
        done, _ = ray.wait(list(pending), num_returns=1)
        row = ray.get(done[0])
        pending.pop(done[0])
        row["heldout"] = suite.is_heldout(row["task"])
        rows.append(row)
        log.info("base_eval %d/%d  %-28s ppl %8.2f  bpc %.3f  (%.1f s)", len(rows),
                 len(suite.tasks), row["task"], row["perplexity"], row["bits_per_char"], row["seconds"])
    results = pd.DataFrame(rows).sort_values(["group", "task"]).reset_index(drop=True)
    write_bytes_atomic(current.directory / "results.parquet", results.to_parquet(index=False))
    summary = group_summary(results)
    write_text_atomic(current.directory / "summary.md",
                      f"# Base model {m.spec}: eval split, per group\n\n"
                      + summary.to_markdown(index=False, floatfmt=".3f") + "\n")
    return current.finish(started, {"results": "results.parquet", "summary": "summary.md",
                                    "tasks": len(results)})


@user_errors_exit_2
def main(argv: Sequence[str] | None = None) -> int:
    config = parse_job_args(__doc__.split("\n\n")[0], argv)
    ensure_writable_root(config)  # a URI root: proves it writable before any work
    suite = open_suite(config)
    init_ray(config.ray, cache_dir=config.model.cache_dir)
    started = time.perf_counter()
    record = run(config, suite)
    print(f"base_eval done in {time.perf_counter() - started:.1f} s -> {config.storage.path('base_eval')}"
          f" ({record['outputs']['tasks']} tasks)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
