"""Task vectors: the frozen base LM reads a task in context; its pooled hidden states describe it.

A task is shown to the model as an *episode*: a prompt holding its description and/or k
demonstrations sampled from its train split (`format_prompt`, the one place the prompt is
defined). The hidden states at the configured layers, pooled over the prompt (mean over tokens,
the last token, or the means of J contiguous spans concatenated: pooling ``chunks``, J x D),
give one vector per (episode, layer, pooling); the per-task mean is their average. Pooling
``shift`` measures what the prompt does rather than what it looks like: the states of its last
block (`split_last_block`) read after the rest of the prompt, minus the same block read alone,
averaged over the block's tokens. No fine-tuning is involved, so a new task gets a vector from
one forward pass (two with ``shift``).

`TaskEncoder` is the single code path: the Ray Data actor (`TaskVectorExtractor`) calls
`TaskEncoder.encode_prompts` on batches of prompts that the job fitted with
`TaskEncoder.fit_prompt`, and a single request calls `TaskEncoder.encode`, which runs those two
same steps for one description / example list.

Outputs of the ``task_vectors`` stage (written by ``jobs/task_vectors.py``)::

    task_vectors/episodes.parquet     task, group, heldout, episode, mode, prompt, n_demos,
                                      truncated, n_tokens, shard
    task_vectors/vectors/shard-*/     Ray Data parquet: task, group, heldout, episode, mode,
                                      layer, pooling, vector list<float32>
    task_vectors/task_means.parquet   task, group, heldout, mode, layer, pooling, episodes, vector
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from types import MappingProxyType
from typing import get_args

import numpy as np
import torch

from icm.config import Pooling, TaskVectorConfig
from icm.errors import InputError
from icm.models import right_pad, text_start_token_id
from icm.tasks import Task

log = logging.getLogger(__name__)

MODES = ("description", "demos", "both")
POOLINGS = get_args(Pooling)  # the config's list, not a copy of it
EPISODES_FILE = "episodes.parquet"
VECTORS_DIR = "vectors"
MEANS_FILE = "task_means.parquet"
TEMPLATE_FILE = "prompt_template.txt"

# The in-context prompt, in three blocks. Every prompt ends with the same cue ("Text:"), the
# point where the model is about to write a text of the task, so the last-token vector reads
# the task at the same position whatever the mode.
PROMPT_TEMPLATE = MappingProxyType({
    "description": "Task: {description}\n\n",  # modes "description" and "both"
    "demo": "Text: {demo}\n\n",  # modes "demos" and "both", once per demonstration
    "cue": "Text:",  # always last
})


class TaskVectorInputError(InputError):
    """Bad input to task-vector extraction; the message names the task or field and the fix."""

    def __init__(self, problem: str, *, task: str | None = None, field: str | None = None,
                 fix: str | None = None):
        where = ", ".join(part for part in (task and f"task '{task}'", field and f"field '{field}'")
                          if part)
        message = (f"{where}: " if where else "") + problem
        super().__init__(message + (f" Fix: {fix}" if fix else ""))


def template_text() -> str:
    """The prompt template as saved next to the outputs (``prompt_template.txt``)."""
    blocks = "\n".join(f"{name}: {text!r}" for name, text in PROMPT_TEMPLATE.items())
    example = "\n".join(f"--- mode {mode}\n" + format_prompt("DESCRIPTION", ["DEMO 1", "DEMO 2"],
                                                                mode=mode) for mode in MODES)
    return (f"# Task-vector prompt template (icm/task_vectors.py PROMPT_TEMPLATE)\n{blocks}\n"
            f"# Assembled, with 2 demonstrations\n{example}\n")


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise TaskVectorInputError(f"unknown mode {mode!r}.", field="task_vectors.modes",
                                   fix=f"use one of {list(MODES)}.")


def format_prompt(description: str | None, demos: Sequence[str], *, mode: str) -> str:
    """The in-context prompt of one episode; parts the mode does not use are left out.

    Args:
        description: the task description (used by modes "description" and "both").
        demos: demonstration texts, in order (used by modes "demos" and "both").
        mode: "description", "demos" or "both".

    Raises:
        TaskVectorInputError: an unknown mode, or a part the mode needs is missing or empty.
    """
    _check_mode(mode)
    parts = []
    if mode in ("description", "both"):
        if description is None or not description.strip():
            raise TaskVectorInputError(f"is empty, but mode {mode!r} needs a description.",
                                       field="description", fix="give the task a description.")
        parts.append(PROMPT_TEMPLATE["description"].format(description=description.strip()))
    if mode in ("demos", "both"):
        if not demos:
            raise TaskVectorInputError(f"mode {mode!r} needs at least one demonstration.",
                                       field="examples", fix="pass one or more example texts.")
        for index, demo in enumerate(demos):
            if not isinstance(demo, str) or not demo.strip():
                raise TaskVectorInputError("is empty.", field=f"examples[{index}]",
                                           fix="remove it or give it text.")
            parts.append(PROMPT_TEMPLATE["demo"].format(demo=demo.strip()))
    return "".join(parts) + PROMPT_TEMPLATE["cue"]


def split_last_block(prompt: str) -> tuple[str, str]:
    """``prompt`` as (head, tail), head + tail == prompt: the tail is its last block, the last
    demonstration with the cue after it, or the cue alone where no demonstration ends the prompt
    (mode description), with the blank line before it. Pooling ``shift`` reads the tail after the
    head and alone. The blank line goes with the tail because the tokenizer merges a trailing
    "\\n\\n" into one token but splits it before text: so head and tail tokenised apart give the
    whole prompt's tokens."""
    cue, demo_start = PROMPT_TEMPLATE["cue"], PROMPT_TEMPLATE["demo"].split("{demo}")[0]
    body = prompt[:-len(cue)] if prompt.endswith(cue) else prompt
    start = body.rfind("\n\n" + demo_start)
    if start < 0:  # a first demonstration starts the prompt (head empty), or no demonstration
        start = 0 if body.startswith(demo_start) else max(0, len(body) - 2)
    return prompt[:start], prompt[start:]


