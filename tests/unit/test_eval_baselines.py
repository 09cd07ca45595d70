"""Generator-free baselines: similarity soup, ridge map, in-context prompting."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from icm.eval.baselines import (RidgeMap, in_context_prefix, score_in_context, similarity_soup,
                                similarity_weights, spaced_text_ids)
from icm.evaluation import score_texts
from icm.models import text_start_token_id

# ----------------------------------------------------------------------------- similarity soup


def _tasks(count: int = 8, dim: int = 16, length: int = 10, seed: int = 0):
    """Task vectors sharing a large common component (like real ones) and random adapters."""
    rng = np.random.default_rng(seed)
    common = 10 * rng.normal(size=dim)
    conditions = {f"t{i}": common + rng.normal(size=dim) for i in range(count)}
    adapters = {f"t{i}": torch.randn(length, generator=torch.Generator().manual_seed(i))
                for i in range(count)}
    return conditions, adapters


def test_similarity_soup_mixes_the_k_nearest_with_weights_summing_to_one():
    conditions, adapters = _tasks()
    query = conditions["t3"] + 0.01
    vector, weights = similarity_soup(query, conditions, adapters, k=3, temperature=0.5)
    names = sorted(conditions)
    matrix = np.stack([conditions[n] for n in names])
    centred, centred_query = matrix - matrix.mean(0), query - matrix.mean(0)
    cosines = centred @ centred_query / (np.linalg.norm(centred, axis=1)
                                         * np.linalg.norm(centred_query))
    expected = {names[i] for i in np.argsort(-cosines)[:3]}
    assert set(weights) == expected and "t3" in weights
    assert sum(weights.values()) == pytest.approx(1.0)
    assert max(weights, key=weights.get) == "t3"
    mixed = sum(w * adapters[name] for name, w in weights.items())
    torch.testing.assert_close(vector, mixed)


def test_similarity_soup_never_uses_an_excluded_task():
    conditions, adapters = _tasks()
    vector, weights = similarity_soup(conditions["t3"], conditions, adapters, k=7,
                                      temperature=1e-4, exclude=["t3"])
    assert "t3" not in weights and len(weights) == 7
    assert not torch.allclose(vector, adapters["t3"])


def test_similarity_soup_at_zero_temperature_is_the_nearest_adapter():
    conditions, adapters = _tasks()
    vector, weights = similarity_soup(conditions["t5"] + 0.01, conditions, adapters, k=5,
                                      temperature=1e-6)
    assert weights["t5"] == pytest.approx(1.0)
    torch.testing.assert_close(vector, adapters["t5"])


# ----------------------------------------------------------------------------- ridge map


def test_ridge_map_recovers_a_linear_map_with_low_loo_error():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(40, 8)) * 3 + 5  # (T, D), not standardised on purpose
    W, b = rng.normal(size=(8, 50)), rng.normal(size=50)  # (D, L), (L,)
    Y = torch.tensor(X @ W + b + 0.01 * rng.normal(size=(40, 50)), dtype=torch.float32)
    ridge = RidgeMap().fit(X, Y, alphas=(0.01, 1, 100, 10_000))
    assert ridge.alpha <= 1 and set(ridge.loo_errors) == {0.01, 1, 100, 10_000}
    assert ridge.loo_errors[ridge.alpha] < 0.01
    assert ridge.loo_errors[10_000] > 10 * ridge.loo_errors[ridge.alpha]
    x_new = rng.normal(size=8) * 3 + 5
    prediction = ridge.predict(x_new)
    assert prediction.shape == (50,)
    np.testing.assert_allclose(prediction.numpy(), x_new @ W + b, atol=0.05)
    assert ridge.predict(X[:3]).shape == (3, 50)


def test_ridge_map_chooses_a_larger_alpha_on_noise_targets():
    rng = np.random.default_rng(1)
    X = rng.normal(size=(40, 8))
    signal = torch.tensor(X @ rng.normal(size=(8, 50)) + 0.3 * rng.normal(size=(40, 50)))
    noise = torch.tensor(rng.normal(size=(40, 50)))
    alphas = (0.1, 1, 10, 100, 1000)
    on_signal = RidgeMap().fit(X, signal, alphas=alphas)
    on_noise = RidgeMap().fit(X, noise, alphas=alphas)
    assert on_noise.alpha > on_signal.alpha
    assert on_noise.loo_errors[on_noise.alpha] > 0.9  # nothing to learn: about the mean's error


def test_ridge_map_with_tiny_alpha_reproduces_a_training_target():
    rng = np.random.default_rng(2)
    X, Y = rng.normal(size=(6, 8)), torch.tensor(rng.normal(size=(6, 50)))  # T <= D: interpolates
    ridge = RidgeMap().fit(X, Y, alphas=(1e-8,))
    torch.testing.assert_close(ridge.predict(X[4]), Y[4], rtol=1e-5, atol=1e-5)


def test_ridge_map_is_invariant_to_feature_scale():
    """X is standardised, so a feature in other units leaves the fit and alpha unchanged."""
    rng = np.random.default_rng(4)
    X, Y = rng.normal(size=(20, 6)), torch.tensor(rng.normal(size=(20, 9)))
    scaled = X * np.array([1000.0, 1, 1, 1, 1, 0.001]) + 50
    plain, rescaled = RidgeMap().fit(X, Y), RidgeMap().fit(scaled, Y)
    assert plain.loo_errors == pytest.approx(rescaled.loo_errors, rel=1e-6)
    torch.testing.assert_close(plain.predict(X[:4]), rescaled.predict(scaled[:4]))


@pytest.mark.parametrize("tasks, dims", [(12, 5), (8, 12)])  # T > D, and T <= D + 1 (interpolating)
def test_ridge_loo_error_matches_refitting_without_each_task(tasks, dims):
    """The closed form equals T refits, each re-estimating the intercept (the mean) without its
    task, with the feature scaling held fixed. Centring with the task's own row kept would leak
    it into its own prediction: with T <= D + 1 the error read ~0 at a small alpha."""
    rng = np.random.default_rng(3)
    X, Y = rng.normal(size=(tasks, dims)), torch.tensor(rng.normal(size=(tasks, 7)))
    alphas = (1e-4, 3.0)
    ridge = RidgeMap().fit(X, Y, alphas=alphas)
    Xs = (torch.tensor(X) - ridge.x_mean) / ridge.x_std
    total = float(((Y - Y.mean(0)) ** 2).sum())
    for alpha in alphas:
        squared = 0.0
        for i in range(tasks):
            keep = [j for j in range(tasks) if j != i]
            x_mean, y_mean = Xs[keep].mean(0), Y[keep].mean(0)  # the refit's own intercept
            xc, yc = Xs[keep] - x_mean, Y[keep] - y_mean
            W = torch.linalg.solve(xc.T @ xc + alpha * torch.eye(dims, dtype=xc.dtype), xc.T @ yc)
            squared += float(((y_mean + (Xs[i] - x_mean) @ W - Y[i]) ** 2).sum())
        assert ridge.loo_errors[alpha] == pytest.approx(squared / total, rel=1e-5)
    assert ridge.loo_errors[1e-4] > 0.5  # noise targets: nothing to interpolate from


def test_ridge_leave_one_group_out_error_matches_refitting_without_each_group():
    rng = np.random.default_rng(5)
    X, Y = rng.normal(size=(12, 5)), torch.tensor(rng.normal(size=(12, 7)))
    groups = ["a", "a", "a", "b", "b", "c", "c", "c", "c", "d", "e", "e"]
    ridge = RidgeMap().fit(X, Y, alphas=(3.0,), groups=groups)
    assert ridge.criterion == "leave-one-group-out"
    squared = 0.0
    for group in set(groups):  # a whole refit per group: its own standardisation and centring
        held = [i for i, g in enumerate(groups) if g == group]
        refit = RidgeMap().fit(X[[i for i, g in enumerate(groups) if g != group]],
                               Y[[i for i, g in enumerate(groups) if g != group]], alphas=(3.0,))
        squared += float(((refit.predict(X[held]) - Y[held]) ** 2).sum())
    assert ridge.loo_errors[3.0] == pytest.approx(squared / float(((Y - Y.mean(0)) ** 2).sum()), rel=1e-6)
    assert RidgeMap().fit(X, Y).criterion == "leave-one-task-out"
    with pytest.raises(ValueError, match="groups: need one label per training task"):
        RidgeMap().fit(X, Y, groups=["a"] * 12)


def test_leaving_groups_out_chooses_a_larger_alpha_when_only_siblings_predict_each_other():
    """Six groups of four near-copies, with no map shared across groups: leaving one task out
    rewards copying a sibling (tiny alpha); leaving its group out finds nothing to extrapolate
    (a large alpha, about the mean's error)."""
    rng = np.random.default_rng(6)
    centres_x, centres_y = rng.normal(size=(6, 10)), rng.normal(size=(6, 40))
    X = np.repeat(centres_x, 4, axis=0) + 0.05 * rng.normal(size=(24, 10))
    Y = torch.tensor(np.repeat(centres_y, 4, axis=0) + 0.05 * rng.normal(size=(24, 40)))
    groups = [f"g{i // 4}" for i in range(24)]
    alphas = (1e-3, 1e-1, 10, 1e3, 1e5)
    by_task, by_group = RidgeMap().fit(X, Y, alphas=alphas), RidgeMap().fit(X, Y, alphas=alphas, groups=groups)
    assert by_task.alpha <= 10 and by_group.alpha >= 1e3
    assert by_task.loo_errors[by_task.alpha] < 0.2 and by_group.loo_errors[by_group.alpha] > 0.9


# ----------------------------------------------------------------------------- in-context scoring

DEMOS = ["The cat sat on the warm mat.", "A dog barked at the mailman.", "Birds sing at dawn."]
TEXTS = ["Cats sleep.", "The old dog slept by the fire all afternoon long.", "x",
         "def add(a, b):\n    return a + b\n", "Rain fell on the quiet town at night."]


def _naive_in_context_nll(model, tokenizer, prefix: str, text: str, max_length: int
                          ) -> tuple[float, int]:
    """Start token + prefix, then separator + text, in one unbatched pass; NLL of the text's
    tokens (its plain token count is what perplexity divides by)."""
    prefix_ids = [text_start_token_id(tokenizer),
                  *tokenizer(prefix, add_special_tokens=False).input_ids]
    plain = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    kept = plain.offset_mapping[:max_length - 1]
    covered = kept[-1][1] if kept else 0
    text_ids = spaced_text_ids(tokenizer, text, covered)
    ids = torch.tensor([prefix_ids + text_ids])
    with torch.inference_mode():
        log_probs = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), dim=-1)
    positions = torch.arange(len(prefix_ids) - 1, ids.shape[1] - 1)  # predict the text tokens
    return float(-log_probs[positions, ids[0, positions + 1]].sum()), len(kept)


