"""The serving app end to end: real Ray Serve, real HTTP on loopback, a real tiny-llama generator.

One module-scoped app (deployment options from cluster/serve_config_hf.yaml; only the Completions
queue is shrunk so that overload can be provoked), tests run serially against it. The generator
is trained here in seconds: LoRA fine-tunes of tiny-llama on three tiny tasks (the zoo), their
episode task vectors from the same `TaskEncoder` the jobs use, and a small CVAE.
"""

from __future__ import annotations

import contextlib
import json
import random
import re
import socket
import subprocess
import sys
import tarfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from tests.conftest import TINY_TASKS

pytestmark = pytest.mark.slow

GENERATOR_TASKS = ("cats", "sums", "code")


def build_tiny_generator(out_dir: Path, *, tasks=GENERATOR_TASKS, steps: int = 12,
                         snapshots: int = 4, model_spec: str = "tiny-llama",
                         prompted_lm_steps: int = 0) -> Path:
    """Train a LoRA zoo of ``model_spec`` (tiny-llama: seconds; smollm2: ~1 min), task vectors
    and a CVAE generator; save it to ``out_dir``. With ``prompted_lm_steps``, that many steps
    of the LM phase under the prompt follow (objective lm, lm_context prompt: a generator
    whose adapters are read after their task's prompt)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: threads only contend on a shared 2-core box (5x)
    try:
        return _train_tiny_generator(out_dir, tasks, steps, snapshots, model_spec,
                                     prompted_lm_steps)
    finally:
        torch.set_num_threads(threads)


def _prompted_lm_phase(generator, model_spec: str, conditions, prompts, steps: int):
    """`steps` LM steps with lm_context prompt, each text read after its condition's prompt."""
    from icm.generator.lm import FunctionalLora, fit_lm, lm_tasks
    from icm.models import load_base_model

    cfg = generator.config.model_copy(update={
        "objective": "lm", "lm_context": "prompt", "lm_steps": steps, "lm_tasks": 2,
        "lm_texts": 2, "lm_seq_len": 32, "report_every": steps})
    model, tokenizer = load_base_model(model_spec)
    texts = {task: TINY_TASKS[task][1] for task in conditions}
    tasks = lm_tasks(texts, conditions, generator, tokenizer, cfg, prompts)
    fit_lm(generator, FunctionalLora(model, generator.peft_config, generator.layout), tasks, cfg,
           pad_id=tokenizer.pad_token_id or 0)
    generator.config = cfg  # what jobs/generator_lm.py's finetune stores with the generator
    return generator


