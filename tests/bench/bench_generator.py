"""Generator benchmark: ASHA search vs the same trials at full budget, training speed, size.

    python tests/bench/bench_generator.py --config demo [key=value ...]          (stored zoo + task vectors)
    python tests/bench/bench_generator.py --config smoke --synthetic 12 [key=value ...]   (no inputs needed)

Side by side in one run, on the same prepared data (one split, one PCA) and the same local Ray:
1. **Search**: the Tune job's search (`jobs.tune.make_tuner`: Optuna + ASHA,
   ``tune.num_samples`` trials) -> best ``val_mse`` and the compute it used (generator training
   samples summed over trials; wall time).
2. **Full budget**: exactly the configurations the search tried, each trained for all
   ``generator.steps`` steps (a grid, no early stopping) -> best ``val_mse`` and its compute.
   Quality ratio = full-budget best MSE / search best MSE (goal >= 0.98); compute ratio =
   search samples / full-budget samples (goal <= 0.40).
3. Generator training samples/s (``generator`` config, one process, 1 thread, median of 3).
4. Generator size vs the zoo's adapter bytes it replaces (final codec: all tasks and snapshots).
``--synthetic N`` uses N synthetic tasks (tiny-llama layout, 8 snapshots, 64-d conditions) instead
of the stored zoo; perplexity re-scoring is not part of the benchmark. Prints Markdown tables.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))  # run as a script from a checkout

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pandas as pd  # noqa: E402
import torch  # noqa: E402

import jobs  # noqa: E402,F401  (registers the project's presets: study, demo, ...)
from icm.config import load_config  # noqa: E402
from icm.generator import fit_generator, generator_from_state  # noqa: E402
from icm.generator.data import prepare_data  # noqa: E402


def load_inputs(cfg, synthetic: int | None):
    """(zoo, conditions, init_state, condition_spec): the stored ones, or synthetic ones."""
    if synthetic:
        from tests.unit.test_generator import synthetic_zoo

        zoo, conditions = synthetic_zoo(tasks=[f"task{i:02d}" for i in range(synthetic)], snapshots=8,
                                        dim=64, episodes=8)
        zoo.adapter_bytes = sum(len(v) for v in zoo.vectors.values()) * zoo.layout.numel * 4
        return zoo, conditions, None, {"mode": "synthetic"}
    from icm.generator.inputs import load_generator_inputs
    from icm.stages import open_suite

    inputs = load_generator_inputs(cfg, open_suite(cfg))
    return inputs.zoo, inputs.conditions, inputs.init_state, inputs.condition_spec


def run_tuner(cfg, data, storage: Path, **kwargs) -> tuple[list[dict], float]:
    from jobs.tune import make_tuner, trial_rows

    started = time.perf_counter()
    rows = trial_rows(make_tuner(cfg, data, storage, **kwargs).fit())
    return rows, time.perf_counter() - started


def samples_per_s(data, cfg, repeats: int = 3) -> float:
    torch.set_num_threads(1)
    speeds = []
    for _ in range(repeats):
        short = cfg.generator.model_copy(update={"steps": min(cfg.generator.steps, 300)})
        generator = fit_generator(data, short)
        speeds.append(generator.summary["samples_per_s"])
    return statistics.median(speeds)


def size_row(zoo, conditions, cfg, init_state, spec) -> dict:
    final = prepare_data(zoo, conditions, cfg.generator, validation=False, init_state=init_state,
                         condition_spec=spec)
    generator = generator_from_state(final, cfg.generator, summary={"zoo": final.zoo_summary})
    with tempfile.TemporaryDirectory() as tmp:
        generator.save(Path(tmp) / "g")
        return json.loads((Path(tmp) / "g" / "generator.json").read_text())["size"]


def print_report(title: str, search, search_s, full, full_s, baseline: float, speed: float,
                 size: dict) -> None:
    best_search, best_full = search[0]["val_mse"], full[0]["val_mse"]
    search_samples, full_samples = sum(r["samples"] for r in search), sum(r["samples"] for r in full)
    print(f"\n## Generator benchmark: {title}\n")
    print(pd.DataFrame([
        {"run": "ASHA + Optuna search", "best val_mse": best_search, "trials": len(search),
         "samples": search_samples, "wall s": round(search_s, 1)},
        {"run": "same configs, full budget", "best val_mse": best_full, "trials": len(full),
         "samples": full_samples, "wall s": round(full_s, 1)},
        {"run": "zoo-mean baseline (no generator)", "best val_mse": baseline},
    ]).to_markdown(index=False, floatfmt=".4g"))
    print(f"\nquality ratio (full-budget best MSE / search best MSE, goal >= 0.98): "
          f"{best_full / best_search:.3f}")
    print(f"compute ratio (search samples / full-budget samples, goal <= 0.40): "
          f"{search_samples / full_samples:.3f}; wall-time ratio {search_s / full_s:.3f}\n")
    print(pd.DataFrame([{"training samples/s (1 thread, median of 3)": round(speed),
                         "generator bytes": size["generator_bytes"],
                         "zoo adapter bytes": size["zoo_adapter_bytes"],
                         "generator / zoo": size["ratio_to_zoo"]}]).to_markdown(index=False, floatfmt=".4g"))
    print("\nSearch trials (last report):")
    print(pd.DataFrame([{k: r[k] for k in ("trial_id", "val_mse", "val_seen_mse", "val_unseen_mse", "steps")}
                        | {"params": r["params"]} for r in search]).to_markdown(index=False, floatfmt=".4g"))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="demo")
    parser.add_argument("--synthetic", type=int, default=None, help="N synthetic tasks instead of the zoo")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    zoo, conditions, init_state, spec = load_inputs(cfg, args.synthetic)
    data = prepare_data(zoo, conditions, cfg.generator, validation=True, archs=cfg.tune.archs,
                        init_state=init_state, condition_spec=spec)
    import ray

    from jobs.ray_setup import init_ray

    init_ray(cfg.ray, cache_dir=cfg.model.cache_dir)
    with tempfile.TemporaryDirectory() as tmp:
        search, search_s = run_tuner(cfg, data, Path(tmp) / "search")
        grid = [row["params"] for row in search]  # the very configurations the search tried
        full, full_s = run_tuner(cfg, data, Path(tmp) / "full", name="full-budget", asha=False, grid=grid)
    ray.shutdown()
    baselines = data.representation(cfg.generator).baselines
    source = f"synthetic ({args.synthetic} tasks)" if args.synthetic else f"zoo {zoo.root}"
    title = (f"{source}, L = {zoo.layout.numel:,}, {len(data.split.train_tasks)} train / "
             f"{len(data.split.val_tasks)} validation tasks, {cfg.tune.num_samples} trials x "
             f"{cfg.generator.steps} steps")
    print_report(title, search, search_s, full, full_s, sum(baselines.values()) / max(len(baselines), 1),
                 samples_per_s(data, cfg), size_row(zoo, conditions, cfg, init_state, spec))
    return 0


if __name__ == "__main__":
    sys.exit(main())
