"""Settings of the vLLM completions engine (``vllm:`` in the Serve config's ``args``). No Ray or
vLLM import here: the app's arguments are validated before either is needed."""

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from icm.errors import InputError

# Module names vLLM's LoRA layers cover in Llama-family models (what a zoo LoRA may target).
VLLM_LORA_MODULES = frozenset({"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                               "down_proj"})


class VllmArgs(BaseModel):
    """The vLLM engine under Ray Serve LLM: one ``LLMServer`` deployment, adapters loaded from
    object storage per replica (an LRU of ``max_loras``), requests routed to replicas holding
    their adapter."""

    model_config = ConfigDict(extra="forbid")

    model_id: str | None = Field(None, description=(
        "The base model's name in requests (`model`); adapters are '<model_id>:<adapter_id>'. "
        "None: the generator's model spec."))
    adapter_uri: str | None = Field(None, description=(
        "Object storage the engine loads adapters from (s3://bucket/dir, gs://...); generated "
        "adapters are published there. None: `icm serve` starts an S3-compatible server on "
        "loopback (single machine only; `serve run` needs a real URI)."))
    device: Literal["auto", "cpu", "gpu"] = Field("auto", description=(
        "Where each engine replica runs; auto: a GPU when the cluster has one."))
    max_loras: int = Field(4, ge=1, description=(
        "Adapters one replica holds and batches together (vLLM max_loras = Ray's "
        "max_num_adapters_per_replica: the per-replica LRU)."))
    # vLLM takes only these values (its LoRAConfig checks them)
    max_lora_rank: Literal[1, 8, 16, 32, 64, 128, 256, 320, 512] = Field(16, description=(
        "Largest LoRA rank the engine takes; a generator of a larger rank is refused at start."))
    max_model_len: int = Field(2048, ge=64, description="Longest prompt + completion in tokens.")
    max_num_seqs: int = Field(64, ge=1, description="Sequences one replica decodes in a batch.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field("auto", description=(
        "Engine weights dtype; auto: bfloat16 on GPU, the model's own on CPU."))
    cpus: float = Field(1.0, gt=0, description=(
        "CPUs a CPU engine replica reserves (its placement group's one bundle; the replica actor "
        "itself takes none). With cpu_threads_bind nobind it also sets the engine's OpenMP threads "
        "(its whole CPUs, at least 1); otherwise vLLM's binding decides them."))
    cpu_threads_bind: str = Field("auto", pattern=r"^(auto|nobind|[0-9,\-|]+)$", description=(
        "VLLM_CPU_OMP_THREADS_BIND of a CPU replica: auto (vLLM binds its compute thread(s) to "
        "one NUMA node's cores, one core left to the front end), nobind (several replicas on one "
        "machine: auto would pin them all to the same core), or a core list such as 0-3."))
    # vLLM reads VLLM_CPU_KVCACHE_SPACE with int(): a fraction would kill the engine at start-up
    cpu_kv_cache_gib: int = Field(1, ge=1, description=(
        "KV cache of a CPU replica in whole GiB (VLLM_CPU_KVCACHE_SPACE)."))
    engine_kwargs: dict[str, Any] = Field(default_factory=dict, description=(
        "Further vLLM engine arguments, passed through (e.g. enforce_eager)."))


def check_engine_takes(generator, vllm: VllmArgs) -> None:
    """Refuse, at start-up, a generator whose adapters the engine cannot load (rank above
    ``max_lora_rank``, a module vLLM has no LoRA layer for): never a 500 at completion time."""
    rank = int(generator.peft_config["r"])
    modules = set(generator.peft_config["target_modules"])
    if rank > vllm.max_lora_rank:
        raise InputError(f"vllm.max_lora_rank is {vllm.max_lora_rank} but the generator's "
                         f"adapters have rank {rank}. Fix: set vllm.max_lora_rank to at least "
                         f"{rank} (one of 8, 16, 32, 64, ...), or serve with engine 'hf'.")
    if modules - VLLM_LORA_MODULES:
        raise InputError(f"the generator's adapters target {sorted(modules - VLLM_LORA_MODULES)}, "
                         f"which vLLM has no LoRA layer for (it takes {sorted(VLLM_LORA_MODULES)}). "
                         "Fix: serve with engine 'hf'.")
