"""The registry of evaluation variants: every adapter (or no adapter) a task is scored with.

A variant is one registry entry. Its *kind* says how the worker gets what it scores:

    base         the base model alone
    adapter      a LoRA the driver names: a snapshot, a mean of snapshots, or a weighted
                 combination of training tasks' final LoRAs (every adapter baseline here is
                 one), whose weights the worker may refit on the task's own texts (lorahub)
    generated    the generator's output for one of the task's condition vectors
    in-context   the model reading the task's prompt (its description and k demonstrations,
                 or one of the two: ``prompt_mode``) before each eval text: the base model, or
                 with ``with_adapter`` another variant's adapter active (the adapter and the
                 prompt stacked, which a user with both can do), fine-tuned first under such
                 prompts where ``finetune`` says on what
    selected     of the generator's K draws and the adapters of the variants in ``among``, the
                 one with the lowest perplexity on the task's k demonstrations (forward passes
                 only): the zoo's combinations compete with the generator's draws

Each entry also says in which *settings* it applies: ``seen`` (a training task, judged against
its own zoo LoRA), ``heldout`` (the fixed held-out set, judged against its oracle LoRA) and
``fold`` (a task of a group a fold's generator never saw, judged against its oracle). A new
baseline is one `register` call with a function that returns its adapter for a task, here and
nowhere else.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import numpy as np

SETTINGS = ("heldout", "fold", "seen")
ALL = frozenset(SETTINGS)
UNSEEN = frozenset({"heldout", "fold"})
Kind = Literal["base", "adapter", "generated", "in-context", "selected"]
PromptMode = Literal["both", "description", "demos"]


@dataclass(frozen=True)
class AdapterSource:
    """Where an adapter's flat vector comes from, as plain data the driver sends to a worker.

    ``snapshots``: snapshot folders whose vectors are averaged (one folder: that snapshot);
    ``combination``: training task -> weight over the setting's final training LoRAs.
    ``fit_on``: the worker refits the combination's weights, starting from these, by the LM
    loss on the task's own texts (`icm.eval.loss_fit`): "demos" (its k demonstrations) or
    "train" (its train split); None: the weights are used as they are.
    """

    snapshots: tuple[str, ...] = ()
    combination: tuple[tuple[str, float], ...] = ()
    fit_on: Literal["demos", "train"] | None = None

    @classmethod
    def weights(cls, weights: Mapping[str, float]) -> AdapterSource:
        return cls(combination=tuple(sorted((t, float(w)) for t, w in weights.items() if w != 0.0)))


@dataclass(frozen=True)
class Variant:
    """One way of scoring a task (see the module docstring)."""

    name: str
    kind: Kind
    settings: frozenset[str]
    description: str
    baseline: bool = False  # a rival the generator must beat (what a user gets without it)
    # not a rival but a bound the report also divides every generator by (oracle-projection:
    # the zoo's span; a generator below it has left the span)
    yardstick: bool = False
    opt_in: bool = False  # scored only when named (evaluate.variants or evaluate.extra_variants)
    # adapter: (context) -> AdapterSource | None (None: not available for this task)
    source: Callable[[Any], AdapterSource | None] | None = None
    # generated: which condition vector, and z = "random" (``samples`` draws) or "zero"
    condition: str = "both"
    z: str = "random"
    # generated: w, the z-scored condition read as w x its value (`LoraGenerator.sample`): 1 as
    # given, 0 the training mean (a generator's blind mode, with lm_condition_dropout)
    condition_scale: float = 1.0
    # in-context: the adapter or generated variant whose adapter is active under the prompt
    # (None: the base model reads it); a generated one contributes one draw, z ~ N(0, I)
    with_adapter: str | None = None
    # in-context: what the prompt holds, as a request would: the description and the k
    # demonstrations ("both"), the description only, or the demonstrations only
    prompt_mode: PromptMode = "both"
    # in-context: the adapter under the prompt is first fine-tuned, each batch read after one of
    # the task's episode prompts, on its train split ("train": a diagnostic, it reads the
    # oracle's data) or on its episodes' demonstrations ("demos": the texts its condition was
    # read from, what fine-tuning at request time could use); None: used as it is
    finetune: Literal["train", "demos"] | None = None
    # selected: the adapter variants whose adapters compete with the generator's draws
    among: tuple[str, ...] = ()
    extra: dict[str, Any] = field(default_factory=dict)


VARIANTS: dict[str, Variant] = {}


def register(variant: Variant) -> Variant:
    if variant.name in VARIANTS:
        raise ValueError(f"variant {variant.name!r} is registered twice")
    unknown = set(variant.settings) - ALL
    if unknown:
        raise ValueError(f"variant {variant.name!r}: unknown settings {sorted(unknown)}")
    if variant.with_adapter is not None:
        under = VARIANTS.get(variant.with_adapter)
        if variant.kind != "in-context" or under is None or under.kind not in ("adapter", "generated"):
            raise ValueError(f"variant {variant.name!r}: with_adapter must name a registered "
                             "adapter or generated variant, on an in-context variant")
    if variant.prompt_mode != "both" and variant.kind != "in-context":
        raise ValueError(f"variant {variant.name!r}: prompt_mode is for in-context variants")
    if variant.condition_scale != 1.0 and (variant.kind != "generated" or variant.z == "best-of-k"):
        raise ValueError(f"variant {variant.name!r}: condition_scale is for generated variants "
                         "that draw with z random or zero")
    if variant.finetune and variant.with_adapter is None:
        raise ValueError(f"variant {variant.name!r}: finetune needs with_adapter (the adapter "
                         "fine-tuned under the prompt)")
    if (variant.kind == "selected") != bool(variant.among) or any(
            VARIANTS.get(name) is None or VARIANTS[name].kind != "adapter" or not VARIANTS[name].baseline
            for name in variant.among):
        # baselines only: a diagnostic (the oracle, oracle-projection) reads what a user lacks
        raise ValueError(f"variant {variant.name!r}: among must name registered adapter baselines, "
                         "on a selected variant (and only there)")
    VARIANTS[variant.name] = variant
    return variant


def registered_name(variant: str) -> str:
    """The registry name of a possibly labelled variant (another run's generator, merged by
    `icm.eval.compare`): ``generated[hyper]`` -> ``generated``."""
    return variant.split("[", 1)[0]


def under_prompt(variant: Variant) -> Variant | None:
    """The variant whose adapter is active under an in-context variant's prompt (None: none)."""
    return VARIANTS[variant.with_adapter] if variant.with_adapter else None


