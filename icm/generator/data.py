"""Generator training data: zoo snapshots x episode task vectors, split, normalised, encoded.

    zoo (task -> (S, L) flat adapters) + conditions (task -> (E, D) episode vectors)
      -> split: validation tasks (whole tasks) and the last snapshots of every seen task held out
      -> per-LoRA-tensor normalisation (statistics of the training snapshots only)
      -> model space: top-k principal coefficients (mlp + subspace_dim), or the raw normalised
         vector, zero-padded for conv1d
      -> `SampleSet`s that `icm.generator.training.fit_cvae` draws (snapshot, episode) pairs from.

Everything here takes plain structures (`ZooData`, dicts of arrays); reading them from storage
is `icm.generator.inputs`, where held-out tasks are dropped before anything below sees them.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from icm.config import GeneratorConfig
from icm.generator.inputs import GeneratorInputError, ZooData, ZooInputError, check_conditions
from icm.lora_io import LoraLayout

# Fields of GeneratorConfig that shape the prepared data (all others are model/optimiser knobs).
CHUNK = 1 << 16  # columns per float64 block in the PCA
DATA_FIELDS = ("target", "subspace_dim", "basis_dtype", "conv_stages", "val_tasks", "val_snapshots", "seed")


# ----------------------------------------------------------------------------- devices


def moved(obj, device):
    """A copy of dataclass ``obj`` with every tensor field on ``device`` (others kept)."""
    from dataclasses import fields, replace

    return replace(obj, **{f.name: getattr(obj, f.name).to(device) for f in fields(obj)
                           if isinstance(getattr(obj, f.name), torch.Tensor)})


# ----------------------------------------------------------------------------- samples


@dataclass
class SampleSet:
    """Snapshots in model space, each paired with the episode vectors of its task."""

    inputs: torch.Tensor  # (N, F) snapshot vectors in model space
    offsets: torch.Tensor  # (N,) error outside the model space (full-space residual / L)
    task_of: torch.Tensor  # (N,) long, index into ``tasks``
    conditions: torch.Tensor  # (M, D) z-scored episode vectors of all tasks, stacked
    episode_start: torch.Tensor  # (T,) long, first row of each task in ``conditions``
    episode_count: torch.Tensor  # (T,) long
    tasks: tuple[str, ...]

    def __len__(self) -> int:
        return self.inputs.shape[0]

    def sample_batch(self, batch_size: int, generator: torch.Generator
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Random (snapshot, episode of the same task) pairs: x (B, F), c (B, D), offset (B,)."""
        rows = torch.randint(len(self), (batch_size,), generator=generator)  # (B,)
        task = self.task_of[rows]
        pick = (torch.rand(batch_size, generator=generator) * self.episode_count[task]).long()
        episodes = self.episode_start[task] + pick.clamp_max(self.episode_count[task] - 1)
        return self.inputs[rows], self.conditions[episodes], self.offsets[rows]

    def task_episodes(self, t: int) -> torch.Tensor:
        start = int(self.episode_start[t])
        return self.conditions[start:start + int(self.episode_count[t])]  # (E_t, D)


@torch.no_grad()
def baseline_mse(train: SampleSet, samples: SampleSet, weights: torch.Tensor) -> float:
    """Error of always emitting the training zoo's mean vector (what a generator must beat)."""
    mean = train.inputs.mean(0)  # (F,)
    return float((((samples.inputs - mean).square() * weights).sum(-1) + samples.offsets).mean())


# ----------------------------------------------------------------------------- checks and split


@dataclass(frozen=True)
class Split:
    train_tasks: tuple[str, ...]  # seen by the generator (minus their last val_snapshots)
    val_tasks: tuple[str, ...]  # whole tasks kept out for validation
    val_snapshots: int


def split_tasks(zoo: ZooData, cfg: GeneratorConfig, *, validation: bool) -> Split:
    """Deterministic (``cfg.seed``) choice of validation tasks; no split when not ``validation``."""
    tasks = sorted(zoo.vectors)
    if not validation:
        return Split(tuple(tasks), (), 0)
    if cfg.val_tasks >= len(tasks):
        raise GeneratorInputError(f"generator.val_tasks={cfg.val_tasks} leaves no training task out of "
                                  f"{len(tasks)} zoo tasks. Fix: lower generator.val_tasks.")
    fewest = min(len(v) for v in zoo.vectors.values())
    if cfg.val_snapshots >= fewest:
        raise GeneratorInputError(f"generator.val_snapshots={cfg.val_snapshots} leaves no training snapshot "
                                  f"(a task has only {fewest}). Fix: lower generator.val_snapshots.")
    val = sorted(random.Random(cfg.seed).sample(tasks, cfg.val_tasks))
    return Split(tuple(t for t in tasks if t not in val), tuple(val), cfg.val_snapshots)


