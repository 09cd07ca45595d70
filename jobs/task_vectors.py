"""Task vectors of every task: Ray Data streams in-context episodes through the frozen base LM.

    python -m jobs.task_vectors --config smoke [key=value ...]   (or: icm task-vectors ...)

Every task of the suite gets vectors, held-out ones included (a new task must get a vector; its
demonstrations come from its own train split). The driver writes the seeded episodes
(``episodes.parquet``, prompts fitted to the token budget), then per shard of whole tasks:
``read_parquet`` -> streaming ``repartition`` (one small file would be one block on one busy
actor) -> ``map_batches(TaskVectorExtractor)`` on an actor pool holding the frozen model
(``task_vectors.actors`` x ``cpus_per_actor``/``gpus_per_actor``) -> ``write_parquet``. Then
per-task means, metrics and the PCA picture. Outputs under ``<storage.root>/task_vectors/``:
episodes.parquet, vectors/shard-*/, task_means.parquet, prompt_template.txt, metrics.json,
projection.png, config.resolved.yaml, stage.json. A rerun after a kill keeps finished shards.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import ray
from ray.data.expressions import col

from icm.config import PipelineConfig
from icm.logs import quiet_library_loggers, verbose
from icm.progress import Progress
from icm.io import atomic_directory, write_bytes_atomic, write_json_atomic, write_text_atomic
from icm.models import load_base_model
from icm import storage
from icm.stages import Stage, open_suite, push_local, stage
from icm.task_vector_report import (compute_task_means, metrics_table, plot_projection,
                                    stage_metrics, write_metrics)
from icm.task_vectors import (EPISODES_FILE, MEANS_FILE, TEMPLATE_FILE, VECTORS_DIR,
                              ParquetTaskVectorExtractor, TaskEncoder, TaskVectorInputError,
                              build_episodes, template_text)
from icm.tasks import Suite
from jobs.common import ensure_writable_root, parse_job_args, user_errors_exit_2
from jobs.ray_setup import init_ray

log = logging.getLogger("jobs.task_vectors")

SHARD_ROWS = 4096  # episodes per Ray Data run: the unit of resume after a kill
READ_TASK_CPUS = 1  # what each of Ray Data's read tasks asks for (its default)
SHARD_DONE_FILE = "_shard.json"  # "_" prefix: parquet readers skip it
ROWS_PER_FILE = 4096  # output rows per parquet file (the small-files trap, on the write side)
EPISODE_FIELDS = ("task", "episode", "mode", "prompt", "n_demos", "truncated", "n_tokens")
INPUT_COLUMNS = ["task", "group", "heldout", "episode", "mode", "prompt"]
EPISODE_SCHEMA = pa.schema([
    ("task", pa.string()), ("group", pa.string()), ("heldout", pa.bool_()), ("episode", pa.int64()),
    ("mode", pa.string()), ("prompt", pa.string()), ("n_demos", pa.int64()),
    ("truncated", pa.bool_()), ("n_tokens", pa.int64()), ("shard", pa.int64())])


def plan_shards(suite: Suite, rows_per_task: int, shard_rows: int = SHARD_ROWS) -> dict[str, int]:
    """Task -> shard: whole tasks in name order, a new shard when ``shard_rows`` would be passed."""
    shards, shard, rows = {}, 0, 0
    for name in sorted(suite.tasks):
        if rows and rows + rows_per_task > shard_rows:
            shard, rows = shard + 1, 0
        shards[name] = shard
        rows += rows_per_task
    return shards


def write_episodes(cfg: PipelineConfig, suite: Suite, encoder: TaskEncoder, path: Path,
                   shards: dict[str, int]) -> dict:
    """Build, fit and write every episode, one parquet row group per shard (the driver never
    holds more than one shard's prompts: at most ``SHARD_ROWS``).

    Within a shard, rows go shortest prompt first: Ray Data batches consecutive rows, and a
    batch pads to its longest prompt, so a description-only prompt (~30 tokens) batched with
    demonstrations (~300) would cost as much as they do (1.57x the tokens on the demo suite).
    """
    truncated = rows = 0
    partial = path.with_name(f".{path.name}.partial")
    by_shard: dict[int, list[str]] = {}
    for name in sorted(suite.tasks):
        by_shard.setdefault(shards[name], []).append(name)
    with pq.ParquetWriter(partial, EPISODE_SCHEMA) as writer:
        for shard, names in sorted(by_shard.items()):
            columns = {field: [] for field in (*EPISODE_FIELDS, "group", "heldout", "shard")}
            for name in names:
                task = suite.tasks[name]
                for mode in cfg.task_vectors.modes:
                    for episode in build_episodes(task, cfg.task_vectors, mode=mode):
                        fitted = encoder.fit_episode(episode)
                        for field in EPISODE_FIELDS:
                            columns[field].append(getattr(fitted, field))
                        columns["group"].append(task.group)
                        columns["heldout"].append(suite.is_heldout(name))
                        columns["shard"].append(shard)
            table = pa.table(columns, schema=EPISODE_SCHEMA)
            writer.write_table(table.sort_by([("n_tokens", "ascending")]))  # stable: ties keep order
            truncated += sum(columns["truncated"])
            rows += table.num_rows
    partial.replace(path)  # atomic: readers see the old file or the complete new one
    return {"episodes": rows, "truncated": truncated}


def extract_shard(cfg: PipelineConfig, episodes_path: str | Path, shard: int, out_dir: str | Path,
                  progress: Progress | None = None) -> None:
    """One streaming Ray Data run over the episodes of ``shard``, written into ``out_dir`` (a
    path or a URI) as the vectors arrive at the driver, each batch counted in ``progress``."""
    quiet_library_loggers()  # Ray Data configures its loggers when first imported
    ray.data.DataContext.get_current().enable_progress_bars = verbose()  # ours is `progress`
    tv = cfg.task_vectors
    gpus = {"num_gpus": tv.gpus_per_actor} if tv.gpus_per_actor else {}
    ds = (ray.data.read_parquet(str(episodes_path))  # filter and projection push down into the read
          .filter(expr=col("shard") == shard).select_columns(INPUT_COLUMNS))
    ds = ds.repartition(target_num_rows_per_block=tv.batch_size)  # streaming: no barrier
    ds = ds.map_batches(
        ParquetTaskVectorExtractor, batch_size=tv.batch_size, num_cpus=tv.cpus_per_actor, **gpus,
        compute=ray.data.ActorPoolStrategy(size=tv.actors),
        fn_constructor_kwargs={"model_spec": cfg.model.spec, "cache_dir": cfg.model.cache_dir,
                               "config": tv.model_dump(mode="json"), "dtype": cfg.model.dtype})
    write_batches(ds.iter_batches(batch_size=None, batch_format="pyarrow"), str(out_dir), progress)


def write_batches(batches: Iterable[pa.Table], out_dir: str, progress: Progress | None = None) -> int:
    """Parquet files of <= ROWS_PER_FILE rows from arrow batches (the vectors are small: the
    driver writing them costs nothing and sees each batch finish); returns the rows written."""
    fs, root = storage.resolve(out_dir)  # a path or any URI the storage root may be
    fs.create_dir(root, recursive=True)
    stream = writer = None
    rows = in_file = files = 0
    for batch in batches:
        if writer is None:
            stream = fs.open_output_stream(f"{root}/part-{files:05d}.parquet")
            writer = pq.ParquetWriter(stream, batch.schema)
        writer.write_table(batch)
        rows, in_file = rows + batch.num_rows, in_file + batch.num_rows
        if progress is not None:
            progress.update(progress.done + batch.num_rows)
        if in_file >= ROWS_PER_FILE:
            writer.close(), stream.close()
            stream = writer = None
            in_file, files = 0, files + 1
    if writer is not None:
        writer.close(), stream.close()
    return rows


def check_actor_resources(cfg: PipelineConfig) -> None:
    """A local Ray must keep a whole CPU free beside the actors: Ray Data's read tasks ask for 1
    CPU each, and without one they wait forever (2 actors x 1 CPU on 2 CPUs hung for 10 min; 1
    actor x 0.5 CPU on 1 CPU too). A cluster (``ray.address``) may autoscale."""
    tv = cfg.task_vectors
    if cfg.ray.address is not None:
        return
    if ray.is_initialized():
        cpus, gpus = (ray.cluster_resources().get(k, 0) for k in ("CPU", "GPU"))
    else:
        import torch

        cpus = cfg.ray.num_cpus or os.cpu_count() or 1
        gpus = torch.cuda.device_count() if cfg.ray.num_gpus is None else cfg.ray.num_gpus
    if cpus - tv.actors * tv.cpus_per_actor < READ_TASK_CPUS:
        share = (cpus - READ_TASK_CPUS) / tv.actors
        raise TaskVectorInputError(
            f"{tv.actors} actors x {tv.cpus_per_actor} CPU leave less than the {READ_TASK_CPUS} CPU "
            f"a Ray Data read task needs on the local Ray's {cpus:g} CPUs: Ray Data would hang.",
            field="task_vectors.cpus_per_actor",
            fix=(f"set it to at most {share:g} (e.g. {share / 2:g}), or use fewer actors." if share > 0
                 else f"give the local Ray more CPUs (ray.num_cpus >= {READ_TASK_CPUS + 1})."))
    if tv.actors * tv.gpus_per_actor > gpus:
        raise TaskVectorInputError(
            f"{tv.actors} actors x {tv.gpus_per_actor} GPU need more than the {gpus:g} GPU(s) here.",
            field="task_vectors.gpus_per_actor", fix="lower it or task_vectors.actors.")


def _shard_done(folder: Path, fingerprint: str, tasks: list[str]) -> bool:
    """A finished shard of this config holding exactly ``tasks``."""
    try:
        done = json.loads((folder / SHARD_DONE_FILE).read_text())
    except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError):
        return False
    return done.get("fingerprint") == fingerprint and done.get("tasks") == tasks


def extract_vectors(cfg: PipelineConfig, current: Stage, episodes_path: Path,
                    shards: dict[str, int]) -> dict:
    """Run every shard not already done for this fingerprint; stale and partial shards go."""
    if cfg.storage.is_remote:
        return _extract_to_uri(cfg, current, shards)
    vectors_dir = current.directory / VECTORS_DIR
    vectors_dir.mkdir(parents=True, exist_ok=True)
    wanted = _wanted_shards(shards)
    for path in vectors_dir.iterdir():  # a killed run's staging dirs, other configs' shards
        plan = wanted.get(path.name)
        if plan is None or not _shard_done(path, current.fingerprint, plan[1]):
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()
    started, done_before = time.perf_counter(), sum((vectors_dir / n).exists() for n in wanted)
    todo = {n: plan for n, plan in wanted.items() if not (vectors_dir / n).exists()}
    if len(todo) < len(wanted):
        log.info("task_vectors: %d of %d shards already done, keeping them", len(wanted) - len(todo), len(wanted))
    with _vector_progress(cfg, todo) as progress:
        for name, (shard, tasks) in todo.items():
            with atomic_directory(vectors_dir / name) as staging:
                extract_shard(cfg, episodes_path, shard, staging, progress)
                write_json_atomic(staging / SHARD_DONE_FILE,
                                  {"fingerprint": current.fingerprint, "tasks": tasks})
            log.debug("task_vectors: %s done (%d tasks)", name, len(tasks))
    return {"shards": len(wanted), "shards_reused": done_before,
            "extract_seconds": round(time.perf_counter() - started, 2)}


def _vector_progress(cfg: PipelineConfig, todo: dict[str, tuple[int, list[str]]]) -> Progress:
    """Vectors to extract in the shards ``todo``: a task has episodes x modes prompts, each
    giving a vector (one output row) per layer and pooling."""
    tv = cfg.task_vectors
    per_task = tv.episodes * len(tv.modes) * len(tv.layers) * len(tv.poolings)
    return Progress("task_vectors", per_task * sum(len(tasks) for _, tasks in todo.values()), "vectors")


def _wanted_shards(shards: dict[str, int]) -> dict[str, tuple[int, list[str]]]:
    return {f"shard-{s:05d}": (s, sorted(t for t, i in shards.items() if i == s))
            for s in sorted(set(shards.values()))}


def _extract_to_uri(cfg: PipelineConfig, current: Stage, shards: dict[str, int]) -> dict:
    """`extract_vectors` for a URI root: Ray Data reads the episodes from and writes each shard
    to the URI (its tasks run on any node), ``_shard.json`` last as the shard's commit marker;
    the mirror then gets a copy of every finished shard."""
    local_dir, remote_dir = current.directory / VECTORS_DIR, cfg.storage.uri("task_vectors", VECTORS_DIR)
    wanted = _wanted_shards(shards)
    marker = {name: storage.read_json(storage.join(remote_dir, name, SHARD_DONE_FILE)) for name in wanted}
    done = {name for name, (_, tasks) in wanted.items()
            if marker[name] == {"fingerprint": current.fingerprint, "tasks": tasks}}
    # Other configs' shards and a killed run's partial writes go, on both sides.
    for name in {n.split("/")[0] for n in storage.list_files(remote_dir)} - done:
        storage.delete(storage.join(remote_dir, name))
    for path in local_dir.iterdir() if local_dir.is_dir() else ():
        if path.name not in done:
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    started = time.perf_counter()
    with _vector_progress(cfg, {n: plan for n, plan in wanted.items() if n not in done}) as progress:
        for name, (shard, tasks) in wanted.items():
            target = storage.join(remote_dir, name)
            if name in done:
                log.info("task_vectors: %s already done, keeping it", name)
            else:
                extract_shard(cfg, cfg.storage.uri("task_vectors", EPISODES_FILE), shard, target, progress)
                storage.write_json(storage.join(target, SHARD_DONE_FILE),
                                   {"fingerprint": current.fingerprint, "tasks": tasks})
                log.debug("task_vectors: %s done (%d tasks)", name, len(tasks))
            if not _shard_done(local_dir / name, current.fingerprint, tasks):
                with atomic_directory(local_dir / name) as staging:
                    storage.pull_dir(target, staging, last=(SHARD_DONE_FILE,))
    return {"shards": len(wanted), "shards_reused": len(done),
            "extract_seconds": round(time.perf_counter() - started, 2)}


def run(cfg: PipelineConfig, suite: Suite) -> dict:
    """Run (or skip, when up to date) the ``task_vectors`` stage; returns its stage record."""
    tv = cfg.task_vectors
    current = stage(cfg, "task_vectors", suite.fingerprint(), sorted(suite.tasks),
                    list(suite.heldout), tv.vector_settings(), template_text(), sections=("model",))
    if current.is_current():
        log.info("task_vectors: up to date, skipping (%s)", current.directory)
        return current.record()
    check_actor_resources(cfg)
    model, tokenizer = load_base_model(cfg.model.spec, cache_dir=cfg.model.cache_dir,
                                       dtype=cfg.model.dtype, device="cpu")  # GPUs: the actors'
    encoder = TaskEncoder(model, tokenizer, tv)  # checks layers and token budget before any work
    started = current.begin(cfg)
    directory = current.directory
    write_text_atomic(directory / TEMPLATE_FILE, template_text())
    shards = plan_shards(suite, tv.episodes * len(tv.modes), SHARD_ROWS)
    counts = write_episodes(cfg, suite, encoder, directory / EPISODES_FILE, shards)
    push_local(cfg, directory / EPISODES_FILE)  # a URI root: Ray Data reads it from there
    del model, encoder  # the actors hold their own copies
    if counts["truncated"]:
        log.warning("task_vectors: %d of %d prompts were cut to max_prompt_tokens=%d "
                    "(episodes.parquet column 'truncated')", counts["truncated"],
                    counts["episodes"], tv.max_prompt_tokens)
    init_ray(cfg.ray, cache_dir=cfg.model.cache_dir)
    extraction = extract_vectors(cfg, current, directory / EPISODES_FILE, shards)
    means = compute_task_means(directory / VECTORS_DIR)
    write_bytes_atomic(directory / MEANS_FILE, means.to_parquet(index=False))
    rows = stage_metrics(directory)
    write_metrics(rows, directory / "metrics.json")
    plot_projection(directory, rows, directory / "projection.png")
    log.info("task_vectors metrics:\n%s", metrics_table(rows))
    return current.finish(started, {
        **counts, **extraction, "tasks": len(suite.tasks), "heldout": list(suite.heldout),
        "episodes_file": EPISODES_FILE, "vectors": VECTORS_DIR, "task_means": MEANS_FILE,
        "metrics": "metrics.json", "projection": "projection.png", "template": TEMPLATE_FILE},
        pushed=(VECTORS_DIR,) if cfg.storage.is_remote else ())  # written there by Ray Data


@user_errors_exit_2
def main(argv: Sequence[str] | None = None) -> int:
    cfg = parse_job_args(__doc__.split("\n\n")[0], argv)
    ensure_writable_root(cfg)
    started = time.perf_counter()
    record = run(cfg, open_suite(cfg))
    out = record["outputs"]
    print(f"task_vectors: {out['tasks']} tasks, {out['episodes']} episodes "
          f"({out['truncated']} cut to the token budget) in {time.perf_counter() - started:.1f} s "
          f"-> {cfg.storage.path('task_vectors')}")
    print(json.loads((cfg.storage.path("task_vectors") / "metrics.json").read_text())["table"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
