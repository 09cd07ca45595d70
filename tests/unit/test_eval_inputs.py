"""The evaluation's items: per setting, the right oracle, baselines built from the right tasks,
and the generated, in-context and adapter variants scored on the same texts (tiny-llama)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from icm.config import EvalConfig, ModelConfig, TaskVectorConfig
from icm.eval.inputs import SettingPlan, build_items, final_snapshots
from icm.eval.scoring import adapter_vector, evaluate_item
from icm.tasks import load_suite
from icm.zoo import REPLICATE_PREFIX
from tests.conftest import make_suite
from tests.unit.test_generator import FAST, write_zoo


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A suite (dogs held out), a zoo of cats/sums/code (+ multitask), oracles of dogs and a
    replicate of cats, their task vectors, and a small generator trained on the zoo."""
    from icm.config import GeneratorConfig
    from icm.generator import train_generator
    from icm.generator.inputs import initial_lora_state, load_zoo
    from tests.unit.test_generator import LORA

    base = tmp_path_factory.mktemp("eval")
    suite = load_suite(make_suite(base / "suite"))
    conditions = write_zoo(base / "zoo", ["cats", "sums", "code"])
    conditions |= write_zoo(base / "oracles", ["dogs", REPLICATE_PREFIX + "cats"], multitask=False, seed=1)
    means = {"both": {t: c.mean(axis=0) for t, c in conditions.items()}}
    means["description"] = {t: v + 0.01 for t, v in means["both"].items()}
    zoo = load_zoo(base / "zoo", include=["cats", "sums", "code"])
    _, init_state = initial_lora_state("tiny-llama", LORA.model_dump(mode="json"))
    generator = train_generator(zoo, {t: conditions[t] for t in zoo.vectors},
                                GeneratorConfig(**{**FAST, "steps": 50}), init_state=init_state)
    generator.save(base / "generator")
    return base, suite, means


def _items(world, plans):
    base, suite, means = world
    return build_items(suite, plans, means, zoo_root=base / "zoo", oracle_root=base / "oracles",
                       options={"soup_k": 2}, variant_names=None)


def _swap_for(item):
    """tiny-llama with the item's generator's LoRA layout, ready to load a vector; and the
    tokenizer and generator."""
    from icm.adapter_swap import SwappableLora
    from icm.generator import LoraGenerator
    from icm.models import load_base_model

    model, tokenizer = load_base_model("tiny-llama")
    generator = LoraGenerator.load(item.generator_dir)
    return SwappableLora(model, generator.peft_config, generator.layout), tokenizer, generator


def test_items_take_oracles_and_baselines_from_the_right_place(world):
    base, suite, _ = world
    generator = str(base / "generator")
    training = ["cats", "code", "sums"]
    plans = [SettingPlan("heldout", ["dogs"], training, generator),
             SettingPlan("fold", ["cats", "dogs"], ["code", "sums"], generator, fold=0),
             SettingPlan("seen", ["cats"], training, generator)]
    items, record, finals = _items(world, plans)
    by = {(i.setting, i.task): i for i in items}
    dogs = by[("heldout", "dogs")]
    assert dogs.adapters["oracle"].snapshots == (final_snapshots(base / "oracles")["dogs"],)
    assert "multitask" in dogs.adapters and "lookup" not in dogs.variants
    ridge = dict(dogs.adapters["ridge"].combination)
    assert set(ridge) <= set(training) and sum(ridge.values()) == pytest.approx(1.0)
    assert set(dict(dogs.adapters["soup"].combination)) == set(training)
    fold_cats = by[("fold", "cats")]
    assert fold_cats.adapters["oracle"].snapshots == (final_snapshots(base / "zoo")["cats"],)
    assert "multitask" not in fold_cats.variants  # it trained on the fold's tasks
    for name in ("soup", "similarity-soup", "nearest", "ridge"):  # only the fold's training tasks
        assert set(dict(fold_cats.adapters[name].combination)) <= {"code", "sums"}, name
    seen = by[("seen", "cats")]
    assert len(seen.adapters["lookup"].snapshots) == 4
    assert seen.adapters["replicate"].snapshots == (final_snapshots(base / "oracles")[REPLICATE_PREFIX + "cats"],)
    for name in ("soup", "similarity-soup", "nearest", "ridge"):  # never the task itself
        assert "cats" not in dict(seen.adapters[name].combination), name
    assert set(record["ridge"]["seen"]) == {"without cats"}  # refit without the seen task
    assert record["ridge"]["fold0"]["criterion"] == "leave-one-group-out"  # code, sums: 2 groups
    assert record["ridge"]["heldout"]["criterion"] == "leave-one-task-out"
    assert set(finals) == set(training) and set(record["ridge"]) == {"heldout", "fold0", "seen"}
    mixed = adapter_vector(dogs.adapters["soup"], finals)
    assert torch.allclose(mixed, torch.stack(list(finals.values())).mean(0), atol=1e-6)


