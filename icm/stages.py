"""Stage bookkeeping shared by all jobs: where a stage writes, whether it is up to date.

Each stage owns ``<storage.root>/<stage>/``. When it finishes it writes ``stage.json``
(the fingerprint of the config sections and inputs it used, its outputs, timings) and the
resolved config. A rerun with the same fingerprint skips the stage; any change re-runs it.
``stage.json`` is written last and atomically, so a killed stage is never taken as done.

With a URI ``storage.root`` (s3://, gs://, file://) the URI is the truth and
``storage.local_mirror`` a working copy: `stage` pulls the stage's folder into the mirror unless
the mirror already holds the remote's ``stage.json``, `Stage.is_current` reads the remote
``stage.json``, `Stage.begin` deletes it, and `Stage.finish` pushes the folder with
``stage.json`` last. Ray Train/Tune write their own ``ray/`` folders straight to the URI; those
are never mirrored. Work done on other nodes moves with `push_local` / `pull_local`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from icm import storage
from icm.config import PipelineConfig, save_resolved_config
from icm.io import atomic_directory, default_cache_dir, file_lock, sha256_json, write_json_atomic
from icm.tasks import Suite, load_suite

STAGE_FILE = "stage.json"
RAY_DIR = "ray"  # Ray Train/Tune storage inside a stage folder: on the URI itself, never mirrored
log = logging.getLogger("icm.stages")


@dataclass(frozen=True)
class Stage:
    name: str
    directory: Path
    fingerprint: str
    remote: str | None = None  # the stage's folder under a URI storage.root

    def is_current(self) -> bool:
        record = self.record()
        return record is not None and record.get("fingerprint") == self.fingerprint

    def record(self) -> dict[str, Any] | None:
        """The stage.json of the authoritative copy (the URI's, for URI roots)."""
        if self.remote is not None:
            return storage.read_json(storage.join(self.remote, STAGE_FILE))
        path = self.directory / STAGE_FILE
        try:
            return json.loads(path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def begin(self, config: PipelineConfig) -> float:
        # An old stage.json must not outlive the outputs this run starts replacing: a kill
        # midway would leave it vouching for a mix of old and new files.
        (self.directory / STAGE_FILE).unlink(missing_ok=True)
        if self.remote is not None:
            storage.delete(storage.join(self.remote, STAGE_FILE))
        self.directory.mkdir(parents=True, exist_ok=True)
        save_resolved_config(config, self.directory)
        return time.time()

    def finish(self, started: float, outputs: dict[str, Any], *,
               pushed: Sequence[str] = ()) -> dict[str, Any]:
        """Write stage.json (and, for a URI root, push the folder, stage.json last).
        ``pushed``: top-level subfolders already uploaded piece by piece while the stage ran."""
        record = {"stage": self.name, "fingerprint": self.fingerprint, "outputs": outputs,
                  "started": started, "finished": time.time(),
                  "seconds": round(time.time() - started, 2)}
        write_json_atomic(self.directory / STAGE_FILE, record)
        if self.remote is not None:
            storage.push_dir(self.directory, self.remote, skip=(RAY_DIR, *pushed), last=(STAGE_FILE,))
        return record


def stage(config: PipelineConfig, name: str, *inputs: Any, sections: tuple[str, ...]) -> Stage:
    """The stage ``name`` of this run, fingerprinted by config ``sections`` and ``inputs``.
    With a URI root its folder is pulled into the mirror first (outputs to skip with, or the
    partial work of a killed run to resume)."""
    fingerprint = sha256_json({"config": config.fingerprint(*sections), "inputs": inputs})
    pull_stages(config, name)
    remote = config.storage.uri(name) if config.storage.is_remote else None
    return Stage(name, config.storage.path(name), fingerprint, remote)


def pull_stages(config: PipelineConfig, *names: str) -> None:
    """Make the mirror's copy of each stage folder the URI's, unless it already holds the same
    stage.json (or the URI holds nothing). No-op for local roots. Safe from many processes."""
    s = config.storage
    for name in names if s.is_remote else ():
        with _mirror_lock(s.path(), name):
            remote = storage.read_json(s.uri(name, STAGE_FILE))
            local = storage.read_json(s.path(name, STAGE_FILE))
            if (remote is not None and remote == local) or not storage.list_files(s.uri(name)):
                continue
            with atomic_directory(s.path(name)) as staging:
                count = storage.pull_dir(s.uri(name), staging, skip=(RAY_DIR,), last=(STAGE_FILE,))
            log.info("storage: pulled %s (%d files) from %s", name, count, s.uri(name))


def push_local(config: PipelineConfig, path: Path, *, last: Sequence[str] = ()) -> None:
    """Upload a file or folder of the mirror to the same place under a URI root (``last``
    names after the rest); no-op for local roots. For outputs written on a worker node."""
    s = config.storage
    if not s.is_remote:
        return
    target = s.uri(*Path(path).relative_to(s.path()).parts)
    if Path(path).is_dir():
        storage.push_dir(path, target, last=last)
    else:
        storage.copy_file(path, target)


def pull_local(config: PipelineConfig, path: Path, *, last: Sequence[str] = (),
               write_once: bool = False) -> None:
    """Fetch a file or folder from under a URI root into the same place in this node's mirror;
    no-op for local roots. Every file is fetched: a rerun rewrites outputs in place (a
    retrained generator's weights have the old file's size, and keeping local files of the
    same size made the driver push the old weights back over the new ones). ``write_once``
    (snapshots, a zoo's layout: never rewritten under the same name) keeps local files of the
    remote's size instead, to save the download."""
    s = config.storage
    if not s.is_remote:
        return
    source = s.uri(*Path(path).relative_to(s.path()).parts)
    if storage.list_files(source):
        storage.pull_dir(source, path, last=last, keep_same_size=write_once)
    elif (not write_once or not Path(path).is_file()) and storage.exists(source):
        storage.copy_file(source, path)


@contextlib.contextmanager
def _mirror_lock(mirror: Path, name: str) -> Iterator[None]:
    """Processes on one node (a driver, its Ray tasks) pull a stage one at a time."""
    with file_lock(mirror / ".locks" / f"{name}.lock"):
        yield


def default_suite_dir(config: PipelineConfig) -> Path:
    """Where the default suite for these build settings lives (built once, then reused)."""
    import icm.default_suite as builder

    cache = Path(config.model.cache_dir).expanduser() if config.model.cache_dir else default_cache_dir()
    s = config.suite
    # The builder's own source is part of the key: a changed builder never reuses an old build.
    code = hashlib.sha256(Path(builder.__file__).read_bytes()).hexdigest()[:10]
    return cache / "suites" / (f"icm-default-v{builder.DEFAULT_SUITE_VERSION}-{code}"
                               f"-seed{s.seed}-t{s.max_train}-e{s.max_eval}")


def open_suite(config: PipelineConfig) -> Suite:
    """The suite a run uses: ``suite.path``, or the default suite (built on first use; its
    ``suite.subset``), restricted to ``suite.tasks`` when given."""
    if config.suite.path is not None:
        suite = load_suite(Path(config.suite.path).expanduser())
    else:
        folder = default_suite_dir(config)
        if not (folder / "suite.yaml").is_file():
            from icm.default_suite import build_default_suite

            build_default_suite(folder, seed=config.suite.seed, max_train=config.suite.max_train,
                                max_eval=config.suite.max_eval)
        suite = load_suite(folder)
        if config.suite.subset == "core":
            from icm.default_suite import CORE_TASKS

            suite = suite.select(list(CORE_TASKS))
    return suite.select(config.suite.tasks)
