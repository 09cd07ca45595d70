"""Load and autoscaling benchmark of the serving app: loopback only, bounded, stops by itself.

    python tests/bench/bench_serve.py --generator icm-runs/demo/generator          # SmolLM2 demo
    python tests/bench/bench_serve.py --tiny --clients 4 --load-s 20 --adapters 8  # quick check
    python tests/bench/bench_serve.py --generator G --engine hf vllm   # the engines side by side

With ``--engine``: for each engine in turn, a fresh local Ray and the app with that engine
(``serve_config.yaml`` for vllm, with moto's S3 on loopback; ``serve_config_hf.yaml`` for hf),
``max(--adapter-counts)`` generated adapters, then for each of ``--concurrency`` x
``--adapter-counts`` that many completions of ``--engine-tokens`` tokens at once: tokens/s, p50/p99
time to first token (vllm streams; hf's is the whole request) and failures, then the vllm / hf
ratios. Otherwise:

Starts a local Ray and the app (hf engine, ``cluster/serve_config_hf.yaml``) on a free 127.0.0.1
port, then measures, in one run:
1. ``POST /v1/adapters`` latency p50/p99, uncached (``--adapters`` distinct requests, one after
   another) and cached (the same requests again, ``--repeats`` times each);
2. completion tokens/s of one client (greedy, ``--max-tokens`` per call, with an adapter);
3. ``--clients`` concurrent clients on ``/v1/completions`` for at most ``--load-s`` seconds: the
   time until Completions reaches ``max_replicas`` (scale-up); then one Completions replica is
   killed mid-load and the share of failed requests from then on is counted (goal <= 1%; 503
   rejections are counted apart) while load goes on until the replica is replaced; then load
   stops and the time until it is back at ``min_replicas`` is taken (scale-down, bounded by
   ``--downscale-timeout-s``; ``--downscale-delay-s`` overrides the config's delay).
Every loop has a deadline and a request cap. Prints Markdown tables (paste into BENCHMARKS.md).
Clients and server share this machine's cores, so throughput figures are lower bounds.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))  # run as a script from a checkout

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

APP = "icm"
PROMPT = "The cat"
MAX_REQUESTS = 20000  # hard cap on requests of any load phase


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def start_app(args, workdir: Path) -> str:
    import ray
    from ray import serve

    from serve_apps.lora_generator import app_from_config
    from tests.integration.test_serve import build_tiny_generator, free_port

    from serve_apps.serve_env import HF_SERVE_CONFIG, SERVE_INGRESS_ENV, SERVE_LATENCY_ENV

    generator = build_tiny_generator(workdir / "generator") if args.tiny else Path(args.generator)
    # As icm serve starts it: Serve reads these when its processes start.
    for key, value in {**SERVE_LATENCY_ENV,
                       **(SERVE_INGRESS_ENV if args.ingress == "haproxy" else {})}.items():
        os.environ.setdefault(key, value)
    ray.init(num_cpus=os.cpu_count(), num_gpus=0, include_dashboard=False,
             object_store_memory=300 * 1024**2)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    scaling = {"downscale_delay_s": args.downscale_delay_s} if args.downscale_delay_s else {}
    app, name, prefix = app_from_config(
        HF_SERVE_CONFIG, generator_dir=str(generator), adapter_dir=str(workdir / "adapters"),
        deployment_overrides={d: {"autoscaling_config": {**autoscaling_of(d), **scaling}}
                              for d in ("Completions", "TaskEncoder")} if scaling else None)
    started = time.perf_counter()
    serve.run(app, name=name, route_prefix=prefix)
    print(f"app ready in {time.perf_counter() - started:.1f} s on 127.0.0.1:{port}", flush=True)
    return f"http://127.0.0.1:{port}"


def autoscaling_of(deployment: str) -> dict:
    import yaml

    from serve_apps.serve_env import HF_SERVE_CONFIG as DEFAULT_CONFIG

    config = yaml.safe_load(DEFAULT_CONFIG.read_text())
    entries = config["applications"][0]["deployments"]
    return next(d for d in entries if d["name"] == deployment).get("autoscaling_config", {})


def timed_post(session: requests.Session, url: str, body: dict) -> tuple[float, requests.Response]:
    started = time.perf_counter()
    response = session.post(url, json=body, timeout=300)
    return time.perf_counter() - started, response


def adapter_latencies(url: str, count: int, repeats: int
                      ) -> tuple[list[float], list[float], list[float], str]:
    """Client-side seconds uncached and cached, server-side seconds cached, the last id."""
    session = requests.Session()
    requests_ = [{"description": f"Short texts about topic number {i}.",
                  "examples": [f"An example text about topic {i}.", "Another short text."],
                  "seed": i} for i in range(count)]
    uncached, cached, server, adapter_id = [], [], [], ""
    for body in requests_:
        seconds, response = timed_post(session, f"{url}/v1/adapters", body)
        response.raise_for_status()
        assert not response.json()["cached"], "bench storage was not empty"
        uncached.append(seconds)
        adapter_id = response.json()["adapter_id"]
    for _ in range(repeats):
        for body in requests_:
            seconds, response = timed_post(session, f"{url}/v1/adapters", body)
            assert response.json()["cached"]
            cached.append(seconds)
            server.append(response.json()["timings"]["request_s"])
    return uncached, cached, server, adapter_id


def completion_rate(url: str, model: str, max_tokens: int, calls: int) -> tuple[float, float]:
    """(tokens/s, p50 latency s) of one client, greedy."""
    session, tokens, seconds, latencies = requests.Session(), 0, 0.0, []
    body = {"model": model, "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0}
    for _ in range(calls):
        elapsed, response = timed_post(session, f"{url}/v1/completions", body)
        response.raise_for_status()
        tokens += response.json()["usage"]["completion_tokens"]
        seconds += elapsed
        latencies.append(elapsed)
    return tokens / seconds, statistics.median(latencies)


class Load:
    """``clients`` threads posting completions until stopped; outcomes with their times."""

    def __init__(self, url: str, model: str, clients: int, max_tokens: int):
        self.url, self.clients, self.stop = url, clients, threading.Event()
        self.body = {"model": model, "prompt": PROMPT, "max_tokens": max_tokens,
                     "temperature": 0.8}
        self.outcomes: list[tuple[float, int, float]] = []  # (end time, status, latency)
        self.lock = threading.Lock()
        self.pool = ThreadPoolExecutor(clients)

    def __enter__(self) -> Load:
        for _ in range(self.clients):
            self.pool.submit(self._client)
        return self

    def _client(self) -> None:
        session = requests.Session()
        while not self.stop.is_set() and len(self.outcomes) < MAX_REQUESTS:
            try:
                seconds, response = timed_post(session, f"{self.url}/v1/completions", self.body)
                status = response.status_code
            except requests.RequestException:
                seconds, status = 0.0, 599
            with self.lock:
                self.outcomes.append((time.monotonic(), status, seconds))

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.pool.shutdown(wait=True)

    def since(self, moment: float) -> list[int]:
        with self.lock:
            return [status for end, status, _ in self.outcomes if end >= moment]


def running_replicas(deployment: str) -> int:
    from ray import serve

    status = serve.status().applications[APP].deployments[deployment]
    return int(status.replica_states.get("RUNNING", 0))


def wait_for_replicas(deployment: str, target: int, timeout_s: float) -> float | None:
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        if running_replicas(deployment) == target:
            return time.monotonic() - started
        time.sleep(0.5)
    return None


def kill_one_replica(deployment: str) -> str:
    import ray

    names = [a for a in ray.util.list_named_actors(all_namespaces=True)
             if f"#{deployment}#" in a["name"]]
    victim = names[0]
    ray.kill(ray.get_actor(victim["name"], namespace=victim["namespace"]), no_restart=True)
    return victim["name"]


def scaling_and_kill(url: str, model: str, args) -> dict:
    """Load until max replicas, kill one, keep loading until it is replaced, stop, scale down."""
    scaling = autoscaling_of("Completions")
    low, high = scaling.get("min_replicas", 1), scaling.get("max_replicas", 1)
    result: dict = {"min": low, "max": high}
    with Load(url, model, args.clients, args.max_tokens) as load:
        load_started = time.monotonic()
        result["up_s"] = wait_for_replicas("Completions", high, args.load_s)
        if running_replicas("Completions") < 2:  # killing the only replica measures a restart
            raise SystemExit(f"Completions never reached 2 replicas in {args.load_s} s of load; "
                             "raise --clients or --load-s")
        killed_at = time.monotonic()
        result["killed"] = kill_one_replica("Completions")
        time.sleep(args.kill_window_s)
        left = max(1.0, args.load_s - (time.monotonic() - load_started))
        result["replaced_s"] = wait_for_replicas("Completions", high, left)
        after_kill, everything = load.since(killed_at), load.since(load_started)
    result["after_kill"] = len(after_kill)
    result["failed_after_kill"] = sum(s not in (200, 503) for s in after_kill)
    result["rejected_after_kill"] = sum(s == 503 for s in after_kill)
    result["total"] = len(everything)
    result["errors"] = sum(s not in (200, 503) for s in everything)
    result["rejected"] = sum(s == 503 for s in everything)
    result["down_s"] = (wait_for_replicas("Completions", low, args.downscale_timeout_s)
                        if running_replicas("Completions") == high else None)
    return result


def fmt(seconds: float | None, unit: float = 1000.0, digits: int = 1) -> str:
    return "timeout" if seconds is None else f"{seconds * unit:.{digits}f}"


def report(uncached, cached, server, rate, scaling, args) -> None:
    print("\n| POST /v1/adapters (HTTP round trip) | requests | p50 ms | p99 ms | goal |")
    print("|---|---|---|---|---|")
    print(f"| uncached (generate) | {len(uncached)} | {fmt(statistics.median(uncached))} | "
          f"{fmt(percentile(uncached, 99))} | <= 500 ms |")
    print(f"| cached (same request) | {len(cached)} | {fmt(statistics.median(cached))} | "
          f"{fmt(percentile(cached, 99))} | <= 10 ms |")
    print(f"| cached, inside the Ingress | {len(server)} | "
          f"{fmt(statistics.median(server), 1000, 2)} | {fmt(percentile(server, 99), 1000, 2)} | |")
    tokens_s, p50 = rate
    print(f"\n| completions, 1 client, greedy, {args.max_tokens} tokens | tokens/s | p50 s |")
    print("|---|---|---|")
    print(f"| with a generated adapter | {tokens_s:.1f} | {p50:.2f} |")
    share = scaling["failed_after_kill"] / max(1, scaling["after_kill"])
    print(f"\n| load: {args.clients} clients on /v1/completions | value |")
    print("|---|---|")
    print(f"| scale-up {scaling['min']} -> {scaling['max']} Completions replicas | "
          f"{fmt(scaling['up_s'], 1, 1)} s |")
    print(f"| requests after killing one replica | {scaling['after_kill']} |")
    replaced = scaling["replaced_s"]
    print(f"| killed replica replaced (after the {args.kill_window_s:.0f} s window) | "
          f"{fmt(None if replaced is None else replaced + args.kill_window_s, 1, 1)} s |")
    print(f"| failed after the kill (not 200/503) | {scaling['failed_after_kill']} "
          f"({share:.2%}; goal <= 1%) |")
    print(f"| 503 rejections after the kill | {scaling['rejected_after_kill']} |")
    print(f"| all load requests / errors / 503 | {scaling['total']} / {scaling['errors']} / "
          f"{scaling['rejected']} |")
    print(f"| scale-down {scaling['max']} -> {scaling['min']} after the load | "
          f"{fmt(scaling['down_s'], 1, 1)} s |")


# ----------------------------------------------------------------------------- engines side by side

ENGINE_PROMPTS = ["The cat", "Once upon a time", "The recipe needs", "In the morning we"]


def start_engine_app(engine: str, generator: Path, workdir: Path, max_tokens: int, stack) -> str:
    """The app with one completions engine, started the way `icm serve --engine` starts it
    (the vLLM one with moto's S3 on loopback, stopped by ``stack``), on a fresh local Ray."""
    import ray
    from ray import serve

    from serve_apps.lora_generator import app_from_config
    from serve_apps.serve_env import DEFAULT_SERVE_CONFIG, HF_SERVE_CONFIG
    from tests.integration.test_serve import free_port

    extra = {}
    if engine == "vllm":
        from icm.object_store import LocalS3

        s3 = stack.enter_context(LocalS3(bucket=f"bench-{os.getpid()}"))
        extra = {"vllm": {"adapter_uri": f"{s3.uri}/adapters", "device": "cpu", "cpus": 0.8,
                          "max_loras": 16, "max_num_seqs": 64, "max_model_len": 512}}
    ray.init(num_cpus=os.cpu_count(), num_gpus=0, include_dashboard=False,
             object_store_memory=300 * 1024**2)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    app, name, prefix = app_from_config(
        DEFAULT_SERVE_CONFIG if engine == "vllm" else HF_SERVE_CONFIG, engine=engine,
        generator_dir=str(generator), adapter_dir=str(workdir / "adapters"),
        limits={"max_tokens": max_tokens}, **extra,
        deployment_overrides={"Completions": {"max_ongoing_requests": 64, "max_queued_requests": 256},
                              "LLMServer": {"max_queued_requests": 256}})
    serve.run(app, name=name, route_prefix=prefix)
    return f"http://127.0.0.1:{port}"


def one_completion(client, model: str, index: int, max_tokens: int, stream: bool) -> dict:
    """A sampled completion (sampling: greedy text can end early at EOS); seconds to its first
    token (streamed) or to the whole answer (hf: no streaming), completion tokens."""
    started = time.perf_counter()
    body = dict(model=model, prompt=ENGINE_PROMPTS[index % len(ENGINE_PROMPTS)],
                max_tokens=max_tokens, temperature=1.0, seed=index)
    try:
        if not stream:
            result = client.completions.create(**body)
            return {"ttft": time.perf_counter() - started, "tokens": result.usage.completion_tokens}
        first, tokens = None, 0
        for chunk in client.completions.create(**body, stream=True,
                                               stream_options={"include_usage": True}):
            if first is None and chunk.choices and chunk.choices[0].text:
                first = time.perf_counter() - started
            if chunk.usage is not None:
                tokens = chunk.usage.completion_tokens
        return {"ttft": first if first is not None else time.perf_counter() - started,
                "tokens": tokens}
    except Exception as err:  # noqa: BLE001 - a failure is a measured outcome here
        return {"error": f"{type(err).__name__}: {err}"[:200]}


def engine_rows(engine: str, url: str, args) -> list[dict]:
    from openai import OpenAI

    client = OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=600)
    models = []
    for i in range(max(args.adapter_counts)):
        reply = requests.post(url + "/v1/adapters", timeout=300, json={
            "description": f"Short texts on topic number {i}.", "seed": i})
        reply.raise_for_status()
        models.append(reply.json()["model"])
    for model in models:  # load every adapter once: the cells time decoding, not first loads
        one_completion(client, model, 0, 4, stream=False)
    rows = []
    for concurrency in args.concurrency:
        if engine == "hf" and concurrency > args.hf_max_concurrency:
            continue
        for count in args.adapter_counts:
            if engine == "hf" and count > args.hf_max_adapters:
                continue
            started = time.perf_counter()
            with ThreadPoolExecutor(concurrency) as pool:
                results = list(pool.map(lambda i: one_completion(
                    client, models[i % count], i, args.engine_tokens, stream=engine == "vllm"),
                    range(concurrency)))
            wall = time.perf_counter() - started
            ok = [r for r in results if "error" not in r]
            ttft = [r["ttft"] for r in ok]
            rows.append({"engine": engine, "concurrency": concurrency, "adapters": count,
                         "tokens": sum(r["tokens"] for r in ok), "wall_s": wall,
                         "tokens_per_s": sum(r["tokens"] for r in ok) / wall,
                         "ttft_p50": percentile(ttft, 50) if ttft else None,
                         "ttft_p99": percentile(ttft, 99) if ttft else None,
                         "failures": len(results) - len(ok),
                         "errors": sorted({r["error"] for r in results if "error" in r})[:2]})
            print(rows[-1], flush=True)
    return rows