def test_baselines_read_their_own_pooling_and_the_generator_its_own(world):
    """evaluate.baseline_pooling: the zoo baselines (nearest here) pick by ``baseline_means``
    while the generator's conditions stay ``means``: generators on other poolings share them."""
    base, suite, means = world
    plans = [SettingPlan("heldout", ["dogs"], ["cats", "code", "sums"], str(base / "generator"))]
    vectors = {"cats": [1.0, 0.0], "code": [0.0, 1.0], "sums": [-1.0, 0.0], "dogs": [0.1, 0.9]}
    other = {"both": {t: np.asarray(v, dtype=np.float32) for t, v in vectors.items()}}
    options = dict(zoo_root=base / "zoo", oracle_root=base / "oracles", options={"soup_k": 2},
                   variant_names=["generated", "nearest", "ridge"])
    (own,), _, _ = build_items(suite, plans, means, **options)
    (shared,), _, _ = build_items(suite, plans, means, baseline_means=other, **options)
    assert dict(shared.adapters["nearest"].combination) == {"code": 1.0}  # dogs' nearest
    assert np.array_equal(shared.conditions["both"], own.conditions["both"])
    assert np.array_equal(shared.conditions["both"], means["both"]["dogs"])
    assert dict(shared.adapters["ridge"].combination) != dict(own.adapters["ridge"].combination)


def test_the_baseline_pooling_must_be_computed_and_its_default_changes_no_hash():
    from pydantic import ValidationError

    from icm.config import PipelineConfig
    from icm.io import sha256_json

    cfg = PipelineConfig()
    with pytest.raises(ValidationError, match="evaluate.baseline_pooling='chunks' is not in"):
        PipelineConfig(evaluate={"baseline_pooling": "chunks"})
    data = cfg.model_dump(mode="json")["evaluate"]
    for name in ("baseline_pooling", "finetune_steps", "finetune_lr", "finetune_batch_size",
                 "finetune_warmup_steps"):  # added later: unread at their defaults
        del data[name]
    assert cfg.fingerprint("evaluate") == sha256_json({"evaluate": data})
    for changed in ({"baseline_pooling": "mean"}, {"finetune_steps": 96}, {"finetune_lr": 1e-3}):
        chosen = PipelineConfig(evaluate=changed)
        assert chosen.fingerprint("evaluate") != cfg.fingerprint("evaluate"), changed


def test_every_variant_is_scored_on_the_same_texts_with_per_text_nll(world):
    base, _, _ = world
    plans = [SettingPlan("heldout", ["dogs"], ["cats", "code", "sums"], str(base / "generator"))]
    items, _, finals = _items(world, plans)
    cfg = EvalConfig(max_texts=2, max_length=32, samples=2, best_of=2)
    rows = evaluate_item(items[0], finals, model=ModelConfig(spec="tiny-llama", max_length=32),
                         cfg=cfg, task_vectors=TaskVectorConfig(k=2, max_demo_chars=100))
    variants = [r["variant"] for r in rows]
    assert variants[0] == "oracle" and variants.count("generated") == 2
    assert set(items[0].variants) == set(variants)
    tokens = {tuple(r["text_tokens"]) for r in rows}
    assert len(tokens) == 1 and all(len(r["text_nll"]) == 2 for r in rows)  # paired texts
    by = {r["variant"]: r for r in rows if r["variant"] != "generated"}
    assert by["oracle"]["delta_cosine_to_oracle"] == pytest.approx(1.0)
    assert by["base"]["delta_cosine_to_oracle"] is None
    assert by["in-context"]["nll_nats"] != pytest.approx(by["base"]["nll_nats"])
    best = by["generated-best-of-k"]
    chosen = [r for r in rows if r["variant"] == "generated" and r["sample"] == best["sample"]]
    assert chosen and chosen[0]["nll_nats"] == pytest.approx(best["nll_nats"], rel=1e-5)
    assert best["draw_spread"] > 0  # the latent changes the adapter
    assert np.isfinite([r["perplexity"] for r in rows]).all()
    assert all(r["setting"] == "heldout" and r["task"] == "dogs" for r in rows)


