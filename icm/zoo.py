"""The LoRA zoo on disk: per-task snapshot directories, the manifest, the zoo's identity.

    <zoo>/zoo.json                         base model, LoRA config, init seed, layout fingerprint
    <zoo>/lora_layout.json                 key order and shapes of every flat vector
    <zoo>/manifest.parquet                 one row per snapshot (rebuilt from the files below)
    <zoo>/tasks/<task>/snapshots/step-000120/
        adapter_config.json, adapter_model.safetensors   a peft adapter
        vector.safetensors                               {"vector": (numel,) float32}
        snapshot.json                                    task, step, losses, eval ppl, sha256s, node
    <zoo>/tasks/<task>/task.json           written when the task finished (its summary row)

Every file is written atomically and a snapshot directory appears whole or not at all, so the
manifest rebuilt from the directories can neither lose nor duplicate a snapshot.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from icm.adapters import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from icm.errors import InputError
from icm.io import (atomic_directory, fingerprint_matches, sha256_file, sha256_json, write_bytes_atomic,
                    write_json_atomic)
from icm.lora_io import LoraLayout, adapter_state_dict, flatten, peft_config_json
from icm.tasks import SPLIT_FILES

ZOO_FILE = "zoo.json"
LAYOUT_FILE = "lora_layout.json"
MANIFEST_FILE = "manifest.parquet"
SNAPSHOT_FILE = "snapshot.json"
TASK_DONE_FILE = "task.json"
SNAPSHOT_INDEX_FILE = "snapshots.json"  # a finished task's snapshot records, read by the manifest
VECTOR_FILE = "vector.safetensors"
MULTITASK = "multitask"  # the multi-task LoRA baseline's "task" name
REPLICATE_PREFIX = "replicate-of-"  # an independent replicate LoRA of a seen task (oracles stage)
# Settings that only schedule the work: a resumed or enlarged run may change them freely.
SCHEDULING_KNOBS = frozenset({"max_concurrent", "cpus_per_worker", "tasks_per_trainer", "multitask",
                              "multitask_steps", "checkpoint_interval_s"})


@dataclass(frozen=True)
class LoraJob:
    """One LoRA to train: a name, the task folders whose train texts it reads, and the zoo
    settings it changes (steps of the compute-matched multi-task LoRA, another data seed for a
    replicate, fewer snapshots for an oracle). ``fingerprint`` covers the texts and every
    setting that changes the weights, so a finished LoRA is reused by any later run that asks
    for the same one (adding tasks to a suite retrains nothing that is done)."""

    name: str
    paths: tuple[str, ...]
    overrides: tuple[tuple[str, Any], ...] = ()
    fingerprint: str = ""

    def zoo_config(self, zoo):
        """This job's copy of the zoo config (``zoo``: a ``ZooConfig``)."""
        return zoo.model_copy(update=dict(self.overrides)) if self.overrides else zoo

    def cost(self, zoo) -> int:
        """Optimizer steps: what the trainers are balanced by."""
        return self.zoo_config(zoo).steps

    def as_list(self) -> list:
        """Plain data for Ray: [name, paths, overrides, fingerprint]."""
        return [self.name, list(self.paths), [list(kv) for kv in self.overrides], self.fingerprint]

    @classmethod
    def from_list(cls, data: list) -> LoraJob:
        name, paths, overrides, fingerprint = data
        return cls(name, tuple(paths), tuple((k, v) for k, v in overrides), fingerprint)


def lora_job(name: str, tasks, zoo, model_spec: str, **overrides: Any) -> LoraJob:
    """A `LoraJob` over ``tasks`` (loaded `Task`s), fingerprinted by their files, the model and
    the zoo settings that change weights (``zoo``: the run's ``ZooConfig``)."""
    trained = {k: v for k, v in zoo.model_dump(mode="json").items() if k not in SCHEDULING_KNOBS}
    trained.update(overrides)
    # Only the train texts shape the weights (a task's description or eval split may change
    # without making its LoRA stale).
    fingerprint = sha256_json({"model": model_spec, "zoo": trained,
                               "texts": [sha256_file(Path(task.path) / SPLIT_FILES["train"])
                                         for task in tasks]})
    return LoraJob(name, tuple(str(task.path) for task in tasks), tuple(sorted(overrides.items())),
                   fingerprint)


def zoo_jobs(suite, zoo, model_spec: str) -> list[LoraJob]:
    """The zoo's LoRAs: one per training task, plus the multi-task LoRA over all of them
    (``zoo.multitask_steps``: 'one-task' = one task's steps; 'matched' = the zoo's total,
    tasks x steps, so the baseline gets the compute the zoo got). Held-out tasks never enter."""
    training = suite.training_tasks()
    loras = [lora_job(task.name, [task], zoo, model_spec) for task in training]
    if zoo.multitask:
        loras.append(lora_job(MULTITASK, training, zoo, model_spec,
                              steps=multitask_steps(zoo, len(training))))
    return loras


def fold_multitask_name(fold: int) -> str:
    """The oracles stage's multi-task LoRA of group fold ``fold`` (``oracles.fold_multitask``)."""
    return f"{MULTITASK}-fold{fold}"


