"""Starting or joining Ray the same way in every job."""

from __future__ import annotations

import functools
import json
import logging
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, TypeVar

import ray

from icm.config import RayConfig
from icm.io import default_cache_dir
from icm.logs import LOG_LEVEL_ENV, quiet_known_noise, verbose

log = logging.getLogger(__name__)
Job = TypeVar("Job")

# Passed to every worker so that workers behave like the driver: no hub access, the same
# model cache, no usage reporting.
WORKER_ENV_KEYS = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "ICM_CACHE_DIR", "HF_HOME",
                   "DS_ACCELERATOR", "TORCH_EXTENSIONS_DIR", LOG_LEVEL_ENV)
# Every worker process runs this as it starts (`setup_worker`).
WORKER_SETUP_HOOK = "jobs.ray_setup.setup_worker"


def submitted_job_env_vars() -> dict[str, str]:
    """The env vars of the runtime env this driver was submitted with (``ray job submit``), if any.

    Ray refuses to merge a driver's runtime env into the job's when both set the same variable
    ("Failed to merge the Job's runtime env"), so those keys are left to the job's env.
    """
    raw = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    if not raw:
        return {}
    try:
        return dict((json.loads(raw).get("runtime_env") or {}).get("env_vars") or {})
    except (ValueError, AttributeError):
        return {}


def worker_env_vars(cache_dir: str | None, job_env: dict[str, str]) -> dict[str, str]:
    """What every worker needs to behave like the driver, minus what the job already sets."""
    env = {key: os.environ[key] for key in WORKER_ENV_KEYS if key in os.environ}
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("ICM_CACHE_DIR", str(cache_dir or default_cache_dir()))
    return {key: value for key, value in env.items() if key not in job_env}


def setup_worker() -> None:
    """Every worker process, as it starts: the known noise of other libraries filtered
    (icm/logs.py), and RAY_ADDRESS set to this cluster's. Ray's own helpers that look the
    cluster up by address (Ray Train's placement-group cleaner, the state API) otherwise fail
    with "Found multiple active Ray instances" whenever another Ray runs on the same machine."""
    quiet_known_noise()
    os.environ.setdefault("RAY_ADDRESS", ray.get_runtime_context().gcs_address)


def address_to_join(config: RayConfig) -> str | None:
    """The cluster a job joins: ``ray.address``, else $RAY_ADDRESS (`ray job submit` sets it for
    the job's driver); None: the job starts its own local Ray."""
    return config.address or os.environ.get("RAY_ADDRESS") or None


def init_ray(config: RayConfig, *, cache_dir: str | None = None) -> None:
    """Join `address_to_join`'s cluster or start a local Ray sized by ``config``."""
    if ray.is_initialized():
        return
    env = worker_env_vars(cache_dir, submitted_job_env_vars())
    runtime_env = {"env_vars": env, "worker_process_setup_hook": WORKER_SETUP_HOOK}
    if not verbose():  # Tune's console output (read by the driver when a Tuner runs):
        # its per-save advice about experiment-state syncing fires when two syncs are closer
        # than this many seconds, so 0 (not a large value) is off; and its new output engine
        # prints an experiment box even at verbose=0, the legacy one nothing (jobs.tune's
        # TrialProgress gives the progress line).
        os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
        os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    if address := address_to_join(config):
        log.info("joining Ray cluster at %s", address)
        ray.init(address=address, runtime_env=runtime_env, logging_level=_ray_log_level())
        return
    # Local clusters: token auth (on by default since Ray 2.59) only gets in the way of the
    # dashboard and job CLI on a single machine; clusters set RAY_AUTH_MODE=token themselves.
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # One node, no spot preemption: the watcher only adds an error line per trainer.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    store = config.object_store_memory_mb * 1024**2 if config.object_store_memory_mb else None
    # "local", not None: with no address Ray joins the last `ray start` cluster on this machine
    # (the ray_current_cluster file in Ray's temp dir), where num_cpus is refused and the job
    # would share another run's CPUs
    ray.init(address="local", num_cpus=config.num_cpus, num_gpus=config.num_gpus,
             object_store_memory=store, include_dashboard=config.include_dashboard,
             runtime_env=runtime_env, logging_level=_ray_log_level())
    log.info("started local Ray: %s", ray.cluster_resources())


