"""Weight-space similarity on LoRA updates dW = B @ A rather than raw flat vectors."""

from __future__ import annotations

import pytest
import torch

from icm.baselines import cosine
from icm.eval.weights import (closest_affine_weights, delta_cosine, delta_gram, delta_inner,
                              delta_norm, delta_weights, lora_modules)
from icm.lora_io import LayoutError, LoraLayout, flatten

RANK = 4
MODULES = {  # peft module name -> (out, in)
    "base_model.model.model.layers.0.self_attn.q_proj": (8, 6),
    "base_model.model.model.layers.0.self_attn.v_proj": (5, 6),
}


def _state(a_seed: int, b_seed: int) -> dict[str, torch.Tensor]:
    """A LoRA state dict; A and B drawn from separate seeds, as a shared A init would be."""
    a_gen, b_gen = torch.Generator().manual_seed(a_seed), torch.Generator().manual_seed(b_seed)
    state = {}
    for module, (out_features, in_features) in MODULES.items():
        state[f"{module}.lora_A.weight"] = torch.randn(RANK, in_features, generator=a_gen)
        state[f"{module}.lora_B.weight"] = torch.randn(out_features, RANK, generator=b_gen)
    return state


def _layout() -> LoraLayout:
    return LoraLayout.of(_state(0, 0))


def test_modules_pair_a_and_b_keys():
    modules = lora_modules(_layout())
    assert set(modules) == set(MODULES)
    a_key, b_key = modules["base_model.model.model.layers.0.self_attn.q_proj"]
    assert a_key.endswith("q_proj.lora_A.weight") and b_key.endswith("q_proj.lora_B.weight")


def test_delta_weights_match_b_times_a_by_hand():
    layout, state = _layout(), _state(1, 2)
    deltas = delta_weights(flatten(state, layout), layout)
    for module, shape in MODULES.items():
        b_matrix, a_matrix = state[f"{module}.lora_B.weight"], state[f"{module}.lora_A.weight"]
        expected = b_matrix.double() @ a_matrix.double()  # (out, r) @ (r, in)
        assert deltas[module].shape == shape and deltas[module].dtype == torch.float64
        torch.testing.assert_close(deltas[module], expected)


def test_cosine_with_itself_is_one_and_norm_matches_the_products():
    layout = _layout()
    vector = flatten(_state(1, 2), layout)
    assert delta_cosine(vector, vector, layout) == pytest.approx(1.0, abs=1e-12)
    stacked = torch.cat([d.reshape(-1) for d in delta_weights(vector, layout).values()])
    assert delta_norm(vector, layout) == pytest.approx(float(stacked.norm()), rel=1e-12)


def test_cosine_matches_concatenated_products():
    layout = _layout()
    vector_a, vector_b = flatten(_state(1, 2), layout), flatten(_state(3, 4), layout)
    stacked_a, stacked_b = (torch.cat([d.reshape(-1) for d in delta_weights(v, layout).values()])
                            for v in (vector_a, vector_b))
    assert delta_cosine(vector_a, vector_b, layout) == pytest.approx(cosine(stacked_a, stacked_b),
                                                                     abs=1e-12)


def test_shared_a_with_orthogonal_b_is_dissimilar_though_raw_cosine_is_high():
    layout, state_a, other = _layout(), _state(1, 2), _state(1, 3)
    state_b = dict(state_a)
    for module in MODULES:
        # Shared A with orthonormal rows (A A^T = I): <B_a A, B_b A> = <B_a, B_b>, so a B_b
        # Frobenius-orthogonal to B_a gives orthogonal updates. A is scaled up so that it
        # dominates the raw flat vector.
        shared_a = torch.linalg.qr(state_a[f"{module}.lora_A.weight"].T).Q.T  # (r, in)
        state_a[f"{module}.lora_A.weight"] = state_b[f"{module}.lora_A.weight"] = 10 * shared_a
        b_a, b_other = state_a[f"{module}.lora_B.weight"], other[f"{module}.lora_B.weight"]
        state_b[f"{module}.lora_B.weight"] = b_other - _project(b_other, b_a)  # (out, r)
    vector_a, vector_b = flatten(state_a, layout), flatten(state_b, layout)
    assert cosine(vector_a, vector_b) > 0.9  # the shared A dominates the raw flat vectors
    assert delta_cosine(vector_a, vector_b, layout) == pytest.approx(0.0, abs=1e-6)


