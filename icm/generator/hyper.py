"""A per-module hypernetwork as the CVAE's decoder (and a per-module encoder to match).

The decoder emits every LoRA module's factors itself, so its output is not confined to the
span of the zoo's snapshots (the ``mlp`` generator's PCA subspace). One shared network reads
``[z, task vector]`` plus learned embeddings of the module's layer index and module type
(``self_attn.q_proj``, ...), and a linear head per module type emits that module's generated
tensors (lora_A and lora_B, or lora_B alone for ``target: b``), as Text-to-LoRA's hypernetwork
does. The encoder mirrors it: a linear map per module type reads each module's tensors, adds
the same embeddings, and the mean over modules gives q(z | x, c). The latent z and its
sampling are the CVAE's, so best-of-K draws still differ.

Model space: the whole normalised flat vector of generated tensors, in layout order (the
codec's ``flat`` space): F = L_gen.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
from torch import nn

from icm.generator.networks import CVAE, CVAESpec, split_posterior

_LAYER = re.compile(r"\.layers\.(\d+)\.")
_PART = re.compile(r"\.(lora_[AB])(?:\.[^.]+)?\.weight$")


def module_segments(keys: Sequence[str], sizes: Sequence[int]) -> tuple[tuple[int, str, str, int], ...]:
    """(layer, module type, part, numel) of each generated tensor, in flat order.

    ``base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight`` is layer 3, type
    ``self_attn.q_proj``, part ``lora_A``. A key outside numbered layers gets layer -1.
    """
    segments = []
    for key, size in zip(keys, sizes):
        layer = _LAYER.search(key)
        part = _PART.search(key)
        if part is None:
            raise ValueError(f"hyper generator: {key!r} is not a lora_A/lora_B weight")
        module = key[:part.start()]
        kind = module[layer.end():] if layer else module.rsplit(".", 1)[-1]
        segments.append((int(layer.group(1)) if layer else -1, kind, part.group(1), int(size)))
    return tuple(segments)


class _Modules:
    """The module instances of a segment list: per module type, its instances' layer ids and
    the flat positions of their tensors, (M_t, S_t)."""

    def __init__(self, segments: Sequence[tuple[int, str, str, int]]):
        if not segments:
            raise ValueError("hyper generator: spec.segments is empty (build it with "
                             "icm.generator.hyper.module_segments)")
        instances: dict[tuple[int, str], list[tuple[str, int, int]]] = {}
        offset = 0
        for layer, kind, part, size in segments:
            instances.setdefault((layer, kind), []).append((part, offset, size))
            offset += size
        self.length = offset
        self.layers = sorted({layer for layer, _ in instances})
        self.types = sorted({kind for _, kind in instances})
        self.type_layers: dict[str, list[int]] = {t: [] for t in self.types}
        self.type_positions: dict[str, torch.Tensor] = {}
        shapes: dict[str, list[tuple[str, int]]] = {}
        rows: dict[str, list[torch.Tensor]] = {t: [] for t in self.types}
        for (layer, kind), parts in sorted(instances.items()):
            shape = [(part, size) for part, _, size in parts]
            if shapes.setdefault(kind, shape) != shape:
                raise ValueError(f"hyper generator: module type {kind!r} has tensors {shape} in "
                                 f"layer {layer} but {shapes[kind]} elsewhere")
            self.type_layers[kind].append(self.layers.index(layer))
            rows[kind].append(torch.cat([torch.arange(o, o + s) for _, o, s in parts]))
        for kind in self.types:
            self.type_positions[kind] = torch.stack(rows[kind])  # (M_t, S_t)


class HyperCVAE(CVAE):
    """CVAE whose decoder is a hypernetwork over (layer, module type) embeddings."""

    def __init__(self, spec: CVAESpec):
        super().__init__(spec)
        if spec.injection != "concat":
            raise ValueError("generator.arch=hyper takes the task vector by concatenation; "
                             "set generator.injection=concat")
        modules = _Modules(spec.segments)
        if modules.length != spec.input_dim:
            raise ValueError(f"hyper generator: segments cover {modules.length} values, "
                             f"input_dim is {spec.input_dim}")
        s, width = spec, spec.width
        self.types = modules.types
        self.layer_embedding = nn.Embedding(len(modules.layers), s.embedding_dim)
        self.type_embedding = nn.Embedding(len(self.types), s.embedding_dim)
        for index, kind in enumerate(self.types):
            self.register_buffer(f"positions_{index}", modules.type_positions[kind], persistent=False)
            self.register_buffer(f"layers_{index}", torch.tensor(modules.type_layers[kind]),
                                 persistent=False)
        sizes = [modules.type_positions[t].shape[1] for t in self.types]
        # Decoder: [z, c] (per sample) + embeddings (per module) -> hidden -> per-type head.
        self.decode_sample = nn.Linear(s.latent_dim + s.condition_dim, width)
        self.decode_module = nn.Linear(2 * s.embedding_dim, width, bias=False)
        self.decode_hidden = nn.ModuleList(nn.Linear(width, width) for _ in range(s.depth - 1))
        self.decode_norms = nn.ModuleList(nn.LayerNorm(width) for _ in range(s.depth))
        self.heads = nn.ModuleList(nn.Linear(width, size) for size in sizes)
        # Encoder: per-type read of each module's tensors + embeddings, mean over modules.
        self.reads = nn.ModuleList(nn.Linear(size, width) for size in sizes)
        self.encode_module = nn.Linear(2 * s.embedding_dim, width, bias=False)
        self.encode_sample = nn.Linear(width + s.condition_dim, width)
        self.posterior = nn.Linear(width, 2 * s.latent_dim)
        # Outputs are deviations from the training zoo's mean vector: the shared part of every
        # LoRA (e.g. the common initial A) differs per layer, which per-type heads cannot hold.
        self.register_buffer("centre", torch.zeros(spec.input_dim))  # (F,), saved with the model

    def fit_data(self, train_inputs: torch.Tensor) -> None:
        self.centre.copy_(train_inputs.mean(dim=0))

    def _embeddings(self, index: int) -> torch.Tensor:
        """(M_t, 2E): layer and type embeddings of type ``index``'s module instances."""
        layers = getattr(self, f"layers_{index}")
        kind = self.type_embedding.weight[index].expand(len(layers), -1)
        return torch.cat([self.layer_embedding(layers), kind], dim=-1)

    def encode(self, x: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pooled, count = 0.0, 0
        for index, read in enumerate(self.reads):
            positions = getattr(self, f"positions_{index}")  # (M_t, S_t)
            h = read(x[:, positions] - self.centre[positions]) + self.encode_module(self._embeddings(index))  # (B, M_t, W)
            pooled = pooled + nn.functional.silu(h).sum(dim=1)  # (B, W)
            count += positions.shape[0]
        h = nn.functional.silu(self.encode_sample(torch.cat([pooled / count, c], dim=-1)))
        return split_posterior(self.posterior(h))  # (B, latent) each

    def _module_inputs(self, index: int, c: torch.Tensor) -> torch.Tensor:
        """(M_t, W) or (B, M_t, W): what type ``index``'s modules add to the per-sample input."""
        return self.decode_module(self._embeddings(index))

    def decode(self, z: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        per_sample = self.decode_sample(torch.cat([z, c], dim=-1))[:, None]  # (B, 1, W)
        out = self.centre.expand(len(z), -1).clone()  # (B, F)
        for index, head in enumerate(self.heads):
            h = per_sample + self._module_inputs(index, c)  # (B, M_t, W)
            h = nn.functional.silu(self.decode_norms[0](h))
            for linear, norm in zip(self.decode_hidden, self.decode_norms[1:]):
                h = nn.functional.silu(norm(linear(h)))
            positions = getattr(self, f"positions_{index}")  # (M_t, S_t)
            flat = positions.reshape(-1)
            out[:, flat] = out[:, flat] + head(h).reshape(len(z), -1)  # (B, M_t * S_t)
        return out


class AttendingHyperCVAE(HyperCVAE):
    """`hyper` whose modules each read the condition by attention over its J tokens.

    With pooling ``chunks`` the task vector is J mean-pooled spans of the prompt (J x D), so a
    module can read the part of the prompt it needs (a demonstration, the description) where
    one pooled vector blurs them. Each module instance's (layer, type) embedding is a query
    over the J tokens; what it reads is added to its hidden input. The read's output layer
    starts at zero, so the untrained network is `hyper` exactly and the attention is learnt
    only where it helps. The flat condition still enters the per-sample path and the encoder.
    """

    def __init__(self, spec: CVAESpec):
        super().__init__(spec)
        tokens, width = spec.condition_tokens, spec.width
        if tokens < 2 or spec.condition_dim % tokens:
            raise ValueError(f"generator.arch=hyper-attn attends over condition tokens: "
                             f"condition_dim {spec.condition_dim} in {tokens} tokens. Fix: "
                             "condition it on generator.condition_pooling=chunks "
                             "(task_vectors.chunks >= 2).")
        token_dim = spec.condition_dim // tokens
        self.queries = nn.Linear(2 * spec.embedding_dim, width, bias=False)
        self.keys = nn.Linear(token_dim, width)
        self.values = nn.Linear(token_dim, width)
        self.read = nn.Linear(width, width)
        nn.init.zeros_(self.read.weight)
        nn.init.zeros_(self.read.bias)

    def _tokens(self, c: torch.Tensor) -> torch.Tensor:
        return c.reshape(len(c), self.spec.condition_tokens, -1)  # (B, J, D)

    def attention(self, index: int, c: torch.Tensor) -> torch.Tensor:
        """(B, M_t, J): how much each module instance of type ``index`` reads each token."""
        query = self.queries(self._embeddings(index))  # (M_t, W)
        scores = torch.einsum("mw,bjw->bmj", query, self.keys(self._tokens(c)))  # (B, M_t, J)
        return torch.softmax(scores / self.spec.width ** 0.5, dim=-1)

    def _module_inputs(self, index: int, c: torch.Tensor) -> torch.Tensor:
        values = self.values(self._tokens(c))  # (B, J, W)
        read = torch.einsum("bmj,bjw->bmw", self.attention(index, c), values)  # (B, M_t, W)
        return super()._module_inputs(index, c) + self.read(read)
