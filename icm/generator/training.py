"""The generator's training loop, Ray-free: batches, optimiser, validation, checkpoints.

A training sample is one zoo snapshot of task t paired with one episode task vector of t, drawn
at random each step. Progress goes out through ``report(metrics, save)``, called every
``report_every`` steps; ``save(directory)`` writes a checkpoint that `fit_cvae` resumes from
(``resume_state=load_checkpoint(directory)``). The Tune trainable passes a closure around
``tune.report``; the plain job writes the checkpoint to disk itself.

Validation error is the *generation* error: the adapter decoded at z = 0 from each episode
vector of a task, compared with every held-out snapshot of that task (per-element MSE of the
full normalised weight vector). It measures what the generator is for - weights from a task
vector alone - not how well it auto-encodes.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from icm.config import GeneratorConfig
from icm.generator.archs import architecture, build_network
from icm.generator.artifact import LoraGenerator
from icm.generator.data import PreparedData, SampleSet, prepare_data
from icm.generator.hyper import module_segments
from icm.generator.inputs import ZooData
from icm.generator.networks import CVAE, CVAESpec, cvae_loss, kl_weight

CHECKPOINT_FILE = "cvae_state.pt"
Report = Callable[[dict[str, Any], Callable[[str | Path], None]], None]


@torch.no_grad()
def generation_mse(model: CVAE, samples: SampleSet, weights: torch.Tensor) -> float:
    """Mean over tasks, episodes and snapshots of the error of the z = 0 adapter."""
    model.eval()
    device = _device(model)
    weights, errors = weights.to(device), []
    for t in range(len(samples.tasks)):
        mine = (samples.task_of == t).nonzero().squeeze(1)
        if len(mine) == 0:
            continue
        cond = samples.task_episodes(t).to(device)  # (E, D)
        decoded = model.decode(torch.zeros(len(cond), model.spec.latent_dim, device=device), cond)  # (E, F)
        targets, offsets = samples.inputs[mine].to(device), samples.offsets[mine].to(device)  # (S, F), (S,)
        for row in decoded:
            errors.append(((row - targets).square() * weights).sum(-1) + offsets)  # (S,)
    model.train()
    return float(torch.cat(errors).mean()) if errors else float("nan")


def _device(model: torch.nn.Module) -> torch.device:
    """Where the network lives; sample sets stay in host memory and batches follow it."""
    return next(model.parameters()).device


def save_checkpoint(directory: str | Path, state: dict[str, Any]) -> Path:
    path = Path(directory) / CHECKPOINT_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return path


def load_checkpoint(directory: str | Path) -> dict[str, Any] | None:
    """The training state saved in ``directory``, or None when there is none."""
    path = Path(directory) / CHECKPOINT_FILE
    return torch.load(path, weights_only=True) if path.is_file() else None


@dataclass
class FitResult:
    history: list[dict[str, Any]] = field(default_factory=list)
    steps: int = 0
    train_seconds: float = 0.0

    @property
    def final(self) -> dict[str, Any]:
        return self.history[-1] if self.history else {}


def _metrics(model, train: SampleSet, validation: dict[str, SampleSet], weights, *, step: int,
             running: dict[str, float], cfg: GeneratorConfig, seconds: float, lr: float) -> dict:
    metrics: dict[str, Any] = {
        "step": step, "samples": step * cfg.batch_size, "lr": lr,
        "kl_weight": kl_weight(step, cfg.beta, cfg.kl_warmup_steps),
        **{f"train_{k}": v / max(running["n"], 1) for k, v in running.items() if k != "n"},
        "train_gen_mse": generation_mse(model, train, weights),
        "train_seconds": seconds, "samples_per_s": step * cfg.batch_size / max(seconds, 1e-9)}
    for name, samples in validation.items():
        metrics[f"{name}_mse"] = generation_mse(model, samples, weights)
    scores = [metrics[f"{n}_mse"] for n in validation]
    # Model selection score: mean over the validation sets; without any, the training error.
    metrics["val_mse"] = sum(scores) / len(scores) if scores else metrics["train_gen_mse"]
    return metrics


def fit_cvae(model: CVAE, train: SampleSet, cfg: GeneratorConfig, *, weights: torch.Tensor,
             validation: dict[str, SampleSet] | None = None, report: Report | None = None,
             resume_state: dict[str, Any] | None = None) -> FitResult:
    """Train ``model`` for ``cfg.steps`` steps (continuing from ``resume_state``).

    Args:
        weights: (F,) per-feature loss weights from the weight codec (0 at padding).
        validation: named sample sets scored every report (``{name}_mse``), e.g. held-out
            snapshots of seen tasks and whole validation tasks.
        report: called as ``report(metrics, save)`` every ``cfg.report_every`` steps and at the end.
    """
    validation = validation or {}
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    # Cosine decay to a tenth of the peak: the last reports are the settled ones ASHA compares.
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.steps, eta_min=0.1 * cfg.lr)
    gen = torch.Generator().manual_seed(cfg.seed)
    result = FitResult()
    if resume_state is not None:
        model.load_state_dict(resume_state["model"])
        opt.load_state_dict(resume_state["optimizer"])
        sched.load_state_dict(resume_state["scheduler"])
        gen.set_state(resume_state["rng"])
        result = FitResult(resume_state["history"], resume_state["step"], resume_state["train_seconds"])
    model.train()
    device = _device(model)
    device_weights = weights.to(device)
    running = {"loss": 0.0, "recon": 0.0, "kl": 0.0, "n": 0}
    while result.steps < cfg.steps:
        started = time.perf_counter()
        x, c, offset = (t.to(device) for t in train.sample_batch(cfg.batch_size, gen))  # (B, F), (B, D), (B,)
        # Random numbers come from the CPU generator whatever the device: the same run anywhere.
        x_in = x + cfg.noise * torch.randn(x.shape, generator=gen).to(device) if cfg.noise else x
        eps = torch.randn(x.shape[0], model.spec.latent_dim, generator=gen).to(device)
        x_hat, mu, logvar = model(x_in, c, eps)
        terms = cvae_loss(x_hat, x, mu, logvar, weights=device_weights, offset=offset,
                          beta=kl_weight(result.steps, cfg.beta, cfg.kl_warmup_steps),
                          free_bits=cfg.free_bits)
        opt.zero_grad(set_to_none=True)
        terms["loss"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        result.steps += 1
        result.train_seconds += time.perf_counter() - started
        for key in ("loss", "recon", "kl"):
            running[key] += float(terms[key].detach())
        running["n"] += 1
        diverged = not math.isfinite(float(terms["loss"].detach()))
        if result.steps % cfg.report_every and result.steps < cfg.steps and not diverged:
            continue
        metrics = _metrics(model, train, validation, weights, step=result.steps, running=running,
                           cfg=cfg, seconds=result.train_seconds, lr=sched.get_last_lr()[0])
        if diverged:
            metrics.update({k: math.inf for k in metrics if k.endswith("mse")}, diverged=True)
        result.history.append(metrics)
        running = {"loss": 0.0, "recon": 0.0, "kl": 0.0, "n": 0}
        if report is not None:
            state = {"model": model.state_dict(), "optimizer": opt.state_dict(),
                     "scheduler": sched.state_dict(), "rng": gen.get_state(), "step": result.steps,
                     "history": result.history, "train_seconds": result.train_seconds}
            report(metrics, lambda directory, state=state: save_checkpoint(directory, state))
        if diverged:
            break
    model.eval()
    return result


# ----------------------------------------------------------------------------- training


def condition_tokens(condition_spec: Mapping[str, Any]) -> int:
    """How many tokens (J) a condition holds: task_vectors.chunks for pooling ``chunks``, else 1."""
    if condition_spec.get("pooling") != "chunks":
        return 1
    return int(condition_spec["task_vectors"]["chunks"])


def build_cvae(cfg: GeneratorConfig, input_dim: int, condition_dim: int,
               segments: tuple = (), condition_tokens: int = 1) -> CVAE:
    """The network for ``cfg``, initialised from ``cfg.seed`` alone. ``segments``: the
    generated tensors' (layer, module type, part, numel), for architectures that read them;
    ``condition_tokens``: the spans a condition of pooling ``chunks`` holds (else 1)."""
    spec = CVAESpec(arch=cfg.arch, input_dim=input_dim, condition_dim=condition_dim,
                    latent_dim=cfg.latent_dim, width=cfg.width, depth=cfg.depth,
                    injection=cfg.injection, conv_stages=cfg.conv_stages, segments=segments,
                    embedding_dim=cfg.embedding_dim, condition_tokens=condition_tokens)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        return build_network(spec)


def generator_from_state(data: PreparedData, cfg: GeneratorConfig, model_state: Mapping | None = None,
                         *, summary: dict | None = None) -> LoraGenerator:
    """A `LoraGenerator` over ``data``'s codec, with CVAE weights ``model_state`` (None: fresh)."""
    rep = data.representation(cfg)
    segments = ()
    if architecture(cfg.arch).needs_segments:
        sizes = [data.layout.sizes[data.layout.keys.index(k)] for k in data.generated_keys]
        segments = module_segments(data.generated_keys, sizes)
    model = build_cvae(cfg, rep.codec.model_dim, data.condition_spec["condition_dim"], segments,
                       condition_tokens(data.condition_spec))
    model.fit_data(rep.train.inputs)
    if model_state is not None:
        model.load_state_dict(model_state)
    return LoraGenerator(model=model, codec=rep.codec, condition_norm=data.condition_norm,
                         layout=data.layout, generated_keys=data.generated_keys, fixed=data.fixed,
                         peft_config=data.peft_config, model_spec=data.model_spec,
                         condition_spec=data.condition_spec, config=cfg, summary=summary)


