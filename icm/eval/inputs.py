"""What the evaluation scores, gathered once by the driver: one `EvalItem` per (task, setting).

Settings (see `icm.eval.variants`):

* ``heldout``: the suite's fixed held-out tasks; the generator trained on every training task;
  the target is each task's oracle LoRA from ``<root>/oracles/`` (measurement only).
* ``fold``: every task of the groups a group fold holds out; that fold's generator never saw
  any task of those groups; baselines are rebuilt from the fold's training tasks only.
* ``seen``: some training tasks, against their own zoo LoRA, with the lookup and replicate
  controls (replicate vs trained is the noise floor).

Every baseline adapter is a weighted combination of training tasks' final LoRAs (or a snapshot
folder), so a worker needs the shared final vectors once and a few numbers per item.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from icm.eval.variants import AdapterSource, TaskContext, reads_generator, variants_for
from icm.lora_io import LoraLayout
from icm.zoo import LAYOUT_FILE, MANIFEST_FILE, MULTITASK, REPLICATE_PREFIX, fold_multitask_name, load_vector

MODES = ("both", "description", "demos")


@dataclass
class EvalItem:
    """One task in one setting: everything its worker needs besides the models."""

    task: str
    task_path: str
    group: str
    setting: str  # "heldout" | "fold" | "seen"
    fold: int | None
    generator_dir: str | None  # None: no variant of the item reads a generator
    lora_format_dir: str  # a zoo: its layout and an adapter config, to load every flat vector
    conditions: dict[str, np.ndarray]  # "both", "description", "shuffled" -> (D,)
    adapters: dict[str, AdapterSource]  # adapter variant -> where its vector comes from
    variants: list[str]  # what to score, in order
    extra: dict = field(default_factory=dict)


def snapshot_folders(root: Path) -> dict[str, tuple[str, ...]]:
    """Task -> its snapshot folders in step order (the last is the final one), from a
    zoo-layout manifest read once."""
    path = Path(root) / MANIFEST_FILE
    if not path.is_file():
        return {}
    manifest = pd.read_parquet(path).sort_values("step")
    return {task: tuple(rows["path"].astype(str)) for task, rows in manifest.groupby("task")}


def final_snapshots(root: Path) -> dict[str, str]:
    """Task -> folder of its last snapshot (highest step)."""
    return {task: folders[-1] for task, folders in snapshot_folders(root).items()}


def load_finals(finals: Mapping[str, str], tasks: Sequence[str]) -> dict[str, torch.Tensor]:
    """The final (L,) vectors of ``tasks``."""
    return {task: load_vector(finals[task]) for task in tasks}


def ridge_weights(training: Mapping[str, np.ndarray], vectors: Mapping[str, torch.Tensor],
                  queries: Mapping[str, np.ndarray], groups: Mapping[str, str] | None = None
                  ) -> tuple[dict[str, dict[str, float]], dict]:
    """Ridge from task vector to LoRA weights, fit on ``training``, as weights over the training
    tasks for each query task; plus the fit's record. Alpha by leave-one-task-out, or with
    ``groups`` (task -> group; >= 2 among the training tasks) by leave-one-group-out."""
    from icm.eval.baselines import RidgeMap

    names = sorted(training)
    x = np.stack([training[t] for t in names])  # (T, D)
    y = torch.stack([vectors[t] for t in names])  # (T, L)
    labels = [groups[t] for t in names] if groups else None
    ridge = RidgeMap().fit(x, y, groups=labels if labels and len(set(labels)) > 1 else None)
    weights = {task: dict(zip(names, ridge.combination_weights(query).tolist()))
               for task, query in queries.items()}
    return weights, {"alpha": ridge.alpha, "criterion": ridge.criterion, "loo_errors": ridge.loo_errors}


def _plan_ridge(plan, training: Mapping[str, np.ndarray], finals: Mapping[str, torch.Tensor],
                both: Mapping[str, np.ndarray], groups: Mapping[str, str]
                ) -> tuple[dict[str, dict[str, float]], dict]:
    """Ridge weights for a plan's tasks. A task among the plan's training tasks (a seen task)
    gets a ridge fit without it, as every other baseline leaves it out: a fit that holds its
    own LoRA would mostly return that LoRA. A fold's tasks come from groups no training task
    shares, so its alpha is chosen by leaving whole groups out, the shift it will face."""
    outside = {t: both[t] for t in plan.tasks if t not in training}
    by_group = groups if plan.setting == "fold" else None
    weights, record = ridge_weights(training, finals, outside, by_group) if outside else ({}, {})
    for task in (t for t in plan.tasks if t in training):
        others = {t: v for t, v in training.items() if t != task}
        weights[task], record[f"without {task}"] = ridge_weights(others, finals, {task: both[task]})
        weights[task] = weights[task][task]
    return weights, record


@dataclass
class SettingPlan:
    """A setting's tasks and what they are judged with."""

    setting: str
    tasks: list[str]
    training: list[str]  # the training tasks its generator and baselines may use
    # None: none was trained, as none of the variants chosen for this setting reads one
    generator_dir: str | None
    fold: int | None = None


