"""The strongest honest baselines a user could build without the generator.

* `similarity_soup`: a softmax-weighted mean of the adapters of the k training tasks whose task
  vectors are most similar to the new task's (a soft, smoothed nearest neighbour).
* `RidgeMap`: a linear map from task vector to flat adapter vector, ridge-regularised, with the
  penalty chosen by closed-form leave-one-out error over the training tasks.
* `score_in_context`: no adapter at all; the base model reads k demonstrations (the same prompt
  the task vectors are computed from) and then scores each eval text.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence

import numpy as np
import torch

from icm.evaluation import TextScore, _encode
from icm.models import right_pad, text_start_token_id
from icm.task_vectors import clip_demos, format_prompt

# The eval text follows the prompt's final cue ("Text:") after this, as demonstrations do
# ("Text: {demo}"). It is tokenised together with the text, so the space merges into the text's
# first token exactly as it does in every demonstration.
TEXT_SEPARATOR = " "

# ----------------------------------------------------------------------------- similarity soup


def centred_cosines(query: np.ndarray, candidates: np.ndarray) -> np.ndarray:
    """Cosine of ``query`` (D,) with each row of ``candidates`` (N, D), both centred on the mean
    candidate. Raw task vectors share a large common component (raw cosines are all ~0.95), so
    only the deviations from the mean tell tasks apart. A zero deviation has similarity 0."""
    mean = candidates.mean(axis=0)  # (D,)
    rows, centred_query = candidates - mean, query - mean  # (N, D), (D,)
    norms = np.linalg.norm(rows, axis=1) * np.linalg.norm(centred_query)  # (N,)
    dots = rows @ centred_query  # (N,)
    return np.divide(dots, norms, out=np.zeros_like(dots), where=norms > 0)


def similarity_soup(query: np.ndarray | torch.Tensor,
                    conditions: Mapping[str, np.ndarray | torch.Tensor],
                    adapters: Mapping[str, torch.Tensor], *, k: int = 5,
                    temperature: float = 0.05, exclude: Sequence[str] = ()
                    ) -> tuple[torch.Tensor, dict[str, float]]:
    """Softmax-weighted mean of the adapters of the ``k`` tasks most similar to ``query``.

    Args:
        query: the new task's vector, (D,).
        conditions: task -> task vector (D,); every task not in ``exclude`` is a candidate.
        adapters: task -> flat adapter vector (L,), for every candidate.
        k: how many nearest tasks to mix (fewer when fewer candidates exist).
        temperature: softmax temperature over centred cosines; -> 0 gives the nearest adapter.
        exclude: tasks never used (e.g. the query task itself when it is in ``conditions``).

    Returns:
        The mixed adapter vector (L,) and task -> weight for the k tasks used (sums to 1).
    """
    weights = similarity_weights(query, {n: v for n, v in conditions.items() if n not in set(exclude)},
                                 k=k, temperature=temperature)
    missing = [name for name in weights if name not in adapters]
    if missing:
        raise ValueError(f"no adapter for candidate task(s) {missing}")
    stacked = torch.stack([adapters[name] for name in weights])  # (k, L)
    mixed = (torch.as_tensor(list(weights.values()), dtype=stacked.dtype)[:, None] * stacked).sum(dim=0)
    return mixed, weights


def similarity_weights(query: np.ndarray | torch.Tensor,
                       conditions: Mapping[str, np.ndarray | torch.Tensor], *, k: int = 5,
                       temperature: float = 0.05) -> dict[str, float]:
    """Task -> softmax weight for the ``k`` candidates most similar to ``query`` (sums to 1);
    the similarity soup is the weighted mean of those tasks' adapters."""
    if k < 1 or not temperature > 0:
        raise ValueError(f"need k >= 1 and temperature > 0, got k={k}, temperature={temperature}")
    names = sorted(conditions)
    if not names:
        raise ValueError("no candidate task left for the similarity soup")
    candidates = np.stack([np.asarray(conditions[n], np.float64).reshape(-1) for n in names])
    similarity = centred_cosines(np.asarray(query, np.float64).reshape(-1), candidates)  # (N,)
    # Highest similarity first; ties broken by name so the choice is deterministic.
    nearest = sorted(range(len(names)), key=lambda i: (-similarity[i], names[i]))[:k]
    logits = similarity[nearest] / temperature  # (k,)
    weights = np.exp(logits - logits.max())  # shifted: no overflow at tiny temperatures
    weights /= weights.sum()
    return {names[i]: float(w) for i, w in zip(nearest, weights)}


