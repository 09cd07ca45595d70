"""Ray-free serving pieces: request limits, cache keys, adapter storage, archives, completions."""

from __future__ import annotations

import dataclasses
import io
import tarfile

import pytest
import torch

from icm.serving import (AdapterRequest, AdapterStore, ChatCompletionRequest, ChatMessage,
                         CompletionEngine, CompletionRequest, NotFoundError, PromptBuilder,
                         SamplingParams, ServeInputError, ServeLimits, adapter_id_for,
                         check_adapter_id, check_adapter_request, check_messages, check_prompts,
                         check_sampling, generator_fingerprint, pack_adapter, parse_model)

LIMITS = ServeLimits(max_description_chars=50, max_examples=3, max_example_chars=20,
                     max_samples=4, max_prompt_chars=100, max_prompt_tokens=32, max_tokens=16,
                     max_choices=4, max_messages=3)


def spec(**fields):
    return check_adapter_request(AdapterRequest(**fields), LIMITS)


@pytest.mark.parametrize("fields, param", [
    ({"description": "  "}, "description"),
    ({"description": "x" * 51}, "description"),
    ({}, "description"),
    ({"examples": ["a"] * 4}, "examples"),
    ({"examples": ["ok", "y" * 21]}, "examples[1]"),
    ({"examples": ["", "ok"]}, "examples[0]"),
    ({"description": "d", "samples": 5}, "samples"),
    ({"description": "d", "samples": 2}, "samples"),  # demo-ppl needs examples
])
def test_bad_adapter_requests_name_the_field(fields, param):
    with pytest.raises(ServeInputError) as caught:
        spec(**fields)
    assert caught.value.param == param and caught.value.status_code == 400


def test_adapter_id_is_a_hash_of_the_normalised_content_and_the_generator():
    base = spec(description=" Cats. ", examples=[" The cat sat. "], seed=3)
    assert base.description == "Cats." and base.examples == ("The cat sat.",)
    same = spec(description="Cats.", examples=["The cat sat."], seed=3, select="first")
    assert adapter_id_for(base, "g1") == adapter_id_for(same, "g1")  # one draw: select is moot
    assert check_adapter_id(adapter_id_for(base, "g1"))
    others = [spec(description="Cats.", examples=["The cat sat."], seed=4),
              spec(description="Dogs.", examples=["The cat sat."], seed=3),
              spec(description="Cats.", examples=["The cat sat."], seed=3, samples=2)]
    ids = {adapter_id_for(s, "g1") for s in others} | {adapter_id_for(base, "g2")}
    assert len(ids) == 4 and adapter_id_for(base, "g1") not in ids
    assert spec(description="d", samples=2, select="first").select == "first"


def test_a_condition_scale_is_part_of_the_id_only_where_it_is_not_one():
    """Requests from before the field existed keep their ids; another scale is another adapter;
    a scale outside [0, 2] is refused by the request model, naming the field."""
    from pydantic import ValidationError

    base = spec(description="Cats.", seed=3)
    assert "condition_scale" not in base.as_json() and base.condition_scale == 1.0
    assert adapter_id_for(spec(description="Cats.", seed=3, condition_scale=1.0), "g") == \
        adapter_id_for(base, "g")
    half = spec(description="Cats.", seed=3, condition_scale=0.5)
    assert half.as_json()["condition_scale"] == 0.5
    assert adapter_id_for(half, "g") != adapter_id_for(base, "g")
    for bad in (-0.1, 2.5, float("nan")):
        with pytest.raises(ValidationError, match="condition_scale"):
            AdapterRequest(description="Cats.", condition_scale=bad)


def test_generator_fingerprint_follows_the_files(tmp_path):
    (tmp_path / "generator.json").write_text("{}")
    first = generator_fingerprint(tmp_path)
    assert generator_fingerprint(tmp_path) == first
    (tmp_path / "generator.json").write_text('{"a": 1}')
    assert generator_fingerprint(tmp_path) != first
    with pytest.raises(ServeInputError):
        generator_fingerprint(tmp_path / "missing")


