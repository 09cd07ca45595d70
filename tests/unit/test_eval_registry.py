"""The variant registry: one entry per variant, and the adapter each baseline builds."""

from __future__ import annotations

import numpy as np
import pytest

from icm.eval.variants import (ALL, VARIANTS, TaskContext, Variant, baseline_names, register,
                               variants_for)


def _context(setting="heldout", **extra) -> TaskContext:
    training = {"a": np.array([1.0, 0.0, 0.0]), "b": np.array([0.0, 1.0, 0.0]),
                "c": np.array([0.9, 0.1, 0.0]), "q": np.array([0.0, 0.0, 1.0])}
    return TaskContext(task="q", setting=setting, condition=np.array([1.0, 0.05, 0.0]),
                       training=training, oracle="/oracle/q", **extra)


def test_every_setting_has_base_oracle_generated_and_the_strong_baselines():
    for setting in ("heldout", "fold", "seen"):
        names = [v.name for v in variants_for(setting)]
        assert {"base", "oracle", "generated", "soup", "similarity-soup", "nearest", "ridge",
                "in-context"} <= set(names)
    # on a fold the multitask baseline is the fold's own LoRA, where the oracles stage trained
    # one (oracles.fold_multitask; test_eval_inputs), never the zoo's, which saw the fold's tasks
    assert "multitask" in [v.name for v in variants_for("fold")]
    assert {"lookup", "replicate"} <= {v.name for v in variants_for("seen")}
    assert not {"lookup", "replicate"} & {v.name for v in variants_for("heldout")}
    assert set(baseline_names()) == {"soup", "similarity-soup", "nearest", "ridge", "lorahub",
                                     "multitask", "in-context"}
    # lorahub costs backward passes per task: a baseline only where asked for
    assert "lorahub" not in {v.name for s in ("heldout", "fold") for v in variants_for(s)}
    assert "lorahub" in {v.name for v in variants_for("fold", extra=["lorahub"])}
    with pytest.raises(ValueError, match="unknown"):
        variants_for("heldout", ["generated", "not-a-variant"])


def test_register_refuses_duplicates_and_unknown_settings():
    with pytest.raises(ValueError, match="twice"):
        register(Variant("soup", "adapter", ALL, "again"))
    with pytest.raises(ValueError, match="unknown settings"):
        register(Variant("new-one", "base", frozenset({"elsewhere"}), "x"))
    assert "new-one" not in VARIANTS
    for kind, under in (("adapter", "soup"), ("in-context", "in-context"), ("in-context", "nope")):
        with pytest.raises(ValueError, match="with_adapter"):
            register(Variant("stack", kind, ALL, "x", with_adapter=under))
    assert "stack" not in VARIANTS


def test_a_selected_variant_names_adapter_candidates_and_belongs_to_its_run_generator():
    from icm.eval.compare import from_generator
    from icm.eval.variants import adapters_needed

    selected = VARIANTS["demo-selected"]
    assert selected.opt_in and not selected.baseline and selected.settings == frozenset({"heldout", "fold"})
    assert [v.name for v in adapters_needed(selected)] == ["soup", "similarity-soup", "nearest", "ridge"]
    assert from_generator("demo-selected") and from_generator("demo-selected[hyper]")
    assert "demo-selected" not in {v.name for v in variants_for("heldout")}  # opt-in
    for kind, among in (("selected", ()), ("selected", ("generated",)), ("selected", ("nope",)),
                        ("selected", ("oracle",)), ("generated", ("soup",))):  # oracle: no baseline
        with pytest.raises(ValueError, match="among"):
            register(Variant("pick", kind, ALL, "x", among=among))
    assert "pick" not in VARIANTS


def test_a_condition_scale_is_for_opt_in_generated_draws_and_each_is_read_under_the_prompt():
    scales = {name: VARIANTS[name].condition_scale for name in VARIANTS
              if VARIANTS[name].condition_scale != 1.0}
    assert scales == {"generated-half": 0.5, "generated-blind": 0.0}
    for name in scales:
        spec, under = VARIANTS[name], VARIANTS[f"in-context+{name}"]
        assert spec.kind == "generated" and spec.opt_in and spec.z == "random"
        assert under.with_adapter == name and under.opt_in and not under.baseline
    assert not {"generated-half", "generated-blind"} & {v.name for v in variants_for("heldout")}
    for kind, z in (("adapter", "random"), ("generated", "best-of-k")):
        with pytest.raises(ValueError, match="condition_scale"):
            register(Variant("scaled", kind, ALL, "x", z=z, condition_scale=0.5))
    assert "scaled" not in VARIANTS


def test_stacked_variants_are_opt_in_and_read_the_prompt_with_an_adapter_where_it_applies():
    unders = ["generated", "generated-half", "generated-blind", "soup", "similarity-soup",
              "nearest", "ridge", "lorahub", "oracle", "multitask"]
    names = [f"in-context+{under}" for under in unders]
    assert not [v for v in variants_for("heldout") if v.with_adapter]  # not scored by default
    stacked = {v.name: v.with_adapter for v in variants_for("heldout", extra=names) if v.with_adapter}
    assert stacked == dict(zip(names, unders))
    # every adapter baseline, opt-in ones too, can be read under the prompt: the stacked
    # generator's honest rivals
    assert set(baseline_names()) - {"in-context"} <= set(unders)
    # and its control: a draw from another task's condition under this task's prompt
    control = VARIANTS["in-context+control-shuffled"]
    assert control.with_adapter == "control-shuffled" and control.opt_in and not control.baseline
    assert control.settings == frozenset({"heldout"})
    assert all(VARIANTS[name].kind == "in-context" and not VARIANTS[name].baseline for name in stacked)
    # each where its adapter applies: lorahub, unseen tasks only on its own, not on seen ones
    assert all(VARIANTS[name].settings == VARIANTS[under].settings
               for name, under in zip(names, unders))
    on_seen = {v.name for v in variants_for("seen", extra=names) if v.with_adapter}
    assert "in-context+generated" in on_seen and "in-context+lorahub" not in on_seen
    assert [v.name for v in variants_for("fold", ["base"], extra=names[:1])] == ["base", names[0]]
    with pytest.raises(ValueError, match="evaluate.extra_variants: unknown"):
        variants_for("heldout", extra=["in-context+nope"])


