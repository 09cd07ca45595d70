"""The task-suite format: loader, validator and writer.

A *suite* is a directory::

    my-suite/
      suite.yaml            name: my-suite
                            heldout: [task-a, task-b]   # never seen by any training step
      task-a/
        task.yaml           name, description, group, source, license
        train.jsonl         one {"text": "..."} per line
        eval.jsonl          same; no text may also be in train.jsonl
      task-b/ ...

The format is public: users bring their own suites in it, and every command that takes a
task takes any folder laid out like ``task-a/`` above, inside a suite or not.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from icm.errors import InputError
from icm.io import atomic_directory, sha256_file, write_jsonl_atomic, write_yaml_atomic

SUITE_FILE = "suite.yaml"
TASK_FILE = "task.yaml"
SPLIT_FILES = {"train": "train.jsonl", "eval": "eval.jsonl"}
TASK_FIELDS_REQUIRED = ("name", "description", "group", "source", "license")
TASK_FIELDS_OPTIONAL = ("metadata",)
SUITE_FIELDS_REQUIRED = ("name",)
SUITE_FIELDS_OPTIONAL = ("heldout", "description", "sources", "build")
NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}$")


class SuiteError(InputError):
    """A suite or task folder that breaks the format; the message says where and how to fix it."""

    def __init__(
        self,
        problem: str,
        *,
        path: Path | str | None = None,
        task: str | None = None,
        line: int | None = None,
        field: str | None = None,
        fix: str | None = None,
    ):
        self.problem, self.path, self.task, self.line, self.field, self.fix = (
            problem, path, task, line, field, fix)
        where = []
        if task is not None:
            where.append(f"task '{task}'")
        if path is not None:
            where.append(f"file {path}")
        if line is not None:
            where.append(f"line {line}")
        if field is not None:
            where.append(f"field '{field}'")
        message = (", ".join(where) + ": " if where else "") + problem
        if fix:
            message += f" Fix: {fix}"
        super().__init__(message)


@dataclass(frozen=True)
class Task:
    """One task folder. Texts are read on demand so that loading a large suite stays cheap."""

    name: str
    description: str
    group: str
    source: str
    license: str
    path: Path
    metadata: dict[str, Any] = field(default_factory=dict, compare=False)

    def texts(self, split: str) -> list[str]:
        """The texts of ``split`` ("train" or "eval"), validated line by line."""
        if split not in SPLIT_FILES:
            raise ValueError(f"split must be one of {sorted(SPLIT_FILES)}, got {split!r}")
        return read_texts(self.path / SPLIT_FILES[split], task=self.name)

    def train_texts(self) -> list[str]:
        return self.texts("train")

    def eval_texts(self) -> list[str]:
        return self.texts("eval")

    def fingerprint(self) -> str:
        """sha256 over the task's files: changes whenever any text or field changes."""
        parts = [sha256_file(self.path / name) for name in (TASK_FILE, *SPLIT_FILES.values())]
        return sha256_file_list(parts)


def sha256_file_list(digests: Iterable[str]) -> str:
    """One digest for an ordered list of digests."""
    return hashlib.sha256("".join(digests).encode()).hexdigest()


@dataclass(frozen=True)
class Suite:
    """A loaded suite: its tasks in name order and the held-out names."""

    name: str
    path: Path
    tasks: dict[str, Task]
    heldout: tuple[str, ...]
    meta: dict[str, Any] = field(default_factory=dict, compare=False)

    def training_tasks(self) -> list[Task]:
        """Tasks any training step may see. Held-out tasks are never among them."""
        return [task for name, task in self.tasks.items() if name not in self.heldout]

    def heldout_tasks(self) -> list[Task]:
        return [self.tasks[name] for name in self.heldout]

    def is_heldout(self, name: str) -> bool:
        return name in self.heldout

    def groups(self) -> dict[str, list[str]]:
        groups: dict[str, list[str]] = {}
        for task in self.tasks.values():
            groups.setdefault(task.group, []).append(task.name)
        return groups

    def select(self, names: Sequence[str] | None) -> Suite:
        """The same suite restricted to ``names`` (held-out status is kept)."""
        if not names:
            return self
        unknown = [n for n in names if n not in self.tasks]
        if unknown:
            raise SuiteError(
                f"unknown task(s) {unknown} in suite '{self.name}'.", field="suite.tasks",
                fix=f"choose from {sorted(self.tasks)}.")
        tasks = {n: self.tasks[n] for n in sorted(set(names))}
        heldout = tuple(n for n in self.heldout if n in tasks)
        return Suite(self.name, self.path, tasks, heldout, self.meta)

    def fingerprint(self) -> str:
        digests = [sha256_file(self.path / SUITE_FILE)]
        digests += [task.fingerprint() for task in self.tasks.values()]
        return sha256_file_list(digests)


