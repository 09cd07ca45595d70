"""The vLLM engine of the adapter service (``engine: vllm``): completions come from Ray Serve
LLM's ``LLMServer`` (vLLM underneath: continuous batching, several LoRAs in one batch, a
per-replica adapter LRU, requests routed to replicas that hold their adapter, autoscaling on
ongoing requests), behind Ray's ``OpenAiIngress`` (OpenAI-compatible completions and chat,
streaming included) extended with the adapter endpoints and icm's request checks.

    adapters:  POST /v1/adapters  -> AdapterGenerator writes the peft folder, publishes it to
               ``vllm.adapter_uri/<adapter_id>/`` (object storage: the only place Ray Serve LLM
               loads LoRAs from)
    tokens:    POST /v1/completions, /v1/chat/completions with model "<base>:<adapter_id>"

Imported only when the vLLM engine is chosen (ray.serve.llm needs vLLM).
"""

from __future__ import annotations

import asyncio
import weakref
from typing import Any

from fastapi import Path as PathParam, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from ray import serve
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from ray.serve.handle import DeploymentHandle
from ray.serve.llm import LLMConfig, LLMServer, build_llm_deployment
from ray.serve.llm.ingress import OpenAiIngress, make_fastapi_ingress
from ray.serve.llm.openai_api_models import ChatCompletionRequest, CompletionRequest
from starlette.exceptions import HTTPException as StarletteHTTPException

from icm.errors import InputError
from icm.serving import (ADAPTER_ID_PATTERN, AdapterRequest, AdapterResponse, PromptBuilder,
                         ServeInputError, check_output_limits, check_prompts, parse_model)
from serve_apps.lora_generator import (ARCHIVE_RESPONSES, ERRORS, AdapterFront, GeneratorAppArgs,
                                       _http_error, _input_error, _overloaded, _retrying,
                                       _unavailable, _validation_error)
from serve_apps.vllm_args import check_engine_takes

LLM_SERVER = "LLMServer"  # the Serve config's deployment entry for the engine replicas


def llm_config(args: GeneratorAppArgs, generator, model_source: str,
               deployment_config: dict[str, Any]) -> LLMConfig:
    """The LLMServer's config: the base model, LoRA on, adapters from ``vllm.adapter_uri``."""
    vllm = args.vllm
    on_cpu = vllm.device == "cpu" or (vllm.device == "auto" and not _cluster_has_gpus())
    engine = {"enable_lora": True, "max_loras": vllm.max_loras, "max_lora_rank": vllm.max_lora_rank,
              # LoRA layers only where the generator's adapters have weights: vLLM otherwise wraps
              # every linear layer and runs its LoRA kernels on zeros (CPU engine: 1.7x tokens/s)
              "lora_target_modules": sorted(generator.peft_config["target_modules"]),
              "max_model_len": vllm.max_model_len, "max_num_seqs": vllm.max_num_seqs,
              "dtype": vllm.dtype if vllm.dtype != "auto" else ("float32" if on_cpu else "bfloat16"),
              **vllm.engine_kwargs}
    config: dict[str, Any] = {
        "model_loading_config": {"model_id": vllm.model_id or generator.model_spec,
                                 "model_source": model_source},
        "engine_kwargs": engine,
        # keep max_loras == max_num_adapters_per_replica: the Serve LRU and vLLM's slots agree
        "lora_config": {"dynamic_lora_loading_path": vllm.adapter_uri,
                        "max_num_adapters_per_replica": vllm.max_loras},
        "deployment_config": deployment_config,
    }
    if on_cpu:
        config["accelerator_config"] = {"kind": "cpu"}
        # Ray adds the replica actor's CPU to the engine's bundle (1 + 1 by default): all of a
        # 2-CPU box. One bundle of vllm.cpus, the actor at 0 unless the Serve config sets it.
        config["placement_group_config"] = {"bundles": [{"CPU": vllm.cpus}]}
        actor = dict(deployment_config.get("ray_actor_options") or {})
        actor.setdefault("num_cpus", 0)
        config["deployment_config"] = {**deployment_config, "ray_actor_options": actor}
        env = {"VLLM_CPU_KVCACHE_SPACE": str(vllm.cpu_kv_cache_gib),
               "VLLM_CPU_OMP_THREADS_BIND": vllm.cpu_threads_bind}
        if vllm.cpu_threads_bind == "nobind":
            # unbound, vLLM keeps torch's one thread per core in every replica: two engines on
            # 2 cores ran at 5.3 + 5.5 tokens/s, at 21.5 + 23.0 with one thread each
            env["OMP_NUM_THREADS"] = str(max(1, int(vllm.cpus)))
        config["runtime_env"] = {"env_vars": env}
    return LLMConfig(**config)