def generated_keys(layout: LoraLayout, target: str) -> tuple[str, ...]:
    """The tensors the generator emits: all ("ab"), or only the lora_B ones ("b")."""
    if target == "ab":
        return layout.keys
    keys = tuple(k for k in layout.keys if ".lora_B." in k)
    if not keys:
        raise GeneratorInputError("generator.target=b: the zoo's adapters have no lora_B tensors.")
    return keys


def key_positions(layout: LoraLayout, keys: Sequence[str]) -> torch.Tensor:
    """Indices of ``keys``' elements in the flat vector, in layout order, (L_gen,)."""
    starts = np.cumsum((0,) + layout.sizes)
    wanted = set(keys)
    spans = [torch.arange(starts[i], starts[i + 1]) for i, k in enumerate(layout.keys) if k in wanted]
    return torch.cat(spans)


# ----------------------------------------------------------------------------- normalisation


@dataclass
class TensorNorm:
    """One mean and std per LoRA tensor, over every element of every training snapshot."""

    sizes: tuple[int, ...]
    mean: torch.Tensor  # (T,)
    std: torch.Tensor  # (T,)

    @classmethod
    def fit(cls, x: torch.Tensor, sizes: Sequence[int]) -> TensorNorm:
        chunks = torch.split(x.double(), list(sizes), dim=1)  # T x (N, size)
        mean = torch.stack([c.mean() for c in chunks])
        std = torch.stack([c.std(unbiased=False) for c in chunks])
        std = torch.where(std > 1e-12, std, torch.ones_like(std))  # constant tensors (e.g. B = 0)
        return cls(tuple(sizes), mean.float(), std.float())

    def _expand(self, v: torch.Tensor) -> torch.Tensor:
        return torch.repeat_interleave(v, torch.tensor(self.sizes, device=v.device))  # (L_gen,)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self._expand(self.mean)) / self._expand(self.std)

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        return x * self._expand(self.std) + self._expand(self.mean)


@dataclass
class Subspace:
    """Top-k principal directions of the normalised training zoo; coefficients are whitened."""

    mean: torch.Tensor  # (L,)
    basis: torch.Tensor  # (k, L), orthonormal rows
    scale: torch.Tensor  # (k,) std of each coefficient over the training snapshots
    explained: torch.Tensor  # (k,) fraction of the training variance per direction

    @classmethod
    def fit(cls, x: torch.Tensor, k: int) -> Subspace:
        """PCA through the N x N Gram matrix (N snapshots << L weights)."""
        mean = x.double().mean(0)
        # float64 in column chunks: small directions stay orthonormal, memory stays ~ one copy of x
        chunks = [(c.double() - m) for c, m in zip(x.split(CHUNK, 1), mean.split(CHUNK))]
        vals, vecs = torch.linalg.eigh(sum(c @ c.T for c in chunks))  # (N,), (N, N), ascending
        vals, vecs = vals.flip(0), vecs.flip(1)
        rank = int((vals > 1e-9 * vals[0].clamp_min(1e-30)).sum())
        k = min(k, rank)
        if k == 0:
            raise GeneratorInputError("the training snapshots are all identical: nothing to learn.")
        s = vals[:k].sqrt()  # singular values
        basis = torch.cat([(vecs[:, :k].T @ c) / s[:, None] for c in chunks], 1)  # (k, L)
        return cls(mean.float(), basis.float(), (s / len(x) ** 0.5).float(),
                   (vals[:k] / vals.sum()).float())

    def project(self, x: torch.Tensor) -> torch.Tensor:
        return ((x - self.mean) @ self.basis.T) / self.scale  # (N, k)

    def reconstruct(self, w: torch.Tensor) -> torch.Tensor:
        return self.mean + (w * self.scale) @ self.basis  # (N, L)