# ----------------------------------------------------------------------------- reading


def _read_yaml_mapping(path: Path, *, task: str | None) -> dict[str, Any]:
    if not path.is_file():
        raise SuiteError("missing file.", path=path, task=task,
                         fix=f"create {path.name} (see the suite format in the README).")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise SuiteError(f"not valid YAML ({err}).", path=path, task=task) from None
    if not isinstance(data, dict):
        raise SuiteError("must be a YAML mapping of field: value.", path=path, task=task)
    return data


def _check_fields(data: dict, required: Sequence[str], optional: Sequence[str], *, path: Path,
                  task: str | None) -> None:
    for key in required:
        value = data.get(key)
        if not isinstance(value, str) or not value.strip():
            raise SuiteError("is missing or not a non-empty string.", path=path, task=task,
                             field=key, fix=f"add `{key}: ...` to {path.name}.")
    unknown = sorted(set(data) - set(required) - set(optional))
    if unknown:
        raise SuiteError(f"unknown field(s) {unknown}.", path=path, task=task, field=unknown[0],
                         fix=f"valid fields are {sorted([*required, *optional])}.")


def read_texts(path: Path, *, task: str | None = None) -> list[str]:
    """Read a ``.jsonl`` split: one JSON object with a non-empty string ``text`` per line."""
    if not path.is_file():
        raise SuiteError("missing file.", path=path, task=task,
                         fix='write one {"text": "..."} JSON object per line.')
    texts: list[str] = []
    with open(path, encoding="utf-8") as handle:
        for number, raw in enumerate(handle, start=1):
            if not raw.strip():
                continue  # tolerate blank lines, e.g. a trailing newline
            try:
                row = json.loads(raw)
            except json.JSONDecodeError as err:
                raise SuiteError(f"malformed JSON ({err.msg} at column {err.colno}).", path=path,
                                 task=task, line=number,
                                 fix='each line must be one JSON object like {"text": "..."}.') from None
            if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                raise SuiteError("needs a string value.", path=path, task=task, line=number,
                                 field="text", fix='write {"text": "..."} on this line.')
            if not row["text"].strip():
                raise SuiteError("is empty.", path=path, task=task, line=number, field="text",
                                 fix="remove the line or give it text.")
            texts.append(row["text"])
    return texts


def load_task(path: str | Path) -> Task:
    """Load one task folder (inside a suite or on its own) and check its metadata."""
    path = Path(path)
    if not path.is_dir():
        raise SuiteError("is not a task folder (no such directory).", path=path,
                         fix=f"pass a folder holding {TASK_FILE}, train.jsonl and eval.jsonl.")
    meta_path = path / TASK_FILE
    meta = _read_yaml_mapping(meta_path, task=path.name)
    _check_fields(meta, TASK_FIELDS_REQUIRED, TASK_FIELDS_OPTIONAL, path=meta_path, task=path.name)
    name = meta["name"].strip()
    if not NAME_PATTERN.match(name):
        raise SuiteError(f"{name!r} is not a valid task name.", path=meta_path, task=path.name,
                         field="name", fix="use lowercase letters, digits, '-', '_' or '.', "
                         "at most 64 characters.")
    for split_file in SPLIT_FILES.values():
        if not (path / split_file).is_file():
            raise SuiteError("missing file.", path=path / split_file, task=name,
                             fix='write one {"text": "..."} JSON object per line.')
    metadata = meta.get("metadata") or {}
    if not isinstance(metadata, dict):
        raise SuiteError("must be a mapping.", path=meta_path, task=name, field="metadata")
    return Task(name=name, description=meta["description"].strip(), group=meta["group"].strip(),
                source=meta["source"].strip(), license=meta["license"].strip(), path=path,
                metadata=metadata)