def test_demo_selected_scores_the_candidate_with_the_lowest_demonstration_perplexity(world):
    """demo-selected's candidates are the generator's best_of draws and the soup, similarity-soup,
    nearest and ridge adapters (built even where those are not scored themselves); it scores
    the one whose perplexity on the k demonstrations is lowest, recomputed here."""
    from icm.task_vectors import sample_demos
    from icm.tasks import load_task

    base, suite, means = world
    plans = [SettingPlan("heldout", ["dogs"], ["cats", "code", "sums"], str(base / "generator"))]
    items, _, finals = build_items(suite, plans, means, zoo_root=base / "zoo", oracle_root=base / "oracles",
                                   options={"soup_k": 2}, variant_names=["generated-best-of-k", "demo-selected"])
    item = items[0]
    assert item.variants == ["generated-best-of-k", "demo-selected"]
    assert set(item.adapters) == {"soup", "similarity-soup", "nearest", "ridge"}
    cfg, vectors = EvalConfig(max_texts=2, max_length=32, best_of=3), TaskVectorConfig(k=2, max_demo_chars=100)
    rows = {r["variant"]: r for r in evaluate_item(item, finals, model=ModelConfig(spec="tiny-llama", max_length=32),
                                                    cfg=cfg, task_vectors=vectors)}
    swap, tokenizer, generator = _swap_for(item)
    draws = generator.sample(item.conditions["both"].astype(np.float32), num_samples=3, seed=cfg.seed, z="random")
    candidates = {f"draw-{i}": draw for i, draw in enumerate(draws)}
    candidates |= {name: adapter_vector(source, finals) for name, source in item.adapters.items()}
    demos = list(sample_demos(load_task(item.task_path), vectors, episode=0))

    def perplexity(vector, texts):
        swap.load(vector, "check")
        return swap.score(tokenizer, texts, max_length=32, batch_size=cfg.batch_size)

    demo_ppl = {name: perplexity(vector, demos).perplexity for name, vector in candidates.items()}
    chosen = rows["demo-selected"]
    recorded = json.loads(chosen["candidate_demo_ppl"])  # every candidate, draws included: same seed
    assert recorded.keys() == demo_ppl.keys()
    assert list(recorded.values()) == pytest.approx(list(demo_ppl.values()), rel=1e-4)
    assert chosen["selected_candidate"] == min(demo_ppl, key=demo_ppl.get)
    assert chosen["demo_ppl"] == pytest.approx(min(demo_ppl.values()), rel=1e-4)
    texts = load_task(item.task_path).eval_texts()[:2]
    assert chosen["text_nll"] == pytest.approx(
        perplexity(candidates[chosen["selected_candidate"]], texts).text_nll, rel=1e-4)
    draw_ppl = [demo_ppl[f"draw-{i}"] for i in range(3)]  # best-of-k chose among the same draws
    assert rows["generated-best-of-k"]["sample"] == int(np.argmin(draw_ppl))
    assert len(set(demo_ppl.values())) == len(demo_ppl)  # every candidate is a different adapter


def test_stacked_variants_read_the_prompt_with_their_adapter_active(world):
    """in-context+oracle scores exactly what the prompt gives with the oracle loaded; each stacked
    variant differs from the prompt alone, so the adapter was active."""
    from icm.eval.baselines import in_context_prefix, score_in_context
    from icm.task_vectors import sample_demos
    from icm.tasks import load_task

    base, _, _ = world
    plans = [SettingPlan("fold", ["dogs"], ["cats", "code", "sums"], str(base / "generator"), fold=0)]
    names = ["oracle", "in-context", "in-context+oracle", "in-context+soup", "in-context+generated"]
    items, _, finals = build_items(world[1], plans, world[2], zoo_root=base / "zoo", oracle_root=base / "oracles",
                                   options={}, variant_names=names)
    assert set(items[0].variants) == set(names) and {"oracle", "soup"} <= set(items[0].adapters)
    cfg, vectors = EvalConfig(max_texts=2, max_length=32, samples=1), TaskVectorConfig(k=2, max_demo_chars=100)
    rows = evaluate_item(items[0], finals, model=ModelConfig(spec="tiny-llama", max_length=32), cfg=cfg,
                         task_vectors=vectors)
    by = {r["variant"]: r for r in rows}
    assert set(by) == set(names)
    for name in names[2:]:
        assert by[name]["text_nll"] != pytest.approx(by["in-context"]["text_nll"], rel=1e-4), name
        assert by[name]["text_tokens"] == by["in-context"]["text_tokens"]
    assert by["in-context+oracle"]["delta_cosine_to_oracle"] == pytest.approx(1.0)

    swap, tokenizer, _ = _swap_for(items[0])
    swap.load(adapter_vector(items[0].adapters["oracle"], finals))
    task = load_task(items[0].task_path)
    prefix = in_context_prefix(task.description, sample_demos(task, vectors, episode=0), 100)
    expected = score_in_context(swap.model, tokenizer, task.eval_texts()[:2], prefix, max_length=32)
    assert by["in-context+oracle"]["text_nll"] == pytest.approx(expected.text_nll, rel=1e-5)