def clip_demos(demos: Sequence[str], max_chars: int) -> tuple[str, ...]:
    """Each demonstration cut to ``max_chars`` characters (long texts would crowd out the rest)."""
    return tuple(demo[:max_chars] for demo in demos)


@dataclass(frozen=True)
class Episode:
    """One in-context prompt of one task. ``truncated``/``n_tokens`` are set by `fit_prompt`."""

    task: str
    episode: int
    mode: str
    prompt: str
    n_demos: int
    description: str | None = None
    demos: tuple[str, ...] = ()
    truncated: bool = False
    n_tokens: int | None = None


def sample_demos(task: Task, cfg: TaskVectorConfig, episode: int) -> tuple[str, ...]:
    """The demonstrations of ``episode``: up to k train texts, seeded by (seed, task, episode).

    The same episode index draws the same texts in modes "demos" and "both", so the two modes
    differ only by the description.
    """
    texts = task.train_texts()  # held-out tasks too: their own train split is their context
    if not texts:
        raise TaskVectorInputError("has no train texts to draw demonstrations from.",
                                   task=task.name, field="train.jsonl",
                                   fix="add texts, or use modes=[description].")
    k = min(cfg.k, len(texts))
    rng = random.Random(f"{cfg.seed}:{task.name}:{episode}")  # str seeds hash stably across runs
    return clip_demos([texts[i] for i in rng.sample(range(len(texts)), k)], cfg.max_demo_chars)


def build_episodes(task: Task, cfg: TaskVectorConfig, *, mode: str) -> list[Episode]:
    """``cfg.episodes`` seeded episodes of ``task`` in ``mode`` (demos from its train split only).

    A task with fewer train texts than ``cfg.k`` uses all of them (logged); in mode
    "description" every episode holds the same prompt.
    """
    _check_mode(mode)
    if mode != "description":
        n_train = len(task.train_texts())
        if 0 < n_train < cfg.k:
            log.warning("task '%s' has %d train texts, fewer than task_vectors.k=%d: its episodes "
                        "use all %d", task.name, n_train, cfg.k, n_train)
    episodes = []
    for index in range(cfg.episodes):
        demos = sample_demos(task, cfg, index) if mode != "description" else ()
        description = task.description if mode != "demos" else None
        prompt = format_prompt(description, demos, mode=mode)
        episodes.append(Episode(task.name, index, mode, prompt, len(demos), description, demos))
    return episodes


