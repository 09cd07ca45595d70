"""One request end to end (icm/generate.py): context -> task vector -> K draws -> the draw with
the lowest demonstration perplexity -> a peft adapter (tiny-llama, a small trained generator)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from icm.config import GeneratorConfig, TaskVectorConfig
from icm.generate import AdapterFactory, GenerateInputError, task_context
from icm.generator import train_generator
from icm.generator.inputs import initial_lora_state, load_zoo
from tests.unit.test_generator import FAST, LORA, write_zoo

pytestmark = pytest.mark.usefixtures("one_torch_thread")
EXAMPLES = ["The cat sat on the mat.", "A cat slept in the sun all day."]


@pytest.fixture(scope="module")
def generator_dir(tmp_path_factory):
    """A generator over a tiny-llama zoo, conditioned on 64-d vectors (tiny-llama's hidden
    size) and recording the task-vector config a request is encoded with."""
    base = tmp_path_factory.mktemp("generate")
    conditions = write_zoo(base / "zoo", ["cats", "sums", "code"], dim=64)
    zoo = load_zoo(base / "zoo", include=["cats", "sums", "code"])
    _, init_state = initial_lora_state("tiny-llama", LORA.model_dump(mode="json"))
    spec = {"layer": -1, "pooling": "mean", "model_spec": "tiny-llama",
            "task_vectors": TaskVectorConfig(k=2, layers=[-1], poolings=["mean"]).model_dump(mode="json")}
    generator = train_generator(zoo, conditions, GeneratorConfig(**{**FAST, "steps": 30}),
                                init_state=init_state, condition_spec=spec)
    return generator.save(base / "generator")


def test_best_of_k_keeps_the_draw_with_the_lowest_demo_perplexity(generator_dir, tmp_path):
    factory = AdapterFactory(generator_dir)
    vector = factory.task_vector("Short texts about cats.", EXAMPLES)
    assert vector.shape == (64,) and np.isfinite(vector).all()
    result = factory.generate("Short texts about cats.", EXAMPLES, samples=3, seed=1)
    assert len(result.demo_perplexities) == 3
    assert result.chosen == int(np.argmin(result.demo_perplexities))
    draws = factory.generator.sample(vector, num_samples=3, seed=1)
    assert torch.equal(result.vector, draws[result.chosen])  # the same draws, seeded
    assert {"encode_s", "sample_s", "select_s"} <= set(result.timings)
    out = factory.write(result, tmp_path / "adapter", {"description": "Short texts about cats."})
    record = json.loads((out / "icm_generation.json").read_text())
    assert record["chosen_sample"] == result.chosen and (out / "adapter_config.json").is_file()


def test_the_adapter_records_the_prompt_its_condition_was_read_from(generator_dir, tmp_path):
    """What serving reads completions after for a generator trained under the prompt: the
    request's fitted prompt (first k examples, as the task vector read it), recorded."""
    from icm.task_vectors import format_prompt

    factory = AdapterFactory(generator_dir)
    many = [*EXAMPLES, "A third cat."]  # k = 2: the third is not read
    result = factory.generate("Short texts about cats.", many, seed=4)
    assert result.context_prompt == format_prompt("Short texts about cats.", EXAMPLES, mode="both")
    prompted = factory.encoder.encode_prompts([result.context_prompt])[factory.key][0]
    assert np.allclose(prompted, factory.task_vector("Short texts about cats.", many), atol=1e-5)
    alone = factory.generate("Short texts about cats.", None).context_prompt
    assert alone == format_prompt("Short texts about cats.", [], mode="description")
    out = factory.write(result, tmp_path / "adapter", {"description": "Short texts about cats."})
    assert json.loads((out / "icm_generation.json").read_text())["context_prompt"] == \
        result.context_prompt


def test_description_alone_and_first_draw(generator_dir):
    factory = AdapterFactory(generator_dir)
    first = factory.generate("Short texts about cats.", None, samples=2, select="first", seed=3)
    assert first.chosen == 0 and first.demo_perplexities == []


