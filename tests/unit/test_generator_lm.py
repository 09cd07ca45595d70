"""The end-to-end LM objective: a generated LoRA applied functionally to the frozen base model,
its loss back-propagated into the generator, deterministic and resumable (tiny-llama)."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from icm.config import GeneratorConfig, ModelConfig
from icm.generator import LoraGenerator, fit_generator
from icm.generator.data import prepare_data
from icm.generator.inputs import GeneratorInputError, initial_lora_state, load_zoo
from icm.generator.lm import (EpisodePrompt, FunctionalLora, fit_lm, generated_vectors, hybrid_term,
                             lm_setup, lm_step_loss, lm_tasks)
from icm.lora_train import collate, tokenize_texts
from icm.models import load_base_model
from tests.unit.test_generator import FAST, LORA, write_zoo

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TEXTS = {
    "cats": ["The cat sat on the mat and purred.", "Cats nap in the warm sun all day."] * 4,
    "sums": ["1 + 1 = 2, 2 + 2 = 4, 3 + 3 = 6.", "10 + 5 = 15 and 7 + 8 = 15."] * 4,
    "code": ["def add(a, b):\n    return a + b", "for i in range(3):\n    print(i)"] * 4,
}
LM = dict(lm_steps=12, lm_lr=3e-2, lm_tasks=2, lm_texts=2, lm_seq_len=24, report_every=4)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny-llama zoo of three tasks, a generator trained on it by reconstruction (saved, so
    each test starts from the same weights), and the prepared reconstruction data."""
    base = tmp_path_factory.mktemp("lm")
    conditions = write_zoo(base / "zoo", sorted(TEXTS), multitask=False)
    zoo = load_zoo(base / "zoo", include=sorted(TEXTS))
    _, init_state = initial_lora_state("tiny-llama", LORA.model_dump(mode="json"))
    cfg = GeneratorConfig(**{**FAST, "steps": 40}, val_tasks=0, val_snapshots=0)
    data = prepare_data(zoo, conditions, cfg, validation=False, init_state=init_state)
    fit_generator(data, cfg).save(base / "generator")
    return base, conditions, data.representation(cfg)


def _setup(world, **overrides):
    base, conditions, representation = world
    generator = LoraGenerator.load(base / "generator")
    model, tokenizer = load_base_model("tiny-llama")
    cfg = GeneratorConfig(**{**FAST, **LM, **overrides})
    return (generator, FunctionalLora(model, generator.peft_config, generator.layout),
            lm_tasks(TEXTS, conditions, generator, tokenizer, cfg), cfg, tokenizer)


def test_functional_lora_scores_like_the_loaded_adapter_and_passes_gradients(world, tmp_path):
    from peft import PeftModel

    generator, applier, _, _, tokenizer = _setup(world)
    conditions = world[1]
    batch = collate(tokenize_texts(tokenizer, TEXTS["cats"][:2], 24), tokenizer.pad_token_id or 0)
    vector = generator.sample(conditions["cats"].mean(0), z="zero")[0]  # (L,)
    loaded = PeftModel.from_pretrained(load_base_model("tiny-llama")[0],
                                       str(generator.write_adapter(vector, tmp_path / "a"))).eval()
    with torch.no_grad():
        assert float(applier.nll(vector, batch)) == pytest.approx(float(loaded(**batch).loss), rel=1e-5)
    z = torch.zeros(1, generator.model.spec.latent_dim)
    c = generator.condition_norm.apply(torch.as_tensor(conditions["cats"][:1]))
    applier.nll(generated_vectors(generator, c, z)[0], batch).backward()
    assert any(float(p.grad.abs().sum()) > 0 for p in generator.model.parameters() if p.grad is not None)
    assert all(p.grad is None for p in applier.model.parameters())  # the base stays frozen


def _task_loss(generator, applier, task, tokenizer) -> float:
    """The z = 0 adapter's loss on all of a task's texts (fixed: comparable before and after)."""
    with torch.no_grad():
        c = task.episodes.mean(0, keepdim=True)
        vector = generated_vectors(generator, c, torch.zeros(1, generator.model.spec.latent_dim))[0]
        return float(applier.nll(vector, collate(task.sequences, tokenizer.pad_token_id or 0)))


def test_lm_objective_lowers_the_training_loss_and_resumes_exactly(world):
    generator, applier, tasks, cfg, tokenizer = _setup(world)
    pad, states = tokenizer.pad_token_id or 0, {}
    before = [_task_loss(generator, applier, task, tokenizer) for task in tasks]
    result = fit_lm(generator, applier, tasks, cfg, pad_id=pad,
                    report=lambda metrics, state: states.setdefault(metrics["lm_step"], state))
    after = [_task_loss(generator, applier, task, tokenizer) for task in tasks]
    assert len(result.history) == 3
    assert all(a < b - 0.01 for a, b in zip(after, before)), (before, after)
    again, applier2, tasks2, _, _ = _setup(world)  # the same start, resumed from step 4's state
    resumed = fit_lm(again, applier2, tasks2, cfg, pad_id=pad, resume_state=states[4])
    assert resumed.steps == cfg.lm_steps and len(resumed.history) == 3
    for key, value in again.model.state_dict().items():
        assert torch.allclose(value, generator.model.state_dict()[key], atol=1e-6), key