@dataclass(frozen=True)
class FittedPrompt:
    prompt: str
    n_demos: int
    n_tokens: int  # including the text-start token
    truncated: bool  # demonstrations were dropped or text was cut to fit the token budget


def chunk_weights(lengths: torch.Tensor, chunks: int, width: int) -> torch.Tensor:
    """(B, J, T) averaging weights of pooling ``chunks``: the body of each prompt (its ``n =
    length - 1`` tokens after the text-start token) split into J contiguous spans, span j
    covering body tokens [floor(j n / J), floor((j + 1) n / J)). A body shorter than J tokens
    gives every span at least its first token, so no span is empty.

    Args:
        lengths: (B,) prompt lengths, the text-start token included (>= 2).
        chunks: J.
        width: T, the padded batch length.
    """
    body = (lengths.float() - 1).clamp(min=1)[:, None]  # (B, 1)
    index = torch.arange(chunks, device=lengths.device, dtype=torch.float32)[None]  # (1, J)
    start = torch.floor(index * body / chunks)  # (B, J)
    end = torch.maximum(torch.floor((index + 1) * body / chunks), start + 1)  # (B, J)
    # (T,): each position's index in the body (the text-start token is -1)
    position = torch.arange(width, device=lengths.device, dtype=torch.float32) - 1
    inside = (position >= start[..., None]) & (position < end[..., None])  # (B, J, T)
    weights = inside.float()
    return weights / weights.sum(-1, keepdim=True)