def engines_report(rows: list[dict]) -> None:
    print("\n| engine | concurrent | adapters | tokens | wall s | tokens/s | TTFT p50 s | TTFT p99 s | failures |")
    print("|:--|--:|--:|--:|--:|--:|--:|--:|--:|")
    for r in rows:
        print(f"| {r['engine']} | {r['concurrency']} | {r['adapters']} | {r['tokens']} | "
              f"{r['wall_s']:.1f} | {r['tokens_per_s']:.1f} | {fmt(r['ttft_p50'], 1, 2)} | "
              f"{fmt(r['ttft_p99'], 1, 2)} | {r['failures']} |")
    by = {(r["engine"], r["concurrency"], r["adapters"]): r["tokens_per_s"] for r in rows}
    for (engine, concurrency, count), rate in sorted(by.items()):
        base = by.get(("hf", concurrency, count))
        if engine == "vllm" and base:
            print(f"vllm / hf tokens/s at {concurrency} concurrent, {count} adapter(s): "
                  f"{rate / base:.1f}x")
    print("(hf answers without streaming: its 'TTFT' is the whole request.)")


def run_engines(args) -> int:
    import ray
    from ray import serve

    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-engines-") as workdir:
        for engine in args.engine:
            with contextlib.ExitStack() as stack:
                try:
                    url = start_engine_app(engine, Path(args.generator), Path(workdir) / engine,
                                           args.engine_tokens, stack)
                    rows += engine_rows(engine, url, args)
                finally:
                    serve.shutdown()
                    ray.shutdown()
    engines_report(rows)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--generator", help="generator artifact (e.g. icm-runs/demo/generator)")
    which.add_argument("--tiny", action="store_true", help="train a tiny-llama generator first")
    parser.add_argument("--adapters", type=int, default=20, help="distinct adapter requests")
    parser.add_argument("--repeats", type=int, default=5, help="cached repeats of each")
    parser.add_argument("--max-tokens", type=int, default=32, help="tokens per completion")
    parser.add_argument("--calls", type=int, default=10, help="single-client completion calls")
    parser.add_argument("--clients", type=int, default=8, help="concurrent load clients")
    parser.add_argument("--load-s", type=float, default=120, help="max seconds of load")
    parser.add_argument("--kill-window-s", type=float, default=20,
                        help="seconds of load after killing a replica")
    parser.add_argument("--downscale-delay-s", type=float, default=None,
                        help="override the config's downscale_delay_s (default: keep it)")
    parser.add_argument("--downscale-timeout-s", type=float, default=180)
    parser.add_argument("--ingress", choices=("haproxy", "proxy"), default="haproxy",
                        help="HTTP entry: HAProxy (what icm serve uses) or Serve's proxy actor")
    parser.add_argument("--engine", nargs="+", choices=("vllm", "hf"), default=None, help=(
        "instead of the load test: completions throughput of these engines side by side "
        "(--concurrency x --adapter-counts requests of --engine-tokens tokens), needs --generator"))
    parser.add_argument("--concurrency", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--adapter-counts", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--engine-tokens", type=int, default=64)
    parser.add_argument("--hf-max-concurrency", type=int, default=16,
                        help="skip hf cells above this (~5 tok/s: 64 x 64 tokens take 14 min)")
    parser.add_argument("--hf-max-adapters", type=int, default=16)
    args = parser.parse_args(argv)
    if args.engine:
        if not args.generator:
            parser.error("--engine needs --generator (a SmolLM2 generator: vLLM loads weights from disk)")
        return run_engines(args)
    import ray
    from ray import serve

    with tempfile.TemporaryDirectory(prefix="bench-serve-") as workdir:
        try:
            url = start_app(args, Path(workdir))
            uncached, cached, server, adapter_id = adapter_latencies(url, args.adapters,
                                                                     args.repeats)
            model = f"icm:{adapter_id}"
            rate = completion_rate(url, model, args.max_tokens, args.calls)
            scaling = scaling_and_kill(url, model, args)
            report(uncached, cached, server, rate, scaling, args)
        finally:
            serve.shutdown()
            ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
