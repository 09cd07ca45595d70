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
