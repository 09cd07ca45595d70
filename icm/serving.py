"""Ray-free pieces of the serving app: request limits, cache keys, adapter storage, completions.

``serve_apps/lora_generator.py`` wires these into Ray Serve deployments; everything here runs
(and is tested) in one process. A request for an adapter is reduced to its *content* (the
stripped description and examples, the number of samples, the seed, how one sample is chosen)
plus the generator's fingerprint; the hash of that is the adapter id, so the same request always
names the same adapter directory and a repeat is a file-existence check, not a generation.

Adapters live under one storage directory, one peft directory per id::

    <adapter_dir>/<adapter_id>/adapter_config.json, adapter_model.safetensors, icm_generation.json

The completion side keeps one base model wrapped once in a peft LoRA (`SwappableLora`) and copies
an adapter's flat vector into it per request, so serving another adapter costs milliseconds.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import json
import os
import re
import tarfile
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from icm.adapters import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from icm.errors import InputError
from icm.generate import MAX_CONDITION_SCALE
from icm.io import file_lock, sha256_file, sha256_json, write_json_atomic

ADAPTER_ID_LENGTH = 24  # hex characters: 96 bits of the request's content hash
ADAPTER_ID_PATTERN = f"^[0-9a-f]{{{ADAPTER_ID_LENGTH}}}$"
ADAPTER_MODEL_PREFIX = "icm:"
GENERATION_RECORD = "icm_generation.json"
LOCKS_DIR = ".locks"
PUBLISHED_MARKER = ".published.json"  # in an adapter folder: the URIs it reached



class ServeInputError(InputError):
    """A request the server refuses; ``param`` names the offending field (OpenAI's error shape)."""

    status_code = 400
    error_type = "invalid_request_error"

    def __init__(self, message: str, *, param: str | None = None):
        super().__init__(message)
        self.param = param

    def to_json(self) -> dict[str, Any]:
        return error_body(str(self), param=self.param, error_type=self.error_type,
                          code=getattr(self, "code", None))


class NotFoundError(ServeInputError):
    """An adapter id or model name that the server does not hold."""

    status_code = 404
    code = "model_not_found"


def error_body(message: str, *, param: str | None, error_type: str = "invalid_request_error",
               code: str | None = None) -> dict[str, Any]:
    """The OpenAI error object: ``{"error": {"message", "type", "param", "code"}}``."""
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


class ServeLimits(BaseModel):
    """Request limits; bigger requests get a 400 naming the field, never a slow or failed call."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_description_chars: int = Field(2000, ge=1, description="Longest task description.")
    max_examples: int = Field(16, ge=1, description="Most example texts per adapter request.")
    max_example_chars: int = Field(4000, ge=1, description="Longest example text.")
    max_samples: int = Field(8, ge=1, description="Most adapters sampled per request (best-of-K).")
    max_prompt_chars: int = Field(16000, ge=1, description="Longest prompt, in characters.")
    max_prompt_tokens: int = Field(1024, ge=8, description=(
        "Longest completion prompt in tokens (the caller's part only, for an adapter read "
        "after its task's prompt)."))
    max_tokens: int = Field(256, ge=1, description="Most generated tokens per choice.")
    max_choices: int = Field(4, ge=1, description="Most choices per call (prompts x n).")
    max_messages: int = Field(64, ge=1, description="Most chat messages per call.")


# ----------------------------------------------------------------------------- API models


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid")


class AdapterRequest(StrictModel):
    """POST /v1/adapters: a task's context in, an adapter id out."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={
        "anyOf": [{"required": ["description"]}, {"required": ["examples"]}]})

    description: str | None = Field(None, description="One or two sentences describing the task.",
                                    examples=["Short cheerful texts about cats."])
    examples: list[str] | None = Field(None, description="Example texts of the task.",
                                       examples=[["The cat sat on the mat.", "Cats purr."]])
    samples: int = Field(1, ge=1, description=(
        "Adapters to sample; with more than one (and examples) the one with the lowest "
        "perplexity on the examples is kept."))
    seed: int = Field(0, ge=0, le=2**31 - 1, description="Seed of the latent samples.")
    select: Literal["demo-ppl", "first"] = Field("demo-ppl", description=(
        "How one of several samples is kept: lowest demo perplexity, or the first draw."))
    condition_scale: float = Field(1.0, ge=0, le=MAX_CONDITION_SCALE, allow_inf_nan=False,
                                   description=(
        "w, the task's condition read as w x its z-scored value: 1 as given, 0 the generator's "
        "blind mode (one adapter for every task; a generator trained with "
        "generator.lm_condition_dropout learnt one), 0.5 halfway (EVAL.md, session 41)."))


