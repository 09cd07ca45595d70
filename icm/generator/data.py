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
import os
import tempfile
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from icm.config import GeneratorConfig
from icm.generator.inputs import (GeneratorInputError, ZooData, ZooInputError, check_conditions,
                                  snapshot_counts)
from icm.lora_io import LoraLayout

# Fields of GeneratorConfig that shape the prepared data (all others are model/optimiser knobs).
CHUNK = 1 << 16  # columns per float64 block in the PCA
DATA_FIELDS = ("target", "subspace_dim", "basis_dtype", "conv_stages", "val_tasks", "val_snapshots", "seed",
               "data_memory_mb")
# Randomized PCA of a streamed zoo: extra sketch columns and power iterations (Halko et al. 2011).
SKETCH_OVERSAMPLE, SKETCH_POWER_ITERS = 16, 2


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


def split_tasks(zoo: ZooData, cfg: GeneratorConfig, *, validation: bool,
                val_excluded: Collection[str] = ()) -> Split:
    """Deterministic (``cfg.seed``) choice of validation tasks; no split when not ``validation``.
    ``val_excluded``: tasks never chosen for validation (those an evaluation fold will hold out:
    a search that selected hyperparameters on their texts would have seen a fold's test)."""
    tasks = sorted(zoo.vectors)
    if not validation:
        return Split(tuple(tasks), (), 0)
    if cfg.val_tasks >= len(tasks):
        raise GeneratorInputError(f"generator.val_tasks={cfg.val_tasks} leaves no training task out of "
                                  f"{len(tasks)} zoo tasks. Fix: lower generator.val_tasks.")
    fewest = min(snapshot_counts(zoo.vectors).values())
    if cfg.val_snapshots >= fewest:
        raise GeneratorInputError(f"generator.val_snapshots={cfg.val_snapshots} leaves no training snapshot "
                                  f"(a task has only {fewest}). Fix: lower generator.val_snapshots.")
    candidates = [t for t in tasks if t not in set(val_excluded)]
    if cfg.val_tasks > len(candidates):
        raise GeneratorInputError(
            f"generator.val_tasks={cfg.val_tasks}, but only {len(candidates)} zoo tasks lie outside "
            f"the groups the evaluation folds hold out (validation never uses a fold's tasks). "
            f"Fix: lower generator.val_tasks or evaluate.folds.")
    val = sorted(random.Random(cfg.seed).sample(candidates, cfg.val_tasks))
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
        return cls.fit_blocks([x], sizes)

    @classmethod
    def fit_blocks(cls, blocks: Iterable[torch.Tensor], sizes: Sequence[int]) -> TensorNorm:
        """From row blocks (R, L) of the training snapshots: float64 sums, one pass."""
        sums = squares = torch.zeros(len(sizes), dtype=torch.float64)
        rows = 0
        for x in blocks:
            chunks = torch.split(x.double(), list(sizes), dim=1)  # T x (R, size)
            sums = sums + torch.stack([c.sum() for c in chunks])
            squares = squares + torch.stack([c.square().sum() for c in chunks])
            rows += len(x)
        count = rows * torch.tensor(sizes, dtype=torch.float64)  # (T,) elements per tensor
        mean = sums / count
        std = (squares / count - mean.square()).clamp_min(0).sqrt()
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
        return cls._top_directions(mean, chunks, k, rows=len(x))

    @classmethod
    def _top_directions(cls, mean: torch.Tensor, columns: Sequence[torch.Tensor], k: int, *, rows: int,
                        total_variance: float | None = None) -> Subspace:
        """The top-k directions of the row space of M = [columns] (n, L), through its (n, n) Gram
        matrix: basis (k, L) = V_k^T M / s_k. M is the centred zoo (`fit`, n = N) or the zoo in
        a sketched basis (`fit_streamed`, n = k + oversample); ``rows`` = N snapshots."""
        vals, vecs = torch.linalg.eigh(sum(c @ c.T for c in columns))  # (n,), (n, n), ascending
        vals, vecs = vals.flip(0), vecs.flip(1)
        k = min(k, int((vals > 1e-9 * vals[0].clamp_min(1e-30)).sum()))
        if k == 0:
            raise GeneratorInputError("the training snapshots are all identical: nothing to learn.")
        s = vals[:k].sqrt()  # singular values
        basis = torch.cat([(vecs[:, :k].T @ c) / s[:, None] for c in columns], 1)  # (k, L)
        total = vals.sum() if total_variance is None else max(total_variance, 1e-30)
        return cls(mean.float(), basis.float(), (s / rows ** 0.5).float(), (vals[:k] / total).float())

    @classmethod
    def fit_streamed(cls, blocks: Callable[[], Iterable[torch.Tensor]], k: int, *, seed: int = 0) -> Subspace:
        """Randomized PCA over row blocks that ``blocks()`` reads anew for each pass (8 passes).

        Memory is O(L x (k + oversample)) plus one block, whatever the number of snapshots N:
        the exact `fit` needs the whole (N, L) matrix and an (N, N) Gram matrix.
        """
        rows, sums, squares = 0, 0.0, 0.0
        for x in blocks():
            rows, sums, squares = rows + len(x), sums + x.double().sum(0), squares + x.double().square().sum()
        mean = sums / rows  # (L,) float64
        total_variance = float(squares - rows * mean.square().sum())
        width = min(k + SKETCH_OVERSAMPLE, rows)

        def times(m: torch.Tensor) -> torch.Tensor:  # centred zoo (N, L) @ m (L, r) -> (N, r)
            return torch.cat([(x.double() - mean) @ m for x in blocks()])

        def transposed_times(q: torch.Tensor) -> torch.Tensor:  # centred zoo^T @ q (N, r) -> (L, r)
            out, start = torch.zeros(len(mean), q.shape[1], dtype=torch.float64), 0
            for x in blocks():
                out += (x.double() - mean).T @ q[start:start + len(x)]
                start += len(x)
            return out

        # (N, r): scores on a random sketch (L, r), then sharpened by power passes; peak memory
        # is two or three (L, r) float64 matrices, ~3.2 GB each for a 7B model's rank-8 LoRA.
        y = times(torch.randn(len(mean), width, generator=torch.Generator().manual_seed(seed),
                              dtype=torch.float64))
        for _ in range(SKETCH_POWER_ITERS):
            y = times(torch.linalg.qr(transposed_times(torch.linalg.qr(y).Q)).Q)
        b = transposed_times(torch.linalg.qr(y).Q).T  # (r, L): the zoo in that basis
        return cls._top_directions(mean, [b], k, rows=rows, total_variance=total_variance)

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