def condition_under_prompt(variant: Variant) -> str | None:
    """The condition a generated adapter under an in-context variant's prompt is drawn from: the
    vector of the prompt it is read under (a request with a description only gives only that
    vector), except for a control, which keeps its own (another task's). None: no generated one."""
    under = under_prompt(variant)
    if under is None or under.kind != "generated":
        return None
    return variant.prompt_mode if under.condition == "both" else under.condition


def prompt_alone(variant: str) -> str:
    """The prompt alone that ``variant`` (possibly labelled) is judged against: the in-context
    variant reading the same kind of prompt (``in-context`` for every variant not in-context)."""
    spec = VARIANTS.get(registered_name(variant))
    mode = spec.prompt_mode if spec is not None else "both"
    return "in-context" if mode == "both" else f"in-context-{mode}"


def reads_generator(variant: Variant) -> bool:
    """Whether scoring ``variant`` draws from the setting's generator: a generated variant, a
    selected one (its candidates include the draws) or a prompt over a generated adapter."""
    under = under_prompt(variant)
    return variant.kind in ("generated", "selected") or (under is not None and under.kind == "generated")


def adapters_needed(variant: Variant) -> list[Variant]:
    """The adapter variants whose adapters scoring ``variant`` reads: itself, the one under its
    prompt, or its candidates."""
    if variant.among:
        return [VARIANTS[name] for name in variant.among]
    adapter = under_prompt(variant) or variant
    return [adapter] if adapter.kind == "adapter" else []


def check_names(names: list[str] | None, field_name: str = "evaluate.variants") -> list[str] | None:
    """``names`` if every one is registered, else a ValueError naming the field and the known ones."""
    unknown = sorted(set(names or ()) - set(VARIANTS))
    if unknown:
        raise ValueError(f"{field_name}: unknown {unknown}; known: {sorted(VARIANTS)}")
    return names