class TaskEncoder:
    """Pooled hidden states of a frozen causal LM for in-context prompts (batch or single)."""

    def __init__(self, model, tokenizer, cfg: TaskVectorConfig):
        """Check ``cfg`` against ``model``; raises `TaskVectorInputError` naming the bad field."""
        self.model, self.tokenizer, self.cfg = model.eval(), tokenizer, cfg
        self.body = getattr(model, "base_model", model)  # the transformer without its LM head
        n_layers = model.config.num_hidden_layers
        for layer in cfg.layers:
            if not -(n_layers + 1) <= layer <= n_layers:
                raise TaskVectorInputError(
                    f"layer {layer} does not exist: the model has hidden states 0..{n_layers}.",
                    field="task_vectors.layers",
                    fix=f"use indices in [-{n_layers + 1}, {n_layers}].")
        if len({layer % (n_layers + 1) for layer in cfg.layers}) != len(cfg.layers):
            raise TaskVectorInputError(f"{cfg.layers} names a hidden state twice.",
                                       field="task_vectors.layers", fix="list each layer once.")
        context = getattr(model.config, "max_position_embeddings", None)
        if context is not None and cfg.max_prompt_tokens > context:
            raise TaskVectorInputError(
                f"{cfg.max_prompt_tokens} is longer than the model's context of {context} tokens.",
                field="task_vectors.max_prompt_tokens", fix=f"set it to at most {context}.")
        self.start_id = text_start_token_id(tokenizer)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.hidden_size = model.config.hidden_size
        self.keys = [(layer, pooling) for layer in cfg.layers for pooling in cfg.poolings]
        self.reads_shift = "shift" in cfg.poolings

    def _token_ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def count_tokens(self, prompt: str) -> int:
        """Tokens the model reads for ``prompt``, the text-start token included."""
        return 1 + len(self._token_ids(prompt))

    def fit_prompt(self, description: str | None, demos: Sequence[str], *, mode: str,
                   label: str = "request") -> FittedPrompt:
        """Format a prompt that fits ``max_prompt_tokens``: drop trailing demonstrations (keeping
        one), then cut the text before the cue. Either is logged as a warning."""
        budget = self.cfg.max_prompt_tokens
        demos = list(clip_demos(demos, self.cfg.max_demo_chars)) if mode != "description" else []
        prompt = format_prompt(description, demos, mode=mode)
        n_tokens, dropped = self.count_tokens(prompt), 0
        while n_tokens > budget and len(demos) > 1:
            demos.pop()
            dropped += 1
            prompt = format_prompt(description, demos, mode=mode)
            n_tokens = self.count_tokens(prompt)
        cut = n_tokens > budget
        if cut:
            prompt, n_tokens = self._cut_before_cue(prompt, budget)
        if dropped or cut:
            log.warning("%s (mode %s): prompt longer than task_vectors.max_prompt_tokens=%d; "
                        "dropped %d demonstration(s)%s", label, mode, budget, dropped,
                        ", cut the remaining text" if cut else "")
        return FittedPrompt(prompt, len(demos), n_tokens, bool(dropped or cut))

    def _cut_before_cue(self, prompt: str, budget: int) -> tuple[str, int]:
        """Cut the text before the final cue so the prompt takes at most ``budget`` tokens."""
        cue = PROMPT_TEMPLATE["cue"]
        body = prompt[:-len(cue)]
        encoded = self.tokenizer(body, add_special_tokens=False, return_offsets_mapping=True)
        keep = budget - 1 - len(self._token_ids("\n\n" + cue))
        offsets = encoded["offset_mapping"]
        while keep > 0:
            end = offsets[keep - 1][1] if keep <= len(offsets) else len(body)
            cut = body[:end].rstrip() + "\n\n" + cue
            n_tokens = self.count_tokens(cut)
            if n_tokens <= budget:  # re-tokenising at the cut can merge differently: check
                return cut, n_tokens
            keep -= n_tokens - budget
        raise TaskVectorInputError(f"{budget} tokens leave no room for any text.",
                                   field="task_vectors.max_prompt_tokens", fix="raise it.")

    def fit_episode(self, episode: Episode) -> Episode:
        """``episode`` with its prompt fitted to the token budget (see `fit_prompt`)."""
        fitted = self.fit_prompt(episode.description, episode.demos, mode=episode.mode,
                                 label=f"task '{episode.task}' episode {episode.episode}")
        return replace(episode, prompt=fitted.prompt, n_demos=fitted.n_demos,
                       truncated=fitted.truncated, n_tokens=fitted.n_tokens)

    def _prompt_ids(self, prompts: Sequence[str]) -> tuple[list[list[int]], list[int]]:
        """Each prompt's token ids (text-start first) and how many of them are its last block's
        (pooling ``shift``; 0 without it). With ``shift``, head and tail are tokenised apart so
        the tail's tokens are the same in both reads (`split_last_block` cuts where the whole
        prompt's tokens split: the ids equal the whole prompt's, as a test checks)."""
        ids, tail_lengths = [], []
        for index, prompt in enumerate(prompts):
            if not isinstance(prompt, str) or not prompt.strip():
                raise TaskVectorInputError("is empty.", field=f"prompts[{index}]",
                                           fix="give every prompt text (see format_prompt).")
            if self.reads_shift:
                head, tail = split_last_block(prompt)
                head_ids, tail_ids = self._token_ids(head), self._token_ids(tail)
                tokens = [self.start_id, *head_ids, *tail_ids]
            else:
                tokens, tail_ids = [self.start_id, *self._token_ids(prompt)], []
            if len(tokens) > self.cfg.max_prompt_tokens:  # only raw prompts: fitted ones fit
                log.warning("prompts[%d]: %d tokens, cut to task_vectors.max_prompt_tokens=%d",
                            index, len(tokens), self.cfg.max_prompt_tokens)
                excess = len(tokens) - self.cfg.max_prompt_tokens
                tail_ids = tail_ids[:max(0, len(tail_ids) - excess)]  # the cut falls in the tail
                tokens = tokens[:self.cfg.max_prompt_tokens]
            ids.append(tokens)
            tail_lengths.append(len(tail_ids))
        return ids, tail_lengths

    @torch.inference_mode()
    def encode_prompts(self, prompts: Sequence[str]) -> dict[tuple[int, str], np.ndarray]:
        """Pooled hidden states of each prompt, ``cfg.batch_size`` prompts per forward pass.

        Returns:
            (layer, pooling) -> float32 array (N, D), rows in the order of ``prompts`` (D is
            chunks x the hidden size for pooling ``chunks``).
        """
        ids, tail_lengths = self._prompt_ids(prompts)
        width = {key: self.cfg.pooled_width(key[1], self.hidden_size) for key in self.keys}
        out = {key: np.empty((len(ids), width[key]), np.float32) for key in self.keys}
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))  # similar lengths pad less
        for begin in range(0, len(order), self.cfg.batch_size):
            rows = order[begin:begin + self.cfg.batch_size]
            hidden, mask = self._hidden([ids[i] for i in rows])
            pooled = self._pool(hidden, mask)
            if self.reads_shift:
                tails = [tail_lengths[i] for i in rows]
                alone = [[self.start_id, *ids[i][len(ids[i]) - n:]] for i, n in zip(rows, tails)]
                pooled.update(self._shift(hidden, mask, *self._hidden(alone), tails))
            for key, vectors in pooled.items():
                out[key][rows] = vectors
        return out

    def _hidden(self, ids: list[list[int]]) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
        """Hidden states (L+1 x (B, T, D)) and attention mask (B, T) of one right-padded batch."""
        device = next(self.model.parameters()).device
        input_ids, mask = (t.to(device) for t in right_pad(ids, self.pad_id))
        hidden = self.body(input_ids=input_ids, attention_mask=mask,
                           output_hidden_states=True).hidden_states
        return hidden, mask

    def _shift(self, hidden, mask: torch.Tensor, hidden_alone, mask_alone: torch.Tensor,
               tail_lengths: Sequence[int]) -> dict[tuple[int, str], np.ndarray]:
        """Pooling ``shift``: the mean state of each prompt's last block read after its head, minus
        its mean state read alone (after the text-start token only). A block with no head (or no
        tokens) gives zeros: reading it alone is reading it in context."""
        n_tail = torch.tensor(tail_lengths, device=mask.device)[:, None]  # (B, 1)
        positions = torch.arange(mask.shape[1], device=mask.device)[None]  # (1, T)
        lengths = mask.sum(1, keepdim=True)  # (B, 1)
        in_context = ((positions >= lengths - n_tail) & (positions < lengths)).float()  # (B, T)
        positions = torch.arange(mask_alone.shape[1], device=mask.device)[None]  # (1, T')
        alone = ((positions >= 1) & (positions < 1 + n_tail)).float()  # (B, T')
        count = n_tail.clamp(min=1).float()  # (B, 1)
        shifts = {}
        for layer, pooling in self.keys:
            if pooling == "shift":
                read = torch.einsum("bt,btd->bd", in_context, hidden[layer].float())  # (B, D)
                read_alone = torch.einsum("bt,btd->bd", alone, hidden_alone[layer].float())
                shifts[(layer, pooling)] = ((read - read_alone) / count).cpu().numpy()
        return shifts

    def _pool(self, hidden, mask: torch.Tensor) -> dict[tuple[int, str], np.ndarray]:
        lengths = mask.sum(1)  # (B,)
        # The text-start token is left out of the mean: its state is a near-constant "attention
        # sink" with a huge norm that would swamp the task's tokens.
        body_mask = mask.clone().float()
        body_mask[:, 0] = 0  # (B, T)
        # One set of span weights serves every layer: the spans depend on the lengths only.
        spans = (chunk_weights(lengths, self.cfg.chunks, mask.shape[1])  # (B, J, T)
                 if any(pooling == "chunks" for _, pooling in self.keys) else None)
        pooled = {}
        for layer, pooling in self.keys:
            if pooling == "shift":  # needs a second read (`_shift`)
                continue
            states = hidden[layer].float()  # (B, T, D)
            if pooling == "mean":
                total = (states * body_mask[..., None]).sum(1)  # (B, D)
                vec = total / body_mask.sum(1, keepdim=True)  # (B, D)
            elif pooling == "chunks":
                vec = torch.einsum("bjt,btd->bjd", spans, states).flatten(1)  # (B, J * D)
            else:
                vec = states[torch.arange(states.shape[0]), lengths - 1]  # (B, D)
            pooled[(layer, pooling)] = vec.cpu().numpy()
        return pooled

    def encode(self, description: str | None = None,
               examples: Sequence[str] | None = None) -> dict[tuple[int, str], np.ndarray]:
        """The task vector of one request: a description, example texts, or both.

        The mode follows from what is given ("description", "demos" or "both"); the prompt is
        fitted and encoded exactly as the batch job does it. Only the first ``cfg.k`` examples
        are used: the episodes a generator learns from hold k demonstrations.

        Returns:
            (layer, pooling) -> float32 array (D,) (chunks x hidden size for pooling `chunks`).

        Raises:
            TaskVectorInputError: nothing given, or an empty description or example.
        """
        fitted = self.request_prompt(description, examples)
        return {key: vectors[0] for key, vectors in self.encode_prompts([fitted.prompt]).items()}

    def request_prompt(self, description: str | None = None,
                       examples: Sequence[str] | None = None) -> FittedPrompt:
        """The in-context prompt `encode` reads for one request (tokenizer only, no forward pass):
        the mode from what is given, the first ``cfg.k`` examples, fitted to the token budget.

        Raises:
            TaskVectorInputError: nothing given, or an empty description or example.
        """
        if description is not None and not description.strip():
            raise TaskVectorInputError("is empty.", field="description",
                                       fix="give a description, or leave it out and pass examples.")
        examples = list(examples or [])
        if description is None and not examples:
            raise TaskVectorInputError("a task vector needs a description, examples, or both.",
                                       field="description", fix="pass at least one of them.")
        mode = "both" if description is not None and examples else (
            "description" if description is not None else "demos")
        if len(examples) > self.cfg.k:
            log.info("request: using the first task_vectors.k=%d of %d examples", self.cfg.k,
                     len(examples))
            examples = examples[:self.cfg.k]
        return self.fit_prompt(description, examples, mode=mode)


