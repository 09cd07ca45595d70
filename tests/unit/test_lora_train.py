"""Ray-free LoRA training pieces: fixed init, masked batches, resume-safe sampling, schedule."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from icm.config import ZooConfig
from icm.lora_io import adapter_state_dict
from icm.lora_train import (IGNORE_INDEX, TrainInputError, batch_for_step, build_lora_model,
                            collate, deepspeed_config, snapshot_steps, step_seed, tokenize_texts)
from icm.models import load_base_model
from tests.conftest import REPO_ROOT


def test_every_task_starts_from_the_same_lora_init():
    first = adapter_state_dict(build_lora_model(load_base_model("tiny-llama")[0], ZooConfig(rank=4)))
    again = adapter_state_dict(build_lora_model(load_base_model("tiny-llama")[0], ZooConfig(rank=4)))
    other = adapter_state_dict(build_lora_model(load_base_model("tiny-llama")[0],
                                                ZooConfig(rank=4, init_seed=1)))
    assert all(torch.equal(first[k], again[k]) for k in first)
    a_keys = [k for k in first if "lora_A" in k]
    assert a_keys and not all(torch.equal(first[k], other[k]) for k in a_keys)
    assert all(not first[k].any() for k in first if "lora_B" in k)  # B starts at zero


def test_unknown_target_module_names_the_field():
    with pytest.raises(TrainInputError, match=r"zoo.target_modules: \['qkv'\].*available: \[.*q_proj"):
        build_lora_model(load_base_model("tiny-llama")[0], ZooConfig(target_modules=["q_proj", "qkv"]))


def test_padding_is_masked_out_of_the_labels(tiny_llama):
    _, tokenizer = tiny_llama
    sequences = tokenize_texts(tokenizer, ["a short text", "a somewhat longer text than that one"], 64)
    batch = collate(sequences, pad_id=tokenizer.pad_token_id)
    short = len(sequences[0])
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    assert (batch["labels"][0, short:] == IGNORE_INDEX).all() and batch["attention_mask"][0, short:].sum() == 0
    assert torch.equal(batch["labels"][1], batch["input_ids"][1])
    assert tokenize_texts(tokenizer, ["word " * 500], 32)[0].__len__() == 32


def test_batches_depend_only_on_seed_and_step_and_ranks_split_them():
    sequences = [[1, i, i + 1] for i in range(50)]
    one = batch_for_step(sequences, step=7, batch_size=4, seed=3, pad_id=0)
    assert torch.equal(one["input_ids"], batch_for_step(sequences, step=7, batch_size=4, seed=3, pad_id=0)["input_ids"])
    assert not torch.equal(one["input_ids"], batch_for_step(sequences, step=8, batch_size=4, seed=3, pad_id=0)["input_ids"])
    halves = [batch_for_step(sequences, step=7, batch_size=4, seed=3, rank=r, world_size=2, pad_id=0)
              for r in (0, 1)]
    assert torch.equal(torch.cat([h["input_ids"] for h in halves]), one["input_ids"])
    with pytest.raises(TrainInputError, match="zoo.batch_size .* divisible by zoo.num_workers"):
        batch_for_step(sequences, step=1, batch_size=3, seed=0, world_size=2, pad_id=0)


def test_snapshot_schedule_is_late_distinct_and_ends_at_the_last_step():
    steps = snapshot_steps(200, 8, 0.5)
    assert len(steps) == 8 and steps[-1] == 200 and steps[0] > 100 and steps == sorted(set(steps))
    with pytest.raises(TrainInputError, match="raise zoo.steps"):
        snapshot_steps(6, 8, 0.5)


def test_deepspeed_config_and_zoo_config_validation():
    cfg = ZooConfig(batch_size=4, zero_stage=3, steps=50)
    ds = deepspeed_config(cfg, world_size=2, bf16=False)
    assert ds["train_micro_batch_size_per_gpu"] == 2 and ds["zero_optimization"]["stage"] == 3
    assert ds["scheduler"]["params"]["total_num_steps"] == 50 and not ds["bf16"]["enabled"]
    from pydantic import ValidationError

    for bad in ({"rank": 0}, {"zero_stage": 4}, {"target_modules": []}, {"target_modules": ["q_proj", "q_proj"]}):
        with pytest.raises(ValidationError):
            ZooConfig(**bad)


@pytest.mark.parametrize("steps,warmup", [(12, 2), (3, 0), (2, 2), (50, 10)])
def test_every_optimizer_step_trains_from_the_first(steps, warmup):
    """DeepSpeed's own WarmupDecayLR, driven as the engine drives it: no step at lr 0."""
    import torch
    from deepspeed.runtime.lr_schedules import WarmupDecayLR

    cfg = ZooConfig(steps=steps, warmup_steps=warmup, lr=0.005)
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=cfg.lr)
    params = deepspeed_config(cfg, world_size=1, bf16=False)["scheduler"]["params"]
    scheduler = WarmupDecayLR(optimizer, **params)
    rates = []
    for _ in range(steps):
        rates.append(optimizer.param_groups[0]["lr"])  # the rate this optimizer step uses
        optimizer.step()
        scheduler.step()
    assert min(rates) > 0, rates  # min lr 0 gave the first two steps lr 0
    if steps >= params["warmup_num_steps"] + 2:  # long enough to finish the warm-up
        assert max(rates) == pytest.approx(cfg.lr)