def test_a_condition_scale_shrinks_the_requests_condition_toward_the_blind_mode(generator_dir):
    """Scale 0: every request gets the generator's one blind adapter; 0.5: the draw from the
    request's condition halfway to the training mean (`LoraGenerator.sample`)."""
    factory = AdapterFactory(generator_dir)
    cats = factory.generate("Short texts about cats.", EXAMPLES, seed=2, condition_scale=0.0)
    sums = factory.generate("Sums of numbers.", ["1 + 1 = 2"], seed=2, condition_scale=0.0)
    assert torch.equal(cats.vector, sums.vector)
    half = factory.generate("Short texts about cats.", EXAMPLES, seed=2, condition_scale=0.5)
    vector = factory.task_vector("Short texts about cats.", EXAMPLES)
    expected = factory.generator.sample(vector, seed=2, condition_scale=0.5)[0]  # (L,)
    assert torch.equal(half.vector, expected)
    full = factory.generate("Short texts about cats.", EXAMPLES, seed=2)
    assert not torch.equal(half.vector, full.vector)


@pytest.mark.parametrize("kwargs, message", [
    ({"samples": 0}, "'samples' must be >= 1"),
    ({"select": "best"}, "'select' must be"),
    ({"samples": 2, "examples": None}, "needs examples"),
    ({"condition_scale": -0.5}, "'condition_scale' must be in \\[0, 2\\]"),
    ({"condition_scale": float("nan")}, "'condition_scale' must be in"),
])
def test_bad_requests_are_named(generator_dir, kwargs, message):
    factory = AdapterFactory(generator_dir)
    call = {"description": "Cats.", "examples": EXAMPLES, **kwargs}
    with pytest.raises(GenerateInputError, match=message):
        factory.generate(call.pop("description"), call.pop("examples"), **call)


def test_task_context_is_seeded_train_texts(tiny_suite):
    description, demos = task_context(tiny_suite / "cats", k=2, seed=0)
    again = task_context(tiny_suite / "cats", k=2, seed=0)
    assert (description, demos) == again and len(demos) == 2
    from icm.tasks import load_task

    task = load_task(tiny_suite / "cats")
    assert set(demos) <= set(task.train_texts()) and not set(demos) & set(task.eval_texts())


def test_a_request_to_a_span_generator_is_encoded_as_its_training_vectors_were(tmp_path):
    """A `hyper-attn` generator on pooling `chunks` (4 spans of tiny-llama's 64-d states): the
    request's vector is the encoder's 4 x 64 chunks vector of the same prompt, and the chosen
    draw becomes a peft adapter."""
    from peft import PeftModel

    from icm.models import load_base_model
    from icm.task_vectors import TaskEncoder

    conditions = write_zoo(tmp_path / "zoo", ["cats", "sums", "code"], dim=4 * 64)
    zoo = load_zoo(tmp_path / "zoo", include=["cats", "sums", "code"])
    _, init_state = initial_lora_state("tiny-llama", LORA.model_dump(mode="json"))
    tv = TaskVectorConfig(k=2, layers=[-1], poolings=["chunks"], chunks=4)
    spec = {"layer": -1, "pooling": "chunks", "model_spec": "tiny-llama", "task_vectors": tv.model_dump(mode="json")}
    cfg = GeneratorConfig(**{**FAST, "arch": "hyper-attn", "subspace_dim": None, "width": 16,
                             "embedding_dim": 4, "condition_pooling": "chunks", "steps": 20})
    generator = train_generator(zoo, conditions, cfg, init_state=init_state, condition_spec=spec)
    factory = AdapterFactory(generator.save(tmp_path / "generator"))
    vector = factory.task_vector("Short texts about cats.", EXAMPLES)
    encoder = TaskEncoder(*load_base_model("tiny-llama"), tv)
    np.testing.assert_allclose(vector, encoder.encode("Short texts about cats.", EXAMPLES)[(-1, "chunks")],
                               rtol=1e-5, atol=1e-6)
    assert vector.shape == (4 * 64,)
    result = factory.generate("Short texts about cats.", EXAMPLES, samples=2, seed=0)
    out = factory.write(result, tmp_path / "adapter", {"description": "Short texts about cats."})
    model, _ = load_base_model("tiny-llama")
    assert isinstance(PeftModel.from_pretrained(model, str(out)), PeftModel)
