"""Language-model quality of a (possibly adapted) model on a list of texts.

Perplexity = exp(mean token NLL); bits per character = total NLL in nats / (ln 2 x characters).
BPC is comparable across tokenizers, perplexity is not. Every text is scored on its own,
preceded by the model's text-start token so that its first token is scored too; texts longer
than ``max_length`` tokens are truncated and only the kept characters are counted.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import torch

from icm.models import right_pad, text_start_token_id


@dataclass(frozen=True)
class TextScore:
    nll_nats: float  # summed token negative log-likelihood
    tokens: int  # scored tokens
    characters: int  # characters covered by the scored tokens
    texts: int
    truncated: int  # texts cut at max_length
    # Per text, in the order given: summed token NLL and scored tokens. Kept so that intervals
    # can be bootstrapped over texts (a total alone cannot give one).
    text_nll: tuple[float, ...] = field(default=(), repr=False)
    text_tokens: tuple[int, ...] = field(default=(), repr=False)

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll_nats / self.tokens) if self.tokens else float("nan")

    @property
    def bits_per_char(self) -> float:
        return self.nll_nats / (math.log(2) * self.characters) if self.characters else float("nan")

    def as_dict(self) -> dict:
        """Flat row: totals, perplexity, bits/char, and the per-text lists (as lists)."""
        row = asdict(self)
        row["text_nll"], row["text_tokens"] = list(self.text_nll), list(self.text_tokens)
        return {**row, "perplexity": self.perplexity, "bits_per_char": self.bits_per_char}


def _encode(tokenizer, texts: Sequence[str], max_length: int) -> tuple[list[list[int]], list[int], int]:
    """Token ids per text (start token first) and the characters each kept prefix covers."""
    start = text_start_token_id(tokenizer)
    encoded = tokenizer(list(texts), add_special_tokens=False, return_offsets_mapping=True)
    ids, chars, truncated = [], [], 0
    for text, token_ids, offsets in zip(texts, encoded["input_ids"], encoded["offset_mapping"]):
        keep = max_length - 1  # one position goes to the start token
        if len(token_ids) > keep:
            truncated += 1
            token_ids, offsets = token_ids[:keep], offsets[:keep]
            chars.append(offsets[-1][1] if offsets else 0)
        else:
            chars.append(len(text))
        ids.append([start, *token_ids])
    return ids, chars, truncated


@torch.inference_mode()
def score_texts(model, tokenizer, texts: Sequence[str], *, max_length: int = 256,
                batch_size: int = 8) -> TextScore:
    """Sum the token NLL of ``model`` over ``texts`` (right-padded batches, padding masked)."""
    if not texts:
        raise ValueError("score_texts needs at least one text")
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2, got {max_length}")
    ids, chars, truncated = _encode(tokenizer, texts, max_length)
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    # Sorting by length keeps padding (wasted compute) small; sums do not depend on order.
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    text_nll, text_tokens = [0.0] * len(ids), [0] * len(ids)
    for begin in range(0, len(order), batch_size):
        batch = [ids[i] for i in order[begin:begin + batch_size]]
        input_ids, mask = (t.to(device) for t in right_pad(batch, pad))  # (B, T) each
        logits = model(input_ids=input_ids, attention_mask=mask).logits[:, :-1]  # (B, T-1, V)
        target = input_ids[:, 1:]  # (B, T-1)
        token_nll = torch.nn.functional.cross_entropy(
            logits.float().transpose(1, 2), target, reduction="none")  # (B, T-1)
        target_mask = mask[:, 1:].float()
        per_text = (token_nll * target_mask).sum(dim=1).tolist()  # (B,)
        counts = target_mask.sum(dim=1).long().tolist()  # (B,)
        for offset, index in enumerate(order[begin:begin + batch_size]):
            text_nll[index], text_tokens[index] = per_text[offset], counts[offset]
    return TextScore(nll_nats=float(sum(text_nll)), tokens=sum(text_tokens), characters=sum(chars),
                     texts=len(texts), truncated=truncated, text_nll=tuple(text_nll),
                     text_tokens=tuple(text_tokens))


def evaluate_task_base(task_path: str, *, model_spec: str, cache_dir: str | None, dtype: str,
                       max_length: int, batch_size: int, max_texts: int | None) -> dict:
    """Score the base model on one task's eval split; returns one flat result row."""
    import time

    from icm.models import load_base_model
    from icm.tasks import load_task

    started = time.perf_counter()
    task = load_task(task_path)
    texts = task.eval_texts()[:max_texts] if max_texts else task.eval_texts()
    model, tokenizer = load_base_model(model_spec, cache_dir=cache_dir, dtype=dtype)
    score = score_texts(model, tokenizer, texts, max_length=max_length, batch_size=batch_size)
    return {"task": task.name, "group": task.group, "model": model_spec, **score.as_dict(),
            "seconds": round(time.perf_counter() - started, 3)}