def multitask_steps(zoo, tasks: int) -> int:
    """A multi-task LoRA's steps over ``tasks`` training tasks (``zoo.multitask_steps``)."""
    return zoo.steps * tasks if zoo.multitask_steps == "matched" else zoo.steps


def oracle_jobs(suite, zoo, oracles, model_spec: str,
                folds: Sequence[Sequence[str]] = ()) -> list[LoraJob]:
    """Measurement-only LoRAs, trained with the zoo's own settings into their own folder:
    an oracle per held-out task, independent replicates (another data seed) of
    ``oracles.replicates`` seen tasks spread over the groups (replicate vs trained = noise floor),
    and with ``oracles.fold_multitask`` a multi-task LoRA per group fold (``folds``: its held-out
    groups) over the training tasks outside that fold."""
    loras = []
    if oracles.fold_multitask:
        for index, groups in enumerate(folds):
            training = [task for task in suite.training_tasks() if task.group not in set(groups)]
            loras.append(lora_job(fold_multitask_name(index), training, zoo, model_spec,
                                  steps=multitask_steps(zoo, len(training)),
                                  snapshots=oracles.snapshots))
    if oracles.heldout:
        loras += [lora_job(task.name, [task], zoo, model_spec, snapshots=oracles.snapshots)
                  for task in suite.heldout_tasks()]
    for task in replicate_tasks(suite, oracles.replicates):
        loras.append(lora_job(REPLICATE_PREFIX + task.name, [task], zoo, model_spec,
                              snapshots=oracles.snapshots, data_seed=zoo.data_seed + 1))
    return loras


def replicate_tasks(suite, count: int) -> list:
    """``count`` seen tasks dealt round-robin over the groups (name order inside each), so the
    noise floor is not one group's."""
    by_group: dict[str, list] = {}
    for task in sorted(suite.training_tasks(), key=lambda t: (t.group, t.name)):
        by_group.setdefault(task.group, []).append(task)
    chosen, rank = [], 0
    while len(chosen) < count and any(rank < len(v) for v in by_group.values()):
        chosen += [tasks[rank] for tasks in by_group.values() if rank < len(tasks)]
        rank += 1
    return chosen[:count]


class ZooMismatchError(InputError):
    """An existing zoo was made with another base model or LoRA setup; names the field."""


def task_dir(zoo_root: Path, task: str) -> Path:
    return Path(zoo_root) / "tasks" / task


def task_finished(zoo_root: Path, task: str, fingerprint: str) -> bool:
    """Whether ``task``'s LoRA was finished with this job ``fingerprint`` (`LoraJob`)."""
    path = task_dir(zoo_root, task) / TASK_DONE_FILE
    return fingerprint_matches(path, fingerprint)


def snapshot_dir(zoo_root: Path, task: str, step: int) -> Path:
    return task_dir(zoo_root, task) / "snapshots" / f"step-{step:06d}"


def write_snapshot(peft_model, layout: LoraLayout, zoo_root: Path, *, task: str, step: int,
                   record: dict[str, Any]) -> dict[str, Any]:
    """Save one snapshot (peft adapter + flat vector + its record) atomically; returns the record."""
    from safetensors.torch import save_file

    state = adapter_state_dict(peft_model)
    vector = flatten(state, layout)  # (numel,)
    out = snapshot_dir(zoo_root, task, step)
    with atomic_directory(out) as staging:
        save_file({k: v.contiguous() for k, v in state.items()}, str(staging / ADAPTER_WEIGHTS),
                  metadata={"format": "pt"})
        write_json_atomic(staging / ADAPTER_CONFIG, peft_config_json(peft_model.peft_config["default"]))
        save_file({"vector": vector.contiguous()}, str(staging / VECTOR_FILE),
                  metadata={"layout_fingerprint": layout.fingerprint()})
        full = {**record, "task": task, "step": step, "path": str(out),
                "adapter_sha256": sha256_file(staging / ADAPTER_WEIGHTS),
                "vector_sha256": sha256_file(staging / VECTOR_FILE),
                "layout_fingerprint": layout.fingerprint(), "written": time.time()}
        write_json_atomic(staging / SNAPSHOT_FILE, full)
    return full


def load_vector(snapshot: str | Path) -> torch.Tensor:
    from safetensors.torch import load_file

    return load_file(str(Path(snapshot) / VECTOR_FILE))["vector"]


def lora_format(zoo_root: str | Path) -> tuple[dict[str, Any], LoraLayout]:
    """The zoo's peft adapter config and flat layout: what loading any of its vectors into a
    peft model takes (every snapshot of a zoo shares both)."""
    root = Path(zoo_root)
    config = next(root.glob(f"tasks/*/snapshots/*/{ADAPTER_CONFIG}"), None)
    if config is None or not (root / LAYOUT_FILE).is_file():
        raise InputError(f"no LoRA zoo at {root} (no {LAYOUT_FILE} or no snapshot with an "
                         f"{ADAPTER_CONFIG}). Fix: run the zoo stage with the same storage.root.")
    return json.loads(config.read_text()), LoraLayout.load(root / LAYOUT_FILE)