def explode_rows(batch: dict[str, np.ndarray], vectors: dict[tuple[int, str], np.ndarray]
                 ) -> dict[str, np.ndarray]:
    """One output row per (input row, layer, pooling); every input column but the prompt is kept.

    ``vector`` is (rows, D) float32, or, where poolings differ in width (``chunks`` beside
    ``mean``), a 1-D object array of float32 rows."""
    keep = {name: np.asarray(values) for name, values in batch.items() if name != "prompt"}
    names = [*keep, "layer", "pooling", "vector"]
    columns: dict[str, list[np.ndarray]] = {name: [] for name in names}
    for (layer, pooling), matrix in vectors.items():
        n = len(matrix)
        for name, values in keep.items():
            columns[name].append(values)
        columns["layer"].append(np.full(n, layer, np.int64))
        columns["pooling"].append(np.full(n, pooling, object))
        columns["vector"].append(matrix.astype(np.float32, copy=False))
    vectors = columns.pop("vector")
    out = {name: np.concatenate(parts) for name, parts in columns.items()}
    if len({m.shape[1] for m in vectors}) <= 1:
        out["vector"] = np.concatenate(vectors)
    else:
        rows = [row for matrix in vectors for row in matrix]
        out["vector"] = np.empty(len(rows), object)
        out["vector"][:] = rows
    return out


