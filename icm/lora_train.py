"""Ray-free pieces of LoRA fine-tuning for the zoo: model, batches, schedule, DeepSpeed config.

The Ray Train job (``jobs/zoo.py``) calls these from its ``train_func``; a plain
single-process loop (benchmarks, tests) calls the same functions, so both paths train on the
same batches with the same initialisation.
"""

from __future__ import annotations

import hashlib
import importlib
import logging
import os
import random
import sys
from collections.abc import Iterator, Sequence

import torch

from icm.config import ZooConfig
from icm.errors import InputError
from icm.models import right_pad, text_start_token_id

log = logging.getLogger(__name__)
IGNORE_INDEX = -100  # labels with this value add nothing to the loss (padding)


class TrainInputError(InputError):
    """A zoo setting that cannot work with this model or data; names the config field."""


def check_target_modules(model, targets: Sequence[str]) -> None:
    """Fail before training when a target module name matches no linear layer of ``model``."""
    leaf_names = {name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                  if isinstance(module, torch.nn.Linear)}
    missing = [t for t in targets if t not in leaf_names]
    if missing:
        raise TrainInputError(f"zoo.target_modules: {missing} match no linear layer of this model; "
                              f"available: {sorted(leaf_names)}.")


def lora_config(cfg: ZooConfig):
    from peft import LoraConfig

    return LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                      target_modules=list(cfg.target_modules), bias="none", task_type="CAUSAL_LM")


def build_lora_model(base_model, cfg: ZooConfig):
    """Wrap ``base_model`` in a peft LoRA whose initial weights depend only on ``cfg.init_seed``.

    peft draws A from torch's global RNG (B starts at zero); seeding it here, in a forked RNG
    state, gives every task the same starting point without touching the caller's RNG.
    """
    from peft import get_peft_model

    check_target_modules(base_model, cfg.target_modules)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.init_seed)
        return get_peft_model(base_model, lora_config(cfg))


def tokenize_texts(tokenizer, texts: Sequence[str], seq_len: int) -> list[list[int]]:
    """Token ids per text: start token + text + EOS, cut to ``seq_len``."""
    start, eos = text_start_token_id(tokenizer), tokenizer.eos_token_id
    encoded = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    return [([start, *ids, eos] if eos is not None else [start, *ids])[:seq_len] for ids in encoded]