def test_in_context_prefix_is_the_task_vector_prompt():
    prefix = in_context_prefix("Short animal texts.", DEMOS, max_demo_chars=10)
    assert prefix.startswith("Task: Short animal texts.\n\nText: The cat sa\n\n")
    assert prefix.endswith("\n\nText:")
    assert in_context_prefix(None, DEMOS, 100).startswith("Text: The cat sat")


def test_in_context_text_is_tokenised_as_a_demonstration_is(tiny_llama):
    """The eval text after the cue gets the tokens a demonstration gets after its cue: the
    space merges into its first word (a lone space token would be scored otherwise)."""
    _, tokenizer = tiny_llama
    text = "Cats sleep all day."
    in_prompt = tokenizer("Text: " + text, add_special_tokens=False).input_ids
    ids = spaced_text_ids(tokenizer, text, len(text))
    assert in_prompt[-len(ids):] == ids and len(ids) < len(in_prompt)
    assert ids[0] != tokenizer(" ", add_special_tokens=False).input_ids[0]
    assert spaced_text_ids(tokenizer, text, len("Cats")) == ids[:1]  # a cut text: its kept part
    assert spaced_text_ids(tokenizer, "", 0) == []


@pytest.mark.parametrize("batch_size", [1, 3])
def test_in_context_score_equals_naive_concatenation(tiny_llama, batch_size):
    model, tokenizer = tiny_llama
    prefix = in_context_prefix("Short texts.", DEMOS, max_demo_chars=200)
    max_length = 12  # cuts the long texts, as score_texts would
    score = score_in_context(model, tokenizer, TEXTS, prefix, max_length=max_length,
                             batch_size=batch_size)
    naive = [_naive_in_context_nll(model, tokenizer, prefix, t, max_length) for t in TEXTS]
    assert score.text_tokens == tuple(n for _, n in naive)
    assert score.text_nll == pytest.approx([nll for nll, _ in naive], rel=1e-4)
    assert score.nll_nats == pytest.approx(sum(nll for nll, _ in naive), rel=1e-4)
    # Same tokens, characters and truncation as scoring the texts without a prefix.
    plain = score_texts(model, tokenizer, TEXTS, max_length=max_length, batch_size=batch_size)
    assert (score.tokens, score.characters, score.truncated, score.texts) == (
        plain.tokens, plain.characters, plain.truncated, plain.texts)
    assert score.truncated >= 1
    # The prefix is actually read: without it the first tokens would be scored differently.
    assert score.nll_nats != pytest.approx(plain.nll_nats, rel=1e-4)