def test_prompts_of_one_part_are_opt_in_and_their_generated_draw_reads_that_parts_vector():
    from icm.eval.variants import condition_under_prompt, reads_generator

    for mode in ("description", "demos"):
        alone, stacked = VARIANTS[f"in-context-{mode}"], VARIANTS[f"in-context-{mode}+generated"]
        assert alone.prompt_mode == stacked.prompt_mode == mode
        assert alone.with_adapter is None and stacked.with_adapter == "generated"
        assert all(v.opt_in and not v.baseline and v.settings == frozenset({"heldout", "fold"})
                   for v in (alone, stacked))
        assert condition_under_prompt(stacked) == mode and condition_under_prompt(alone) is None
        assert reads_generator(stacked) and not reads_generator(alone)
    assert VARIANTS["in-context"].prompt_mode == "both"
    assert condition_under_prompt(VARIANTS["in-context+generated"]) == "both"
    # a control keeps its own condition whatever the prompt
    assert condition_under_prompt(VARIANTS["in-context+control-shuffled"]) == "shuffled"
    assert condition_under_prompt(VARIANTS["in-context+soup"]) is None
    assert not {v.name for v in variants_for("heldout") if v.prompt_mode != "both"}
    from icm.eval.variants import prompt_alone

    assert prompt_alone("in-context-description+generated[M]") == "in-context-description"
    assert prompt_alone("in-context-demos") == "in-context-demos"
    assert prompt_alone("generated[B]") == prompt_alone("in-context+soup") == "in-context"
    with pytest.raises(ValueError, match="prompt_mode is for in-context"):
        register(Variant("alone-described", "generated", ALL, "x", prompt_mode="description"))


def test_the_finetuned_draw_is_an_opt_in_diagnostic_that_needs_an_adapter_under_the_prompt():
    for name, texts in (("in-context+generated-finetuned", "train"),
                        ("in-context+generated-finetuned-demos", "demos")):
        tuned = VARIANTS[name]
        assert tuned.finetune == texts and tuned.with_adapter == "generated"
        assert tuned.prompt_mode == "both" and tuned.opt_in and not tuned.baseline
        assert tuned.settings == frozenset({"heldout", "fold"})
    assert len([v for v in VARIANTS.values() if v.finetune]) == 2
    with pytest.raises(ValueError, match="finetune needs with_adapter"):
        register(Variant("tuned-alone", "in-context", ALL, "x", finetune="train"))
    assert "tuned-alone" not in VARIANTS


def test_the_config_names_the_field_of_an_unknown_variant():
    from pydantic import ValidationError

    from icm.config import EvalConfig

    assert EvalConfig(extra_variants=["in-context+soup"]).extra_variants == ["in-context+soup"]
    for field in ("variants", "extra_variants"):
        with pytest.raises(ValidationError, match=f"evaluate.{field}: unknown .'gnerated'.; known:"):
            EvalConfig(**{field: ["gnerated"]})



def test_a_one_part_prompt_with_a_draw_needs_that_parts_task_vectors():
    from pydantic import ValidationError

    from icm.config import PipelineConfig

    parts = {"task_vectors": {"modes": ["both", "demos"]},
             "generator": {"condition_modes": ["both", "demos"]}}
    ok = PipelineConfig(**parts, evaluate={"extra_variants": [
        "in-context-demos+generated", "in-context-description"]})  # the base reads no vector
    assert ok.evaluate.extra_variants[0] == "in-context-demos+generated"
    for field in ("variants", "extra_variants"):
        with pytest.raises(ValidationError, match="'description' task vectors.*Fix: add"):
            PipelineConfig(**parts, evaluate={field: ["in-context-description+generated"]})


def test_baseline_sources_never_use_the_task_itself():
    ctx = _context()
    soup = dict(VARIANTS["soup"].source(ctx).combination)
    assert set(soup) == {"a", "b", "c"} and sum(soup.values()) == pytest.approx(1.0)
    assert dict(VARIANTS["nearest"].source(ctx).combination) == {"a": 1.0}
    similar = dict(VARIANTS["similarity-soup"].source(_context(options={"soup_k": 2})).combination)
    assert set(similar) == {"a", "c"} and sum(similar.values()) == pytest.approx(1.0)
    assert VARIANTS["oracle"].source(ctx).snapshots == ("/oracle/q",)
    assert VARIANTS["ridge"].source(ctx) is None  # no ridge fit given: not scored
    assert VARIANTS["replicate"].source(ctx) is None and VARIANTS["multitask"].source(ctx) is None
    seen = _context("seen", own_snapshots=("/s1", "/s2"), replicate="/r", multitask="/m")
    assert VARIANTS["lookup"].source(seen).snapshots == ("/s1", "/s2")
    assert VARIANTS["replicate"].source(seen).snapshots == ("/r",)
