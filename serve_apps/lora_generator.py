"""Ray Serve app: a task's description or examples in, a generated peft LoRA adapter out, and
OpenAI-compatible completions with that adapter. No fine-tuning happens at request time.

    serve run cluster/serve_config.yaml                     # every deployment's values from YAML
    icm serve --generator icm-runs/demo/generator           # the same YAML, generator dir from CLI
    serve run serve_apps.lora_generator:build_app generator_dir=icm-runs/demo/generator  # no YAML

Export ``RAY_AUTH_MODE=disabled`` for a local Ray (see docs: token-auth trap). Deployments, each
a thin shell over ``icm``:

* ``TaskEncoder``: the frozen base LM; description/examples -> task vector through
  `icm.generate.AdapterFactory` (the same `TaskEncoder` code as the batch job), and the demo
  perplexity of sampled adapters when a request asks for best-of-K.
* ``AdapterGenerator``: the CVAE generator; task vector -> adapter written in peft format under
  ``adapter_dir/<adapter_id>``. The id is a content hash of the request and the generator, so a
  repeat is a cache hit; identical requests in flight generate once (per replica an in-flight
  map, across replicas a file lock per id).
* ``Completions``: the base LM with an adapter applied per request; ``@serve.multiplexed`` keeps
  an LRU of loaded adapters per replica and routes an adapter's requests to replicas holding it.
* ``Ingress``: FastAPI; validates every request (4xx naming the field) before any model sees it.

Autoscaling, queue limits (503 + Retry-After on overload) and health checks are set per
deployment in ``cluster/serve_config.yaml``; `app_from_config` applies the same file in Python.
"""

import asyncio
import functools
import importlib.util
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import yaml
from fastapi import FastAPI, Path as PathParam, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from ray import serve
from ray.serve import metrics
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from ray.serve.handle import DeploymentHandle

from icm.errors import InputError
from icm.serving import (ADAPTER_ID_PATTERN, ADAPTER_MODEL_PREFIX, GENERATION_RECORD,
                         AdapterRequest, AdapterResponse, AdapterSpec, AdapterStore, ChatChoice,
                         ChatCompletionRequest, ChatCompletionResponse, CompletionChoice,
                         CompletionEngine, CompletionRequest, CompletionResponse, ErrorResponse,
                         Generated, ModelCard, ModelList, PromptBuilder, SamplingParams,
                         ServeInputError, ServeLimits, Usage, adapter_id_for,
                         check_adapter_request, check_messages, check_prompts, check_sampling,
                         completion_id, error_body, generator_fingerprint, now,
                         pack_adapter, parse_model, pin_generator)
from serve_apps.serve_env import DEFAULT_SERVE_CONFIG as DEFAULT_CONFIG
from serve_apps.vllm_args import VllmArgs
from serve_apps.serve_env import HF_SERVE_CONFIG, SERVE_INGRESS_ENV, SERVE_LATENCY_ENV

log = logging.getLogger(__name__)
LATENCY_BUCKETS_S = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60]


