"""The conditional VAE over LoRA weights: one model for every task, conditioned on a task vector.

Architectures share one interface (``encode`` / ``decode`` / ``forward``); the registry in
`icm.generator.archs` lists them (the per-module hypernetwork is in `icm.generator.hyper`):

- ``mlp``: MLP encoder and decoder over a vector of ``input_dim`` features (the zoo's principal
  coefficients, or the whole normalised flat adapter for small adapters).
- ``conv1d``: the reference's strided 1-D convolutions over the zero-padded flat vector
  (``conv_stages`` stride-2 stages; channels ``width`` doubling to the middle, then halving, so
  12 stages and width 8 give the reference's 8-16-...-256-256-...-8). GroupNorm replaces the
  reference's BatchNorm so that an adapter sampled alone does not depend on batch statistics.

The task vector enters by ``concat`` (appended to the encoder's features and to z, as in the
reference) or ``film`` (a per-feature scale and shift of every hidden layer).

The loss is per-sample: reconstruction errors are summed over features with explicit weights
(padding has weight 0) and compared only sample-to-sample. `reconstruction_error` refuses
outputs whose shape differs from the target's, the reference's ``[B, L]`` vs ``[B, 1, L]``
broadcast that made every output learn the batch mean.
"""

from __future__ import annotations

import abc

from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch
from torch import nn


@dataclass(frozen=True)
class CVAESpec:
    """Everything needed to rebuild the network (stored in the generator artifact)."""

    arch: str  # a name in icm.generator.archs.ARCHITECTURES
    input_dim: int  # F: features of one (model-space) sample
    condition_dim: int  # D: task-vector size
    latent_dim: int
    width: int  # mlp hidden width, or conv1d base channels
    depth: int = 2  # mlp hidden layers per network
    injection: Literal["concat", "film"] = "concat"
    conv_stages: int = 12
    kernel: int = 7
    # hyper only: each generated tensor in flat order as (layer, module type, part, numel),
    # e.g. (3, "self_attn.q_proj", "lora_A", 4608); see icm.generator.hyper.module_segments
    segments: tuple[tuple[int, str, str, int], ...] = ()
    embedding_dim: int = 32  # hyper only: size of the learned layer and module-type embeddings
    condition_tokens: int = 1  # J: the condition is J tokens of condition_dim / J (pooling chunks)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> CVAESpec:
        data = dict(data)
        data["segments"] = tuple(tuple(s) for s in data.get("segments", ()))
        return cls(**data)

    def conv_channels(self) -> list[int]:
        """Output channels of each encoder stage: width doubling to the middle, then halving."""
        n = self.conv_stages
        return [self.width * 2 ** min(i, n - 1 - i) for i in range(n)]


class FiLM(nn.Module):
    """Feature-wise scale and shift from the condition; starts as the identity."""

    def __init__(self, condition_dim: int, features: int):
        super().__init__()
        self.proj = nn.Linear(condition_dim, 2 * features)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        gamma, beta = self.proj(c).chunk(2, dim=-1)  # (B, H) each
        if h.dim() == 3:  # (B, C, T): one scale per channel
            gamma, beta = gamma.unsqueeze(-1), beta.unsqueeze(-1)
        return h * (1 + gamma) + beta