def _ray_log_level() -> int:
    """Ray's own driver-side INFO lines ("Started a local Ray instance") only when verbose."""
    return logging.INFO if verbose() else logging.WARNING


def train_logging():
    """Ray Train's own log level: WARNING, so that "Checkpoint successfully created" and the
    like (one line per report per worker) stay out; INFO when verbose."""
    import ray.train

    return ray.train.LoggingConfig(log_level="INFO" if verbose() else "WARNING")


def use_reserved_cpus() -> int | None:
    """Set torch's intra-op threads to the CPUs Ray reserved for the calling task or actor;
    returns that count (None outside Ray, on the driver, or for a task that reserved no CPU).

    Ray sets ``OMP_NUM_THREADS`` to a task's CPUs, but it reuses worker processes across tasks
    of different sizes, and torch fixes its thread count at import: without this, a 2-CPU task
    on a worker first used by a 1-CPU task computes on one thread (and the reverse
    oversubscribes the node)."""
    if not ray.is_initialized():  # get_runtime_context() would start a local Ray
        return None
    try:
        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 0.0)
    except AssertionError:  # the driver: not inside a task or an actor
        return None
    if cpus <= 0:
        return None
    import torch

    threads = max(1, int(cpus))  # a fractional share still needs one thread
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return threads


def with_reserved_threads(fn):
    """``fn`` for ``ray.remote``: every call first sets torch's threads to its reserved CPUs
    (`use_reserved_cpus`)."""

    @functools.wraps(fn)
    def call(*args, **kwargs):
        use_reserved_cpus()
        return fn(*args, **kwargs)

    return call


def spread_cpus(count: int, total: float, largest_node: float) -> float:
    """CPUs for each of ``count`` tasks (or workers) run side by side on a cluster of ``total``
    CPUs whose largest node holds ``largest_node``: an equal share in whole CPUs (a thread is
    whole), at least 1 (more than there are CPUs: they queue), at most one node's."""
    share = int(total // max(count, 1))
    return float(max(1, min(share, int(largest_node))))


def cpus_each(count: int) -> float:
    """`spread_cpus` over the cluster as it is now (alive nodes only)."""
    nodes = [node["Resources"].get("CPU", 0.0) for node in ray.nodes() if node["Alive"]]
    return spread_cpus(count, ray.cluster_resources().get("CPU", 0.0), max(nodes, default=0.0))


def trainers_that_fit(resources: Mapping[str, float], workers: int, cpus_per_worker: float,
                      gpus_per_worker: float = 0.0) -> dict[str, int]:
    """How many trainers of ``workers`` x (``cpus_per_worker`` CPUs, ``gpus_per_worker`` GPUs)
    ``resources`` (the cluster now) hold side by side, per resource a trainer needs."""
    fit = {"CPU": int(resources.get("CPU", 1) // (workers * cpus_per_worker))}
    if gpus_per_worker:
        fit["GPU"] = int(resources.get("GPU", 0) // (workers * gpus_per_worker))
    return fit


def as_completed(submit: Callable[[Job], Any], jobs: Iterable[Job], limit: int
                 ) -> Iterator[tuple[Job, Any]]:
    """Submit ``jobs`` in order (``submit(job)`` returns an ObjectRef), at most ``limit`` in
    flight, and yield (job, result) as each finishes; the next job is submitted only after
    the caller has handled the one yielded."""
    todo, in_flight = list(jobs), {}
    while todo or in_flight:
        while todo and len(in_flight) < limit:
            job = todo.pop(0)
            in_flight[submit(job)] = job
        ready, _ = ray.wait(list(in_flight), num_returns=1)
        yield in_flight.pop(ready[0]), ray.get(ready[0])