def _train_tiny_generator(out_dir: Path, tasks, steps: int, snapshots: int, model_spec: str,
                          prompted_lm_steps: int = 0) -> Path:
    import numpy as np
    import torch
    from peft import set_peft_model_state_dict

    from icm.config import GeneratorConfig, TaskVectorConfig, ZooConfig
    from icm.generator import train_generator
    from icm.generator.inputs import ZooData
    from icm.generator.lm import EpisodePrompt
    from icm.lora_io import LoraLayout, adapter_state_dict, flatten, peft_config_json
    from icm.lora_train import batch_for_step, build_lora_model, tokenize_texts
    from icm.models import load_base_model
    from icm.task_vectors import TaskEncoder, format_prompt

    zoo_cfg = ZooConfig(rank=4, alpha=8, dropout=0.0, steps=steps, snapshots=snapshots)
    model, tokenizer = load_base_model(model_spec)
    peft_model = build_lora_model(model, zoo_cfg)
    init = adapter_state_dict(peft_model)
    layout = LoraLayout.of(init)
    vectors = {}
    for task in tasks:  # one model, LoRA reset to the shared initialisation per task
        set_peft_model_state_dict(peft_model, init)
        peft_model.train()
        sequences = tokenize_texts(tokenizer, TINY_TASKS[task][1], 64)
        optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad],
                                      lr=2e-2)
        kept = []
        for step in range(1, steps + 1):
            batch = batch_for_step(sequences, step=step, batch_size=4, seed=0,
                                   pad_id=tokenizer.pad_token_id)
            peft_model(**batch).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            if step > steps - snapshots:
                kept.append(flatten(adapter_state_dict(peft_model), layout))
        vectors[task] = torch.stack(kept)  # (S, L)
    peft_model.eval()
    tv_cfg = TaskVectorConfig(k=3, episodes=4, modes=["both"], layers=[-1], poolings=["mean"],
                              max_prompt_tokens=256, max_demo_chars=200)
    conditions, episodes = {}, {}
    with peft_model.disable_adapter():
        encoder = TaskEncoder(peft_model.base_model.model, tokenizer, tv_cfg)
        for task in tasks:
            texts = TINY_TASKS[task][1]
            demos = [tuple(random.Random(f"{task}:{e}").sample(texts, 3))
                     for e in range(tv_cfg.episodes)]
            episodes[task] = [EpisodePrompt(format_prompt(f"Short texts about {task}.", shown,
                                                          mode="both"), shown) for shown in demos]
            conditions[task] = encoder.encode_prompts(  # (E, D)
                [p.prompt for p in episodes[task]])[(-1, "mean")]
    peft_config = peft_config_json(peft_model.peft_config["default"])
    zoo = ZooData(layout, vectors, model_spec, peft_config, zoo_cfg.model_dump(mode="json"))
    gen_cfg = GeneratorConfig(subspace_dim=4, latent_dim=4, width=32, depth=1, steps=150,
                              batch_size=16, val_tasks=0, val_snapshots=0, kl_warmup_steps=20,
                              lr=3e-3, report_every=150, basis_dtype="float32")
    tv_json = tv_cfg.model_dump(mode="json")
    spec = {"modes": ["both"], "layer": -1, "pooling": "mean", "model_spec": model_spec,
            "task_vectors": tv_json}
    conditions = {t: np.asarray(c) for t, c in conditions.items()}
    generator = train_generator(zoo, conditions, gen_cfg, condition_spec=spec)
    if prompted_lm_steps:
        generator = _prompted_lm_phase(generator, model_spec, conditions, episodes,
                                       prompted_lm_steps)
    return generator.save(out_dir)


def peft_greedy(folder: Path, ids: list[int], max_tokens: int,
                model_spec: str = "tiny-llama") -> str:
    """Hugging Face + peft on an adapter folder, greedy from token ``ids``: the text a server
    that sends those ids to the same adapter must answer."""
    import torch
    from peft import PeftModel

    from icm.models import load_base_model

    model, tokenizer = load_base_model(model_spec)
    peft_model = PeftModel.from_pretrained(model, str(folder)).eval()
    prompt = torch.tensor([ids])  # (1, T)
    with torch.inference_mode():
        out = peft_model.generate(prompt, attention_mask=torch.ones_like(prompt),
                                  max_new_tokens=max_tokens, do_sample=False,
                                  pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, len(ids):], skip_special_tokens=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Served:
    url: str
    generator_dir: Path
    adapter_dir: Path
    base_model: str

    def post(self, path: str, body, **kwargs) -> requests.Response:
        return requests.post(self.url + path, json=body, timeout=120, **kwargs)

    def adapter(self, body: dict) -> dict:
        response = self.post("/v1/adapters", body)
        assert response.status_code == 200, response.text
        return response.json()


@contextlib.contextmanager
def serving(root: Path, generator_dir: Path, **overrides):
    """Ray and the hf Serve app of ``generator_dir`` as `icm serve` starts it (HAProxy in
    front), on a free loopback port; ``overrides`` go to `app_from_config`."""
    import ray
    from ray import serve

    from serve_apps.lora_generator import app_from_config

    from serve_apps.serve_env import HF_SERVE_CONFIG, SERVE_INGRESS_ENV, SERVE_LATENCY_ENV

    with pytest.MonkeyPatch.context() as patch:
        for key, value in {**SERVE_LATENCY_ENV, **SERVE_INGRESS_ENV}.items():
            patch.setenv(key, value)
        ray.init(num_cpus=2, num_gpus=0, object_store_memory=200 * 1024**2, include_dashboard=False)
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        app, name, prefix = app_from_config(
            HF_SERVE_CONFIG, generator_dir=str(generator_dir), adapter_dir=str(root / "adapters"),
            limits={"max_tokens": 32, "max_examples": 8, "max_samples": 4}, **overrides)
        serve.run(app, name=name, route_prefix=prefix)
        yield Served(f"http://127.0.0.1:{port}", generator_dir, root / "adapters", "tiny-llama")
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    with serving(root, build_tiny_generator(root / "generator"), deployment_overrides={
            "Completions": {  # a tiny queue: overload is easy to provoke
                "max_ongoing_requests": 1, "max_queued_requests": 1,
                "autoscaling_config": {"min_replicas": 1, "max_replicas": 1}}}) as app:
        yield app