def test_a_longer_run_continues_a_shorter_ones_checkpoint_exactly(world):
    """What lets a generator asked for more LM steps resume the Ray Train run of fewer
    (GeneratorConfig.lm_run_settings): 4 steps, then their final state resumed with lm_steps 12,
    equals 12 steps straight; a checkpoint past lm_steps is refused, not silently kept."""
    generator, applier, tasks, cfg, tokenizer = _setup(world, objective="hybrid")
    representation, pad = world[2], tokenizer.pad_token_id or 0
    recon = (representation.train, representation.codec.weights())
    straight = fit_lm(generator, applier, tasks, cfg, pad_id=pad, reconstruction=recon)
    short, applier2, tasks2, short_cfg, _ = _setup(world, objective="hybrid", lm_steps=4)
    finals = []
    fit_lm(short, applier2, tasks2, short_cfg, pad_id=pad, reconstruction=recon,
           report=lambda metrics, state: finals.append(state))
    longer, applier3, tasks3, _, _ = _setup(world, objective="hybrid")
    resumed = fit_lm(longer, applier3, tasks3, cfg, pad_id=pad, reconstruction=recon,
                     resume_state=finals[-1])
    assert finals[-1]["step"] == 4 and resumed.steps == straight.steps == 12
    assert [h["lm_step"] for h in resumed.history] == [4, 8, 12]
    for key, value in longer.model.state_dict().items():
        assert torch.allclose(value, generator.model.state_dict()[key], atol=1e-6), key
    rewound, applier4, tasks4, _, _ = _setup(world, objective="hybrid", lm_steps=2)
    with pytest.raises(ValueError, match="past generator.lm_steps=2"):
        fit_lm(rewound, applier4, tasks4, short_cfg.model_copy(update={"lm_steps": 2}), pad_id=pad,
               reconstruction=recon, resume_state=finals[-1])


def test_hybrid_adds_the_reconstruction_term(world):
    generator, applier, tasks, cfg, tokenizer = _setup(world, lm_steps=4, objective="hybrid")
    representation = world[2]
    result = fit_lm(generator, applier, tasks, cfg, pad_id=tokenizer.pad_token_id or 0,
                    reconstruction=(representation.train, representation.codec.weights()))
    assert all(h["train_recon"] > 0 for h in result.history)


def test_hybrid_on_a_second_rank_resumes_exactly_from_a_state_without_rng(world):
    """The Ray job saves rank 0's state only and every rank resumes from it: the hybrid term's
    batches and eps must come from (seed, step, rank), not from an RNG carried in that state
    (which gave every rank rank 0's draws after a restart)."""
    from icm.generator.lm import step_generator

    generator, applier, tasks, cfg, tokenizer = _setup(world, objective="hybrid")
    representation, pad, states = world[2], tokenizer.pad_token_id or 0, {}
    recon = (representation.train, representation.codec.weights())
    fit_lm(generator, applier, tasks, cfg, pad_id=pad, reconstruction=recon, rank=1,
           report=lambda metrics, state: states.setdefault(metrics["lm_step"], state))
    assert "rng" not in states[4]
    again, applier2, tasks2, _, _ = _setup(world, objective="hybrid")
    fit_lm(again, applier2, tasks2, cfg, pad_id=pad, reconstruction=recon, rank=1,
           resume_state=states[4])
    for key, value in again.model.state_dict().items():
        assert torch.allclose(value, generator.model.state_dict()[key], atol=1e-6), key
    draw = lambda step, rank: torch.randn(8, generator=step_generator("recon", cfg, step, rank))
    assert torch.equal(draw(3, 1), draw(3, 1)) and not torch.equal(draw(3, 0), draw(3, 1))


def test_shared_residual_starts_at_zero_learns_what_tasks_share_resumes_and_is_saved(world, tmp_path):
    """generator.lm_shared_residual: step 0 generates what reconstruction did; after the LM steps
    the residual is non-zero, lowers the training loss below the same run without it, resumes
    exactly, and travels in the artifact (sample() adds it)."""
    from icm.generator.lm import shared_residual

    plain, applier, tasks, cfg, tokenizer = _setup(world)
    pad = tokenizer.pad_token_id or 0
    c = tasks[0].episodes[:1]
    z = torch.zeros(1, plain.model.spec.latent_dim)
    with torch.no_grad():
        start = generated_vectors(plain, c, z)
        probe, *_ = _setup(world, lm_shared_residual=True)
        shared_residual(probe, probe.config.model_copy(update={"lm_shared_residual": True}))
        assert torch.equal(generated_vectors(probe, c, z), start)  # zeros: nothing changes yet
    fit_lm(plain, applier, tasks, cfg, pad_id=pad)
    with_residual, applier2, tasks2, cfg2, _ = _setup(world, lm_shared_residual=True)
    states = {}
    fit_lm(with_residual, applier2, tasks2, cfg2, pad_id=pad,
           report=lambda metrics, state: states.setdefault(metrics["lm_step"], state))
    residual = with_residual.residual
    assert residual is not None and not residual.requires_grad and float(residual.abs().max()) > 0
    plain_loss = sum(_task_loss(plain, applier, t, tokenizer) for t in tasks)
    residual_loss = sum(_task_loss(with_residual, applier2, t, tokenizer) for t in tasks2)
    assert residual_loss < plain_loss - 0.01, (plain_loss, residual_loss)

    again, applier3, tasks3, _, _ = _setup(world, lm_shared_residual=True)
    fit_lm(again, applier3, tasks3, cfg2, pad_id=pad, resume_state=states[4])
    assert torch.allclose(again.residual, residual, atol=1e-6)

    with_residual.save(tmp_path / "g")
    loaded = LoraGenerator.load(tmp_path / "g")
    assert torch.equal(loaded.residual, residual)
    raw = tasks[0].episodes.new_tensor(world[1][tasks[0].name][0])  # (D,) before z-scoring
    network_only = loaded.full_vectors(loaded.codec.decode(loaded.model.decode(
        z, loaded.condition_norm.apply(raw[None]))))
    assert torch.allclose(loaded.sample(raw, z="zero") - network_only,
                          loaded.full_vectors(residual[None]) - loaded.template, atol=1e-6)