def build_items(suite, plans: Sequence[SettingPlan], means: Mapping[str, Mapping[str, np.ndarray]], *,
                zoo_root: Path, oracle_root: Path, options: Mapping, variant_names: list[str] | None,
                extra_variants: Sequence[str] = (),
                baseline_means: Mapping[str, Mapping[str, np.ndarray]] | None = None,
                ) -> tuple[list[EvalItem], dict, dict[str, torch.Tensor]]:
    """Items for every plan, a record of how baselines were fit (ridge alpha per setting), and
    the final (L,) vectors of every training task the items' combinations name. ``means``
    condition the generator; the zoo baselines read ``baseline_means`` (default: ``means``),
    e.g. another pooling (evaluate.baseline_pooling) shared by generators that read others."""
    from icm.baselines import other_group_partner, shuffled_partner

    zoo_snapshots = snapshot_folders(zoo_root)
    zoo_finals = {task: folders[-1] for task, folders in zoo_snapshots.items()}
    oracle_finals = final_snapshots(oracle_root)
    both = means["both"]  # task -> (D,) the generator's condition
    baseline_both = (baseline_means or means)["both"]  # task -> (D',) what the baselines read
    items, record, fits = [], {}, {}
    finals = load_finals(zoo_finals, sorted({t for p in plans for t in p.training}))
    group_of = {name: spec.group for name, spec in suite.tasks.items()}
    layout_file = Path(zoo_root) / LAYOUT_FILE
    layout = LoraLayout.load(layout_file) if layout_file.is_file() else None
    for plan in plans:
        training = {t: baseline_both[t] for t in plan.training}
        shared: dict = {}  # sources' per-setting scratch (`TaskContext.shared`)
        ridge, record[f"{plan.setting}{'' if plan.fold is None else plan.fold}"] = _plan_ridge(
            plan, training, finals, baseline_both, group_of)
        variants = variants_for(plan.setting, variant_names, list(extra_variants))
        names = [v.name for v in variants]
        if plan.generator_dir is None and (reading := [v.name for v in variants if reads_generator(v)]):
            raise ValueError(f"{plan.setting} setting: no generator was trained for it, but "
                             f"{reading} read one")
        for task in plan.tasks:
            context = TaskContext(
                task=task, setting=plan.setting, condition=baseline_both[task], training=training,
                oracle=(zoo_finals if task in zoo_finals and not suite.is_heldout(task)
                        else oracle_finals).get(task),
                own_snapshots=zoo_snapshots.get(task, ()) if plan.setting == "seen" else (),
                replicate=oracle_finals.get(REPLICATE_PREFIX + task) if plan.setting == "seen" else None,
                multitask=(zoo_finals.get(MULTITASK) if plan.fold is None
                           else oracle_finals.get(fold_multitask_name(plan.fold))),
                ridge_weights=ridge[task], options=dict(options),
                training_vectors={t: finals[t] for t in plan.training}, layout=layout, shared=shared)
            adapters = _adapter_sources(variants, context)
            partner = shuffled_partner(task, list(suite.tasks))
            conditions = {mode: means[mode][task] for mode in MODES if task in means.get(mode, {})}
            conditions["shuffled"] = both[partner]
            extra = {"shuffled_partner": partner}
            if any(v.condition == "other-group" for v in variants):  # an opt-in control's
                other = other_group_partner(task, group_of, plan.training)
                conditions["other-group"], extra["other_group_partner"] = both[other], other
            spec = suite.tasks[task]
            items.append(EvalItem(
                task=task, task_path=str(spec.path), group=spec.group, setting=plan.setting,
                fold=plan.fold, generator_dir=plan.generator_dir, lora_format_dir=str(zoo_root),
                conditions=conditions,
                adapters=adapters, variants=[n for n in names if _available(n, adapters)],
                extra=extra))
        if shared.get("fits"):  # what adapter sources fitted per task (`TaskContext.shared`)
            fits[f"{plan.setting}{'' if plan.fold is None else plan.fold}"] = shared["fits"]
    return items, {"shared_vectors": sorted(finals), "ridge": record, "fits": fits}, finals


def _adapter_sources(variants, context) -> dict[str, AdapterSource]:
    """Adapter variant -> its source for this task, for every adapter variant scored on its own,
    active under an in-context variant's prompt or a selected variant's candidate (absent where
    it does not apply)."""
    from icm.eval.variants import adapters_needed

    adapters = {}
    for variant in variants:
        for adapter in adapters_needed(variant):
            if adapter.name not in adapters and (source := adapter.source(context)) is not None:
                adapters[adapter.name] = source
    return adapters


def _available(name: str, adapters: Mapping[str, AdapterSource]) -> bool:
    from icm.eval.variants import VARIANTS, under_prompt

    variant = VARIANTS[name]
    if variant.kind == "adapter":
        return name in adapters
    under = under_prompt(variant)
    return under is None or under.kind != "adapter" or under.name in adapters