def test_model_names_and_ids():
    assert parse_model("tiny-llama", "tiny-llama") is None
    assert parse_model("icm:" + "a" * 24, "tiny-llama") == "a" * 24
    with pytest.raises(ServeInputError) as bad:
        parse_model("icm:../../etc", "tiny-llama")
    assert bad.value.param == "model" and bad.value.status_code == 400
    with pytest.raises(NotFoundError) as unknown:
        parse_model("gpt-4", "tiny-llama")
    assert unknown.value.status_code == 404
    for bad_id in ("A" * 24, "a" * 23, "../" + "a" * 21, ""):
        with pytest.raises(ServeInputError):
            check_adapter_id(bad_id)


def _fake_adapter(folder):
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text('{"peft_type": "LORA"}')
    (folder / "adapter_model.safetensors").write_bytes(b"weights")


def test_adapter_store_lookup_lock_and_archive(tmp_path):
    store = AdapterStore(tmp_path / "adapters")
    adapter_id = "0123456789abcdef01234567"
    assert not store.exists(adapter_id)
    with pytest.raises(NotFoundError) as missing:
        store.require(adapter_id)
    assert missing.value.param == "adapter_id"
    _fake_adapter(store.path(adapter_id))
    assert store.require(adapter_id) == store.path(adapter_id) and store.ids() == [adapter_id]
    with store.try_lock(adapter_id) as first, store.try_lock(adapter_id) as second:
        assert first and not second  # the second holder must wait
    with store.try_lock(adapter_id) as again:
        assert again
    data = pack_adapter(store.path(adapter_id), adapter_id)
    assert pack_adapter(store.path(adapter_id), adapter_id) == data  # reproducible bytes
    with tarfile.open(fileobj=io.BytesIO(data)) as archive:
        names = sorted(archive.getnames())
        weights = archive.extractfile(f"{adapter_id}/adapter_model.safetensors").read()
    assert names == [f"{adapter_id}/adapter_config.json", f"{adapter_id}/adapter_model.safetensors"]
    assert weights == b"weights"


def test_sampling_and_prompt_limits():
    ok = check_sampling(CompletionRequest(model="m", prompt="p", max_tokens=8, n=2, stop="\n"),
                        LIMITS, prompts=2)
    assert ok.max_tokens == 8 and ok.stop == ("\n",)
    chat = check_sampling(ChatCompletionRequest(model="m", messages=[ChatMessage(
        role="user", content="hi")], max_completion_tokens=5), LIMITS)
    assert chat.max_tokens == 5
    cases = [(dict(max_tokens=17), "max_tokens"), (dict(n=3), "n"), (dict(stream=True), "stream"),
             (dict(stop=["a", "b", "c", "d", "e"]), "stop"), (dict(stop=""), "stop")]
    for fields, param in cases:
        with pytest.raises(ServeInputError) as caught:
            check_sampling(CompletionRequest(model="m", prompt="p", **fields), LIMITS, prompts=2)
        assert caught.value.param == param
    assert check_prompts(["a", "b"], LIMITS) == ["a", "b"]
    for prompt, param in (([], "prompt"), ("x" * 101, "prompt"), (["ok", "x" * 101], "prompt[1]")):
        with pytest.raises(ServeInputError) as caught:
            check_prompts(prompt, LIMITS)
        assert caught.value.param == param
    with pytest.raises(ServeInputError, match="messages"):
        check_messages([ChatMessage(role="user", content="x")] * 4, LIMITS)


@pytest.fixture(scope="module")
def engine():
    from icm.config import ZooConfig
    from icm.lora_io import LoraLayout, adapter_state_dict, peft_config_json
    from icm.lora_train import build_lora_model
    from icm.models import load_base_model

    model, tokenizer = load_base_model("tiny-llama")
    lora = build_lora_model(load_base_model("tiny-llama")[0], ZooConfig(rank=4, dropout=0.0))
    layout = LoraLayout.of(adapter_state_dict(lora))
    return CompletionEngine(model, tokenizer, peft_config_json(lora.peft_config["default"]), layout)


def test_prompt_builder_adds_the_text_start_token_and_checks_length(engine):
    from icm.models import text_start_token_id

    prompts = PromptBuilder(engine.tokenizer, LIMITS)
    ids = prompts.completion("The cat")
    assert ids[0] == text_start_token_id(engine.tokenizer) and len(ids) > 1
    with pytest.raises(ServeInputError) as caught:
        prompts.completion("word " * 40, param="prompt[2]")
    assert caught.value.param == "prompt[2]"
    chat = prompts.chat([{"role": "user", "content": "hi"}])
    assert engine.tokenizer.decode(chat).rstrip().endswith("assistant")