class AdapterResponse(BaseModel):
    adapter_id: str = Field(description="Content hash of the request and generator.")
    model: str = Field(description="Name to pass as `model` to the completion endpoints.")
    cached: bool = Field(description="True when the adapter already existed (no generation).")
    timings: dict[str, float] = Field(description="Seconds spent per step (encode, sample, ...).")


class SamplingFields(StrictModel):
    """Sampling fields shared by both completion endpoints (OpenAI names and ranges)."""

    model: str = Field(description="The base model name, or `icm:<adapter_id>`.")
    temperature: float = Field(1.0, ge=0, le=2, allow_inf_nan=False, description="0: greedy.")
    top_p: float = Field(1.0, gt=0, le=1, allow_inf_nan=False)
    n: int = Field(1, ge=1, description="Choices per prompt.")
    stop: str | list[str] | None = Field(None, description="Up to 4 stop strings.")
    seed: int | None = Field(None, ge=0, le=2**63 - 1, description="Seed of sampling.")
    stream: bool = Field(False, description="Streaming is not supported; must be false.")
    presence_penalty: float = Field(0.0, ge=-2, le=2, allow_inf_nan=False, description="Ignored.")
    frequency_penalty: float = Field(0.0, ge=-2, le=2, allow_inf_nan=False, description="Ignored.")
    user: str | None = Field(None, description="Ignored.")


class CompletionRequest(SamplingFields):
    """POST /v1/completions (OpenAI-compatible subset)."""

    prompt: str | list[str] = Field(description="Prompt text, or a list of prompts.")
    max_tokens: int | None = Field(16, ge=1, description="Tokens to generate per choice.")


class ChatMessage(StrictModel):
    role: Literal["system", "user", "assistant"]
    content: str


class ChatCompletionRequest(SamplingFields):
    """POST /v1/chat/completions (OpenAI-compatible subset)."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1, description="Tokens to generate per choice.")
    max_completion_tokens: int | None = Field(None, ge=1, description="Alias of max_tokens.")


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: None = None
    finish_reason: Literal["stop", "length"]


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: Literal["stop", "length"]


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "icm-ray"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


# ----------------------------------------------------------------------------- adapter requests


@dataclass(frozen=True)
class AdapterSpec:
    """An adapter request reduced to what determines the adapter (the cache key's content)."""

    description: str | None
    examples: tuple[str, ...]
    samples: int
    seed: int
    select: str
    condition_scale: float = 1.0

    def as_json(self) -> dict[str, Any]:
        """The cache key's content; a condition scale only where it is not 1, so the ids of
        requests from before it existed stay what they were."""
        key = {"description": self.description, "examples": list(self.examples),
               "samples": self.samples, "seed": self.seed, "select": self.select}
        if self.condition_scale != 1.0:
            key["condition_scale"] = self.condition_scale
        return key


def check_adapter_request(request: AdapterRequest, limits: ServeLimits) -> AdapterSpec:
    """Validate a request against ``limits`` and normalise it (stripped texts).

    Raises:
        ServeInputError: naming the field, e.g. ``description`` or ``examples[3]``.
    """
    description = request.description
    if description is not None:
        description = description.strip()
        if not description:
            raise ServeInputError("'description' is empty; give text or leave it out.",
                                  param="description")
        if len(request.description) > limits.max_description_chars:
            raise ServeInputError(f"'description' has {len(request.description)} characters; at "
                                  f"most {limits.max_description_chars} are allowed.",
                                  param="description")
    examples = list(request.examples or [])
    if len(examples) > limits.max_examples:
        raise ServeInputError(f"'examples' has {len(examples)} texts; at most "
                              f"{limits.max_examples} are allowed.", param="examples")
    for index, text in enumerate(examples):
        where = f"examples[{index}]"
        if not text.strip():
            raise ServeInputError(f"'{where}' is empty; remove it or give it text.", param=where)
        if len(text) > limits.max_example_chars:
            raise ServeInputError(f"'{where}' has {len(text)} characters; at most "
                                  f"{limits.max_example_chars} are allowed.", param=where)
    if description is None and not examples:
        raise ServeInputError("give the task's context: 'description', 'examples', or both.",
                              param="description")
    if request.samples > limits.max_samples:
        raise ServeInputError(f"'samples' is {request.samples}; at most {limits.max_samples}.",
                              param="samples")
    select = request.select if request.samples > 1 else "first"  # one draw: nothing to select
    if request.samples > 1 and select == "demo-ppl" and not examples:
        raise ServeInputError("'samples' > 1 with select='demo-ppl' needs 'examples' to score "
                              "the draws; pass examples, samples=1, or select='first'.",
                              param="samples")
    return AdapterSpec(description, tuple(t.strip() for t in examples), request.samples,
                       request.seed, select, float(request.condition_scale))


def generator_fingerprint(generator_dir: str | os.PathLike) -> str:
    """Hash of every file of a generator artifact: a new generator never reuses old adapter ids."""
    root = Path(generator_dir)
    if not root.is_dir():
        raise ServeInputError(f"generator directory {root} does not exist.", param="generator_dir")
    files = sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith("."))
    return sha256_json({str(p.relative_to(root)): sha256_file(p) for p in files})


