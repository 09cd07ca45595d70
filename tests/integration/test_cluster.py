"""The jobs as cluster workloads, on this machine: a two-node Ray cluster runs the LoRA zoo across
both nodes, and a job submitted through the Ray Jobs API to a `ray start --head` cluster completes.

Both clusters live in a private temp dir (RAY_TMPDIR / --temp-dir) with their own ports, so that
other Ray instances on the machine neither see them (no /tmp/ray/ray_current_cluster to auto-join)
nor collide with them; each is torn down by killing exactly the processes it started, never with
a machine-wide `ray stop`.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import pytest
import requests

from tests.conftest import REPO_ROOT, make_suite

# Token-auth trap (Ray >= 2.59): `ray start --head` turns token auth on whenever ~/.ray/auth_token
# exists, and then every unauthenticated Jobs/Serve/state call fails. Local clusters and their
# clients both run with it disabled.
LOCAL_ENV = {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "HF_HUB_OFFLINE": "1"}
ZOO_FAST = ["zoo.steps=8", "zoo.seq_len=32", "zoo.batch_size=4", "zoo.eval_max_texts=2",
            "zoo.snapshots=2"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _private_ray_tmpdir() -> str:
    # Short on purpose: Ray's unix sockets live under it (path limit ~107 characters).
    return tempfile.mkdtemp(prefix="icm-ray-", dir="/tmp")


@pytest.fixture
def two_node_cluster(monkeypatch):
    """Head (1 CPU) + worker (1 CPU) in this process's private RAY_TMPDIR; shut down after."""
    from ray.cluster_utils import Cluster

    temp_dir = _private_ray_tmpdir()
    for key, value in {**LOCAL_ENV, "RAY_TMPDIR": temp_dir}.items():
        monkeypatch.setenv(key, value)
    # wait=False + one generous wait: on a busy 2-core box a node can take > 30 s to register.
    cluster = Cluster(initialize_head=True, head_node_args={
        "wait": False, "num_cpus": 1, "include_dashboard": False,
        "object_store_memory": 100 * 1024**2, "dashboard_agent_listen_port": _free_port()})
    try:
        cluster.add_node(wait=False, num_cpus=1, object_store_memory=100 * 1024**2)
        cluster.wait_for_nodes(timeout=120)
        yield cluster
    finally:
        cluster.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.mark.slow