def variants_for(setting: str, names: list[str] | None = None, extra: Sequence[str] = ()) -> list[Variant]:
    """The registered variants that apply in ``setting``, in registry order: ``names`` if given,
    else every one not opt-in; plus ``extra``."""
    check_names(names)
    check_names(list(extra), "evaluate.extra_variants")
    chosen = set(extra) | (set(names) if names is not None
                           else {v.name for v in VARIANTS.values() if not v.opt_in})
    return [v for v in VARIANTS.values() if setting in v.settings and v.name in chosen]


def baseline_names() -> list[str]:
    return [v.name for v in VARIANTS.values() if v.baseline]


# ----------------------------------------------------------------------------- adapter sources


@dataclass
class TaskContext:
    """What the adapter sources of one (task, setting) may use; built by `icm.eval.inputs`.

    Vectors are (D,) task-mean condition vectors; folders are snapshot directories.
    """

    task: str
    setting: str
    condition: np.ndarray  # (D,) the task's mean "both" vector
    training: dict[str, np.ndarray]  # training task -> (D,) mean "both" vector, this setting's
    oracle: str | None  # the oracle's (seen: the task's own zoo LoRA's) final snapshot folder
    own_snapshots: tuple[str, ...] = ()  # seen tasks: every zoo snapshot of the task
    replicate: str | None = None  # seen tasks: an independent replicate's final snapshot
    multitask: str | None = None  # the multi-task LoRA's final snapshot (folds: the fold's own)
    ridge_weights: dict[str, float] | None = None  # training task -> weight (`RidgeMap`)
    options: dict[str, Any] = field(default_factory=dict)  # k, temperature
    # For sources that read adapters' weights: training task -> (L,) final flat vector, the
    # flat layout, and a scratch dict shared by the tasks of one setting (a fold, say) so that
    # what depends on the training tasks alone is computed once per setting; a source records
    # its fit per task under shared["fits"][variant][task] (kept in baselines.json).
    training_vectors: Mapping[str, Any] = field(default_factory=dict)
    layout: Any = None
    shared: dict[str, Any] = field(default_factory=dict)


def _oracle(ctx: TaskContext) -> AdapterSource | None:
    return AdapterSource(snapshots=(ctx.oracle,)) if ctx.oracle else None


def _lookup(ctx: TaskContext) -> AdapterSource | None:
    return AdapterSource(snapshots=ctx.own_snapshots) if ctx.own_snapshots else None


def _replicate(ctx: TaskContext) -> AdapterSource | None:
    return AdapterSource(snapshots=(ctx.replicate,)) if ctx.replicate else None


def _multitask(ctx: TaskContext) -> AdapterSource | None:
    return AdapterSource(snapshots=(ctx.multitask,)) if ctx.multitask else None


def _others(ctx: TaskContext) -> dict[str, np.ndarray]:
    return {t: v for t, v in ctx.training.items() if t != ctx.task}


def _soup(ctx: TaskContext) -> AdapterSource | None:
    others = _others(ctx)
    return AdapterSource.weights({t: 1.0 / len(others) for t in others}) if others else None


def _nearest(ctx: TaskContext) -> AdapterSource | None:
    from icm.baselines import nearest_task

    others = _others(ctx)
    return AdapterSource.weights({nearest_task(ctx.condition, others): 1.0}) if others else None


def _similarity_soup(ctx: TaskContext) -> AdapterSource | None:
    from icm.eval.baselines import similarity_weights

    others = _others(ctx)
    if not others:
        return None
    return AdapterSource.weights(similarity_weights(
        ctx.condition, others, k=ctx.options.get("soup_k", 5),
        temperature=ctx.options.get("soup_temperature", 0.05)))


def _ridge(ctx: TaskContext) -> AdapterSource | None:
    return AdapterSource.weights(ctx.ridge_weights) if ctx.ridge_weights else None


def _oracle_projection(ctx: TaskContext) -> AdapterSource | None:
    """The affine combination of the training tasks' LoRAs whose dW is closest to the oracle's
    (`closest_affine_weights`); its fit per task goes to ``ctx.shared["fits"]``."""
    from icm.eval.weights import closest_affine_weights, delta_gram
    from icm.zoo import load_vector

    names = sorted(_others(ctx))
    if not ctx.oracle or not names or ctx.layout is None:
        return None
    vectors = [ctx.training_vectors[t] for t in names]
    if ctx.shared.get("delta_gram_tasks") != names:  # the setting's (T, T) Gram, once
        ctx.shared["delta_gram"], ctx.shared["delta_gram_tasks"] = delta_gram(vectors, ctx.layout), names
    weights, fit = closest_affine_weights(vectors, load_vector(ctx.oracle), ctx.layout, names,
                                          gram=ctx.shared["delta_gram"])
    ctx.shared.setdefault("fits", {}).setdefault("oracle-projection", {})[ctx.task] = fit
    return AdapterSource.weights(weights)