PINNED_GENERATORS_DIR = ".generators"  # under the adapter store: never an adapter id


def pin_generator(generator_dir: str | os.PathLike, adapter_dir: str | os.PathLike) -> Path:
    """An immutable copy of a generator artifact, ``<adapter_dir>/.generators/<fingerprint>``,
    for every replica of one app to load.

    Replicas load their generator whenever they start (autoscaling, restarts); loading it from
    the pipeline's output folder, which a rerun rewrites in place, let one app sample with a new
    generator while its ingress still named adapters by the old one's fingerprint. The copy is
    named by its own content, so a rerun of the app with an unchanged generator reuses it.
    """
    import shutil

    adapter_dir = Path(adapter_dir).expanduser()
    pinned = adapter_dir / PINNED_GENERATORS_DIR / generator_fingerprint(generator_dir)[:32]
    if pinned.is_dir():  # these very bytes are pinned already: no copy on every restart
        return pinned
    staging = adapter_dir / PINNED_GENERATORS_DIR / f".copy-{os.getpid()}-{os.urandom(4).hex()}"
    shutil.copytree(Path(generator_dir).expanduser(), staging)
    try:
        pinned = staging.parent / generator_fingerprint(staging)[:32]
        if not pinned.is_dir():
            os.replace(staging, pinned)  # same folder: atomic; a racing twin lands the same bytes
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return pinned


def adapter_id_for(spec: AdapterSpec, fingerprint: str, encoder_dtype: str = "float32") -> str:
    """The adapter id of a request: content hash of the normalised request, the generator and
    the dtype of the model that encodes the task vector (a bfloat16 encoder conditions the
    generator on a slightly different vector: another adapter, so another id; float32, the
    default, adds nothing, so float32 ids stay what they were)."""
    key = {"generator": fingerprint, **spec.as_json()}
    if encoder_dtype != "float32":
        key["encoder_dtype"] = encoder_dtype
    return sha256_json(key)[:ADAPTER_ID_LENGTH]


def check_adapter_id(adapter_id: str) -> str:
    """Refuse anything but a well-formed id (it becomes a path component)."""
    if not re.fullmatch(ADAPTER_ID_PATTERN, adapter_id):
        raise ServeInputError(f"adapter id {adapter_id[:64]!r} is malformed: it must be "
                              f"{ADAPTER_ID_LENGTH} lowercase hex characters.", param="adapter_id")
    return adapter_id