def task_snapshot_records(zoo_root: Path, task: str) -> list[dict[str, Any]]:
    """One task's snapshot records from its ``snapshot.json`` files, by step. ``path`` is where
    each was found: a snapshot written on another node (or pulled from a URI root) lives here."""
    folder = task_dir(zoo_root, task) / "snapshots"
    rows = [{**json.loads(p.read_text()), "path": str(p.parent)} for p in folder.glob(f"*/{SNAPSHOT_FILE}")]
    return sorted(rows, key=lambda r: r["step"])


def write_task_index(zoo_root: Path, task: str) -> list[dict[str, Any]]:
    """Record a finished task's snapshots in one file, so that building the manifest reads one
    file per task instead of one per snapshot. Paths are stored relative to the task folder."""
    rows = task_snapshot_records(zoo_root, task)
    base = task_dir(zoo_root, task)
    stored = [{**row, "path": str(Path(row["path"]).relative_to(base))} for row in rows]
    write_json_atomic(base / SNAPSHOT_INDEX_FILE, stored)
    return rows


def _indexed_records(zoo_root: Path, task: str) -> list[dict[str, Any]] | None:
    """A task's records from its index, or None when there is none or it does not list exactly
    the snapshot folders on disk (a crash between a snapshot and the index: read the files)."""
    base = task_dir(zoo_root, task)
    index = base / SNAPSHOT_INDEX_FILE
    if not index.is_file():
        return None
    rows = json.loads(index.read_text())
    on_disk = {p.parent.name for p in (base / "snapshots").glob(f"*/{SNAPSHOT_FILE}")}
    if {Path(row["path"]).name for row in rows} != on_disk:
        return None
    return [{**row, "path": str(base / row["path"])} for row in rows]


def snapshot_records(zoo_root: Path) -> list[dict[str, Any]]:
    """Every snapshot's record on disk, ordered by (task, step): a task's index when it is
    current, else its ``snapshot.json`` files."""
    rows = []
    for folder in sorted(Path(zoo_root).glob("tasks/*")):
        records = _indexed_records(zoo_root, folder.name)
        rows += records if records is not None else task_snapshot_records(zoo_root, folder.name)
    return sorted(rows, key=lambda r: (r["task"], r["step"]))


def write_manifest(zoo_root: Path):
    """Rebuild ``manifest.parquet`` from the snapshot directories; returns the DataFrame."""
    import pandas as pd

    columns = ["task", "kind", "snapshot", "step", "train_loss", "eval_ppl", "path",
               "adapter_sha256", "vector_sha256", "node_id"]
    rows = snapshot_records(zoo_root)
    frame = pd.DataFrame(rows, columns=None if rows else columns)
    if rows:
        frame["snapshot"] = frame.groupby("task").cumcount()
        frame["kind"] = ["multitask" if t == MULTITASK else "replicate" if t.startswith(REPLICATE_PREFIX)
                         else "task" for t in frame["task"]]
        frame = frame[columns + [c for c in frame.columns if c not in columns]]
    write_bytes_atomic(Path(zoo_root) / MANIFEST_FILE, frame.to_parquet(index=False))
    return frame


def zoo_identity(model_spec: str, lora: dict[str, Any], layout: LoraLayout) -> dict[str, Any]:
    return {"model_spec": model_spec, "lora": lora, "layout_fingerprint": layout.fingerprint(),
            "numel": layout.numel}


def check_or_create_zoo(zoo_root: Path, identity: dict[str, Any], layout: LoraLayout) -> None:
    """Record the zoo's identity on first use; later runs must match it field by field."""
    path = Path(zoo_root) / ZOO_FILE
    if path.is_file():
        existing = json.loads(path.read_text())
        for field in ("model_spec", "lora", "layout_fingerprint"):
            if existing.get(field) != identity[field]:
                name = {"model_spec": "model.spec", "lora": "zoo (LoRA settings)",
                        "layout_fingerprint": "zoo.rank/zoo.target_modules"}[field]
                raise ZooMismatchError(
                    f"{name}: the zoo at {zoo_root} was built with {existing.get(field)!r}, this "
                    f"run asks for {identity[field]!r}. Fix: use another storage.root, or the "
                    "zoo's original settings.")
        return
    Path(zoo_root).mkdir(parents=True, exist_ok=True)
    layout.save(Path(zoo_root) / LAYOUT_FILE)
    write_json_atomic(path, identity)


def plot_losses(zoo_root: Path, out: Path | None = None) -> Path:
    """PNG of the training-loss curve of every task (from each task's ``losses.json``)."""
    from matplotlib.figure import Figure  # no pyplot: no global backend, no open figures

    out = out or Path(zoo_root) / "losses.png"
    fig = Figure(figsize=(9, 5))
    ax = fig.subplots()
    for path in sorted(Path(zoo_root).glob("tasks/*/losses.json")):
        points = json.loads(path.read_text())
        ax.plot([p[0] for p in points], [p[1] for p in points], label=path.parent.name, linewidth=1)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (nats/token)")
    ax.set_title("LoRA zoo: training loss per task")
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    tmp.replace(out)
    return out
