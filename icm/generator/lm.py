"""The end-to-end objective: train the generator by the frozen base model's language-modelling
loss with the generated LoRA applied (``generator.objective: lm``, or ``hybrid`` with the
reconstruction loss beside it).

Per step, for each of ``lm_tasks`` training tasks: one of its episode vectors c, z ~ N(0, I),
the generated adapter W = G(z, c), and the mean token NLL of a few of its *train* texts under
base + W (with ``generator.lm_context: prompt`` each text is read after the prompt c was read
from, as evaluation's ``in-context+generated`` reads it, and never one of its demonstrations).
With ``generator.lm_teacher_weight`` w > 0 each text is read alone and the loss mixes its NLL
with the KL from the base model reading it after that prompt (context distillation). The adapter
is applied through `torch.func.functional_call` on a base model wrapped once in peft, so the
loss back-propagates through the frozen model into the generator. Eval texts are never read,
and only training tasks (held-out ones were dropped with the zoo) take part.

Ray-free: `jobs/generator_lm.py` runs `fit_lm` in a Ray Train `TorchTrainer` (data-parallel
workers, each with its own tasks per step, gradients averaged by DDP).
"""

from __future__ import annotations

import copy
import math
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from icm.config import GeneratorConfig, ModelConfig, TaskVectorConfig
from icm.generator.artifact import LoraGenerator, conditions_read
from icm.generator.data import PreparedData, SampleSet
from icm.generator.networks import cvae_loss
from icm.lora_io import LoraLayout, split
from icm.tasks import Task

LM_CHECKPOINT_FILE = "lm_state.pt"