@pytest.mark.parametrize("arch", ["hyper", "hyper-attn"])
def test_hyper_generator_takes_the_hybrid_objective(world, arch):
    """The LM objective is architecture-agnostic: the per-module hypernetwork (not confined to a
    PCA span), trained by reconstruction, then hybrid steps lower its tasks' LM loss; so does
    the attending one, on conditions read as 4 spans (pooling `chunks`)."""
    from tests.unit.test_generator_hyper import HYPER

    base, conditions, _ = world
    zoo = load_zoo(base / "zoo", include=sorted(TEXTS))
    _, init_state = initial_lora_state("tiny-llama", LORA.model_dump(mode="json"))
    spans = {"condition_pooling": "chunks"} if arch == "hyper-attn" else {}
    cfg = GeneratorConfig(**{**HYPER, **LM, "steps": 40, "objective": "hybrid", "arch": arch, **spans},
                          val_tasks=0, val_snapshots=0)
    data = prepare_data(zoo, conditions, cfg, validation=False, init_state=init_state,
                        condition_spec={"pooling": "chunks", "task_vectors": {"chunks": 4}} if spans else None)
    generator = fit_generator(data, cfg)
    setup = lm_setup(generator, ModelConfig(spec="tiny-llama"), TEXTS, conditions, cfg, "cpu")
    applier, tasks, tokenizer = setup.applier, setup.tasks, setup.tokenizer
    before = [_task_loss(generator, applier, task, tokenizer) for task in tasks]

    def unread():
        raise AssertionError("the zoo was read for an objective without a reconstruction term")

    assert hybrid_term(cfg.model_copy(update={"objective": "lm"}), unread) is None
    result = fit_lm(generator, applier, tasks, cfg, pad_id=setup.pad_id,
                    reconstruction=hybrid_term(cfg, lambda: data))
    after = [_task_loss(generator, applier, task, tokenizer) for task in tasks]
    assert all(h["train_recon"] > 0 for h in result.history)
    assert all(a < b - 0.01 for a, b in zip(after, before)), (before, after)


def test_anchor_offset_adds_the_generated_deviation_to_the_anchor_and_a_fixed_one_stays(world):
    """generator.lm_anchor: multitask: with the offset as the shared residual an adapter is the
    anchor + (network output - zoo mean); fine-tuning without lm_shared_residual trains the
    network on top of it and leaves the anchor as it was."""
    from icm.generator.lm import anchor_offset

    generator, applier, tasks, cfg, tokenizer = _setup(world)
    anchor = torch.randn(generator.template.shape, generator=torch.Generator().manual_seed(1))  # (L,)
    c = tasks[0].episodes[:2]
    z = torch.randn(2, generator.model.spec.latent_dim)
    with torch.no_grad():
        out = generator.model.decode(z, c)  # (2, F)
        mean = generator.codec.decode(torch.zeros_like(out[:1]))  # (1, L_gen)
        deviation = generator.codec.decode(out) - mean  # (2, L_gen)
        generator.residual = anchor_offset(generator, anchor)
        expected = anchor[generator.positions] + deviation
        assert torch.allclose(generator.generated_values(z, c), expected, atol=1e-5)
    fixed = generator.residual.clone()
    before = [_task_loss(generator, applier, task, tokenizer) for task in tasks]
    fit_lm(generator, applier, tasks, cfg, pad_id=tokenizer.pad_token_id or 0)
    assert torch.equal(generator.residual, fixed)  # not lm_shared_residual: the anchor is fixed
    after = [_task_loss(generator, applier, task, tokenizer) for task in tasks]
    assert sum(after) < sum(before)
    with pytest.raises(ValueError, match="another layout"):
        anchor_offset(generator, anchor[:-1])


def test_functional_lora_on_an_already_wrapped_model_gives_the_same_loss(world):
    """`on_peft_model` (the evaluation's SwappableLora model, not a second copy) scores a vector
    like a freshly wrapped model, and the lorahub fit on it rejects malformed input by name."""
    from icm.adapter_swap import SwappableLora
    from icm.eval.loss_fit import LossFitSettings, fit_combination

    generator, applier, _, _, tokenizer = _setup(world)
    swap = SwappableLora(load_base_model("tiny-llama")[0], generator.peft_config, generator.layout)
    reused = FunctionalLora.on_peft_model(swap.model, generator.layout)
    batch = collate(tokenize_texts(tokenizer, TEXTS["sums"][:2], 24), tokenizer.pad_token_id or 0)
    vector = generator.sample(world[1]["sums"].mean(0), z="zero")[0]  # (L,)
    with torch.no_grad():
        assert float(reused.nll(vector, batch)) == pytest.approx(float(applier.nll(vector, batch)), rel=1e-6)
    vectors = torch.stack([vector, torch.zeros_like(vector)])  # (2, L)
    with pytest.raises(ValueError, match="start"):
        fit_combination(reused, vectors, [[1, 2]], start=torch.ones(3), pad_id=0, settings=LossFitSettings())
    with pytest.raises(ValueError, match="no texts"):
        fit_combination(reused, vectors, [], start=torch.ones(2), pad_id=0, settings=LossFitSettings())


