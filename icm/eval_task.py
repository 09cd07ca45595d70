"""Score every variant of one task on its eval split, all on one loaded base model.

Variants (one row each; generated samples one row per sample):

    base                  the base model alone
    trained               the task's own trained LoRA (seen tasks only: the oracle)
    generated             the generator fed the task vector, z ~ N(0, I), ``samples`` draws
    generated-best-of-k   of K draws, the one with the lowest perplexity on the demonstrations
    generated-z0          z = 0 (the latent mean): the generator's deterministic answer
    cond-description      z = 0, conditioned on the description-only task vector
    cond-demos            z = 0, conditioned on the demonstrations-only task vector
    soup                  the mean of all training tasks' LoRAs
    nearest               the LoRA of the nearest training task by task vector (never itself)
    multitask             one LoRA trained on the union of the training tasks
    control-random        z = 0, a random task vector (matching the training vectors' statistics)
    control-shuffled      z = 0, another task's vector
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from icm.adapter_swap import SwappableLora
from icm.baselines import cosine
from icm.config import EvalConfig, ModelConfig
from icm.eval_inputs import TaskInputs


def _generate(generator, condition: np.ndarray, *, num_samples: int = 1, seed: int = 0,
              z: str = "random") -> tuple[torch.Tensor, float]:
    started = time.perf_counter()
    vectors = generator.sample(np.asarray(condition, dtype=np.float32), num_samples=num_samples,
                               seed=seed, z=z)
    return vectors, (time.perf_counter() - started) / num_samples


def evaluate_task(inputs: TaskInputs, shared: Mapping[str, torch.Tensor], generator_dir: str, *,
                  model: ModelConfig, cfg: EvalConfig, random_condition: np.ndarray) -> list[dict]:
    """Rows of (variant, sample, perplexity, bits/char, ...) for one task."""
    from icm.generator import LoraGenerator
    from icm.models import load_base_model
    from icm.tasks import load_task

    task = load_task(inputs.task_path)
    texts = task.eval_texts()[:cfg.max_texts] if cfg.max_texts else task.eval_texts()
    demos = task.train_texts()[:cfg.select_texts]
    base_model, tokenizer = load_base_model(model.spec, cache_dir=model.cache_dir, dtype=model.dtype)
    generator = LoraGenerator.load(generator_dir)
    swap = SwappableLora(base_model, generator.peft_config, generator.layout)
    rows: list[dict[str, Any]] = []

    def score(variant: str, vector: torch.Tensor | None, **extra) -> float:
        started = time.perf_counter()
        if vector is not None:
            swap.load(vector, variant)
        result = swap.score(tokenizer, texts, max_length=cfg.max_length,
                            batch_size=cfg.batch_size, base=vector is None)
        cos = cosine(vector, inputs.trained) if vector is not None and inputs.trained is not None else None
        rows.append({"variant": variant, **result.as_dict(), "cosine_to_trained": cos,
                     "eval_seconds": time.perf_counter() - started, **extra})
        return result.perplexity

    score("base", None)
    if inputs.trained is not None:
        score("trained", inputs.trained, adapter_seconds=inputs.finetune_seconds)
    both = inputs.conditions["both"]
    draws, seconds = _generate(generator, both, num_samples=max(cfg.samples, cfg.best_of), seed=cfg.seed)
    for index in range(cfg.samples):
        score("generated", draws[index], sample=index, adapter_seconds=seconds)
    demo_ppl = []
    for index in range(cfg.best_of):
        swap.load(draws[index], f"draw-{index}")
        demo_ppl.append(swap.score(tokenizer, demos, max_length=cfg.max_length,
                                   batch_size=cfg.batch_size).perplexity)
    best = int(np.argmin(demo_ppl))
    if best < cfg.samples:  # already scored as one of the samples: the same adapter, same texts
        scored = next(r for r in rows if r["variant"] == "generated" and r["sample"] == best)
        rows.append({**scored, "variant": "generated-best-of-k", "adapter_seconds": seconds * cfg.best_of,
                     "demo_ppl": demo_ppl[best]})
    else:
        score("generated-best-of-k", draws[best], sample=best, adapter_seconds=seconds * cfg.best_of,
              demo_ppl=demo_ppl[best])
    for variant, condition in (("generated-z0", both),
                               ("cond-description", inputs.conditions.get("description")),
                               ("cond-demos", inputs.conditions.get("demos")),
                               ("control-random", random_condition),
                               ("control-shuffled", inputs.shuffled_condition)):
        if condition is not None:
            vector, seconds = _generate(generator, condition, z="zero")
            score(variant, vector[0], adapter_seconds=seconds)
    for variant, vector in (("soup", shared.get("soup")), ("nearest", inputs.nearest_vector),
                            ("multitask", shared.get("multitask"))):
        if vector is not None:
            score(variant, vector, **({"source": inputs.nearest} if variant == "nearest" else {}))
    for row in rows:
        row.update(task=inputs.task, group=inputs.group, heldout=inputs.heldout)
    return rows