def parse_model(model: str, base_model: str, prefix: str = ADAPTER_MODEL_PREFIX) -> str | None:
    """``model`` of a completion request -> the adapter id, or None for the base model.
    ``prefix``: what precedes an adapter id (the hf engine: 'icm:'; vLLM: '<base>:')."""
    if model == base_model:
        return None
    if model.startswith(prefix):
        try:
            return check_adapter_id(model[len(prefix):])
        except ServeInputError as err:
            raise ServeInputError(str(err), param="model") from None
    raise NotFoundError(f"model {model[:80]!r} does not exist; use {base_model!r} or "
                        f"'{prefix}<adapter_id>' from POST /v1/adapters.", param="model")


# ----------------------------------------------------------------------------- adapter storage


class AdapterStore:
    """Generated adapters on disk, one peft directory per id, written atomically."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).expanduser()
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, adapter_id: str) -> Path:
        return self.root / check_adapter_id(adapter_id)

    def exists(self, adapter_id: str) -> bool:
        folder = self.path(adapter_id)
        return (folder / ADAPTER_WEIGHTS).is_file() and (folder / ADAPTER_CONFIG).is_file()

    def ready(self, adapter_id: str, publish_uri: str | None = None) -> bool:
        """Stored here and, with a ``publish_uri``, published there: what a request may call
        cached. A stored adapter whose publish failed (or predates the URI) is not ready: the
        vLLM engine would 404 on it, so the next request publishes it again."""
        return self.exists(adapter_id) and (publish_uri is None
                                            or publish_uri in self.published_uris(adapter_id))

    def published_uris(self, adapter_id: str) -> list[str]:
        """The URIs this adapter was published to (its marker, written after each publish)."""
        marker = self.path(adapter_id) / PUBLISHED_MARKER
        return json.loads(marker.read_text()) if marker.is_file() else []

    def publish(self, adapter_id: str, uri: str) -> str:
        """`publish_adapter`, then record ``uri`` in the adapter's marker (atomically), so only a
        publish that finished makes the adapter `ready`. Returns the adapter's URI."""
        target = publish_adapter(self.path(adapter_id), uri, adapter_id)
        uris = sorted({*self.published_uris(adapter_id), uri})
        write_json_atomic(self.path(adapter_id) / PUBLISHED_MARKER, uris)
        return target

    def require(self, adapter_id: str, *, param: str = "adapter_id") -> Path:
        """The adapter's directory; `NotFoundError` when it was never generated here."""
        try:
            check_adapter_id(adapter_id)
        except ServeInputError as err:
            raise ServeInputError(str(err), param=param) from None
        if not self.exists(adapter_id):
            raise NotFoundError(f"adapter {adapter_id} does not exist; create it with POST "
                                "/v1/adapters.", param=param)
        return self.path(adapter_id)

    def context_prompt(self, adapter_id: str) -> str | None:
        """What completions with the adapter read the caller's text after: the in-context prompt
        its condition was read from (its generation record), when the generator that made it
        was trained to have its adapters read after one (`GeneratorConfig.reads_after_prompt`,
        from the adapter's own ``generation.json``: the store may hold other generators'
        adapters); else None."""
        from icm.config import GeneratorConfig
        from icm.generator.artifact import GENERATION_FILE

        folder = self.path(adapter_id)
        made_by = folder / GENERATION_FILE
        if not made_by.is_file():
            return None
        config = json.loads(made_by.read_text()).get("generator_config") or {}
        if not GeneratorConfig.model_validate(config).reads_after_prompt:
            return None
        record = folder / GENERATION_RECORD
        prompt = json.loads(record.read_text()).get("context_prompt") if record.is_file() else None
        if not prompt:
            raise ServeInputError(
                f"adapter {adapter_id} is read after its task's prompt, but records none (it "
                "was generated before the prompt was recorded). Fix: remove it from the "
                "server's adapter store and create it again with POST /v1/adapters.",
                param="model")
        return prompt

    def ids(self, limit: int = 1000) -> list[str]:
        """Stored adapter ids, newest first."""
        found = [p for p in self.root.iterdir() if re.fullmatch(ADAPTER_ID_PATTERN, p.name)]
        found.sort(key=lambda p: p.stat().st_mtime, reverse=True)
        return [p.name for p in found[:limit] if self.exists(p.name)]

    @contextlib.contextmanager
    def try_lock(self, adapter_id: str) -> Iterator[bool]:
        """Non-blocking inter-process lock on one id: yields whether it was acquired.

        Replicas generating the same adapter take turns on it, so only one of them generates;
        the others find the finished directory once they get the lock.
        """
        with file_lock(self.root / LOCKS_DIR / f"{check_adapter_id(adapter_id)}.lock",
                       blocking=False) as acquired:
            yield acquired


