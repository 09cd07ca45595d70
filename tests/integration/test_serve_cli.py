"""`icm serve` as the README runs it: a new process that starts its own Ray and Serve."""

from __future__ import annotations

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


def test_icm_serve_answers_behind_haproxy(tmp_path):
    generator = build_tiny_generator(tmp_path / "generator")
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
        url, deadline = f"http://127.0.0.1:{port}", time.time() + 240
        while time.time() < deadline:
            assert server.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            try:
                if requests.get(url + "/healthz", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            time.sleep(1)
        reply = requests.post(url + "/v1/adapters", timeout=60,
                              json={"description": "Short texts about cats."})
        assert reply.status_code == 200, reply.text
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
