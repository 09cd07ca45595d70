"""The report's paired bootstrap at a study's size: ratio_ci and gap_recovered_ci timed.

    python tests/bench/bench_eval_stats.py [--repeats 5] [--tasks 28 100] [--texts 32]

Per size, both calls (the default 2,000 resamples) run alternately in one process, repeated;
prints the median and every run as a Markdown table for BENCHMARKS.md. The report makes one such
pair of calls per row, so this is what a report's intervals cost per row.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from icm.eval.stats import gap_recovered_ci, ratio_ci


def noisy_pair(tasks: int, texts: int, seed: int = 11):
    """Per-text NLL of two variants equal in expectation, and token counts (tasks x texts)."""
    rng = np.random.default_rng(seed)
    tokens = [rng.integers(20, 200, size=texts).astype(float) for _ in range(tasks)]
    base = [tok * d for tok, d in zip(tokens, rng.uniform(1.5, 3.0, size=tasks))]
    a, b = ([x + tok * rng.normal(0, 0.3, size=texts) for x, tok in zip(base, tokens)]
            for _ in range(2))
    return a, b, tokens


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--tasks", type=int, nargs="+", default=[28, 100])
    parser.add_argument("--texts", type=int, default=32)
    args = parser.parse_args()
    print(f"| tasks x texts | call | median s (n={args.repeats}) | all runs s |\n|---|---|---|---|")
    for tasks in args.tasks:
        a, b, tokens = noisy_pair(tasks, args.texts)
        oracle = [0.8 * x for x in b]
        calls = {"ratio_ci": lambda: ratio_ci(a, b, tokens),
                 "gap_recovered_ci": lambda: gap_recovered_ci(a, b, oracle, tokens)}
        times: dict[str, list[float]] = {name: [] for name in calls}
        for _ in range(args.repeats):
            for name, call in calls.items():
                started = time.perf_counter()
                call()
                times[name].append(time.perf_counter() - started)
        for name, values in times.items():
            print(f"| {tasks} x {args.texts} | {name} | {statistics.median(values):.3f} | "
                  f"{', '.join(f'{v:.3f}' for v in values)} |")


if __name__ == "__main__":
    main()
