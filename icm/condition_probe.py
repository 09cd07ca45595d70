"""How much of a task's LoRA its condition vector carries, per hidden-state layer: a probe of
condition quality read on training tasks only, before a generator is trained on a layer.

A generator trained for ~30 minutes per condition is the real test; this is the minute-long one
that says which conditions deserve it. Per (mode, layer, pooling) of a finished task_vectors
stage, over the zoo's final LoRAs of the *training* tasks (held-out tasks are never read):

* ``logo_error``: ridge regression from task mean vector to the task's LoRA, scored leave one
  whole group out (alpha chosen inside the remaining groups, again by leaving groups out), as a
  squared error relative to the other groups' mean LoRA: 1.0 = the condition adds nothing over
  averaging the zoo, lower = it predicts the adapter of a group it never saw. The LoRA's
  coordinates are standardised over the fitting tasks first, so no one tensor's scale decides.
  Reported as the mean and median over tasks.
* ``within_group_id``: the share of episode vectors whose nearest task mean (cosine, vectors
  centred on the training tasks' mean; the episode's own task's mean recomputed without it) among
  its own group's tasks is its own task: does the vector tell siblings apart, stably across
  demonstrations? (Groups with one training task are skipped; chance is 1 / group size.)

Its limit, measured on the 117-task study (EVAL.md, session 34): ``logo_error`` read 0.986-0.988
at every hidden state probed, as the eval's fold ridge does in raw weight space, while the
generator does transfer across groups in perplexity. Where every condition sits near 1 the
weight-space measure cannot rank them; ``within_group_id`` still separates them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from icm.errors import InputError
from icm.eval.baselines import RidgeMap
from icm.eval.inputs import final_snapshots, load_finals
from icm.task_vectors import MEANS_FILE, load_episode_vectors, load_task_means


def training_groups(task_vectors_dir: str | Path) -> dict[str, str]:
    """Training task -> group, from a finished stage's task means (held-out tasks left out)."""
    import pandas as pd

    path = Path(task_vectors_dir) / MEANS_FILE
    if not path.is_file():
        raise InputError(f"--task-vectors {task_vectors_dir}: no {MEANS_FILE} there. Fix: pass a "
                         "finished task_vectors stage folder (<storage.root>/task_vectors).")
    frame = pd.read_parquet(path, columns=["task", "group", "heldout"])
    training = frame[~frame["heldout"].astype(bool)]
    return dict(zip(training["task"], training["group"]))


def logo_ridge_errors(x: np.ndarray, y: torch.Tensor, groups: Sequence[str]) -> np.ndarray:
    """Per-task relative squared error of nested leave-one-group-out ridge, (T,).

    x: (T, D) task vectors; y: (T, L) flat LoRA vectors; groups: T labels, >= 3 distinct (the
    inner alpha search leaves groups out of the remaining >= 2)."""
    labels = np.asarray(groups)
    if len(set(labels)) < 3:
        raise ValueError(f"leave-one-group-out needs >= 3 groups, got {sorted(set(labels))}")
    y = y.double()  # (T, L)
    errors = np.empty(len(labels))
    for group in sorted(set(labels)):
        out = labels == group  # (T,) the group scored
        fit_y = y[~out]  # (T_in, L)
        mean, std = fit_y.mean(dim=0), fit_y.std(dim=0)  # (L,) each
        std = torch.where(std > 0, std, torch.ones_like(std))
        ridge = RidgeMap().fit(x[~out], (fit_y - mean) / std, groups=list(labels[~out]))
        predicted = ridge.predict(x[out])  # (T_out, L), standardised
        target = (y[out] - mean) / std  # (T_out, L); the fit tasks' mean sits at 0
        errors[out] = (((predicted - target) ** 2).sum(dim=1) / (target ** 2).sum(dim=1)).numpy()
    return errors


def within_group_identification(episodes: Mapping[str, np.ndarray], groups: Mapping[str, str]
                                ) -> tuple[float, int]:
    """(share of episodes identified as their own task among their group's, episodes scored).

    episodes: task -> (E, D) episode vectors; groups: task -> group."""
    centre = np.mean([vectors.mean(axis=0) for vectors in episodes.values()], axis=0)  # (D,)
    centred = {task: vectors - centre for task, vectors in episodes.items()}
    means = {task: vectors.mean(axis=0) for task, vectors in centred.items()}  # task -> (D,)
    hits = scored = 0
    for task, vectors in centred.items():
        siblings = [t for t in sorted(centred) if groups[t] == groups[task] and t != task]
        if not siblings or len(vectors) < 2:
            continue
        for index, episode in enumerate(vectors):
            own = np.delete(vectors, index, axis=0).mean(axis=0)  # (D,) without this episode
            candidates = np.stack([own, *(means[s] for s in siblings)])  # (1 + S, D)
            similarity = candidates @ episode / (np.linalg.norm(candidates, axis=1)
                                                 * np.linalg.norm(episode) + 1e-12)
            hits += int(np.argmax(similarity) == 0)
            scored += 1
    return (hits / scored if scored else float("nan")), scored


def probe(task_vectors_dir: str | Path, zoo_root: str | Path, training: Sequence[str],
          groups: Mapping[str, str], *, layers: Sequence[int], mode: str = "both",
          pooling: str = "mean") -> list[dict]:
    """One row per layer: logo_error (mean, median over tasks) and within_group_id."""
    finals = final_snapshots(Path(zoo_root))
    names = sorted(training)
    missing = sorted(set(names) - set(finals))
    if missing:
        raise InputError(f"--zoo {zoo_root}: no final LoRA for training task(s) {missing[:5]}. "
                         "Fix: pass the zoo stage folder (<storage.root>/zoo) of the run whose "
                         "task vectors these are.")
    labels = [groups[t] for t in names]
    if len(set(labels)) < 3:
        raise InputError(f"the training tasks form {len(set(labels))} group(s); leaving one group "
                         "out needs >= 3. Fix: probe a suite with three or more training groups.")
    y = torch.stack(list(load_finals(finals, names).values()))  # (T, L)
    rows = []
    for layer in layers:
        means = load_task_means(task_vectors_dir, mode=mode, layer=layer, pooling=pooling, tasks=names)
        x = np.stack([means[t] for t in names]).astype(np.float64)  # (T, D)
        errors = logo_ridge_errors(x, y, labels)
        episodes = load_episode_vectors(task_vectors_dir, mode=mode, layer=layer, pooling=pooling,
                                        tasks=names)
        identified, scored = within_group_identification(episodes, groups)
        rows.append({"mode": mode, "layer": layer, "pooling": pooling, "tasks": len(names),
                     "groups": len(set(labels)), "logo_error_mean": float(errors.mean()),
                     "logo_error_median": float(np.median(errors)),
                     "within_group_id": identified, "episodes_scored": scored})
    return rows


def probe_table(rows: Sequence[dict]) -> str:
    """The probe's rows as a markdown table."""
    import pandas as pd

    frame = pd.DataFrame(rows)
    return frame.to_markdown(index=False, floatfmt=".3f")
