"""The report's paired bootstrap at a study's size: ratio_ci and gap_recovered_ci timed.

    python tests/bench/bench_eval_stats.py [--repeats 5] [--tasks 28 100] [--texts 32]

Per size, both calls (the default 2,000 resamples) run alternately in one process, repeated;
prints the median and every run as a Markdown table for BENCHMARKS.md. The report makes one such
pair of calls per row, so this is what a report's intervals cost per row.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))  # run as a script from a checkout

from icm.eval.stats import gap_recovered_ci, ratio_ci  # noqa: E402
# two variants equal in expectation, as the unit test's full-size check draws them
from tests.unit.test_eval_stats import _noisy_pair as noisy_pair  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--tasks", type=int, nargs="+", default=[28, 100])
    parser.add_argument("--texts", type=int, default=32)
    args = parser.parse_args()
    print(f"| tasks x texts | call | median s (n={args.repeats}) | all runs s |\n|---|---|---|---|")
    for tasks in args.tasks:
        a, b, tokens = noisy_pair(tasks, args.texts, seed=11)
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