class GeneratorAppArgs(BaseModel):
    """Arguments of `build_app` (the ``args:`` of an application in the Serve config)."""

    model_config = ConfigDict(extra="forbid")

    generator_dir: str = Field(description="Generator artifact (``<storage.root>/generator``).")
    adapter_dir: str | None = Field(None, description=(
        "Where generated adapters are stored (local or shared path); None: ``served_adapters`` "
        "beside the generator. Relative paths resolve against the directory Ray started in."))
    cache_dir: str | None = Field(None, description="Model cache (None: $ICM_CACHE_DIR/default).")
    model_dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description=(
        "Weights dtype of the base model in TaskEncoder and Completions replicas: bfloat16 on "
        "GPUs (placed on the replica's GPU when it has one), float32 on CPU."))
    max_adapters_per_replica: int = Field(8, ge=1, description=(
        "Adapters each Completions replica keeps loaded (the multiplexing LRU)."))
    limits: ServeLimits = Field(default_factory=ServeLimits, description="Request limits.")
    engine: Literal["auto", "vllm", "hf"] = Field("auto", description=(
        "Completions engine: 'vllm' = Ray Serve LLM's LLMServer (vLLM: batched multi-LoRA); "
        "'hf' = the Completions deployment (transformers generate, one sequence at a time); "
        "'auto' = vllm where it is installed and the model has weights on disk (not "
        "tiny-llama), else hf."))
    vllm: VllmArgs = Field(default_factory=VllmArgs, description="The vLLM engine's settings.")

    def engine_name(self, model_spec: str) -> str:
        """'vllm' or 'hf' ('auto' resolved in this process: the one that builds the app)."""
        from icm.models import TINY_LLAMA

        if self.engine != "auto":
            return self.engine
        installed = importlib.util.find_spec("vllm") is not None
        return "vllm" if installed and model_spec != TINY_LLAMA else "hf"

    @property
    def publish_uri(self) -> str | None:
        """Where generated adapters are published: the vLLM engine loads them from
        ``vllm.adapter_uri``; the hf engine reads the store (None). Ask `resolved` args."""
        return self.vllm.adapter_uri if self.engine == "vllm" else None

    def resolved(self, model_spec: str | None = None) -> "GeneratorAppArgs":
        """Absolute paths and the engine chosen for the generator's base model (``model_spec``;
        None: read from the generator). Raises: InputError for a bad generator dir."""
        generator = Path(self.generator_dir).expanduser().resolve()
        if model_spec is None:
            from icm.generator import LoraGenerator

            model_spec = LoraGenerator.load(generator).model_spec
        adapters = Path(self.adapter_dir).expanduser() if self.adapter_dir else (
            generator.parent / "served_adapters")
        return self.model_copy(update={"generator_dir": str(generator),
                                       "adapter_dir": str(adapters.resolve()),
                                       "engine": self.engine_name(model_spec)})


def _in_thread(lock: threading.Lock, function, *args):
    """Run blocking model code off the event loop (health checks and routing stay responsive)."""
    def locked():
        with lock:
            return function(*args)
    return asyncio.to_thread(locked)


# ----------------------------------------------------------------------------- deployments


@serve.deployment(name="TaskEncoder")
class TaskEncoderDeployment:
    """Base LM -> task vector (and demo perplexities of sampled adapters)."""

    def __init__(self, generator_dir: str, cache_dir: str | None, dtype: str = "float32"):
        from icm.generate import AdapterFactory

        self.factory = AdapterFactory(generator_dir, cache_dir=cache_dir, dtype=dtype)
        self.lock = threading.Lock()  # the encoder and the scorer share one wrapped model
        self.factory.task_vector("Warm-up.", None)  # the first forward pass is slow: not a user's

    async def encode(self, description: str | None, examples: list[str]
                     ) -> tuple[np.ndarray, str]:
        """The request's condition vector, (D,) at the generator's pooling, and the in-context
        prompt it was read from."""
        return await _in_thread(self.lock, self.factory.encode_request, description,
                                examples or None)

    async def demo_perplexities(self, draws, examples: list[str]) -> list[float]:
        """Perplexity of each draw (K, L) on the examples."""
        return await _in_thread(self.lock, self.factory.demo_perplexities, draws, examples)

    def check_health(self) -> None:
        if self.factory.swap.model is None:
            raise RuntimeError("base model is not loaded")