class MLPStack(nn.Module):
    """``depth`` x (Linear -> LayerNorm -> [FiLM(c)] -> SiLU)."""

    def __init__(self, in_dim: int, width: int, depth: int, condition_dim: int, film: bool):
        super().__init__()
        dims = [in_dim] + [width] * depth
        self.linears = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))
        self.norms = nn.ModuleList(nn.LayerNorm(width) for _ in range(depth))
        self.films = nn.ModuleList(FiLM(condition_dim, width) for _ in range(depth)) if film else None

    def forward(self, h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        for i, (linear, norm) in enumerate(zip(self.linears, self.norms)):
            h = norm(linear(h))  # (B, width)
            if self.films is not None:
                h = self.films[i](h, c)
            h = nn.functional.silu(h)
        return h


class ConvStack(nn.Module):
    """Strided (transposed) 1-D convolutions, each followed by GroupNorm, optional FiLM, activation."""

    def __init__(self, channels: list[int], *, kernel: int, transpose: bool, condition_dim: int,
                 film: bool):
        super().__init__()
        pad = kernel // 2
        pairs = list(zip(channels[:-1], channels[1:]))
        self.convs = nn.ModuleList(
            nn.ConvTranspose1d(a, b, kernel, stride=2, padding=pad, output_padding=1) if transpose
            else nn.Conv1d(a, b, kernel, stride=2, padding=pad) for a, b in pairs)
        self.norms = nn.ModuleList(nn.GroupNorm(1, b) for _, b in pairs)
        self.films = nn.ModuleList(FiLM(condition_dim, b) for _, b in pairs) if film else None
        self.act = nn.ELU() if transpose else nn.LeakyReLU(0.01)

    def forward(self, h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        for i, (conv, norm) in enumerate(zip(self.convs, self.norms)):
            h = norm(conv(h))  # (B, C_i, T_i): T halves (encoder) or doubles (decoder)
            if self.films is not None:
                h = self.films[i](h, c)
            h = self.act(h)
        return h


class CVAE(nn.Module, abc.ABC):
    """Conditional VAE: q(z | x, c) and p(x | z, c) with a standard normal prior on z.

    Subclasses (one per architecture, listed in `icm.generator.archs`) give ``encode`` and
    ``decode``; the reparameterised forward pass is shared.
    """

    def __init__(self, spec: CVAESpec):
        super().__init__()
        self.spec = spec

    def _join(self, h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return h if self.spec.injection == "film" else torch.cat([h, c], dim=-1)

    def fit_data(self, train_inputs: torch.Tensor) -> None:
        """Statistics a network keeps from its training inputs (N, F) before training starts;
        none by default."""

    @abc.abstractmethod
    def encode(self, x: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, F), (B, D) -> posterior mean and log-variance, (B, latent) each."""

    @abc.abstractmethod
    def decode(self, z: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """(B, latent), (B, D) -> (B, F)."""

    def forward(self, x: torch.Tensor, c: torch.Tensor, eps: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Reconstruct ``x`` through a posterior sample (``eps`` ~ N(0, I), (B, latent);
        None decodes the posterior mean). Returns (x_hat (B, F), mu, logvar)."""
        mu, logvar = self.encode(x, c)
        z = mu if eps is None else mu + eps * torch.exp(0.5 * logvar)  # (B, latent)
        return self.decode(z, c), mu, logvar


def split_posterior(out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, 2 * latent) -> mean and clamped log-variance (no overflow in exp)."""
    mu, logvar = out.chunk(2, dim=-1)
    return mu, logvar.clamp(-30.0, 20.0)


class MLPCVAE(CVAE):
    """MLP encoder and decoder over ``input_dim`` features (principal coefficients or the flat
    normalised adapter)."""

    def __init__(self, spec: CVAESpec):
        super().__init__(spec)
        s, film = spec, spec.injection == "film"
        cond = 0 if film else s.condition_dim  # extra inputs when concatenating
        self.encoder = MLPStack(s.input_dim + cond, s.width, s.depth, s.condition_dim, film)
        self.decoder = MLPStack(s.latent_dim + cond, s.width, s.depth, s.condition_dim, film)
        self.posterior = nn.Linear(s.width, 2 * s.latent_dim)
        self.output = nn.Linear(s.width, s.input_dim)

    def encode(self, x: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return split_posterior(self.posterior(self.encoder(self._join(x, c), c)))

    def decode(self, z: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return self.output(self.decoder(self._join(z, c), c))


class ConvCVAE(CVAE):
    """The reference's strided 1-D convolutions over the zero-padded flat vector."""

    def __init__(self, spec: CVAESpec):
        super().__init__(spec)
        s, film = spec, spec.injection == "film"
        if s.input_dim % (2 ** s.conv_stages):
            raise ValueError(f"conv1d input_dim {s.input_dim} must be a multiple of "
                             f"2**conv_stages = {2 ** s.conv_stages} (pad the vector)")
        cond = 0 if film else s.condition_dim
        chans = s.conv_channels()
        self.last = s.input_dim // 2 ** s.conv_stages  # length after the encoder
        self.encoder = ConvStack([1, *chans], kernel=s.kernel, transpose=False,
                                 condition_dim=s.condition_dim, film=film)
        self.features = nn.Linear(chans[-1] * self.last, s.latent_dim)
        self.posterior = nn.Linear(s.latent_dim + cond, 2 * s.latent_dim)
        self.expand = nn.Linear(s.latent_dim + cond, chans[-1] * self.last)
        self.decoder = ConvStack([*chans[::-1], chans[0]], kernel=s.kernel, transpose=True,
                                 condition_dim=s.condition_dim, film=film)
        self.output = nn.Conv1d(chans[0], 1, s.kernel, padding=s.kernel // 2)

    def encode(self, x: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.encoder(x.unsqueeze(1), c).flatten(1)  # (B, C * last)
        return split_posterior(self.posterior(self._join(self.features(h), c)))

    def decode(self, z: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        h = self.expand(self._join(z, c)).view(z.shape[0], -1, self.last)  # (B, C, last)
        return self.output(self.decoder(h, c)).squeeze(1)  # (B, F)


def reconstruction_error(x_hat: torch.Tensor, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Per-sample weighted squared error, (B,). ``weights`` (F,) are 0 at padded positions.

    Raises ValueError when the shapes differ instead of broadcasting (the reference compared
    ``[B, L]`` with ``[B, 1, L]`` and so fitted every sample to the whole batch).
    """
    if x_hat.shape != x.shape or x.dim() != 2 or weights.shape != x.shape[1:]:
        raise ValueError(f"reconstruction shapes differ: output {tuple(x_hat.shape)}, target "
                         f"{tuple(x.shape)}, weights {tuple(weights.shape)}; expected (B, F), "
                         "(B, F), (F,)")
    return ((x_hat - x).square() * weights).sum(dim=-1)


def kl_per_dimension(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(q(z|x,c) || N(0, I)) per sample and latent dimension, (B, Z)."""
    return -0.5 * (1 + logvar - mu.square() - logvar.exp())


def kl_divergence(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(q(z|x,c) || N(0, I)) per sample, summed over latent dimensions, (B,)."""
    return kl_per_dimension(mu, logvar).sum(dim=-1)


def kl_weight(step: int, beta: float, warmup_steps: int) -> float:
    """beta, ramped linearly from 0 over the first ``warmup_steps`` steps."""
    return beta if warmup_steps <= 0 else beta * min(1.0, step / warmup_steps)


def cvae_loss(x_hat: torch.Tensor, x: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor, *,
              weights: torch.Tensor, beta: float, offset: torch.Tensor | None = None,
              free_bits: float = 0.0) -> dict[str, torch.Tensor]:
    """Batch mean of per-sample reconstruction + beta * KL.

    Args:
        weights: (F,) per-feature weights; with `offset` they make ``recon`` the per-element MSE
            of the full normalised weight vector.
        offset: (B,) error the model cannot change (the part of a snapshot outside the learnt
            subspace); added so the reported reconstruction is the full-space error.
        free_bits: nats per latent dimension (batch mean) the KL term leaves unpenalised (free
            bits, Kingma et al. 2016): the loss sees max(KL_d, free_bits) per dimension, so a
            decoder that could read everything from the condition cannot push z to the prior
            (posterior collapse) and draws keep differing. ``kl`` reports the true KL.
    """
    recon = reconstruction_error(x_hat, x, weights)  # (B,)
    if offset is not None:
        recon = recon + offset
    kl_dims = kl_per_dimension(mu, logvar)  # (B, Z)
    kl = kl_dims.sum(dim=-1)  # (B,)
    penalty = kl_dims.mean(dim=0).clamp_min(free_bits).sum() if free_bits > 0 else kl.mean()
    return {"loss": recon.mean() + beta * penalty, "recon": recon.mean(), "kl": kl.mean()}