def _loss_fit(fit_on: Literal["demos", "train"]) -> Callable[[TaskContext], AdapterSource | None]:
    """The uniform soup's weights, to be refitted by the worker on the task's own texts."""
    def source(ctx: TaskContext) -> AdapterSource | None:
        soup = _soup(ctx)
        return None if soup is None else replace(soup, fit_on=fit_on)
    return source


# ----------------------------------------------------------------------------- the registry

register(Variant("base", "base", ALL, "the base model alone"))
register(Variant("oracle", "adapter", ALL, (
    "the task's own LoRA, trained with the zoo's settings (seen: its zoo LoRA; unseen: the "
    "measurement-only oracle): what fine-tuning on the task gives"), source=_oracle))
register(Variant("generated", "generated", ALL, (
    "the generator fed the task's mean 'both' vector, z ~ N(0, I); per-text NLL averaged over "
    "the draws"), condition="both", z="random"))
register(Variant("generated-best-of-k", "generated", ALL, (
    "of K draws, the one with the lowest perplexity on the k demonstrations"),
    condition="both", z="best-of-k"))
register(Variant("cond-description", "generated", frozenset({"heldout"}), (
    "z = 0, conditioned on the description-only vector (a request with no examples)"),
    condition="description", z="zero"))
register(Variant("control-shuffled", "generated", frozenset({"heldout", "seen"}), (
    "z = 0, conditioned on another task's vector: shows whether the condition is used"),
    condition="shuffled", z="zero"))
register(Variant("control-other-group", "generated", ALL, (
    "z = 0, conditioned on a training task of another group (the next in name order): shows "
    "how much of the adapter comes from the condition rather than from what every task shares"),
    condition="other-group", z="zero", opt_in=True))
# The condition shrunk toward the training mean: what a condition adds to the shared adapter
# one network learnt beside it (generator.lm_condition_dropout); any generator can be read so
for _name, _scale, _what in (("generated-half", 0.5, "halfway to the training mean"),
                             ("generated-blind", 0.0, "replaced by the training mean")):
    register(Variant(_name, "generated", ALL, (
        f"as generated, with the task's z-scored condition {_what} (condition scale "
        f"{_scale}): with lm_condition_dropout, the condition shrunk toward the network's blind "
        "mode"), condition="both", z="random", condition_scale=_scale, opt_in=True))
register(Variant("lookup", "adapter", frozenset({"seen"}), (
    "the mean of the task's own zoo snapshots: what a lookup table of trained tasks gives"),
    source=_lookup))
register(Variant("replicate", "adapter", frozenset({"seen"}), (
    "an independent LoRA of the task (same settings, another data seed): the noise floor"),
    source=_replicate))
register(Variant("soup", "adapter", ALL, "the uniform mean of the training tasks' LoRAs",
                 baseline=True, source=_soup))
register(Variant("similarity-soup", "adapter", ALL, (
    "the k nearest training tasks' LoRAs by task vector, softmax(cosine / T) weights"),
    baseline=True, source=_similarity_soup))
register(Variant("nearest", "adapter", ALL, "the nearest training task's LoRA by task vector",
                 baseline=True, source=_nearest))
register(Variant("ridge", "adapter", ALL, (
    "ridge regression from task vector to LoRA weights, alpha by leave-one-task-out (folds: "
    "leave-one-group-out)"),
    baseline=True, source=_ridge))
register(Variant("oracle-projection", "adapter", UNSEEN, (
    "a diagnostic, not a rival (it reads the oracle): the flat combination of the training "
    "tasks' LoRAs, weights summing to 1, whose dW = B @ A is closest to the oracle's: about the "
    "best any weights over the zoo (soup, similarity soup, nearest, ridge) could do"),
    opt_in=True, yardstick=True, source=_oracle_projection))
