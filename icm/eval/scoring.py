"""Score every variant of one `EvalItem` on its task's eval texts, on one loaded base model.

Rows: one per (variant, sample) with totals, perplexity, bits/char and the per-text NLL and
token counts that the intervals are bootstrapped from. Every variant of a task is scored on the
same texts, cut at the same length, so the comparisons are paired text by text.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from icm.config import EvalConfig, ModelConfig, TaskVectorConfig
from icm.eval.inputs import EvalItem
from icm.eval.variants import (VARIANTS, AdapterSource, Variant, condition_under_prompt,
                               under_prompt)


def adapter_vector(source: AdapterSource, finals: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """(L,) flat vector: the mean of the named snapshots, or the weighted sum of final LoRAs."""
    from icm.zoo import load_vector

    if source.snapshots:
        return torch.stack([load_vector(path) for path in source.snapshots]).mean(dim=0)
    return sum(weight * finals[task] for task, weight in source.combination)


class ItemScorer:
    """Holds one task's model, generator, texts and demonstrations while its variants are scored."""

    def __init__(self, item: EvalItem, finals: Mapping[str, torch.Tensor], *, model: ModelConfig,
                 cfg: EvalConfig, task_vectors: TaskVectorConfig):
        from icm.adapter_swap import SwappableLora
        from icm.generator import LoraGenerator
        from icm.models import load_base_model
        from icm.task_vectors import sample_demos
        from icm.tasks import load_task
        from icm.zoo import lora_format

        self.item, self.finals, self.cfg = item, finals, cfg
        self.task = task = load_task(item.task_path)
        self.texts = task.eval_texts()[:cfg.max_texts] if cfg.max_texts else task.eval_texts()
        # The demonstrations of episode 0, as the task vectors drew them: what best-of-K selects on
        # and what the in-context baseline reads.
        self.demos = sample_demos(task, task_vectors, episode=0)
        self.description = task.description
        self.train_texts = [text for text in task.train_texts() if text.strip()]  # lorahub-train's
        self.max_demo_chars, self.task_vectors = task_vectors.max_demo_chars, task_vectors
        self.model, self.tokenizer = load_base_model(model.spec, cache_dir=model.cache_dir,
                                                     dtype=model.dtype)
        # A setting none of whose chosen variants reads a generator has none (None): the zoo
        # gives the LoRA format the flat vectors load into.
        self.generator = LoraGenerator.load(item.generator_dir) if item.generator_dir else None
        peft_config, self.layout = ((self.generator.peft_config, self.generator.layout) if self.generator
                                    else lora_format(item.lora_format_dir))
        self.swap = SwappableLora(self.model, peft_config, self.layout)
        self.applier = None  # a FunctionalLora on self.swap.model, made when a fit needs it
        self.rows: list[dict[str, Any]] = []
        self.oracle: torch.Tensor | None = None
        # condition mode -> (draws (K, L), seconds per draw, demo perplexities): `_scored_draws`
        self._draws: dict[str, tuple[torch.Tensor, float, list[float]]] = {}

    def score(self, variant: str, vector: torch.Tensor | None, **extra) -> None:
        started = time.perf_counter()
        if vector is not None:
            self.swap.load(vector, variant)
        result = self.swap.score(self.tokenizer, self.texts, max_length=self.cfg.max_length,
                                 batch_size=self.cfg.batch_size, base=vector is None)
        self._row(variant, result, vector, started, **extra)

    def _row(self, variant: str, result, vector: torch.Tensor | None, started: float, **extra) -> None:
        from icm.eval.weights import delta_cosine

        similarity = None
        if vector is not None and self.oracle is not None:
            similarity = delta_cosine(vector, self.oracle, self.layout)
        self.rows.append({"variant": variant, **result.as_dict(), "delta_cosine_to_oracle": similarity,
                          "eval_seconds": time.perf_counter() - started, **extra})

    def run(self, variant: Variant) -> None:
        if variant.kind == "base":
            self.score(variant.name, None)
        elif variant.kind == "adapter":
            vector, fit = self._adapter(self.item.adapters[variant.name])
            if variant.name == "oracle":
                self.oracle = vector
            self.score(variant.name, vector, **fit)
        elif variant.kind == "generated":
            self._generated(variant)
        elif variant.kind == "in-context":
            self._in_context(variant)
        elif variant.kind == "selected":
            self._selected(variant)
        else:
            raise ValueError(f"variant {variant.name!r}: unknown kind {variant.kind!r}")

    def _adapter(self, source: AdapterSource) -> tuple[torch.Tensor, dict[str, Any]]:
        """(L,) an adapter variant's vector, and the fit's record for its row when the source
        asks for its combination to be refitted on the task's texts (else {})."""
        if source.fit_on is None:
            return adapter_vector(source, self.finals), {}
        from icm.eval.loss_fit import LossFitSettings, fit_combination
        from icm.lora_train import tokenize_texts

        names = [task for task, _ in source.combination]
        texts = self.demos if source.fit_on == "demos" else self.train_texts[:self.cfg.lorahub_train_texts]
        settings = LossFitSettings(steps=self.cfg.lorahub_steps, lr=self.cfg.lorahub_lr,
                                   batch_size=self.cfg.lorahub_batch_size, seed=self.cfg.seed)
        vectors = torch.stack([self.finals[task] for task in names])  # (T, L)
        weights, record = fit_combination(
            self._applier(), vectors,
            tokenize_texts(self.tokenizer, list(texts), self.cfg.max_length),
            start=torch.tensor([w for _, w in source.combination]),
            pad_id=self.tokenizer.pad_token_id or 0, settings=settings)
        record.update(on=source.fit_on, weights=json.dumps(dict(zip(names, weights.tolist()))))
        return weights @ vectors, {"fit_" + key: value for key, value in record.items()}

    def _draw(self, condition: np.ndarray, count: int, z: str, scale: float = 1.0
              ) -> tuple[torch.Tensor, float]:
        started = time.perf_counter()
        draws = self.generator.sample(np.asarray(condition, dtype=np.float32), num_samples=count,
                                      seed=self.cfg.seed, z=z, condition_scale=scale)  # (count, L)
        return draws, (time.perf_counter() - started) / count

    def _generated(self, variant: Variant) -> None:
        condition = self.item.conditions.get(variant.condition)
        if condition is None:
            return
        scale = variant.condition_scale
        if variant.z == "zero":
            draws, seconds = self._draw(condition, 1, "zero", scale)
            self.score(variant.name, draws[0], adapter_seconds=seconds)
        elif variant.z == "random":
            draws, seconds = self._draw(condition, self.cfg.samples, "random", scale)
            for index in range(self.cfg.samples):
                self.score(variant.name, draws[index], sample=index, adapter_seconds=seconds)
        else:  # best of K by perplexity on the demonstrations (the same seed: the same first draws)
            draws, seconds, demo_ppl = self._scored_draws(variant.condition)
            best = int(np.argmin(demo_ppl))
            self.score(variant.name, draws[best], sample=best, adapter_seconds=seconds * self.cfg.best_of,
                       demo_ppl=demo_ppl[best], draw_spread=draw_spread(draws))

    def _scored_draws(self, condition: str) -> tuple[torch.Tensor, float, list[float]]:
        """The generator's best_of draws (K, L) for a condition mode, the generation seconds per
        draw, and each draw's demonstration perplexity: computed once per item, read by the
        best-of-K and selected variants alike."""
        if condition not in self._draws:
            draws, seconds = self._draw(self.item.conditions[condition], self.cfg.best_of, "random")
            demo_ppl = [self._demo_perplexity(draw, f"draw-{i}") for i, draw in enumerate(draws)]
            self._draws[condition] = (draws, seconds, demo_ppl)
        return self._draws[condition]

    def _demo_perplexity(self, vector: torch.Tensor, name: str) -> float:
        self.swap.load(vector, name)
        return self.swap.score(self.tokenizer, list(self.demos), max_length=self.cfg.max_length,
                               batch_size=self.cfg.batch_size).perplexity

    def _selected(self, variant: Variant) -> None:
        """The candidate with the lowest demonstration perplexity: the generator's best_of draws
        (generated-best-of-k's, same seed) and the adapters of ``variant.among`` that apply."""
        if variant.condition not in self.item.conditions:
            return
        started = time.perf_counter()
        draws, seconds, draw_ppl = self._scored_draws(variant.condition)  # (K, L)
        candidates = {f"draw-{index}": draw for index, draw in enumerate(draws)}
        demo_ppl = dict(zip(candidates, draw_ppl))
        for name in variant.among:
            source = self.item.adapters.get(name)
            if source is None:  # not available for this task
                continue
            if source.fit_on is not None:  # fitted on these very demos
                raise ValueError(f"variant {variant.name!r}: candidate {name!r} is fitted on the "
                                 "demonstrations it would be selected on")
            candidates[name] = self._adapter(source)[0]
            demo_ppl[name] = self._demo_perplexity(candidates[name], name)
        chosen = min(demo_ppl, key=demo_ppl.get)
        # selection_seconds leaves out the draws' scoring where best-of-K already did it
        self.score(variant.name, candidates[chosen], selected_candidate=chosen,
                   demo_ppl=demo_ppl[chosen], candidate_demo_ppl=json.dumps(demo_ppl),
                   adapter_seconds=seconds * self.cfg.best_of,
                   selection_seconds=time.perf_counter() - started)

    def _in_context(self, variant: Variant) -> None:
        from icm.eval.baselines import in_context_prefix, score_in_context

        started = time.perf_counter()
        vector = self._adapter_under_prompt(variant)  # (L,) or None: the base model reads it
        if variant.with_adapter and vector is None:
            return  # that adapter does not apply to this task
        fit = {}
        if variant.finetune:
            vector, fit = self._finetuned_under_prompt(vector, variant.prompt_mode,
                                                       variant.finetune)
        prefix = in_context_prefix(self.description, self.demos, self.max_demo_chars,
                                   mode=variant.prompt_mode)
        if vector is not None:
            self.swap.load(vector, variant.name)
        with self.swap.base() if vector is None else contextlib.nullcontext(self.swap.model) as model:
            result = score_in_context(model, self.tokenizer, self.texts, prefix,
                                      max_length=self.cfg.max_length, batch_size=self.cfg.batch_size)
        self._row(variant.name, result, vector, started, **fit)

    def _finetuned_under_prompt(self, start: torch.Tensor, mode: str, texts: str
                                ) -> tuple[torch.Tensor, dict[str, Any]]:
        """(L,) ``start`` fine-tuned on the task's train texts (``texts`` "train") or on its
        episodes' demonstrations ("demos"), each batch read after one of its episode prompts of
        ``mode`` (the kind of prompt it is then scored under), and the fit's record."""
        from icm.eval.loss_fit import PromptFitSettings, fit_under_prompt
        from icm.generator.lm import EpisodePrompt, PromptContext
        from icm.task_vectors import build_episodes

        prompts = [EpisodePrompt(episode.prompt, episode.demos)
                   for episode in build_episodes(self.task, self.task_vectors, mode=mode)]
        fit_texts = (self.train_texts if texts == "train"
                     else list(dict.fromkeys(demo for p in prompts for demo in p.demos)))
        context = PromptContext.build(fit_texts, prompts, self.tokenizer, self.cfg.max_length)
        cfg = self.cfg
        settings = PromptFitSettings(steps=cfg.finetune_steps, lr=cfg.finetune_lr,
                                     batch_size=cfg.finetune_batch_size,
                                     warmup_steps=cfg.finetune_warmup_steps, seed=cfg.seed)
        fitted, record = fit_under_prompt(self._applier(), start, context, settings=settings,
                                          pad_id=self.tokenizer.pad_token_id or 0)
        record.update(on=texts, texts=len(fit_texts))
        return fitted, {"fit_" + key: value for key, value in record.items()}

    def _applier(self):
        """A FunctionalLora on the scoring model itself (LoRAs passed per call), made once."""
        from icm.generator.lm import FunctionalLora

        if self.applier is None:
            self.applier = FunctionalLora.on_peft_model(self.swap.model, self.layout)
        return self.applier

    def _adapter_under_prompt(self, variant: Variant) -> torch.Tensor | None:
        """(L,) the adapter active while an in-context variant reads its prompt, if it names one
        that applies here: an adapter variant's vector, or one draw of the generator."""
        under = under_prompt(variant)
        if under is None:
            return None
        if under.kind == "adapter":
            source = self.item.adapters.get(under.name)
            return self._adapter(source)[0] if source else None
        condition = self.item.conditions.get(condition_under_prompt(variant))
        if condition is None:
            return None
        return self._draw(condition, 1, "random", under.condition_scale)[0][0]


def draw_spread(draws: torch.Tensor) -> float:
    """Mean distance of the draws from their mean, relative to the mean's norm: how much the
    latent changes the adapter (0 = every draw the same)."""
    centre = draws.mean(dim=0)
    return float((draws - centre).norm(dim=1).mean() / centre.norm().clamp_min(1e-12))


def evaluate_item(item: EvalItem, finals: Mapping[str, torch.Tensor], *, model: ModelConfig,
                  cfg: EvalConfig, task_vectors: TaskVectorConfig) -> list[dict]:
    """Rows of (variant, sample, perplexity, per-text NLL, ...) for one task in one setting.
    The oracle is scored first so that every later adapter's dW cosine to it is recorded."""
    scorer = ItemScorer(item, finals, model=model, cfg=cfg, task_vectors=task_vectors)
    order = sorted(item.variants, key=lambda name: name != "oracle")
    for name in order:
        scorer.run(VARIANTS[name])
    for row in scorer.rows:
        row.update(task=item.task, group=item.group, setting=item.setting, fold=item.fold,
                   heldout=item.setting != "seen")
    return scorer.rows
