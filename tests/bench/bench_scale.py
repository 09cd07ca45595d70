"""Scale benchmark: per-task overhead, manifest, storage I/O, task vectors and generator data
preparation of a synthetic suite of N tasks on a local multi-node Ray cluster.

    python tests/bench/bench_scale.py --tasks 100 300 1000 [--nodes 2] [--out bench-scale.md]

(A quick check of the script itself, a few minutes on a shared 2-core box:
``python tests/bench/bench_scale.py --tasks 8 16``.)

One local Ray cluster for the whole run (``ray.cluster_utils.Cluster``: a head with
``--head-cpus`` CPUs, 0 by default, and ``--nodes`` worker nodes of ``--worker-cpus`` CPUs each,
in a private RAY_TMPDIR so that no other Ray on the machine is joined), reused for every N. Per N
a fresh synthetic suite (N training tasks in groups of ``--group-size``, plus ``--heldout``
held-out tasks that the zoo never trains) and a fresh storage root; model ``tiny-llama`` on the
``smoke`` preset, ``zoo.steps=--steps``, ``zoo.snapshots=--snapshots`` (snapshot_start=0, so 8
steps give 8 distinct snapshots), tiny batches and sequences, no multi-task LoRA (``--multitask``
adds it), one task-vector actor (``--tv-actors``: two 0.5-CPU actors on two 1-CPU nodes leave
no node a whole CPU for Ray Data's read tasks, and the job hangs; the script refuses such a
layout up front). ``--steps`` must be >= 3 (DeepSpeed's warm-up runs the first 2 steps at lr 0).
Then, per N:

* **zoo wall s**: wall time of ``jobs.zoo.run(cfg, suite)`` in this process (the driver).
* **overhead s/task** = (zoo wall - sum over tasks of the task's ``wall_seconds`` / c) / N, where
  ``wall_seconds`` (``summary.parquet``) is all the time a trainer spent on that task (model
  load, DeepSpeed init, base eval, steps, snapshots, checkpoints: the zoo's default
  ``zoo.checkpoint_interval_s`` leaves a tiny task none; pass ``zoo.checkpoint_interval_s=0`` to
  checkpoint at every snapshot, ~1.9 s each) and c = the trainers that ran at
  once (``min(jobs.zoo._concurrency(cfg), N)``): the time per task spent outside any task's own
  work (driver, scheduling, Ray Train start-up, the stage's bookkeeping).
* **non-step s/task** = (zoo wall - sum of ``train_seconds`` / c) / N: everything but the optimizer
  steps (the above plus the per-task set-up, snapshot and checkpoint work on the workers).
* **driver CPU s/task**: CPU seconds (user + system) of the driver process during the zoo stage
  / N: the driver's own cost, whatever the workers do.
* **manifest s**: ``icm.zoo.write_manifest(zoo_root)`` timed again on its own after the stage
  (the stage builds it once too); O(N) means manifest s / N flat.
* **driver opens/task**: files under the storage root that the driver process opened during the
  zoo stage (``sys.addaudithook``, event "open": Python's ``open``/``io.open``/``os.open``; C and
  Rust opens inside pyarrow or safetensors are not seen), / N; the JSON splits reads and writes
  and counts directory scans (``os.scandir``/``os.listdir``) too.
* **files/task**: files under ``<root>/zoo`` after the stage (every node's writes: snapshots,
  indexes, task.json, Ray Train's last checkpoint per trainer), / N.
* **task-vector s** and **s/task**: wall time of ``jobs.task_vectors.run(cfg, suite)`` (all
  N + heldout tasks get vectors), and that / (N + heldout).
* **gen load s / gen prep s / prep peak MB**: in a fresh subprocess per N (everything imported
  and the base model built once first): ``icm.generator.inputs.load_generator_inputs(cfg, suite)``
  then ``icm.generator.data.prepare_data(inputs.zoo, inputs.conditions, cfg.generator,
  validation=False)``; the peak is the highest RSS during both minus the RSS before them, in MiB
  (VmHWM, reset through /proc/self/clear_refs; where that is refused, a 5 ms RSS sampler; the
  child runs with MALLOC_MMAP_THRESHOLD_=131072 so that the peak does not depend on whether
  glibc happens to reuse the warm-up's freed heap). It
  includes the base model that ``load_generator_inputs`` builds (``initial_lora_state``), shown
  alone as "model floor MB", constant in N. The budget ``generator.data_memory_mb=
  --data-memory-mb`` is passed only where ``GeneratorConfig`` has that field. **zoo matrix MB**:
  training snapshots x layout numel x 4 bytes, what an in-memory preparation holds at least
  once: the peak should follow the budget, not this column.
* **marginal** costs: (total at N2 - total at N1) / (N2 - N1) for the zoo wall, overhead, driver
  CPU and opens, files, manifest and task-vector time: per added task, fixed costs removed.

Printed: one table, a growth line (value at the largest N / value at the smallest N, for the
per-task columns and the peak), the marginal costs, the worker-side per-task phases (medians of
``summary.parquet``) and the driver I/O and generator memory in detail. ``--out PATH`` writes
the same as Markdown to PATH and every number as JSON beside it (PATH with suffix .json);
``--keep`` keeps the suites and storage roots (``--workdir`` says where).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))  # run as a script from a checkout
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
MiB = 1024**2


# ----------------------------------------------------------------------------- generator child


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


class PeakRss:
    """This process's peak RSS since the last `reset`: VmHWM, reset through /proc/self/clear_refs
    ("5"); where the kernel refuses that, a thread sampling RSS every 5 ms."""

    def __init__(self) -> None:
        import threading

        self.method, self.peak = "VmHWM", 0
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            self.method = "sampler"
            threading.Thread(target=self._sample, daemon=True).start()

    @staticmethod
    def rss() -> int:
        return _status_kib("VmRSS") * 1024

    def _sample(self) -> None:
        while True:
            self.peak = max(self.peak, self.rss())
            time.sleep(0.005)

    def reset(self) -> int:
        """Start a new peak here; returns the RSS now."""
        if self.method == "VmHWM":
            Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
        now = self.peak = self.rss()
        return now

    def high(self) -> int:
        return _status_kib("VmHWM") * 1024 if self.method == "VmHWM" else max(self.peak, self.rss())


def prep_child(spec_json: str) -> None:
    """A fresh process: import, then measure load_generator_inputs + prepare_data; one JSON line.
    Peaks are increases over the RSS just before each phase, in MiB: ``load`` (reading the zoo and
    the task vectors, one build of the base model included), ``prep`` (prepare_data, over what
    the loaded inputs already hold), ``total`` (both, over the RSS before loading); ``model_floor``
    is the peak of one base-model build alone (part of ``load`` and ``total`` at every N)."""
    from icm.config import PipelineConfig
    from icm.generator.data import prepare_data
    from icm.generator.inputs import load_generator_inputs
    from icm.tasks import load_suite

    spec = json.loads(spec_json)
    cfg = PipelineConfig.model_validate(spec["config"])
    suite = load_suite(spec["suite"])
    warm_up(cfg)  # lazy imports and the base model's first build are not the data's memory
    meter = PeakRss()
    before = meter.reset()
    warm_up(cfg)
    floor = meter.high() - before
    baseline = meter.reset()
    started = time.perf_counter()
    inputs = load_generator_inputs(cfg, suite)
    loaded, load_high = time.perf_counter(), meter.high()
    after_load = meter.reset()
    prepared = prepare_data(inputs.zoo, inputs.conditions, cfg.generator, validation=False)
    done, prep_high = time.perf_counter(), meter.high()
    held = meter.rss() - baseline
    streamed = next((v["streamed"] for v in vars(prepared).values()
                     if isinstance(v, dict) and "streamed" in v), None)
    print("PREP " + json.dumps({
        "load_s": loaded - started, "prep_s": done - loaded, "baseline_mb": baseline / MiB,
        "load_peak_mb": (load_high - baseline) / MiB, "prep_peak_mb": (prep_high - after_load) / MiB,
        "total_peak_mb": (max(load_high, prep_high) - baseline) / MiB, "held_mb": held / MiB,
        "model_floor_mb": floor / MiB, "method": meter.method, "streamed": streamed}), flush=True)


def warm_up(cfg) -> None:
    """Pay the one-time costs before measuring: the lazy imports (transformers, peft, pyarrow
    datasets, safetensors, matplotlib) and one build of the base model + LoRA (what
    ``load_generator_inputs`` and the zoo's driver both do), then drop it."""
    import gc

    import matplotlib.figure  # noqa: F401  (the zoo's loss plot)
    import pyarrow.dataset  # noqa: F401  (the task-vector reader)
    import safetensors.torch  # noqa: F401

    from icm.lora_io import adapter_state_dict
    from icm.lora_train import build_lora_model
    from icm.models import load_base_model

    model, _ = load_base_model(cfg.model.spec, cache_dir=cfg.model.cache_dir, device="cpu")
    adapter_state_dict(build_lora_model(model, cfg.zoo))
    del model
    gc.collect()


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "--prep-child":
    prep_child(sys.argv[2])
    sys.exit(0)

import argparse  # noqa: E402
import logging  # noqa: E402
import resource  # noqa: E402
import shutil  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402

import pandas as pd  # noqa: E402
from tabulate import tabulate  # noqa: E402

import jobs  # noqa: E402,F401  (registers the presets of jobs/configs: smoke)
from icm.config import GeneratorConfig, load_config  # noqa: E402
from icm.tasks import load_suite, validate_suite, write_suite_meta, write_task  # noqa: E402

WORDS = ("amber", "basil", "cedar", "delta", "ember", "fjord", "garnet", "harbor", "indigo", "juniper",
         "kelp", "lumen", "maple", "nectar", "onyx", "pebble", "quartz", "raven", "saffron", "tundra")


# ----------------------------------------------------------------------------- synthetic suite


def build_suite(folder: Path, n: int, *, heldout: int, group_size: int) -> Path:
    """N training tasks ``task-00000``.. in groups of ``group_size``, plus ``heldout`` held-out
    tasks spread over the groups; 4 short train and 2 eval texts each (a few tokens: a zoo step
    is milliseconds). Each task has its own words and numbers, so LoRAs and vectors differ."""
    groups = max(1, -(-n // group_size))
    names = [(f"task-{i:05d}", f"group-{i // group_size:03d}") for i in range(n)]
    names += [(f"heldout-{k:03d}", f"group-{k % groups:03d}") for k in range(heldout)]
    for i, (name, group) in enumerate(names):
        a, b = WORDS[i % len(WORDS)], WORDS[(i * 7 + 3) % len(WORDS)]
        texts = [f"{name}: the {a} {b} count is {i * 13 + j}, then {a} again." for j in range(6)]
        write_task(folder / name, name=name, description=f"Short {a} and {b} notes of {name} ({group}).",
                   group=group, source="bench_scale synthetic", license="CC0-1.0",
                   train=texts[:4], eval=texts[4:])
    write_suite_meta(folder, name=f"scale-{n}", heldout=[name for name, _ in names[n:]])
    return folder


# ----------------------------------------------------------------------------- driver file opens


class OpenCounter:
    """Counts the driver's Python-level file opens (and directory scans) under a root between
    `start` and `stop`; audit hooks cannot be removed, so one is installed for the whole run."""

    WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC

    def __init__(self) -> None:
        self.root: str | None = None
        self.counts = {"reads": 0, "writes": 0, "scans": 0}
        sys.addaudithook(self._hook)

    def _hook(self, event: str, args: tuple) -> None:
        if self.root is None or event not in ("open", "os.scandir", "os.listdir"):
            return
        path = args[0] if args else None
        if isinstance(path, bytes):
            path = os.fsdecode(path)
        elif path is not None and not isinstance(path, (str, int)):
            try:
                path = os.fspath(path)
            except TypeError:
                return
        if not isinstance(path, str) or not os.path.abspath(path).startswith(self.root):
            return
        if event != "open":
            self.counts["scans"] += 1
            return
        mode, flags = (args[1], args[2]) if len(args) >= 3 else (None, 0)
        writes = (any(c in mode for c in "wax+") if isinstance(mode, str)
                  else bool((flags or 0) & self.WRITE_FLAGS))
        self.counts["writes" if writes else "reads"] += 1

    def start(self, root: Path) -> None:
        self.counts = {"reads": 0, "writes": 0, "scans": 0}
        self.root = str(Path(root).resolve()) + os.sep

    def stop(self) -> dict[str, int]:
        self.root = None
        return dict(self.counts)


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def count_files(folder: Path) -> tuple[int, int]:
    files = size = 0
    for base, _, names in os.walk(folder):
        for name in names:
            files += 1
            try:
                size += os.lstat(os.path.join(base, name)).st_size
            except OSError:
                pass
    return files, size


# ----------------------------------------------------------------------------- cluster


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_cluster(workers: int, head_cpus: int, worker_cpus: int):
    """Head + ``workers`` nodes on this machine, in a private RAY_TMPDIR (see
    tests/integration/test_cluster.py). Returns (cluster, its temp dir)."""
    temp_dir = tempfile.mkdtemp(prefix="icm-ray-", dir="/tmp")  # short: Ray's socket paths
    os.environ.update({"RAY_TMPDIR": temp_dir, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"})
    from ray.cluster_utils import Cluster

    store = 100 * MiB
    cluster = Cluster(initialize_head=True, head_node_args={
        "wait": False, "num_cpus": head_cpus, "num_gpus": 0, "include_dashboard": False,
        "dashboard_port": _free_port(),
        "object_store_memory": store, "dashboard_agent_listen_port": _free_port()})
    for _ in range(workers):
        cluster.add_node(wait=False, num_cpus=worker_cpus, num_gpus=0, object_store_memory=store,
                         dashboard_agent_listen_port=_free_port())
    cluster.wait_for_nodes(timeout=180)
    return cluster, temp_dir


def check_data_can_schedule(args) -> None:
    """Ray Data's read tasks need 1 whole CPU on one node. If the actors can be placed so that no
    node keeps 1 CPU free (e.g. 2 x 0.5-CPU actors on two 1-CPU nodes, one each), the task-vector
    job waits forever: jobs.task_vectors.check_actor_resources only checks a local Ray (it returns
    at once for any ray.address), so this checks the bench's cluster before starting anything."""
    usable = [c for c in [args.head_cpus] + [args.worker_cpus] * args.nodes if c >= 1]
    size = args.tv_cpus_per_actor
    needed = [int((c - 1) // size) + 1 for c in usable]  # actors that leave such a node < 1 CPU
    if all(k * size <= c for k, c in zip(needed, usable)) and args.tv_actors >= sum(needed):
        raise SystemExit(f"{args.tv_actors} task-vector actors x {size} CPU can leave no node of this "
                         "cluster with 1 CPU free for Ray Data's read tasks (it would hang): use fewer "
                         "--tv-actors, a smaller --tv-cpus-per-actor or more --worker-cpus.")


# ----------------------------------------------------------------------------- one N


def config_for(n_dir: Path, suite: Path, address: str, args):
    overrides = [
        "model.spec=tiny-llama", f"suite.path={suite}", "suite.tasks=null",
        f"storage.root={n_dir / 'run'}", f"ray.address={address}", "ray.include_dashboard=false",
        f"zoo.steps={args.steps}", f"zoo.snapshots={args.snapshots}", "zoo.snapshot_start=0",
        "zoo.warmup_steps=2", "zoo.batch_size=2", "zoo.seq_len=16", "zoo.eval_max_texts=2",
        f"zoo.multitask={str(args.multitask).lower()}", "zoo.num_workers=1", "zoo.cpus_per_worker=1",
        "task_vectors.k=2", "task_vectors.episodes=2", "task_vectors.max_prompt_tokens=128",
        "task_vectors.max_demo_chars=80", "task_vectors.batch_size=16",
        f"task_vectors.actors={args.tv_actors}", f"task_vectors.cpus_per_actor={args.tv_cpus_per_actor}"]
    if "data_memory_mb" in GeneratorConfig.model_fields:
        overrides.append(f"generator.data_memory_mb={args.data_memory_mb}")
    return load_config("smoke", overrides + list(args.overrides))


def generator_prep(cfg, suite: Path) -> dict:
    spec = json.dumps({"config": cfg.model_dump(mode="json"), "suite": str(suite)})
    # A fixed glibc mmap threshold: every block >= 128 KiB is its own mapping, returned on free.
    # glibc's default (a threshold that rises after frees) lets the measured phase reuse or not
    # reuse the warm-up's freed heap by chance: +-30 MB between identical runs at small N.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}
    out = subprocess.run([sys.executable, __file__, "--prep-child", spec], cwd=REPO, env=env,
                         capture_output=True, text=True)
    lines = [line for line in out.stdout.splitlines() if line.startswith("PREP ")]
    if out.returncode or not lines:
        raise SystemExit(f"generator preparation failed:\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}")
    return json.loads(lines[-1][5:])


def bench_one(n: int, args, cluster, opens: OpenCounter, work: Path) -> dict:
    import ray

    from icm.stages import open_suite
    from icm.zoo import write_manifest
    from jobs import task_vectors as tv_job
    from jobs import zoo as zoo_job
    from jobs.ray_setup import init_ray

    n_dir = work / f"n{n}"
    suite_dir = build_suite(n_dir / "suite", n, heldout=args.heldout, group_size=args.group_size)
    validate_suite(load_suite(suite_dir))  # what `icm tasks validate DIR` checks
    cfg = config_for(n_dir, suite_dir, cluster.address, args)
    suite = open_suite(cfg)
    init_ray(cfg.ray, cache_dir=cfg.model.cache_dir)  # joins the cluster once; later N: no-op
    warm_up(cfg)  # the first N's driver CPU without the one-time imports (later N: ~free)
    concurrency = min(zoo_job._concurrency(cfg), n)
    row: dict = {"N": n, "heldout": args.heldout, "concurrency": concurrency,
                 "cluster_cpus": ray.cluster_resources().get("CPU", 0)}

    print(f"\n== N={n}: zoo ({n} LoRAs, {concurrency} trainers at once)", flush=True)
    cpu0, started = cpu_seconds(), time.perf_counter()
    opens.start(cfg.storage.path())
    try:
        zoo_job.run(cfg, suite)
    finally:
        zoo_counts = opens.stop()
    zoo_wall, driver_cpu = time.perf_counter() - started, cpu_seconds() - cpu0
    zoo_root = cfg.storage.path("zoo")
    summary = pd.read_parquet(zoo_root / "summary.parquet")
    summary = summary[summary["task"].str.startswith("task-")]  # not the multi-task LoRA
    files, size = count_files(zoo_root)
    task_files, _ = count_files(zoo_root / "tasks")
    row.update({
        "zoo_wall_s": zoo_wall,
        "overhead_s_per_task": (zoo_wall - summary["wall_seconds"].sum() / concurrency) / n,
        "non_step_s_per_task": (zoo_wall - summary["train_seconds"].sum() / concurrency) / n,
        "driver_cpu_s_per_task": driver_cpu / n,
        "driver_opens_per_task": (zoo_counts["reads"] + zoo_counts["writes"]) / n,
        "driver_reads_per_task": zoo_counts["reads"] / n, "driver_writes_per_task": zoo_counts["writes"] / n,
        "driver_scans_per_task": zoo_counts["scans"] / n,
        "files_per_task": files / n, "task_folder_files_per_task": task_files / n,
        "zoo_mb": size / MiB,
        "worker_median": {k: float(summary[k].median()) for k in (
            "wall_seconds", "train_seconds", "setup_seconds", "base_eval_seconds", "snapshot_seconds",
            "checkpoint_seconds", "checkpoints")},
    })

    opens.start(zoo_root)
    started = time.perf_counter()
    manifest = write_manifest(zoo_root)
    row["manifest_s"] = time.perf_counter() - started
    manifest_counts = opens.stop()
    row["manifest_opens_per_task"] = (manifest_counts["reads"] + manifest_counts["writes"]) / n
    row["snapshots"] = int((manifest["kind"] == "task").sum())
    numel = json.loads((zoo_root / "zoo.json").read_text())["numel"]
    row["zoo_matrix_mb"] = row["snapshots"] * numel * 4 / MiB

    print(f"== N={n}: task vectors ({len(suite.tasks)} tasks)", flush=True)
    opens.start(cfg.storage.path())
    started = time.perf_counter()
    try:
        tv_job.run(cfg, suite)
    finally:
        tv_counts = opens.stop()
    row["tv_s"] = time.perf_counter() - started
    row["tv_s_per_task"] = row["tv_s"] / len(suite.tasks)
    row["tv_driver_opens_per_task"] = (tv_counts["reads"] + tv_counts["writes"]) / len(suite.tasks)

    print(f"== N={n}: generator data preparation (fresh process)", flush=True)
    prep = generator_prep(cfg, suite_dir)
    row.update({"gen_load_s": prep["load_s"], "gen_prep_s": prep["prep_s"],
                "prep_peak_mb": prep["total_peak_mb"], "prep_load_peak_mb": prep["load_peak_mb"],
                "prep_only_peak_mb": prep["prep_peak_mb"], "prep_held_mb": prep["held_mb"],
                "prep_model_floor_mb": prep["model_floor_mb"], "prep_baseline_mb": prep["baseline_mb"],
                "prep_peak_method": prep["method"], "prep_streamed": prep["streamed"],
                "data_memory_mb": getattr(cfg.generator, "data_memory_mb", None)})
    row["bench_s"] = None  # filled by the caller
    return row


# ----------------------------------------------------------------------------- report

COLUMNS = [  # (key, header, format, per-task column for the growth line)
    ("N", "N", "d", False),
    ("zoo_wall_s", "zoo wall s", ".1f", False),
    ("overhead_s_per_task", "overhead s/task", ".3f", True),
    ("non_step_s_per_task", "non-step s/task", ".3f", True),
    ("driver_cpu_s_per_task", "driver CPU s/task", ".3f", True),
    ("manifest_s", "manifest s", ".3f", False),
    ("manifest_s_per_task", "manifest ms/task", ".3f", True),
    ("driver_opens_per_task", "driver opens/task", ".2f", True),
    ("files_per_task", "files/task", ".1f", True),
    ("tv_s", "task-vector s", ".1f", False),
    ("tv_s_per_task", "task-vector s/task", ".3f", True),
    ("gen_load_s", "gen load s", ".2f", False),
    ("gen_prep_s", "gen prep s", ".2f", False),
    ("prep_peak_mb", "prep peak MB", ".1f", True),
    ("zoo_matrix_mb", "zoo matrix MB", ".1f", True),
]


MARGINAL = [("zoo_wall_per_task", "zoo wall s"), ("overhead_s_per_task", "overhead s"),
            ("driver_cpu_s_per_task", "driver CPU s"), ("driver_opens_per_task", "driver opens"),
            ("files_per_task", "files"), ("manifest_s_per_task", "manifest ms"),
            ("tv_s_per_task_n", "task-vector s")]


def report(rows: list[dict], args) -> str:
    for row in rows:
        row["manifest_s_per_task"] = 1000 * row["manifest_s"] / row["N"]
        row["zoo_wall_per_task"] = row["zoo_wall_s"] / row["N"]
        row["tv_s_per_task_n"] = row["tv_s"] / row["N"]  # per training task: the N steps apart
    table = tabulate([[row[k] for k, *_ in COLUMNS] for row in rows], headers=[h for _, h, *_ in COLUMNS],
                     tablefmt="github", floatfmt=[f for *_, f, _ in COLUMNS])
    first, last = rows[0], rows[-1]
    budget = last.get("data_memory_mb")
    lines = [f"Scale benchmark: tiny-llama, {args.steps} steps x {args.snapshots} snapshots per task, "
             f"head ({args.head_cpus} CPU) + {args.nodes} worker nodes x {args.worker_cpus} CPU, "
             f"{first['concurrency']} trainers at once; generator.data_memory_mb="
             f"{budget if budget is not None else 'n/a (no such field)'}.", "", table, ""]
    if len(rows) > 1:
        ratios = []
        for key, header, _, per_task in COLUMNS:
            if per_task and first[key]:
                ratios.append(f"{header} x{last[key] / first[key]:.2f}")
        lines.append(f"Growth N={first['N']} -> N={last['N']} (x{last['N'] / first['N']:.1f} tasks; "
                     "flat = x1.00): " + ", ".join(ratios))
        lines.append("Marginal cost per added task between successive N, (total(N2) - total(N1)) / "
                     "(N2 - N1): the fixed costs (trainer start-up, model loads) removed:")
        for key, label in MARGINAL:
            steps = [f"{a['N']}->{b['N']}: {(b[key] * b['N'] - a[key] * a['N']) / (b['N'] - a['N']):.3f}"
                     for a, b in zip(rows, rows[1:])]
            lines.append(f"  {label}: " + ", ".join(steps))
        lines.append("")
    phases = ("wall_seconds", "train_seconds", "setup_seconds", "base_eval_seconds", "snapshot_seconds",
              "checkpoint_seconds", "checkpoints")
    lines.append("Worker side, per task (medians of summary.parquet; checkpoint = DeepSpeed save + "
                 "Ray Train report, at the first step after zoo.checkpoint_interval_s has passed):\n")
    lines.append(tabulate([[row["N"], *(row["worker_median"][p] for p in phases),
                            row["task_folder_files_per_task"]] for row in rows],
                          headers=["N", "task wall s", "train s", "setup s", "base eval s", "snapshot s",
                                   "checkpoint s", "checkpoints", "task-folder files/task"],
                          tablefmt="github", floatfmt=".3f"))
    lines.append("\nDriver I/O per task and generator memory (MB: increase over the RSS before each "
                 "phase; model floor = one base-model build, inside load and total at every N):\n")
    lines.append(tabulate([[row["N"], row["driver_reads_per_task"], row["driver_writes_per_task"],
                            row["driver_scans_per_task"], row["manifest_opens_per_task"],
                            row["tv_driver_opens_per_task"], row["prep_load_peak_mb"],
                            row["prep_only_peak_mb"], row["prep_peak_mb"], row["prep_held_mb"],
                            row["prep_model_floor_mb"], row["zoo_matrix_mb"], row["prep_streamed"],
                            row["bench_s"]] for row in rows],
                          headers=["N", "zoo driver reads", "zoo driver writes", "zoo driver dir scans",
                                   "manifest opens", "task-vector driver opens", "load peak MB",
                                   "prep peak MB", "total peak MB", "held after MB", "model floor MB",
                                   "zoo matrix MB", "streamed", "bench s for this N"],
                          tablefmt="github", floatfmt=".3f"))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, nargs="+", default=[100, 300, 1000], help="suite sizes N")
    parser.add_argument("--nodes", type=int, default=2, help="worker nodes beside the head")
    parser.add_argument("--head-cpus", type=int, default=0)
    parser.add_argument("--worker-cpus", type=int, default=1)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--snapshots", type=int, default=8)
    parser.add_argument("--heldout", type=int, default=2, help="held-out tasks beside the N (fixed)")
    parser.add_argument("--group-size", type=int, default=10)
    parser.add_argument("--tv-actors", type=int, default=1, help="task_vectors.actors")
    parser.add_argument("--tv-cpus-per-actor", type=float, default=0.5, help="task_vectors.cpus_per_actor")
    parser.add_argument("--multitask", action="store_true", help="also train the multi-task LoRA")
    parser.add_argument("--data-memory-mb", type=int, default=64,
                        help="generator.data_memory_mb (only where GeneratorConfig has it)")
    parser.add_argument("--out", default=None, help="Markdown report path (JSON beside it)")
    parser.add_argument("--keep", action="store_true", help="keep the suites and storage roots")
    parser.add_argument("--workdir", default=None, help="where suites and roots go (default: a temp dir)")
    parser.add_argument("overrides", nargs="*", help="extra section.field=value overrides (before "
                        "--tasks, or after --, since --tasks takes every number after it)")
    args = parser.parse_args()
    if args.steps < 3:  # icm/lora_train.py deepspeed_config + DeepSpeed's WarmupLR (warm-up >= 2)
        parser.error("--steps must be >= 3: DeepSpeed's WarmupDecayLR runs the first 2 steps at lr 0, "
                     "so shorter runs leave every LoRA at its initialisation (and the generator "
                     "refuses a zoo of identical snapshots)")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    from icm.logs import quiet_known_noise

    quiet_known_noise()
    check_data_can_schedule(args)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-scale-")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    opens = OpenCounter()
    started = time.perf_counter()
    cluster, ray_tmp = start_cluster(args.nodes, args.head_cpus, args.worker_cpus)
    print(f"cluster up in {time.perf_counter() - started:.0f} s: {cluster.address}, work dir {work}",
          flush=True)
    rows = []
    try:
        for n in sorted(args.tasks):
            n_started = time.perf_counter()
            rows.append(bench_one(n, args, cluster, opens, work))
            rows[-1]["bench_s"] = time.perf_counter() - n_started
            print(f"== N={n} done in {rows[-1]['bench_s']:.0f} s", flush=True)
            if args.out:  # each N's figures survive a later N's crash or kill
                Path(args.out).with_suffix(".json").write_text(json.dumps(rows, indent=1, default=str) + "\n")
            if not args.keep:
                shutil.rmtree(work / f"n{n}", ignore_errors=True)
    finally:
        import ray

        ray.shutdown()
        cluster.shutdown()
        shutil.rmtree(ray_tmp, ignore_errors=True)
        if not args.keep and args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    text = report(rows, args)
    print("\n" + text)
    print(f"\nbench total {time.perf_counter() - started:.0f} s" + (f"; kept {work}" if args.keep else ""))
    if args.out:
        out = Path(args.out)
        out.write_text(text + "\n")
        out.with_suffix(".json").write_text(json.dumps(rows, indent=1, default=str) + "\n")
        print(f"wrote {out} and {out.with_suffix('.json')}")


if __name__ == "__main__":
    main()