@dataclass
class WeightCodec:
    """Generated flat vector <-> model space: normalisation, then subspace or zero padding."""

    norm: TensorNorm
    subspace: Subspace | None = None
    pad_multiple: int = 1

    @property
    def length(self) -> int:
        return sum(self.norm.sizes)

    @property
    def model_dim(self) -> int:
        if self.subspace is not None:
            return self.subspace.basis.shape[0]
        return -(-self.length // self.pad_multiple) * self.pad_multiple

    def weights(self) -> torch.Tensor:
        """(F,) loss weights making the weighted squared error the per-element MSE over L."""
        if self.subspace is not None:
            return self.subspace.scale.square() / self.length
        w = torch.zeros(self.model_dim)
        w[:self.length] = 1.0 / self.length  # padding has weight 0
        return w

    def encode_normalised(self, xn: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, L) normalised -> model inputs (N, F) and the per-element error left outside (N,)."""
        if self.subspace is None:
            return torch.nn.functional.pad(xn, (0, self.model_dim - self.length)), torch.zeros(len(xn))
        w = self.subspace.project(xn)
        residual = (xn - self.subspace.reconstruct(w)).square().sum(1) / self.length
        return w, residual

    def to(self, device) -> WeightCodec:
        subspace = moved(self.subspace, device) if self.subspace is not None else None
        return WeightCodec(moved(self.norm, device), subspace, self.pad_multiple)

    def decode(self, out: torch.Tensor) -> torch.Tensor:
        """Model outputs (N, F) -> de-normalised generated vectors (N, L)."""
        xn = self.subspace.reconstruct(out) if self.subspace is not None else out[:, :self.length]
        return self.norm.denormalize(xn)


@dataclass
class ConditionNorm:
    mean: torch.Tensor  # (D,)
    std: torch.Tensor  # (D,)

    @classmethod
    def fit(cls, episodes: torch.Tensor) -> ConditionNorm:
        std = episodes.std(0, unbiased=False)
        return cls(episodes.mean(0), torch.where(std > 1e-8, std, torch.ones_like(std)))

    def apply(self, c: torch.Tensor) -> torch.Tensor:
        return (c - self.mean) / self.std


# ----------------------------------------------------------------------------- prepared data


def representation_key(cfg: GeneratorConfig) -> str:
    """Which model space an architecture works in (trials of one Tune run share them)."""
    return model_space(cfg).key


def model_space(cfg: GeneratorConfig):
    """The `icm.generator.archs.Space` of ``cfg.arch`` under ``cfg``."""
    from icm.generator.archs import architecture

    return architecture(cfg.arch).space(cfg)


@dataclass
class Representation:
    codec: WeightCodec
    train: SampleSet
    validation: dict[str, SampleSet]  # "val_seen" (held-out snapshots), "val_unseen" (val tasks)
    baselines: dict[str, float]  # error of emitting the training mean, per validation set
    info: dict[str, Any]


@dataclass
class PreparedData:
    """Everything a generator trial needs, computed once (the driver puts it in Ray's store)."""

    layout: LoraLayout
    model_spec: str
    peft_config: dict[str, Any]
    generated_keys: tuple[str, ...]
    fixed: dict[str, torch.Tensor]  # tensors not generated (target "b": the initial lora_A)
    condition_norm: ConditionNorm
    condition_spec: dict[str, Any]
    split: Split
    task_means: dict[str, np.ndarray]  # task -> (D,) mean episode vector (raw), seen and val tasks
    representations: dict[str, Representation]
    data_config: dict[str, Any]
    zoo_summary: dict[str, Any]

    def representation(self, cfg: GeneratorConfig) -> Representation:
        wanted = {k: getattr(cfg, k) for k in DATA_FIELDS}
        if wanted != self.data_config:
            raise ValueError(f"generator config {wanted} does not match the prepared data {self.data_config}")
        key = representation_key(cfg)
        if key not in self.representations:
            raise ValueError(f"no prepared {key!r} data (have {sorted(self.representations)}); "
                             "pass the arch to prepare_data(archs=...)")
        return self.representations[key]


def _fixed_tensors(layout: LoraLayout, keys: Sequence[str], init_state, target: str) -> dict:
    if target == "ab":
        return {}
    if init_state is None:
        raise GeneratorInputError("generator.target=b needs the zoo's initial lora_A tensors (init_state); "
                                  "load_generator_inputs rebuilds them from the zoo's init seed.")
    fixed = {}
    for key, shape in zip(layout.keys, layout.shapes):
        if key in set(keys):
            continue
        if key not in init_state or tuple(init_state[key].shape) != shape:
            raise GeneratorInputError(f"init_state lacks {key} of shape {list(shape)}: it was built "
                                      "for another base model or LoRA setup than the zoo.")
        fixed[key] = init_state[key].detach().float().cpu().clone()
    return fixed


def _sample_set(codec: WeightCodec, part: dict[str, torch.Tensor], conds: dict[str, np.ndarray],
                cond_norm: ConditionNorm) -> SampleSet:
    tasks = tuple(sorted(part))
    inputs, offsets = codec.encode_normalised(torch.cat([part[t] for t in tasks]))
    task_of = torch.cat([torch.full((len(part[t]),), i, dtype=torch.long) for i, t in enumerate(tasks)])
    episodes = [cond_norm.apply(torch.from_numpy(conds[t])) for t in tasks]  # (E_t, D) each
    counts = torch.tensor([len(e) for e in episodes])
    return SampleSet(inputs, offsets, task_of, torch.cat(episodes), torch.cumsum(counts, 0) - counts,
                     counts, tasks)


def _representation(parts: dict[str, dict[str, torch.Tensor]], conds, cond_norm: ConditionNorm,
                    norm: TensorNorm, cfg: GeneratorConfig) -> Representation:
    train = torch.cat([parts["train"][t] for t in sorted(parts["train"])])  # (N, L_gen) normalised
    subspace, info, space = None, {}, model_space(cfg)
    if space.subspace_dim:
        exact = Subspace.fit(train, space.subspace_dim)
        subspace = exact
        if cfg.basis_dtype == "float16":  # train with the basis exactly as the artifact stores it
            subspace = Subspace(exact.mean, exact.basis.half().float(), exact.scale, exact.explained)
            w = exact.project(train)
            info["basis_fp16_mse"] = float((exact.reconstruct(w) - subspace.reconstruct(w)).square().mean())
        info.update(subspace_dim=len(exact.scale), explained_variance=float(exact.explained.sum()))
    codec = WeightCodec(norm, subspace, space.pad_multiple)
    sets = {name: _sample_set(codec, part, conds, cond_norm) for name, part in parts.items()}
    train_set = sets.pop("train")
    weights = codec.weights()
    baselines = {f"{name}_mean_mse": baseline_mse(train_set, s, weights) for name, s in sets.items()}
    info["train_residual_mse"] = float(train_set.offsets.mean())
    return Representation(codec, train_set, sets, baselines, info)


def prepare_data(zoo: ZooData, conditions: Mapping[str, Any], cfg: GeneratorConfig, *,
                 validation: bool, archs: Sequence[str] | None = None,
                 init_state: Mapping[str, torch.Tensor] | None = None,
                 condition_spec: Mapping[str, Any] | None = None) -> PreparedData:
    """Split, normalise and encode the zoo for the architectures in ``archs`` (default cfg.arch).

    Args:
        zoo: training tasks only (held-out tasks were dropped when it was read).
        conditions: task -> (E, D) episode vectors; tasks outside the zoo are ignored.
        validation: hold out ``cfg.val_tasks`` tasks and the last ``cfg.val_snapshots`` snapshots
            of the others (model selection); False trains on everything (the final generator).
        init_state: the zoo's initial adapter state dict (needed for ``cfg.target == "b"``).
    """
    if not zoo.vectors:
        raise ZooInputError("the zoo is empty: no snapshots of any training task. Fix: train the zoo first.")
    for task, v in zoo.vectors.items():
        if v.dim() != 2 or len(v) == 0 or v.shape[1] != zoo.layout.numel:
            raise ZooInputError(f"zoo task {task!r}: vectors of shape {tuple(v.shape)}, the layout needs "
                                f"(snapshots >= 1, {zoo.layout.numel}).")
    conds = check_conditions(conditions, sorted(zoo.vectors))
    split = split_tasks(zoo, cfg, validation=validation)
    keys = generated_keys(zoo.layout, cfg.target)
    positions = key_positions(zoo.layout, keys)
    fixed = _fixed_tensors(zoo.layout, keys, init_state, cfg.target)
    keep = {t: len(zoo.vectors[t]) - split.val_snapshots for t in split.train_tasks}
    raw = {"train": {t: zoo.vectors[t][:keep[t], positions] for t in split.train_tasks}}
    if split.val_snapshots:
        raw["val_seen"] = {t: zoo.vectors[t][keep[t]:, positions] for t in split.train_tasks}
    if split.val_tasks:
        raw["val_unseen"] = {t: zoo.vectors[t][:, positions] for t in split.val_tasks}
    sizes = [zoo.layout.sizes[zoo.layout.keys.index(k)] for k in keys]
    norm = TensorNorm.fit(torch.cat(list(raw["train"].values())), sizes)
    cond_norm = ConditionNorm.fit(torch.from_numpy(np.concatenate([conds[t] for t in split.train_tasks])))
    parts = {name: {t: norm.normalize(v) for t, v in part.items()} for name, part in raw.items()}
    reps: dict[str, Representation] = {}
    for arch in archs or [cfg.arch]:
        arch_cfg = cfg.model_copy(update={"arch": arch})
        if (key := representation_key(arch_cfg)) not in reps:
            reps[key] = _representation(parts, conds, cond_norm, norm, arch_cfg)
    dim = next(iter(conds.values())).shape[1]
    return PreparedData(
        zoo.layout, zoo.model_spec, zoo.peft_config, keys, fixed, cond_norm,
        {**(condition_spec or {}), "condition_dim": dim}, split,
        {t: conds[t].mean(0) for t in sorted(zoo.vectors)}, reps,
        {k: getattr(cfg, k) for k in DATA_FIELDS}, zoo.summary())


# ----------------------------------------------------------------------------- from storage