def load_suite(path: str | Path) -> Suite:
    """Load a suite directory, checking its structure (texts are checked by `validate_suite`)."""
    path = Path(path)
    if not path.is_dir():
        raise SuiteError("suite directory does not exist.", path=path,
                         fix="build one with `icm tasks build-default DIR` or pass another path.")
    meta_path = path / SUITE_FILE
    meta = _read_yaml_mapping(meta_path, task=None)
    _check_fields(meta, SUITE_FIELDS_REQUIRED, SUITE_FIELDS_OPTIONAL, path=meta_path, task=None)
    tasks: dict[str, Task] = {}
    folders: dict[str, Path] = {}
    for folder in sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith(".")):
        task = load_task(folder)
        if task.name in tasks:
            raise SuiteError(f"duplicate task name {task.name!r} (also in {folders[task.name]}).",
                             path=folder / TASK_FILE, task=task.name, field="name",
                             fix="give every task a unique name.")
        tasks[task.name], folders[task.name] = task, folder
    if not tasks:
        raise SuiteError("suite has no task folders.", path=path,
                         fix=f"add one folder per task holding {TASK_FILE}, train.jsonl, eval.jsonl.")
    heldout = meta.get("heldout") or []
    if not isinstance(heldout, list) or not all(isinstance(n, str) for n in heldout):
        raise SuiteError("must be a list of task names.", path=meta_path, field="heldout")
    for name in heldout:
        if name not in tasks:
            raise SuiteError(f"held-out task {name!r} does not exist in the suite.", path=meta_path,
                             field="heldout", fix=f"use names from {sorted(tasks)}.")
    if len(set(heldout)) != len(heldout):
        raise SuiteError("lists a task twice.", path=meta_path, field="heldout")
    if heldout and len(heldout) == len(tasks):
        raise SuiteError("every task is held out, nothing is left to train on.", path=meta_path,
                         field="heldout")
    return Suite(name=meta["name"].strip(), path=path, tasks=tasks, heldout=tuple(heldout),
                 meta={k: v for k, v in meta.items() if k not in ("name", "heldout")})


# ----------------------------------------------------------------------------- validating


@dataclass(frozen=True)
class TaskStats:
    name: str
    group: str
    heldout: bool
    n_train: int
    n_eval: int
    train_chars: int
    eval_chars: int
    tokens: int | None  # train + eval tokens; None when no tokenizer was given


def validate_task(task: Task, *, heldout: bool = False,
                  count_tokens: Callable[[list[str]], int] | None = None) -> TaskStats:
    """Read both splits of ``task`` fully and check them; returns their statistics."""
    train, evaluation = task.train_texts(), task.eval_texts()
    for split, texts in (("train", train), ("eval", evaluation)):
        if not texts:
            raise SuiteError("has no texts.", path=task.path / SPLIT_FILES[split], task=task.name,
                             fix=f"the {split} split needs at least one text.")
    train_set = set(train)
    for number, text in enumerate(evaluation, start=1):
        if text in train_set:
            raise SuiteError("this eval text is also in train.jsonl (leakage).",
                             path=task.path / SPLIT_FILES["eval"], task=task.name, line=number,
                             field="text", fix="remove it from one of the two splits.")
    tokens = count_tokens(train + evaluation) if count_tokens else None
    return TaskStats(task.name, task.group, heldout, len(train), len(evaluation),
                     sum(map(len, train)), sum(map(len, evaluation)), tokens)