def _scored_heldout_dogs(world, means, names):
    """The held-out task 'dogs' scored with ``names`` (2 texts, one draw, k = 2): its items, each
    variant's per-text NLL, and the eval and task-vector configs used."""
    base, suite, _ = world
    plans = [SettingPlan("heldout", ["dogs"], ["cats", "code", "sums"], str(base / "generator"))]
    items, _, finals = build_items(suite, plans, means, zoo_root=base / "zoo",
                                   oracle_root=base / "oracles", options={}, variant_names=names)
    cfg = EvalConfig(max_texts=2, max_length=32, samples=1)
    vectors = TaskVectorConfig(k=2, max_demo_chars=100)
    rows = evaluate_item(items[0], finals, model=ModelConfig(spec="tiny-llama", max_length=32),
                         cfg=cfg, task_vectors=vectors)
    by = {r["variant"]: r["text_nll"] for r in rows}
    assert set(by) == set(names)
    return items, by, cfg, vectors


def test_a_prompt_of_one_part_reads_that_part_and_a_draw_from_its_own_vector(world):
    """in-context-description reads the description alone, in-context-demos the demonstrations
    alone; with +generated, the generator's draw comes from the vector of that same prompt (a
    request holding only a description gives only that vector), never from the 'both' one."""
    from icm.eval.baselines import in_context_prefix, score_in_context
    from icm.task_vectors import sample_demos
    from icm.tasks import load_task

    means = world[2]
    # each part's vector clearly another (the fixture's description vector is 'both' + 0.01)
    means = {**means, "description": {t: np.roll(v, 7) for t, v in means["both"].items()},
             "demos": {t: v[::-1].copy() for t, v in means["both"].items()}}
    names = ["in-context", "in-context-description", "in-context-description+generated",
             "in-context-demos", "in-context-demos+generated"]
    items, by, cfg, vectors = _scored_heldout_dogs(world, means, names)
    swap, tokenizer, generator = _swap_for(items[0])
    task = load_task(items[0].task_path)
    texts, demos = task.eval_texts()[:2], sample_demos(task, vectors, episode=0)
    for mode in ("description", "demos"):
        prefix = in_context_prefix(task.description, demos, 100, mode=mode)
        assert (task.description.strip() in prefix) == (mode == "description")
        assert (demos[0][:20] in prefix) == (mode == "demos")
        with swap.base() as model:
            alone = score_in_context(model, tokenizer, texts, prefix, max_length=32)
        assert by[f"in-context-{mode}"] == pytest.approx(alone.text_nll, rel=1e-5)
        assert by[f"in-context-{mode}"] != pytest.approx(by["in-context"], rel=1e-4)
        draws = {part: generator.sample(items[0].conditions[part].astype(np.float32), num_samples=1,
                                        seed=cfg.seed, z="random")[0] for part in (mode, "both")}
        for part, draw in draws.items():
            swap.load(draw)
            stacked = score_in_context(swap.model, tokenizer, texts, prefix, max_length=32).text_nll
            matches = by[f"in-context-{mode}+generated"] == pytest.approx(stacked, rel=1e-5)
            assert matches == (part == mode), (mode, part)


def test_a_scaled_condition_scores_the_same_draw_with_the_condition_shrunk(world):
    """generated-half/-blind and their forms under the prompt score the generator's draw (the
    same z as generated's) with the condition scaled by 0.5 and 0: alone and under the prompt."""
    from icm.eval.baselines import in_context_prefix, score_in_context
    from icm.task_vectors import sample_demos
    from icm.tasks import load_task

    names = ["generated", "generated-half", "generated-blind", "in-context+generated",
             "in-context+generated-half", "in-context+generated-blind"]
    items, by, cfg, vectors = _scored_heldout_dogs(world, world[2], names)
    swap, tokenizer, generator = _swap_for(items[0])
    task = load_task(items[0].task_path)
    texts = task.eval_texts()[:2]
    prefix = in_context_prefix(task.description, sample_demos(task, vectors, episode=0), 100)
    condition = items[0].conditions["both"].astype(np.float32)
    for suffix, scale in (("", 1.0), ("-half", 0.5), ("-blind", 0.0)):
        swap.load(generator.sample(condition, seed=cfg.seed, z="random",
                                   condition_scale=scale)[0], f"check{suffix}")
        alone = swap.score(tokenizer, texts, max_length=32, batch_size=cfg.batch_size).text_nll
        under = score_in_context(swap.model, tokenizer, texts, prefix, max_length=32).text_nll
        assert by[f"generated{suffix}"] == pytest.approx(alone, rel=1e-5), suffix
        assert by[f"in-context+generated{suffix}"] == pytest.approx(under, rel=1e-5), suffix
    assert len({tuple(by[f"generated{s}"]) for s in ("", "-half", "-blind")}) == 3


