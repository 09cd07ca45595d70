"""Does the generator get better with more training tasks? Validation loss at 25/50/100%.

    python tests/bench/bench_generator_tasks.py --config study [--out DIR] [key=value ...]

On a finished run's zoo and task vectors (``storage.root``): a fixed, seeded 15% of the training
tasks are validation tasks (never a held-out task, never trained on); the generator is trained
on nested, seeded subsets of the other training tasks (25% within 50% within 100%), with the
config's ``generator`` settings, and each one is scored on the validation tasks:

* ``val_unseen_mse``: per-element MSE of the z = 0 adapter against the validation tasks'
  snapshots (normalised weights), beside the error of emitting the training zoo's mean;
* ``val_log_ppl``: log perplexity of the z = 0 adapter on the last ``--texts`` train texts of
  each validation task (never eval texts), beside the base model's and the zoo mean's.

Prints a table and writes ``tasks_scaling.png`` (validation loss against training tasks used)
and ``tasks_scaling.json`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pandas as pd  # noqa: E402
import torch  # noqa: E402

import jobs  # noqa: E402,F401  (registers the project's presets: study, demo, ...)
from icm.config import load_config  # noqa: E402


def subsets(tasks: list[str], seed: int, val_share: float = 0.15,
            fractions=(0.25, 0.5, 1.0)) -> tuple[list[str], dict[float, list[str]]]:
    """Validation tasks, and nested training subsets of the rest per fraction."""
    order = sorted(tasks)
    random.Random(f"{seed}-tasks").shuffle(order)
    n_val = max(2, round(val_share * len(order)))
    validation, rest = sorted(order[:n_val]), order[n_val:]
    return validation, {f: sorted(rest[:max(2, round(f * len(rest)))]) for f in fractions}


def log_ppl(swap, tokenizer, vector, texts, max_length: int) -> float:
    if vector is None:
        return math.log(swap.score(tokenizer, texts, max_length=max_length, batch_size=8, base=True).perplexity)
    swap.load(vector)
    return math.log(swap.score(tokenizer, texts, max_length=max_length, batch_size=8).perplexity)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="study")
    parser.add_argument("--out", default=None, help="default: <storage.root>/bench-tasks")
    parser.add_argument("--texts", type=int, default=8, help="train-tail texts per validation task")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    from icm.adapter_swap import SwappableLora
    from icm.generator import train_generator
    from icm.generator.inputs import ZooData, load_generator_inputs
    from icm.models import load_base_model
    from icm.stages import open_suite
    from icm.tasks import load_task

    suite = open_suite(cfg)
    inputs = load_generator_inputs(cfg, suite)
    validation, training = subsets(sorted(inputs.zoo.vectors), cfg.seed)
    zoo = inputs.zoo
    model, tokenizer = load_base_model(cfg.model.spec, cache_dir=cfg.model.cache_dir)
    texts = {t: load_task(suite.tasks[t].path).train_texts()[-args.texts:] for t in validation}
    rows = []
    swap = None
    for fraction, tasks in training.items():
        started = time.perf_counter()
        part = ZooData(zoo.layout, {t: zoo.vectors[t] for t in tasks}, zoo.model_spec, zoo.peft_config, zoo.lora)
        generator = train_generator(part, {t: inputs.conditions[t] for t in tasks}, cfg.generator,
                                    init_state=inputs.init_state, condition_spec=inputs.condition_spec)
        swap = swap or SwappableLora(model, generator.peft_config, generator.layout)
        mean = torch.cat([zoo.vectors[t] for t in tasks]).mean(0)  # (L,) the zoo-mean baseline
        row = {"fraction": fraction, "training_tasks": len(tasks), "train_seconds": time.perf_counter() - started}
        errors, mean_errors, ppl, ppl_mean, ppl_base = [], [], [], [], []
        for task in validation:
            vector = generator.sample(inputs.conditions[task].mean(0), z="zero")[0]  # (L,)
            snaps = zoo.vectors[task]  # (S, L)
            errors.append(float((snaps - vector).square().mean()))
            mean_errors.append(float((snaps - mean).square().mean()))
            ppl.append(log_ppl(swap, tokenizer, vector, texts[task], cfg.evaluate.max_length))
            ppl_mean.append(log_ppl(swap, tokenizer, mean, texts[task], cfg.evaluate.max_length))
            ppl_base.append(log_ppl(swap, tokenizer, None, texts[task], cfg.evaluate.max_length))
        row.update(val_unseen_mse=sum(errors) / len(errors), zoo_mean_mse=sum(mean_errors) / len(mean_errors),
                   val_log_ppl=sum(ppl) / len(ppl), zoo_mean_log_ppl=sum(ppl_mean) / len(ppl_mean),
                   base_log_ppl=sum(ppl_base) / len(ppl_base))
        rows.append(row)
        print(row, flush=True)
    out = Path(args.out or cfg.storage.path("bench-tasks"))
    out.mkdir(parents=True, exist_ok=True)
    frame = pd.DataFrame(rows)
    print(frame.to_markdown(index=False, floatfmt=".4g"))
    (out / "tasks_scaling.json").write_text(json.dumps(
        {"validation_tasks": validation, "rows": rows, "generator": cfg.generator.model_dump(mode="json")},
        indent=2))
    plot(frame, out / "tasks_scaling.png", cfg.generator.arch)
    return 0


def plot(frame: pd.DataFrame, path: Path, arch: str) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 4))
    left, right = fig.subplots(1, 2)
    left.plot(frame["training_tasks"], frame["val_unseen_mse"], "o-", label=f"generator ({arch})")
    left.plot(frame["training_tasks"], frame["zoo_mean_mse"], "s--", label="zoo mean")
    left.set_xlabel("training tasks used")
    left.set_ylabel("validation MSE (weights)")
    left.legend()
    right.plot(frame["training_tasks"], frame["val_log_ppl"], "o-", label=f"generator ({arch})")
    right.plot(frame["training_tasks"], frame["zoo_mean_log_ppl"], "s--", label="zoo mean")
    right.plot(frame["training_tasks"], frame["base_log_ppl"], ":", label="base model")
    right.set_xlabel("training tasks used")
    right.set_ylabel("validation log perplexity")
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
