"""`icm serve` as the README runs it: a new process that starts its own Ray and Serve (and,
with the vLLM engine, its S3 server on loopback), then stops cleanly on SIGTERM."""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest
import requests

from tests.conftest import REPO_ROOT
from tests.integration.test_serve import build_tiny_generator, free_port, listeners

pytestmark = pytest.mark.slow

# engine "auto" (the default config): vLLM where it is installed, for a SmolLM2 generator
ENGINE = "vllm" if importlib.util.find_spec("vllm") else "hf"


def _engine_processes() -> list[str]:
    return [p.info["name"] for p in psutil.process_iter(["name"])
            if (p.info["name"] or "").startswith("VLLM::")]


def test_icm_serve_streams_a_completion_behind_haproxy(tmp_path, request):
    """The README's path on a fresh clone: icm serve with the default config, an adapter from a
    description, a completion streamed with it through the OpenAI client (vLLM), a clean stop."""
    generator = (request.getfixturevalue("smol_generator") if ENGINE == "vllm"
                 else build_tiny_generator(tmp_path / "generator"))
    port = free_port()
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    for key in [k for k in env if k.startswith("RAY_SERVE_")]:  # icm serve sets its own
        env.pop(key)
    log = open(tmp_path / "serve.log", "w")
    server = subprocess.Popen([sys.executable, "-m", "jobs.cli", "serve", "--generator", str(generator),
                               "--adapters", str(tmp_path / "adapters"), "--port", str(port)],
                              cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                              start_new_session=True)
    try:
        url, deadline = f"http://127.0.0.1:{port}", time.time() + 480  # a vLLM engine's start
        while time.time() < deadline:
            assert server.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            try:
                if requests.get(url + "/healthz", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            time.sleep(1)
        assert requests.get(url + "/healthz", timeout=10).json().get("engine", "hf") == ENGINE
        reply = requests.post(url + "/v1/adapters", timeout=60,
                              json={"description": "Short texts about cats."})
        assert reply.status_code == 200, reply.text
        if ENGINE == "vllm":
            from openai import OpenAI

            client = OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
            chunks = list(client.completions.create(model=reply.json()["model"], prompt="The cat",
                                                    max_tokens=8, temperature=0, stream=True))
            assert len(chunks) > 1 and "".join(c.choices[0].text for c in chunks if c.choices)
        owners = listeners(port)
        assert owners and {psutil.Process(p).name() for p in owners} == {"haproxy"}
    finally:
        server.send_signal(signal.SIGTERM)  # as a process manager stops it: a graceful shutdown
        try:
            stopped = server.wait(timeout=90) is not None
        except subprocess.TimeoutExpired:
            stopped = False
        if not stopped:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        log.close()
    assert stopped, "icm serve did not exit on SIGTERM"
    leftovers = listeners(port)
    for pid in leftovers:  # leave the machine clean for the next test, then fail
        psutil.Process(pid).kill()
    assert not leftovers, "a process (HAProxy) outlived icm serve and kept its port"
    assert not _engine_processes(), "vLLM engine processes outlived icm serve"
