"""Combination weights over a LoRA zoo fitted by the frozen base model's language-modelling loss
(LoraHub, Huang et al. 2023, with gradients instead of a gradient-free search).

The adapter is the flat combination ``sum_t w_t theta_t`` of the training tasks' final LoRAs, the
family every weight baseline here belongs to (soup, similarity soup, nearest, ridge). Instead of
reading the weights off task vectors, they are fitted on texts of the task itself: its k
demonstrations (what a user with the zoo and a few examples can do, no generator needed) or its
whole train split (the oracle's own data: about the lowest loss any weights over the zoo reach).
Only the T weights move; the base model and every LoRA stay frozen.
"""

from __future__ import annotations

import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class LossFitSettings:
    """How the weights are fitted: Adam on the mean token NLL of minibatches of the texts."""

    steps: int = 40
    lr: float = 0.01
    batch_size: int = 8  # texts per step; fewer texts than this: all of them every step
    seed: int = 0


def fit_combination(applier, vectors: torch.Tensor, sequences: Sequence[Sequence[int]], *,
                    start: torch.Tensor, pad_id: int, settings: LossFitSettings
                    ) -> tuple[torch.Tensor, dict[str, Any]]:
    """Weights (T,) of the flat combination ``weights @ vectors`` that lower the LM loss of
    ``sequences`` (token ids, start token first) under ``applier`` (`FunctionalLora`).

    Args:
        vectors: (T, L) the combined LoRAs' flat vectors, in the applier's layout.
        start: (T,) the weights the fit starts from (e.g. the uniform soup's).

    Returns:
        The fitted weights and a record: loss at the start and end of the fit (on the step's
        batch), the weights' sum and largest magnitude, seconds.
    """
    from icm.lora_train import collate

    if vectors.ndim != 2 or start.shape != (len(vectors),):
        raise ValueError(f"vectors must be (T, L) and start (T,); got {tuple(vectors.shape)} "
                         f"and {tuple(start.shape)}")
    if not sequences or settings.steps < 1:
        raise ValueError("no texts to fit combination weights on, or settings.steps < 1")
    started = time.perf_counter()
    vectors = vectors.to(applier.device)
    weights = start.detach().clone().float().to(applier.device).requires_grad_(True)  # (T,)
    optimizer = torch.optim.Adam([weights], lr=settings.lr)
    rng, sequences = random.Random(f"loss-fit-{settings.seed}"), list(sequences)
    losses = []
    for _ in range(settings.steps):
        batch = (sequences if len(sequences) <= settings.batch_size
                 else rng.sample(sequences, settings.batch_size))
        loss = applier.nll(weights @ vectors, collate(batch, pad_id))  # (T,) @ (T, L) -> (L,)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    fitted = weights.detach().cpu()
    record = {"start_nll": losses[0], "end_nll": losses[-1],
              "weight_sum": float(fitted.sum()), "max_abs_weight": float(fitted.abs().max()),
              "texts": len(sequences), "steps": settings.steps,
              "seconds": time.perf_counter() - started}
    return fitted, record


@dataclass(frozen=True)
class PromptFitSettings:
    """How a whole adapter is fine-tuned under the prompt: the zoo's recipe (AdamW, DeepSpeed's
    WarmupDecayLR as the zoo sets it, gradient norm clipped at 1), each step's texts read after
    one episode prompt. The zoo's LoRA dropout is left out: the scoring model stays in eval mode."""

    steps: int
    lr: float
    batch_size: int  # texts per step, all after the same prompt
    warmup_steps: int
    seed: int = 0


def fit_under_prompt(applier, start: torch.Tensor, context, *, pad_id: int,
                     settings: PromptFitSettings) -> tuple[torch.Tensor, dict[str, Any]]:
    """The flat adapter (L,) that ``start`` becomes when every LoRA weight is fine-tuned by the
    LM loss of a task's train texts, each batch read after one of its episode prompts
    (``context``: `icm.generator.lm.PromptContext`, whose rows never target their own
    demonstrations), under ``applier`` (`FunctionalLora`; the base model stays frozen).

    Returns:
        The fitted vector and a record: loss at the start and end of the fit (on the step's
        batch), the relative change of the vector, the summed learning rate, steps, seconds.
    """
    from deepspeed.runtime.lr_schedules import WarmupDecayLR

    from icm.lora_train import warmup_decay_schedule

    if start.ndim != 1 or settings.steps < 1 or not context.rows:
        raise ValueError(f"start must be (L,) (got {tuple(start.shape)}), settings.steps >= 1 "
                         "and the context must have a prompt row with a text to predict")
    started = time.perf_counter()
    vector = start.detach().clone().float().to(applier.device).requires_grad_(True)  # (L,)
    optimizer = torch.optim.AdamW([vector], lr=settings.lr, weight_decay=0.0)
    schedule = WarmupDecayLR(optimizer, **warmup_decay_schedule(
        lr=settings.lr, steps=settings.steps, warmup_steps=settings.warmup_steps))
    rng, losses, summed_lr = random.Random(f"prompt-fit-{settings.seed}"), [], 0.0
    for _ in range(settings.steps):
        row = rng.choice(context.rows)
        allowed = context.allowed[row]
        texts = (list(allowed) if len(allowed) <= settings.batch_size
                 else rng.sample(allowed, settings.batch_size))
        loss = applier.nll(vector, context.batch(row, texts, pad_id))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([vector], max_norm=1.0)  # the zoo's gradient_clipping
        summed_lr += optimizer.param_groups[0]["lr"]  # the rate this step uses
        optimizer.step()
        schedule.step()
        losses.append(float(loss.detach()))
    fitted = vector.detach().cpu()
    change = float((fitted - start.float().cpu()).norm() / start.float().norm().clamp_min(1e-12))
    record = {"start_nll": losses[0], "end_nll": losses[-1], "relative_change": change,
              "summed_lr": summed_lr, "prompts": len(context.rows), "steps": settings.steps,
              "seconds": time.perf_counter() - started}
    return fitted, record
