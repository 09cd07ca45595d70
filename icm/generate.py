"""One request end to end: a task's context in, a peft adapter directory out, no fine-tuning.

    description and/or examples --(frozen base LM, TaskEncoder)--> task vector
        --(LoraGenerator, z samples)--> flat LoRA vectors --(best by demo perplexity)--> adapter

This is what ``icm generate`` runs and what the Serve app calls per request; the batch jobs use
the same `TaskEncoder` and `LoraGenerator`, so a request and the evaluation agree.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from icm.errors import InputError

# The condition scales a request may ask for (Serve's POST /v1/adapters and `icm generate`): 0,
# the generator's blind mode, up to twice the condition's own strength
MAX_CONDITION_SCALE = 2.0


class GenerateInputError(InputError):
    """A generation request that cannot be served as given."""


@dataclass
class GeneratedAdapter:
    """The chosen flat vector, the demo perplexity of every draw, and the time each part took."""

    vector: torch.Tensor  # (L,)
    chosen: int
    # the in-context prompt the condition was read from: what a generator with
    # GeneratorConfig.reads_after_prompt has its adapter read after, when serving completions
    context_prompt: str = ""
    demo_perplexities: list[float] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)


class AdapterFactory:
    """The frozen base model, the task encoder and the generator, loaded once.

    Args:
        generator_dir: a generator artifact (``<storage.root>/generator``).
        cache_dir: model cache (None: the default).
        dtype: the base model's weights dtype (bfloat16 on GPUs; it goes to the GPU if one is seen).
    """

    def __init__(self, generator_dir: str | Path, *, cache_dir: str | None = None,
                 dtype: str = "float32"):
        from icm.adapter_swap import SwappableLora
        from icm.config import TaskVectorConfig
        from icm.generator import LoraGenerator
        from icm.models import load_base_model
        from icm.task_vectors import TaskEncoder

        self.generator = LoraGenerator.load(generator_dir)
        spec = self.generator.condition_spec
        self.key = (int(spec["layer"]), str(spec["pooling"]))
        model, self.tokenizer = load_base_model(self.generator.model_spec, cache_dir=cache_dir,
                                                dtype=dtype)
        if "task_vectors" not in spec:
            # A silent default could encode requests differently from the training conditions.
            raise GenerateInputError(f"generator {generator_dir} does not record the task-vector "
                                     "config its conditions were made with (condition_spec."
                                     "task_vectors). Fix: retrain it with `icm generator`.")
        self.task_vector_config = TaskVectorConfig.model_validate(spec["task_vectors"])
        self.encoder = TaskEncoder(model, self.tokenizer, self.task_vector_config)
        # The encoder keeps the bare base model; scoring draws wraps it in a LoRA that is only
        # active outside `swap.base()`, so the encoder runs on the base (disable_adapter below).
        self.swap = SwappableLora(model, self.generator.peft_config, self.generator.layout)

    def task_vector(self, description: str | None, examples: Sequence[str] | None) -> np.ndarray:
        """The condition vector of one request, (D,), at the generator's layer and pooling."""
        return self.encode_request(description, examples)[0]

    def encode_request(self, description: str | None, examples: Sequence[str] | None
                       ) -> tuple[np.ndarray, str]:
        """The condition vector of one request, (D,), and the in-context prompt it was read
        from (fitted once: the mode, the first k examples, the token budget)."""
        prompt = self.encoder.request_prompt(description, examples).prompt
        with self.swap.base():
            vectors = self.encoder.encode_prompts([prompt])
        return vectors[self.key][0], prompt

    def generate(self, description: str | None = None, examples: Sequence[str] | None = None, *,
                 samples: int = 1, select: str = "demo-ppl", seed: int = 0,
                 max_length: int = 128, condition_scale: float = 1.0) -> GeneratedAdapter:
        """Sample ``samples`` adapters for the request and keep one.

        With more than one sample and ``select="demo-ppl"`` the draw with the lowest perplexity
        on the given examples is kept (it needs examples); ``select="first"`` keeps draw 0.
        ``condition_scale`` shrinks the condition toward the generator's blind mode
        (`LoraGenerator.sample`).
        """
        if samples < 1:
            raise GenerateInputError("'samples' must be >= 1.")
        if select not in ("demo-ppl", "first"):
            raise GenerateInputError(f"'select' must be 'demo-ppl' or 'first', got {select!r}.")
        if not 0.0 <= condition_scale <= MAX_CONDITION_SCALE:  # NaN fails it too
            raise GenerateInputError(
                f"'condition_scale' must be in [0, {MAX_CONDITION_SCALE:g}] (1: the condition as "
                f"given, 0: the blind mode), got {condition_scale}.")
        if samples > 1 and select == "demo-ppl" and not examples:
            raise GenerateInputError("selecting by demo perplexity needs examples. Fix: pass "
                                     "examples, or samples=1, or select='first'.")
        timings: dict[str, float] = {}
        started = time.perf_counter()
        condition, context_prompt = self.encode_request(description, examples)
        timings["encode_s"] = time.perf_counter() - started
        started = time.perf_counter()
        draws = self.generator.sample(condition, num_samples=samples, seed=seed,
                                      condition_scale=condition_scale)  # (samples, L)
        timings["sample_s"] = time.perf_counter() - started
        result = GeneratedAdapter(vector=draws[0], chosen=0, timings=timings,
                                  context_prompt=context_prompt)
        if samples > 1 and select == "demo-ppl":
            started = time.perf_counter()
            result.demo_perplexities = self.demo_perplexities(draws, examples, max_length=max_length)
            result.chosen = int(np.argmin(result.demo_perplexities))
            result.vector = draws[result.chosen]
            timings["select_s"] = time.perf_counter() - started
        return result

    def demo_perplexities(self, draws: torch.Tensor, examples: Sequence[str], *,
                          max_length: int = 128) -> list[float]:
        """Perplexity of each draw, (K, L), on the request's examples (best-of-K selection)."""
        scores = []
        for row in draws:  # (L,)
            self.swap.load(row)
            scores.append(self.swap.score(self.tokenizer, list(examples), max_length=max_length,
                                          batch_size=8).perplexity)
        return scores

    def write(self, adapter: GeneratedAdapter, out_dir: str | Path, request: dict[str, Any]) -> Path:
        """Write the adapter in peft format, with a record of the request beside it."""
        return self.generator.write_adapter(adapter.vector, out_dir, extra={"icm_generation.json": {
            **request, "chosen_sample": adapter.chosen, "context_prompt": adapter.context_prompt,
            "demo_perplexities": adapter.demo_perplexities, "timings": adapter.timings,
            "base_model": self.generator.model_spec}})


def task_context(task_dir: str | Path, k: int, seed: int) -> tuple[str, list[str]]:
    """A task folder's description and ``k`` seeded demonstrations from its train split."""
    import random

    from icm.tasks import load_task

    task = load_task(task_dir)
    texts = task.train_texts()
    rng = random.Random(f"{seed}:{task.name}:generate")
    return task.description, [texts[i] for i in rng.sample(range(len(texts)), min(k, len(texts)))]


def read_examples(path: str | Path) -> list[str]:
    """Example texts from a JSONL file of ``{"text": ...}`` lines (the suite format)."""
    from icm.tasks import read_texts

    return read_texts(Path(path))
