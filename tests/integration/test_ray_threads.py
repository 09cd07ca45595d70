"""How jobs/ray_setup sets up Ray workers, on a real local Ray: torch threads follow the CPUs a
task reserved, and workers look their own cluster up by address."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import ray

from jobs.ray_setup import use_reserved_cpus, with_reserved_threads


def torch_threads() -> tuple[int, int]:
    """(worker pid, torch's intra-op threads), importing torch in the worker."""
    import torch

    return os.getpid(), torch.get_num_threads()


@pytest.fixture
def two_cpu_ray():
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
    yield
    ray.shutdown()


def test_a_two_cpu_task_on_a_worker_reused_from_a_one_cpu_task_gets_two_threads(two_cpu_ray):
    one_cpu, two_cpu = ray.remote(num_cpus=1), ray.remote(num_cpus=2)
    first = ray.get([one_cpu(torch_threads).remote() for _ in range(2)])
    assert {threads for _, threads in first} == {1}  # torch fixed its count at import
    pid, threads = ray.get(two_cpu(with_reserved_threads(torch_threads)).remote())
    # the scenario of the defect: a reused worker, whose torch had fixed 1 thread at import
    assert pid in {pid for pid, _ in first}
    assert threads == 2
    # and back: a 1-CPU task on a worker left at 2 threads does not oversubscribe
    after = ray.get([one_cpu(with_reserved_threads(torch_threads)).remote() for _ in range(2)])
    assert {threads for _, threads in after} == {1}
    assert use_reserved_cpus() is None  # the driver is not a task: nothing to follow


def test_outside_ray_nothing_is_set_and_no_ray_is_started():
    ray.shutdown()  # a no-op unless an earlier test left its Ray up
    assert use_reserved_cpus() is None
    assert not ray.is_initialized()  # ray.get_runtime_context() alone would have started one


def test_workers_look_this_cluster_up_by_address_even_beside_another_ray():
    """Every worker gets RAY_ADDRESS = its own cluster's (`setup_worker`, the setup hook of
    `init_ray`). Ray Train's placement-group cleaner looks the cluster up by address; with a
    second Ray on the machine (a test beside a study run) that lookup raised "Found multiple
    active Ray instances" in its thread, and the cleaner stopped."""
    from ray._private.services import canonicalize_bootstrap_address_or_die

    from icm.config import RayConfig
    from jobs.ray_setup import init_ray

    ray.shutdown()
    init_ray(RayConfig(num_cpus=1, include_dashboard=False))
    try:
        ours = ray.get_runtime_context().gcs_address
        assert ray.get(ray.remote(lambda: os.environ.get("RAY_ADDRESS")).remote()) == ours
        looked_up = ray.remote(lambda: canonicalize_bootstrap_address_or_die(None))
        assert ray.get(looked_up.remote()) == ours
    finally:
        ray.shutdown()


@pytest.fixture
def another_ray(monkeypatch):
    """A Ray cluster of 1 CPU in another process, recorded as the machine's last `ray start`
    cluster (the file Ray's address auto-discovery reads, in a private RAY_TMPDIR): say, another
    run's cluster beside this job. Yields its GCS address."""
    code = ("import ray, time; ray.init(num_cpus=1, include_dashboard=False, "
            "logging_level='ERROR'); print(ray.get_runtime_context().gcs_address, flush=True); "
            "time.sleep(300)")
    other = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    temp = Path(tempfile.mkdtemp(prefix="r"))  # not tmp_path: Ray's socket paths must stay short
    try:
        address = other.stdout.readline().strip()
        assert address, "the other Ray did not start"
        (temp / "ray").mkdir()
        (temp / "ray" / "ray_current_cluster").write_text(address)
        monkeypatch.setenv("RAY_TMPDIR", str(temp))
        monkeypatch.delenv("RAY_ADDRESS", raising=False)
        yield address
    finally:
        ray.shutdown()
        other.terminate()
        other.wait(timeout=60)
        shutil.rmtree(temp, ignore_errors=True)


@pytest.mark.slow
def test_a_job_with_no_address_starts_its_own_ray_beside_a_ray_start_cluster(another_ray,
                                                                              monkeypatch):
    """With ray.address unset a job starts the local Ray it is sized for. Ray's own ray.init()
    would join the last `ray start` cluster and refuse num_cpus there; ray.address and
    $RAY_ADDRESS (what `ray job submit` sets) still join one."""
    from icm.config import RayConfig
    from jobs.ray_setup import init_ray

    ray.shutdown()
    init_ray(RayConfig(num_cpus=2, include_dashboard=False))
    assert ray.get_runtime_context().gcs_address != another_ray
    assert ray.cluster_resources()["CPU"] == 2
    ray.shutdown()
    monkeypatch.setenv("RAY_ADDRESS", another_ray)
    init_ray(RayConfig(include_dashboard=False))
    assert ray.get_runtime_context().gcs_address == another_ray
    assert ray.cluster_resources()["CPU"] == 1