@dataclass
class ZooParts:
    """The zoo's snapshot rows of each part (train, val_seen, val_unseen), read task by task.

    ``read(task)`` gives the task's (S, L_gen) snapshots (generated keys only); ``rows`` says
    which snapshot range of each task belongs to which part. With ``norm`` set, blocks come out
    normalised. The same code serves a zoo held in memory and one streamed from storage.
    """

    read: Callable[[str], torch.Tensor]
    rows: dict[str, dict[str, tuple[int, int]]]  # part -> task -> (first, stop) snapshot
    norm: TensorNorm | None = None

    def blocks(self, part: str) -> Iterator[tuple[str, torch.Tensor]]:
        for task, (first, stop) in sorted(self.rows[part].items()):
            x = self.read(task)[first:stop]  # (S_part, L_gen)
            yield task, (self.norm.normalize(x) if self.norm is not None else x)

    def matrices(self, part: str) -> Iterator[torch.Tensor]:
        return (x for _, x in self.blocks(part))

    def count(self, part: str) -> int:
        return sum(stop - first for first, stop in self.rows[part].values())


def _scratch_rows(rows: int, cols: int) -> torch.Tensor:
    """A (rows, cols) float32 tensor backed by an unlinked scratch file: the kernel pages it in
    and out, so a streamed flat-space zoo never has to fit in memory (Linux keeps a mapped file
    alive after unlink, and frees its disk space when the mapping goes)."""
    fd, path = tempfile.mkstemp(prefix="icm-generator-rows-", suffix=".f32")
    os.close(fd)
    try:
        array = np.memmap(path, dtype=np.float32, mode="w+", shape=(rows, cols))
    finally:
        os.unlink(path)
    return torch.from_numpy(array)