def fit_generator(data: PreparedData, cfg: GeneratorConfig, *, report: Report | None = None,
                  resume_state: dict | None = None, device: str | torch.device = "cpu") -> LoraGenerator:
    """Train a generator with hyperparameters ``cfg`` on prepared data (one Tune trial); the
    network trains on ``device`` and comes back to the CPU."""
    rep = data.representation(cfg)
    generator = generator_from_state(data, cfg)
    generator.model.to(device)
    result = fit_cvae(generator.model, rep.train, cfg, weights=rep.codec.weights(),
                      validation=rep.validation, report=report, resume_state=resume_state)
    generator.model.to("cpu")
    split = data.split
    generator.summary = {
        "trained_on": {"tasks": list(split.train_tasks), "snapshots": len(rep.train),
                       "episodes": int(rep.train.episode_count.sum()),
                       "held_out_snapshots_per_task": split.val_snapshots,
                       "validation_tasks": list(split.val_tasks)},
        "steps": result.steps, "train_seconds": result.train_seconds,
        "samples_per_s": result.steps * cfg.batch_size / max(result.train_seconds, 1e-9),
        "threads": torch.get_num_threads(),  # what it ran on, for the cost
        "final": result.final, "history": result.history, "baselines": rep.baselines,
        "representation": rep.info, "zoo": data.zoo_summary}
    return generator


def train_generator(zoo: ZooData, conditions: Mapping[str, Any], cfg: GeneratorConfig, *,
                    validation: bool = False, condition_spec: Mapping[str, Any] | None = None,
                    init_state: Mapping[str, torch.Tensor] | None = None, report: Report | None = None,
                    resume_state: dict | None = None, device: str | torch.device = "cpu") -> LoraGenerator:
    """Prepare the data and train one generator (both generator jobs and the tests use this).

    Args:
        zoo: training tasks' snapshots (`icm.generator.inputs.load_zoo`, or built in memory).
        conditions: task -> (E, D) episode task vectors.
        validation: keep validation tasks / snapshots out (model selection); False (the final
            generator) trains on every task and snapshot of ``zoo``.
        init_state: the zoo's initial adapter, needed for ``cfg.target == "b"``.
        report, resume_state: see `fit_cvae`.
        device: where the network trains (the artifact comes back on the CPU).
    """
    data = prepare_data(zoo, conditions, cfg, validation=validation, init_state=init_state,
                        condition_spec=condition_spec)
    return fit_generator(data, cfg, report=report, resume_state=resume_state, device=device)
