"""Reading what the generator learns from: the LoRA zoo and the task vectors, from storage.

`load_zoo` reads the per-task snapshots of a zoo (never the multi-task LoRA, never held-out
tasks) and checks it was built for this base model and layout; `load_generator_inputs` adds the
episode task vectors of the same tasks (``icm.task_vectors``) and is what both generator jobs
call. The rest of the generator code takes the plain structures returned here (tests build them
directly).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from icm.config import PipelineConfig, ZooConfig
from icm.errors import InputError
from icm.io import sha256_json
from icm.lora_io import LoraLayout
from icm.zoo import LAYOUT_FILE, MANIFEST_FILE, VECTOR_FILE, ZOO_FILE, snapshot_dir

log = logging.getLogger(__name__)
LORA_FIELDS = ("rank", "alpha", "dropout", "target_modules", "init_seed")


class GeneratorInputError(InputError):
    """Generator inputs that cannot be used together; the message names what differs."""


class ConditionMismatchError(GeneratorInputError):
    """Task vectors of the wrong size, shape or for missing tasks."""


class ZooInputError(GeneratorInputError):
    """An empty zoo, or one from another base model, LoRA setup or key order."""


@dataclass
class ZooData:
    """The training part of a LoRA zoo in memory: flat vectors per task, in step order."""

    layout: LoraLayout
    vectors: Mapping[str, torch.Tensor]  # task -> (S, L) float32 (a `ZooVectors` when read from storage)
    model_spec: str
    peft_config: dict[str, Any]
    lora: dict[str, Any] = field(default_factory=dict)  # zoo.json's LoRA settings
    adapter_bytes: int = 0  # bytes of the peft adapters these snapshots replace
    root: str | None = None
    fingerprint: str = ""

    def summary(self) -> dict[str, Any]:
        return {"root": self.root, "model_spec": self.model_spec, "lora": self.lora,
                "tasks": sorted(self.vectors), "snapshots": sum(snapshot_counts(self.vectors).values()),
                "adapter_bytes": self.adapter_bytes, "fingerprint": self.fingerprint,
                "layout_fingerprint": self.layout.fingerprint()}


# ----------------------------------------------------------------------------- reading the zoo


def compare_layouts(expected: LoraLayout, found: LoraLayout) -> str | None:
    """None when equal, else the first difference in words (keys, key order, or a shape)."""
    if expected.fingerprint() == found.fingerprint():
        return None
    missing = [k for k in expected.keys if k not in set(found.keys)]
    extra = [k for k in found.keys if k not in set(expected.keys)]
    if missing or extra:
        return f"keys differ: missing {missing[:2]}, unexpected {extra[:2]}"
    for i, (a, b) in enumerate(zip(expected.keys, found.keys)):
        if a != b:
            return f"key order differs at position {i}: expected {a}, found {b}"
    for key, a, b in zip(expected.keys, expected.shapes, found.shapes):
        if a != b:
            return f"tensor {key} has shape {list(b)}, expected {list(a)}"
    return "layouts differ"


def load_zoo(zoo_root: str | Path, *, include: Sequence[str] | None = None, exclude: Sequence[str] = (),
             model_spec: str | None = None, layout: LoraLayout | None = None) -> ZooData:
    """The per-task snapshots of a zoo (never the multi-task LoRA), read lazily (`ZooVectors`).

    Args:
        include: task names allowed (e.g. the suite's training tasks); None: all.
        exclude: task names never read (held-out tasks), even when the zoo has them.
        model_spec, layout: when given, the zoo must have been built for them.

    Raises:
        ZooInputError: no zoo, no training snapshots, another base model or another layout.
    """
    import pandas as pd

    root = Path(zoo_root)
    if not (root / ZOO_FILE).is_file() or not (root / MANIFEST_FILE).is_file():
        raise ZooInputError(f"no LoRA zoo at {root} ({ZOO_FILE} or {MANIFEST_FILE} missing). Fix: run "
                            "`icm zoo` with the same storage.root first.")
    identity = json.loads((root / ZOO_FILE).read_text())
    if model_spec is not None and identity.get("model_spec") != model_spec:
        raise ZooInputError(f"model.spec: the zoo at {root} was trained on {identity.get('model_spec')!r}, "
                            f"this run uses {model_spec!r}. Fix: use that zoo's model.spec or retrain it.")
    zoo_layout = LoraLayout.load(root / LAYOUT_FILE)
    if layout is not None and (diff := compare_layouts(layout, zoo_layout)):
        raise ZooInputError(f"the zoo at {root} has another LoRA layout than this base model and zoo "
                            f"config give: {diff}. Fix: retrain the zoo or restore its settings.")
    frame = pd.read_parquet(root / MANIFEST_FILE)
    rows = frame[(frame["kind"] == "task") & ~frame["task"].isin(list(exclude))] if len(frame) else frame
    if include is not None and len(rows):
        rows = rows[rows["task"].isin(list(include))]
    if dropped := sorted(set(frame.get("task", [])) & set(exclude)):  # e.g. a fold's group: by design
        log.debug("zoo: %d task(s) held out from this generator are not read: %s", len(dropped), dropped)
    if not len(rows):
        raise ZooInputError(f"the zoo at {root} has no snapshots of training tasks (manifest tasks: "
                            f"{sorted(set(frame.get('task', [])))}). Fix: run `icm zoo` first.")
    vectors, peft_config, size = _zoo_vectors(root, rows, zoo_layout)
    fingerprint = sha256_json([zoo_layout.fingerprint(), rows[["task", "step", "vector_sha256"]]
                               .astype(str).values.tolist()])
    return ZooData(zoo_layout, vectors, identity["model_spec"], peft_config, identity.get("lora", {}),
                   size, str(root), fingerprint)


class ZooVectors(Mapping):
    """Task -> (S, L) float32 snapshot vectors in step order, read from storage on each access.

    Nothing is held in memory: `icm.generator.data.prepare_data` reads the zoo whole when it fits
    ``generator.data_memory_mb`` and task by task (blocks) otherwise, so no process needs the
    whole zoo. Snapshot counts come from the manifest, without reading a vector.
    """

    def __init__(self, root: Path, steps: Mapping[str, Sequence[int]], layout: LoraLayout):
        self.root, self.layout = Path(root), layout
        self.steps = {task: [int(s) for s in steps[task]] for task in sorted(steps)}

    def __getitem__(self, task: str) -> torch.Tensor:
        from safetensors import safe_open

        stack = []
        for step in self.steps[task]:
            path = snapshot_dir(self.root, task, step) / VECTOR_FILE
            with safe_open(str(path), "pt") as handle:
                if (handle.metadata() or {}).get("layout_fingerprint") != self.layout.fingerprint():
                    raise ZooInputError(f"{path} was written with another key order or shapes than "
                                        f"{self.root / LAYOUT_FILE}. Fix: rebuild the zoo.")
                stack.append(handle.get_tensor("vector").float())
        return torch.stack(stack)  # (S, L)

    def __iter__(self):
        return iter(self.steps)

    def __len__(self) -> int:
        return len(self.steps)

    def count(self, task: str) -> int:
        return len(self.steps[task])


def snapshot_counts(vectors: Mapping[str, Any]) -> dict[str, int]:
    """Snapshots per task, without reading a lazily stored zoo."""
    if isinstance(vectors, ZooVectors):
        return {task: vectors.count(task) for task in vectors}
    return {task: len(v) for task, v in vectors.items()}


def _zoo_vectors(root: Path, rows, layout: LoraLayout) -> tuple[ZooVectors, dict, int]:
    """The lazy snapshot vectors, the peft config template, the bytes of the adapters they replace."""
    steps = {task: group.sort_values("step")["step"].tolist() for task, group in rows.groupby("task")}
    first = snapshot_dir(root, *next((t, s[0]) for t, s in sorted(steps.items())))
    peft_config = json.loads((first / "adapter_config.json").read_text())
    size = sum((snapshot_dir(root, t, s) / "adapter_model.safetensors").stat().st_size
               for t, task_steps in steps.items() for s in task_steps)
    return ZooVectors(root, steps, layout), peft_config, size


def check_conditions(conditions: Mapping[str, Any], tasks: Sequence[str]) -> dict[str, np.ndarray]:
    """Episode vectors of ``tasks`` as float32 (E, D) arrays of one common D."""
    missing = [t for t in tasks if t not in conditions]
    if missing:
        raise ConditionMismatchError(f"no task vectors for zoo task(s) {missing}. Fix: run `icm "
                                     "task-vectors` for these tasks with generator.condition_modes/"
                                     "condition_layer/condition_pooling among the extracted ones.")
    out = {}
    for task in tasks:
        array = np.asarray(conditions[task], dtype=np.float32)
        array = array[None] if array.ndim == 1 else array
        if array.ndim != 2 or array.shape[0] == 0 or not np.isfinite(array).all():
            raise ConditionMismatchError(f"task vectors of {task!r} must be a finite (episodes, dim) "
                                         f"array with at least one episode, got shape {array.shape}.")
        out[task] = array
    dims = {t: a.shape[1] for t, a in out.items()}
    if len(set(dims.values())) > 1:
        raise ConditionMismatchError(f"task vectors differ in size between tasks: {dims}. Fix: extract "
                                     "all of them with the same model and layer.")
    return out


# ----------------------------------------------------------------------------- from storage


@dataclass
class GeneratorInputs:
    """What both generator jobs read from storage: the training zoo and its task vectors."""

    zoo: ZooData
    conditions: dict[str, np.ndarray]  # task -> (E, D); training tasks of the zoo only
    condition_spec: dict[str, Any]
    init_state: dict[str, torch.Tensor] | None  # the zoo's initial adapter (target "b")

    def fingerprint(self) -> str:
        import hashlib

        digests = {t: hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()
                   for t, a in sorted(self.conditions.items())}
        return sha256_json([self.zoo.fingerprint, digests])


def initial_lora_state(model_spec: str, lora: Mapping[str, Any], *, cache_dir: str | None = None
                       ) -> tuple[LoraLayout, dict[str, torch.Tensor]]:
    """The adapter every zoo task started from, rebuilt from its init seed, and its layout."""
    from icm.lora_io import adapter_state_dict
    from icm.lora_train import build_lora_model
    from icm.models import load_base_model

    model, _ = load_base_model(model_spec, cache_dir=cache_dir, device="cpu")  # the layout only
    state = adapter_state_dict(build_lora_model(model, ZooConfig(**{k: lora[k] for k in LORA_FIELDS})))
    return LoraLayout.of(state), state


def _task_vector_loader(stage_dir: Path, **kwargs) -> dict[str, np.ndarray]:
    from icm.task_vectors import VECTORS_DIR, load_episode_vectors

    if not (Path(stage_dir) / VECTORS_DIR).is_dir():
        raise ConditionMismatchError(f"no task vectors at {stage_dir}. Fix: run `icm task-vectors` with "
                                     "the same storage.root first.")
    return load_episode_vectors(stage_dir, **kwargs)


def _check_chunks(cfg: PipelineConfig, folder: Path) -> None:
    """Pooling ``chunks``: the stage's vectors were cut into the configured number of spans
    (else a generator would split them at the wrong places, unnoticed until a request)."""
    import yaml

    resolved = folder / "config.resolved.yaml"
    if cfg.generator.condition_pooling != "chunks" or not resolved.is_file():
        return
    made = (yaml.safe_load(resolved.read_text()).get("task_vectors") or {}).get("chunks")
    if made is not None and made != cfg.task_vectors.chunks:
        raise ConditionMismatchError(
            f"the task vectors at {folder} were pooled into task_vectors.chunks={made} spans, the "
            f"config says {cfg.task_vectors.chunks}. Fix: set task_vectors.chunks={made}, or "
            "rerun the task_vectors stage with the new value.")


def condition_spec_of(cfg: PipelineConfig) -> dict[str, Any]:
    """How the conditions were made (which episode vectors, the task-vector config, prompt
    template and stage fingerprint), so a request can rebuild the same kind of vector."""
    from icm.task_vectors import TEMPLATE_FILE

    folder = cfg.storage.path("task_vectors")
    _check_chunks(cfg, folder)
    stage_file, template = folder / "stage.json", folder / TEMPLATE_FILE
    return {"modes": list(cfg.generator.condition_modes), "layer": cfg.generator.condition_layer,
            "pooling": cfg.generator.condition_pooling, "model_spec": cfg.model.spec,
            "task_vectors": cfg.task_vectors.model_dump(mode="json"),
            "task_vector_fingerprint": (json.loads(stage_file.read_text()).get("fingerprint")
                                        if stage_file.is_file() else None),
            "prompt_template": template.read_text() if template.is_file() else None}


def load_generator_inputs(cfg: PipelineConfig, suite, *,
                          load_conditions: Callable[..., Mapping[str, Any]] | None = None) -> GeneratorInputs:
    """Read the zoo's training tasks and their episode task vectors for ``cfg.generator``.

    Only ``suite.training_tasks()`` are read; held-out tasks are dropped from the zoo and from
    the conditions even if storage holds them. ``load_conditions`` defaults to
    ``icm.task_vectors.load_episode_vectors``.
    """
    training = [t.name for t in suite.training_tasks()]
    zoo = load_zoo(cfg.storage.path("zoo"), include=training, exclude=suite.heldout,
                   model_spec=cfg.model.spec)
    lora = cfg.zoo.model_dump(mode="json", include=set(LORA_FIELDS))
    if diff := {k: (zoo.lora.get(k), lora[k]) for k in LORA_FIELDS if zoo.lora.get(k) != lora[k]}:
        raise ZooInputError("the zoo's LoRA settings differ from this config: " + ", ".join(
            f"zoo.{k}: zoo has {a!r}, config {b!r}" for k, (a, b) in diff.items())
            + ". Fix: restore those settings or retrain the zoo.")
    layout, init_state = initial_lora_state(cfg.model.spec, lora, cache_dir=cfg.model.cache_dir)
    if diff := compare_layouts(layout, zoo.layout):
        raise ZooInputError(f"the zoo at {zoo.root} does not fit model.spec={cfg.model.spec!r} with "
                            f"these zoo settings: {diff}. Fix: retrain the zoo.")
    conditions = load_task_conditions(cfg, sorted(zoo.vectors), load_conditions=load_conditions)
    return GeneratorInputs(zoo, conditions, condition_spec_of(cfg), init_state)


def load_both_means(cfg: PipelineConfig, tasks: Sequence[str]) -> dict[str, np.ndarray]:
    """Task -> (D,) mean of its 'both' episode vectors at the generator's layer and pooling: what
    evaluation and requests condition on ({} when the stage computed no 'both' mode). Read only
    by model selection, for its validation tasks."""
    from icm.task_vectors import TaskVectorInputError

    g = cfg.generator
    try:
        episodes = _task_vector_loader(
            cfg.storage.path("task_vectors"), mode="both", layer=g.condition_layer,
            pooling=g.condition_pooling, tasks=sorted(tasks))
    except TaskVectorInputError:
        return {}
    return {t: np.asarray(v, dtype=np.float32).reshape(-1, v.shape[-1]).mean(0) for t, v in episodes.items()}


def load_task_conditions(cfg: PipelineConfig, tasks: Sequence[str], *,
                         load_conditions: Callable[..., Mapping[str, Any]] | None = None
                         ) -> dict[str, np.ndarray]:
    """Task -> (E x modes, D) episode vectors of ``cfg.generator``'s modes, layer and pooling
    (tasks without vectors are left out)."""
    g = cfg.generator
    per_mode = [(load_conditions or _task_vector_loader)(
        cfg.storage.path("task_vectors"), mode=mode, layer=g.condition_layer,
        pooling=g.condition_pooling, tasks=sorted(tasks)) for mode in g.condition_modes]
    # Every episode of every mode is one more context of the same task: (E x modes, D) per task.
    return {t: np.concatenate([np.asarray(m[t], dtype=np.float32).reshape(-1, m[t].shape[-1])
                               for m in per_mode if t in m])
            for t in tasks if any(t in m for m in per_mode)}
