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


def test_description_alone_and_first_draw(generator_dir):
    factory = AdapterFactory(generator_dir)
    first = factory.generate("Short texts about cats.", None, samples=2, select="first", seed=3)
    assert first.chosen == 0 and first.demo_perplexities == []


@pytest.mark.parametrize("kwargs, message", [
    ({"samples": 0}, "'samples' must be >= 1"),
    ({"select": "best"}, "'select' must be"),
    ({"samples": 2, "examples": None}, "needs examples"),
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


@pytest.fixture(scope="module")
def with_companion(generator_dir, tmp_path_factory):
    """The generator with a companion (as ``generator.lm_anchor: both`` saves one): the same
    network with a shared residual added, so that its draws differ from the generator's."""
    from icm.generator import LoraGenerator

    main, companion = LoraGenerator.load(generator_dir), LoraGenerator.load(generator_dir)
    noise = torch.randn(companion.generated_dim, generator=torch.Generator().manual_seed(0))
    companion.residual = 0.05 * noise
    main.companions = {"multitask": companion}
    return main.save(tmp_path_factory.mktemp("companion") / "generator")


def test_a_companions_draws_compete_with_the_generators_by_demo_perplexity(
        with_companion, generator_dir, tmp_path):
    """lm_anchor: both: one sample from each generator; with examples the one with the lower
    demo perplexity is kept (even at samples=1) and named; without them the generator's own."""
    from icm.generator import LoraGenerator

    loaded = LoraGenerator.load(with_companion)
    assert [name for name, _ in loaded.candidates()] == ["main", "multitask"]
    plain = LoraGenerator.load(generator_dir)
    size = json.loads((with_companion / "generator.json").read_text())["size"]
    assert size["companion_bytes"] > 0 and size["generator_bytes"] > 2 * size["weights_bytes"]
    factory = AdapterFactory(with_companion)
    vector = factory.task_vector("Short texts about cats.", EXAMPLES)
    draws, names = loaded.sample_candidates(vector, num_samples=2, seed=1)  # (2 x 2, L)
    assert names == ["main", "main", "multitask", "multitask"] and draws.shape[0] == 4
    assert torch.equal(draws[:2], plain.sample(vector, num_samples=2, seed=1))  # its own first
    assert not torch.allclose(draws[0], draws[2])
    result = factory.generate("Short texts about cats.", EXAMPLES, samples=1, seed=1)
    assert len(result.demo_perplexities) == 2 and len(set(result.demo_perplexities)) == 2
    chosen = int(np.argmin(result.demo_perplexities))
    assert result.chosen == chosen and result.generator == ["main", "multitask"][chosen]
    one_each, _ = loaded.sample_candidates(vector, num_samples=1, seed=1)  # (2, L)
    assert torch.equal(result.vector, one_each[chosen])
    written = factory.write(result, tmp_path / "a", {})
    record = json.loads((written / "icm_generation.json").read_text())
    assert record["chosen_generator"] == result.generator
    alone = factory.generate("Short texts about cats.", None, samples=1, seed=1)
    assert alone.generator == "main" and alone.demo_perplexities == []


def test_a_companion_must_match_its_generator(generator_dir, tmp_path):
    from icm.generator import LoraGenerator
    from icm.generator.inputs import GeneratorInputError

    main, other = LoraGenerator.load(generator_dir), LoraGenerator.load(generator_dir)
    other.condition_spec = {**other.condition_spec, "layer": 0}
    main.companions = {"multitask": other}
    with pytest.raises(GeneratorInputError, match="companion 'multitask' differs"):
        main.save(tmp_path / "generator")
    assert not (tmp_path / "generator").exists()