register(Variant("lorahub", "adapter", UNSEEN, (
    "LoraHub with gradients: weights over the training tasks' LoRAs (flat combination, from the "
    "uniform soup's) fitted by the LM loss on the task's k demonstrations, the texts in-context "
    "prompting reads; what a user with the zoo and a few examples gets without the generator "
    "(opt-in: evaluate.lorahub_steps backward passes per task)"),
    baseline=True, opt_in=True, source=_loss_fit("demos")))
register(Variant("lorahub-train", "adapter", UNSEEN, (
    "a diagnostic, not a rival (it reads the task's whole train split, the oracle's data): "
    "lorahub's fit on up to evaluate.lorahub_train_texts train texts in minibatches: about the "
    "lowest loss any weights over the zoo reach"),
    opt_in=True, source=_loss_fit("train")))
register(Variant("multitask", "adapter", ALL, (
    "one LoRA trained on the union of the training tasks (zoo.multitask_steps sets its compute; "
    "folds: the oracles stage's per-fold one, oracles.fold_multitask, else absent)"),
    baseline=True, source=_multitask))
register(Variant("in-context", "in-context", ALL, (
    "the base model reading the description and the same k demonstrations as an episode "
    "before each eval text"), baseline=True))
register(Variant("demo-selected", "selected", UNSEEN, (
    "of the generator's K draws (generated-best-of-k's) and the soup, similarity-soup, nearest "
    "and ridge adapters, the one with the lowest perplexity on the k demonstrations (forward "
    "passes only): the zoo's combinations compete with the generator's draws"),
    condition="both", among=("soup", "similarity-soup", "nearest", "ridge"), opt_in=True))
# Every adapter baseline is also read under the same prompt: the honest rivals of the generated
# adapter under it (multitask on a fold only where the oracles stage trained the fold's own, as
# on its own). Each applies where its adapter does: on seen tasks too, where a generator's gain
# under the prompt on the tasks it trained on tells a failure to transfer from one to learn
for _under in ("generated", "generated-half", "generated-blind", "soup", "similarity-soup",
               "nearest", "ridge", "lorahub", "oracle", "multitask"):
    register(Variant(f"in-context+{_under}", "in-context", VARIANTS[_under].settings, (
        f"as in-context, read with the {_under} adapter active: does the adapter add to the "
        "prompt? (a generated one: one draw)"), with_adapter=_under, opt_in=True))
# The prompt of a request with a description only, or with examples only: the generator's draw
# from that prompt's own vector, and the base model reading the same prompt (its rival)
for _mode, _holds in (("description", "the task's description only"),
                      ("demos", "the same k demonstrations only, no description")):
    register(Variant(f"in-context-{_mode}", "in-context", UNSEEN, (
        f"the base model reading {_holds} before each eval text: prompting for a request that "
        "holds only that"), opt_in=True, prompt_mode=_mode))
    register(Variant(f"in-context-{_mode}+generated", "in-context", UNSEEN, (
        f"as in-context-{_mode}, read with one generator draw from that prompt's own vector "
        f"(mode {_mode}) active: does the adapter add to such a prompt?"),
        with_adapter="generated", opt_in=True, prompt_mode=_mode))
register(Variant("in-context+generated-finetuned", "in-context", UNSEEN, (
    "a diagnostic, not a rival (it reads the task's whole train split, the oracle's data): "
    "in-context+generated's draw fine-tuned by the LM loss on the task's train texts, each batch "
    "read after one of the task's episode prompts of the same kind (evaluate.finetune_*: the "
    "48-step zoo's recipe), then read under the prompt: what task-specific training adds "
    "under the prompt to the generator's adapter, a ceiling for what a condition could"),
    with_adapter="generated", opt_in=True, finetune="train"))
register(Variant("in-context+generated-finetuned-demos", "in-context", UNSEEN, (
    "as in-context+generated-finetuned, but fine-tuned only on the demonstrations of the task's "
    "episodes, the texts its condition was read from (each prompt's own never a target under "
    "it): what fine-tuning at request time on what a request holds adds under the prompt; a "
    "method this system avoids by design (backward passes per request), not a diagnostic"),
    with_adapter="generated", opt_in=True, finetune="demos"))
register(Variant("in-context+control-shuffled", "in-context", frozenset({"heldout"}), (
    "a control of in-context+generated: the generator's draw from another task's condition, read "
    "under this task's prompt; as good as in-context+generated, the adapter's gain under the "
    "prompt is not the condition's"), with_adapter="control-shuffled", opt_in=True))