@serve.deployment(name="AdapterGenerator")
class AdapterGeneratorDeployment:
    """Task vector -> peft adapter under its content-hash id, generated once per id."""

    def __init__(self, encoder: DeploymentHandle, generator_dir: str, adapter_dir: str,
                 publish_uri: str | None = None, lock_timeout_s: float = 300.0):
        from icm.generator import LoraGenerator

        self.encoder, self.lock_timeout_s = encoder, lock_timeout_s
        self.publish_uri = publish_uri  # where the vLLM engine loads adapters from (s3://...)
        self.generator = LoraGenerator.load(generator_dir)
        self.store = AdapterStore(adapter_dir)
        self.inflight: dict[str, asyncio.Task] = {}
        self.lock = threading.Lock()
        self.latency = metrics.Histogram(
            "icm_adapter_generation_seconds", description="Seconds to generate one adapter.",
            boundaries=LATENCY_BUCKETS_S)
        self.joined = metrics.Counter(
            "icm_adapter_inflight_joins_total",
            description="Requests that waited for an identical in-flight generation.")

    async def create(self, adapter_id: str, spec: dict[str, Any]) -> dict[str, Any]:
        """The adapter of ``spec`` under ``adapter_id``: ``{cached, timings}``."""
        task = self.inflight.get(adapter_id)
        joined = task is not None  # an identical request is generating it right now
        if joined:
            self.joined.inc()
        else:  # a task of its own: a caller that disconnects does not cancel it for the others
            task = asyncio.ensure_future(self._create_once(adapter_id, AdapterSpec(**spec)))
            self.inflight[adapter_id] = task
            task.add_done_callback(lambda _: self.inflight.pop(adapter_id, None))
        result = await asyncio.shield(task)
        return {**result, "cached": True} if joined else result

    async def _create_once(self, adapter_id: str, spec: AdapterSpec) -> dict[str, Any]:
        deadline = time.monotonic() + self.lock_timeout_s
        while time.monotonic() < deadline:
            with self.store.try_lock(adapter_id) as acquired:
                if self.store.ready(adapter_id, self.publish_uri):
                    return {"cached": True, "timings": {}}
                if acquired and self.store.exists(adapter_id):  # its publish failed: retry it
                    return {"cached": True, "timings": await self._publish(adapter_id)}
                if acquired:
                    return await self._generate(adapter_id, spec)
            await asyncio.sleep(0.05)  # another replica is generating this id
        raise TimeoutError(f"adapter {adapter_id}: another replica held its lock for "
                           f"{self.lock_timeout_s:.0f} s")

    async def _generate(self, adapter_id: str, spec: AdapterSpec) -> dict[str, Any]:
        timings, started = {}, time.perf_counter()
        condition, context_prompt = await self.encoder.encode.remote(
            spec.description, list(spec.examples))
        condition = np.array(condition)  # a writable copy, (D,)
        timings["encode_s"] = time.perf_counter() - started
        mark = time.perf_counter()
        draws = await _in_thread(self.lock, lambda: self.generator.sample(
            condition, num_samples=spec.samples, seed=spec.seed,
            condition_scale=spec.condition_scale))  # (K, L)
        timings["sample_s"] = time.perf_counter() - mark
        chosen, perplexities = 0, []
        if spec.samples > 1 and spec.select == "demo-ppl":
            mark = time.perf_counter()
            perplexities = await self.encoder.demo_perplexities.remote(draws, list(spec.examples))
            chosen = int(np.argmin(perplexities))
            timings["select_s"] = time.perf_counter() - mark
        mark = time.perf_counter()
        record = {"request": spec.as_json(), "adapter_id": adapter_id, "chosen_sample": chosen,
                  "demo_perplexities": perplexities, "timings": dict(timings),
                  "context_prompt": context_prompt}
        await _in_thread(self.lock, lambda: self.generator.write_adapter(
            draws[chosen], self.store.path(adapter_id), extra={GENERATION_RECORD: record}))
        timings["write_s"] = time.perf_counter() - mark
        timings.update(await self._publish(adapter_id))
        timings["total_s"] = time.perf_counter() - started
        self.latency.observe(timings["total_s"])
        return {"cached": False, "timings": timings}

    async def _publish(self, adapter_id: str) -> dict[str, float]:
        """Publish to the vLLM engine's adapter URI (none with the hf engine): ``{publish_s}``."""
        if not self.publish_uri:
            return {}
        mark = time.perf_counter()
        await asyncio.to_thread(self.store.publish, adapter_id, self.publish_uri)
        return {"publish_s": time.perf_counter() - mark}

    def check_health(self) -> None:
        from icm.io import probe_writable

        probe_writable(self.store.root)  # an unwritable store fails every generation


