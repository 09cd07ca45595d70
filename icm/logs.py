"""Quiet by default: other libraries' known noise filtered where each process starts.

`quiet_known_noise` is called by the `icm` command and every job's ``main`` (drivers), and by
Ray in every worker process (``worker_process_setup_hook``, set in `jobs/ray_setup.py`). It
filters only the lines named here, each harmless and repeated once per worker:

* transformers' FutureWarning that ``is_gradient_checkpointing`` is deprecated (peft calls it);
* DeepSpeed's "Attempting to get learning rate from scheduler before it has started" (its
  WarmupDecayLR before step 1) and its accelerator-selection line.

Real warnings pass. ``ICM_LOG_LEVEL=DEBUG`` (the commands' ``-v``/``--verbose`` sets it, and
Ray passes it to the workers) leaves everything on.
"""

from __future__ import annotations

import logging
import os
import re
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


def quiet_known_noise() -> None:
    """Install the filters (once per process; a no-op when verbose)."""
    if verbose() or getattr(quiet_known_noise, "installed", False):
        return
    for category, message in NOISY_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
    for name, patterns in NOISY_RECORDS.items():
        logging.getLogger(name).addFilter(_DropMessages(patterns))
    quiet_known_noise.installed = True
