"""The task-vector job on a real local Ray (Ray Data actors, tiny-llama, CPU)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as pds
import pytest
import ray

from icm.config import load_config
from icm.models import load_base_model
from icm.stages import open_suite
from icm.task_vectors import (TaskEncoder, load_episode_vectors, load_task_means, template_text)
from jobs import task_vectors as job
from tests.conftest import make_suite

KEYS = ["task", "mode", "episode", "layer", "pooling"]
TINY = ["task_vectors.k=3", "task_vectors.episodes=4", "task_vectors.layers=[1,-1]",
        "task_vectors.batch_size=4", "task_vectors.actors=2", "task_vectors.cpus_per_actor=0.5",
        "suite.tasks=null"]


@pytest.fixture(scope="module")
def ray_cluster():
    ray.init(num_cpus=2, num_gpus=0, object_store_memory=200 * 1024**2, include_dashboard=False)
    yield
    ray.shutdown()


def _config(suite: Path, root: Path, *extra: str):
    return load_config("smoke", [f"suite.path={suite}", f"storage.root={root}", *TINY, *extra])


def _vectors(stage_dir: Path) -> pd.DataFrame:
    return pds.dataset(stage_dir / "vectors", format="parquet").to_table().to_pandas()


@pytest.fixture(scope="module")
def first_run(ray_cluster, tmp_path_factory):
    base = tmp_path_factory.mktemp("tv")
    suite_dir = make_suite(base / "suite")
    cfg = _config(suite_dir, base / "run")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(job, "SHARD_ROWS", 24)  # 12 episodes per task: two Ray Data runs of 2 tasks
        record = job.run(cfg, open_suite(cfg))
    return cfg, record, base


@pytest.mark.slow
def test_ray_data_vectors_equal_a_single_process_loop(first_run):
    cfg, _, _ = first_run
    stage_dir = cfg.storage.path("task_vectors")
    episodes = pd.read_parquet(stage_dir / "episodes.parquet")
    encoder = TaskEncoder(*load_base_model("tiny-llama"), cfg.task_vectors)
    expected = {}
    for begin in range(0, len(episodes), cfg.task_vectors.batch_size):  # a plain loop, no Ray
        chunk = episodes.iloc[begin:begin + cfg.task_vectors.batch_size]
        for (layer, pooling), matrix in encoder.encode_prompts(chunk["prompt"].to_list()).items():
            for row, vector in zip(chunk.itertuples(), matrix):
                expected[(row.task, row.mode, row.episode, layer, pooling)] = vector
    got = _vectors(stage_dir)
    assert len(got) == len(expected) == len(episodes) * 2 * 2  # every row exactly once
    assert not got.duplicated(KEYS).any()
    for row in got.itertuples():  # order-free comparison
        np.testing.assert_allclose(row.vector, expected[(row.task, row.mode, row.episode, row.layer,
                                                         row.pooling)], rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_outputs_have_the_documented_layout_and_schema(first_run):
    cfg, record, _ = first_run
    stage_dir = cfg.storage.path("task_vectors")
    for name in ("episodes.parquet", "task_means.parquet", "prompt_template.txt", "metrics.json",
                 "projection.png", "config.resolved.yaml", "stage.json"):
        assert (stage_dir / name).is_file(), name
    schema = pds.dataset(stage_dir / "vectors", format="parquet").schema
    assert {f.name: f.type for f in schema} == {
        "task": pa.string(), "group": pa.string(), "heldout": pa.bool_(), "episode": pa.int64(),
        "mode": pa.string(), "layer": pa.int64(), "pooling": pa.string(),
        "vector": pa.list_(pa.float32())}
    files = list((stage_dir / "vectors").rglob("*.parquet"))
    assert len(files) == 2  # 96 rows per shard: one file each, not one per 4-row block
    vectors = _vectors(stage_dir)
    assert {len(v) for v in vectors["vector"]} == {64}
    assert set(vectors.loc[vectors["heldout"], "task"]) == {"dogs"}  # held-out tasks get vectors
    assert set(vectors["task"]) == {"cats", "dogs", "sums", "code"}
    episodes = pd.read_parquet(stage_dir / "episodes.parquet")
    assert {"task", "episode", "mode", "prompt", "n_demos", "truncated"} <= set(episodes.columns)
    assert len(episodes) == 4 * 3 * 4 and episodes.groupby(["task", "mode"]).size().eq(4).all()
    # shortest prompt first within each shard: a Ray Data batch of consecutive rows pads little
    for _, shard in episodes.groupby("shard", sort=False):
        assert shard["n_tokens"].is_monotonic_increasing and shard["mode"].nunique() == 3
    assert episodes["shard"].is_monotonic_increasing
    assert (stage_dir / "prompt_template.txt").read_text() == template_text()
    means = pd.read_parquet(stage_dir / "task_means.parquet")
    assert len(means) == 4 * 3 * 2 * 2 and (means["episodes"] == 4).all()
    for mode in ("demos", "both"):
        per_episode = load_episode_vectors(stage_dir, mode=mode, layer=-1, pooling="last")
        task_means = load_task_means(stage_dir, mode=mode, layer=-1, pooling="last")
        assert per_episode["cats"].shape == (4, 64) and task_means["cats"].shape == (64,)
        np.testing.assert_allclose(task_means["dogs"], per_episode["dogs"].mean(0), rtol=1e-5, atol=1e-6)
    metrics = json.loads((stage_dir / "metrics.json").read_text())["metrics"]
    assert len(metrics) == 3 * 2 * 2
    for row in metrics:
        assert -1 <= row["silhouette"] <= 1 and row["heldout_tasks"] == 1
        assert row["heldout_nearest_same_group"] in (0.0, 1.0)
        assert row["nearest_training_task"]["dogs"] in {"cats", "sums", "code"}  # never held out
    assert (stage_dir / "projection.png").stat().st_size > 20_000
    assert record["outputs"]["episodes"] == 48 and record["outputs"]["tasks"] == 4
    skipped = job.run(cfg, open_suite(cfg))  # up to date: skipped, the record on disk comes back
    assert skipped == json.loads((stage_dir / "stage.json").read_text())
    assert skipped["fingerprint"] == record["fingerprint"]
    assert record["outputs"]["shards"] == 2


@pytest.mark.slow
def test_resume_after_a_kill_keeps_finished_shards_and_same_seed_gives_same_vectors(first_run, monkeypatch):
    cfg, record, _ = first_run
    stage_dir = cfg.storage.path("task_vectors")
    before = _vectors(stage_dir).set_index(KEYS).sort_index()
    assert sorted(p.name for p in (stage_dir / "vectors").iterdir()) == ["shard-00000", "shard-00001"]
    kept = {p: p.stat().st_mtime_ns for p in (stage_dir / "vectors" / "shard-00000").iterdir()}
    # A kill during the second shard: its folder is still a hidden staging folder, no stage.json.
    (stage_dir / "vectors" / "shard-00001").rename(stage_dir / "vectors" / ".shard-00001.x.partial")
    (stage_dir / "stage.json").unlink()
    monkeypatch.setattr(job, "SHARD_ROWS", 24)
    rerun_record = job.run(cfg, open_suite(cfg))
    assert rerun_record["outputs"]["shards_reused"] == 1 and rerun_record["fingerprint"] == record["fingerprint"]
    assert {p: p.stat().st_mtime_ns for p in (stage_dir / "vectors" / "shard-00000").iterdir()} == kept
    assert sorted(p.name for p in (stage_dir / "vectors").iterdir()) == ["shard-00000", "shard-00001"]
    after = _vectors(stage_dir).set_index(KEYS).sort_index()
    assert after.index.equals(before.index)  # nothing lost, nothing doubled
    # Shard 1 was computed again by new actors from the same seed: the same vectors.
    np.testing.assert_allclose(np.stack(after["vector"]), np.stack(before["vector"]), rtol=1e-4, atol=1e-5)
    episodes = pd.read_parquet(stage_dir / "episodes.parquet")
    assert set(episodes.loc[episodes["shard"] == 1, "task"]) == {"dogs", "sums"}


@pytest.mark.parametrize("override, field", [
    ("task_vectors.layers=[7]", "task_vectors.layers"),
    ("task_vectors.max_prompt_tokens=4096", "task_vectors.max_prompt_tokens"),
    ("task_vectors.modes=[summary]", "task_vectors.modes"),
    ("task_vectors.cpus_per_actor=1", "task_vectors.cpus_per_actor"),  # the 2-CPU deadlock
    ("task_vectors.gpus_per_actor=1", "task_vectors.gpus_per_actor"),
])
def test_bad_config_exits_2_with_one_line_before_any_ray_work(tmp_path, capsys, override, field):
    suite_dir = make_suite(tmp_path / "suite")
    code = job.main(["--config", "smoke", f"suite.path={suite_dir}", f"storage.root={tmp_path / 'run'}",
                     *TINY, override])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and field in err and "Traceback" not in err
    assert not (tmp_path / "run" / "task_vectors" / "vectors").exists()


@pytest.mark.parametrize("cpus, actors, share, fix", [
    (1, 1, 0.5, "ray.num_cpus >= 2"),  # hung: the read task needs the whole CPU
    (2, 2, 0.75, "at most 0.5 (e.g. 0.25)"),  # 0.5 CPU left: hung the same way
])
def test_actors_must_leave_a_read_tasks_cpu_and_the_fix_says_how(tmp_path, cpus, actors, share, fix):
    """Ray Data's read tasks ask for 1 CPU: actors that leave less hang the stage (seen with 1
    actor x 0.5 on 1 CPU). Refused before any Ray work, with a fix that fits (the message once
    said 'below 0.5 (e.g. 0.5)'). In a fresh process: in this one a Ray another test started
    may be up, and the check rightly reads that Ray's CPUs instead of ray.num_cpus."""
    import subprocess
    import sys

    from tests.conftest import REPO_ROOT

    suite_dir = make_suite(tmp_path / "suite")
    out = subprocess.run(
        [sys.executable, "-m", "jobs.task_vectors", "--config", "smoke", f"suite.path={suite_dir}",
         f"storage.root={tmp_path / 'run'}", *TINY, f"ray.num_cpus={cpus}",
         f"task_vectors.actors={actors}", f"task_vectors.cpus_per_actor={share}"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr[-3000:]
    assert "task_vectors.cpus_per_actor" in out.stderr and fix in out.stderr, out.stderr[-3000:]
    assert "Traceback" not in out.stderr


@pytest.mark.slow
def test_chunks_and_shift_beside_mean_through_ray_data(ray_cluster, tmp_path):
    """Pooling `chunks` (J x D), `mean` and `shift` (D; a second read per prompt) leave the Ray
    Data actors in one table, and the stage's task means and metrics are computed per pooling at
    its own width."""
    cfg = _config(make_suite(tmp_path / "suite"), tmp_path / "run", "task_vectors.layers=[-1]",
                  "task_vectors.poolings=[mean,chunks,shift]", "task_vectors.chunks=3")
    job.run(cfg, open_suite(cfg))
    stage_dir = cfg.storage.path("task_vectors")
    vectors = _vectors(stage_dir)
    widths = vectors.groupby("pooling")["vector"].agg(lambda v: {len(x) for x in v}).to_dict()
    assert widths == {"mean": {64}, "chunks": {3 * 64}, "shift": {64}}
    for mode in ("description", "both"):
        spans = load_task_means(stage_dir, mode=mode, layer=-1, pooling="chunks")["cats"]
        episodes = load_episode_vectors(stage_dir, mode=mode, layer=-1, pooling="chunks")["cats"]
        np.testing.assert_allclose(spans, episodes.mean(0), rtol=1e-5, atol=1e-6)
    metrics = json.loads((stage_dir / "metrics.json").read_text())["metrics"]
    assert sorted((r["mode"], r["pooling"]) for r in metrics) == sorted(
        (m, p) for m in ("description", "demos", "both") for p in ("mean", "chunks", "shift"))
    assert all(-1 <= r["silhouette"] <= 1 for r in metrics)