def completions_deployment(max_adapters: int):
    """The Completions deployment class; the LRU size is a decorator argument, hence a factory."""

    @serve.deployment(name="Completions")
    class CompletionsDeployment:
        """The base LM with the request's adapter copied in (multiplexed LRU per replica)."""

        def __init__(self, generator_dir: str, adapter_dir: str, cache_dir: str | None,
                     dtype: str = "float32"):
            from icm.generator import LoraGenerator
            from icm.models import load_base_model

            generator = LoraGenerator.load(generator_dir)
            model, tokenizer = load_base_model(generator.model_spec, cache_dir=cache_dir, dtype=dtype)
            self.engine = CompletionEngine(model, tokenizer, generator.peft_config,
                                           generator.layout)
            self.store = AdapterStore(adapter_dir)
            warm_up = SamplingParams(1, 0.0, 1.0, 1, (), None)  # the first generate is slow
            self.engine.generate([tokenizer.eos_token_id], warm_up, None)
            self.tokens = metrics.Counter("icm_completion_tokens_total",
                                          description="Tokens generated by completions.")

        @serve.multiplexed(max_num_models_per_replica=max_adapters)
        async def get_adapter(self, adapter_id: str):
            folder = self.store.require(adapter_id, param="model")
            return await asyncio.to_thread(self.engine.load_adapter, folder)  # (L,)

        async def complete(self, prompts: list[list[int]], params: SamplingParams
                           ) -> list[list[Generated]]:
            adapter_id = serve.get_multiplexed_model_id()
            adapter = await self.get_adapter(adapter_id) if adapter_id else None
            results = await asyncio.to_thread(
                lambda: [self.engine.generate(ids, params, adapter) for ids in prompts])
            self.tokens.inc(sum(g.tokens for choices in results for g in choices))
            return results

        def check_health(self) -> None:
            if self.engine.swap.model is None:
                raise RuntimeError("base model is not loaded")

    return CompletionsDeployment


# ----------------------------------------------------------------------------- HTTP ingress

api = FastAPI(title="icm-ray", version="0.1.0", description=(
    "A task's description or examples in, a generated peft LoRA adapter out; OpenAI-compatible "
    "completions with it (`model`: the base model or `icm:<adapter_id>`)."))
ERRORS = {400: {"model": ErrorResponse, "description": "Bad input; `error.param` names the field."},
          404: {"model": ErrorResponse, "description": "Unknown adapter id or model."},
          503: {"model": ErrorResponse, "description": "Overloaded; retry after `Retry-After` s."}}


@api.exception_handler(RequestValidationError)
async def _validation_error(request: Request, err: RequestValidationError) -> JSONResponse:
    problems = []
    for e in err.errors():
        loc = [str(p) for p in e.get("loc", ()) if p not in ("body", "path", "query")]
        if e.get("type") == "json_invalid":  # its loc is a character offset, not a field
            loc = []
        problems.append((".".join(loc) or "body", e.get("msg", "invalid")))
    message = "; ".join(f"'{field}': {msg}" for field, msg in problems)
    return JSONResponse(error_body(message, param=problems[0][0]), status_code=400)


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
    return JSONResponse(error_body(str(err.detail), param=None), status_code=err.status_code,
                        headers=getattr(err, "headers", None))


@api.exception_handler(InputError)
async def _input_error(request: Request, err: InputError) -> JSONResponse:
    original = getattr(err, "cause", None) or err  # raised in a replica: Ray keeps it as .cause
    return JSONResponse(error_body(str(original), param=getattr(original, "param", None),
                                   code=getattr(original, "code", None)),
                        status_code=getattr(original, "status_code", 400))


@api.exception_handler(BackPressureError)
async def _overloaded(request: Request, err: BackPressureError) -> JSONResponse:
    # args: (queued, max_queued, status_code, retry_after_s), kept across process boundaries
    status = err.args[2] if len(err.args) > 2 and err.args[2] in (429, 503) else 503
    retry = err.args[3] if len(err.args) > 3 and err.args[3] else 1
    body = error_body(f"server overloaded: {err}", param=None, error_type="overloaded")
    return JSONResponse(body, status_code=status, headers={"Retry-After": str(int(np.ceil(retry)))})