# ----------------------------------------------------------------------------- ridge map

_GRAM_CHUNK = 65_536
# Penalties tried by leave-one-out: 1e-4 .. 1e5 (the study's first grid, 0.1 .. 1000, chose its
# lower edge, so the grid now reaches well past both ends of what the data has picked).
RIDGE_ALPHAS = tuple(float(10.0 ** e) for e in range(-4, 6))  # output columns per float64 chunk when forming Y Y^T (bounds memory)


class RidgeMap:
    """Ridge regression from task vector (D,) to flat adapter vector (L,), solved in dual form.

    X is standardised with the training mean/std and Y centred on the training mean; then
    ``W = X^T (X X^T + alpha I)^-1 Yc`` is never formed: only the dual coefficients
    ``(K + alpha I)^-1 Yc`` (T, L) are kept, with K = X X^T (T, T), so memory stays ~T x L even
    for L ~ 460,800.

    Multi-output ridge is separable per output column, so for a given alpha a per-tensor
    rescaling of the adapter weights (the generator's normalisation) scales that tensor's
    predictions by the same factor and changes nothing else (only the leave-one-out choice of
    alpha weighs columns by their scale). Its predictions lie in the span of the centred
    training adapters plus their mean, the same representation as the generator's PCA subspace.

    Alpha is chosen by cross-validation that mimics the shift the map will face: leave one
    task out (closed form) when queries have sibling tasks among the training ones, or, given
    ``groups``, leave one whole group out, as for a group fold's tasks (leave-one-task-out
    rewards copying a sibling, and picks a penalty too small to extrapolate to a new group).

    Attributes (after `fit`):
        alpha: the chosen penalty.
        loo_errors: alpha -> held-out squared error over the training tasks, relative to the
            centred targets' total square (about 1 = no better than the training mean).
        criterion: "leave-one-task-out" or "leave-one-group-out".
    """

    def __init__(self) -> None:
        self.alpha: float | None = None
        self.loo_errors: dict[float, float] = {}
        self.criterion: str | None = None

    def fit(self, X: np.ndarray | torch.Tensor, Y: np.ndarray | torch.Tensor, *,
            alphas: Sequence[float] = RIDGE_ALPHAS, groups: Sequence[str] | None = None) -> RidgeMap:
        """Fit on T training tasks: X (T, D) task vectors, Y (T, L) flat adapter vectors;
        ``groups`` (T labels, >= 2 distinct): choose alpha by leave-one-group-out."""
        X = _tensor(X, torch.float64)  # (T, D)
        Y = _tensor(Y)
        Y = Y if Y.is_floating_point() else Y.float()  # (T, L), kept in its own float dtype
        if X.ndim != 2 or Y.ndim != 2 or len(X) != len(Y) or len(X) < 2:
            raise ValueError(f"need X (T, D) and Y (T, L) with T >= 2, got {tuple(X.shape)} "
                             f"and {tuple(Y.shape)}")
        if not alphas or min(alphas) <= 0:
            raise ValueError(f"alphas must be positive, got {alphas}")
        self.x_mean, self.x_std = _standardiser(X)  # (D,) each
        self.x_train = (X - self.x_mean) / self.x_std  # (T, D)
        self.y_mean = Y.mean(dim=0)  # (L,)
        centred = Y - self.y_mean  # (T, L)
        eigenvalues, eigenvectors = torch.linalg.eigh(self.x_train @ self.x_train.T)  # (T,), (T, T)
        eigenvalues = eigenvalues.clamp(min=0)  # K is PSD; round-off can dip below zero
        centred_gram = _gram(centred)  # (T, T) = Yc Yc^T
        if groups is None:
            self.criterion = "leave-one-task-out"
            target_gram = eigenvectors.T @ centred_gram @ eigenvectors  # (T, T) = U^T Yc Yc^T U
            self.loo_errors = {float(a): _loo_error(eigenvalues, eigenvectors, target_gram, float(a))
                               for a in alphas}
        else:
            self.criterion = "leave-one-group-out"
            raw_gram, total = _gram(Y), float(torch.trace(centred_gram))  # (T, T), sum ||Yc_i||^2
            self.loo_errors = {float(a): _logo_error(X, raw_gram, groups, float(a), total)
                               for a in alphas}
        self.alpha = min(self.loo_errors, key=self.loo_errors.get)
        self.inverse = (eigenvectors / (eigenvalues + self.alpha)) @ eigenvectors.T  # (T, T)
        self.dual = self.inverse.to(centred.dtype) @ centred  # (T, L)
        return self

    def combination_weights(self, x: np.ndarray | torch.Tensor) -> torch.Tensor:
        """The prediction for x (D,) as weights over the T training adapters, in fit order:
        predict(x) = sum_i w_i Y_i (the intercept folded in: ridge predictions are affine
        combinations of the training targets), (T,). Lets a worker rebuild the prediction from
        the training adapters it already holds."""
        if self.alpha is None:
            raise RuntimeError("RidgeMap.combination_weights before fit")
        x = _tensor(x, torch.float64)
        kernel = ((x - self.x_mean) / self.x_std) @ self.x_train.T  # (T,)
        coefficients = kernel @ self.inverse  # (T,) on the centred targets
        return _with_intercept(coefficients)

    def predict(self, x: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Adapter vector(s) for task vector(s): x (D,) -> (L,), or (N, D) -> (N, L)."""
        if self.alpha is None:
            raise RuntimeError("RidgeMap.predict before fit")
        x = _tensor(x, torch.float64)
        kernel = ((x - self.x_mean) / self.x_std) @ self.x_train.T  # (T,) or (N, T)
        return kernel.to(self.dual.dtype) @ self.dual + self.y_mean  # (L,) or (N, L)


def _standardiser(X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(D,) mean and scale of X (T, D); a constant feature (or a single row) keeps scale 1."""
    std = X.std(dim=0) if len(X) > 1 else torch.zeros(X.shape[1], dtype=X.dtype)
    return X.mean(dim=0), torch.where(std > 0, std, torch.ones_like(std))


def _with_intercept(coefficients: torch.Tensor) -> torch.Tensor:
    """Weights over the training targets (..., T) from dual coefficients on the centred ones:
    the training mean's share spread evenly (ridge predictions are affine combinations)."""
    return coefficients + (1.0 - coefficients.sum(dim=-1, keepdim=True)) / coefficients.shape[-1]


def _tensor(a: np.ndarray | torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A tensor of ``a``; a read-only NumPy array (e.g. read from parquet) is copied, since
    torch would share memory it may not write (and warn)."""
    if isinstance(a, np.ndarray) and not a.flags.writeable:
        a = a.copy()
    return torch.as_tensor(a, dtype=dtype)


def _gram(rows: torch.Tensor) -> torch.Tensor:
    """rows @ rows.T (T, T) accumulated in float64, a slab of columns at a time."""
    gram = torch.zeros(len(rows), len(rows), dtype=torch.float64)
    for begin in range(0, rows.shape[1], _GRAM_CHUNK):
        slab = rows[:, begin:begin + _GRAM_CHUNK].double()  # (T, <=chunk)
        gram += slab @ slab.T
    return gram


def _loo_error(eigenvalues: torch.Tensor, eigenvectors: torch.Tensor,
               target_gram: torch.Tensor, alpha: float) -> float:
    """Closed-form leave-one-out error of kernel ridge at ``alpha``, relative to sum ||Yc_i||^2.

    The fit has an unpenalised intercept (Y's mean), so each refit without task i re-estimates
    it: the hat matrix is H = 11^T/T + Hc with Hc = U diag(s/(s+a)) U^T from K = U diag(s) U^T,
    residuals R = (I - H) Y = U diag(a/(s+a)) Z (Z = U^T Yc), and the LOO residual of task i is
    R_i / (1 - H_ii). Leaving the intercept's 1/T out of H_ii (centring with task i's own row
    held fixed) leaks task i into its own prediction: with T <= D + 1 its centred vector is minus
    the sum of the others', an interpolating fit predicts it exactly, and the error reads ~0 at a
    small alpha, which alpha selection then picks. ||R_i||^2 needs only G = Z Z^T (T, T), so no
    (T, L) array is formed per alpha.
    """
    intercept = 1.0 / len(eigenvalues)  # the mean's leverage on every task
    leverage = intercept + eigenvectors ** 2 @ (eigenvalues / (eigenvalues + alpha))  # (T,) = diag(H)
    mixing = eigenvectors * (alpha / (eigenvalues + alpha))  # (T, T) = U diag(a/(s+a))
    residual_sq = ((mixing @ target_gram) * mixing).sum(dim=1)  # (T,) = ||R_i||^2
    loo_sq = residual_sq / (1 - leverage).clamp(min=1e-12) ** 2  # (T,)
    total = float(torch.trace(target_gram))  # sum ||Yc_i||^2 (U is orthogonal)
    return float(loo_sq.sum()) / total if total > 0 else float("nan")


def _logo_error(x: torch.Tensor, y_gram: torch.Tensor, groups: Sequence[str], alpha: float,
                total: float) -> float:
    """Leave-one-group-out error of ridge at ``alpha``, relative to ``total`` (sum ||Yc_i||^2).

    Each fold is a real refit on the other groups r: X standardised and Y centred with r's own
    statistics (held fixed, a group's own rows would leak through the centring: with few groups
    the others' centred targets sum to minus its own). Group g's prediction is then
    ``mean_r + K_gr (K_rr + a I)^-1 (Y_r - mean_r)``, a linear combination ``W Y`` of the
    training rows, so its squared residual is trace(M Y Y^T M^T) with M = E_g - W (|g|, T):
    only the raw gram ``y_gram`` = Y Y^T (T, T) is needed, never a (T, L) array per fold.
    """
    labels = list(groups)
    if len(labels) != len(x) or len(set(labels)) < 2:
        raise ValueError(f"groups: need one label per training task ({len(x)}) and at least "
                         f"2 distinct groups, got {len(labels)} labels, {len(set(labels))} distinct")
    squared = 0.0
    for group in sorted(set(labels)):
        held = torch.tensor([label == group for label in labels])
        rest = x[~held]  # (R, D)
        mean, scale = _standardiser(rest)
        rest_s, held_s = (rest - mean) / scale, (x[held] - mean) / scale
        eye = torch.eye(len(rest), dtype=x.dtype)
        coefficients = torch.linalg.solve(rest_s @ rest_s.T + alpha * eye, rest_s @ held_s.T).T  # (|g|, R)
        weights = _with_intercept(coefficients)  # (|g|, R)
        mixing = torch.zeros(int(held.sum()), len(labels), dtype=x.dtype)  # (|g|, T) = E_g - W
        mixing[:, held] = torch.eye(int(held.sum()), dtype=x.dtype)
        mixing[:, ~held] = -weights
        squared += float(torch.trace(mixing @ y_gram @ mixing.T))
    return squared / total if total > 0 else float("nan")


# ----------------------------------------------------------------------------- in-context prompting


def in_context_prefix(description: str | None, demos: Sequence[str], max_demo_chars: int,
                      mode: str | None = None) -> str:
    """The task-vector prompt (icm.task_vectors.format_prompt) as a prefix for scoring texts.

    ``mode`` as for task vectors (None: "both" when a description is given, else "demos"); it
    ends with the cue "Text:". Each demonstration is clipped to ``max_demo_chars`` characters,
    as for task vectors.
    """
    mode = mode or ("both" if description is not None else "demos")
    return format_prompt(description, clip_demos(demos, max_demo_chars), mode=mode)


@torch.inference_mode()
def score_in_context(model, tokenizer, texts: Sequence[str], prefix: str, *,
                     max_length: int = 256, batch_size: int = 8) -> TextScore:
    """NLL of each text read after ``prefix`` (ending in the cue "Text:"), as in score_texts.

    Each text is tokenised as TEXT_SEPARATOR + text, the way a demonstration follows its cue,
    so its first token carries the leading space as in every demonstration (tokenising the
    separator alone would show the model a lone space token it never saw before a word). The
    same characters as `score_texts` are scored (its cut at ``max_length - 1`` tokens), and
    ``text_tokens`` is `score_texts`' token count for them, so per-token perplexities of this
    and the adapter variants share one denominator and differ only in summed NLL. The prefix
    runs once; its key/value cache is copied for every batch of texts.
    """
    if not texts:
        raise ValueError("score_in_context needs at least one text")
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2, got {max_length}")
    encoded, chars, truncated = _encode(tokenizer, texts, max_length)  # the plain tokenisation
    text_ids = [spaced_text_ids(tokenizer, text, covered) for text, covered in zip(texts, chars)]
    device = next(model.parameters()).device
    prefix_ids = [text_start_token_id(tokenizer),
                  *tokenizer(prefix, add_special_tokens=False)["input_ids"]]
    _check_context(model, len(prefix_ids) + max(map(len, text_ids)))
    prefix_out = model(input_ids=torch.tensor([prefix_ids], device=device), use_cache=True)
    first_logits = prefix_out.logits[:, -1:].float()  # (1, 1, V): predicts each text's 1st token
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    order = sorted(range(len(text_ids)), key=lambda i: len(text_ids[i]))  # less padding
    text_nll = [0.0] * len(texts)
    for begin in range(0, len(order), batch_size):
        rows = order[begin:begin + batch_size]
        nll, _ = _score_batch(model, prefix_out.past_key_values, first_logits,
                              [text_ids[i] for i in rows], len(prefix_ids), pad, device)
        for offset, index in enumerate(rows):
            text_nll[index] = nll[offset]
    text_tokens = [len(ids) - 1 for ids in encoded]  # score_texts' count (its start token dropped)
    return TextScore(nll_nats=float(sum(text_nll)), tokens=sum(text_tokens), characters=sum(chars),
                     texts=len(texts), truncated=truncated, text_nll=tuple(text_nll),
                     text_tokens=tuple(text_tokens))


def spaced_text_ids(tokenizer, text: str, covered: int) -> list[int]:
    """Token ids of TEXT_SEPARATOR + ``text``, keeping the tokens that end within the first
    ``covered`` characters of the text (the part `score_texts` scores); none for an empty one."""
    if covered <= 0:
        return []
    encoded = tokenizer(TEXT_SEPARATOR + text, add_special_tokens=False, return_offsets_mapping=True)
    limit = covered + len(TEXT_SEPARATOR)
    return [token for token, (_, end) in zip(encoded["input_ids"], encoded["offset_mapping"])
            if end <= limit]


def _score_batch(model, prefix_cache, first_logits: torch.Tensor, batch: list[list[int]],
                 prefix_length: int, pad: int, device) -> tuple[list[float], list[int]]:
    """Summed NLL and token count per text of one batch, each text continuing the prefix."""
    if not max(map(len, batch)):  # only empty texts: nothing to score, nothing to run
        return [0.0] * len(batch), [0] * len(batch)
    input_ids, text_mask = (t.to(device) for t in right_pad(batch, pad))  # (B, T) each
    cache = copy.deepcopy(prefix_cache)  # the forward pass appends to it in place
    cache.batch_repeat_interleave(len(batch))  # (1, ...) -> (B, ...) per layer
    prefix_mask = torch.ones(len(batch), prefix_length, dtype=text_mask.dtype, device=device)
    mask = torch.cat([prefix_mask, text_mask], dim=1)  # (B, P+T)
    logits = model(input_ids=input_ids, attention_mask=mask, past_key_values=cache,
                   use_cache=True).logits.float()  # (B, T, V)
    # Token j of the text is predicted by the logits at token j-1; token 0 by the prefix's last.
    predicting = torch.cat([first_logits.expand(len(batch), -1, -1), logits[:, :-1]], dim=1)
    # Flattened rows: cross_entropy over a transposed (B, V, T) view is several times slower.
    token_nll = torch.nn.functional.cross_entropy(
        predicting.reshape(-1, predicting.shape[-1]), input_ids.reshape(-1),
        reduction="none").view(input_ids.shape)  # (B, T)
    text_mask = text_mask.float()
    return (token_nll * text_mask).sum(dim=1).tolist(), text_mask.sum(dim=1).long().tolist()


def _check_context(model, needed: int) -> None:
    context = getattr(model.config, "max_position_embeddings", None)
    if context is not None and needed > context:
        raise ValueError(f"prefix + text take {needed} tokens, more than the model's context of "
                         f"{context}: use fewer or shorter demonstrations, or a smaller max_length")
