"""LoRA zoo benchmark: Ray Train + DeepSpeed vs a plain loop, concurrent vs sequential trainers.

    python tests/bench/bench_zoo.py --config demo --tasks 4 --repeats 3 [key=value ...]

Side by side in one run, on the same cores and the same batches (the zoo's seeded batches):
1. training tokens/s of one task through the real job path (``TorchTrainer`` + DeepSpeed, 1
   worker, 1 CPU) vs a plain single-process PyTorch + peft loop with torch's AdamW on 1 thread
   (goal: ratio >= 0.9); the median over ``--repeats`` alternating runs;
2. wall time of the zoo job on ``--tasks`` tasks: one trainer per task
   (``zoo.tasks_per_trainer=1``) run concurrently (as many as the CPUs hold) vs one after another
   (``zoo.max_concurrent=1``) vs the default, where each concurrent trainer trains its share of
   the tasks in the same processes; and the fixed start-up cost of a trainer (wall time minus
   training and snapshot time, from the sequential one-per-task run);
3. eval-perplexity gain (base -> LoRA) per group, read from an existing zoo's ``summary.parquet``
   when ``--zoo DIR`` is given (e.g. the demo run's).
Prints Markdown tables (paste them into BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))  # run as a script from a checkout

import jobs  # noqa: E402,F401  (registers the project's presets: study, demo, ...)
from icm.config import load_config  # noqa: E402
from icm.lora_train import batch_for_step, build_lora_model, tokenize_texts  # noqa: E402
from icm.models import load_base_model  # noqa: E402
from icm.stages import open_suite  # noqa: E402


def plain_loop_tokens_per_s(cfg, task) -> float:
    """The same LoRA steps without Ray or DeepSpeed: peft + torch AdamW, 1 thread."""
    torch.set_num_threads(1)
    model, tokenizer = load_base_model(cfg.model.spec, cache_dir=cfg.model.cache_dir)
    peft_model = build_lora_model(model, cfg.zoo).train()
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad],
                                  lr=cfg.zoo.lr, weight_decay=cfg.zoo.weight_decay)
    sequences = tokenize_texts(tokenizer, task.train_texts(), cfg.zoo.seq_len)
    tokens, seconds = 0, 0.0
    for step in range(1, cfg.zoo.steps + 1):
        batch = batch_for_step(sequences, step=step, batch_size=cfg.zoo.batch_size,
                               seed=cfg.zoo.data_seed, pad_id=tokenizer.pad_token_id)
        started = time.perf_counter()
        loss = peft_model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(peft_model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        seconds += time.perf_counter() - started
        tokens += int(batch["attention_mask"].sum())
    return tokens / seconds


PHASES = ("train_seconds", "setup_seconds", "base_eval_seconds", "snapshot_seconds", "checkpoint_seconds")


def print_trainer_breakdown(frame: pd.DataFrame) -> None:
    """Where one trainer's wall time goes (sequential run, so trainers do not share CPUs)."""
    frame = frame.assign(wall_seconds=frame["trainer_wall_seconds"])  # the whole trainer's
    rest = frame["wall_seconds"] - frame[list(PHASES)].sum(axis=1)
    print("\n### One task trainer's wall time by phase (sequential run, median over tasks)\n")
    print("| phase | s | share |\n|---|---:|---:|")
    wall = frame["wall_seconds"].median()
    labels = {"train_seconds": "training steps", "setup_seconds": "DeepSpeed import + init, model load",
              "base_eval_seconds": "base-model eval", "snapshot_seconds": "snapshot evals + writes",
              "checkpoint_seconds": "DeepSpeed checkpoints + Ray Train reports"}
    for phase in PHASES:
        print(f"| {labels[phase]} | {frame[phase].median():.1f} | {frame[phase].median() / wall:.0%} |")
    print(f"| Ray Train: controller, worker processes, imports (the rest) | {rest.median():.1f} | "
          f"{rest.median() / wall:.0%} |")
    print(f"| **trainer wall** | **{wall:.1f}** | |")
    print(f"\nFixed cost per trainer (wall - training steps): median "
          f"{(frame['wall_seconds'] - frame['train_seconds']).median():.1f} s")