def test_fold_fine_tunes_at_once_are_what_the_cluster_holds_side_by_side():
    from jobs.generator_lm import finetune_concurrency

    cpu = GeneratorConfig(lm_workers=1)
    assert finetune_concurrency(cpu, {"CPU": 2.0}, cpus_per_worker=1) == 2
    assert finetune_concurrency(cpu, {"CPU": 2.0}, cpus_per_worker=2) == 1
    assert finetune_concurrency(cpu.model_copy(update={"lm_workers": 2}), {"CPU": 5.0}, 1) == 2
    assert finetune_concurrency(cpu, {"CPU": 0.5}, cpus_per_worker=1) == 1  # never none at all
    gpu = GeneratorConfig(lm_workers=2, lm_gpus_per_worker=1)
    assert finetune_concurrency(gpu, {"CPU": 64.0, "GPU": 4.0}, 1) == 2  # GPUs bound it
    assert finetune_concurrency(gpu, {"CPU": 64.0}, 1) == 1  # no GPU up yet: one, waiting for it



def test_a_longer_lm_run_resumes_by_name_and_a_shorter_one_gets_its_own(tmp_path):
    """The Ray Train run an LM fine-tune resumes is named by its settings but lm_steps: a run asked
    for more steps takes the same name (its checkpoint continues), and one asked for fewer steps
    than the kept checkpoint's gets a name of its own (none can be rewound)."""
    import json

    from icm.config import load_config
    from jobs.generator_lm import LM_DIR, lm_run_name

    cfg = load_config("smoke", [f"storage.root={tmp_path}"])
    gen = cfg.generator.model_copy(update={"lm_steps": 8})
    assert lm_run_name(cfg, gen, "abcdef0123456789") == "lm-abcdef012345"  # nothing there yet
    run = tmp_path / LM_DIR / "lm-abcdef012345"
    run.mkdir(parents=True)
    snapshot = {"latest_checkpoint_result": {"metrics": {"lm_step": 8}}}
    (run / "checkpoint_manager_snapshot.json").write_text(json.dumps(snapshot))
    steps = lambda n: gen.model_copy(update={"lm_steps": n})  # noqa: E731
    assert lm_run_name(cfg, gen, "abcdef0123456789") == "lm-abcdef012345"
    assert lm_run_name(cfg, steps(16), "abcdef0123456789") == "lm-abcdef012345"
    assert lm_run_name(cfg, steps(4), "abcdef0123456789") == "lm-abcdef012345-4"


def test_the_phase_views_of_the_generator_config_leave_out_only_what_each_phase_ignores():
    base = GeneratorConfig(objective="hybrid")
    lm_only = base.model_copy(update={"lm_steps": 999, "lm_lr": 0.5, "objective": "lm",
                                      "lm_anchor": "multitask", "cpus_per_task": 3.0})
    assert lm_only.reconstruction_settings() == base.reconstruction_settings()
    longer = base.model_copy(update={"steps": 7})
    assert longer.reconstruction_settings() != base.reconstruction_settings()
    assert not any(k.startswith("lm_") or k == "objective" for k in base.reconstruction_settings())
    assert base.model_copy(update={"lm_steps": 999}).lm_run_settings() == base.lm_run_settings()
    for changed in ({"lm_lr": 0.5}, {"objective": "lm"}, {"steps": 7}, {"seed": 1}):
        assert base.model_copy(update=changed).lm_run_settings() != base.lm_run_settings(), changed


# ----------------------------------------------------------------------------- lm_context: prompt


def _prompts(name: str, rows: int) -> list:
    """Row r's prompt shows texts r and r + 1 of the task (two demonstrations)."""
    from icm.generator.lm import EpisodePrompt
    from icm.task_vectors import format_prompt

    texts = TEXTS[name]
    return [EpisodePrompt(format_prompt(None, demos, mode="demos"), demos)
            for demos in ((texts[r % 2], texts[r % 2][:10]) for r in range(rows))]


