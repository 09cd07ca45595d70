"""Quiet by default: other libraries' known noise filtered where each process starts.

`quiet_known_noise` is called by the `icm` command and every job's ``main`` (drivers), and by
Ray in every worker process (``worker_process_setup_hook``, set in `jobs/ray_setup.py`). It
filters only the lines named here, each harmless and repeated once per worker:

* transformers' FutureWarning that ``is_gradient_checkpointing`` is deprecated (peft calls it);
* DeepSpeed's "Attempting to get learning rate from scheduler before it has started" (its
  WarmupDecayLR before step 1) and its accelerator-selection line;
* the INFO lines of Ray Data, Tune, Train and Optuna (`QUIET_LOGGERS`): per-report and
  per-checkpoint lines, Ray Data's progress dumps. Our own progress lines replace them;
* the "Exception ignored ... SystemExit" traceback of a worker that Tune stops (SIGTERM).

Real warnings pass. ``ICM_LOG_LEVEL=DEBUG`` (the commands' ``-v``/``--verbose`` sets it, and
Ray passes it to the workers) leaves everything on.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import warnings

LOG_LEVEL_ENV = "ICM_LOG_LEVEL"

# (category, message regex) of warnings.warn calls that are known noise.
NOISY_WARNINGS = (
    (FutureWarning, r"`is_gradient_checkpointing` is deprecated"),
)
# logger name -> message regexes of its known-noise records.
NOISY_RECORDS = {
    "DeepSpeed": (r"Attempting to get learning rate from scheduler before it has started",
                  r"Setting (ds_)?accelerator to"),
    # Ray Data's notice when its progress bars are off: ours replace them (jobs/task_vectors.py).
    "ray.data._internal.progress": (r"Progress bars disabled",),
    # Ray Train's placement-group cleaner polls the State API, which a Ray started without its
    # dashboard (ray.include_dashboard: false, the smoke preset) does not serve: once a second.
    "ray.train.v2._internal.execution.controller.placement_group_cleaner": (
        r"Failed to query Ray Train Controller actor state",),
}


def verbose() -> bool:
    return os.environ.get(LOG_LEVEL_ENV, "").upper() == "DEBUG"


def set_verbose(on: bool) -> None:
    """Record the choice in the environment, where Ray's workers inherit it."""
    if on:
        os.environ[LOG_LEVEL_ENV] = "DEBUG"


class _DropMessages(logging.Filter):
    def __init__(self, patterns: tuple[str, ...]):
        super().__init__()
        self.pattern = re.compile("|".join(patterns))

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.search(record.getMessage())


# Libraries whose INFO lines repeat what our own lines say (stage headers, progress): WARNING
# and above pass. Ray Train's per-report line ("Reporting training result 3: TrainingReport(...)")
# comes from a logger named after its module's file path, resolved without importing it.
QUIET_LOGGERS = ("ray.data", "ray.tune", "ray.train", "optuna", "ray.util.state")
QUIET_RAY_FILES = ("train/v2/_internal/execution/context.py",)  # relative to the ray package


def quiet_library_loggers() -> None:
    """Raise the level of `QUIET_LOGGERS` to WARNING (cheap, imports nothing; a no-op when
    verbose). Call it again after importing a library that configures its own loggers."""
    import importlib.util
    from pathlib import Path

    if verbose():
        return
    names = list(QUIET_LOGGERS)
    ray_spec = importlib.util.find_spec("ray")  # finds, does not import
    if ray_spec is not None and ray_spec.origin:
        names += [str(Path(ray_spec.origin).parent / f) for f in QUIET_RAY_FILES]
    for name in names:
        logging.getLogger(name).setLevel(logging.WARNING)


def quiet_known_noise() -> None:
    """Install the filters (once per process; a no-op when verbose)."""
    if verbose() or getattr(quiet_known_noise, "installed", False):
        return
    for category, message in NOISY_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
    for name, patterns in NOISY_RECORDS.items():
        logging.getLogger(name).addFilter(_DropMessages(patterns))
    quiet_library_loggers()
    sys.unraisablehook = _drop_exit_during_teardown(sys.unraisablehook)
    quiet_known_noise.installed = True


def _drop_exit_during_teardown(default):
    """A Ray worker that Tune or Serve stops gets SIGTERM; Ray's handler raises SystemExit, and
    when that lands inside a garbage-collection callback Python prints "Exception ignored in:
    <function WeakSet...>" and an 8-line traceback. That one case is dropped; every other
    unraisable exception goes to the previous hook."""

    def hook(unraisable) -> None:
        if not issubclass(unraisable.exc_type, SystemExit):
            default(unraisable)

    return hook
