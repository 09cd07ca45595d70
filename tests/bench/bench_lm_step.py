"""What the generator's end-to-end (LM) fine-tuning gets from the CPUs: 1 vs 2 torch threads,
and two fine-tunes side by side at 1 thread each.

    python tests/bench/bench_lm_step.py --run icm-runs/<a run with objective lm|hybrid> \
        [--layouts 1x1 1x2 2x1] [--rounds 5] [--steps 3] [--out DIR] [key=value ...]

A layout PxT is P fine-tunes at once, T torch threads each. On a finished run's generator,
suite, zoo and task vectors (its ``generator/config.resolved.yaml`` is the config; ``key=value``
overrides it, e.g. ``generator.objective=lm``), each of max(P) worker processes builds what a
Ray Train LM worker builds, once; then every round runs each layout in turn (the order reversed
every other round, so drift hits all alike): ``--steps`` steps of the same
`icm.generator.lm.fit_lm` on each of P workers at once. Every call draws the same tasks, texts
and latents (the draws are functions of the step), so the work per step is identical.

Prints per layout the median seconds per step (per fine-tune), the throughput (steps per second
of all P together) and its ratio to the first layout's, paired by round, with a bootstrap 95%
interval of the median ratio; writes ``lm_step.json`` to ``--out`` (default:
``<run>/bench-lm-step``). Run it alone on the box.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import random
import statistics
import sys
import time
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


def round_orders(layouts: list, rounds: int) -> list[list]:
    """The layouts of each round: as given, reversed every other round."""
    return [list(layouts) if r % 2 == 0 else list(reversed(layouts)) for r in range(rounds)]


def setup(run: Path, overrides: list[str], steps: int):
    """(generator, LmSetup, reconstruction term, generator config) as an LM worker builds them."""
    from icm.generator import LoraGenerator
    from icm.generator.inputs import load_task_conditions
    from icm.generator.lm import lm_setup
    from icm.stages import open_suite
    from jobs.generator_lm import lm_train_prompts, lm_train_texts, reconstruction_term

    cfg = load_config(run / "generator" / "config.resolved.yaml", overrides)
    cfg = cfg.model_copy(update={"storage": cfg.storage.model_copy(update={"root": str(run)})})
    gen_cfg = cfg.generator.model_copy(update={"lm_steps": steps, "report_every": 10 ** 6})
    suite = open_suite(cfg)
    generator = LoraGenerator.load(run / "generator")
    tasks = generator.summary["trained_on"]["tasks"]
    lm = lm_setup(generator, cfg.model, lm_train_texts(suite, tasks, gen_cfg.lm_max_texts),
                  load_task_conditions(cfg, tasks), gen_cfg, "cpu",
                  lm_train_prompts(cfg, gen_cfg, suite, tasks))
    return generator, lm, reconstruction_term(cfg, gen_cfg, suite), gen_cfg


def worker(conn, run: str, overrides: list[str], steps: int) -> None:
    """A fine-tune's process: set up once, then run ``steps`` LM steps at the thread count it
    is sent, answering with seconds per step, until it is sent None."""
    from icm.generator.lm import fit_lm

    generator, lm, reconstruction, gen_cfg = setup(Path(run), overrides, steps)
    conn.send(gen_cfg.model_dump(mode="json"))
    while (threads := conn.recv()) is not None:
        torch.set_num_threads(threads)
        result = fit_lm(generator, lm.applier, lm.tasks, gen_cfg, pad_id=lm.pad_id,
                        reconstruction=reconstruction)
        conn.send(result.train_seconds / result.steps)


def parse_layout(text: str) -> tuple[int, int]:
    """``PxT`` -> (fine-tunes at once, threads each)."""
    try:
        parallel, threads = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise SystemExit(f"--layouts: {text!r} is not PxT (e.g. 2x1: two fine-tunes, one thread "
                         "each)") from None
    if parallel < 1 or threads < 1:
        raise SystemExit(f"--layouts: {text!r} needs P >= 1 and T >= 1")
    return parallel, threads


def run_layout(workers, parallel: int, threads: int, steps: int) -> tuple[float, float]:
    """(median seconds per step of the P fine-tunes, steps per second of all of them)."""
    started = time.perf_counter()
    for conn in workers[:parallel]:
        conn.send(threads)
    per_step = [conn.recv() for conn in workers[:parallel]]
    return statistics.median(per_step), parallel * steps / (time.perf_counter() - started)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, required=True, help="a run's storage.root")
    parser.add_argument("--layouts", nargs="+", default=["1x1", "1x2", "2x1"])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=3, help="LM steps per timed call")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    layouts = [parse_layout(text) for text in args.layouts]
    context = multiprocessing.get_context("spawn")
    workers, processes = [], []
    for _ in range(max(p for p, _ in layouts)):
        parent, child = context.Pipe()
        process = context.Process(target=worker,
                                  args=(child, str(args.run), args.overrides, args.steps))
        process.start()
        workers.append(parent)
        processes.append(process)
    gen_cfg = [conn.recv() for conn in workers][0]
    run_layout(workers, len(workers), max(t for _, t in layouts), args.steps)  # warm-up
    timings = {layout: {"s_per_step": [], "steps_per_s": []} for layout in layouts}
    for order in round_orders(layouts, args.rounds):
        for layout in order:
            per_step, throughput = run_layout(workers, *layout, args.steps)
            timings[layout]["s_per_step"].append(per_step)
            timings[layout]["steps_per_s"].append(throughput)
        print({f"{p}x{t}": round(v["steps_per_s"][-1], 3) for (p, t), v in timings.items()},
              flush=True)
    for conn, process in zip(workers, processes):
        conn.send(None)
        process.join()
    rows = table(timings, layouts[0])
    print(f"objective {gen_cfg['objective']}, {gen_cfg['lm_tasks']} tasks x {gen_cfg['lm_texts']} "
          f"texts x {gen_cfg['lm_seq_len']} tokens per step, {args.steps} steps x {args.rounds} "
          f"rounds, {os.cpu_count()} CPUs")
    print("| fine-tunes x threads | median s/step | steps/s (all) | "
          f"/ {rows[0]['layout']} [95% CI] |")
    print("|---|---|---|---|")
    for row in rows:
        print(f"| {row['layout']} | {row['median_s_per_step']:.3f} | "
              f"{row['median_steps_per_s']:.3f} | {row['throughput_ratio']:.3f} "
              f"[{row['ci_low']:.3f}, {row['ci_high']:.3f}] |")
    out = args.out or args.run / "bench-lm-step"
    out.mkdir(parents=True, exist_ok=True)
    (out / "lm_step.json").write_text(json.dumps(
        {"rows": rows, "timings": {f"{p}x{t}": v for (p, t), v in timings.items()},
         "steps": args.steps, "rounds": args.rounds, "generator": gen_cfg,
         "cpu_count": os.cpu_count()}, indent=2))
    return 0


def table(timings: dict, reference: tuple[int, int]) -> list[dict]:
    """One row per layout: medians, and its throughput over ``reference``'s paired by round."""
    rows = []
    for (parallel, threads), values in timings.items():
        ratios = [a / b for a, b in zip(values["steps_per_s"], timings[reference]["steps_per_s"])]
        low, high = bootstrap_median_ci(ratios)
        rows.append({"layout": f"{parallel}x{threads}",
                     "median_s_per_step": statistics.median(values["s_per_step"]),
                     "median_steps_per_s": statistics.median(values["steps_per_s"]),
                     "throughput_ratio": statistics.median(ratios), "ci_low": low, "ci_high": high})
    return rows


if __name__ == "__main__":
    raise SystemExit(main())