@api.exception_handler(DeploymentUnavailableError)
@api.exception_handler(TimeoutError)
async def _unavailable(request: Request, err: Exception) -> JSONResponse:
    return JSONResponse(error_body(str(err), param=None, error_type="unavailable"),
                        status_code=503, headers={"Retry-After": "5"})


# Helpers the Ingress uses are defined above it: Serve serialises the class when it is decorated.
async def _retrying(call, attempts: int = 3):
    """Await ``call()``, again when the replica serving it died mid-request (a scale-down or a
    crash): every call here is idempotent, so a retry on a live replica is safe."""
    from ray.exceptions import ActorDiedError, ActorUnavailableError

    for attempt in range(attempts):
        try:
            return await call()
        except (ActorDiedError, ActorUnavailableError):
            if attempt == attempts - 1:
                raise
            log.warning("replica died mid-request; retrying (%d/%d)", attempt + 1, attempts - 1)
            await asyncio.sleep(0.2 * (attempt + 1))


def _usage(ids: list[list[int]], results: list[list[Generated]]) -> Usage:
    prompt = sum(len(i) for i in ids)
    completion = sum(g.tokens for row in results for g in row)
    return Usage(prompt_tokens=prompt, completion_tokens=completion,
                 total_tokens=prompt + completion)


class AdapterFront:
    """The adapter half of an ingress (both engines): validation, cache hits answered from the
    store, the rest sent to the AdapterGenerator; archives of stored adapters."""

    def __init__(self, generator: DeploymentHandle, args: GeneratorAppArgs, model_prefix: str):
        from icm.generator import LoraGenerator

        self.generator, self.limits, self.model_prefix = generator, args.limits, model_prefix
        self.fingerprint = generator_fingerprint(args.generator_dir)
        self.encoder_dtype = args.model_dtype
        self.publish_uri = args.publish_uri
        self.store = AdapterStore(args.adapter_dir)
        self.base_model = LoraGenerator.load(args.generator_dir).model_spec
        # ids are content hashes: an adapter's context prompt never changes once read
        self._context_prompt = functools.lru_cache(maxsize=4096)(self.store.context_prompt)
        self.hits = metrics.Counter("icm_adapter_cache_hits_total",
                                    description="POST /v1/adapters answered from storage.")
        self.misses = metrics.Counter("icm_adapter_cache_misses_total",
                                      description="POST /v1/adapters sent to the generator.")
        self.request_latency = metrics.Histogram(
            "icm_adapter_request_seconds", description="POST /v1/adapters latency (hit or miss).",
            boundaries=LATENCY_BUCKETS_S, tag_keys=("cached",))

    def context_prompt(self, adapter_id: str | None) -> str | None:
        """What completions with ``adapter_id`` read the caller's text after: its context prompt
        where its generator was trained to have it read after one (`AdapterStore.
        context_prompt`), else None (the base model too)."""
        return None if adapter_id is None else self._context_prompt(adapter_id)

    def refuse_chat(self, adapter_id: str | None) -> None:
        """Chat has no place for an adapter's context prompt: such adapters complete text only."""
        if self.context_prompt(adapter_id) is not None:
            raise ServeInputError(
                f"adapter {adapter_id} is read after its task's in-context prompt (the generator "
                "was trained with generator.lm_context: prompt), which a chat template has no "
                "place for. Fix: use /v1/completions with this model.", param="model")

    async def create(self, request: AdapterRequest) -> AdapterResponse:
        started = time.perf_counter()
        spec = check_adapter_request(request, self.limits)
        adapter_id = adapter_id_for(spec, self.fingerprint, self.encoder_dtype)
        if self.store.ready(adapter_id, self.publish_uri):
            self.hits.inc()
            result = {"cached": True, "timings": {}}
        else:
            self.misses.inc()
            result = await _retrying(lambda: self.generator.create.remote(adapter_id,
                                                                          spec.as_json()))
        total = time.perf_counter() - started
        self.request_latency.observe(total, tags={"cached": str(result["cached"]).lower()})
        return AdapterResponse(adapter_id=adapter_id, model=self.model_prefix + adapter_id,
                               cached=result["cached"],
                               timings={**result["timings"], "request_s": total})

    async def archive(self, adapter_id: str) -> Response:
        folder = self.store.require(adapter_id)
        data = await asyncio.to_thread(pack_adapter, folder, adapter_id)
        return Response(data, media_type="application/gzip", headers={
            "Content-Disposition": f'attachment; filename="icm-{adapter_id}.tar.gz"'})

    def health(self) -> dict[str, str]:
        return {"status": "ok", "base_model": self.base_model, "generator": self.fingerprint[:16]}