def _cluster_has_gpus() -> bool:
    import ray

    return ray.is_initialized() and ray.cluster_resources().get("GPU", 0) > 0


class IcmLLMServer(LLMServer):
    """Ray's LLMServer with each adapter's first load done once. Ray 2.60 checks whether vLLM
    holds the adapter, then awaits the load (VLLMEngine.resolve_lora): two requests for a new
    adapter arriving together both load it, and vLLM refuses the second ("has already been
    loaded") - a 500 at completion time. One lock per adapter id closes that window; requests
    for other adapters never wait on it."""

    async def _maybe_resolve_lora_from_multiplex(self) -> None:
        adapter = serve.get_multiplexed_model_id()
        if not adapter:
            return await super()._maybe_resolve_lora_from_multiplex()
        locks = self.__dict__.setdefault("_icm_adapter_locks", weakref.WeakValueDictionary())
        lock = locks.setdefault(adapter, asyncio.Lock())  # held here: lives while in use
        async with lock:
            await super()._maybe_resolve_lora_from_multiplex()


class IcmOpenAiIngress(OpenAiIngress):
    """Ray's OpenAI ingress (completions, chat, streaming, models) plus the adapter endpoints;
    icm's checks run before a request reaches the engine.

    A request whose engine replica dies before its first chunk (a crash, a killed node, a
    scale-down) is sent again, to a live replica: Ray's ingress waits for that chunk before it
    answers, so nothing has reached the client yet and the retry is invisible. A stream cut after
    its first chunk cannot be replayed and ends early."""

    def __init__(self, llm_deployments: dict[str, DeploymentHandle], model_cards: dict, *,
                 lora_paths: dict[str, str], generator: DeploymentHandle, args: dict):
        from icm.models import load_tokenizer

        super().__init__(llm_deployments, model_cards, lora_paths=lora_paths)
        self.args = GeneratorAppArgs.model_validate(args)
        self.model_id = next(iter(model_cards))
        self.adapters = AdapterFront(generator, self.args, f"{self.model_id}:")
        self.prompts = PromptBuilder(load_tokenizer(self.adapters.base_model,
                                                    cache_dir=self.args.cache_dir), self.args.limits)

    async def create_adapter(self, request: AdapterRequest) -> AdapterResponse:
        return await self.adapters.create(request)

    async def get_adapter(self, adapter_id: str = PathParam(pattern=ADAPTER_ID_PATTERN)) -> Response:
        return await self.adapters.archive(adapter_id)

    async def healthz(self) -> dict[str, str]:
        return {**self.adapters.health(), "engine": "vllm", "model": self.model_id}

    async def completions(self, body: CompletionRequest, request: Request) -> Response:
        context = self.adapters.context_prompt(self._check_model(body.model))
        prefix = None if context is None else self.prompts.context(context)
        limits, update = self.args.limits, {}
        if isinstance(body.prompt, str) or (isinstance(body.prompt, list) and body.prompt
                                            and isinstance(body.prompt[0], str)):
            # Text is read after the text-start token, as in zoo training, evaluation and the
            # hf engine (vLLM's tokenizer adds none for SmolLM2): token ids go to the engine.
            # An adapter read after its task's prompt gets it in front (AdapterFront).
            ids = [self.prompts.completion(text, context=prefix)
                   for text in check_prompts(body.prompt, limits)]
            update["prompt"] = ids[0] if isinstance(body.prompt, str) else ids
            prompts = len(ids)
        else:  # token ids, as given (after the adapter's context ids, if it has one)
            nested = bool(body.prompt) and isinstance(body.prompt[0], list)
            prompts = len(body.prompt) if nested else 1
            if prefix is not None:
                update["prompt"] = ([[*prefix, *ids] for ids in body.prompt] if nested
                                    else [*prefix, *body.prompt])
        check_output_limits(body.max_tokens, body.n, limits, prompts=prompts)
        if body.max_tokens is None:  # vLLM would run to the context length
            update["max_tokens"] = limits.max_tokens
        body = body.model_copy(update=update)
        engine_call = super().completions
        return await _retrying(lambda: engine_call(body, request))

    async def chat(self, body: ChatCompletionRequest, request: Request) -> Response:
        self.adapters.refuse_chat(self._check_model(body.model))
        if len(body.messages) > self.args.limits.max_messages:
            raise ServeInputError(f"'messages' has {len(body.messages)} entries; at most "
                                  f"{self.args.limits.max_messages}.", param="messages")
        check_output_limits(body.max_completion_tokens or body.max_tokens, body.n, self.args.limits)
        if body.max_completion_tokens is None and body.max_tokens is None:  # vLLM's default: none
            body = body.model_copy(update={"max_completion_tokens": self.args.limits.max_tokens})
        engine_call = super().chat
        return await _retrying(lambda: engine_call(body, request))

    def _check_model(self, model: str | None) -> str | None:
        """The adapter id ``model`` names (None: the base model). An adapter model must name a
        stored adapter: a 404 naming it, before the engine."""
        if model and (adapter_id := parse_model(model, self.model_id, prefix=f"{self.model_id}:")):
            self.adapters.store.require(adapter_id, param="model")
            return adapter_id
        return None


