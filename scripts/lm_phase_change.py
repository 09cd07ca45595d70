"""What an LM phase changed in a generator's adapters: shared by every task, or task-specific.

    python scripts/lm_phase_change.py ROOT START GENERATOR [GENERATOR ...]
    python scripts/lm_phase_change.py icm-runs/core-s41 \
        icm-runs/core-s41/generator-reconstruction \
        icm-runs/core-s41-D/generator icm-runs/core-s41/generator

For the held-out and the training tasks of run ROOT (its config and task vectors), each
generator's z = 0 adapter from the task's mean "both" vector, minus START's (the reconstruction
start the LM phases shared): the norm of the change's mean over tasks (shared), the mean norm of
each task's deviation from it (task-specific), and, between the first two generators, the mean
cosine of their task-specific changes (1: the same condition-dependent change learnt). First,
how far one episode's condition lies from its task's other episodes (what
generator.lm_condition_episodes=others changes) against the distance between tasks.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import yaml

from icm.config import PipelineConfig
from icm.generator import LoraGenerator
from icm.generator.inputs import load_task_conditions
from icm.generator.lm import other_episodes_mean
from icm.task_vectors import load_task_means


def both_means(cfg: PipelineConfig, tasks: list[str]) -> torch.Tensor:
    """(T, D) each task's mean 'both' vector, the condition evaluation reads."""
    g = cfg.generator
    means = load_task_means(cfg.storage.path("task_vectors"), mode="both", layer=g.condition_layer,
                            pooling=g.condition_pooling, tasks=tasks)
    return torch.as_tensor(np.stack([means[t] for t in tasks]))


def episode_spread(cfg: PipelineConfig, generator: LoraGenerator, tasks: list[str]) -> str:
    """In the generator's z-scored condition space: how far one 'both' episode lies from the
    mean of its task's other episodes, against how far the nearest other task's mean lies."""
    both = cfg.model_copy(update={"generator": cfg.generator.model_copy(
        update={"condition_modes": ["both"]})})
    vectors = load_task_conditions(both, tasks)
    episodes = [generator.condition_norm.apply(torch.as_tensor(vectors[t])) for t in tasks]
    others = [other_episodes_mean(e, 1, t) for e, t in zip(episodes, tasks)]  # (E, D) each
    spread = np.mean([float((e - o).norm(dim=1).mean()) for e, o in zip(episodes, others)])
    centres = torch.stack([e.mean(0) for e in episodes])  # (T, D)
    apart = torch.cdist(centres, centres) + torch.diag(torch.full((len(tasks),), float("inf")))
    return (f"an episode to its task's other episodes' mean {spread:.2f}; a task's mean to the "
            f"nearest other task's {float(apart.min(1).values.mean()):.2f}")


def main(root: str, start: str, *generators: str) -> None:
    cfg = PipelineConfig.model_validate(
        yaml.safe_load((Path(root) / "generator" / "config.resolved.yaml").read_text()))
    held = sorted(set(pd.read_parquet(Path(root) / "evaluate" / "results.parquet")["task"]))
    loaded = {path: LoraGenerator.load(path) for path in (start, *generators)}
    training = loaded[generators[0]].summary["trained_on"]["tasks"]
    print("condition space, training tasks:", episode_spread(cfg, loaded[start], training))
    for name, tasks in (("held-out", held), ("training", training)):
        conditions = both_means(cfg, tasks)  # (T, D)
        start_adapters = loaded[start].sample(conditions, z="zero")  # (T, L)
        spread = (start_adapters - start_adapters.mean(0)).norm(dim=1).mean()
        specific = {}
        for path in generators:
            change = loaded[path].sample(conditions, z="zero") - start_adapters  # (T, L)
            shared = change.mean(0)  # (L,)
            specific[path] = change - shared  # (T, L)
            print(f"{name} {path}: shared change {float(shared.norm()):.3f}, task-specific "
                  f"{float(specific[path].norm(dim=1).mean()):.3f} (start's task deviation "
                  f"{float(spread):.3f})")
        if len(generators) > 1:
            first, second = (specific[p] for p in generators[:2])
            cosine = torch.nn.functional.cosine_similarity(first, second, dim=1).mean()
            print(f"{name}: cosine of the first two generators' task-specific changes "
                  f"{float(cosine):.3f}")


if __name__ == "__main__":
    if len(sys.argv) < 4:
        sys.exit(__doc__)
    main(*sys.argv[1:])