ARCHIVE_RESPONSES = {**ERRORS, 200: {"content": {"application/gzip": {"schema": {
    "type": "string", "format": "binary"}}}, "description": "The peft adapter archive."}}


@serve.deployment(name="Ingress")
@serve.ingress(api)
class Ingress:
    """HTTP API; validates input, answers cache hits itself, forwards the rest."""

    def __init__(self, generator: DeploymentHandle, completions: DeploymentHandle, args: dict):
        from icm.models import load_tokenizer

        self.args = GeneratorAppArgs.model_validate(args)
        self.completions = completions
        self.limits = self.args.limits
        self.adapters = AdapterFront(generator, self.args, ADAPTER_MODEL_PREFIX)
        self.base_model, self.store = self.adapters.base_model, self.adapters.store
        self.prompts = PromptBuilder(load_tokenizer(self.base_model, cache_dir=self.args.cache_dir),
                                     self.limits)

    @api.post("/v1/adapters", response_model=AdapterResponse, responses=ERRORS,
              summary="Generate (or fetch from cache) the adapter of a task's context")
    async def create_adapter(self, request: AdapterRequest) -> AdapterResponse:
        return await self.adapters.create(request)

    @api.get("/v1/adapters/{adapter_id}", response_class=Response, summary=(
        "Download an adapter as a .tar.gz of its peft directory"), responses=ARCHIVE_RESPONSES)
    async def get_adapter(self, adapter_id: str = PathParam(pattern=ADAPTER_ID_PATTERN)
                          ) -> Response:
        return await self.adapters.archive(adapter_id)

    @api.post("/v1/completions", response_model=CompletionResponse, responses=ERRORS,
              summary="OpenAI-compatible text completion")
    async def completions_api(self, request: CompletionRequest) -> CompletionResponse:
        adapter_id = self._model(request.model)
        prompts = check_prompts(request.prompt, self.limits)
        params = check_sampling(request, self.limits, prompts=len(prompts))
        context = self.adapters.context_prompt(adapter_id)
        prefix = None if context is None else self.prompts.context(context)
        ids = [self.prompts.completion(text, param="prompt" if isinstance(request.prompt, str)
                                       else f"prompt[{i}]", context=prefix)
               for i, text in enumerate(prompts)]
        results = await self._complete(adapter_id, ids, params)
        choices = [CompletionChoice(index=i, text=g.text, finish_reason=g.finish_reason)
                   for i, g in enumerate(g for row in results for g in row)]
        return CompletionResponse(id=completion_id("cmpl"), created=now(), model=request.model,
                                  choices=choices, usage=_usage(ids, results))

    @api.post("/v1/chat/completions", response_model=ChatCompletionResponse, responses=ERRORS,
              summary="OpenAI-compatible chat completion")
    async def chat_api(self, request: ChatCompletionRequest) -> ChatCompletionResponse:
        adapter_id = self._model(request.model)
        self.adapters.refuse_chat(adapter_id)
        ids = [self.prompts.chat(check_messages(request.messages, self.limits))]
        params = check_sampling(request, self.limits)
        results = await self._complete(adapter_id, ids, params)
        choices = [ChatChoice(index=i, message={"content": g.text}, finish_reason=g.finish_reason)
                   for i, g in enumerate(results[0])]
        return ChatCompletionResponse(id=completion_id("chatcmpl"), created=now(),
                                      model=request.model, choices=choices,
                                      usage=_usage(ids, results))

    @api.get("/v1/models", response_model=ModelList, summary="The base model and stored adapters")
    async def list_models(self) -> ModelList:
        ids = await asyncio.to_thread(self.store.ids, 100)
        created = now()
        return ModelList(data=[ModelCard(id=self.base_model, created=created)] + [
            ModelCard(id=ADAPTER_MODEL_PREFIX + i, created=created) for i in ids])

    @api.get("/healthz", summary="Liveness of the HTTP ingress")
    async def healthz(self) -> dict[str, str]:
        return self.adapters.health()

    def _model(self, model: str) -> str | None:
        adapter_id = parse_model(model, self.base_model)
        if adapter_id is not None:
            self.store.require(adapter_id, param="model")
        return adapter_id

    async def _complete(self, adapter_id: str | None, ids: list[list[int]],
                        params: SamplingParams) -> list[list[Generated]]:
        handle = self.completions
        if adapter_id is not None:  # model-aware routing to replicas that hold the adapter
            handle = handle.options(multiplexed_model_id=adapter_id)
        return await _retrying(lambda: handle.complete.remote(ids, params))


