"""The smoke pipeline run that several integration modules read (test_pipeline, test_zoo): one
run for all of them, the suite's time. Not a test module: helpers and the run itself."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

from tests.conftest import REPO_ROOT, make_suite

# A tiny suite (4 tasks, "dogs" held out) keeps the whole pipeline to a couple of minutes.
FAST = ["zoo.steps=16", "zoo.seq_len=32", "zoo.eval_max_texts=2", "suite.tasks=null"]


def pipeline_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "jobs.pipeline", "--config", "smoke", *FAST, *args]


def run_pipeline(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    out = subprocess.run(pipeline_command(*args), cwd=REPO_ROOT, capture_output=True, text=True,
                         timeout=timeout)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-6000:]
    return out


def on_uri(suite: Path, uri: str, mirror: Path, *overrides: str) -> tuple[str, ...]:
    """Pipeline arguments for ``suite`` stored at ``uri`` through the local ``mirror``."""
    return (f"suite.path={suite}", uri, f"storage.local_mirror={mirror}", *overrides)


class SmokeRun(NamedTuple):
    root: Path  # the URI's directory: every stage's artifacts, read here as local files
    suite: Path
    resumed: subprocess.CompletedProcess
    uri: str  # the storage.root=file://... override
    base: Path  # where further local mirrors go
    killed_log: Path  # stdout + stderr of the first run, killed once the zoo was committed

    def rerun(self, mirror: str, *overrides: str) -> subprocess.CompletedProcess:
        """The same pipeline again, from yet another empty local mirror."""
        return run_pipeline(*on_uri(self.suite, self.uri, self.base / mirror, *overrides))


def killed_and_resumed_smoke_run(base: Path) -> SmokeRun:
    """The smoke pipeline on a URI root (``file://``: pyarrow's filesystem layer, the code path
    s3:// and gs:// take), killed once the zoo is committed and resumed from an empty local
    mirror, as on another machine: what it needs comes from the URI."""
    suite = make_suite(base / "suite")
    remote = base / "remote"
    uri = f"storage.root=file://{remote}"
    killed_log = base / "killed-driver.log"
    with open(killed_log, "w") as log:
        driver = subprocess.Popen(pipeline_command(*on_uri(suite, uri, base / "mirror-1")),
                                  cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT,
                                  start_new_session=True)
    deadline = time.time() + 600
    while time.time() < deadline and not (remote / "zoo" / "stage.json").is_file():
        assert driver.poll() is None, "the pipeline ended before the zoo was committed"
        time.sleep(0.5)
    os.killpg(driver.pid, signal.SIGKILL)  # the driver and the Ray it started, mid-pipeline
    driver.wait()
    time.sleep(3)
    assert (remote / "zoo" / "stage.json").is_file() and not (remote / "evaluate" / "stage.json").is_file()
    resumed = run_pipeline(*on_uri(suite, uri, base / "mirror-2"))
    return SmokeRun(root=remote, suite=suite, resumed=resumed, uri=uri, base=base,
                    killed_log=killed_log)
