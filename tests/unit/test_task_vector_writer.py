"""The task-vector stage's writer: batches as they arrive -> parquet files of bounded size,
each batch counted in the stage's progress."""

from __future__ import annotations

import io

import pyarrow as pa
import pyarrow.parquet as pq

import jobs.task_vectors as tv_job
from icm.progress import Progress


def test_batches_become_bounded_files_and_every_row_is_counted(tmp_path, monkeypatch):
    monkeypatch.setattr(tv_job, "ROWS_PER_FILE", 5)
    batches = [pa.table({"task": [f"t{i}"] * n, "vector": [[float(i)] * 3] * n})
               for i, n in enumerate((3, 3, 4, 1))]  # 11 rows
    progress = Progress("task_vectors", 11, "vectors", stream=io.StringIO())
    assert tv_job.write_batches(iter(batches), str(tmp_path / "shard"), progress) == 11
    files = sorted((tmp_path / "shard").glob("*.parquet"))
    assert [pq.read_metadata(f).num_rows for f in files] == [6, 5]  # closed once >= 5 rows
    assert pq.read_table(tmp_path / "shard").num_rows == 11 and progress.done == 11
    assert tv_job.write_batches(iter(()), str(tmp_path / "empty")) == 0  # no batch, no file
    assert not list((tmp_path / "empty").glob("*.parquet"))