def test_a_fit_under_the_prompt_lowers_the_loss_of_the_texts_it_reads_after_it(world):
    """fit_under_prompt (the evaluation's in-context+generated-finetuned) trains every LoRA
    weight of the vector: one row, every allowed text each step, so the loss it starts and ends
    on is the same batch's; the start is left unchanged, and malformed input is refused."""
    from icm.eval.loss_fit import PromptFitSettings, fit_under_prompt
    from icm.generator.lm import PromptContext

    from deepspeed.runtime.lr_schedules import WarmupDecayLR

    from icm.config import ZooConfig
    from icm.lora_train import deepspeed_config

    generator, applier, _, _, tokenizer = _setup(world)
    context = PromptContext.build(TEXTS["sums"], _prompts("sums", 1), tokenizer, 24)
    start = generator.sample(world[1]["sums"].mean(0), z="zero")[0]  # (L,)
    kept = start.clone()
    settings = PromptFitSettings(steps=6, lr=5e-3, batch_size=len(TEXTS["sums"]), warmup_steps=1)
    fitted, record = fit_under_prompt(applier, start, context, pad_id=0, settings=settings)
    assert fitted.shape == start.shape and torch.equal(start, kept)
    assert record["end_nll"] < record["start_nll"] and record["relative_change"] > 0
    assert record["prompts"] == 1 and record["steps"] == 6
    # the zoo's schedule: the rates a zoo LoRA of the same steps, warm-up and lr trains with
    zoo = ZooConfig(steps=6, warmup_steps=1, lr=5e-3)
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=zoo.lr)
    scheduler = WarmupDecayLR(optimizer, **deepspeed_config(zoo, world_size=1, bf16=False)
                              ["scheduler"]["params"])
    rates = []
    for _ in range(zoo.steps):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert record["summed_lr"] == pytest.approx(sum(rates)) and min(rates) > 0
    with pytest.raises(ValueError, match="start must be"):
        fit_under_prompt(applier, start[None], context, pad_id=0, settings=settings)


def test_prompt_context_reads_each_text_after_its_rows_prompt_and_predicts_only_the_text(world):
    """Labels are -100 over the prompt (start token included), the text follows as evaluation's
    in-context variants read it (" " + text), and a row's own demonstrations, clipped or whole,
    are never a target under it, in any step."""
    from icm.eval.baselines import TEXT_SEPARATOR
    from icm.generator.lm import _step_choices
    from icm.models import text_start_token_id

    generator, _, _, _, tokenizer = _setup(world)
    conditions = world[1]
    prompts = {n: _prompts(n, len(conditions[n])) for n in TEXTS}
    cfg = GeneratorConfig(**{**FAST, **LM, "lm_context": "prompt"})
    tasks = lm_tasks(TEXTS, conditions, generator, tokenizer, cfg, prompts)
    cats = next(t for t in tasks if t.name == "cats")
    assert cats.context.allowed[0] == [1, 3, 5, 7] and cats.context.allowed[1] == [0, 2, 4, 6]
    batch = cats.batch(0, [1, 3], tokenizer.pad_token_id or 0)
    prompt = cats.context.prompts[0]
    assert prompt[0] == text_start_token_id(tokenizer)
    assert prompt[1:] == tokenizer(prompts["cats"][0].prompt, add_special_tokens=False)["input_ids"]
    text = tokenizer(TEXT_SEPARATOR + TEXTS["cats"][1], add_special_tokens=False)["input_ids"]
    assert batch["input_ids"][0].tolist()[:len(prompt) + len(text)] == prompt + text
    assert (batch["labels"][:, :len(prompt)] == -100).all()
    assert batch["labels"][0, len(prompt):len(prompt) + len(text)].tolist() == text
    for step in range(40):
        for task, row, texts in _step_choices(tasks, cfg, step, 0):
            assert texts and set(texts) <= set(task.context.allowed[row]), (task.name, row, texts)
    with pytest.raises(ValueError, match="episode prompts"):
        lm_tasks(TEXTS, conditions, generator, tokenizer, cfg)
    with pytest.raises(ValueError, match="episode prompts for .* condition rows"):
        lm_tasks(TEXTS, conditions, generator, tokenizer, cfg,
                 {n: _prompts(n, len(conditions[n]) + 1) for n in TEXTS})


def test_lm_context_prompt_trains_the_generator_on_the_loss_under_the_prompt(world):
    """The loss under the prompt differs from the loss alone (the prompt is read) and fit_lm
    lowers it; a task whose every text is a demonstration of every row takes no part."""
    generator, applier, plain, _, tokenizer = _setup(world)
    conditions = world[1]
    cfg = GeneratorConfig(**{**FAST, **LM, "lm_context": "prompt"})
    prompts = {n: _prompts(n, len(conditions[n])) for n in TEXTS}
    tasks = lm_tasks(TEXTS, conditions, generator, tokenizer, cfg, prompts)
    pad = tokenizer.pad_token_id or 0
    z = torch.zeros(1, generator.model.spec.latent_dim)

    def loss_under(task) -> float:
        with torch.no_grad():
            vector = generated_vectors(generator, task.episodes[:1], z)[0]
            return float(applier.nll(vector, task.batch(0, task.context.allowed[0], pad)))

    cats = next(t for t in tasks if t.name == "cats")
    cats_plain = next(t for t in plain if t.name == "cats")
    with torch.no_grad():
        vector = generated_vectors(generator, cats.episodes[:1], z)[0]
        alone = float(applier.nll(vector, cats_plain.batch(0, cats.context.allowed[0], pad)))
    before = loss_under(cats)
    assert abs(before - alone) > 1e-3
    result = fit_lm(generator, applier, tasks, cfg, pad_id=pad)
    assert result.steps == cfg.lm_steps
    assert all(math.isfinite(h["train_lm_nll"]) for h in result.history)
    assert loss_under(cats) < before
    everything = {n: [EpisodePrompt(p.prompt, tuple(TEXTS[n])) for p in prompts[n]] for n in TEXTS}
    everything["cats"] = prompts["cats"]
    kept = lm_tasks(TEXTS, conditions, generator, tokenizer, cfg, everything)
    assert [t.name for t in kept] == ["cats"]