CATS = {"description": "Short texts about cats.",
        "examples": ["The cat sat on the warm mat.", "A grey cat chased the red ball."]}


def test_openai_client_completes_with_a_generated_adapter(served):
    from openai import OpenAI

    adapter = served.adapter({**CATS, "samples": 2, "seed": 1})
    assert adapter["cached"] is False and adapter["model"] == f"icm:{adapter['adapter_id']}"
    assert {"encode_s", "sample_s", "select_s", "write_s"} <= set(adapter["timings"])
    client = OpenAI(base_url=served.url + "/v1", api_key="unused", max_retries=0)
    prompt = "The cat"

    def complete(model: str) -> str:
        result = client.completions.create(model=model, prompt=prompt, max_tokens=12,
                                           temperature=0)
        assert result.usage.completion_tokens >= 1 and result.choices[0].finish_reason
        return result.choices[0].text

    adapted, base = complete(adapter["model"]), complete(served.base_model)
    assert adapted != base, "the generated adapter did not change the greedy text"
    assert complete(adapter["model"]) == adapted  # greedy decoding is deterministic
    chat = client.chat.completions.create(
        model=adapter["model"], messages=[{"role": "user", "content": "Tell me about cats."}],
        max_tokens=8, temperature=0.8, seed=3, n=2)
    assert len(chat.choices) == 2 and all(isinstance(c.message.content, str) for c in chat.choices)
    listed = {m.id for m in client.models.list().data}
    assert {served.base_model, adapter["model"]} <= listed


def test_downloaded_adapter_loads_in_peft_and_matches_the_server(served, tmp_path):
    from icm.models import load_tokenizer, text_start_token_id

    adapter = served.adapter({**CATS, "seed": 2})
    response = requests.get(f"{served.url}/v1/adapters/{adapter['adapter_id']}", timeout=60)
    assert response.status_code == 200 and response.headers["content-type"] == "application/gzip"
    archive = tmp_path / "adapter.tar.gz"
    archive.write_bytes(response.content)
    with tarfile.open(archive) as tar:
        tar.extractall(tmp_path, filter="data")
    folder = tmp_path / adapter["adapter_id"]
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in
                                                                    folder.iterdir()}
    tokenizer = load_tokenizer("tiny-llama")
    local = peft_greedy(folder, [text_start_token_id(tokenizer),
                                 *tokenizer("The cat", add_special_tokens=False)["input_ids"]], 10)
    served_text = served.post("/v1/completions", {"model": adapter["model"], "prompt": "The cat",
                                                  "max_tokens": 10, "temperature": 0})
    assert served_text.json()["choices"][0]["text"] == local


def test_the_same_request_returns_the_same_adapter_from_the_cache(served):
    request = {"description": "Texts about dogs and walks.", "examples": ["The dog ran."],
               "seed": 5}
    first = served.adapter(request)
    again = served.adapter({**request, "description": "  Texts about dogs and walks. "})
    assert again["adapter_id"] == first["adapter_id"] and again["cached"] is True
    assert served.adapter({**request, "seed": 6})["adapter_id"] != first["adapter_id"]
    record = served.adapter_dir / first["adapter_id"] / "icm_generation.json"
    stored = json.loads(record.read_text())
    assert stored["request"]["description"] == request["description"]
    # the condition scale: 1 is the same request; another is another adapter, recorded
    assert served.adapter({**request, "condition_scale": 1.0})["adapter_id"] == first["adapter_id"]
    half = served.adapter({**request, "condition_scale": 0.5})
    assert half["adapter_id"] != first["adapter_id"] and half["cached"] is False
    folder = served.adapter_dir / half["adapter_id"]
    assert json.loads((folder / "icm_generation.json").read_text())["request"][
        "condition_scale"] == 0.5

    def same_weights(one, other) -> bool:
        import torch
        from safetensors.torch import load_file

        a, b = (load_file(served.adapter_dir / adapter_id / "adapter_model.safetensors")
                for adapter_id in (one, other))
        return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    assert not same_weights(half["adapter_id"], first["adapter_id"])
    # scale 0: the generator's blind mode, one adapter whatever the task
    blind = [served.adapter({**request, "description": text, "condition_scale": 0.0})["adapter_id"]
             for text in ("Texts about dogs and walks.", "Sums of small numbers.")]
    assert blind[0] != blind[1] and same_weights(*blind)


