"""Serving a generator trained under the prompt (``generator.lm_context: prompt``): completions
with its adapters read the caller's text after the adapter's in-context prompt, as its LM phase
read every train text. Real Ray Serve, real HTTP, a tiny-llama generator whose LM phase ran
under the prompt (a few steps, here in seconds)."""

from __future__ import annotations

import json

import pytest

from tests.integration.test_serve import CATS, build_tiny_generator, serving

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def prompted(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve-prompted")
    with serving(root, build_tiny_generator(root / "generator", prompted_lm_steps=4)) as app:
        yield app


def test_completions_read_the_text_after_the_adapters_prompt_and_chat_is_refused(prompted):
    import torch
    from peft import PeftModel

    from icm.generator import LoraGenerator
    from icm.models import load_base_model, text_start_token_id
    from icm.task_vectors import format_prompt

    assert LoraGenerator.load(prompted.generator_dir).config.reads_after_prompt
    adapter = prompted.adapter({**CATS, "seed": 2})
    folder = prompted.adapter_dir / adapter["adapter_id"]
    context = json.loads((folder / "icm_generation.json").read_text())["context_prompt"]
    assert context == format_prompt(CATS["description"], CATS["examples"], mode="both")

    model, tokenizer = load_base_model("tiny-llama")

    def tokens(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    # as the LM phase read a text after its prompt: start token, prompt, " " + text
    ids = torch.tensor([[text_start_token_id(tokenizer), *tokens(context), *tokens(" The cat")]])
    peft_model = PeftModel.from_pretrained(model, str(folder)).eval()
    with torch.inference_mode():
        out = peft_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=10,
                                  do_sample=False, pad_token_id=tokenizer.pad_token_id)
    local = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    served = prompted.post("/v1/completions", {"model": adapter["model"], "prompt": "The cat",
                                               "max_tokens": 10, "temperature": 0})
    assert served.status_code == 200, served.text
    assert served.json()["usage"]["prompt_tokens"] == ids.shape[1]
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