DEEPSPEED_SCRIPT = r"""
import json, os, sys
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[1], RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
import deepspeed
from icm.config import ZooConfig
from icm.lora_train import *
from icm.models import load_base_model
skip_deepspeed_shm_build()
deepspeed.init_distributed(dist_backend="gloo")
cfg = ZooConfig(rank=4, steps=30, batch_size=4, seq_len=32, lr=1e-2, warmup_steps=2, zero_stage=2)
model, tokenizer = load_base_model("tiny-llama")
peft_model = build_lora_model(model, cfg)
sequences = tokenize_texts(tokenizer, ["the cat sat on the mat and purred"] * 4 + ["the dog sat too"] * 4, cfg.seq_len)
engine, *_ = deepspeed.initialize(model=peft_model, config=deepspeed_config(cfg, world_size=1, bf16=False),
                                  model_parameters=[p for p in peft_model.parameters() if p.requires_grad])
losses = [train_step(engine, batch_for_step(sequences, step=s, batch_size=cfg.batch_size, seed=0,
                                            pad_id=tokenizer.pad_token_id), seed=step_seed(0, s))
          for s in iterate_steps(0, cfg.steps)]
exclude_tied_frozen_params_from_checkpoints(engine)
engine.save_checkpoint(sys.argv[2], tag="ckpt", exclude_frozen_parameters=True)
import torch
saved = torch.load(os.path.join(sys.argv[2], "ckpt", "mp_rank_00_model_states.pt"), weights_only=False)
print(json.dumps({"losses": losses, "optimizer": type(engine.optimizer).__name__,
                  "saved_keys": sorted(saved["module"])}))
"""