def test_concurrent_identical_requests_generate_once(served):
    request = {"description": "Sums of small numbers.", "examples": ["1 + 2 = 3", "4 + 4 = 8"],
               "samples": 3, "seed": 11}
    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(lambda _: served.adapter(request), range(6)))
    assert len({r["adapter_id"] for r in results}) == 1
    assert sum(not r["cached"] for r in results) == 1, results


BAD_REQUESTS = [  # (method, path, body, status, the field the error names)
    ("post", "/v1/adapters", {"description": ""}, 400, "description"),
    ("post", "/v1/adapters", {"description": "x" * 2001}, 400, "description"),
    ("post", "/v1/adapters", {}, 400, "description"),
    ("post", "/v1/adapters", {"examples": ["a"] * 9}, 400, "examples"),
    ("post", "/v1/adapters", {"examples": ["ok", "y" * 4001]}, 400, "examples[1]"),
    ("post", "/v1/adapters", {"examples": ["ok", "  "]}, 400, "examples[1]"),
    ("post", "/v1/adapters", {"description": "a", "samples": "many"}, 400, "samples"),
    ("post", "/v1/adapters", {"description": "a", "samples": 5}, 400, "samples"),
    ("post", "/v1/adapters", {"description": "a", "samples": 2}, 400, "samples"),
    ("post", "/v1/adapters", {"description": "a", "seed": -1}, 400, "seed"),
    ("post", "/v1/adapters", {"description": "a", "condition_scale": 3}, 400, "condition_scale"),
    ("post", "/v1/adapters", {"description": 3}, 400, "description"),
    ("post", "/v1/adapters", {"description": "a", "colour": "red"}, 400, "colour"),
    ("post", "/v1/adapters", "{not json", 400, "body"),
    ("get", "/v1/adapters/" + "0" * 24, None, 404, "adapter_id"),
    ("get", "/v1/adapters/not-an-id", None, 400, "adapter_id"),
    ("get", "/v1/adapters/..%2F..%2Fetc", None, 404, None),  # no route: never a file path
    ("post", "/v1/completions", {"model": "icm:" + "0" * 24, "prompt": "x"}, 404, "model"),
    ("post", "/v1/completions", {"model": "icm:nope", "prompt": "x"}, 400, "model"),
    ("post", "/v1/completions", {"model": "gpt-4", "prompt": "x"}, 404, "model"),
    ("post", "/v1/completions", {"model": "tiny-llama", "prompt": "x", "temperature": 2.5}, 400,
     "temperature"),
    ("post", "/v1/completions", {"model": "tiny-llama", "prompt": "x", "top_p": 0}, 400, "top_p"),
    ("post", "/v1/completions", {"model": "tiny-llama", "prompt": "x", "max_tokens": 33}, 400,
     "max_tokens"),
    ("post", "/v1/completions", {"model": "tiny-llama", "prompt": "x", "n": 5}, 400, "n"),
    ("post", "/v1/completions", {"model": "tiny-llama", "prompt": []}, 400, "prompt"),
    ("post", "/v1/completions", {"model": "tiny-llama", "prompt": "x" * 16001}, 400, "prompt"),
    ("post", "/v1/completions", {"model": "tiny-llama", "prompt": "x", "stream": True}, 400,
     "stream"),
    ("post", "/v1/completions", {"model": "tiny-llama", "prompt": "x", "stop": [""]}, 400, "stop"),
    ("post", "/v1/chat/completions", {"model": "tiny-llama", "messages": []}, 400, "messages"),
    ("post", "/v1/chat/completions", {"model": "tiny-llama", "messages": [{"role": "robot",
                                      "content": "x"}]}, 400, "messages.0.role"),
]