# ----------------------------------------------------------------------------- building the app


def _build(args: GeneratorAppArgs, options: dict[str, dict[str, Any]]) -> serve.Application:
    from icm.generator import LoraGenerator

    # loaded once here: a bad generator directory fails now, not in every replica
    loaded = LoraGenerator.load(Path(args.generator_dir).expanduser().resolve())
    args = args.resolved(loaded.model_spec)
    Path(args.adapter_dir).mkdir(parents=True, exist_ok=True)
    # Every replica loads this immutable copy, not a folder a pipeline rerun rewrites in place.
    args = args.model_copy(update={"generator_dir": str(pin_generator(args.generator_dir,
                                                                      args.adapter_dir))})

    def configured(deployment):
        return deployment.options(**options[deployment.name]) if deployment.name in options else (
            deployment)

    encoder = configured(TaskEncoderDeployment).bind(args.generator_dir, args.cache_dir, args.model_dtype)
    generator = configured(AdapterGeneratorDeployment).bind(encoder, args.generator_dir,
                                                            args.adapter_dir, args.publish_uri)
    if args.engine == "vllm":
        from serve_apps.vllm_app import build_vllm_app

        return build_vllm_app(args, loaded, generator, options, configured)
    completions = configured(completions_deployment(args.max_adapters_per_replica)).bind(
        args.generator_dir, args.adapter_dir, args.cache_dir, args.model_dtype)
    return configured(Ingress).bind(generator, completions, args.model_dump(mode="json"))


def build_app(args: GeneratorAppArgs) -> serve.Application:
    """The Serve application (``serve run serve_apps.lora_generator:build_app generator_dir=...``).

    Deployment options (replicas, autoscaling, queues, health checks) come from the Serve config
    file when started with ``serve run cluster/serve_config.yaml``.
    """
    if isinstance(args, dict):
        args = GeneratorAppArgs.model_validate(args)
    return _build(args, {})


def _app_entry(config_path: str | Path):
    """The icm application's entry (``ServeApplicationSchema``) of a Serve config file."""
    from ray.serve.schema import ServeDeploySchema

    schema = ServeDeploySchema.model_validate(yaml.safe_load(Path(config_path).read_text()))
    entry = next((a for a in schema.applications
                  if a.import_path.endswith("lora_generator:build_app")), None)
    if entry is None:
        raise InputError(f"{config_path}: no application with import_path "
                         "serve_apps.lora_generator:build_app.")
    return entry


