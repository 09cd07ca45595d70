"""Weight-space similarity of LoRA adapters, measured on each module's update dW = B @ A.

Cosines of raw flat adapter vectors are misleading here: every adapter in the zoo starts its A
matrices from the same init seed and A moves little during training, so the A half of two flat
vectors is nearly identical and inflates their cosine even when the learned updates differ. What
an adapter does to the base model is ``W + (alpha / r) * B @ A`` per module, so we compare the
products ``dW = B @ A`` instead. The scale ``alpha / r`` is one positive constant shared by all
modules of adapters with the same config, so it cancels in a cosine and is left out; it does
scale `delta_norm`, which is therefore the norm of the unscaled product.
"""

from __future__ import annotations

import math
import re

import torch

from icm.lora_io import LayoutError, LoraLayout, unflatten

# peft keys: "<module>.lora_A.weight"; named_parameters adds the adapter name before ".weight"
LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<part>[AB])(?:\.[^.]+)?\.weight$")


def lora_modules(layout: LoraLayout) -> dict[str, tuple[str, str]]:
    """Module name -> (A key, B key) in layout order; raises on keys that are not a LoRA pair."""
    parts: dict[str, dict[str, str]] = {}
    for key in layout.keys:
        match = LORA_KEY.match(key)
        if match is None:
            raise LayoutError(f"{key} is not a lora_A/lora_B weight; dW = B @ A is undefined")
        parts.setdefault(match["module"], {})[match["part"]] = key
    unpaired = [module for module, pair in parts.items() if set(pair) != {"A", "B"}]
    if unpaired:
        raise LayoutError(f"modules without both lora_A and lora_B: {unpaired[:3]}")
    return {module: (pair["A"], pair["B"]) for module, pair in parts.items()}


def delta_weights(vector: torch.Tensor, layout: LoraLayout) -> dict[str, torch.Tensor]:
    """Unscaled update ``B @ A`` of every LoRA module, float64 tensors of shape (out, in)."""
    tensors = unflatten(vector, layout)
    return {module: tensors[b_key].double() @ tensors[a_key].double()  # (out, r) @ (r, in)
            for module, (a_key, b_key) in lora_modules(layout).items()}


def delta_norm(vector: torch.Tensor, layout: LoraLayout) -> float:
    """Frobenius norm of all modules' ``B @ A`` together (without the alpha / r scale)."""
    return math.sqrt(_delta_inner(vector, vector, layout))


def delta_cosine(vector_a: torch.Tensor, vector_b: torch.Tensor, layout: LoraLayout) -> float:
    """Cosine between the concatenated ``B @ A`` of all modules of two adapters (float64).

    NaN when either update is zero (e.g. a fresh peft adapter, whose B starts at zero).
    """
    denominator = math.sqrt(_delta_inner(vector_a, vector_a, layout)
                            * _delta_inner(vector_b, vector_b, layout))
    if denominator == 0:
        return float("nan")
    return _delta_inner(vector_a, vector_b, layout) / denominator


def _delta_inner(vector_a: torch.Tensor, vector_b: torch.Tensor, layout: LoraLayout) -> float:
    """Sum over modules of the Frobenius inner product <B1 @ A1, B2 @ A2>.

    Computed as trace((B1^T B2) (A2 A1^T)) on r x r matrices, so the (out, in) products of a
    large model are never materialised.
    """
    tensors_a, tensors_b = unflatten(vector_a, layout), unflatten(vector_b, layout)
    total = 0.0
    for a_key, b_key in lora_modules(layout).values():
        b_gram = tensors_a[b_key].double().T @ tensors_b[b_key].double()  # (r, r)
        a_gram = tensors_b[a_key].double() @ tensors_a[a_key].double().T  # (r, r)
        total += float(torch.sum(b_gram * a_gram.T))  # trace(b_gram @ a_gram)
    return total
