"""Serving a generator trained under the prompt (``generator.lm_context: prompt``): completions
with its adapters read the caller's text after the adapter's in-context prompt, as its LM phase
read every train text. Real Ray Serve, real HTTP, a tiny-llama generator whose LM phase ran
under the prompt (a few steps, here in seconds)."""

from __future__ import annotations

import json

import pytest

from tests.integration.test_serve import CATS, build_tiny_generator, peft_greedy, serving

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def prompted(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve-prompted")
    with serving(root, build_tiny_generator(root / "generator", prompted_lm_steps=4)) as app:
        yield app


def test_completions_read_the_text_after_the_adapters_prompt_and_chat_is_refused(prompted):
    from icm.generator import LoraGenerator
    from icm.models import load_tokenizer, text_start_token_id
    from icm.task_vectors import format_prompt

    assert LoraGenerator.load(prompted.generator_dir).config.reads_after_prompt
    adapter = prompted.adapter({**CATS, "seed": 2})
    folder = prompted.adapter_dir / adapter["adapter_id"]
    context = json.loads((folder / "icm_generation.json").read_text())["context_prompt"]
    assert context == format_prompt(CATS["description"], CATS["examples"], mode="both")

    tokenizer = load_tokenizer("tiny-llama")

    def tokens(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    # as the LM phase read a text after its prompt: start token, prompt, " " + text
    ids = [text_start_token_id(tokenizer), *tokens(context), *tokens(" The cat")]
    local = peft_greedy(folder, ids, 10)
    served = prompted.post("/v1/completions", {"model": adapter["model"], "prompt": "The cat",
                                               "max_tokens": 10, "temperature": 0})
    assert served.status_code == 200, served.text
    assert served.json()["usage"]["prompt_tokens"] == len(ids)
    assert served.json()["choices"][0]["text"] == local

    base = prompted.post("/v1/completions", {"model": prompted.base_model, "prompt": "The cat",
                                             "max_tokens": 4, "temperature": 0})
    assert base.json()["usage"]["prompt_tokens"] == 1 + len(tokens("The cat"))  # no context

    chat = prompted.post("/v1/chat/completions", {
        "model": adapter["model"], "messages": [{"role": "user", "content": "A cat?"}],
        "max_tokens": 4})
    error = chat.json()["error"]
    assert chat.status_code == 400 and error["param"] == "model", chat.text
    assert "/v1/completions" in error["message"]
    assert prompted.post("/v1/chat/completions", {  # the base model still chats
        "model": prompted.base_model, "messages": [{"role": "user", "content": "A cat?"}],
        "max_tokens": 4}).status_code == 200
