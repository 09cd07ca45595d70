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

from icm.lora_io import LayoutError, LoraLayout, split, unflatten

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
    return math.sqrt(delta_inner(vector, vector, layout))


def delta_cosine(vector_a: torch.Tensor, vector_b: torch.Tensor, layout: LoraLayout) -> float:
    """Cosine between the concatenated ``B @ A`` of all modules of two adapters (float64).

    NaN when either update is zero (e.g. a fresh peft adapter, whose B starts at zero).
    """
    denominator = math.sqrt(delta_inner(vector_a, vector_a, layout)
                            * delta_inner(vector_b, vector_b, layout))
    if denominator == 0:
        return float("nan")
    return delta_inner(vector_a, vector_b, layout) / denominator


def delta_inner(vector_a: torch.Tensor, vector_b: torch.Tensor, layout: LoraLayout) -> float:
    """Sum over modules of the Frobenius inner product <B1 @ A1, B2 @ A2>."""
    return float(_delta_inner_tensor(vector_a, vector_b, layout))


def _delta_inner_tensor(vector_a: torch.Tensor, vector_b: torch.Tensor, layout: LoraLayout) -> torch.Tensor:
    """`delta_inner` as a float64 0-d tensor that keeps autograd.

    Computed as trace((B1^T B2) (A2 A1^T)) on r x r matrices, so the (out, in) products of a
    large model are never materialised.
    """
    tensors_a, tensors_b = split(vector_a, layout), split(vector_b, layout)
    total = torch.zeros((), dtype=torch.float64)
    for a_key, b_key in lora_modules(layout).values():
        b_gram = tensors_a[b_key].double().T @ tensors_b[b_key].double()  # (r, r)
        a_gram = tensors_b[a_key].double() @ tensors_a[a_key].double().T  # (r, r)
        total = total + torch.sum(b_gram * a_gram.T)  # trace(b_gram @ a_gram)
    return total


def delta_gram(vectors: list[torch.Tensor], layout: LoraLayout) -> torch.Tensor:
    """(T, T) float64 Gram of T adapters' updates: entry (i, j) = sum over modules
    <B_i @ A_i, B_j @ A_j>_F, i.e. `delta_inner` of every pair, batched per module."""
    tensors = [unflatten(vector, layout) for vector in vectors]
    gram = torch.zeros(len(vectors), len(vectors), dtype=torch.float64)
    for a_key, b_key in lora_modules(layout).values():
        a = torch.stack([t[a_key].double() for t in tensors])  # (T, r, in)
        b = torch.stack([t[b_key].double() for t in tensors])  # (T, out, r)
        b_gram = torch.einsum("ior,jos->ijrs", b, b)  # (T, T, r, r): B_i^T B_j
        a_gram = torch.einsum("jsn,irn->ijsr", a, a)  # (T, T, r, r): A_j A_i^T
        gram += torch.einsum("ijrs,ijsr->ij", b_gram, a_gram)  # trace of their product
    return gram


def closest_affine_weights(vectors: list[torch.Tensor], target: torch.Tensor, layout: LoraLayout,
                           names: list[str], *, gram: torch.Tensor | None = None,
                           ridge: float = 1e-6, max_iter: int = 200) -> tuple[dict[str, float], dict]:
    """Weights w over T flat adapters, summing to 1, whose flat combination sum_i w_i v_i has the
    update dW closest (Frobenius, all modules) to ``target``'s; plus the fit's record.

    The flat combination mixes A and B factors, so its dW is (sum w B)(sum w A), not sum w dW:
    the two agree only where the adapters share A, and the zoo's A moves in training. So:
    first the closed-form least squares on sum w dW (``gram``: their (T, T) `delta_gram`; a
    ``ridge`` of its mean diagonal only for conditioning), then L-BFGS from there on the dW the
    flat combination really has. Residuals are fractions of ||dW_target||^2.
    """
    gram = delta_gram(vectors, layout) if gram is None else gram
    inner = torch.stack([_delta_inner_tensor(v, target, layout) for v in vectors])  # (T,)
    norm2 = float(_delta_inner_tensor(target, target, layout))
    linear = _affine_least_squares(gram, inner, ridge)  # (T,)
    stacked = torch.stack(vectors).double()  # (T, L)
    free = linear[:-1].clone().requires_grad_(True)  # w_T = 1 - sum of the others

    def realised(free_weights: torch.Tensor) -> torch.Tensor:
        weights = torch.cat([free_weights, 1 - free_weights.sum(0, keepdim=True)])  # (T,)
        combined = weights @ stacked  # (L,)
        return (_delta_inner_tensor(combined, combined, layout)
                - 2 * _delta_inner_tensor(combined, target.double(), layout) + norm2) / norm2

    optimiser = torch.optim.LBFGS([free], max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimiser.zero_grad()
        loss = realised(free)
        loss.backward()
        return loss

    optimiser.step(closure)
    with torch.no_grad():
        weights = torch.cat([free, 1 - free.sum(0, keepdim=True)])
        record = {"residual_fraction": float(realised(free)),
                  "linear_residual_fraction": float(realised(linear[:-1])),
                  "linear_model_residual_fraction": float(
                      (linear @ gram @ linear - 2 * linear @ inner + norm2) / norm2),
                  "weight_l1": float(weights.abs().sum()), "largest_weight": float(weights.abs().max())}
    return dict(zip(names, weights.tolist())), record


def _affine_least_squares(gram: torch.Tensor, inner: torch.Tensor, ridge: float) -> torch.Tensor:
    """(T,) w minimising w^T G w - 2 w^T b subject to sum(w) = 1 (the KKT system, solved)."""
    count = gram.shape[0]
    kkt = torch.zeros(count + 1, count + 1, dtype=torch.float64)
    kkt[:count, :count] = gram + ridge * float(gram.diagonal().mean()) * torch.eye(count, dtype=torch.float64)
    kkt[:count, count] = kkt[count, :count] = 1.0
    rhs = torch.cat([inner.double(), torch.ones(1, dtype=torch.float64)])
    return torch.linalg.solve(kkt, rhs)[:count]