def test_ridge_combination_weights_rebuild_its_prediction():
    """The evaluation sends workers weights over training adapters, not (L,) predictions."""
    rng = np.random.default_rng(3)
    X, Y = rng.normal(size=(12, 5)), torch.as_tensor(rng.normal(size=(12, 30)))
    ridge = RidgeMap().fit(X, Y)
    query = rng.normal(size=5)
    weights = ridge.combination_weights(query)
    assert weights.shape == (12,) and float(weights.sum()) == pytest.approx(1.0)
    rebuilt = (weights.to(Y.dtype)[:, None] * Y).sum(dim=0)
    assert torch.allclose(rebuilt, ridge.predict(query).to(Y.dtype), atol=1e-8)


def test_similarity_weights_match_the_soup():
    conditions = {"a": np.array([1.0, 0.0]), "b": np.array([0.0, 1.0]), "c": np.array([0.8, 0.3])}
    adapters = {t: torch.full((3,), float(i)) for i, t in enumerate(conditions)}
    mixed, weights = similarity_soup(np.array([1.0, 0.1]), conditions, adapters, k=2)
    assert weights == similarity_weights(np.array([1.0, 0.1]), conditions, k=2)
    assert torch.allclose(mixed, sum(w * adapters[t] for t, w in weights.items()))


def test_ridge_takes_read_only_arrays_without_a_warning():
    import warnings

    rng = np.random.default_rng(0)
    X, Y = rng.normal(size=(6, 4)), rng.normal(size=(6, 10)).astype(np.float32)
    x = rng.normal(size=4)
    for array in (X, Y, x):
        array.flags.writeable = False  # as arrays read from parquet arrive
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "The given NumPy array is not writable" would raise
        ridge = RidgeMap().fit(X, Y, alphas=(0.1, 1.0))
        assert ridge.predict(x).shape == (10,)
        assert ridge.combination_weights(x).shape == (6,)
