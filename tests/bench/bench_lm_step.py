"""What one step of the generator's end-to-end (LM) fine-tuning costs at 1 vs 2 torch threads.

    python tests/bench/bench_lm_step.py --run icm-runs/<a run with objective lm|hybrid> \
        [--threads 1 2] [--rounds 6] [--steps 3] [--out DIR] [key=value ...]

On a finished run's generator, suite, zoo and task vectors (its ``generator/config.resolved.yaml``
is the config; ``key=value`` overrides it, e.g. ``generator.objective=lm``): the same
`icm.generator.lm.fit_lm` the Ray Train workers run, ``--steps`` steps per call, the thread
counts alternated within each round (and their order reversed every other round, so drift on a
shared box hits both alike). Every call draws the same tasks, texts and latents (the draws are
functions of the step), so the work is identical across thread counts.

Prints the median seconds per step of each thread count and the paired per-round ratio
(first count / each other) with a bootstrap 95% interval of its median; writes
``lm_step.json`` to ``--out`` (default: ``<run>/bench-lm-step``). Run it alone on the box.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

import jobs  # noqa: E402,F401  (registers the project's presets)
from icm.config import load_config  # noqa: E402


def bootstrap_median_ci(values: list[float], resamples: int = 2000, seed: int = 0
                        ) -> tuple[float, float]:
    """Percentile 95% interval of the median of ``values`` (resampled with replacement)."""
    rng = random.Random(seed)
    medians = sorted(statistics.median(rng.choices(values, k=len(values)))
                     for _ in range(resamples))
    return medians[int(0.025 * resamples)], medians[int(0.975 * resamples) - 1]


def round_orders(threads: list[int], rounds: int) -> list[list[int]]:
    """The thread counts of each round: as given, reversed every other round."""
    return [list(threads) if r % 2 == 0 else list(reversed(threads)) for r in range(rounds)]


def setup(run: Path, overrides: list[str], steps: int):
    """(generator, LmSetup, reconstruction term, generator config) as an LM worker builds them."""
    from icm.generator import LoraGenerator
    from icm.generator.data import prepare_data
    from icm.generator.inputs import load_generator_inputs, load_task_conditions
    from icm.generator.lm import hybrid_term, lm_setup
    from icm.stages import open_suite
    from jobs.generator_lm import lm_train_texts

    cfg = load_config(run / "generator" / "config.resolved.yaml", overrides)
    cfg = cfg.model_copy(update={"storage": cfg.storage.model_copy(update={"root": str(run)})})
    gen_cfg = cfg.generator.model_copy(update={"lm_steps": steps, "report_every": 10 ** 6})
    suite = open_suite(cfg)
    generator = LoraGenerator.load(run / "generator")
    tasks = generator.summary["trained_on"]["tasks"]
    lm = lm_setup(generator, cfg.model, lm_train_texts(suite, tasks, gen_cfg.lm_max_texts),
                  load_task_conditions(cfg, tasks), gen_cfg, "cpu")

    def zoo_data():
        inputs = load_generator_inputs(cfg, suite)
        return prepare_data(inputs.zoo, inputs.conditions, gen_cfg, validation=False,
                            init_state=inputs.init_state, condition_spec=inputs.condition_spec)

    return generator, lm, hybrid_term(gen_cfg, zoo_data), gen_cfg


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, required=True, help="a run's storage.root")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--steps", type=int, default=3, help="LM steps per timed call")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    from icm.generator.lm import fit_lm

    generator, lm, reconstruction, gen_cfg = setup(args.run, args.overrides, args.steps)

    def seconds_per_step(threads: int) -> float:
        torch.set_num_threads(threads)
        result = fit_lm(generator, lm.applier, lm.tasks, gen_cfg, pad_id=lm.pad_id,
                        reconstruction=reconstruction)
        return result.train_seconds / result.steps

    seconds_per_step(max(args.threads))  # warm-up: first-call allocations, lazy imports
    timings: dict[int, list[float]] = {t: [] for t in args.threads}
    for order in round_orders(args.threads, args.rounds):
        for threads in order:
            timings[threads].append(seconds_per_step(threads))
        print({t: round(v[-1], 3) for t, v in timings.items()}, flush=True)
    reference = args.threads[0]
    rows = []
    for threads, values in timings.items():
        ratios = [a / b for a, b in zip(timings[reference], values)]  # paired by round
        low, high = bootstrap_median_ci(ratios)
        rows.append({"threads": threads, "median_s_per_step": statistics.median(values),
                     "min": min(values), "max": max(values),
                     f"speedup_vs_{reference}": statistics.median(ratios),
                     "ci_low": low, "ci_high": high})
    print(f"objective {gen_cfg.objective}, {gen_cfg.lm_tasks} tasks x {gen_cfg.lm_texts} texts x "
          f"{gen_cfg.lm_seq_len} tokens per step, {args.steps} steps x {args.rounds} rounds")
    print("| threads | median s/step | min | max | speedup vs %d [95%% CI] |" % reference)
    print("|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['threads']} | {row['median_s_per_step']:.3f} | {row['min']:.3f} | "
              f"{row['max']:.3f} | {row[f'speedup_vs_{reference}']:.3f} "
              f"[{row['ci_low']:.3f}, {row['ci_high']:.3f}] |")
    out = args.out or args.run / "bench-lm-step"
    out.mkdir(parents=True, exist_ok=True)
    (out / "lm_step.json").write_text(json.dumps(
        {"rows": rows, "timings": {str(t): v for t, v in timings.items()}, "steps": args.steps,
         "rounds": args.rounds, "generator": gen_cfg.model_dump(mode="json"),
         "cpu_count": os.cpu_count()}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