def test_a_completion_after_a_context_is_laid_out_as_the_lm_phase_reads_a_text(engine):
    """A generator trained under the prompt (lm_context prompt) read each text after its
    prompt as PromptContext lays it out; serving reads the caller's text the same way, and
    max_prompt_tokens counts the caller's part only."""
    from icm.generator.lm import EpisodePrompt, PromptContext

    demos = "".join(f"Text: A cat sat on mat number {i}.\n\n" for i in range(4))
    context = f"Task: Short texts about cats.\n\n{demos}Text:"
    prompts = PromptBuilder(engine.tokenizer, LIMITS)
    trained = PromptContext.build(["The cat"], [EpisodePrompt(context, ())], engine.tokenizer, 64)
    prefix = prompts.context(context)
    assert prefix == trained.prompts[0]
    assert prompts.completion("The cat", context=prefix) == [*prefix, *trained.targets[0]]
    assert prompts.completion("", context=prefix) == prefix
    assert len(prefix) > LIMITS.max_prompt_tokens  # the context alone is over the limit ...
    assert prompts.completion("word " * 5, context=prefix)[:len(prefix)] == prefix  # ... uncounted
    with pytest.raises(ServeInputError) as caught:  # the caller's own part is still limited
        prompts.completion("word " * 40, param="prompt[1]", context=prefix)
    assert caught.value.param == "prompt[1]"


def test_the_store_reads_the_context_prompt_only_of_adapters_made_to_be_read_after_one(tmp_path):
    """Per adapter, from its own generator's config (a store may hold other generators'):
    a prompt-trained generator's adapter gives its recorded prompt, or an error saying how to
    get one; any other adapter gives None, its record notwithstanding."""
    import json

    from icm.config import GeneratorConfig

    store = AdapterStore(tmp_path)
    prompted = GeneratorConfig(objective="hybrid", lm_context="prompt").model_dump(mode="json")
    plain = GeneratorConfig(objective="hybrid").model_dump(mode="json")
    record = {"context_prompt": "Task: cats\n\nText:"}
    adapters = {"a" * 24: (prompted, record), "b" * 24: (prompted, {"request": {}}),
                "c" * 24: (plain, record), "d" * 24: (None, record)}  # ids: 24 hex characters
    for adapter_id, (config, generation) in adapters.items():
        store.path(adapter_id).mkdir()
        (store.path(adapter_id) / "icm_generation.json").write_text(json.dumps(generation))
        if config is not None:
            (store.path(adapter_id) / "generation.json").write_text(
                json.dumps({"generator_config": config}))
    assert store.context_prompt("a" * 24) == "Task: cats\n\nText:"
    with pytest.raises(ServeInputError, match="create it again") as caught:
        store.context_prompt("b" * 24)
    assert caught.value.param == "model" and str(tmp_path) not in str(caught.value)
    assert store.context_prompt("c" * 24) is None and store.context_prompt("d" * 24) is None


def test_completions_apply_the_adapter_per_call_and_decode_like_openai(engine, tmp_path):
    from icm.lora_io import save_adapter, unflatten

    ids = PromptBuilder(engine.tokenizer, LIMITS).completion("The cat")
    greedy = SamplingParams(max_tokens=8, temperature=0, top_p=1, n=2, stop=(), seed=None)
    base = engine.generate(ids, greedy, None)
    assert len(base) == 2 and base[0] == base[1] and base[0].finish_reason == "length"
    vector = torch.randn(engine.layout.numel, generator=torch.Generator().manual_seed(0))  # (L,)
    peft_config = engine.swap.model.peft_config["default"]
    folder = save_adapter(unflatten(vector, engine.layout), peft_config, tmp_path / "adapter")
    loaded = engine.load_adapter(folder)
    assert torch.equal(loaded, vector)
    adapted = engine.generate(ids, greedy, loaded)
    assert adapted[0].text != base[0].text
    assert engine.generate(ids, greedy, None) == base  # the adapter does not leak into base calls
    sampled = SamplingParams(max_tokens=6, temperature=1.0, top_p=0.9, n=2, stop=(), seed=7)
    assert engine.generate(ids, sampled, loaded) == engine.generate(ids, sampled, loaded)
    stop = base[0].text.split()[1] if len(base[0].text.split()) > 1 else base[0].text[-1]
    cut = engine.generate(ids, SamplingParams(8, 0, 1, 1, (stop,), None), None)[0]
    assert stop not in cut.text and cut.finish_reason == "stop"
    assert base[0].text.startswith(cut.text)


