"""Per-task means, cluster metrics and the PCA picture of a finished ``task_vectors`` stage.

The paper's claim that task vectors of different categories form distinct clusters is measured
here, per (mode, layer, pooling), on the per-task mean vectors:

* ``silhouette``: silhouette score of the suite's groups (cosine distance), all tasks;
  ``silhouette_episodes`` is the same over every episode vector (not in mode "description",
  whose episodes all hold the same prompt).
* ``heldout_nearest_same_group``: the share of held-out tasks whose nearest *training* task
  (cosine similarity of means) is in their own group: can a new task be placed by its vector?

Vectors are centred on the mean of the training tasks first: LM hidden states share one large
common direction (anisotropy) that otherwise makes every cosine close to 1.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from icm.task_vectors import MEANS_FILE, load_episode_vectors

KEY_COLUMNS = ["task", "group", "heldout", "mode", "layer", "pooling"]


def compute_task_means(vectors_dir: str | Path, *, batch_rows: int = 4096) -> pd.DataFrame:
    """Mean vector per (task, mode, layer, pooling), streamed over the vectors parquet in
    ``batch_rows`` batches so memory stays flat whatever the suite size."""
    import pyarrow.dataset as pds

    dataset = pds.dataset(Path(vectors_dir), format="parquet")
    sums: dict[tuple, np.ndarray] = {}
    counts: dict[tuple, int] = {}
    for batch in dataset.to_batches(columns=[*KEY_COLUMNS, "vector"], batch_size=batch_rows):
        if batch.num_rows == 0:
            continue
        vectors = batch.column("vector").to_numpy(zero_copy_only=False)  # (n,) rows; D per pooling
        keys = batch.select(KEY_COLUMNS).to_pandas()
        for key, index in keys.groupby(KEY_COLUMNS, sort=False).indices.items():
            block = np.stack(vectors[index]).astype(np.float64)  # (rows of key, D)
            sums[key] = sums.get(key, 0.0) + block.sum(0)
            counts[key] = counts.get(key, 0) + len(index)
    rows = [{**dict(zip(KEY_COLUMNS, key)), "episodes": counts[key],
             "vector": (total / counts[key]).astype(np.float32)} for key, total in sums.items()]
    frame = pd.DataFrame(rows, columns=[*KEY_COLUMNS, "episodes", "vector"])
    return frame.sort_values(["mode", "layer", "pooling", "task"]).reset_index(drop=True)


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def _silhouette(points: np.ndarray, labels: Sequence[str]) -> float | None:
    from sklearn.metrics import silhouette_score

    n_labels = len(set(labels))
    if not 2 <= n_labels <= len(points) - 1:
        return None  # undefined for one group or one point per group
    return float(silhouette_score(points, list(labels), metric="cosine"))


def nearest_training_tasks(means: pd.DataFrame, centre: np.ndarray) -> dict[str, str]:
    """Held-out task -> its nearest training task by cosine similarity of centred means."""
    train, heldout = means[~means["heldout"]], means[means["heldout"]]
    if train.empty or heldout.empty:
        return {}
    train_unit = _unit(np.stack(train["vector"].to_list()) - centre)  # (T, D)
    held_unit = _unit(np.stack(heldout["vector"].to_list()) - centre)  # (H, D)
    nearest = (held_unit @ train_unit.T).argmax(1)  # (H,)
    return dict(zip(heldout["task"], train["task"].iloc[nearest]))


def combo_metrics(means: pd.DataFrame, episodes: dict[str, np.ndarray] | None = None) -> dict:
    """Cluster metrics of one (mode, layer, pooling): ``means`` holds one row per task."""
    train = means[~means["heldout"]]
    matrix = np.stack(means["vector"].to_list()).astype(np.float64)  # (N, D)
    centre = np.stack(train["vector"].to_list()).mean(0) if len(train) else matrix.mean(0)  # (D,)
    group_of = dict(zip(means["task"], means["group"]))
    nearest = nearest_training_tasks(means, centre)
    same = [group_of[h] == group_of[t] for h, t in nearest.items()]
    result = {"tasks": len(means), "groups": int(means["group"].nunique()),
              "silhouette": _silhouette(matrix - centre, means["group"].to_list()),
              "heldout_tasks": len(nearest),
              "heldout_nearest_same_group": float(np.mean(same)) if same else None,
              "nearest_training_task": nearest}
    if episodes:
        tasks = [t for t in means["task"] if t in episodes]
        points = np.concatenate([episodes[t] for t in tasks]) - centre  # (sum E, D)
        labels = [group_of[t] for t in tasks for _ in range(len(episodes[t]))]
        result["silhouette_episodes"] = _silhouette(points, labels)
    return result


def stage_metrics(stage_dir: str | Path) -> list[dict]:
    """`combo_metrics` for every (mode, layer, pooling) of a stage with its means written."""
    means = pd.read_parquet(Path(stage_dir) / MEANS_FILE)
    rows = []
    for (mode, layer, pooling), combo in means.groupby(["mode", "layer", "pooling"], sort=True):
        # Mode "description" repeats one prompt per task: its episode "clusters" are points.
        episodes = None if mode == "description" else load_episode_vectors(
            stage_dir, mode=mode, layer=int(layer), pooling=pooling)
        metrics = combo_metrics(combo.sort_values("task"), episodes)
        rows.append({"mode": mode, "layer": int(layer), "pooling": pooling,
                     "silhouette_episodes": None, **metrics})
    return rows


def metrics_table(rows: Sequence[dict]) -> str:
    """The metrics as a Markdown table (mode, layer, pooling, silhouettes, nearest-group share)."""
    from tabulate import tabulate

    def number(value) -> str:
        return "-" if value is None else f"{value:.3f}"

    def share(row) -> str:
        value, n = row["heldout_nearest_same_group"], row["heldout_tasks"]
        return "-" if value is None else f"{value:.2f} ({round(value * n)}/{n})"

    table = [(r["mode"], r["layer"], r["pooling"], number(r["silhouette"]),
              number(r.get("silhouette_episodes")), share(r)) for r in rows]
    return tabulate(table, headers=("mode", "layer", "pooling", "silhouette (tasks)",
                                    "silhouette (episodes)", "held-out NN in own group"),
                    tablefmt="github", disable_numparse=True)


def plot_projection(stage_dir: str | Path, rows: Sequence[dict], out_path: str | Path) -> Path:
    """PCA 2-D projection per (mode, layer, pooling): episode vectors as dots, task means as big
    markers coloured by group, held-out tasks as black-edged stars."""
    from matplotlib import colormaps
    from matplotlib.figure import Figure  # no pyplot: no global backend, no open figures
    from matplotlib.lines import Line2D
    from sklearn.decomposition import PCA

    means = pd.read_parquet(Path(stage_dir) / MEANS_FILE)
    combos = sorted({(r["layer"], r["pooling"]) for r in rows})
    modes = [m for m in ("description", "demos", "both") if any(r["mode"] == m for r in rows)]
    groups = sorted(means["group"].unique())
    colour = {g: colormaps["tab10"](i % 10) for i, g in enumerate(groups)}
    fig = Figure(figsize=(4.2 * len(combos), 3.8 * len(modes)))
    axes = fig.subplots(len(modes), len(combos), squeeze=False)
    for row in rows:
        ax = axes[modes.index(row["mode"])][combos.index((row["layer"], row["pooling"]))]
        combo = means[(means["mode"] == row["mode"]) & (means["layer"] == row["layer"])
                      & (means["pooling"] == row["pooling"])].sort_values("task")
        _draw_panel(ax, combo, stage_dir, row, colour, PCA)
    handles = [Line2D([], [], marker="o", ls="", color=colour[g], label=g) for g in groups]
    handles.append(Line2D([], [], marker="*", ls="", color="grey", mec="black", ms=12,
                          label="held out"))
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), frameon=False)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    import io

    from icm.io import write_bytes_atomic

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    return write_bytes_atomic(out_path, buffer.getvalue())


def _draw_panel(ax, combo: pd.DataFrame, stage_dir, row: dict, colour: dict, pca_class) -> None:
    matrix = np.stack(combo["vector"].to_list())  # (N, D)
    pca = pca_class(n_components=min(2, len(matrix))).fit(matrix)
    episodes = load_episode_vectors(stage_dir, mode=row["mode"], layer=row["layer"],
                                    pooling=row["pooling"])
    columns = combo[["task", "group", "heldout", "vector"]]
    for task, group, heldout, vector in columns.itertuples(index=False):
        dots = pca.transform(episodes[task])  # (E, 2)
        ax.scatter(dots[:, 0], dots[:, -1], s=6, alpha=0.25, color=colour[group], linewidths=0)
        centre = pca.transform(vector[None])[0]
        ax.scatter(centre[0], centre[-1], s=160 if heldout else 50, marker="*" if heldout else "o",
                   color=colour[group], edgecolors="black" if heldout else "none", zorder=3)
    fmt = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
    ax.set_title(f"{row['mode']} | layer {row['layer']} | {row['pooling']}\n"
                 f"silhouette {fmt(row['silhouette'])}  held-out NN same group "
                 f"{fmt(row['heldout_nearest_same_group'])}", fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])


def write_metrics(rows: Sequence[dict], path: str | Path) -> Path:
    """metrics.json: one entry per (mode, layer, pooling), plus the Markdown table."""
    from icm.io import write_json_atomic

    return write_json_atomic(path, {"metrics": list(rows), "table": metrics_table(rows),
                                    "centring": "mean of training-task means",
                                    "distance": "cosine"})

