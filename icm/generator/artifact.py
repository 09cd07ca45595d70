"""The LoRA generator: a trained CVAE plus everything needed to turn a task vector into a peft
adapter, saved as one self-contained directory.

    <generator>/generator.safetensors   CVAE weights, normalisation stats, principal basis,
                                        condition stats, fixed tensors (target "b": lora_A),
                                        the LM objective's shared residual (if learnt)
    <generator>/generator.json          config, CVAE spec, condition spec, base model, LoRA
                                        layout (+ fingerprint), peft config template, training
                                        summary, size beside the size of the zoo it replaces
    <generator>/config.resolved.yaml    the pipeline config that made it (written by the job)

Generation needs nothing else: ``LoraGenerator.load(dir).sample(task_vector, z="zero")`` gives a
flat adapter vector in layout order, ``write_adapter`` a peft adapter directory.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from icm.config import GeneratorConfig, StageConfig, save_resolved_config
from icm.generator.archs import build_network
from icm.generator.data import ConditionNorm, Subspace, TensorNorm, WeightCodec, key_positions
from icm.generator.inputs import ConditionMismatchError, GeneratorInputError
from icm.generator.networks import CVAE, CVAESpec
from icm.io import atomic_directory, sha256_file, write_json_atomic
from icm.lora_io import LoraLayout, save_adapter, unflatten

FORMAT = "icm-lora-generator"
FORMAT_VERSION = 1
WEIGHTS_FILE = "generator.safetensors"
META_FILE = "generator.json"
GENERATION_FILE = "generation.json"


def conditions_read(conditions: torch.Tensor, config: GeneratorConfig) -> torch.Tensor:
    """The z-scored conditions (B, D) as the network reads them: as given, or after an LM phase
    with ``generator.lm_condition: mean`` the mean training condition for every row (zeros, the
    centre the condition normalisation was fit on), the multi-task control. A generator trained
    by reconstruction alone (e.g. Tune's first-phase trials) reads its conditions."""
    blind = config.lm_condition == "mean" and config.objective != "reconstruction"
    return torch.zeros_like(conditions) if blind else conditions


class LoraGenerator:
    """Task vector(s) in, de-normalised flat LoRA vectors (and peft adapters) out."""

    def __init__(self, *, model: CVAE, codec: WeightCodec, condition_norm: ConditionNorm,
                 layout: LoraLayout, generated_keys: tuple[str, ...], fixed: Mapping[str, torch.Tensor],
                 peft_config: dict, model_spec: str, condition_spec: dict, config: GeneratorConfig,
                 summary: dict | None = None, residual: torch.Tensor | None = None):
        self.model = model.eval()
        # (L_gen,) de-normalised offset added to every generated adapter, learnt by the LM
        # objective alone (generator.lm_shared_residual); None: the network's output as is
        self.residual = residual
        self.codec, self.condition_norm = codec, condition_norm
        self.layout, self.generated_keys, self.fixed = layout, tuple(generated_keys), dict(fixed)
        self.peft_config, self.model_spec = peft_config, model_spec
        self.condition_spec, self.config, self.summary = condition_spec, config, summary or {}
        self._positions = key_positions(layout, self.generated_keys)  # (L_gen,)
        base = {k: torch.zeros(s) for k, s in zip(layout.keys, layout.shapes)}
        base.update(self.fixed)
        self._template = torch.cat([base[k].reshape(-1) for k in layout.keys])  # (L,)

    def to(self, device) -> LoraGenerator:
        """Move the network and every tensor generation uses to ``device`` (in place)."""
        from icm.generator.data import moved

        self.model.to(device)
        self.codec = self.codec.to(device)
        self.condition_norm = moved(self.condition_norm, device)
        self._template, self._positions = self._template.to(device), self._positions.to(device)
        if self.residual is not None:
            self.residual = self.residual.detach().to(device)
        return self

    @property
    def template(self) -> torch.Tensor:
        """(L,) flat vector with the fixed tensors in place and zeros where generated."""
        return self._template

    @property
    def positions(self) -> torch.Tensor:
        """(L_gen,) where the generated values sit in a full flat adapter (L,)."""
        return self._positions

    @property
    def generated_dim(self) -> int:
        """L_gen: values the generator emits per adapter (all of L, or the B half for target "b")."""
        return int(self._positions.numel())

    @property
    def condition_dim(self) -> int:
        return int(self.condition_spec["condition_dim"])

    # ------------------------------------------------------------------------- generation

    def _conditions(self, conditions) -> torch.Tensor:
        c = torch.from_numpy(np.array(conditions, dtype=np.float32))  # a copy: inputs may be read-only
        c = c.unsqueeze(0) if c.dim() == 1 else c
        if c.dim() != 2 or c.shape[1] != self.condition_dim:
            s = self.condition_spec
            raise ConditionMismatchError(
                f"conditions have shape {tuple(c.shape)}; this generator takes (N, {self.condition_dim}) "
                f"task vectors (mode {s.get('mode')!r}, layer {s.get('layer')}, pooling "
                f"{s.get('pooling')!r} of {s.get('model_spec', self.model_spec)!r}).")
        if not torch.isfinite(c).all():
            raise ConditionMismatchError("conditions contain NaN or infinite values.")
        return c

    @torch.no_grad()
    def sample(self, conditions, *, num_samples: int = 1, seed: int = 0, z: str = "random",
               condition_scale: float = 1.0) -> torch.Tensor:
        """Generate adapters as flat vectors in layout order.

        Args:
            conditions: (N, D) or (D,) raw task vectors (the generator z-scores them itself).
            num_samples: adapters per condition; rows are condition-major
                (``[c0 s0, c0 s1, ..., c1 s0, ...]``).
            seed: seed of z when ``z="random"``.
            z: "random" draws z ~ N(0, I); "zero" decodes the prior mean (deterministic).
            condition_scale: w, the z-scored condition read as w x its value: 1 as given, 0 the
                training mean (the blind mode of a generator trained with
                ``lm_condition_dropout``), between them a condition shrunk toward that mean.

        Returns:
            (N * num_samples, L) float32, de-normalised, A fixed for target "b".
        """
        if num_samples < 1:
            raise GeneratorInputError(f"num_samples must be >= 1, got {num_samples}.")
        if z not in ("random", "zero"):
            raise GeneratorInputError(f"z must be 'random' or 'zero', got {z!r}.")
        if not np.isfinite(condition_scale):
            raise GeneratorInputError(f"condition_scale must be finite, got {condition_scale}.")
        device = self._template.device  # where `to` put the generator (the CPU by default)
        c = self.condition_norm.apply(self._conditions(conditions).to(device))  # (N, D)
        c = condition_scale * conditions_read(c, self.config)  # (N, D)
        c = c.repeat_interleave(num_samples, 0)  # (N * K, D)
        shape = (len(c), self.model.spec.latent_dim)
        latent = (torch.randn(shape, generator=torch.Generator().manual_seed(seed)) if z == "random"
                  else torch.zeros(shape)).to(device)  # drawn on the CPU: the same draws anywhere
        return self.full_vectors(self.generated_values(latent, c))

    def generated_values(self, latent: torch.Tensor, conditions: torch.Tensor) -> torch.Tensor:
        """De-normalised generated values (B, L_gen) from latents (B, latent) and z-scored
        conditions (B, D): the network's output, plus the shared residual where the LM objective
        learnt one; keeps gradients."""
        values = self.codec.decode(self.model.decode(latent, conditions))  # (B, L_gen)
        return values if self.residual is None else values + self.residual

    def full_vectors(self, generated: torch.Tensor) -> torch.Tensor:
        """Generated values (B, L_gen) placed into full flat adapters (B, L), the fixed tensors
        (target "b": the shared lora_A) around them; keeps gradients."""
        out = self._template.repeat(len(generated), 1)  # (B, L)
        out[:, self._positions] = generated
        return out

    def state_dict(self, vector: torch.Tensor) -> dict[str, torch.Tensor]:
        """A flat vector (L,) or (1, L) as the peft adapter state dict."""
        flat = vector.reshape(-1) if vector.dim() == 2 and len(vector) == 1 else vector
        return unflatten(flat, self.layout)

    def write_adapter(self, vector: torch.Tensor, out_dir: str | Path, *, extra: dict | None = None) -> Path:
        """Write a peft adapter (adapter_config.json + adapter_model.safetensors) atomically.

        Beside it go ``generation.json`` (the generator's identity) and ``extra``: more files,
        ``{file name: JSON-serialisable object}`` (e.g. the request that produced the adapter).
        """
        info = {"model_spec": self.model_spec, "layout_fingerprint": self.layout.fingerprint(),
                "condition_spec": self.condition_spec, "arch": self.config.arch,
                "target": self.config.target, "generator_config": self.config.model_dump(mode="json")}
        return save_adapter(self.state_dict(vector), self.peft_config, out_dir,
                            extra_files={GENERATION_FILE: info, **(extra or {})})

    # ------------------------------------------------------------------------- storage

    def tensors(self) -> dict[str, torch.Tensor]:
        t = {f"cvae.{k}": v.detach().contiguous() for k, v in self.model.state_dict().items()}
        t.update({"norm.mean": self.codec.norm.mean, "norm.std": self.codec.norm.std,
                  "condition.mean": self.condition_norm.mean, "condition.std": self.condition_norm.std})
        if (sub := self.codec.subspace) is not None:
            dtype = torch.float16 if self.config.basis_dtype == "float16" else torch.float32
            t.update({"subspace.mean": sub.mean, "subspace.basis": sub.basis.to(dtype),
                      "subspace.scale": sub.scale, "subspace.explained": sub.explained})
        t.update({f"fixed.{k}": v for k, v in self.fixed.items()})
        if self.residual is not None:
            t["residual"] = self.residual.detach()
        return {k: v.contiguous() for k, v in t.items()}

    def metadata(self) -> dict[str, Any]:
        return {"format": FORMAT, "version": FORMAT_VERSION, "config": self.config.model_dump(mode="json"),
                "cvae": self.model.spec.to_json(), "condition_spec": self.condition_spec,
                "model_spec": self.model_spec, "layout": self.layout.to_json(),
                "generated_keys": list(self.generated_keys), "peft_config": self.peft_config,
                "codec": {"pad_multiple": self.codec.pad_multiple, "sizes": list(self.codec.norm.sizes),
                          "subspace_dim": (len(self.codec.subspace.scale) if self.codec.subspace else None)},
                "normalisation": {k: {"mean": float(m), "std": float(s)} for k, m, s in
                                  zip(self.generated_keys, self.codec.norm.mean, self.codec.norm.std)},
                "training": self.summary}

    def save(self, directory: str | Path, *, resolved_config: StageConfig | None = None) -> Path:
        """Write the artifact directory atomically (replacing an older one only when complete)."""
        from safetensors.torch import save_file

        with atomic_directory(directory) as staging:
            save_file(self.tensors(), str(staging / WEIGHTS_FILE), metadata={"format": FORMAT})
            meta = self.metadata()
            zoo_bytes = self.summary.get("zoo", {}).get("adapter_bytes") or 0
            weights = (staging / WEIGHTS_FILE).stat().st_size
            meta_bytes = len(json.dumps(meta, indent=2, sort_keys=True))
            meta["size"] = {"generator_bytes": weights + meta_bytes, "weights_bytes": weights,
                            "zoo_adapter_bytes": zoo_bytes,
                            "ratio_to_zoo": (weights + meta_bytes) / zoo_bytes if zoo_bytes else None,
                            "weights_sha256": sha256_file(staging / WEIGHTS_FILE)}
            write_json_atomic(staging / META_FILE, meta)
            if resolved_config is not None:
                save_resolved_config(resolved_config, staging)
        return Path(directory)

    @classmethod
    def load(cls, directory: str | Path) -> LoraGenerator:
        """Read a generator written by `save` (e.g. ``<storage.root>/generator``)."""
        from safetensors.torch import load_file

        folder = Path(directory)
        if not (folder / META_FILE).is_file() or not (folder / WEIGHTS_FILE).is_file():
            raise GeneratorInputError(f"{folder} is not a generator ({META_FILE} or {WEIGHTS_FILE} missing). "
                                      "Fix: run `icm generator` first, or pass its output directory.")
        meta = json.loads((folder / META_FILE).read_text())
        if meta.get("format") != FORMAT or meta.get("version") != FORMAT_VERSION:
            raise GeneratorInputError(f"{folder / META_FILE}: format {meta.get('format')!r} version "
                                      f"{meta.get('version')} is not {FORMAT!r} v{FORMAT_VERSION}.")
        t = load_file(str(folder / WEIGHTS_FILE))
        model = build_network(CVAESpec.from_json(meta["cvae"]))
        model.load_state_dict({k[5:]: v for k, v in t.items() if k.startswith("cvae.")})
        subspace = (Subspace(t["subspace.mean"], t["subspace.basis"].float(), t["subspace.scale"],
                             t["subspace.explained"]) if "subspace.basis" in t else None)
        codec = WeightCodec(TensorNorm(tuple(meta["codec"]["sizes"]), t["norm.mean"], t["norm.std"]),
                            subspace, meta["codec"]["pad_multiple"])
        condition_norm = ConditionNorm(t["condition.mean"], t["condition.std"])
        return cls(model=model, codec=codec, condition_norm=condition_norm,
                   layout=LoraLayout.from_json(meta["layout"]), generated_keys=tuple(meta["generated_keys"]),
                   fixed={k[6:]: v for k, v in t.items() if k.startswith("fixed.")},
                   peft_config=meta["peft_config"], model_spec=meta["model_spec"],
                   condition_spec=meta["condition_spec"], config=GeneratorConfig(**meta["config"]),
                   summary=meta.get("training"), residual=t.get("residual"))