def test_real_deepspeed_zero2_trains_a_lora_on_cpu(tmp_path):
    """One DeepSpeed process (gloo, ZeRO-2) trains a tiny LoRA: the loss falls clearly in 30 steps.

    (A random tiny-llama starts near ln(49152) = 10.8 nats; a rank-4 LoRA on q/v alone cannot
    move a random output head far, so the bar is a clear fall, not a fit.)"""
    out = subprocess.run([sys.executable, "-c", DEEPSPEED_SCRIPT, "29631", str(tmp_path)],
                         cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    losses = result["losses"]
    assert len(losses) == 30 and result["optimizer"] == "DeepSpeedZeroOptimizer"
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.3
    # The checkpoint holds the LoRA weights only: not the tied, frozen lm_head (113 MB on SmolLM2).
    assert result["saved_keys"] and all("lora_" in key for key in result["saved_keys"]), result["saved_keys"]


RESUME_SCRIPT = r"""
import json, os, sys
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[1], RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
import deepspeed, torch
from icm.config import ZooConfig
from icm.lora_io import adapter_state_dict
from icm.lora_train import *
from icm.models import load_base_model
skip_deepspeed_shm_build()
deepspeed.init_distributed(dist_backend="gloo")
cfg = ZooConfig(rank=4, steps=12, batch_size=4, seq_len=32, lr=1e-2, warmup_steps=2, zero_stage=2,
                dropout=0.1)

def train(texts, start, stop, *, load=None, save=None):
    model, tokenizer = load_base_model("tiny-llama")
    peft_model = build_lora_model(model, cfg)
    engine, *_ = deepspeed.initialize(model=peft_model, config=deepspeed_config(cfg, world_size=1, bf16=False),
                                      model_parameters=[p for p in peft_model.parameters() if p.requires_grad])
    exclude_tied_frozen_params_from_checkpoints(engine)
    if load:
        engine.load_checkpoint(load, tag="ckpt", load_module_strict=False)
    sequences = tokenize_texts(tokenizer, texts, cfg.seq_len)
    for s in iterate_steps(start, stop):
        batch = batch_for_step(sequences, step=s, batch_size=cfg.batch_size, seed=0, pad_id=tokenizer.pad_token_id)
        train_step(engine, batch, seed=step_seed(0, s))
    if save:
        engine.save_checkpoint(save, tag="ckpt", exclude_frozen_parameters=True)
    weights = {k: v.detach().clone() for k, v in adapter_state_dict(peft_model).items()}
    release_engine(engine)
    return weights

cats = ["the cat sat on the mat and purred"] * 4 + ["the dog sat too"] * 4
alone = train(cats, 0, cfg.steps)                       # the process's first task
train(["one two three four five six"] * 8, 0, 5)         # another task in the same process
after_another = train(cats, 0, cfg.steps)
train(cats, 0, cfg.steps // 2, save=sys.argv[2])         # killed half-way ...
resumed = train(cats, cfg.steps // 2, cfg.steps, load=sys.argv[2])  # ... and resumed
same_step_seed = step_seed
step_seed = lambda seed, step: same_step_seed(seed + 1, step)  # same batches, other dropout masks
other_masks = train(cats, 0, cfg.steps)
same = lambda a, b: all(torch.equal(a[k], b[k]) for k in a)
print(json.dumps({"after_another": same(alone, after_another), "resumed": same(alone, resumed),
                  "other_masks": same(alone, other_masks)}))
"""


def test_a_lora_does_not_depend_on_what_ran_before_it_and_resumes_bit_identically(tmp_path):
    """Dropout (0.1 here) draws from torch's RNG: each step seeds it from (seed, step, rank), so
    a zoo trainer's second task and a task resumed after a kill are bit-identical to the same
    task trained alone. The control (other masks) shows the dropout is live, so the equalities
    are not vacuous."""
    out = subprocess.run([sys.executable, "-c", RESUME_SCRIPT, "29639", str(tmp_path)], cwd=REPO_ROOT,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result == {"after_another": True, "resumed": True, "other_masks": False}, result


def test_step_seeds_depend_on_seed_step_and_rank_only():
    seeds = {step_seed(seed, step, rank) for seed in (0, 1) for step in (1, 2) for rank in (0, 1)}
    assert len(seeds) == 8 and all(0 <= s < 2**63 for s in seeds)
    assert step_seed(0, 5, 1) == step_seed(0, 5, 1)


RELEASE_SCRIPT = r"""
import gc, json, os, sys, weakref
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[1], RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
import deepspeed
from icm.config import ZooConfig
from icm.lora_train import *
from icm.models import load_base_model
skip_deepspeed_shm_build()
deepspeed.init_distributed(dist_backend="gloo")
cfg = ZooConfig(rank=4, steps=4, batch_size=4, seq_len=32, zero_stage=2)
alive = {}
for release in (False, True):
    model, _ = load_base_model("tiny-llama")
    peft_model = build_lora_model(model, cfg)
    engine, *_ = deepspeed.initialize(model=peft_model, config=deepspeed_config(cfg, world_size=1, bf16=False),
                                      model_parameters=[p for p in peft_model.parameters() if p.requires_grad])
    watch = weakref.ref(model)
    if release:
        release_engine(engine)
    del engine, peft_model, model, _
    gc.collect()
    alive[str(release)] = watch() is not None
print(json.dumps(alive))
"""


def test_release_engine_frees_the_task_model_for_the_next_task():
    """A zoo trainer trains a hundred tasks in one process: each finished task's model must die.
    Without release_engine DeepSpeed's global tables keep it alive (the control shows they do)."""
    out = subprocess.run([sys.executable, "-c", RELEASE_SCRIPT, "29637"], cwd=REPO_ROOT,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    alive = json.loads(out.stdout.strip().splitlines()[-1])
    assert alive == {"False": True, "True": False}, alive