def test_a_served_generator_is_an_immutable_copy_named_by_its_content(tmp_path):
    """Replicas load the pinned copy: a pipeline rerun that rewrites the generator folder in place
    cannot reach a running app (an ingress naming adapters by the old fingerprint while a new
    replica samples with the new generator)."""
    from icm.serving import PINNED_GENERATORS_DIR, generator_fingerprint, pin_generator

    source, adapters = tmp_path / "generator", tmp_path / "adapters"
    source.mkdir()
    (source / "generator.safetensors").write_bytes(b"A" * 8)
    (source / "generator.json").write_text("{}")
    pinned = pin_generator(source, adapters)
    assert pinned.parent == adapters / PINNED_GENERATORS_DIR
    assert generator_fingerprint(pinned) == generator_fingerprint(source)
    assert pin_generator(source, adapters) == pinned  # same content: the same copy, reused
    (source / "generator.safetensors").write_bytes(b"B" * 8)  # a rerun rewrites it in place
    assert (pinned / "generator.safetensors").read_bytes() == b"A" * 8
    again = pin_generator(source, adapters)
    assert again != pinned and (again / "generator.safetensors").read_bytes() == b"B" * 8
    assert sorted(p.name for p in (adapters / PINNED_GENERATORS_DIR).iterdir()) == sorted([pinned.name, again.name])
    assert AdapterStore(adapters).ids() == []  # never taken for an adapter


def test_adapter_id_names_a_non_default_encoder_dtype_and_keeps_float32_ids():
    base = spec(description="Cats.", examples=["The cat sat."], seed=3)
    assert adapter_id_for(base, "g1", "float32") == adapter_id_for(base, "g1")
    assert len({adapter_id_for(base, "g1", dtype) for dtype in ("float32", "bfloat16", "float16")}) == 3


def test_stop_strings_match_generated_text_only_and_count_no_padding(engine):
    """Two bugs of the hf engine: HF's stop_strings matched a stop string that began in the
    prompt (the answer ended after one token, reported 'length'), and a row of a sampled batch
    ended by a stop string counted the padding after it in usage."""
    prompt = "The cat"
    ids = PromptBuilder(engine.tokenizer, LIMITS).completion(prompt)
    full = engine.generate(ids, SamplingParams(8, 0, 1, 1, (), None), None)[0]
    across = prompt[-2:] + full.text[:1]  # begins in the prompt, ends on the first new token
    cut = engine.generate(ids, SamplingParams(8, 0, 1, 1, (across,), None), None)[0]
    expected = full.text.split(across)[0]
    assert cut.text == expected and cut.finish_reason == ("stop" if across in full.text else "length")

    sampled = SamplingParams(max_tokens=12, temperature=1.0, top_p=1.0, n=4, stop=(), seed=3)
    rows = engine.generate(ids, sampled, None)
    stop = rows[0].text[len(rows[0].text) // 2]  # a character row 0 certainly produces
    stopped = engine.generate(ids, dataclasses.replace(sampled, stop=(stop,)), None)
    assert stopped[0].finish_reason == "stop" and stopped[0].tokens < rows[0].tokens
    for k, row in enumerate(stopped):  # same seed: the same draws until each row stops
        assert rows[k].text.startswith(row.text) and stop not in row.text
        if row.finish_reason != "stop":
            continue
        # its count is exactly the tokens that complete the stop string, padding excluded
        upto = engine.generate(ids, dataclasses.replace(sampled, max_tokens=row.tokens), None)[k]
        assert stop in upto.text
        if row.tokens > 1:
            fewer = dataclasses.replace(sampled, max_tokens=row.tokens - 1)
            assert stop not in engine.generate(ids, fewer, None)[k].text