def publish_adapter(folder: str | os.PathLike, uri: str, adapter_id: str) -> str:
    """Copy a stored adapter's peft files to ``<uri>/<adapter_id>/`` (object storage, where a
    vLLM engine under Ray Serve LLM loads adapters from), ``adapter_config.json`` last: Ray's
    loader looks for it first, so a half-copied adapter is never taken for a whole one.
    Returns the adapter's URI."""
    from icm import storage

    target = storage.join(uri, check_adapter_id(adapter_id))
    for name in (ADAPTER_WEIGHTS, ADAPTER_CONFIG):
        storage.copy_file(Path(folder) / name, storage.join(target, name))
    return target


def pack_adapter(folder: str | os.PathLike, arcname: str) -> bytes:
    """A peft adapter directory as a reproducible ``.tar.gz`` (files under ``arcname/``).

    Fixed mtimes and owners make the same adapter always give the same bytes.
    """
    buffer = io.BytesIO()
    with gzip.GzipFile(fileobj=buffer, mode="wb", mtime=0) as zipped:
        with tarfile.open(fileobj=zipped, mode="w", format=tarfile.PAX_FORMAT) as archive:
            for path in sorted(Path(folder).iterdir()):
                if not path.is_file() or path.name.startswith("."):
                    continue
                info = tarfile.TarInfo(f"{arcname}/{path.name}")
                info.size, info.mode, info.mtime = path.stat().st_size, 0o644, 0
                with open(path, "rb") as handle:
                    archive.addfile(info, handle)
    return buffer.getvalue()


# ----------------------------------------------------------------------------- adapter selection


# ----------------------------------------------------------------------------- completions


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int
    temperature: float
    top_p: float
    n: int
    stop: tuple[str, ...]
    seed: int | None


def check_output_limits(max_tokens: int | None, n: int | None, limits: ServeLimits, *,
                        prompts: int = 1) -> None:
    """Tokens per choice and choices per call against ``limits`` (both engines)."""
    if max_tokens is not None and max_tokens > limits.max_tokens:
        raise ServeInputError(f"'max_tokens' is {max_tokens}; at most {limits.max_tokens}.",
                              param="max_tokens")
    if (n or 1) * prompts > limits.max_choices:
        raise ServeInputError(f"{prompts} prompt(s) x n={n or 1} choices exceed the limit of "
                              f"{limits.max_choices} choices per call.", param="n")


def check_sampling(request: CompletionRequest | ChatCompletionRequest, limits: ServeLimits, *,
                   prompts: int = 1) -> SamplingParams:
    """Check the sampling fields of a completion request against ``limits``."""
    if request.stream:
        raise ServeInputError("streaming is not supported; set 'stream' to false.", param="stream")
    max_tokens = request.max_tokens
    if isinstance(request, ChatCompletionRequest):
        max_tokens = request.max_completion_tokens or max_tokens
    max_tokens = limits.max_tokens if max_tokens is None else max_tokens
    check_output_limits(max_tokens, request.n, limits, prompts=prompts)
    stop = [request.stop] if isinstance(request.stop, str) else list(request.stop or [])
    if len(stop) > 4 or any(not s or len(s) > 256 for s in stop):
        raise ServeInputError("'stop' takes at most 4 non-empty strings of up to 256 characters.",
                              param="stop")
    return SamplingParams(max_tokens, request.temperature, request.top_p, request.n, tuple(stop),
                          request.seed)