def cross_task_leaks(splits: Mapping[str, tuple[Sequence[str], Sequence[str]]],
                     heldout: Collection[str]) -> dict[str, dict[str, str]]:
    """Train texts that would carry one task's measured text into another task's training.

    ``splits`` maps task -> (train texts, eval texts). A train text leaks when it is another
    task's eval text (scored as unseen or as the other task's own text), or when a training task
    holds a text of a held-out task (no training input may contain a held-out task's text).
    Returns {task: {leaking train text: the other task it belongs to}}; tasks without leaks are
    left out. `validate_suite` refuses any (they come from shared boilerplate: licence notices,
    a quote in two collections); the default-suite builder keeps each shared text in one task,
    so it has none.
    """
    owners: dict[str, set[str]] = {}  # text -> the tasks it must not be trained on for
    for name, (train, evaluation) in splits.items():
        for text in evaluation:
            owners.setdefault(text, set()).add(name)
    trained = {name for name in splits if name not in heldout}
    for name in heldout:
        for text in splits[name][0]:
            owners.setdefault(text, set()).add(name)
    leaks: dict[str, dict[str, str]] = {}
    for name, (train, _) in splits.items():
        for text in train:
            others = owners.get(text, set()) - {name}
            if name not in trained:  # a held-out task's train text: only its oracle trains on it
                others = {o for o in others if text in splits[o][1]}
            if others:
                leaks.setdefault(name, {})[text] = min(others)
    return leaks


def validate_suite(suite: Suite | str | Path,
                   count_tokens: Callable[[list[str]], int] | None = None) -> list[TaskStats]:
    """Load (if needed) and fully validate a suite; raises `SuiteError` at the first problem."""
    if not isinstance(suite, Suite):
        suite = load_suite(suite)
    stats = [validate_task(task, heldout=suite.is_heldout(name), count_tokens=count_tokens)
             for name, task in suite.tasks.items()]
    splits = {name: (task.train_texts(), task.eval_texts()) for name, task in suite.tasks.items()}
    for name, leaking in cross_task_leaks(splits, suite.heldout).items():
        train = splits[name][0]
        text, other = next(iter(leaking.items()))
        raise SuiteError(f"this train text is also in task '{other}' ({len(leaking)} such "
                         f"text(s) here), so training on '{name}' would train on what is measured "
                         f"on '{other}' (leakage across tasks).",
                         path=suite.tasks[name].path / SPLIT_FILES["train"], task=name,
                         line=train.index(text) + 1, field="text",
                         fix=f"remove it from '{name}' (or from '{other}').")
    return stats


def format_stats_table(stats: Sequence[TaskStats]) -> str:
    """A plain-text table (task, group, held-out, #train, #eval, tokens) with a totals line."""
    from tabulate import SEPARATING_LINE, tabulate

    rows = [(s.name, s.group, "yes" if s.heldout else "", s.n_train, s.n_eval,
             "-" if s.tokens is None else s.tokens) for s in stats]
    total_tokens = None if any(s.tokens is None for s in stats) else sum(s.tokens for s in stats)
    totals = (f"{len(stats)} tasks", f"{len({s.group for s in stats})} groups",
              f"{sum(s.heldout for s in stats)} held out", sum(s.n_train for s in stats),
              sum(s.n_eval for s in stats), "-" if total_tokens is None else total_tokens)
    return tabulate([*rows, SEPARATING_LINE, totals],
                    headers=("task", "group", "held-out", "#train", "#eval", "tokens"),
                    tablefmt="simple", colalign=("left", "left", "left", "right", "right", "right"))


# ----------------------------------------------------------------------------- writing


def write_task(folder: str | Path, *, name: str, description: str, group: str, source: str,
               license: str, train: Sequence[str], eval: Sequence[str],
               metadata: dict[str, Any] | None = None) -> Path:
    """Write one task folder atomically (the folder appears complete or not at all)."""
    meta = {"name": name, "description": description, "group": group, "source": source,
            "license": license}
    if metadata:
        meta["metadata"] = metadata
    with atomic_directory(folder) as staging:
        write_yaml_atomic(staging / TASK_FILE, meta)
        write_jsonl_atomic(staging / SPLIT_FILES["train"], [{"text": t} for t in train])
        write_jsonl_atomic(staging / SPLIT_FILES["eval"], [{"text": t} for t in eval])
    return Path(folder)


def write_suite_meta(suite_dir: str | Path, *, name: str, heldout: Sequence[str],
                     **extra: Any) -> Path:
    """Write ``suite.yaml`` (extra keys: description, sources, build)."""
    unknown = set(extra) - set(SUITE_FIELDS_OPTIONAL)
    if unknown:
        raise ValueError(f"unknown suite fields {sorted(unknown)}; valid: {SUITE_FIELDS_OPTIONAL}")
    return write_yaml_atomic(Path(suite_dir) / SUITE_FILE,
                             {"name": name, "heldout": list(heldout), **extra})