class TaskVectorExtractor:
    """Ray-free callable class for ``Dataset.map_batches``: loads the frozen model once, then maps
    batches with a ``prompt`` column to one row per (prompt, layer, pooling) with a ``vector``."""

    def __init__(self, model_spec: str, cache_dir: str | None, config: dict, *,
                 dtype: str = "float32"):
        from icm.models import load_base_model

        cfg = TaskVectorConfig.model_validate(config)
        # On the GPU when the actor was given one (``task_vectors.gpus_per_actor``).
        model, tokenizer = load_base_model(model_spec, cache_dir=cache_dir, dtype=dtype)
        self.encoder = TaskEncoder(model, tokenizer, cfg)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        vectors = self.encoder.encode_prompts([str(p) for p in batch["prompt"]])
        return explode_rows(batch, vectors)


def vectors_table(columns: dict[str, np.ndarray]):
    """The extractor's output as an Arrow table whose ``vector`` column is list<float32>."""
    import pyarrow as pa

    rows = [np.asarray(row, np.float32) for row in columns["vector"]]  # width per pooling
    offsets = np.concatenate([[0], np.cumsum([len(row) for row in rows])]).astype(np.int32)
    values = np.concatenate(rows) if rows else np.empty(0, np.float32)
    vectors = pa.ListArray.from_arrays(pa.array(offsets), pa.array(values))
    return pa.table({**{name: values for name, values in columns.items() if name != "vector"},
                     "vector": vectors})