ENDPOINTS = {
    "create_adapter": lambda app: app.post(
        "/v1/adapters", response_model=AdapterResponse, responses=ERRORS,
        summary="Generate (or fetch from cache) the adapter of a task's context"),
    "get_adapter": lambda app: app.get(
        "/v1/adapters/{adapter_id}", response_class=Response, responses=ARCHIVE_RESPONSES,
        summary="Download an adapter as a .tar.gz of its peft directory"),
    "healthz": lambda app: app.get("/healthz", summary="Liveness of the HTTP ingress"),
    "models": lambda app: app.get("/v1/models"),
    "model_data": lambda app: app.get("/v1/models/{model:path}"),
    "completions": lambda app: app.post("/v1/completions"),
    "chat": lambda app: app.post("/v1/chat/completions"),
}


def _ingress_app():
    """Ray's OpenAI FastAPI app (its middleware: errors in OpenAI's shape, request ids, metrics)
    with icm's error handlers (4xx naming the field, 503 + Retry-After)."""
    from ray.llm._internal.serve.core.ingress.ingress import init  # the app OpenAiIngress uses

    app = init()
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(InputError, _input_error)
    app.add_exception_handler(BackPressureError, _overloaded)
    app.add_exception_handler(DeploymentUnavailableError, _unavailable)
    app.add_exception_handler(TimeoutError, _unavailable)
    return app


def build_vllm_app(args: GeneratorAppArgs, generator, generator_app,
                   options: dict[str, dict[str, Any]], configured) -> serve.Application:
    """The ingress over an LLMServer deployment and the adapter generator (``generator``: the
    loaded `LoraGenerator`; ``generator_app``: its deployment, bound by the caller).
    ``options``: the Serve config's deployment entries by name."""
    from icm.models import weights_location
    from ray.llm._internal.serve.core.configs.openai_api_models import to_model_metadata

    if not args.vllm.adapter_uri:
        raise InputError("vllm.adapter_uri is not set: the vLLM engine loads adapters only from "
                         "object storage. Fix: set it to an s3:// or gs:// prefix, or start with "
                         "`icm serve`, which runs an S3-compatible server on loopback.")
    check_engine_takes(generator, args.vllm)
    config = llm_config(args, generator, weights_location(generator.model_spec, cache_dir=args.cache_dir),
                        dict(options.get(LLM_SERVER, {})))
    # named "LLMServer" (not "LLMServer:<model_id>"): the Serve config's entry of that name applies
    server = build_llm_deployment(config, override_serve_options={"name": LLM_SERVER},
                                  deployment_cls=IcmLLMServer)
    ingress_cls = make_fastapi_ingress(IcmOpenAiIngress, endpoint_map=ENDPOINTS, app=_ingress_app())
    ingress = configured(serve.deployment(ingress_cls, name="Ingress"))
    return ingress.bind(llm_deployments={config.model_id: server},
                        model_cards={config.model_id: to_model_metadata(config.model_id, config)},
                        lora_paths={config.model_id: config.lora_config.dynamic_lora_loading_path},
                        generator=generator_app, args=args.model_dump(mode="json"))