def check_prompts(prompt: str | list[str], limits: ServeLimits) -> list[str]:
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    if not prompts:
        raise ServeInputError("'prompt' is an empty list.", param="prompt")
    for index, text in enumerate(prompts):
        if len(text) > limits.max_prompt_chars:
            where = "prompt" if isinstance(prompt, str) else f"prompt[{index}]"
            raise ServeInputError(f"'{where}' has {len(text)} characters; at most "
                                  f"{limits.max_prompt_chars}.", param=where)
    return prompts


def check_messages(messages: Sequence[ChatMessage], limits: ServeLimits) -> list[dict[str, str]]:
    if len(messages) > limits.max_messages:
        raise ServeInputError(f"'messages' has {len(messages)} entries; at most "
                              f"{limits.max_messages}.", param="messages")
    total = sum(len(m.content) for m in messages)
    if total > limits.max_prompt_chars:
        raise ServeInputError(f"'messages' hold {total} characters; at most "
                              f"{limits.max_prompt_chars}.", param="messages")
    return [{"role": m.role, "content": m.content} for m in messages]


@dataclass(frozen=True)
class Generated:
    text: str
    finish_reason: str  # "stop" | "length"
    tokens: int


class PromptBuilder:
    """Completion prompts to token ids, checked against the limits (the ingress runs this, so a
    prompt that is too long is refused before it reaches a model replica)."""

    def __init__(self, tokenizer, limits: ServeLimits):
        from icm.models import text_start_token_id

        self.tokenizer, self.limits = tokenizer, limits
        self.start_id = text_start_token_id(tokenizer)

    def _check(self, ids: list[int], param: str) -> list[int]:
        if len(ids) > self.limits.max_prompt_tokens:
            raise ServeInputError(f"'{param}' is {len(ids)} tokens; at most "
                                  f"{self.limits.max_prompt_tokens}.", param=param)
        return ids

    def context(self, prompt: str) -> list[int]:
        """A context prompt's ids: the text-start token, then the prompt (as the LM phase of
        ``generator.lm_context: prompt`` and in-context evaluation read it)."""
        return [self.start_id, *self.tokenizer(prompt, add_special_tokens=False)["input_ids"]]

    def completion(self, text: str, *, param: str = "prompt",
                   context: list[int] | None = None) -> list[int]:
        """Plain text, read after the text-start token as in zoo training and evaluation. With
        ``context`` (`context` ids) the text is read after them, spaced as a text after a prompt
        (TEXT_SEPARATOR; an empty text adds nothing); ``max_prompt_tokens`` then counts the
        caller's part only, since task_vectors.max_prompt_tokens already caps the context."""
        from icm.eval.baselines import TEXT_SEPARATOR

        if context is None:
            return self._check([self.start_id, *self.tokenizer(text, add_special_tokens=False)
                                ["input_ids"]], param)
        spaced = self.tokenizer(TEXT_SEPARATOR + text, add_special_tokens=False)["input_ids"]
        return [*context, *self._check(spaced if text else [], param)]

    def chat(self, messages: list[dict[str, str]]) -> list[int]:
        """Messages through the tokenizer's chat template (plain ``role: text`` lines without)."""
        if getattr(self.tokenizer, "chat_template", None):
            text = self.tokenizer.apply_chat_template(messages, tokenize=False,
                                                      add_generation_prompt=True)
        else:
            text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"
        return self._check(self.tokenizer(text, add_special_tokens=False)["input_ids"], "messages")