def test_the_finetuned_draw_is_the_draw_fitted_under_the_tasks_prompts_then_read_under_one(world):
    """in-context+generated-finetuned: the same draw as in-context+generated, fine-tuned by
    fit_under_prompt on the task's train texts after its episode prompts, then scored under the
    prompt; its row records the fit."""
    from icm.eval.baselines import in_context_prefix, score_in_context
    from icm.eval.loss_fit import PromptFitSettings, fit_under_prompt
    from icm.generator.lm import EpisodePrompt, FunctionalLora, PromptContext
    from icm.task_vectors import build_episodes, sample_demos
    from icm.tasks import load_task

    base, suite, means = world
    plans = [SettingPlan("heldout", ["dogs"], ["cats", "code", "sums"], str(base / "generator"))]
    names = ["in-context+generated", "in-context+generated-finetuned",
             "in-context+generated-finetuned-demos"]
    items, _, finals = build_items(suite, plans, means, zoo_root=base / "zoo",
                                   oracle_root=base / "oracles", options={}, variant_names=names)
    cfg = EvalConfig(max_texts=2, max_length=32, samples=1, finetune_steps=3, finetune_batch_size=2)
    vectors = TaskVectorConfig(k=2, episodes=2, max_demo_chars=100)
    rows = evaluate_item(items[0], finals, model=ModelConfig(spec="tiny-llama", max_length=32),
                         cfg=cfg, task_vectors=vectors)
    by = {r["variant"]: r for r in rows}
    tuned = by["in-context+generated-finetuned"]
    on_demos = by["in-context+generated-finetuned-demos"]
    assert tuned["fit_steps"] == 3 and tuned["fit_prompts"] == 2  # the 'both' episodes only
    assert tuned["fit_relative_change"] > 0 and tuned["fit_on"] == "train"
    assert tuned["text_nll"] != pytest.approx(by["in-context+generated"]["text_nll"], rel=1e-4)
    assert on_demos["fit_on"] == "demos"
    assert on_demos["text_nll"] != pytest.approx(tuned["text_nll"], rel=1e-4)

    swap, tokenizer, generator = _swap_for(items[0])
    task = load_task(items[0].task_path)
    draw = generator.sample(items[0].conditions["both"].astype(np.float32), num_samples=1,
                            seed=cfg.seed, z="random")[0]
    prompts = [EpisodePrompt(e.prompt, e.demos) for e in build_episodes(task, vectors, mode="both")]
    train = [text for text in task.train_texts() if text.strip()]
    context = PromptContext.build(train, prompts, tokenizer, 32)
    settings = PromptFitSettings(steps=3, lr=5e-3, batch_size=2, warmup_steps=2)
    applier = FunctionalLora.on_peft_model(swap.model, generator.layout)
    fitted, _ = fit_under_prompt(applier, draw, context, pad_id=tokenizer.pad_token_id or 0,
                                 settings=settings)
    prefix = in_context_prefix(task.description, sample_demos(task, vectors, episode=0), 100)
    # the demonstrations of the episodes, each prompt's own never a target under it
    demos = list(dict.fromkeys(demo for prompt in prompts for demo in prompt.demos))
    assert on_demos["fit_texts"] == len(demos) <= 2 * vectors.k
    demo_context = PromptContext.build(demos, prompts, tokenizer, 32)
    assert all(demos[i] not in prompts[row].demos
               for row in demo_context.rows for i in demo_context.allowed[row])
    for row, fit_context in (("in-context+generated-finetuned", context),
                             ("in-context+generated-finetuned-demos", demo_context)):
        fitted, _ = fit_under_prompt(applier, draw, fit_context, settings=settings,
                                     pad_id=tokenizer.pad_token_id or 0)
        swap.load(fitted)
        expected = score_in_context(swap.model, tokenizer, task.eval_texts()[:2], prefix,
                                    max_length=32)
        assert by[row]["text_nll"] == pytest.approx(expected.text_nll, rel=1e-4), row