def _sample_set(codec: WeightCodec, parts: ZooParts, part: str, conds: dict[str, np.ndarray],
                cond_norm: ConditionNorm, *, memory_mapped: bool) -> SampleSet:
    tasks = tuple(sorted(parts.rows[part]))
    inputs = _scratch_rows(parts.count(part), codec.model_dim) if memory_mapped else None
    pieces, offsets, start = [], [], 0
    for _, x in parts.blocks(part):
        encoded, offset = codec.encode_normalised(x)  # (S, F), (S,)
        if inputs is None:
            pieces.append(encoded)
        else:
            inputs[start:start + len(encoded)] = encoded
        start += len(encoded)
        offsets.append(offset)
    sizes = [stop - first for first, stop in (parts.rows[part][t] for t in tasks)]
    task_of = torch.cat([torch.full((n,), i, dtype=torch.long) for i, n in enumerate(sizes)])
    episodes = [cond_norm.apply(torch.from_numpy(conds[t])) for t in tasks]  # (E_t, D) each
    counts = torch.tensor([len(e) for e in episodes])
    return SampleSet(torch.cat(pieces) if inputs is None else inputs, torch.cat(offsets), task_of,
                     torch.cat(episodes), torch.cumsum(counts, 0) - counts, counts, tasks)


def _subspace(parts: ZooParts, cfg: GeneratorConfig, k: int, streamed: bool) -> tuple[Subspace, dict]:
    """The principal subspace of the normalised training snapshots: exact in memory, randomized
    over streamed blocks when the zoo is over ``cfg.data_memory_mb``."""
    exact = (Subspace.fit_streamed(lambda: parts.matrices("train"), k, seed=cfg.seed) if streamed
             else Subspace.fit(torch.cat(list(parts.matrices("train"))), k))
    info = {"subspace_dim": len(exact.scale), "explained_variance": float(exact.explained.sum()),
            "pca": "randomized, streamed" if streamed else "exact"}
    if cfg.basis_dtype == "float32":
        return exact, info
    # Train with the basis exactly as the artifact stores it (float16) and record its error.
    stored = Subspace(exact.mean, exact.basis.half().float(), exact.scale, exact.explained)
    error, elements = 0.0, 0
    for x in parts.matrices("train"):
        w = exact.project(x)
        error += float((exact.reconstruct(w) - stored.reconstruct(w)).square().sum())
        elements += x.numel()
    return stored, {**info, "basis_fp16_mse": error / elements}


def _representation(parts: ZooParts, conds, cond_norm: ConditionNorm, norm: TensorNorm,
                    cfg: GeneratorConfig, *, streamed: bool) -> Representation:
    subspace, info, space = None, {}, model_space(cfg)
    if space.subspace_dim:
        subspace, info = _subspace(parts, cfg, space.subspace_dim, streamed)
    codec = WeightCodec(norm, subspace, space.pad_multiple)
    memory_mapped = streamed and subspace is None  # a subspace's coefficients are small
    sets = {name: _sample_set(codec, parts, name, conds, cond_norm, memory_mapped=memory_mapped)
            for name in parts.rows}
    train_set = sets.pop("train")
    weights = codec.weights()
    baselines = {f"{name}_mean_mse": baseline_mse(train_set, s, weights) for name, s in sets.items()}
    info["train_residual_mse"] = float(train_set.offsets.mean())
    return Representation(codec, train_set, sets, baselines, info)


def in_memory_bytes(snapshots: int, length: int) -> int:
    """Peak bytes of preparing a zoo of ``snapshots`` x ``length`` weights in memory: the zoo
    read (fp32), its normalised training rows (fp32), the PCA's centred fp64 copy, and the
    (N, N) Gram matrix with its eigendecomposition (~3 fp64 copies)."""
    return 16 * snapshots * length + 24 * snapshots ** 2