class ParquetTaskVectorExtractor(TaskVectorExtractor):
    """`TaskVectorExtractor` returning Arrow: Ray Data would store a 2-D numpy column as its own
    tensor extension type; plain list<float32> reads anywhere (pandas, pyarrow, no Ray)."""

    def __call__(self, batch: dict[str, np.ndarray]):  # type: ignore[override]
        return vectors_table(super().__call__(batch))


# ----------------------------------------------------------------------------- reading outputs


def _missing_combo(what: str, mode: str, layer: int, pooling: str) -> TaskVectorInputError:
    return TaskVectorInputError(f"no {what} for mode={mode!r}, layer={layer}, pooling={pooling!r}.",
                                field="task_vectors",
                                fix="use a mode, layer and pooling the stage computed.")


def _check_tasks(found: set[str], tasks: Sequence[str] | None, what: str) -> None:
    missing = sorted(set(tasks or ()) - found)
    if missing:
        raise TaskVectorInputError(f"no {what} for task(s) {missing}.", field="tasks",
                                   fix="choose tasks of the suite the stage ran on.")


def load_episode_vectors(stage_dir: str | Path, *, mode: str, layer: int, pooling: str,
                         tasks: Sequence[str] | None = None) -> dict[str, np.ndarray]:
    """Episode vectors of a finished stage: task -> float32 (E, D), episodes in index order."""
    import pyarrow.dataset as pds

    dataset = pds.dataset(Path(stage_dir) / VECTORS_DIR, format="parquet")
    where = ((pds.field("mode") == mode) & (pds.field("layer") == layer)
             & (pds.field("pooling") == pooling))
    if tasks is not None:
        where = where & pds.field("task").isin(list(tasks))
    frame = dataset.to_table(columns=["task", "episode", "vector"], filter=where).to_pandas()
    if frame.empty:
        raise _missing_combo("vectors", mode, layer, pooling)
    _check_tasks(set(frame["task"]), tasks, "episode vectors")
    frame = frame.sort_values(["task", "episode"])
    return {task: np.stack(rows["vector"].to_list()).astype(np.float32)
            for task, rows in frame.groupby("task", sort=True)}


def load_episode_prompts(stage_dir: str | Path, tasks: Sequence[str]
                         ) -> dict[str, dict[tuple[str, int], tuple[str, bool]]]:
    """The prompts a finished stage read, as fitted to its token budget: task -> (mode, episode)
    -> (prompt, truncated)."""
    import pandas as pd

    frame = pd.read_parquet(Path(stage_dir) / EPISODES_FILE,
                            columns=["task", "mode", "episode", "prompt", "truncated"],
                            filters=[("task", "in", list(tasks))])
    _check_tasks(set(frame["task"]), tasks, "episode prompts")
    return {task: {(row.mode, int(row.episode)): (row.prompt, bool(row.truncated))
                   for row in rows.itertuples()}
            for task, rows in frame.groupby("task", sort=True)}


def load_task_means(stage_dir: str | Path, *, mode: str, layer: int, pooling: str,
                    tasks: Sequence[str] | None = None) -> dict[str, np.ndarray]:
    """Per-task mean vectors of a finished stage: task -> float32 (D,)."""
    import pandas as pd

    where = [("mode", "==", mode), ("layer", "==", layer), ("pooling", "==", pooling)]
    frame = pd.read_parquet(Path(stage_dir) / MEANS_FILE, filters=where)
    if tasks is not None:
        frame = frame[frame["task"].isin(list(tasks))]
    if frame.empty:
        raise _missing_combo("task means", mode, layer, pooling)
    _check_tasks(set(frame["task"]), tasks, "task means")
    return {row.task: np.asarray(row.vector, np.float32)
            for row in frame.sort_values("task").itertuples()}