def test_the_multitask_lora_under_the_prompt_is_scored_held_out_and_absent_on_a_fold(world):
    """in-context+multitask reads the prompt with the multi-task LoRA active on a held-out task;
    on a fold that LoRA trained on the fold's own tasks, so the stacked variant is not scored."""
    from icm.eval.baselines import in_context_prefix, score_in_context
    from icm.task_vectors import sample_demos
    from icm.tasks import load_task

    base, suite, means = world
    training, generator = ["cats", "code", "sums"], str(base / "generator")
    plans = [SettingPlan("heldout", ["dogs"], training, generator),
             SettingPlan("fold", ["dogs"], ["code", "sums"], generator, fold=0)]
    names = ["in-context", "in-context+multitask"]
    items, _, finals = build_items(suite, plans, means, zoo_root=base / "zoo", oracle_root=base / "oracles",
                                   options={}, variant_names=names)
    held, fold = items
    assert set(held.variants) == set(names) and "multitask" in held.adapters
    assert fold.variants == ["in-context"] and "multitask" not in fold.adapters
    cfg, vectors = EvalConfig(max_texts=2, max_length=32, samples=1), TaskVectorConfig(k=2, max_demo_chars=100)
    rows = evaluate_item(held, finals, model=ModelConfig(spec="tiny-llama", max_length=32), cfg=cfg,
                         task_vectors=vectors)
    by = {r["variant"]: r for r in rows}
    swap, tokenizer, _ = _swap_for(held)
    swap.load(adapter_vector(held.adapters["multitask"], finals))
    task = load_task(held.task_path)
    prefix = in_context_prefix(task.description, sample_demos(task, vectors, episode=0), 100)
    expected = score_in_context(swap.model, tokenizer, task.eval_texts()[:2], prefix, max_length=32)
    assert by["in-context+multitask"]["text_nll"] == pytest.approx(expected.text_nll, rel=1e-5)
    assert by["in-context+multitask"]["text_nll"] != pytest.approx(by["in-context"]["text_nll"], rel=1e-4)


def test_other_group_control_scores_the_generator_on_another_groups_training_task(world):
    """control-other-group (opt-in) takes the condition of the fold's next training task outside
    the task's group, and scores exactly the generator's z = 0 adapter for that vector."""
    from icm.tasks import load_task

    base, suite, means = world
    plans = [SettingPlan("fold", ["cats", "dogs"], ["code", "sums"], str(base / "generator"), fold=0)]
    items, _, finals = build_items(suite, plans, means, zoo_root=base / "zoo", oracle_root=base / "oracles",
                                   options={}, variant_names=["control-other-group"])
    partners = {i.task: i.extra["other_group_partner"] for i in items}
    assert partners == {"cats": "code", "dogs": "sums"}  # animals -> the next other-group task
    cats = items[0]
    assert np.array_equal(cats.conditions["other-group"], means["both"]["code"])
    default, _, _ = _items(world, plans)
    assert "other-group" not in default[0].conditions  # opt-in: not built unless named
    rows = evaluate_item(cats, finals, model=ModelConfig(spec="tiny-llama", max_length=32),
                         cfg=EvalConfig(max_texts=2, max_length=32), task_vectors=TaskVectorConfig(k=2))
    assert [r["variant"] for r in rows] == ["control-other-group"]

    swap, tokenizer, generator = _swap_for(cats)
    vector = generator.sample(np.asarray(means["both"]["code"], np.float32), num_samples=1, seed=0, z="zero")
    swap.load(vector[0])
    expected = swap.score(tokenizer, load_task(cats.task_path).eval_texts()[:2], max_length=32,
                          batch_size=EvalConfig().batch_size)
    assert rows[0]["text_nll"] == pytest.approx(expected.text_nll, rel=1e-5)


def test_a_fold_scores_the_multitask_baseline_from_its_own_fold_multitask_lora(world, tmp_path):
    """oracles.fold_multitask: fold K's multitask baseline is the oracles stage's
    multitask-foldK LoRA (trained without the fold's groups), never the zoo's; a fold without
    one has no multitask row; the held-out set keeps the zoo's."""
    from icm.zoo import fold_multitask_name

    base, suite, means = world
    oracles = tmp_path / "oracles"
    write_zoo(oracles, ["dogs", fold_multitask_name(0)], multitask=False, seed=2)
    training, generator = ["cats", "code", "sums"], str(base / "generator")
    plans = [SettingPlan("heldout", ["dogs"], training, generator),
             SettingPlan("fold", ["dogs"], ["code", "sums"], generator, fold=0),
             SettingPlan("fold", ["cats"], ["code", "sums"], generator, fold=1)]
    held, fold0, fold1 = build_items(suite, plans, means, zoo_root=base / "zoo", oracle_root=oracles,
                                     options={}, variant_names=["multitask"])[0]
    assert held.adapters["multitask"].snapshots == (final_snapshots(base / "zoo")["multitask"],)
    assert fold0.adapters["multitask"].snapshots == (final_snapshots(oracles)[fold_multitask_name(0)],)
    assert fold0.variants == ["multitask"]
    assert "multitask" not in fold1.adapters and fold1.variants == []


