"""Tasks that train the generator by the LM objective without a LoRA of their own
(``generator.lm_extra_root``).

The reconstruction objective needs a trained LoRA per task; the LM objective needs only a task's
train texts and its episode vectors. So the end-to-end stage can learn the condition -> adapter
map from many more tasks than the zoo holds (Text-to-LoRA's lever). The extra tasks come from
another run's ``task_vectors`` stage (same base model, same task-vector settings), e.g. one over
the whole default suite. What keeps evaluation honest: a task of this run's suite never joins
(held out or not), nor a task that root's suite holds out, nor any task of a fold's groups.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

from icm.config import RESOLVED_CONFIG_FILE, PipelineConfig
from icm.errors import InputError
from icm.generator.inputs import _task_vector_loader, load_task_conditions
from icm.generator.lm import EpisodePrompt, stage_episode_prompts
from icm.tasks import Suite

STAGE = "task_vectors"
FIELD = "generator.lm_extra_root"


@dataclass
class ExtraLmTasks:
    """The extra tasks' LM data: task -> train texts, task -> (E x modes, D) episode vectors, and
    (when asked, for ``generator.lm_context: prompt``) task -> the prompt of each vector's row."""

    texts: dict[str, list[str]]
    conditions: dict[str, np.ndarray]
    prompts: dict[str, list[EpisodePrompt]] | None = None


def extra_root_config(cfg: PipelineConfig, extra_root: str) -> PipelineConfig:
    """The config that built ``extra_root``'s task vectors, checked against this run's: the
    same base model and vector-shaping task-vector settings, else a clear error."""
    root = Path(extra_root) / STAGE
    resolved, record = root / RESOLVED_CONFIG_FILE, root / "stage.json"
    if not (resolved.is_file() and record.is_file()):
        raise InputError(f"{FIELD}: {root} holds no finished task_vectors stage. Fix: run "
                         f"`icm run stages=[task_vectors] storage.root={root.parent} "
                         "suite.subset=all` (with this run's model and task_vectors settings) first.")
    other = PipelineConfig.model_validate(yaml.safe_load(resolved.read_text()))
    pairs = {"model.spec": (other.model.spec, cfg.model.spec),
             "model.dtype": (other.model.dtype, cfg.model.dtype)}
    mine, theirs = cfg.task_vectors.vector_settings(), other.task_vectors.vector_settings()
    pairs |= {f"task_vectors.{key}": (theirs.get(key), value) for key, value in mine.items()}
    differ = {key: pair for key, pair in pairs.items() if pair[0] != pair[1]}
    if differ:
        key, (there, here) = next(iter(differ.items()))
        raise InputError(f"{FIELD}: its task vectors were made with {key}={there!r}, this run uses "
                         f"{here!r} (differing: {sorted(differ)}); vectors of other settings are "
                         "other coordinates. Fix: rebuild that root's task_vectors stage with this "
                         "run's settings, or unset it.")
    return other


def extra_root_fingerprint(cfg: PipelineConfig) -> str | None:
    """The extra root's task_vectors stage fingerprint (None when unset): part of what a
    generator trained with it depends on."""
    if cfg.generator.lm_extra_root is None:
        return None
    extra_root_config(cfg, cfg.generator.lm_extra_root)
    record = Path(cfg.generator.lm_extra_root) / STAGE / "stage.json"
    return json.loads(record.read_text())["fingerprint"]


def extra_lm_tasks(cfg: PipelineConfig, extra_root: str | None, suite: Suite,
                   exclude_groups: Sequence[str] = (), *, max_texts: int,
                   with_prompts: bool = False) -> ExtraLmTasks:
    """``extra_root``'s training tasks that may train this run's generator by LM loss: not in
    ``suite`` (whatever their status there), not held out by their own suite, not in
    ``exclude_groups`` (a fold's held-out groups); at most ``max_texts`` train texts each. With
    ``with_prompts``, each condition row's prompt too, as that root's stage read it (what
    `lm_train_prompts` gives this run's own tasks)."""
    from icm.stages import open_suite

    if extra_root is None:
        return ExtraLmTasks({}, {})
    other = open_suite(extra_root_config(cfg, extra_root))
    banned = set(exclude_groups)
    names = [task.name for task in other.training_tasks()
             if task.name not in suite.tasks and task.group not in banned]
    if not names:
        return ExtraLmTasks({}, {})
    stage_dir = Path(extra_root) / STAGE
    conditions = load_task_conditions(  # the extra root's vectors, this run's condition settings
        cfg, names, load_conditions=lambda _ours, **kwargs: _task_vector_loader(stage_dir, **kwargs))
    texts = {name: other.tasks[name].train_texts()[:max_texts] for name in sorted(conditions)}
    if not with_prompts:
        return ExtraLmTasks(texts, conditions)
    prompts = stage_episode_prompts(  # this run's task_vectors settings: checked to be theirs
        stage_dir, {name: other.tasks[name] for name in sorted(conditions)}, cfg.task_vectors,
        cfg.generator.condition_modes)
    return ExtraLmTasks(texts, conditions, prompts)