def test_episode_prompts_are_the_prompts_the_condition_rows_were_read_from(tmp_path):
    """One prompt per condition row, in load_task_conditions' order (mode by mode, episodes in
    index order): the prompt the task-vectors stage read (its cut one where it cut it), with
    that episode's demonstrations; a stage that read other prompts than today's settings build
    is refused with the fix."""
    from icm.config import TaskVectorConfig
    from icm.generator.lm import episode_prompts
    from icm.task_vectors import build_episodes, sample_demos
    from icm.tasks import load_task, write_task

    tv = TaskVectorConfig(k=2, episodes=3, max_demo_chars=16)
    train = [f"text number {i} of the task" for i in range(6)]
    write_task(tmp_path / "t", name="t", description="About texts.", group="g", source="tests",
               license="CC0-1.0", train=train, eval=["an eval text"])
    task = load_task(tmp_path / "t")
    modes = ["description", "demos", "both"]
    read = {(m, e.episode): (e.prompt, False)
            for m in modes for e in build_episodes(task, tv, mode=m)}
    read[("both", 2)] = ("Task: About texts.\n\nText:", True)  # the stage cut this one
    rows = episode_prompts(task, tv, modes, read)
    assert len(rows) == 9
    assert rows[0].demos == ()
    assert rows[0].prompt == build_episodes(task, tv, mode="description")[0].prompt
    for episode in range(3):
        assert rows[3 + episode].demos == rows[6 + episode].demos == sample_demos(task, tv, episode)
    assert rows[6].prompt == build_episodes(task, tv, mode="both")[0].prompt
    assert rows[8].prompt == "Task: About texts.\n\nText:"  # as read, not as rebuilt
    assert all(len(d) <= 16 for r in rows for d in r.demos)
    with pytest.raises(ValueError, match="rerun the task_vectors stage"):
        episode_prompts(task, tv.model_copy(update={"seed": 1}), modes, read)
    with pytest.raises(ValueError, match="rerun the task_vectors stage"):
        episode_prompts(task, tv.model_copy(update={"episodes": 4}), modes, read)


def test_lm_condition_mean_trains_one_adapter_that_reads_no_task_condition(world):
    """The multi-task control: with lm_condition mean the LM step's loss is the same whatever the
    tasks' vectors are (with task it is not), training still lowers it, and the trained
    generator gives every condition the same adapter, where its task twin tells them apart."""
    generator, applier, tasks, _, tokenizer = _setup(world)
    pad = tokenizer.pad_token_id or 0
    shuffled = [dataclasses.replace(t, episodes=torch.randn_like(t.episodes)) for t in tasks]

    def step_losses(cfg, task_list) -> list[float]:
        with torch.no_grad():
            return [float(lm_step_loss(generator, applier, task_list, cfg, step, 0, pad))
                    for step in range(3)]

    own = GeneratorConfig(**{**FAST, **LM, "objective": "lm"})
    mean = GeneratorConfig(**{**FAST, **LM, "objective": "lm", "lm_condition": "mean"})
    assert step_losses(mean, tasks) == pytest.approx(step_losses(mean, shuffled), abs=1e-6)
    assert step_losses(own, tasks) != pytest.approx(step_losses(own, shuffled), abs=1e-4)
    before = step_losses(mean, tasks)
    fit_lm(generator, applier, tasks, mean, pad_id=pad)
    assert sum(step_losses(mean, tasks)) < sum(before)
    conditions = torch.as_tensor(np.concatenate([world[1][n][:1] for n in sorted(TEXTS)]))  # (3, D)
    generator.config = mean  # what the LM phase's finetune stores with the generator
    adapters = generator.sample(conditions, z="zero")  # (3, L)
    assert torch.equal(adapters[0], adapters[1]) and torch.equal(adapters[0], adapters[2])
    generator.config = own
    assert not torch.allclose(generator.sample(conditions, z="zero")[0], adapters[1])
    # trained by reconstruction only (Tune's first-phase trials), it reads its conditions
    generator.config = mean.model_copy(update={"objective": "reconstruction"})
    assert not torch.allclose(*generator.sample(conditions[:2], z="zero"))


def test_condition_dropout_reads_the_mean_for_a_share_of_rows_drawn_per_step_and_rank():
    """Dropped rows read zeros (the training mean once z-scored), kept rows their own; which
    rows is a function of (seed, step, rank), so a resumed run drops the same; about p of them."""
    from icm.generator.lm import dropped_conditions

    conditions = torch.randn(4000, 3) + 5.0  # (T, D), no row all zero by chance
    cfg = GeneratorConfig(**{**FAST, **LM, "objective": "lm", "lm_condition_dropout": 0.3})
    dropped = dropped_conditions(conditions, cfg, step=7, rank=1)
    zero = (dropped == 0).all(dim=1)  # (T,)
    assert torch.equal(dropped[~zero], conditions[~zero])
    assert 0.27 < float(zero.float().mean()) < 0.33
    assert torch.equal(dropped, dropped_conditions(conditions, cfg, step=7, rank=1))
    assert not torch.equal(dropped, dropped_conditions(conditions, cfg, step=8, rank=1))
    assert not torch.equal(dropped, dropped_conditions(conditions, cfg, step=7, rank=0))
    none = cfg.model_copy(update={"lm_condition_dropout": 0.0})
    assert dropped_conditions(conditions, none, step=7, rank=1) is conditions