def test_oracle_projection_is_the_affine_zoo_combination_closest_to_the_oracle(world):
    """The diagnostic: weights over the setting's training LoRAs only, summing to 1, closer to the
    oracle's dW than any baseline's weights; its fit recorded; opt-in and never a baseline."""
    from icm.eval.variants import VARIANTS
    from icm.eval.weights import delta_cosine, delta_inner
    from icm.lora_io import LoraLayout
    from icm.zoo import LAYOUT_FILE

    base, suite, means = world
    generator = str(base / "generator")
    plans = [SettingPlan("heldout", ["dogs"], ["cats", "code", "sums"], generator),
             SettingPlan("fold", ["cats", "dogs"], ["code", "sums"], generator, fold=0)]
    items, record, finals = build_items(suite, plans, means, zoo_root=base / "zoo",
                                        oracle_root=base / "oracles", options={"soup_k": 2},
                                        variant_names=["base", "oracle", "oracle-projection", "soup", "nearest"])
    assert VARIANTS["oracle-projection"].opt_in and not VARIANTS["oracle-projection"].baseline
    by = {(i.setting, i.task): i for i in items}
    layout = LoraLayout.load(base / "zoo" / LAYOUT_FILE)
    dogs = by[("heldout", "dogs")]
    weights = dict(dogs.adapters["oracle-projection"].combination)
    assert set(weights) == {"cats", "code", "sums"} and sum(weights.values()) == pytest.approx(1.0)
    # Among weights over these LoRAs, the closest to the oracle in the dW its flat combination
    # really has: closer than the soup's or the nearest LoRA's.
    oracle = adapter_vector(dogs.adapters["oracle"], finals)

    def residual(source) -> float:
        combined = adapter_vector(source, finals)
        return (delta_inner(combined, combined, layout) - 2 * delta_inner(combined, oracle, layout)
                + delta_inner(oracle, oracle, layout)) / delta_inner(oracle, oracle, layout)

    fit = record["fits"]["heldout"]["oracle-projection"]["dogs"]
    assert residual(dogs.adapters["oracle-projection"]) == pytest.approx(fit["residual_fraction"], rel=1e-5)
    for rival in ("soup", "nearest"):
        assert fit["residual_fraction"] < residual(dogs.adapters[rival]), rival
    realised = delta_cosine(adapter_vector(dogs.adapters["oracle-projection"], finals), oracle, layout)
    assert set(dict(by[("fold", "cats")].adapters["oracle-projection"].combination)) <= {"code", "sums"}
    assert set(record["fits"]["heldout"]["oracle-projection"]) == {"dogs"}
    assert set(record["fits"]["fold0"]["oracle-projection"]) == {"cats", "dogs"}
    assert fit["residual_fraction"] >= 0  # above 1 where every LoRA here is far from the oracle
    rows = evaluate_item(dogs, finals, model=ModelConfig(spec="tiny-llama", max_length=32),
                         cfg=EvalConfig(max_texts=2, max_length=32, samples=1),
                         task_vectors=TaskVectorConfig(k=2, max_demo_chars=100))
    scored = {r["variant"]: r for r in rows}
    assert scored["oracle-projection"]["delta_cosine_to_oracle"] == pytest.approx(realised, rel=1e-6)
    assert "oracle-projection" not in [i.variants for i in _items(world, plans[:1])[0]][0]  # opt-in


