"""The LoRA weight contract: peft adapter state dict <-> one flat vector, and peft-format files.

The zoo stores every snapshot both as a peft adapter directory and as a flat vector; the
generator learns and emits flat vectors. `LoraLayout` fixes how one maps to the other: the
adapter's tensor keys in a natural order (layer 2 before layer 10), with their shapes. The layout
is recorded next to every vector and inside the generator, so a vector is never read with
another layout by accident: `flatten` and `unflatten` name the first key or size that differs.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from icm.adapters import ADAPTER_CONFIG, ADAPTER_WEIGHTS, check_adapter_dir
from icm.errors import InputError
from icm.io import atomic_directory, sha256_json, write_json_atomic


class LayoutError(InputError):
    """A state dict or vector that does not match the recorded layout."""


def natural_key(key: str) -> list[Any]:
    """Sort key that orders embedded integers numerically (``layers.2`` before ``layers.10``)."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", key)]


@dataclass(frozen=True)
class LoraLayout:
    """Keys and shapes of an adapter's tensors, in the fixed order of the flat vector."""

    keys: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]

    @classmethod
    def of(cls, state_dict: Mapping[str, torch.Tensor]) -> LoraLayout:
        keys = tuple(sorted(state_dict, key=natural_key))
        return cls(keys, tuple(tuple(state_dict[k].shape) for k in keys))

    @cached_property
    def sizes(self) -> tuple[int, ...]:
        return tuple(int(torch.Size(shape).numel()) for shape in self.shapes)

    @property
    def numel(self) -> int:
        """Length of the flat vector."""
        return sum(self.sizes)

    def to_json(self) -> dict[str, Any]:
        return {"keys": list(self.keys), "shapes": [list(s) for s in self.shapes],
                "numel": self.numel, "fingerprint": self.fingerprint()}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> LoraLayout:
        layout = cls(tuple(data["keys"]), tuple(tuple(s) for s in data["shapes"]))
        if "fingerprint" in data and data["fingerprint"] != layout.fingerprint():
            raise LayoutError("layout file is inconsistent: its fingerprint does not match its keys")
        return layout

    def fingerprint(self) -> str:
        return sha256_json({"keys": list(self.keys), "shapes": [list(s) for s in self.shapes]})

    def save(self, path: str | Path) -> Path:
        return write_json_atomic(path, self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> LoraLayout:
        return cls.from_json(json.loads(Path(path).read_text()))

    def check(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        """Raise `LayoutError` naming the first key or shape where ``state_dict`` differs."""
        missing = [k for k in self.keys if k not in state_dict]
        extra = sorted(set(state_dict) - set(self.keys), key=natural_key)
        if missing or extra:
            raise LayoutError(f"adapter keys differ from the layout: missing {missing[:3]}"
                              f"{'...' if len(missing) > 3 else ''}, unexpected {extra[:3]}"
                              f"{'...' if len(extra) > 3 else ''} (was it made with other "
                              "target modules, another rank or another base model?)")
        for key, shape in zip(self.keys, self.shapes):
            if tuple(state_dict[key].shape) != shape:
                raise LayoutError(f"tensor {key} has shape {tuple(state_dict[key].shape)}, the "
                                  f"layout says {shape} (another rank or base model?)")


def flatten(state_dict: Mapping[str, torch.Tensor], layout: LoraLayout) -> torch.Tensor:
    """Concatenate the tensors in layout order into one float32 vector of length layout.numel."""
    layout.check(state_dict)
    return torch.cat([state_dict[k].detach().reshape(-1).float().cpu() for k in layout.keys])


def unflatten(vector: torch.Tensor, layout: LoraLayout) -> dict[str, torch.Tensor]:
    """Split a flat vector back into the state dict it came from (contiguous float32 tensors)."""
    return {k: piece.contiguous() for k, piece in split(vector.detach().float().cpu(), layout).items()}


def split(vector: torch.Tensor, layout: LoraLayout) -> dict[str, torch.Tensor]:
    """The layout's tensors as views of a flat vector: its dtype and device, autograd kept."""
    if vector.dim() != 1 or vector.numel() != layout.numel:
        raise LayoutError(f"vector has shape {tuple(vector.shape)}, the layout needs a 1-D vector "
                          f"of {layout.numel} values")
    pieces = torch.split(vector, list(layout.sizes))
    return {k: p.reshape(s) for k, p, s in zip(layout.keys, pieces, layout.shapes)}


def adapter_state_dict(peft_model) -> dict[str, torch.Tensor]:
    """The LoRA tensors of a peft model, keyed exactly as ``save_pretrained`` writes them."""
    from peft import get_peft_model_state_dict

    return {k: v.detach().cpu() for k, v in get_peft_model_state_dict(peft_model).items()}


def peft_config_json(peft_config) -> dict[str, Any]:
    """A ``LoraConfig`` (or its dict) as plain JSON, as ``adapter_config.json`` holds it."""
    config = peft_config if isinstance(peft_config, dict) else peft_config.to_dict()
    return json.loads(json.dumps(config, default=lambda v: sorted(v) if isinstance(v, set) else str(v)))


def save_adapter(state_dict: Mapping[str, torch.Tensor], peft_config, out_dir: str | Path,
                 *, extra_files: Mapping[str, Any] | None = None) -> Path:
    """Write a peft adapter directory (``adapter_config.json`` + ``adapter_model.safetensors``)
    atomically; ``extra_files`` maps file names to JSON-serialisable objects written beside them.

    Args:
        state_dict: LoRA tensors keyed as peft saves them (see `adapter_state_dict`).
        peft_config: a ``peft.LoraConfig`` (or its ``to_dict()``), e.g. ``peft_model.peft_config["default"]``.
    """
    from safetensors.torch import save_file

    config = peft_config_json(peft_config)
    with atomic_directory(out_dir) as staging:
        save_file({k: v.contiguous() for k, v in state_dict.items()}, str(staging / ADAPTER_WEIGHTS),
                  metadata={"format": "pt"})
        write_json_atomic(staging / ADAPTER_CONFIG, config)
        for name, obj in (extra_files or {}).items():
            write_json_atomic(staging / name, obj)
    return Path(out_dir)


def load_adapter_tensors(adapter_dir: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """Read an adapter directory's tensors and its parsed config."""
    from safetensors.torch import load_file

    config = check_adapter_dir(adapter_dir)
    return load_file(str(Path(adapter_dir) / ADAPTER_WEIGHTS)), config
