"""The HTTP latency floor of Ray Serve on this machine, per ingress mode: a trivial FastAPI
deployment (no model, no I/O) answering the size of a cached ``POST /v1/adapters`` reply, 200
requests on one keep-alive connection after 20 warm-up ones, always on the one HTTP port
``serve.start`` was given.

    RAY_AUTH_MODE=disabled python tests/bench/bench_serve_floor.py [--modes proxy,haproxy,...]

Each mode runs in its own process with its own local Ray, because Serve reads these settings
from the environment when its processes start (``serve_apps.serve_env.SERVE_INGRESS_ENV`` lists them):

    proxy           Serve's HTTP proxy actor (the default)
    proxy-tuned     the proxy, user code on the replica's event loop, router in the caller's loop
    haproxy         HAProxy on the HTTP port, forwarding to the ingress replica's own server
    haproxy-tuned   HAProxy + the tuning above (what ``icm serve`` uses)

Prints p50/p99 per mode.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

PORT = 8123
MODES = {
    "proxy": {},
    "proxy-tuned": "tuned",
    "haproxy": {"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_HAPROXY_NBTHREAD": "1"},
    "haproxy-tuned": "all",
}


def mode_env(mode: str) -> dict[str, str]:
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
    from serve_apps.serve_env import SERVE_INGRESS_ENV, SERVE_LATENCY_ENV

    spec = MODES[mode]
    if spec == "tuned":
        return dict(SERVE_LATENCY_ENV)
    if spec == "all":
        return {**SERVE_LATENCY_ENV, **SERVE_INGRESS_ENV}
    return dict(spec)


def measure() -> dict:
    """Runs inside the mode's own process: start Ray + Serve, time 200 requests."""
    import ray
    import requests
    from fastapi import FastAPI
    from ray import serve

    app = FastAPI()

    @serve.deployment
    @serve.ingress(app)
    class Echo:
        @app.post("/v1/echo")
        async def echo(self, body: dict) -> dict:
            return {"id": "x" * 16, "cached": True}

    ray.init(num_cpus=2, include_dashboard=False)
    serve.start(http_options={"host": "127.0.0.1", "port": PORT})
    serve.run(Echo.bind(), route_prefix="/")
    session, url = requests.Session(), f"http://127.0.0.1:{PORT}/v1/echo"
    deadline = time.time() + 60
    while time.time() < deadline:  # HAProxy picks the replica up after its first health check
        try:
            if session.post(url, json={"a": 1}, timeout=2).ok:
                break
        except requests.RequestException:
            pass
        time.sleep(0.5)
    for _ in range(20):
        session.post(url, json={"description": "d" * 100})
    times = []
    for _ in range(200):
        started = time.perf_counter()
        reply = session.post(url, json={"description": "d" * 100})
        times.append((time.perf_counter() - started) * 1000)
        assert reply.ok, reply.text
    times.sort()
    serve.shutdown()
    ray.shutdown()
    return {"p50_ms": statistics.median(times), "p99_ms": times[197]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print("RESULT " + json.dumps(measure()), flush=True)
        return
    print("| ingress mode | p50 ms | p99 ms |\n|---|---:|---:|")
    for mode in args.modes.split(","):
        env = {**os.environ, "RAY_AUTH_MODE": "disabled", **mode_env(mode)}
        out = subprocess.run([sys.executable, __file__, "--child", mode], env=env,
                             capture_output=True, text=True, timeout=300)
        lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
        if not lines:
            print(f"| {mode} | failed | {out.stderr[-300:]!r} |")
            continue
        result = json.loads(lines[-1][len("RESULT "):])
        print(f"| {mode} | {result['p50_ms']:.2f} | {result['p99_ms']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
