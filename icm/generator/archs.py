"""The registry of generator architectures: adding one is its network module plus one entry here.

Each entry names the network class (a `CVAE` subclass) and the *model space* it learns in,
which the weight codec builds once per space and Tune trials of one run share:

    subspace-K   the top-K principal coefficients of the normalised training zoo (``mlp``)
    padded-P     the normalised flat vector zero-padded to a multiple of P (``conv1d``)
    flat         the normalised flat vector itself (``hyper``, or ``mlp`` without a subspace)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from importlib import import_module
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the registry itself stays import-light: icm.config validates names with it
    from icm.config import GeneratorConfig
    from icm.generator.networks import CVAE, CVAESpec


@dataclass(frozen=True)
class Space:
    """A model space: principal subspace of ``subspace_dim`` directions, or the flat vector
    padded to a multiple of ``pad_multiple``."""

    subspace_dim: int | None = None
    pad_multiple: int = 1

    @property
    def key(self) -> str:
        if self.subspace_dim:
            return f"subspace-{self.subspace_dim}"
        return f"padded-{self.pad_multiple}" if self.pad_multiple > 1 else "flat"


@dataclass(frozen=True)
class Architecture:
    name: str
    network: str  # "module:Class" of its `CVAE` subclass, imported when built
    space: Callable[[GeneratorConfig], Space]
    description: str
    needs_segments: bool = False  # the network reads the layout's (layer, module) structure
    # What Ray Tune searches for it (the configured value is always added): `width` values, and
    # whether `depth` (hidden layers) means anything to it.
    tune_widths: tuple[int, ...] = (128, 256, 512)
    has_depth: bool = True
    # The network reads the condition as tokens: it needs generator.condition_pooling=chunks.
    reads_chunks: bool = False


ARCHITECTURES: dict[str, Architecture] = {a.name: a for a in (
    Architecture("mlp", "icm.generator.networks:MLPCVAE", lambda cfg: Space(subspace_dim=cfg.subspace_dim),
                 "MLP encoder/decoder in the zoo's principal subspace (or the flat vector)"),
    Architecture("conv1d", "icm.generator.networks:ConvCVAE", lambda cfg: Space(pad_multiple=2 ** cfg.conv_stages),
                 "the reference's strided 1-D convolutions over the padded flat vector",
                 tune_widths=(4, 8, 16), has_depth=False),  # width = base channels
    Architecture("hyper", "icm.generator.hyper:HyperCVAE", lambda cfg: Space(), (
        "per-module hypernetwork: [z, task vector] + layer and module-type embeddings -> each "
        "module's LoRA factors; not confined to a span of the zoo"), needs_segments=True,
                 tune_widths=(64, 128, 256)),  # its heads are width x (module size): kept narrower
    Architecture("hyper-attn", "icm.generator.hyper:AttendingHyperCVAE", lambda cfg: Space(), (
        "hyper, with each module attending over the condition's tokens (pooling `chunks`: "
        "spans of the prompt) instead of reading one pooled vector only"), needs_segments=True,
                 tune_widths=(64, 128, 256), reads_chunks=True),
)}


def architecture(name: str) -> Architecture:
    if name not in ARCHITECTURES:
        raise ValueError(f"unknown generator arch {name!r}; known: {sorted(ARCHITECTURES)}")
    return ARCHITECTURES[name]


def build_network(spec: CVAESpec) -> CVAE:
    """The (untrained) network of ``spec``."""
    module, name = architecture(spec.arch).network.split(":")
    return getattr(import_module(module), name)(spec)