def test_two_node_cluster_spreads_the_zoo_over_both_nodes(two_node_cluster, tmp_path):
    suite = make_suite(tmp_path / "suite")
    # Each trainer's single worker takes a whole 1-CPU node, and both run at once: the scheduler
    # must put one on each node. The driver joins the cluster instead of starting its own Ray.
    out = subprocess.run(
        [sys.executable, "-m", "jobs.zoo", "--config", "smoke", f"suite.path={suite}",
         f"storage.root={tmp_path / 'run'}", f"ray.address={two_node_cluster.address}",
         "suite.tasks=[cats,sums]", "zoo.multitask=false", "zoo.cpus_per_worker=1",
         "zoo.num_workers=1", "zoo.max_concurrent=2", *ZOO_FAST],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    manifest = pd.read_parquet(tmp_path / "run" / "zoo" / "manifest.parquet")
    assert sorted(manifest["task"].unique()) == ["cats", "sums"]
    cluster_nodes = {two_node_cluster.head_node.node_id,
                     *(node.node_id for node in two_node_cluster.worker_nodes)}
    assert set(manifest["node_id"]) == cluster_nodes  # 2 distinct nodes, both of this cluster
    assert manifest.groupby("task")["node_id"].nunique().eq(1).all()  # a task stays on its node


class LocalRayHead:
    """`ray start --head --block` in its own process group, private temp dir and ports.

    ``home`` replaces $HOME for the node (and the jobs it runs): Ray looks for its auth token in
    ``$HOME/.ray/auth_token``. The model cache stays where this process has it.
    """

    def __init__(self, home: Path, num_cpus: int = 2, env: dict | None = None):
        from icm.io import default_cache_dir

        self.temp_dir = _private_ray_tmpdir()
        self.port, self.dashboard_port = _free_port(), _free_port()
        # `python` in an entrypoint is the node's PATH python: this venv's, as on a set-up node.
        path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
        self.env = {**os.environ, "RAY_TMPDIR": self.temp_dir, "PATH": path, "HOME": str(home),
                    "ICM_CACHE_DIR": str(default_cache_dir()),
                    **(LOCAL_ENV if env is None else env)}
        command = [
            str(Path(sys.executable).with_name("ray")), "start", "--head", "--block",
            f"--num-cpus={num_cpus}", "--num-gpus=0", f"--port={self.port}",
            "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard_port}",
            f"--ray-client-server-port={_free_port()}",
            f"--dashboard-agent-listen-port={_free_port()}",
            f"--object-store-memory={200 * 1024**2}", f"--temp-dir={self.temp_dir}",
            "--disable-usage-stats"]
        self.log = open(Path(self.temp_dir) / "ray-start.log", "w")
        self.process = subprocess.Popen(command, env=self.env, stdout=self.log,
                                        stderr=subprocess.STDOUT, start_new_session=True)

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def wait_ready(self, timeout: float = 120) -> None:
        """Until the dashboard answers at all (it starts last); 401 counts, the test checks it."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            assert self.process.poll() is None, self.logs()
            try:
                requests.get(f"{self.dashboard_url}/api/version", timeout=2)
                return
            except requests.RequestException:
                time.sleep(1)
        raise TimeoutError(f"dashboard not up after {timeout} s\n{self.logs()}")

    def logs(self) -> str:
        self.log.flush()
        return (Path(self.temp_dir) / "ray-start.log").read_text()[-4000:]

    def stop(self) -> None:
        """SIGTERM to `ray start --block` stops its node (~3 s); then SIGKILL whatever is left
        in its process group (raylet workers included). Only processes this object started."""
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait()
        self.log.close()
        shutil.rmtree(self.temp_dir, ignore_errors=True)


# What Ray's Jobs API answers while the head's job agent has not registered yet (job_head.py
# waits WAIT_AVAILABLE_AGENT_TIMEOUT = 10 s for it, then gives up and asks the caller to retry).
NO_AGENT_YET = "No available agent to submit job, please try again later"


def submit_once_the_job_agent_is_up(client, timeout: float = 120, **job) -> str:
    """`client.submit_job(**job)`, retried only while the head says its job agent is not up.

    The dashboard answers HTTP before the head's job agent registers; on a busy 2-core box (CI
    runs the suite on two xdist workers) that can take longer than the head's 10 s wait. Nothing
    is created by such a refusal, so resubmitting is safe; any other error fails at once.
    """
    deadline = time.time() + timeout
    while True:
        try:
            return client.submit_job(**job)
        except RuntimeError as error:
            if NO_AGENT_YET not in str(error) or time.time() > deadline:
                raise
            time.sleep(2)


@pytest.fixture
def local_ray_head(monkeypatch, tmp_path_factory):
    for key, value in LOCAL_ENV.items():
        monkeypatch.setenv(key, value)  # the Jobs client in this process: same auth mode
    # Arm the trap: a token file where `ray start` looks, as on a machine that once ran ray.init().
    home = tmp_path_factory.mktemp("home")
    (home / ".ray").mkdir()
    (home / ".ray" / "auth_token").write_text(secrets.token_hex(32))
    head = LocalRayHead(home)
    try:
        head.wait_ready()
        yield head
    finally:
        head.stop()


@pytest.mark.slow
def test_a_job_submitted_through_the_jobs_api_completes(local_ray_head, tmp_path):
    from ray.job_submission import JobStatus, JobSubmissionClient

    # RAY_AUTH_MODE=disabled beat the token file: the Jobs API answers without a token.
    assert requests.get(f"{local_ray_head.dashboard_url}/api/jobs/", timeout=10).status_code == 200
    suite = make_suite(tmp_path / "suite")
    client = JobSubmissionClient(local_ray_head.dashboard_url)
    # What `ray job submit --working-dir . -- python -m jobs.base_eval ...` sends: the repo is
    # uploaded (.gitignore honoured) and the driver joins the cluster (ray.address=auto).
    job_id = submit_once_the_job_agent_is_up(
        client,
        entrypoint=(f"python -m jobs.base_eval --config smoke suite.path={suite} "
                    f"storage.root={tmp_path / 'run'} suite.tasks=null ray.address=auto "
                    "base_eval.max_texts=2"),
        runtime_env={"working_dir": str(REPO_ROOT)})
    deadline = time.time() + 240
    while (status := client.get_job_status(job_id)) not in {JobStatus.SUCCEEDED, JobStatus.FAILED,
                                                            JobStatus.STOPPED}:
        assert time.time() < deadline, client.get_job_logs(job_id)[-4000:]
        time.sleep(1)
    logs = client.get_job_logs(job_id)
    assert status == JobStatus.SUCCEEDED, logs[-4000:]
    results = pd.read_parquet(tmp_path / "run" / "base_eval" / "results.parquet")
    assert sorted(results["task"]) == ["cats", "code", "dogs", "sums"]
    assert "joining Ray cluster at auto" in logs  # the driver joined the cluster it was sent to
