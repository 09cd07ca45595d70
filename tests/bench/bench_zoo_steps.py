"""Is the zoo, not the generator, the ceiling? Per-task LoRAs trained longer, against in-context.

    python tests/bench/bench_zoo_steps.py --evaluate RUN/evaluate --zoo LONGER_RUN/zoo \
        [--config study] [--out DIR] [key=value ...]

Every adapter the generator or a baseline makes is built from the zoo, so the oracle (the task's
own LoRA with the zoo's settings) bounds them. Where in-context prompting beats the oracle, no
generator over that zoo can beat in-context prompting. This asks whether more LoRA steps per
task would move that bound: ``--zoo`` is the zoo folder of a run that trained some tasks with
more ``zoo.steps`` (its snapshots spread over training, e.g. ``zoo.snapshots=4
zoo.snapshot_start=0``), ``--evaluate`` a finished evaluate folder that scored those tasks
(base, oracle, in-context). Each snapshot is scored on the same eval texts as the evaluate stage
(``evaluate.max_texts`` x ``evaluate.max_length`` of ``--config``) and paired text by text with
the evaluate rows: gap to the oracle recovered and the ratio to in-context prompting, with the
evaluate stage's paired bootstrap intervals. Prints a table; writes ``zoo_steps.md`` and
``zoo_steps.parquet`` to ``--out``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pandas as pd  # noqa: E402
import yaml  # noqa: E402

import jobs  # noqa: E402,F401  (registers the project's presets: study, demo, ...)
from icm.config import load_config  # noqa: E402

RIVAL = "in-context"


def snapshot_folders(zoo: Path, tasks: list[str]) -> dict[str, list[tuple[int, Path]]]:
    """Task -> [(step, snapshot folder)] by step, for the tasks the longer zoo trained."""
    from icm.zoo import task_snapshot_records

    found = {task: [(r["step"], Path(r["path"])) for r in records]
             for task in tasks if (records := task_snapshot_records(zoo, task))}
    if not found:
        raise SystemExit(f"bench_zoo_steps: no snapshots under {zoo}/tasks/<task>/snapshots for any "
                         f"task the evaluate folder scored ({len(tasks)}); pass the longer run's zoo/ folder")
    return found


def score_snapshots(cfg, suite, snapshots, reference: pd.DataFrame, steps_total: int) -> pd.DataFrame:
    """One results row per (task, snapshot), in the evaluate stage's schema."""
    from icm.adapters import apply_adapter
    from icm.evaluation import score_texts
    from icm.models import load_base_model
    from icm.tasks import load_task

    base, tokenizer = load_base_model(cfg.model.spec, cache_dir=cfg.model.cache_dir)
    rows = []
    for task, folders in snapshots.items():
        texts = load_task(suite.tasks[task].path).eval_texts()[:cfg.evaluate.max_texts]
        like = reference[(reference["task"] == task) & (reference["variant"] == "base")].iloc[0]
        for step, folder in folders:
            started = time.perf_counter()
            model = apply_adapter(base, folder)
            score = score_texts(model, tokenizer, texts, max_length=cfg.evaluate.max_length,
                                batch_size=cfg.evaluate.batch_size)
            base = model.unload()  # the bare base model back for the next adapter
            row = {**like.to_dict(), **score.as_dict(), "variant": f"lora-step{step}of{steps_total}",
                   "sample": float("nan"), "eval_seconds": time.perf_counter() - started}
            rows.append(row)
            print(f"{task:28s} step {step:4d}/{steps_total}: ppl {score.perplexity:8.2f}", flush=True)
    return pd.DataFrame(rows)


def summary(results: pd.DataFrame, variants: list[str], resamples: int, seed: int) -> pd.DataFrame:
    from icm.eval.report import format_ci, gap_row, ratio_row

    lines = []
    for variant in ["oracle", *variants, RIVAL]:
        gap = gap_row(results, variant, resamples, seed) if variant != "oracle" else None
        rival = ratio_row(results, variant, RIVAL, resamples, seed) if variant != RIVAL else None
        oracle = ratio_row(results, variant, "oracle", resamples, seed) if variant != "oracle" else None
        lines.append({"variant": variant,
                      "gap recovered, median [95% CI]": format_ci(gap) if gap else "",
                      "ppl / oracle [95% CI]": format_ci(oracle) if oracle else "",
                      f"ppl / {RIVAL} [95% CI] (wins)": f"{format_ci(rival)} ({rival.wins}/{rival.n})" if rival else ""})
    return pd.DataFrame(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--evaluate", required=True, help="a finished evaluate folder (results.parquet)")
    parser.add_argument("--zoo", required=True, help="the zoo folder of the run with more zoo.steps")
    parser.add_argument("--config", default="study")
    parser.add_argument("--out", default=None, help="default: <--zoo>/../bench-zoo-steps")
    parser.add_argument("--resamples", type=int, default=2000)
    parser.add_argument("--tasks", type=lambda text: text.split(","), default=None,
                        help="comma-separated: only these tasks (default: every task the evaluate "
                        "folder scored that the zoo has)")
    parser.add_argument("--reuse-scores", action="store_true",
                        help="recompute the tables from <--out>/zoo_steps.parquet without scoring")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    from icm.stages import open_suite

    reference = pd.read_parquet(Path(args.evaluate) / "results.parquet")
    reference = reference[reference["variant"].isin(["base", "oracle", RIVAL])]
    zoo = Path(args.zoo)
    # The longer run's steps, from the config it resolved (snapshot folders are named by steps done).
    steps_total = int(yaml.safe_load((zoo / "config.resolved.yaml").read_text())["zoo"]["steps"])
    snapshots = snapshot_folders(zoo, args.tasks or sorted(set(reference["task"])))
    out = Path(args.out or zoo.parent / "bench-zoo-steps")
    if args.reuse_scores:  # the tables again from a previous run's scores (no model, no scoring)
        scored = pd.read_parquet(out / "zoo_steps.parquet")
        snapshots = {task: snapshots[task] for task in sorted(set(scored["task"]))}
    else:
        scored = score_snapshots(cfg, open_suite(cfg), snapshots, reference, steps_total)
    results = pd.concat([reference[reference["task"].isin(snapshots)], scored], ignore_index=True)
    variants = list(dict.fromkeys(scored["variant"]))  # step order: rows were scored by step
    # All tasks, then each group alone (one row block per group).
    table = pd.concat([summary(part, variants, args.resamples, cfg.seed).assign(tasks=name)
                       for name, part in [("all", results), *results.groupby("group")]], ignore_index=True)
    table = table[["tasks", *table.columns[:-1]]]
    print(table.to_markdown(index=False))
    out.mkdir(parents=True, exist_ok=True)
    scored.to_parquet(out / "zoo_steps.parquet")
    command = "python tests/bench/bench_zoo_steps.py " + " ".join(sys.argv[1:] if argv is None else argv)
    (out / "zoo_steps.md").write_text(f"`{command}`\n\n{len(snapshots)} tasks: {', '.join(snapshots)}\n\n"
                                      + table.to_markdown(index=False) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