def test_lorahub_refits_the_soup_on_the_tasks_own_texts_never_its_eval_texts(world):
    """lorahub starts from the soup's weights over the setting's training LoRAs and refits them
    on the k demonstrations (lorahub-train: on the train split); the scored adapter is that
    combination, its demonstration loss is below the soup's, the fit is recorded in the row."""
    import json

    from icm.eval.variants import UNSEEN, VARIANTS
    from icm.task_vectors import sample_demos
    from icm.tasks import load_task

    base, suite, means = world
    generator = str(base / "generator")
    plans = [SettingPlan("heldout", ["dogs"], ["cats", "code", "sums"], generator),
             SettingPlan("fold", ["cats"], ["code", "sums"], generator, fold=0)]
    items, _, finals = build_items(suite, plans, means, zoo_root=base / "zoo",
                                   oracle_root=base / "oracles", options={"soup_k": 2},
                                   variant_names=["soup", "lorahub", "lorahub-train"])
    assert VARIANTS["lorahub"].baseline and VARIANTS["lorahub"].opt_in
    assert not VARIANTS["lorahub-train"].baseline and VARIANTS["lorahub-train"].settings == UNSEEN
    by = {(i.setting, i.task): i for i in items}
    dogs = by[("heldout", "dogs")]
    soup = dict(dogs.adapters["soup"].combination)
    assert dict(dogs.adapters["lorahub"].combination) == soup
    assert (dogs.adapters["lorahub"].fit_on, dogs.adapters["lorahub-train"].fit_on) == ("demos", "train")
    cfg = EvalConfig(max_texts=2, max_length=32, samples=1, lorahub_steps=6, lorahub_lr=0.05,
                     lorahub_batch_size=3, lorahub_train_texts=5)
    demos_cfg = TaskVectorConfig(k=2, max_demo_chars=100)
    scored = {}
    for item, tasks in ((dogs, {"cats", "code", "sums"}), (by[("fold", "cats")], {"code", "sums"})):
        rows = evaluate_item(item, finals, model=ModelConfig(spec="tiny-llama", max_length=32),
                             cfg=cfg, task_vectors=demos_cfg)
        scored[item.setting] = {r["variant"]: r for r in rows}
        for name, texts in (("lorahub", 2), ("lorahub-train", 5)):  # k demos; capped train split
            row = scored[item.setting][name]
            assert set(json.loads(row["fit_weights"])) == tasks and row["fit_texts"] == texts
            assert row["fit_end_nll"] < row["fit_start_nll"], name
    # The row scores exactly the fitted combination (re-scored here through another code path),
    # and the fit lowered the demonstrations' loss below the soup's.
    swap, tokenizer, _ = _swap_for(dogs)
    task = load_task(dogs.task_path)
    demos = list(sample_demos(task, demos_cfg, episode=0))

    def score(weights, texts):
        swap.load(sum(w * finals[t] for t, w in weights.items()))
        return swap.score(tokenizer, texts, max_length=32, batch_size=8).perplexity

    row = scored["heldout"]["lorahub"]
    fitted = json.loads(row["fit_weights"])
    assert fitted != pytest.approx(soup)
    assert score(fitted, demos) < score(soup, demos)
    assert score(fitted, task.eval_texts()[:2]) == pytest.approx(row["perplexity"], rel=1e-5)


def test_a_setting_without_a_generator_scores_its_adapters_in_the_zoos_format(world):
    """A fold whose chosen variants read no generator gets none (the evaluate stage then trains
    no fold generator): its adapters load through the zoo's own peft config and layout, and
    score exactly as with a generator's; a variant that reads a generator is refused."""
    base, suite, means = world
    training = ["code", "sums"]
    with_generator = SettingPlan("fold", ["dogs"], training, str(base / "generator"), fold=0)
    without = SettingPlan("fold", ["dogs"], training, None, fold=0)
    kwargs = dict(zoo_root=base / "zoo", oracle_root=base / "oracles", options={"soup_k": 2},
                  variant_names=["base", "oracle", "soup", "in-context+soup"])
    cfg = EvalConfig(max_texts=2, max_length=32)
    scored = []
    for plan in (with_generator, without):
        items, _, finals = build_items(suite, [plan], means, **kwargs)
        rows = evaluate_item(items[0], finals, model=ModelConfig(spec="tiny-llama", max_length=32),
                             cfg=cfg, task_vectors=TaskVectorConfig(k=2, max_demo_chars=100))
        scored.append({r["variant"]: r["text_nll"] for r in rows})
    assert set(scored[1]) == {"base", "oracle", "soup", "in-context+soup"}
    for variant, nll in scored[0].items():
        assert np.allclose(nll, scored[1][variant]), variant
    assert scored[1]["soup"] != scored[1]["base"]  # the adapter was loaded, not skipped
    from icm.eval.variants import VARIANTS, reads_generator

    assert {n for n, v in VARIANTS.items() if reads_generator(v)} >= {
        "generated", "generated-best-of-k", "control-other-group", "demo-selected", "in-context+generated"}
    assert not {n for n in ("soup", "in-context+soup", "in-context", "oracle") if reads_generator(VARIANTS[n])}
    for reads in ("generated", "in-context+generated", "demo-selected"):
        with pytest.raises(ValueError, match="no generator was trained"):
            build_items(suite, [without], means, **{**kwargs, "variant_names": ["base", reads]})