def run_zoo(config: str, root: Path, tasks: list[str], *overrides: str) -> tuple[float, pd.DataFrame]:
    """The real zoo job in a subprocess; returns (wall seconds, summary rows)."""
    started = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "jobs.zoo", "--config", config,
                          f"storage.root={root}", f"suite.tasks=[{','.join(tasks)}]",
                          "zoo.multitask=false", *overrides], cwd=REPO, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(out.stderr[-4000:])
    summary = pd.read_parquet(root / "zoo" / "summary.parquet")
    # A trainer's wall time from the driver's log (start-up included): with one task per trainer,
    # the task's "trainer_wall_seconds".
    walls = {m.group(1): float(m.group(2)) for m in re.finditer(
        r"zoo: trainer lora-(\S+) finished 1 task\(s\) in (\d+) s", out.stderr)}
    summary["trainer_wall_seconds"] = summary["task"].map(walls)
    return time.perf_counter() - started, summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="demo")
    parser.add_argument("--tasks", type=int, default=4, help="training tasks for the concurrency test")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--zoo", default=None, help="an existing zoo dir for the per-group ppl gain")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    cfg = load_config(args.config, args.overrides)
    suite = open_suite(cfg)
    tasks = [t.name for t in suite.training_tasks()][:args.tasks]
    one = suite.tasks[tasks[0]]

    ray_rates, plain_rates = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            _, summary = run_zoo(args.config, Path(tmp) / f"one-{repeat}", [one.name], *args.overrides)
            ray_rates.append(float(summary["tokens_per_s"].iloc[0]))
            plain_rates.append(plain_loop_tokens_per_s(cfg, one))
        concurrent_wall, concurrent = run_zoo(args.config, Path(tmp) / "concurrent", tasks,
                                              "zoo.tasks_per_trainer=1", *args.overrides)
        sequential_wall, sequential = run_zoo(args.config, Path(tmp) / "sequential", tasks,
                                              "zoo.max_concurrent=1", "zoo.tasks_per_trainer=1",
                                              *args.overrides)
        packed_wall, packed = run_zoo(args.config, Path(tmp) / "packed", tasks, *args.overrides)
    ray_median, plain_median = statistics.median(ray_rates), statistics.median(plain_rates)
    print(f"\n### Training throughput, one task ({cfg.model.spec}, batch {cfg.zoo.batch_size} x "
          f"{cfg.zoo.seq_len} tokens, {cfg.zoo.steps} steps, 1 CPU thread each; median of {args.repeats})\n")
    print("| path | tokens/s (median) | all runs |\n|---|---:|---|")
    print(f"| Ray Train + DeepSpeed ZeRO-{cfg.zoo.zero_stage} | {ray_median:.0f} | "
          f"{', '.join(f'{r:.0f}' for r in ray_rates)} |")
    print(f"| plain PyTorch + peft loop | {plain_median:.0f} | {', '.join(f'{r:.0f}' for r in plain_rates)} |")
    print(f"| **ratio** | **{ray_median / plain_median:.2f}** | goal >= 0.9 |")

    print(f"\n### {len(tasks)} tasks: trainer per task (concurrent, sequential) vs shared trainers\n")
    print("| schedule | wall s (whole job) | median task wall s (inside its trainer) | median train s |\n|---|---:|---:|---:|")
    for name, wall, frame in (("a trainer per task, concurrent (CPUs allow)", concurrent_wall, concurrent),
                              ("a trainer per task, sequential (max_concurrent=1)", sequential_wall, sequential),
                              ("default: concurrent trainers, each training its share in turn", packed_wall, packed)):
        print(f"| {name} | {wall:.1f} | {frame['wall_seconds'].median():.1f} | "
              f"{frame['train_seconds'].median():.1f} |")
    print(f"| **speed-up, concurrent vs sequential** | **{sequential_wall / concurrent_wall:.2f}x** | | |")
    print(f"| **speed-up, shared trainers vs a trainer per task (both concurrent)** | "
          f"**{concurrent_wall / packed_wall:.2f}x** | | |")
    print_trainer_breakdown(sequential)
    if args.zoo:
        summary = pd.read_parquet(Path(args.zoo) / "summary.parquet")
        groups = {t.name: t.group for t in suite.tasks.values()}
        summary = summary[summary["task"].isin(groups)].assign(group=lambda f: f["task"].map(groups))
        summary["gain"] = summary["base_ppl"] / summary["lora_ppl"]
        table = summary.groupby("group").agg(tasks=("task", "size"), median_base_ppl=("base_ppl", "median"),
                                             median_lora_ppl=("lora_ppl", "median"),
                                             median_gain=("gain", "median")).reset_index()
        print(f"\n### Eval-perplexity gain of the task LoRAs per group ({args.zoo})\n")
        print(table.to_markdown(index=False, floatfmt=".3f"))
    print("\n" + json.dumps({"ray_tokens_per_s": ray_rates, "plain_tokens_per_s": plain_rates,
                             "concurrent_wall": concurrent_wall, "sequential_wall": sequential_wall}))


if __name__ == "__main__":
    main()
