"""Quiet by default: only the named noise is filtered, verbose keeps everything (icm/logs.py).
Each case runs in a fresh interpreter: the filters are process-wide."""

from __future__ import annotations

import os
import subprocess
import sys

PROBE = """
import logging, warnings
from icm.logs import quiet_known_noise
quiet_known_noise()
logging.basicConfig(level=logging.INFO, format="%(name)s %(message)s")
warnings.warn("`is_gradient_checkpointing` is deprecated and will be removed", FutureWarning)
warnings.warn("a real deprecation", FutureWarning)
ds = logging.getLogger("DeepSpeed")
ds.warning("Attempting to get learning rate from scheduler before it has started")
ds.warning("Setting ds_accelerator to cpu (auto detect)")
ds.warning("a real DeepSpeed warning")
logging.getLogger("ray.data._internal.progress").warning("Progress bars disabled. To enable ...")
logging.getLogger("ray.tune.tune").info("a library INFO line")
logging.getLogger("ray.train.v2._internal.execution.controller.placement_group_cleaner").warning(
    "Failed to query Ray Train Controller actor state. State API may be temporarily unavailable.")
logging.getLogger("ray.tune.tune").warning("a real Tune warning")
import importlib.util, pathlib
context = pathlib.Path(importlib.util.find_spec("ray").origin).parent / "train/v2/_internal/execution/context.py"
logging.getLogger(str(context)).info("Reporting training result 1: TrainingReport(...)")
import weakref
class Holder: pass
def exit_in_gc(_):  # what Ray's SIGTERM handler does when it fires inside a GC callback
    raise SystemExit(1)
def real_error_in_gc(_):
    raise KeyError("a real unraisable error")
for callback in (exit_in_gc, real_error_in_gc):
    holder = Holder(); ref = weakref.ref(holder, callback); del holder
"""


def _run(env_extra: dict) -> str:
    env = {key: value for key, value in os.environ.items() if key != "ICM_LOG_LEVEL"}
    env.update(env_extra)
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=env,
                         check=True)
    return out.stderr


def test_known_noise_is_filtered_and_real_warnings_pass():
    err = _run({})
    assert "a real deprecation" in err and "a real DeepSpeed warning" in err
    assert "is_gradient_checkpointing" not in err
    assert "Attempting to get learning rate" not in err and "Setting ds_accelerator" not in err
    assert "Progress bars disabled" not in err and "a library INFO line" not in err
    assert "Reporting training result" not in err and "a real Tune warning" in err
    assert "SystemExit" not in err and "a real unraisable error" in err
    assert "Failed to query Ray Train Controller" not in err


def test_verbose_keeps_everything():
    err = _run({"ICM_LOG_LEVEL": "DEBUG"})
    assert "is_gradient_checkpointing" in err and "Attempting to get learning rate" in err
    assert "a library INFO line" in err and "Reporting training result" in err
    assert "SystemExit" in err
