"""icm.zoo without training: the loss plot (Figure API, no pyplot state)."""

from __future__ import annotations

import json
import subprocess
import sys


def test_loss_plot_draws_every_task_without_pyplot(tmp_path):
    for task, offset in (("cats", 0.0), ("sums", 0.5)):
        folder = tmp_path / "tasks" / task
        folder.mkdir(parents=True)
        (folder / "losses.json").write_text(json.dumps([[s, 3.0 - 0.1 * s + offset] for s in range(1, 9)]))
    code = ("import sys; from pathlib import Path; from icm.zoo import plot_losses\n"
            f"out = plot_losses(Path({str(tmp_path)!r}))\n"
            "assert out.stat().st_size > 5000, out.stat().st_size\n"
            "assert 'matplotlib.pyplot' not in sys.modules\n")
    subprocess.run([sys.executable, "-c", code], check=True)
    assert (tmp_path / "losses.png").is_file() and not list(tmp_path.glob("*.tmp.png"))


def _snapshot(root, task: str, step: int) -> None:
    from icm.zoo import SNAPSHOT_FILE, snapshot_dir

    folder = snapshot_dir(root, task, step)
    folder.mkdir(parents=True)
    record = {"task": task, "step": step, "train_loss": 1.0 / step, "eval_ppl": None,
              "adapter_sha256": "a", "vector_sha256": "v", "node_id": "n"}
    (folder / SNAPSHOT_FILE).write_text(json.dumps(record))


def test_manifest_reads_one_index_per_finished_task_and_the_files_otherwise(tmp_path, monkeypatch):
    from icm import zoo

    for step in (2, 4):
        _snapshot(tmp_path, "cats", step)
        _snapshot(tmp_path, "sums", step)
    full = zoo.write_manifest(tmp_path)  # no index yet: every snapshot.json
    zoo.write_task_index(tmp_path, "cats")
    reads = []
    original = zoo.Path.read_text
    monkeypatch.setattr(zoo.Path, "read_text", lambda self, *a, **k: reads.append(self.name) or original(self, *a, **k))
    indexed = zoo.write_manifest(tmp_path)
    assert indexed.equals(full)  # the same rows, paths included
    assert reads.count(zoo.SNAPSHOT_INDEX_FILE) == 1 and reads.count(zoo.SNAPSHOT_FILE) == 2  # sums: files
    _snapshot(tmp_path, "cats", 6)  # a snapshot the index does not list: read the files again
    assert list(zoo.write_manifest(tmp_path).query("task == 'cats'")["step"]) == [2, 4, 6]
    assert len(zoo.write_manifest(tmp_path)) == 5


def test_trainer_concurrency_comes_from_the_config_or_refuses_to_guess_without_gpus():
    import pytest

    from icm.config import load_config
    from icm.errors import InputError
    from jobs.zoo import trainer_concurrency

    cpu = load_config("smoke", ["zoo.max_concurrent=null", "zoo.cpus_per_worker=1"])
    assert trainer_concurrency(cpu, {"CPU": 6.0}) == 6
    gpu = load_config("smoke", ["zoo.max_concurrent=null", "zoo.gpus_per_worker=1", "zoo.num_workers=2"])
    assert trainer_concurrency(gpu, {"CPU": 64.0, "GPU": 8.0}) == 4
    with pytest.raises(InputError, match="zoo.max_concurrent"):  # autoscaling from zero GPUs
        trainer_concurrency(gpu, {"CPU": 2.0})
    fixed = gpu.model_copy(update={"zoo": gpu.zoo.model_copy(update={"max_concurrent": 16})})
    assert trainer_concurrency(fixed, {"CPU": 2.0}) == 16
