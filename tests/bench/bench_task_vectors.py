"""Task-vector benchmark: Ray Data vs a plain loop, memory on a 10x suite, cluster metrics.

    python tests/bench/bench_task_vectors.py --config demo --tasks 8 --repeats 3 --scale 10

(SmolLM2 on 2 CPUs: roughly 20 min for section 1, 10 x a demo task-vector run for section 2 -
``--memory-model tiny-llama`` measures the same streaming in minutes - and one demo run for 3.)

Sections (``--sections``, all by default), each printed as a Markdown table for BENCHMARKS.md:

1. ``throughput``: episodes/s of the job's Ray Data path (``extract_shard``: read_parquet ->
   streaming repartition -> ``map_batches`` on ``task_vectors.actors`` actors -> write_parquet)
   vs a plain single-process loop (``TaskEncoder.encode_prompts`` over the same fitted prompts, in
   the same ``batch_size`` chunks, torch on as many threads as Ray has CPUs), alternating, median
   of ``--repeats`` (goal: ratio >= 0.9). Both include loading the model (once per actor / once).
2. ``memory``: the whole job (``run``) on the whole suite of the config and on a suite
   ``--scale`` times larger (every task copied), model ``--memory-model`` (default: the
   config's), sampling RSS every 0.2 s: the driver, the Ray Data actors, and the driver plus
   every process of the local Ray cluster. Streaming means the peaks stay flat while the rows
   grow ``--scale`` x.
3. ``clusters``: silhouette and held-out nearest-group share per mode, layer and pooling, from
   the job on the whole suite of the config with ``task_vectors.layers`` = ``--cluster-layers``
   (SmolLM2-135M has hidden states 0..30), or read from ``--stage DIR`` of a finished run.

A quick check of the script itself (tiny model, a few minutes in all on the shared box):

    python tests/bench/bench_task_vectors.py --config smoke --tasks 4 --repeats 1 --scale 3 \\
        --cluster-layers 1,-1
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))  # run as a script from a checkout


def loop_child(spec_json: str) -> None:
    """The plain loop's process (see `plain_loop_pass`): no Ray imported, only what a plain
    script needs - the same extractor class the Ray Data actors run, called batch by batch."""
    import json

    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    from icm.config import PipelineConfig
    from icm.task_vectors import ParquetTaskVectorExtractor

    spec = json.loads(spec_json)
    cfg = PipelineConfig.model_validate(spec["config"])
    torch.set_num_threads(spec["threads"])  # the cores the actors share
    extractor = ParquetTaskVectorExtractor(cfg.model.spec, cfg.model.cache_dir,
                                           cfg.task_vectors.model_dump(mode="json"),
                                           dtype=cfg.model.dtype)
    episodes = pq.read_table(spec["episodes"], columns=spec["columns"]).to_pydict()
    size, tables = cfg.task_vectors.batch_size, []
    for begin in range(0, len(episodes["prompt"]), size):
        tables.append(extractor({k: np.asarray(v[begin:begin + size]) for k, v in episodes.items()}))
    Path(spec["out"]).mkdir(parents=True)
    pq.write_table(pa.concat_tables(tables), Path(spec["out"]) / "vectors.parquet")


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "--loop-child":
    loop_child(sys.argv[2])
    sys.exit(0)

import psutil  # noqa: E402
import ray  # noqa: E402
import yaml  # noqa: E402

from icm.config import load_config  # noqa: E402
from icm.models import load_base_model  # noqa: E402
from icm.stages import open_suite  # noqa: E402
from icm.task_vector_report import metrics_table  # noqa: E402
from icm.task_vectors import TaskEncoder  # noqa: E402
from icm.tasks import SUITE_FILE, TASK_FILE, Suite, load_suite  # noqa: E402
from jobs import task_vectors as job  # noqa: E402
from jobs.ray_setup import init_ray  # noqa: E402

MiB = 1024**2


# ----------------------------------------------------------------------------- 1. throughput


def ray_data_pass(cfg, episodes_path: Path, out_dir: Path) -> float:
    """Wall seconds of one Ray Data run over every episode (shard 0 = all of them)."""
    shutil.rmtree(out_dir, ignore_errors=True)
    started = time.perf_counter()
    job.extract_shard(cfg, episodes_path, 0, out_dir)
    return time.perf_counter() - started


def plain_loop_pass(cfg, episodes_path: Path, out_dir: Path, threads: int) -> float:
    """Wall seconds of the same work as a plain script would do it, started the same way the
    Ray path's actors start (a new process: imports and model load included): read the episodes,
    encode them chunk by chunk in one process, write the vectors as parquet."""
    import json
    import subprocess

    shutil.rmtree(out_dir, ignore_errors=True)
    spec = json.dumps({"config": cfg.model_dump(mode="json"), "episodes": str(episodes_path),
                       "out": str(out_dir), "threads": threads, "columns": job.INPUT_COLUMNS})
    started = time.perf_counter()
    subprocess.run([sys.executable, __file__, "--loop-child", spec], check=True)
    return time.perf_counter() - started


def throughput(cfg, suite: Suite, work: Path, repeats: int) -> str:
    encoder = TaskEncoder(*load_base_model(cfg.model.spec, cache_dir=cfg.model.cache_dir),
                          cfg.task_vectors)
    episodes_path = work / "episodes.parquet"
    counts = job.write_episodes(cfg, suite, encoder, episodes_path, {name: 0 for name in suite.tasks})
    threads = int(ray.cluster_resources().get("CPU", 1))
    times: dict[str, list[float]] = {"Ray Data (job path)": [], "plain loop": []}
    for _ in range(repeats):
        times["Ray Data (job path)"].append(ray_data_pass(cfg, episodes_path, work / "out"))
        times["plain loop"].append(plain_loop_pass(cfg, episodes_path, work / "loop-out", threads))
    tv, rows = cfg.task_vectors, counts["episodes"]
    medians = {label: statistics.median(values) for label, values in times.items()}
    lines = [f"{rows} episodes of {len(suite.tasks)} tasks, {cfg.model.spec}, batch_size {tv.batch_size}; "
             f"Ray: {tv.actors} actors x {tv.cpus_per_actor} CPU on a {threads}-CPU local Ray; loop: "
             f"{threads} torch threads. Median of {repeats}, alternating. Both start cold the same way: "
             "Ray's actors and the loop's process each import, load the model, read the "
             "episodes and write parquet (the local Ray itself is up before either).\n",
             "| path | episodes/s | median s | all runs s |", "|---|---:|---:|---|"]
    for label, values in times.items():
        lines.append(f"| {label} | {rows / medians[label]:.2f} | {medians[label]:.1f} | "
                     f"{', '.join(f'{v:.1f}' for v in values)} |")
    ratio = medians["plain loop"] / medians["Ray Data (job path)"]
    return "\n".join(lines) + f"\n\nRay Data / plain loop throughput: **{ratio:.2f}** (goal >= 0.9)"


# ----------------------------------------------------------------------------- 2. memory


def scaled_suite(suite: Suite, scale: int, folder: Path) -> Path:
    """``suite`` with every task copied ``scale`` times (texts linked, not duplicated on disk)."""
    folder.mkdir(parents=True)
    heldout = []
    for copy in range(scale):
        for name, task in suite.tasks.items():
            new = f"{name}-x{copy}"
            (folder / new).mkdir()
            meta = yaml.safe_load((task.path / TASK_FILE).read_text()) | {"name": new}
            (folder / new / TASK_FILE).write_text(yaml.safe_dump(meta))
            for split in ("train.jsonl", "eval.jsonl"):
                (folder / new / split).symlink_to((task.path / split).resolve())
            if suite.is_heldout(name):
                heldout.append(new)
    (folder / SUITE_FILE).write_text(yaml.safe_dump({"name": f"{suite.name}-x{scale}", "heldout": heldout}))
    return folder


class RssSampler:
    """Peak RSS of the driver, of the Ray Data actors, and of the driver with every descendant
    (the local Ray cluster: GCS, raylet, workers, actors), sampled in a thread."""

    def __init__(self, every_s: float = 0.2):
        self.every_s, self.peaks = every_s, {"driver": 0, "actors": 0, "driver + Ray cluster": 0}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        me = psutil.Process()
        driver, actors, total = me.memory_info().rss, 0, me.memory_info().rss
        for child in me.children(recursive=True):
            try:
                rss, name = child.memory_info().rss, " ".join(child.cmdline()[:1])
            except psutil.Error:
                continue
            total += rss
            actors += rss if "MapWorker" in name or "TaskVectorExtractor" in name else 0
        for key, value in (("driver", driver), ("actors", actors), ("driver + Ray cluster", total)):
            self.peaks[key] = max(self.peaks[key], value)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            time.sleep(self.every_s)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def memory(cfg, suite: Suite, work: Path, scale: int) -> str:
    lines = ["| suite | tasks | episodes | vector rows | seconds | peak driver MiB | peak actors MiB | "
             "peak driver + Ray MiB |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for label, size in (("1x", 1), (f"{scale}x", scale)):
        folder = scaled_suite(suite, size, work / f"suite-{label}")
        run_cfg = cfg.model_copy(update={"storage": cfg.storage.model_copy(
            update={"root": str(work / f"run-{label}")})})
        started = time.perf_counter()
        with RssSampler() as sampler:
            record = job.run(run_cfg, load_suite(folder))
        out = record["outputs"]
        rows = out["episodes"] * len(cfg.task_vectors.layers) * len(cfg.task_vectors.poolings)
        peaks = sampler.peaks
        lines.append(f"| {label} | {out['tasks']} | {out['episodes']} | {rows} | "
                     f"{time.perf_counter() - started:.0f} | {peaks['driver'] / MiB:.0f} | "
                     f"{peaks['actors'] / MiB:.0f} | {peaks['driver + Ray cluster'] / MiB:.0f} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- 3. clusters


def clusters(cfg, work: Path, layers: list[int], stage: str | None) -> str:
    import json

    if stage is None:
        run_cfg = cfg.model_copy(update={
            "storage": cfg.storage.model_copy(update={"root": str(work / "run-clusters")}),
            "task_vectors": cfg.task_vectors.model_copy(update={"layers": layers})})
        job.run(run_cfg, open_suite(run_cfg))
        stage = str(run_cfg.storage.path("task_vectors"))
    metrics = json.loads((Path(stage) / "metrics.json").read_text())["metrics"]
    rows = sorted(metrics, key=lambda r: (["description", "demos", "both"].index(r["mode"]),
                                          r["layer"] < 0, r["layer"], r["pooling"]))  # -1 last
    return f"metrics of {stage}:\n\n" + metrics_table(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="demo")
    parser.add_argument("--tasks", type=int, default=8, help="tasks for the throughput test (first N)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--scale", type=int, default=10, help="suite size multiple for the memory run")
    parser.add_argument("--memory-model", default=None, help="model spec of the memory run")
    parser.add_argument("--cluster-layers", default="6,12,18,24,-1")
    parser.add_argument("--stage", default=None, help="a finished task_vectors dir for section 3")
    parser.add_argument("--sections", default="throughput,memory,clusters")
    parser.add_argument("--workdir", default=None)
    parser.add_argument("overrides", nargs="*", help="section.field=value")
    args = parser.parse_args()
    cfg = load_config(args.config, args.overrides)
    full = open_suite(cfg)
    suite = full.select(sorted(full.tasks)[:args.tasks])
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-tv-"))
    init_ray(cfg.ray.model_copy(update={"include_dashboard": False}), cache_dir=cfg.model.cache_dir)
    sections = args.sections.split(",")
    if "throughput" in sections:
        print("## Task vectors: Ray Data vs plain loop\n\n" + throughput(cfg, suite, work, args.repeats), flush=True)
    if "memory" in sections:
        memory_cfg = cfg.model_copy(update={"model": cfg.model.model_copy(
            update={"spec": args.memory_model or cfg.model.spec})})
        print(f"\n## Task vectors: peak memory, suite x1 vs x{args.scale} ({memory_cfg.model.spec})\n\n"
              + memory(memory_cfg, full, work, args.scale), flush=True)
    if "clusters" in sections:
        layers = [int(x) for x in args.cluster_layers.split(",")]
        print(f"\n## Task vectors: cluster metrics ({cfg.model.spec})\n\n"
              + clusters(cfg, work, layers, args.stage), flush=True)
    ray.shutdown()
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