def collate(sequences: Sequence[Sequence[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest sequence; padded positions get label -100 and mask 0."""
    input_ids, mask = right_pad(sequences, pad_id)  # (B, T) each
    labels = input_ids.masked_fill(mask == 0, IGNORE_INDEX)  # (B, T)
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def batch_for_step(sequences: Sequence[Sequence[int]], *, step: int, batch_size: int, seed: int,
                   rank: int = 0, world_size: int = 1, pad_id: int) -> dict[str, torch.Tensor]:
    """The batch rank ``rank`` trains on at ``step``: a function of (seed, step) only, so a run
    resumed at step k sees exactly the batches an uninterrupted run would have seen.

    ``batch_size`` is the global batch; each rank takes its own slice of it.
    """
    if batch_size % world_size:
        raise TrainInputError(f"zoo.batch_size ({batch_size}) must be divisible by "
                              f"zoo.num_workers ({world_size}).")
    rng = random.Random(f"{seed}-{step}")
    picks = [rng.randrange(len(sequences)) for _ in range(batch_size)]
    per_rank = batch_size // world_size
    return collate([sequences[i] for i in picks[rank * per_rank:(rank + 1) * per_rank]], pad_id)


def snapshot_steps(total_steps: int, count: int, start_fraction: float) -> list[int]:
    """``count`` distinct steps spread evenly over the late part of training, ending at the last.

    >>> snapshot_steps(100, 4, 0.5)
    [63, 75, 88, 100]
    """
    first = start_fraction * total_steps
    steps = sorted({round(first + (total_steps - first) * (i + 1) / count) for i in range(count)})
    if len(steps) < count or steps[0] < 1:
        raise TrainInputError(f"zoo.steps ({total_steps}) is too few for {count} distinct "
                              f"snapshots after zoo.snapshot_start={start_fraction}; raise zoo.steps.")
    return steps


def warmup_decay_params(cfg: ZooConfig) -> dict:
    """DeepSpeed WarmupDecayLR settings of a zoo LoRA run (`warmup_decay_schedule`)."""
    return warmup_decay_schedule(lr=cfg.lr, steps=cfg.steps, warmup_steps=cfg.warmup_steps)


def warmup_decay_schedule(*, lr: float, steps: int, warmup_steps: int) -> dict:
    """DeepSpeed WarmupDecayLR settings for a linear warm-up whose FIRST step already trains.

    DeepSpeed's linear warm-up gives step i (from 0) min + (max - min) * i / W with W >= 2, so
    from min 0 the first optimizer step had lr 0: a 12-step LoRA trained 11 steps. With min =
    max / (W + 1) step i gets max * (i + 1) / (W + 1), reaching max at W, then decays to min.
    """
    warmup = max(2, min(warmup_steps, max(steps - 1, 1)))  # DeepSpeed's floor is 2
    return {"warmup_min_lr": lr / (warmup + 1), "warmup_max_lr": lr, "warmup_type": "linear",
            "warmup_num_steps": warmup, "total_num_steps": steps}


def deepspeed_config(cfg: ZooConfig, *, world_size: int, bf16: bool) -> dict:
    """The DeepSpeed config for one task's LoRA run (a plain dict, recorded with the outputs)."""
    return {
        "train_batch_size": cfg.batch_size,
        "train_micro_batch_size_per_gpu": cfg.batch_size // world_size,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 1.0,
        "zero_optimization": {"stage": cfg.zero_stage},
        "bf16": {"enabled": bf16},
        # torch's AdamW: DeepSpeedCPUAdam would JIT-compile a C++ op (~40 s) on first use.
        "optimizer": {"type": "AdamW", "params": {"lr": cfg.lr, "weight_decay": cfg.weight_decay,
                                                  "torch_adam": True}},
        "scheduler": {"type": "WarmupDecayLR", "params": warmup_decay_params(cfg)},
        "steps_per_print": 10**9,  # progress is reported through Ray, not DeepSpeed's logger
        "wall_clock_breakdown": False,
    }


def skip_deepspeed_shm_build() -> None:
    """Stop DeepSpeed from JIT-building its shared-memory op on CPU (24 s on first use).

    Only inference all-reduce uses that op. ``deepspeed.comm.torch`` must be fetched from
    ``sys.modules``: ``import deepspeed.comm.torch as m`` binds the real ``torch`` package.
    """
    if os.environ.get("DS_ACCELERATOR", "cpu") != "cpu" or torch.cuda.is_available():
        return
    module = sys.modules.get("deepspeed.comm.torch") or importlib.import_module("deepspeed.comm.torch")
    module.build_shm_op = lambda: None


def exclude_tied_frozen_params_from_checkpoints(engine) -> None:
    """Make ``save_checkpoint(exclude_frozen_parameters=True)`` really leave the base model out.

    DeepSpeed drops frozen weights by walking ``named_parameters()``, which lists a tied weight
    once: the second name (``lm_head.weight`` tied to ``embed_tokens.weight``) stays in the module
    state, 113 MB per SmolLM2 checkpoint. The frozen base is rebuilt from the model spec on
    resume, so the checkpoint needs only the LoRA weights and the optimizer state.
    """
    original = engine.module_state_dict

    def module_state_dict(*args, exclude_frozen_parameters: bool = False, **kwargs):
        state = original(*args, exclude_frozen_parameters=exclude_frozen_parameters, **kwargs)
        if exclude_frozen_parameters:
            for name, param in engine.module.named_parameters(remove_duplicate=False):
                if not param.requires_grad:
                    state.pop(name, None)
        return state

    engine.module_state_dict = module_state_dict


def step_seed(seed: int, step: int, rank: int = 0) -> int:
    """The torch seed of one training step on one rank: a function of (seed, step, rank) only.

    It draws the step's LoRA dropout masks. Left to the process's global RNG they depended on
    whatever ran before in that process (the trainer's earlier tasks, a resume's fresh start), so
    a LoRA resumed after a kill, or trained after another task, differed from one trained alone.
    Like ``batch_for_step``'s batches, a step's masks now depend only on where it is.
    """
    digest = hashlib.sha256(f"{seed}-{step}-{rank}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1  # torch.manual_seed takes < 2**63


def train_step(engine, batch: dict[str, torch.Tensor], *, seed: int) -> float:
    """One DeepSpeed step (forward, backward, optimizer + scheduler); returns the loss.

    ``seed`` (``step_seed``) seeds torch's RNG, CUDA's included, for the step's dropout.
    """
    torch.manual_seed(seed)
    batch = {k: v.to(engine.device) for k, v in batch.items()}
    loss = engine(**batch).loss
    engine.backward(loss)
    engine.step()
    return float(loss.detach())


def iterate_steps(start: int, total: int) -> Iterator[int]:
    """1-based step numbers still to run after ``start`` completed steps."""
    return iter(range(start + 1, total + 1))


def release_engine(engine) -> None:
    """Free a finished task's DeepSpeed engine and model before the next task in the same process.

    DeepSpeed keeps every module's and parameter's name, with references to them, in a global
    debug table until ``engine.destroy()``; without it each task's model (and its optimizer
    state) stayed alive: ~0.7 GB more per task in a zoo trainer, enough to exhaust memory over a
    hundred tasks. The caller drops its own references; cycles are collected here.
    """
    import gc

    engine.destroy()
    gc.collect()