class FunctionalLora:
    """A frozen base model in a peft LoRA wrapper whose LoRA tensors come from a flat vector
    per call, differentiably (the generator's output), instead of from its parameters."""

    def __init__(self, base_model, peft_config: Mapping[str, Any], layout: LoraLayout):
        from peft import get_peft_model

        from icm.adapter_swap import lora_config_from_json

        self._attach(get_peft_model(base_model, lora_config_from_json(peft_config)).eval(), layout)

    @classmethod
    def on_peft_model(cls, model, layout: LoraLayout) -> FunctionalLora:
        """Use a model already wrapped in a peft LoRA (e.g. `SwappableLora.model`, in eval mode)
        instead of wrapping another copy; its own LoRA weights are left as they are."""
        applier = cls.__new__(cls)
        applier._attach(model, layout)
        return applier

    def _attach(self, model, layout: LoraLayout) -> None:
        """Freeze every parameter (gradients flow only into the vectors passed to `nll`)."""
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        self.model, self.layout = model, layout
        self.device = next(model.parameters()).device
        names = {self._key(name): name for name, _ in self.model.named_parameters()
                 if ".lora_" in name}
        missing = [key for key in layout.keys if key not in names]
        if missing:
            raise ValueError(f"LoRA tensors {missing[:2]} of the layout are not in the model: "
                             "the generator was built for another base model or LoRA config")
        self.names = [names[key] for key in layout.keys]

    def _key(self, name: str) -> str:
        """Parameter name -> adapter state-dict key (peft drops the adapter's name)."""
        adapter = self.model.active_adapter
        return name.replace(f".{adapter}.", ".")

    def forward(self, vector: torch.Tensor, batch: Mapping[str, torch.Tensor]):
        """The model's output (loss, logits (B, T, V)) on ``batch`` (input_ids, attention_mask,
        labels; (B, T) each) under base + the LoRA ``vector`` (L,); differentiable in it."""
        pieces = split(vector, self.layout)  # layout key -> view of ``vector``
        params = {name: pieces[key] for name, key in zip(self.names, self.layout.keys)}
        batch = {key: value.to(self.device) for key, value in batch.items()}
        return torch.func.functional_call(self.model, params, args=(), kwargs=batch)

    def nll(self, vector: torch.Tensor, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Mean token NLL of ``batch`` under base + the LoRA ``vector`` (L,)."""
        return self.forward(vector, batch).loss

    @torch.no_grad()
    def prompted_log_probs(self, prompt: Sequence[int], texts: Mapping[str, torch.Tensor]
                           ) -> torch.Tensor:
        """Log-probabilities (B, T, V) the base model alone (adapter off) gives each token of
        ``texts`` (input_ids, attention_mask; (B, T), right-padded) read after ``prompt``: row
        t is the distribution over text token t. The prompt is read once; its cache serves
        the B texts."""
        ids = texts["input_ids"].to(self.device)  # (B, T)
        with self.model.disable_adapter():
            head = self.model(input_ids=torch.tensor([list(prompt)], device=self.device),
                              use_cache=True)  # logits (1, P, V)
            cache = head.past_key_values
            cache.batch_repeat_interleave(len(ids))
            mask = torch.cat([torch.ones(len(ids), len(prompt), dtype=torch.long,
                                         device=self.device),
                              texts["attention_mask"].to(self.device)], 1)  # (B, P + T)
            tail = self.model(input_ids=ids, attention_mask=mask, past_key_values=cache)
        first = head.logits[:, -1:].expand(len(ids), 1, -1)  # (B, 1, V): predicts text token 0
        logits = torch.cat([first, tail.logits[:, :-1]], 1)  # (B, T, V): row t predicts token t
        return logits.float().log_softmax(-1)


def generated_vectors(generator: LoraGenerator, conditions: torch.Tensor, z: torch.Tensor
                      ) -> torch.Tensor:
    """Full flat adapters (B, L) from z-scored conditions (B, D) and latents (B, latent), with
    gradients to the generator's network (`LoraGenerator.sample` is the no-grad path)."""
    return generator.full_vectors(generator.generated_values(z, conditions))


def average_gradients(parameters) -> None:
    """Data parallelism: every worker's gradients replaced by their mean over workers (a
    no-op outside torch.distributed). Each worker drew its own tasks for the step."""
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized() or dist.get_world_size() < 2:
        return
    world = dist.get_world_size()
    for parameter in parameters:
        if parameter.grad is None:
            parameter.grad = torch.zeros_like(parameter)
        dist.all_reduce(parameter.grad)
        parameter.grad /= world


def shared_residual(generator: LoraGenerator, cfg: GeneratorConfig) -> torch.nn.Parameter | None:
    """With ``cfg.lm_shared_residual``: the generator's residual (L_gen,) as a trainable
    parameter, zeros when the start has none (so step 0 generates what reconstruction did)."""
    if not cfg.lm_shared_residual:
        return None
    start = generator.residual
    if start is None:
        start = torch.zeros(generator.generated_dim, device=generator.template.device)
    generator.residual = torch.nn.Parameter(start.detach().clone())
    return generator.residual


def anchor_offset(generator: LoraGenerator, anchor: torch.Tensor) -> torch.Tensor:
    """The shared residual (L_gen,) that moves the generator's zoo mean onto ``anchor`` (L,), a
    flat adapter in layout order (``generator.lm_anchor: multitask``): adapter = anchor +
    (network output - zoo mean). Its generated positions minus what an all-zero network output
    decodes to (the zoo's mean: the codec is affine)."""
    if anchor.shape != generator.template.shape:
        raise ValueError(f"anchor has shape {tuple(anchor.shape)}; the generator's adapters have "
                         f"{tuple(generator.template.shape)} (another layout?)")
    device = generator.template.device
    zero = torch.zeros(1, generator.model.spec.input_dim, device=device)  # (1, F)
    with torch.no_grad():
        mean = generator.codec.decode(zero)[0]  # (L_gen,) the zoo mean, de-normalised
    return anchor.to(device)[generator.positions] - mean


@dataclass(frozen=True)
class EpisodePrompt:
    """The in-context prompt one condition row was read from, and the demonstrations it shows."""

    prompt: str
    demos: tuple[str, ...]


def episode_prompts(task: Task, task_vectors: TaskVectorConfig, modes: Sequence[str],
                    read: Mapping[tuple[str, int], tuple[str, bool]]) -> list[EpisodePrompt]:
    """Per condition row of ``task``, in `load_task_conditions`' order (each of ``modes`` in
    turn, its episodes in index order): the prompt its vector was read from (``read``: the
    task-vectors stage's (mode, episode) -> (prompt, truncated), `load_episode_prompts`) and
    that episode's demonstrations (`build_episodes`). An uncut prompt must be the one this
    config builds, else the stage ran with other settings and the rows would not match."""
    from icm.task_vectors import build_episodes

    rows = []
    for mode in modes:
        for episode in build_episodes(task, task_vectors, mode=mode):
            prompt, truncated = read.get((mode, episode.episode), (None, False))
            if prompt is None or (not truncated and prompt != episode.prompt):
                raise ValueError(
                    f"task {task.name!r}: the task_vectors stage read no such {mode} episode "
                    f"{episode.episode} as task_vectors settings build now (they changed since "
                    "it ran). Fix: rerun the task_vectors stage, or restore its settings")
            rows.append(EpisodePrompt(prompt, episode.demos))
    return rows


def stage_episode_prompts(stage_dir: str | Path, tasks: Mapping[str, Task],
                          task_vectors: TaskVectorConfig, modes: Sequence[str]
                          ) -> dict[str, list[EpisodePrompt]]:
    """Each of ``tasks``' `episode_prompts`, from the prompts the finished task-vectors stage at
    ``stage_dir`` read (this run's own stage, or ``generator.lm_extra_root``'s)."""
    from icm.task_vectors import load_episode_prompts

    read = load_episode_prompts(stage_dir, sorted(tasks))
    return {name: episode_prompts(task, task_vectors, modes, read[name])
            for name, task in tasks.items()}


@dataclass
class PromptContext:
    """``generator.lm_context: prompt``: each condition row's prompt as token ids, each text as it
    reads after a prompt, and the rows whose prompt leaves some text to predict."""

    prompts: list[list[int]]  # per condition row: text-start token + prompt tokens
    targets: list[list[int]]  # per text: TEXT_SEPARATOR + text tokens, cut to lm_seq_len
    allowed: list[list[int]]  # per condition row: the texts not among its demonstrations
    rows: list[int]  # the condition rows with at least one allowed text
    start: int  # the text-start token

    @classmethod
    def build(cls, texts: Sequence[str], prompts: Sequence[EpisodePrompt], tokenizer,
              seq_len: int) -> PromptContext:
        from icm.eval.baselines import TEXT_SEPARATOR
        from icm.models import text_start_token_id

        start = text_start_token_id(tokenizer)
        # a demonstration is a text cut to task_vectors.max_demo_chars: a text is shown when it
        # starts with one (a shorter text that begins another is excluded too: harmless)
        allowed = [[i for i, text in enumerate(texts)
                    if not any(text.startswith(demo) for demo in p.demos)] for p in prompts]
        spaced = [TEXT_SEPARATOR + text for text in texts]  # as evaluation's in-context reads them
        encoded = tokenizer(spaced, add_special_tokens=False)["input_ids"]
        return cls(prompts=[[start, *tokenizer(p.prompt, add_special_tokens=False)["input_ids"]]
                            for p in prompts],
                   targets=[ids[:seq_len] for ids in encoded], allowed=allowed,
                   rows=[row for row, texts_left in enumerate(allowed) if texts_left],
                   start=start)

    def batch(self, row: int, texts: Sequence[int], pad_id: int) -> dict[str, torch.Tensor]:
        """Row ``row``'s prompt followed by each of ``texts`` (B, P + T): loss on the text only."""
        from icm.lora_train import IGNORE_INDEX, collate

        prompt = self.prompts[row]
        batch = collate([prompt + self.targets[i] for i in texts], pad_id)
        batch["labels"][:, :len(prompt)] = IGNORE_INDEX  # the prompt is read, not predicted
        return batch

    def alone_batch(self, texts: Sequence[int], pad_id: int) -> dict[str, torch.Tensor]:
        """Each of ``texts`` read without a prompt, after the start token (B, 1 + T): position t
        predicts the text token `prompted_log_probs`' row t is a distribution over."""
        from icm.lora_train import collate

        return collate([[self.start, *self.targets[i]] for i in texts], pad_id)

    def text_batch(self, texts: Sequence[int], pad_id: int) -> dict[str, torch.Tensor]:
        """The tokens of ``texts`` alone (B, T), right-padded: what reads after a prompt."""
        from icm.lora_train import collate

        return collate([self.targets[i] for i in texts], pad_id)


def distilled_loss(applier: FunctionalLora, vector: torch.Tensor, teacher: PromptContext,
                   row: int, texts: Sequence[int], pad_id: int, weight: float) -> torch.Tensor:
    """``generator.lm_teacher_weight``: (1 - weight) x the NLL of ``texts`` read alone under
    base + ``vector`` + weight x the mean over their tokens of KL(base reading them after row
    ``row``'s prompt || base + ``vector`` reading them alone). Differentiable in ``vector``."""
    alone = teacher.alone_batch(texts, pad_id)  # (B, 1 + T)
    out = applier.forward(vector, alone)
    prompted = applier.prompted_log_probs(teacher.prompts[row], teacher.text_batch(texts, pad_id))
    length = prompted.shape[1]  # T
    student = out.logits[:, :length].float().log_softmax(-1)  # (B, T, V)
    mask = alone["attention_mask"][:, 1:].to(student)  # (B, T): 1 on a text token
    kl = (prompted.exp() * (prompted - student)).sum(-1)  # (B, T)
    return (1 - weight) * out.loss + weight * (kl * mask).sum() / mask.sum()


@dataclass
class LmTask:
    """One training task's LM data: tokenised train texts and its episode vectors."""

    name: str
    sequences: list[list[int]]  # start token + text + EOS, cut to lm_seq_len
    episodes: torch.Tensor  # (E, D) z-scored condition of each row (its episode's, or others')
    context: PromptContext | None = None  # generator.lm_context: prompt
    teacher: PromptContext | None = None  # generator.lm_teacher_weight > 0

    @property
    def prompted(self) -> PromptContext | None:
        """The rows' prompts, read by the adapted model or by the teacher; None if neither."""
        return self.context or self.teacher

    def batch(self, episode: int, texts: Sequence[int], pad_id: int) -> dict[str, torch.Tensor]:
        """The LM batch of ``texts`` under condition row ``episode``: the texts alone, or each
        read after that row's prompt (a teacher's rows are read by `distilled_loss`)."""
        from icm.lora_train import collate

        if self.context is None:
            return collate([self.sequences[i] for i in texts], pad_id)
        return self.context.batch(episode, texts, pad_id)

    def loss(self, applier: FunctionalLora, vector: torch.Tensor, episode: int,
             texts: Sequence[int], pad_id: int, teacher_weight: float) -> torch.Tensor:
        """This row's LM loss under base + ``vector``: its texts' NLL, or with a teacher the
        `distilled_loss`."""
        if self.teacher is None:
            return applier.nll(vector, self.batch(episode, texts, pad_id))
        return distilled_loss(applier, vector, self.teacher, episode, texts, pad_id,
                              teacher_weight)


def other_episodes_mean(episodes: torch.Tensor, modes: int, task: str) -> torch.Tensor:
    """``generator.lm_condition_episodes: others``: each row of ``episodes`` (E x modes, D; each
    mode's episodes in turn, `load_task_conditions`' order) replaced by the mean of the other
    rows of its mode, so a row's condition holds evidence its own prompt does not. A mode with a
    single episode keeps its row."""
    rows, width = episodes.shape
    if rows % modes:
        raise ValueError(f"task {task!r}: {rows} condition rows do not split into "
                         f"{modes} modes of equal episodes; its task vectors lack a mode. Fix: "
                         "rerun the task_vectors stage, or set generator.lm_condition_episodes=own")
    blocks = episodes.reshape(modes, rows // modes, width)  # (M, E, D)
    if blocks.shape[1] == 1:
        return episodes
    others = (blocks.sum(1, keepdim=True) - blocks) / (blocks.shape[1] - 1)  # (M, E, D)
    return others.reshape(rows, width)


def lm_tasks(train_texts: Mapping[str, Sequence[str]], conditions: Mapping[str, Any],
             generator: LoraGenerator, tokenizer, cfg: GeneratorConfig,
             prompts: Mapping[str, Sequence[EpisodePrompt]] | None = None) -> list[LmTask]:
    """LM data for every task in ``train_texts`` (train split texts only: the caller never
    passes eval texts or held-out tasks), at most ``cfg.lm_max_texts`` texts each. With
    ``cfg.lm_context`` prompt, ``prompts`` gives each task's `episode_prompts` (one per
    condition row), as it does with ``cfg.lm_teacher_weight`` > 0 (the teacher reads them); a
    task whose every text is among its prompts' demonstrations is left out."""
    import numpy as np

    from icm.lora_train import tokenize_texts

    if cfg.reads_prompts and prompts is None:
        raise ValueError("generator.lm_context=prompt and generator.lm_teacher_weight > 0 need "
                         "each task's episode prompts")
    distilled = cfg.lm_teacher_weight > 0  # the rows' prompts are the teacher's
    tasks = []
    for name in sorted(train_texts):
        texts = [t for t in train_texts[name] if t.strip()][:cfg.lm_max_texts]
        if not texts:
            continue
        raw = torch.from_numpy(np.array(conditions[name], dtype=np.float32))  # (E, D)
        context = None
        if cfg.reads_prompts:
            if len(prompts[name]) != len(raw):
                raise ValueError(f"task {name!r}: {len(prompts[name])} episode prompts for "
                                 f"{len(raw)} condition rows; the task vectors were read from "
                                 "other episodes (task_vectors or condition_modes changed)")
            # a teacher's student reads the start token first: lm_seq_len tokens in all
            length = cfg.lm_seq_len - distilled
            context = PromptContext.build(texts, prompts[name], tokenizer, length)
            if not context.rows:
                continue
        episodes = generator.condition_norm.apply(raw.to(generator.template.device))  # (E, D)
        if cfg.lm_condition_episodes == "others":
            episodes = other_episodes_mean(episodes, len(cfg.condition_modes), name)
        sequences = tokenize_texts(tokenizer, texts, cfg.lm_seq_len)
        tasks.append(LmTask(name, sequences, episodes, context=None if distilled else context,
                            teacher=context if distilled else None))
    if not tasks:
        raise ValueError("no training task has train texts for the LM objective")
    return tasks


@dataclass
class LmSetup:
    """What an LM fine-tuning run needs besides the generator: the frozen base model wrapped
    for functional LoRAs, the tasks' LM data, and the tokenizer."""

    applier: FunctionalLora
    tasks: list[LmTask]
    tokenizer: Any

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_token_id or 0


def lm_setup(generator: LoraGenerator, model: ModelConfig, train_texts: Mapping[str, Sequence[str]],
             conditions: Mapping[str, Any], cfg: GeneratorConfig, device: str = "auto",
             prompts: Mapping[str, Sequence[EpisodePrompt]] | None = None) -> LmSetup:
    """Load the base model on ``device`` and build the LM data (the one set-up of the Ray Train
    workers and the Tune objective trials)."""
    from icm.models import load_base_model

    base, tokenizer = load_base_model(model.spec, cache_dir=model.cache_dir, dtype=model.dtype,
                                      device=device)
    return LmSetup(FunctionalLora(base, generator.peft_config, generator.layout),
                   lm_tasks(train_texts, conditions, generator, tokenizer, cfg, prompts), tokenizer)


def hybrid_term(cfg: GeneratorConfig, data: Callable[[], PreparedData]
                ) -> tuple[SampleSet, torch.Tensor] | None:
    """``fit_lm``'s ``reconstruction`` argument: (zoo samples, loss weights) for the hybrid
    objective, None otherwise (``data`` is only called, e.g. to read the zoo, when needed)."""
    if cfg.objective != "hybrid":
        return None
    representation = data().representation(cfg)
    return representation.train, representation.codec.weights()


@dataclass
class LmResult:
    history: list[dict[str, Any]] = field(default_factory=list)
    steps: int = 0
    train_seconds: float = 0.0


def _step_choices(tasks: Sequence[LmTask], cfg: GeneratorConfig, step: int, rank: int
                  ) -> list[tuple[LmTask, int, list[int]]]:
    """Rank ``rank``'s (task, episode, text indices) at ``step``: a function of (seed, step,
    rank) only, so a resumed run draws what an uninterrupted one would have."""
    rng = random.Random(f"lm-{cfg.seed}-{step}-{rank}")
    picks = []
    for task in rng.sample(list(tasks), min(cfg.lm_tasks, len(tasks))):
        if task.prompted is None:
            texts = [rng.randrange(len(task.sequences)) for _ in range(cfg.lm_texts)]
            picks.append((task, rng.randrange(len(task.episodes)), texts))
        else:  # the episode first: its prompt's own demonstrations are never a target under it
            episode = rng.choice(task.prompted.rows)
            allowed = task.prompted.allowed[episode]
            picks.append((task, episode, [rng.choice(allowed) for _ in range(cfg.lm_texts)]))
    return picks


def step_generator(kind: str, cfg: GeneratorConfig, step: int, rank: int) -> torch.Generator:
    """A torch RNG for one kind of draw at one step on one rank: a function of (seed, step,
    rank) only. Every rank resumes from rank 0's checkpoint, so a sequential per-rank RNG saved
    in it would give every rank rank 0's draws after a restart; these need no saving."""
    seed = random.Random(f"{kind}-{cfg.seed}-{step}-{rank}").randrange(2 ** 31)
    return torch.Generator().manual_seed(seed)


def dropped_conditions(conditions: torch.Tensor, cfg: GeneratorConfig, step: int, rank: int
                       ) -> torch.Tensor:
    """The z-scored conditions (T, D) with each row replaced by the training mean (zeros) with
    probability ``cfg.lm_condition_dropout``: rows drawn from (seed, step, rank) only, so a
    resumed run drops what an uninterrupted one would have."""
    if cfg.lm_condition_dropout == 0:
        return conditions
    draws = torch.rand(len(conditions), generator=step_generator("dropout", cfg, step, rank))
    keep = (draws >= cfg.lm_condition_dropout).to(conditions)  # (T,) 1: the task's own
    return conditions * keep.unsqueeze(1)


def lm_step_loss(generator: LoraGenerator, applier: FunctionalLora, tasks: Sequence[LmTask],
                 cfg: GeneratorConfig, step: int, rank: int, pad_id: int) -> torch.Tensor:
    """Mean over this step's tasks of the LM loss of their generated adapters (`LmTask.loss`)."""
    picks = _step_choices(tasks, cfg, step, rank)
    episodes = torch.stack([task.episodes[episode] for task, episode, _ in picks])  # (T, D)
    conditions = dropped_conditions(conditions_read(episodes, cfg), cfg, step, rank)  # (T, D)
    z = torch.randn(len(picks), generator.model.spec.latent_dim,
                    generator=step_generator("z", cfg, step, rank)).to(conditions.device)  # (T, latent)
    vectors = generated_vectors(generator, conditions, z)  # (T, L)
    losses = [task.loss(applier, vector, episode, texts, pad_id, cfg.lm_teacher_weight)
              for vector, (task, episode, texts) in zip(vectors, picks)]
    return torch.stack(losses).mean()


def fit_lm(generator: LoraGenerator, applier: FunctionalLora, tasks: Sequence[LmTask],
           cfg: GeneratorConfig, *, pad_id: int,
           reconstruction: tuple[SampleSet, torch.Tensor] | None = None, rank: int = 0,
           report: Callable[[dict[str, Any], dict[str, Any]], None] | None = None,
           resume_state: dict[str, Any] | None = None) -> LmResult:
    """Train ``generator.model`` by the LM loss for ``cfg.lm_steps`` steps; with
    ``reconstruction`` = (zoo samples, loss weights) add ``cfg.lm_reconstruction_weight`` x
    the CVAE loss (the ``hybrid`` objective), which keeps the latent meaningful and the output
    near the zoo. Under torch.distributed each rank draws its own tasks and gradients are
    averaged over ranks, so every rank holds the same network after each step.

    ``report(metrics, state)`` is called every ``cfg.report_every`` steps and at the end with
    the full training state (what `resume_state` takes back).
    """
    network, residual = generator.model, shared_residual(generator, cfg)
    groups = [{"params": list(network.parameters())}]
    if residual is not None:  # a raw adapter's scale: its own lr, no decay towards 0
        groups.append({"params": [residual], "lr": cfg.lm_residual_lr, "weight_decay": 0.0})
    # A constant rate, no schedule over lm_steps: a longer run continues a shorter one's
    # checkpoint exactly (GeneratorConfig.lm_run_settings relies on it).
    opt = torch.optim.AdamW(groups, lr=cfg.lm_lr, weight_decay=cfg.weight_decay)
    trainable = [p for group in groups for p in group["params"]]
    result = LmResult()
    if resume_state is not None:
        if resume_state["step"] > cfg.lm_steps:
            raise ValueError(f"the LM checkpoint is at step {resume_state['step']}, past "
                             f"generator.lm_steps={cfg.lm_steps}; it cannot be rewound. Fix: "
                             "resume with lm_steps >= its step, or start without it.")
        network.load_state_dict(resume_state["model"])
        if residual is not None:
            residual.data.copy_(resume_state["residual"])
        opt.load_state_dict(resume_state["optimizer"])
        result = LmResult(resume_state["history"], resume_state["step"], resume_state["train_seconds"])
    network.train()
    running = {"lm": 0.0, "recon": 0.0, "n": 0}
    while result.steps < cfg.lm_steps:
        started = time.perf_counter()
        loss = lm = lm_step_loss(generator, applier, tasks, cfg, result.steps, rank, pad_id)
        if reconstruction is not None:
            samples, weights = reconstruction
            device = generator.template.device
            gen = step_generator("recon", cfg, result.steps, rank)  # the batch and eps of this step
            x, c, offset = (t.to(device) for t in samples.sample_batch(cfg.batch_size, gen))
            eps = torch.randn(len(x), generator.model.spec.latent_dim, generator=gen).to(device)
            x_hat, mu, logvar = network(x, c, eps)
            terms = cvae_loss(x_hat, x, mu, logvar, weights=weights.to(device), offset=offset,
                              beta=cfg.beta, free_bits=cfg.free_bits)
            loss = lm + cfg.lm_reconstruction_weight * terms["loss"]
            running["recon"] += float(terms["recon"].detach())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        average_gradients(trainable)
        torch.nn.utils.clip_grad_norm_(network.parameters(), 1.0)  # Adam scales the residual's
        opt.step()
        result.steps += 1
        result.train_seconds += time.perf_counter() - started
        running["lm"] += float(lm.detach())
        running["n"] += 1
        diverged = not math.isfinite(float(loss.detach()))
        if result.steps % cfg.report_every and result.steps < cfg.lm_steps and not diverged:
            continue
        n = max(running["n"], 1)
        metrics = {"lm_step": result.steps, "train_lm_nll": running["lm"] / n,
                   "train_lm_ppl": math.exp(min(running["lm"] / n, 50.0)),
                   "train_recon": running["recon"] / n if reconstruction is not None else None,
                   "train_seconds": result.train_seconds, "diverged": diverged,
                   "threads": torch.get_num_threads()}  # what the worker ran on, for the cost
        result.history.append(metrics)
        running = {"lm": 0.0, "recon": 0.0, "n": 0}
        if report is not None:  # a copy: state_dict tensors alias the live parameters
            report(metrics, copy.deepcopy({
                "model": network.state_dict(), "optimizer": opt.state_dict(),
                "residual": None if residual is None else residual.detach(),
                "step": result.steps, "history": result.history, "train_seconds": result.train_seconds}))
        if diverged:
            break
    network.eval()
    if residual is not None:
        generator.residual = residual.detach()
    return result
