"""What the evaluation needs from earlier stages, gathered once by the driver.

For every task of the suite: its trained LoRA (seen tasks: the zoo's last snapshot, the oracle),
its task-mean vectors per conditioning mode, the nearest training task, the shuffled-control
partner; plus the model soup and the multi-task LoRA shared by all tasks. Held-out tasks have no
trained LoRA by construction: nothing about them ever entered the zoo.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from icm.baselines import model_soup, nearest_task, shuffled_partner
from icm.zoo import MANIFEST_FILE, MULTITASK, TASK_DONE_FILE, load_vector, task_dir

MODES = ("both", "description", "demos")


@dataclass
class TaskInputs:
    """Everything one task's evaluation worker needs besides the models."""

    task: str
    task_path: str
    heldout: bool
    group: str
    conditions: dict[str, np.ndarray]  # mode -> (D,) task-mean vector
    trained: torch.Tensor | None  # (L,) the task's own last zoo snapshot; None for held-out tasks
    nearest: str  # the nearest training task by task vector (never the task itself)
    nearest_vector: torch.Tensor  # (L,) that task's trained adapter
    shuffled_condition: np.ndarray  # (D,) another task's vector (control)
    finetune_seconds: float | None  # wall time of the task's zoo trainer
    extra: dict[str, Any] = field(default_factory=dict)


def final_snapshots(zoo_root: Path) -> dict[str, Path]:
    """Task -> directory of its last snapshot (highest step), the multi-task LoRA included."""
    manifest = pd.read_parquet(Path(zoo_root) / MANIFEST_FILE)
    last = manifest.sort_values("step").groupby("task").tail(1)
    return {row.task: Path(row.path) for row in last.itertuples()}


def _finetune_seconds(zoo_root: Path, task: str) -> float | None:
    path = task_dir(zoo_root, task) / TASK_DONE_FILE
    return json.loads(path.read_text()).get("wall_seconds") if path.is_file() else None


def gather_inputs(suite, zoo_root: Path, means: Mapping[str, Mapping[str, np.ndarray]]
                  ) -> tuple[list[TaskInputs], dict[str, torch.Tensor]]:
    """Per-task inputs and the shared baseline vectors {"soup", "multitask"}.

    Args:
        suite: the loaded suite (held-out status decides what counts as training).
        zoo_root: the LoRA zoo directory.
        means: mode -> task -> (D,) task-mean vector, for every task of the suite.
    """
    finals = final_snapshots(zoo_root)
    training = [t.name for t in suite.training_tasks() if t.name in finals]
    trained = {name: load_vector(finals[name]) for name in training}
    shared = {"soup": model_soup(trained)}
    if MULTITASK in finals:
        shared["multitask"] = load_vector(finals[MULTITASK])
    both = means["both"]
    rows = []
    for name, task in suite.tasks.items():
        nearest = nearest_task(both[name], {t: both[t] for t in training}, exclude=[name])
        partner = shuffled_partner(name, list(suite.tasks))
        rows.append(TaskInputs(
            task=name, task_path=str(task.path), heldout=suite.is_heldout(name), group=task.group,
            conditions={mode: means[mode][name] for mode in MODES if name in means.get(mode, {})},
            trained=trained.get(name), nearest=nearest, nearest_vector=trained[nearest],
            shuffled_condition=both[partner], finetune_seconds=_finetune_seconds(zoo_root, name),
            extra={"shuffled_partner": partner}))
    return rows, shared


def random_conditions(means: Mapping[str, np.ndarray], count: int, seed: int) -> np.ndarray:
    """``count`` random vectors with the per-dimension mean and std of the training tasks'
    vectors (the random-condition control), (count, D)."""
    stacked = np.stack(list(means.values()))  # (T, D)
    rng = np.random.default_rng(seed)
    return (stacked.mean(0) + stacked.std(0) * rng.standard_normal((count, stacked.shape[1]))
            ).astype(np.float32)