class CompletionEngine:
    """A base model wrapped once in a LoRA; each call runs with one adapter vector or none.

    Args:
        model, tokenizer: the base causal LM (wrapped in place) and its tokenizer.
        peft_config, layout: the generator's ``adapter_config.json`` contents and flat layout.
    """

    def __init__(self, model, tokenizer, peft_config, layout):
        from icm.adapter_swap import SwappableLora

        self.tokenizer, self.layout = tokenizer, layout
        self.swap = SwappableLora(model, peft_config, layout)
        self.lock = threading.Lock()  # one generation at a time: the LoRA weights are shared

    def load_adapter(self, folder: str | os.PathLike) -> torch.Tensor:
        """An adapter directory's flat vector (L,), checked against the layout."""
        from icm.lora_io import flatten, load_adapter_tensors

        tensors, _ = load_adapter_tensors(folder)
        return flatten(tensors, self.layout)

    def generate(self, ids: list[int], params: SamplingParams,
                 adapter: torch.Tensor | None) -> list[Generated]:
        """``params.n`` continuations of one tokenised prompt, with ``adapter`` (None: base)."""
        with self.lock:
            if adapter is not None:
                self.swap.load(adapter)
                return self._generate(self.swap.model, ids, params)
            with self.swap.base() as model:
                return self._generate(model, ids, params)

    @torch.inference_mode()
    def _generate(self, model, ids: list[int], params: SamplingParams) -> list[Generated]:
        greedy = params.temperature == 0
        rows = 1 if greedy else params.n  # greedy choices are identical: decode once
        input_ids = torch.tensor([ids], device=next(model.parameters()).device)  # (1, T)
        kwargs: dict[str, Any] = dict(
            max_new_tokens=params.max_tokens, do_sample=not greedy, num_return_sequences=rows,
            attention_mask=torch.ones_like(input_ids), pad_token_id=self.tokenizer.pad_token_id,
            eos_token_id=self.tokenizer.eos_token_id)
        if not greedy:
            kwargs.update(temperature=params.temperature, top_p=params.top_p)
        if params.stop:  # not HF's stop_strings: they match across the prompt's end
            kwargs.update(stopping_criteria=[_StopInNewText(self.tokenizer, len(ids), params.stop)])
        with torch.random.fork_rng(devices=[]):
            if params.seed is not None:
                torch.manual_seed(params.seed)
            output = model.generate(input_ids, **kwargs)  # (rows, T + new)
        results = [self._finish(row[len(ids):], params) for row in output]
        return results * params.n if greedy else results

    def _finish(self, new_ids: torch.Tensor, params: SamplingParams) -> Generated:
        tokens = [int(t) for t in new_ids]  # finished rows of a batch are padded after the end
        eos = self.tokenizer.eos_token_id
        ended = eos in tokens
        count = tokens.index(eos) + 1 if ended else len(tokens)
        stopped_at = _first_stop(self.tokenizer, tokens[:count], params.stop)
        if stopped_at is not None:  # the padding after a stop string is no token of the answer
            count, ended = stopped_at, True
        text = self.tokenizer.decode(tokens[:count], skip_special_tokens=True)
        cuts = [text.index(s) for s in params.stop if s in text]
        if cuts:  # OpenAI leaves the stop string out of the text
            text = text[:min(cuts)]
        return Generated(text, "stop" if ended else "length", count)


def _stop_in(text: str, stops: Sequence[str]) -> bool:
    return any(stop in text for stop in stops)


def _first_stop(tokenizer, tokens: list[int], stops: Sequence[str]) -> int | None:
    """How many of ``tokens`` it takes for their text to hold a stop string (None: never)."""
    if not stops or not _stop_in(tokenizer.decode(tokens, skip_special_tokens=True), stops):
        return None
    return next(n for n in range(1, len(tokens) + 1)
                if _stop_in(tokenizer.decode(tokens[:n], skip_special_tokens=True), stops))


class _StopInNewText:
    """A `generate` stopping criterion: a row is done once its *generated* text holds a stop
    string (HF's ``stop_strings`` also match a string that begins inside the prompt)."""

    def __init__(self, tokenizer, prompt_length: int, stops: Sequence[str]):
        self.tokenizer, self.prompt_length, self.stops = tokenizer, prompt_length, tuple(stops)

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        new = input_ids[:, self.prompt_length:]  # (rows, new so far)
        texts = self.tokenizer.batch_decode(new, skip_special_tokens=True)
        return torch.tensor([_stop_in(text, self.stops) for text in texts],
                            dtype=torch.bool, device=input_ids.device)  # (rows,)


def completion_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())