def test_bad_inputs_get_a_4xx_naming_the_field(served):
    failures = []
    for method, path, body, status, field in BAD_REQUESTS:
        if isinstance(body, str):
            response = requests.post(served.url + path, data=body, timeout=30,
                                     headers={"content-type": "application/json"})
        else:
            response = requests.request(method, served.url + path, json=body, timeout=30)
        error = response.json().get("error", {}) if response.content else {}
        if response.status_code != status or error.get("param") != field:
            failures.append((path, body if not isinstance(body, dict) else
                             {k: str(v)[:20] for k, v in body.items()},
                             response.status_code, response.text[:160]))
    assert not failures, failures


def test_overload_answers_503_with_retry_after_not_a_hang(served):
    body = {"model": served.base_model, "prompt": "Once upon a time", "max_tokens": 32,
            "temperature": 0.9}
    started = time.monotonic()
    with ThreadPoolExecutor(12) as pool:
        responses = list(pool.map(lambda _: served.post("/v1/completions", body), range(12)))
    codes = [r.status_code for r in responses]
    assert set(codes) <= {200, 503} and 200 in codes and 503 in codes, codes
    rejected = next(r for r in responses if r.status_code == 503)
    assert int(rejected.headers["Retry-After"]) >= 1
    assert time.monotonic() - started < 60


def test_health_openapi_and_prometheus_metrics(served):
    import ray

    from icm.serving import PINNED_GENERATORS_DIR, generator_fingerprint

    health = requests.get(served.url + "/healthz", timeout=10)
    assert health.status_code == 200 and health.json()["status"] == "ok"
    # The replicas serve a content-named copy of the generator, not the folder a rerun rewrites.
    pinned = list((served.adapter_dir / PINNED_GENERATORS_DIR).iterdir())
    fingerprint = generator_fingerprint(served.generator_dir)
    assert [p.name for p in pinned] == [fingerprint[:32]]
    assert health.json()["generator"] == fingerprint[:16]
    paths = requests.get(served.url + "/openapi.json", timeout=10).json()["paths"]
    assert {"/v1/adapters", "/v1/adapters/{adapter_id}", "/v1/completions",
            "/v1/chat/completions", "/healthz"} <= set(paths)
    served.adapter(CATS)
    served.adapter(CATS)  # a hit
    port = ray._private.worker.global_worker.node.metrics_export_port
    wanted = ("icm_adapter_cache_hits_total", "icm_adapter_cache_misses_total",
              "icm_adapter_generation_seconds", "serve_num_http_requests")
    deadline, text = time.monotonic() + 60, ""
    while time.monotonic() < deadline:
        text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        if all(name in text for name in wanted):
            break
        time.sleep(2)
    assert all(name in text for name in wanted), [n for n in wanted if n not in text]


def test_fuzzing_the_openapi_schema_finds_no_server_errors(served, tmp_path):
    """Schemathesis generates valid and invalid requests for every operation: no 5xx."""
    command = [sys.executable, "-m", "schemathesis.cli", "run", f"{served.url}/openapi.json",
               "--checks", "not_a_server_error", "--max-examples", "12",
               "--seed", "0", "--workers", "1", "--request-timeout", "60",
               "--generation-database", "none"]
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=240)
    report = result.stdout[-4000:] + result.stderr[-2000:]
    print(report)
    assert result.returncode == 0, report
    passed = re.search(r"(\d+) passed", report)
    assert passed and int(passed.group(1)) > 0 and " failed" not in report, report


def listeners(port: int) -> set[int]:
    """Pids of the processes listening on ``port`` on this machine."""
    import psutil

    return {c.pid for c in psutil.net_connections("tcp")
            if c.status == psutil.CONN_LISTEN and c.laddr.port == port}


def test_http_port_is_served_by_haproxy_as_icm_serve_starts_it(served):
    """SERVE_INGRESS_ENV is in effect: an HAProxy process owns the HTTP port (no proxy hop)."""
    import psutil

    owners = listeners(int(served.url.rsplit(":", 1)[1]))
    assert owners and {psutil.Process(pid).name() for pid in owners} == {"haproxy"}, owners
    assert served.post("/v1/adapters", CATS).status_code == 200