def test_condition_dropout_needs_a_task_condition_and_stays_below_one():
    with pytest.raises(ValueError, match="lm_condition_dropout=0.5 drops a task's condition"):
        GeneratorConfig(**{**FAST, **LM, "lm_condition": "mean", "lm_condition_dropout": 0.5})
    with pytest.raises(ValueError, match="lm_condition_dropout"):
        GeneratorConfig(**{**FAST, **LM, "lm_condition_dropout": 1.0})


def test_other_episodes_condition_is_the_mean_of_the_rest_of_its_mode():
    """Row i of each mode's block reads the mean of that block's other rows; a mode of one
    episode keeps its row; rows that do not split into the modes are refused, naming the fix."""
    from icm.generator.lm import other_episodes_mean

    episodes = torch.randn(6, 5)  # (2 modes x 3 episodes, D)
    pooled = other_episodes_mean(episodes, 2, "cats")
    for row in range(6):
        block = range(3 * (row // 3), 3 * (row // 3) + 3)
        expected = torch.stack([episodes[r] for r in block if r != row]).mean(0)  # (D,)
        assert torch.allclose(pooled[row], expected, atol=1e-6)
    assert torch.equal(other_episodes_mean(episodes, 6, "cats"), episodes)
    with pytest.raises(ValueError, match="6 condition rows .*lm_condition_episodes=own"):
        other_episodes_mean(episodes, 4, "cats")


def test_lm_rows_read_their_tasks_other_episodes_when_asked(world):
    """With lm_condition_episodes others each LM task's row is its other episodes' mean (of the
    z-scored vectors), so the step loss changes with it; own keeps each row's own vector."""
    modes = {"condition_modes": ["demos", "both"], "objective": "lm"}  # 2 modes x 2 episodes
    generator, applier, own_tasks, own, tokenizer = _setup(world, **modes)
    *_, other_tasks, others, _ = _setup(world, **modes, lm_condition_episodes="others")
    for own_task, other_task in zip(own_tasks, other_tasks):
        assert torch.allclose(other_task.episodes, own_task.episodes[[1, 0, 3, 2]], atol=1e-6)
    pad = tokenizer.pad_token_id or 0
    with torch.no_grad():
        loss = [float(lm_step_loss(generator, applier, tasks, cfg, 0, 0, pad))
                for tasks, cfg in ((own_tasks, own), (other_tasks, others))]
    assert loss[0] != pytest.approx(loss[1], abs=1e-5)
    with pytest.raises(ValueError, match="lm_condition_episodes='others' pools a task's episodes"):
        GeneratorConfig(**{**FAST, **LM, "lm_condition": "mean", "lm_condition_episodes": "others"})


def test_a_condition_scale_shrinks_the_condition_toward_the_training_mean(world):
    """Scale 1 is the default draw; 0 is the blind mode (what lm_condition mean generates, for
    every task alike); 0.5 is the raw condition halfway to the mean the generator z-scores by."""
    generator = _setup(world)[0]
    conditions = torch.as_tensor(np.concatenate([world[1][n][:1] for n in sorted(TEXTS)]))  # (3, D)
    full = generator.sample(conditions, z="zero")  # (3, L)
    assert torch.equal(generator.sample(conditions, z="zero", condition_scale=1.0), full)
    blind = generator.sample(conditions, z="zero", condition_scale=0.0)
    assert torch.equal(blind[0], blind[1]) and torch.equal(blind[0], blind[2])
    own = generator.config
    generator.config = GeneratorConfig(**{**FAST, **LM, "objective": "lm", "lm_condition": "mean"})
    assert torch.allclose(generator.sample(conditions, z="zero"), blind)
    generator.config = own
    mean = generator.condition_norm.mean  # (D,) the raw training mean
    halfway = mean + 0.5 * (conditions - mean)  # (3, D)
    assert torch.allclose(generator.sample(conditions, z="zero", condition_scale=0.5),
                          generator.sample(halfway, z="zero"), atol=1e-5)
    assert not torch.allclose(generator.sample(conditions, z="zero", condition_scale=0.5), full)
    with pytest.raises(GeneratorInputError, match="condition_scale must be finite"):
        generator.sample(conditions, condition_scale=float("nan"))


@pytest.mark.parametrize("field, default, other", [("lm_context", "none", "prompt"),
                                                   ("lm_condition", "task", "mean"),
                                                   ("lm_condition_dropout", 0.0, 0.5),
                                                   ("lm_condition_episodes", "own", "others"),
                                                   ("lm_teacher_weight", 0.0, 0.5)])
def test_new_lm_settings_leave_every_hash_as_it_was_at_their_default(field, default, other):
    """lm_context none and lm_condition task are left out of the stage fingerprint and the LM
    run's settings (runs from before they existed stay valid); the other value is part of
    both, and does not change the reconstruction phase's settings."""
    from icm.config import PipelineConfig, sha256_json

    cfg = PipelineConfig()
    assert getattr(cfg.generator, field) == default
    data = cfg.model_dump(mode="json")
    for name in cfg.generator.unread_fields():
        del data["generator"][name]
    assert field not in data["generator"] and field not in cfg.generator.lm_run_settings()
    assert cfg.generator.trained_settings() == {k: v for k, v in data["generator"].items()
                                                if k != "cpus_per_task"}
    for name in cfg.task_vectors.unread_fields():
        del data["task_vectors"][name]
    assert cfg.fingerprint("generator") == sha256_json({"generator": data["generator"]})
    changed = cfg.model_copy(update={"generator": cfg.generator.model_copy(update={field: other})})
    assert changed.fingerprint("generator") != cfg.fingerprint("generator")
    assert changed.generator.lm_run_settings()[field] == other
    assert changed.generator.trained_settings()[field] == other
    assert changed.generator.reconstruction_settings() == cfg.generator.reconstruction_settings()


def _teacher_tasks(world, weight=0.5):
    """The tiny world's LM tasks with the prompt as teacher (row r's prompt: `_prompts`)."""
    generator, applier, _, _, tokenizer = _setup(world)
    conditions = world[1]
    cfg = GeneratorConfig(**{**FAST, **LM, "lm_teacher_weight": weight})
    prompts = {n: _prompts(n, len(conditions[n])) for n in TEXTS}
    return generator, applier, lm_tasks(TEXTS, conditions, generator, tokenizer, cfg, prompts), cfg


def test_the_prompted_teacher_reads_the_prompt_once_and_scores_each_text_token(world):
    """prompted_log_probs (the prompt read once, its cache shared by the texts) equals one
    forward pass over prompt + text with the adapter off, row t against text token t, whatever
    LoRA weights the wrapped model holds; the student's position t predicts the same token."""
    from icm.generator.lm import _step_choices

    generator, applier, tasks, cfg = _teacher_tasks(world)
    cats = next(t for t in tasks if t.name == "cats")
    assert cats.context is None and cats.teacher is not None
    teacher = cats.teacher
    with torch.no_grad():  # the wrapped model's own LoRA weights made non-zero: must be off
        for name, parameter in applier.model.named_parameters():
            if "lora_B" in name:
                parameter.normal_()
    texts = [0, 1]  # two texts of different lengths: the shorter one padded
    assert len(teacher.targets[0]) != len(teacher.targets[1])
    got = applier.prompted_log_probs(teacher.prompts[0], teacher.text_batch(texts, 0))  # (B, T, V)
    prompt = teacher.prompts[0]
    for b, i in enumerate(texts):
        ids = torch.tensor([prompt + teacher.targets[i]])
        with torch.no_grad(), applier.model.disable_adapter():
            full = applier.model(input_ids=ids).logits.float().log_softmax(-1)[0]  # (P + T, V)
        length = len(teacher.targets[i])
        assert torch.allclose(got[b, :length], full[len(prompt) - 1:len(prompt) - 1 + length],
                              atol=1e-4)
    alone = teacher.alone_batch(texts, 0)
    assert alone["input_ids"][0, 0] == teacher.start
    assert alone["input_ids"][0, 1:1 + len(teacher.targets[texts[0]])].tolist() == \
        teacher.targets[texts[0]]
    assert all(len(t) <= cfg.lm_seq_len - 1 for t in teacher.targets)  # start + text: lm_seq_len
    for step in range(20):
        for task, row, chosen in _step_choices(tasks, cfg, step, 0):
            assert set(chosen) <= set(task.teacher.allowed[row])  # never its own demonstration


def test_the_distilled_loss_is_the_kl_to_the_prompted_teacher_mixed_with_the_nll(world):
    """With an empty prompt (start token only) the teacher is the student without adapter: the
    KL is 0 at the zero adapter and positive at another; weight 0 gives the NLL of the text read
    alone; fit_lm lowers the distilled loss; lm_context prompt with a teacher is refused."""
    from icm.generator.lm import PromptContext, distilled_loss

    generator, applier, tasks, cfg = _teacher_tasks(world, weight=1.0)
    cats = next(t for t in tasks if t.name == "cats")
    bare = PromptContext(prompts=[[cats.teacher.start]], targets=cats.teacher.targets,
                         allowed=[[0, 1]], rows=[0], start=cats.teacher.start)
    zero = torch.zeros_like(generator.template)
    assert float(distilled_loss(applier, zero, bare, 0, [0, 1], 0, 1.0)) == pytest.approx(
        0, abs=1e-5)
    z = torch.zeros(1, generator.model.spec.latent_dim)
    with torch.no_grad():
        vector = generated_vectors(generator, cats.episodes[:1], z)[0]
    assert float(distilled_loss(applier, vector, bare, 0, [0, 1], 0, 1.0)) > 1e-4
    nll = applier.nll(vector, cats.teacher.alone_batch([0, 1], 0))
    assert float(distilled_loss(applier, vector, cats.teacher, 0, [0, 1], 0, 0.0)) == \
        pytest.approx(float(nll))
    pad = 0
    with torch.no_grad():
        before = float(lm_step_loss(generator, applier, tasks, cfg, 0, 0, pad))
    result = fit_lm(generator, applier, tasks, cfg, pad_id=pad)
    assert result.steps == cfg.lm_steps and all(math.isfinite(h["train_lm_nll"])
                                                for h in result.history)
    with torch.no_grad():
        assert float(lm_step_loss(generator, applier, tasks, cfg, 0, 0, pad)) < before
    with pytest.raises(ValueError, match="lm_teacher_weight.*lm_context"):
        GeneratorConfig(**{**FAST, **LM, "lm_teacher_weight": 0.5, "lm_context": "prompt"})
    with pytest.raises(ValueError, match="episode prompts"):
        lm_tasks(TEXTS, world[1], generator, _setup(world)[4], cfg)