def _zoo_parts(zoo: ZooData, split: Split, positions: torch.Tensor, streamed: bool) -> ZooParts:
    """Which snapshots of which task go where; in memory, each task is read from storage once."""
    counts = snapshot_counts(zoo.vectors)
    keep = {t: counts[t] - split.val_snapshots for t in split.train_tasks}
    rows = {"train": {t: (0, keep[t]) for t in split.train_tasks}}
    if split.val_snapshots:
        rows["val_seen"] = {t: (keep[t], counts[t]) for t in split.train_tasks}
    if split.val_tasks:
        rows["val_unseen"] = {t: (0, counts[t]) for t in split.val_tasks}

    def read(task: str) -> torch.Tensor:
        v = zoo.vectors[task]
        if v.dim() != 2 or len(v) != counts[task] or v.shape[1] != zoo.layout.numel:
            raise ZooInputError(f"zoo task {task!r}: vectors of shape {tuple(v.shape)}, the layout needs "
                                f"({counts[task]} snapshots, {zoo.layout.numel}).")
        return v[:, positions]  # (S, L_gen)

    if streamed:
        return ZooParts(read, rows)
    held = {t: read(t) for t in sorted(set(split.train_tasks) | set(split.val_tasks))}
    return ZooParts(held.__getitem__, rows)


def prepare_data(zoo: ZooData, conditions: Mapping[str, Any], cfg: GeneratorConfig, *,
                 validation: bool, archs: Sequence[str] | None = None,
                 init_state: Mapping[str, torch.Tensor] | None = None,
                 condition_spec: Mapping[str, Any] | None = None,
                 val_excluded: Collection[str] = ()) -> PreparedData:
    """Split, normalise and encode the zoo for the architectures in ``archs`` (default cfg.arch).

    A zoo whose generated part fits ``cfg.data_memory_mb`` is read whole; a larger one is
    streamed from storage task by task in every pass (see `Subspace.fit_streamed`).

    Args:
        zoo: training tasks only (held-out tasks were dropped when it was read).
        conditions: task -> (E, D) episode vectors; tasks outside the zoo are ignored.
        validation: hold out ``cfg.val_tasks`` tasks and the last ``cfg.val_snapshots`` snapshots
            of the others (model selection); False trains on everything (the final generator).
        init_state: the zoo's initial adapter state dict (needed for ``cfg.target == "b"``).
        val_excluded: tasks never chosen for validation (`split_tasks`).
    """
    counts = snapshot_counts(zoo.vectors)
    if not counts:
        raise ZooInputError("the zoo is empty: no snapshots of any training task. Fix: train the zoo first.")
    if empty := [t for t, n in counts.items() if n == 0]:
        raise ZooInputError(f"zoo task(s) {empty} have no snapshots. Fix: retrain them or drop them.")
    conds = check_conditions(conditions, sorted(zoo.vectors))
    split = split_tasks(zoo, cfg, validation=validation, val_excluded=val_excluded)
    keys = generated_keys(zoo.layout, cfg.target)
    positions = key_positions(zoo.layout, keys)
    fixed = _fixed_tensors(zoo.layout, keys, init_state, cfg.target)
    streamed = in_memory_bytes(sum(counts.values()), len(positions)) > cfg.data_memory_mb * 2 ** 20
    parts = _zoo_parts(zoo, split, positions, streamed)
    sizes = [zoo.layout.sizes[zoo.layout.keys.index(k)] for k in keys]
    parts.norm = TensorNorm.fit_blocks(parts.matrices("train"), sizes)
    cond_norm = ConditionNorm.fit(torch.from_numpy(np.concatenate([conds[t] for t in split.train_tasks])))
    reps: dict[str, Representation] = {}
    for arch in archs or [cfg.arch]:
        arch_cfg = cfg.model_copy(update={"arch": arch})
        if (key := representation_key(arch_cfg)) not in reps:
            reps[key] = _representation(parts, conds, cond_norm, parts.norm, arch_cfg, streamed=streamed)
    dim = next(iter(conds.values())).shape[1]
    return PreparedData(
        zoo.layout, zoo.model_spec, zoo.peft_config, keys, fixed, cond_norm,
        {**(condition_spec or {}), "condition_dim": dim}, split,
        {t: conds[t].mean(0) for t in sorted(zoo.vectors)}, reps,
        {k: getattr(cfg, k) for k in DATA_FIELDS}, {**zoo.summary(), "streamed": streamed})


# ----------------------------------------------------------------------------- from storage


