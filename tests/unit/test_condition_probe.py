"""The condition probe: on a real zoo (tiny-llama, peft files, manifest) and a task_vectors
stage's parquet files, a layer whose vectors determine the LoRA ranks above one of noise, and
held-out tasks are never read."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from icm.condition_probe import logo_ridge_errors, probe, training_groups, within_group_identification
from icm.task_vectors import MEANS_FILE, VECTORS_DIR
from tests.unit.test_generator import write_zoo

TASKS = [f"{group}-{i}" for group in ("a", "b", "c", "d") for i in range(4)]
INFORMATIVE, NOISE = 5, -1  # hidden-state indices of the fake stage


def write_stage(root, episodes: dict[str, dict[int, np.ndarray]], heldout: set[str]) -> None:
    """A task_vectors stage's two parquet files: task -> layer -> (E, D) episode vectors."""
    (root / VECTORS_DIR).mkdir(parents=True)
    rows, means = [], []
    for task, by_layer in episodes.items():
        common = {"task": task, "group": task.split("-")[0], "heldout": task in heldout,
                  "mode": "both", "pooling": "mean"}
        for layer, vectors in by_layer.items():
            rows += [{**common, "episode": e, "layer": layer, "vector": v.tolist()}
                     for e, v in enumerate(vectors)]
            means.append({**common, "layer": layer, "episodes": len(vectors),
                          "vector": vectors.mean(axis=0).tolist()})
    pd.DataFrame(rows).to_parquet(root / VECTORS_DIR / "part-0.parquet")
    pd.DataFrame(means).to_parquet(root / MEANS_FILE)


@pytest.fixture(scope="module")
def stage(tmp_path_factory):
    base = tmp_path_factory.mktemp("probe")
    # LoRA = init + W @ centre: the informative layer's episodes are centre + noise (3 dims, so
    # the 8 tasks of an inner fit span the map); the noise layer's are unrelated to the LoRA.
    conditions = write_zoo(base / "zoo", TASKS, dim=3, episodes=4)
    rng = np.random.default_rng(0)
    episodes = {t: {INFORMATIVE: c, NOISE: rng.normal(size=c.shape)} for t, c in conditions.items()}
    # A held-out task with no zoo LoRA: reading it would fail
    episodes["c-heldout"] = {layer: rng.normal(size=(4, 3)) for layer in (INFORMATIVE, NOISE)}
    write_stage(base / "tv", episodes, heldout={"c-heldout"})
    return base


def test_a_layer_that_determines_the_lora_ranks_above_noise(stage):
    groups = training_groups(stage / "tv")
    assert sorted(groups) == TASKS  # the held-out task is left out; the multitask LoRA is no task
    rows = probe(stage / "tv", stage / "zoo", sorted(groups), groups, layers=[INFORMATIVE, NOISE])
    informative, noise = rows
    assert (informative["tasks"], informative["groups"]) == (16, 4)
    assert informative["logo_error_mean"] < 0.2  # predicts a group it never saw
    assert noise["logo_error_mean"] > 0.9  # no better than the other groups' mean
    assert informative["within_group_id"] == 1.0 and informative["episodes_scored"] == 64
    assert noise["within_group_id"] < 0.75


def test_logo_error_is_one_for_a_constant_condition_and_needs_three_groups():
    rng = np.random.default_rng(1)
    import torch

    y = torch.tensor(rng.normal(size=(16, 50)))
    labels = [t.split("-")[0] for t in TASKS]
    errors = logo_ridge_errors(np.ones((16, 3)), y, labels)  # the prediction is the fit mean
    assert np.allclose(errors, 1.0)
    with pytest.raises(ValueError, match=">= 3 groups"):
        logo_ridge_errors(np.ones((8, 3)), y[:8], labels[:8])


def test_identification_skips_tasks_alone_in_their_group():
    episodes = {"a-0": np.eye(3)[:2] + 1, "a-1": -np.eye(3)[:2], "b-0": np.ones((2, 3))}
    share, scored = within_group_identification(episodes, {t: t[0] for t in episodes})
    assert (share, scored) == (1.0, 4)  # b-0 has no sibling: its 2 episodes are not scored


def test_the_cli_writes_the_table_and_a_wrong_folder_is_one_line(stage, tmp_path, capsys):
    from jobs.cli import main

    out = tmp_path / "probe.md"
    assert main(["condition-probe", "--task-vectors", str(stage / "tv"), "--zoo", str(stage / "zoo"),
                 "--layers", str(INFORMATIVE), str(NOISE), "--out", str(out)]) == 0
    table = out.read_text()
    assert "16 training tasks in 4 groups" in table and "logo_error_mean" in table
    assert len([line for line in table.splitlines() if line.startswith("| both")]) == 2
    capsys.readouterr()
    assert main(["condition-probe", "--task-vectors", str(stage / "zoo"), "--zoo", str(stage / "zoo")]) == 2
    assert "no task_means.parquet there" in capsys.readouterr().err
    assert main(["condition-probe", "--task-vectors", str(stage / "tv"), "--zoo", str(tmp_path)]) == 2
    assert "no final LoRA for training task(s)" in capsys.readouterr().err
