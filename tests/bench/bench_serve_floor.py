"""The HTTP latency floor of Ray Serve on this machine: a trivial FastAPI deployment (no model,
no I/O) answering the size of a cached ``POST /v1/adapters`` reply, 200 requests on one
keep-alive connection after 20 warm-up ones.

    RAY_AUTH_MODE=disabled python tests/bench/bench_serve_floor.py            # through Serve's proxy
    RAY_AUTH_MODE=disabled RAY_SERVE_ENABLE_DIRECT_INGRESS=1 python tests/bench/bench_serve_floor.py

With ``RAY_SERVE_ENABLE_DIRECT_INGRESS=1`` (experimental in Ray 2.60) the ingress replica serves
HTTP itself on a port the controller allocates from 30000 up; no proxy is started. Prints p50/p99.
"""
import os
import statistics
import time

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


def main() -> None:
    direct = os.environ.get("RAY_SERVE_ENABLE_DIRECT_INGRESS") == "1"
    ray.init(num_cpus=2, include_dashboard=False)
    serve.start(http_options={"host": "127.0.0.1", "port": 8123})
    serve.run(Echo.bind(), route_prefix="/")
    time.sleep(3)
    port = 8123
    if direct:
        for p in list(range(30000, 30050)) + [8000, 8123]:
            try:
                r = requests.post(f"http://127.0.0.1:{p}/v1/echo", json={"a": 1}, timeout=1)
                if r.ok: port = p; break
            except Exception:
                pass
    s = requests.Session()
    url = f"http://127.0.0.1:{port}/v1/echo"
    for _ in range(20): s.post(url, json={"description": "d" * 100})
    times = []
    for _ in range(200):
        t = time.perf_counter(); r = s.post(url, json={"description": "d" * 100}); times.append((time.perf_counter() - t) * 1000)
        assert r.ok
    times.sort()
    print(f"direct={direct} port={port} p50={statistics.median(times):.2f} ms p99={times[197]:.2f} ms")
    serve.shutdown(); ray.shutdown()


if __name__ == "__main__":
    main()
