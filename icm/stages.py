"""Stage bookkeeping shared by all jobs: where a stage writes, whether it is up to date.

Each stage owns ``<storage.root>/<stage>/``. When it finishes it writes ``stage.json``
(the fingerprint of the config sections and inputs it used, its outputs, timings) and the
resolved config. A rerun with the same fingerprint skips the stage; any change re-runs it.
``stage.json`` is written last and atomically, so a killed stage is never taken as done.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from icm.config import PipelineConfig, save_resolved_config
from icm.io import sha256_json, write_json_atomic
from icm.models import default_cache_dir
from icm.tasks import Suite, load_suite

STAGE_FILE = "stage.json"


@dataclass(frozen=True)
class Stage:
    name: str
    directory: Path
    fingerprint: str

    def is_current(self) -> bool:
        record = self.record()
        return record is not None and record.get("fingerprint") == self.fingerprint

    def record(self) -> dict[str, Any] | None:
        path = self.directory / STAGE_FILE
        try:
            return json.loads(path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def begin(self, config: PipelineConfig) -> float:
        self.directory.mkdir(parents=True, exist_ok=True)
        save_resolved_config(config, self.directory)
        return time.time()

    def finish(self, started: float, outputs: dict[str, Any]) -> dict[str, Any]:
        record = {"stage": self.name, "fingerprint": self.fingerprint, "outputs": outputs,
                  "started": started, "finished": time.time(),
                  "seconds": round(time.time() - started, 2)}
        write_json_atomic(self.directory / STAGE_FILE, record)
        return record


def stage(config: PipelineConfig, name: str, *inputs: Any, sections: tuple[str, ...]) -> Stage:
    """The stage ``name`` of this run, fingerprinted by config ``sections`` and ``inputs``."""
    fingerprint = sha256_json({"config": config.fingerprint(*sections), "inputs": inputs})
    return Stage(name, config.storage.path(name), fingerprint)


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
    """The suite a run uses: ``suite.path``, or the default suite (built on first use),
    restricted to ``suite.tasks`` when given."""
    if config.suite.path is not None:
        suite = load_suite(Path(config.suite.path).expanduser())
    else:
        folder = default_suite_dir(config)
        if not (folder / "suite.yaml").is_file():
            from icm.default_suite import build_default_suite

            build_default_suite(folder, seed=config.suite.seed, max_train=config.suite.max_train,
                                max_eval=config.suite.max_eval)
        suite = load_suite(folder)
    return suite.select(config.suite.tasks)
