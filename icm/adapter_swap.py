"""Score many adapters on one loaded base model by swapping LoRA weights in place.

Evaluation compares a dozen adapters per task (trained, generated samples, baselines). Loading
the base model and wrapping it in peft once, then copying each adapter's flat vector into the
LoRA parameters, costs milliseconds per adapter instead of a model load; the numbers are the same
as `PeftModel.from_pretrained` on a fresh base (a test checks it).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

import torch

from icm.evaluation import TextScore, score_texts
from icm.lora_io import LoraLayout, unflatten


def lora_config_from_json(config: Mapping[str, Any]):
    """A ``peft.LoraConfig`` from the contents of an ``adapter_config.json``."""
    from peft import LoraConfig

    known = set(LoraConfig.__dataclass_fields__)
    kwargs = {k: v for k, v in config.items() if k in known and k not in ("peft_type",)}
    kwargs["inference_mode"] = True
    return LoraConfig(**kwargs)


class SwappableLora:
    """A base model wrapped once in a peft LoRA whose weights are replaced per adapter.

    Args:
        base_model: the frozen causal LM (it is wrapped in place).
        peft_config: ``adapter_config.json`` contents shared by every adapter to be scored.
        layout: key order and shapes of the flat vectors that will be loaded.
    """

    def __init__(self, base_model, peft_config: Mapping[str, Any], layout: LoraLayout):
        from peft import get_peft_model

        self.layout = layout
        self.model = get_peft_model(base_model, lora_config_from_json(peft_config)).eval()
        self.loaded: str | None = None

    def load(self, vector: torch.Tensor, name: str = "adapter") -> None:
        """Copy a flat adapter vector (layout order, (numel,)) into the LoRA weights."""
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(self.model, unflatten(vector, self.layout))
        unexpected = getattr(result, "unexpected_keys", [])
        if unexpected:
            raise ValueError(f"adapter keys not in the model: {unexpected[:3]}")
        self.loaded = name

    @contextlib.contextmanager
    def base(self) -> Iterator[Any]:
        """The base model alone (LoRA layers bypassed) inside the block."""
        with self.model.disable_adapter():
            yield self.model

    def score(self, tokenizer, texts, *, max_length: int, batch_size: int,
              base: bool = False) -> TextScore:
        """Perplexity/BPC of the loaded adapter (or of the base model when ``base``)."""
        if base:
            with self.base() as model:
                return score_texts(model, tokenizer, texts, max_length=max_length,
                                   batch_size=batch_size)
        return score_texts(self.model, tokenizer, texts, max_length=max_length,
                           batch_size=batch_size)