def app_from_config(config_path: str | Path = DEFAULT_CONFIG, *,
                    deployment_overrides: dict[str, dict[str, Any]] | None = None,
                    **arg_overrides: Any) -> tuple[serve.Application, str, str]:
    """The application of a Serve config file with its deployment options applied, as
    ``serve run config.yaml`` would deploy it; ``arg_overrides`` replace entries of ``args`` and
    ``deployment_overrides`` (deployment name -> options) entries of ``deployments``.

    Returns:
        (application, app name, route prefix) for ``serve.run``.
    """
    entry = _app_entry(config_path)
    args = GeneratorAppArgs.model_validate({**(entry.args or {}), **arg_overrides})
    options = {d.name: d.model_dump(exclude_unset=True, exclude={"name"})
               for d in entry.deployments}
    for name, extra in (deployment_overrides or {}).items():
        options[name] = {**options.get(name, {}), **extra}
    return _build(args, options), entry.name, entry.route_prefix or "/"


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def run_server(*, generator: str, adapters: str | None = None, config: str | Path | None = None,
               host: str | None = None, port: int | None = None, cache_dir: str | None = None,
               engine: str | None = None) -> int:
    """Start Ray and Serve with the Serve config and block (``icm serve`` parses the flags).

    With the vLLM engine and no ``vllm.adapter_uri``, an S3-compatible server on loopback
    (`icm.object_store.LocalS3`) holds the published adapters while this runs; the adapters
    already stored are published to it first. A bad generator directory or config is one line
    on stderr and exit status 2.
    """
    import ray

    overrides: dict[str, Any] = {"generator_dir": generator, "cache_dir": cache_dir}
    if adapters:
        overrides["adapter_dir"] = adapters
    if engine:
        overrides["engine"] = engine
    local_s3 = None
    try:
        args = GeneratorAppArgs.model_validate(
            {**(_app_entry(config or DEFAULT_CONFIG).args or {}), **overrides}).resolved()
        if config is None:  # each engine's own deployment entries
            config = DEFAULT_CONFIG if args.engine == "vllm" else HF_SERVE_CONFIG
        http = yaml.safe_load(Path(config).read_text()).get("http_options") or {}
        if args.engine == "vllm" and not args.vllm.adapter_uri:
            local_s3 = _start_local_s3(args)
            overrides["vllm"] = {**args.vllm.model_dump(), "adapter_uri": f"{local_s3.uri}/adapters"}
        overrides["engine"] = args.engine
        if not ray.is_initialized():
            # Read by the Serve processes this Ray starts (an existing cluster keeps its own).
            for key, value in {**SERVE_LATENCY_ENV, **SERVE_INGRESS_ENV}.items():
                os.environ.setdefault(key, value)
            ray.init(namespace="serve")
        app, name, route_prefix = app_from_config(config, **overrides)
    except (InputError, OSError, ValueError) as err:  # bad dir or config: one line, exit 2
        print(f"icm serve: error: {err}", file=sys.stderr)
        if local_s3 is not None:
            local_s3.stop()
        return 2
    serve.start(http_options={"host": host or http.get("host", "127.0.0.1"),
                              "port": port or http.get("port", 8000)})
    # SIGTERM (a process manager, `kill`) shuts down like Ctrl-C: Serve stops its replicas and
    # the HAProxy it started, which would otherwise outlive this process and keep the port.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        serve.run(app, name=name, route_prefix=route_prefix, blocking=True)
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()
        ray.shutdown()
        if local_s3 is not None:
            local_s3.stop()
    return 0


def _start_local_s3(args: GeneratorAppArgs):
    """moto's S3 server on loopback, with every adapter already in the store published to it."""
    from icm.object_store import LocalS3

    local_s3 = LocalS3(bucket="icm-adapters").start()
    store = AdapterStore(args.adapter_dir)
    for adapter_id in store.ids(None) if store.root.is_dir() else []:
        store.publish(adapter_id, f"{local_s3.uri}/adapters")
    log.info("adapters served from %s/adapters (S3-compatible server at %s)", local_s3.uri,
             local_s3.endpoint)
    return local_s3
