"""Perplexity and bits per character: the numbers, batching, truncation and adapters."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch

from icm.evaluation import score_texts
from icm.models import text_start_token_id

TEXTS = ["The cat sat on the mat.", "def add(a, b):\n    return a + b\n",
         "In the beginning God created the heaven and the earth.", "x"]


def _reference_nll(model, tokenizer, text: str) -> tuple[float, int]:
    """Unbatched, unpadded NLL written out by hand."""
    ids = [text_start_token_id(tokenizer), *tokenizer(text, add_special_tokens=False).input_ids]
    ids = torch.tensor([ids])
    with torch.inference_mode():
        log_probs = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), dim=-1)
    targets = ids[0, 1:]
    return float(-log_probs[torch.arange(len(targets)), targets].sum()), len(targets)


def test_batched_padded_score_equals_per_text_reference(tiny_llama):
    model, tokenizer = tiny_llama
    score = score_texts(model, tokenizer, TEXTS, batch_size=3)
    parts = [_reference_nll(model, tokenizer, t) for t in TEXTS]
    assert score.tokens == sum(n for _, n in parts)
    assert score.nll_nats == pytest.approx(sum(nll for nll, _ in parts), rel=1e-4)
    assert score.characters == sum(map(len, TEXTS)) and score.texts == 4 and score.truncated == 0
    assert score.perplexity == pytest.approx(math.exp(score.nll_nats / score.tokens))
    assert score.bits_per_char == pytest.approx(score.nll_nats / math.log(2) / score.characters)
    # batch size must not change the result
    assert score_texts(model, tokenizer, TEXTS, batch_size=1).nll_nats == pytest.approx(score.nll_nats, rel=1e-4)


def test_truncation_counts_only_kept_characters(tiny_llama):
    model, tokenizer = tiny_llama
    long_text = "word " * 200
    score = score_texts(model, tokenizer, [long_text], max_length=16)
    assert score.truncated == 1 and score.tokens == 15
    assert 0 < score.characters < len(long_text)
    with pytest.raises(ValueError, match="at least one text"):
        score_texts(model, tokenizer, [])


@pytest.mark.slow
def test_smollm2_perplexity_on_suite_text_is_finite_and_far_below_tiny(smollm2, tiny_llama, default_suite):
    texts = []
    for group_tasks in default_suite.groups().values():
        texts += default_suite.tasks[group_tasks[0]].eval_texts()[:4]
    real = score_texts(*smollm2, texts, max_length=128)
    tiny = score_texts(*tiny_llama, texts, max_length=128)
    assert math.isfinite(real.perplexity) and real.perplexity < 100
    assert tiny.perplexity > 10 * real.perplexity  # an untrained model is near uniform (~49k)
    assert real.bits_per_char < tiny.bits_per_char / 3


def test_evaluate_cli_base_and_adapter(tiny_llama, tiny_suite, tmp_path):
    """`icm evaluate` prints JSON for the base model and for a peft adapter on it."""
    from peft import LoraConfig, get_peft_model

    model, _ = tiny_llama
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)  # a non-zero B so that the adapter changes the model
    peft_model.save_pretrained(tmp_path / "adapter")
    peft_model.unload()  # leave the shared fixture model as it was

    def run(*extra):
        out = subprocess.run([sys.executable, "-m", "jobs", "score", "--task",
                              str(tiny_suite / "cats"), "--model", "tiny-llama", *extra],
                             capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)

    base, adapted = run("--base-only"), run("--adapter", str(tmp_path / "adapter"))
    assert base["texts"] == adapted["texts"] == 2 and base["tokens"] == adapted["tokens"]
    assert base["perplexity"] != adapted["perplexity"]
    bad = subprocess.run([sys.executable, "-m", "jobs", "score", "--task", str(tiny_suite / "cats"),
                          "--model", "tiny-llama", "--adapter", str(tmp_path)], capture_output=True, text=True)
    assert bad.returncode == 2 and "adapter_config.json is missing" in bad.stderr


def test_per_text_nll_and_tokens_match_each_text_alone(tiny_llama):
    """Intervals are bootstrapped over texts: each text's own NLL must be stored, in input order."""
    model, tokenizer = tiny_llama
    score = score_texts(model, tokenizer, TEXTS, batch_size=3)  # batches sorted by length inside
    parts = [_reference_nll(model, tokenizer, t) for t in TEXTS]
    assert list(score.text_tokens) == [n for _, n in parts]
    assert list(score.text_nll) == pytest.approx([nll for nll, _ in parts], rel=1e-4)
    row = score.as_dict()
    assert row["text_nll"] == list(score.text_nll) and sum(row["text_tokens"]) == score.tokens