def test_scale_does_not_change_the_cosine_and_zero_update_gives_nan():
    layout, state_a = _layout(), _state(1, 2)
    vector_a, vector_b = flatten(state_a, layout), flatten(_state(3, 4), layout)
    scaled = {k: 2.5 * v if "lora_B" in k else v for k, v in state_a.items()}  # like alpha / r
    assert delta_cosine(flatten(scaled, layout), vector_b, layout) == pytest.approx(
        delta_cosine(vector_a, vector_b, layout), abs=1e-6)
    fresh = _state(1, 2)
    fresh.update({k: torch.zeros_like(v) for k, v in fresh.items() if "lora_B" in k})
    assert torch.isnan(torch.tensor(delta_cosine(flatten(fresh, layout), vector_b, layout)))


def test_non_lora_keys_are_rejected():
    layout = LoraLayout.of({**_state(0, 0), "model.lm_head.weight": torch.zeros(2, 2)})
    with pytest.raises(LayoutError, match="lm_head"):
        lora_modules(layout)


def _project(matrix: torch.Tensor, onto: torch.Tensor) -> torch.Tensor:
    """Frobenius projection of ``matrix`` onto ``onto``."""
    return (matrix * onto).sum() / (onto * onto).sum() * onto


def _flat_deltas(vectors, layout) -> torch.Tensor:
    """(T, sum of out * in) every adapter's products B @ A, concatenated over modules."""
    return torch.stack([torch.cat([d.reshape(-1) for d in delta_weights(v, layout).values()])
                        for v in vectors])


def test_delta_gram_is_every_pairs_inner_product_of_the_products():
    layout = _layout()
    vectors = [flatten(_state(seed, 10 + seed), layout) for seed in range(4)]
    gram = delta_gram(vectors, layout)
    deltas = _flat_deltas(vectors, layout)
    assert gram.shape == (4, 4)
    assert torch.allclose(gram, deltas @ deltas.T, rtol=1e-10)
    assert gram[1, 2].item() == pytest.approx(delta_inner(vectors[1], vectors[2], layout), rel=1e-10)


def _realised_residual(weights, vectors, target, layout) -> float:
    """||dW of the flat combination - dW of target||^2 / ||dW of target||^2, by materialised products."""
    combined = sum(w * v for w, v in zip(weights, vectors))
    both = _flat_deltas([combined, target], layout)
    return ((both[0] - both[1]).norm() ** 2 / both[1].norm() ** 2).item()


def test_closest_affine_weights_recover_a_combination_of_the_products_exactly():
    layout = _layout()
    # A shared by all adapters: the flat combination's dW is then exactly the combination of
    # their dWs, and the closed form alone finds it.
    vectors = [flatten(_state(0, 10 + seed), layout) for seed in range(4)]
    truth = torch.tensor([0.7, -0.4, 0.5, 0.2], dtype=torch.float64)  # sums to 1
    target = sum(w * v for w, v in zip(truth.tolist(), vectors))
    weights, fit = closest_affine_weights(vectors, target, layout, list("abcd"))
    assert list(weights) == list("abcd")
    assert torch.allclose(torch.tensor(list(weights.values()), dtype=torch.float64), truth, atol=1e-4)
    assert fit["residual_fraction"] < 1e-6 and fit["linear_model_residual_fraction"] < 1e-6


def test_with_a_that_differs_the_fit_is_of_the_flat_combinations_real_dw():
    """A differs between the adapters (as the zoo's A moves in training): the closed form on
    sum w dW is not what the flat combination does; the refined weights are, and beat every
    other affine choice tried (soups, nearest, the closed form itself)."""
    layout = _layout()
    vectors = [flatten(_state(seed, 10 + seed), layout) for seed in range(3)]
    target = flatten(_state(7, 99), layout)  # not a combination of the three
    weights, fit = closest_affine_weights(vectors, target, layout, list("abc"))
    best = list(weights.values())
    assert sum(best) == pytest.approx(1.0)
    assert fit["residual_fraction"] == pytest.approx(_realised_residual(best, vectors, target, layout), rel=1e-6)
    assert fit["residual_fraction"] <= fit["linear_residual_fraction"] + 1e-12
    # the closed form's model of its residual (sum w dW) is not what its weights really give
    assert fit["linear_model_residual_fraction"] != pytest.approx(fit["linear_residual_fraction"], rel=1e-3)
    for other in ([1 / 3] * 3, [1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.2, 0.3, 0.5]):
        assert _realised_residual(other, vectors, target, layout) >= fit["residual_fraction"] - 1e-9
