"""How jobs start or join Ray: the worker env must not clash with a submitted job's runtime env."""

from __future__ import annotations

import json

from jobs.ray_setup import submitted_job_env_vars, worker_env_vars


def test_a_submitted_jobs_own_env_vars_are_left_to_the_job(monkeypatch):
    # Ray refuses to merge a driver's runtime env into the job's when both set a variable
    # ("Failed to merge the Job's runtime env"): the driver must leave those keys out.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", "/mnt/cluster_storage/hf")
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps(
        {"runtime_env": {"env_vars": {"HF_HUB_OFFLINE": "1", "HF_HOME": "/mnt/cluster_storage/hf"}}}))
    job_env = submitted_job_env_vars()
    assert job_env == {"HF_HUB_OFFLINE": "1", "HF_HOME": "/mnt/cluster_storage/hf"}
    env = worker_env_vars("/cache", job_env)
    assert "HF_HUB_OFFLINE" not in env and "HF_HOME" not in env and env["ICM_CACHE_DIR"] == "/cache"


def test_a_local_driver_passes_its_env_to_workers(monkeypatch):
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    assert submitted_job_env_vars() == {}
    env = worker_env_vars(None, {})
    assert env["HF_HUB_OFFLINE"] == "1" and env["ICM_CACHE_DIR"]
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", "not json")
    assert submitted_job_env_vars() == {}


def test_cpus_are_shared_out_in_whole_cpus_at_most_a_node_at_least_one():
    """generator.cpus_per_task: None shares the cluster's CPUs: alone on 2 CPUs a generator
    gets 2 (not 1, which left a core idle), 2 folds side by side get 1 each, 3 workers on 4
    CPUs get 1 (threads are whole), and never more than one node holds or fewer than 1."""
    from jobs.ray_setup import spread_cpus

    assert spread_cpus(1, total=2.0, largest_node=2.0) == 2.0
    assert spread_cpus(2, total=2.0, largest_node=2.0) == 1.0
    assert spread_cpus(3, total=4.0, largest_node=4.0) == 1.0
    assert spread_cpus(2, total=32.0, largest_node=8.0) == 8.0  # 4 nodes of 8: a worker is on one
    assert spread_cpus(5, total=2.0, largest_node=2.0) == 1.0  # more than CPUs: they queue
    assert spread_cpus(0, total=0.0, largest_node=0.0) == 1.0  # no CPU up yet (autoscaling)
