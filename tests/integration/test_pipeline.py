"""The main job end to end on a real local Ray: outputs, resolved config, stage skipping."""

from __future__ import annotations

import json
import subprocess
import sys

import pandas as pd
import pytest
import yaml

from tests.conftest import REPO_ROOT


def _pipeline(*args: str) -> subprocess.CompletedProcess:
    out = subprocess.run([sys.executable, "-m", "jobs.pipeline", *args], cwd=REPO_ROOT,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    return out


@pytest.mark.slow
def test_smoke_pipeline_runs_on_local_ray_and_skips_when_up_to_date(tmp_path):
    root = tmp_path / "run"
    first = _pipeline("--config", "smoke", f"storage.root={root}")
    results = pd.read_parquet(root / "base_eval" / "results.parquet")
    smoke = yaml.safe_load((REPO_ROOT / "jobs/configs/smoke.yaml").read_text())
    assert sorted(results["task"]) == sorted(smoke["suite"]["tasks"])
    assert (results["texts"] == smoke["base_eval"]["max_texts"]).all()
    assert results["perplexity"].between(1, 1e7).all() and results["bits_per_char"].gt(0).all()
    assert results["heldout"].any()  # the smoke selection keeps a held-out task
    for stage in ("prepare", "base_eval"):
        record = json.loads((root / stage / "stage.json").read_text())
        assert record["stage"] == stage and record["fingerprint"]
        resolved = yaml.safe_load((root / stage / "config.resolved.yaml").read_text())
        assert resolved["model"]["spec"] == "tiny-llama" and resolved["storage"]["root"] == str(root)
    assert "Artifacts under" in first.stdout and "| group" in first.stdout

    second = _pipeline("--config", "smoke", f"storage.root={root}")
    assert "prepare: up to date" in second.stderr and "base_eval: up to date" in second.stderr

    third = _pipeline("--config", "smoke", f"storage.root={root}", "base_eval.max_texts=4")
    assert "prepare: up to date" in third.stderr and "base_eval: up to date" not in third.stderr
    assert (pd.read_parquet(root / "base_eval" / "results.parquet")["texts"] == 4).all()


def test_pipeline_rejects_an_unwritable_storage_root(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    out = subprocess.run([sys.executable, "-m", "jobs.pipeline", "--config", "smoke",
                          f"storage.root={blocker}/run"], cwd=REPO_ROOT, capture_output=True, text=True)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "storage.root" in out.stderr and "not writable" in out.stderr


def test_pipeline_rejects_bad_config_before_starting_ray(tmp_path):
    out = subprocess.run([sys.executable, "-m", "icm", "run", "--config", "smoke",
                          "model.spec_typo=1"], cwd=REPO_ROOT, capture_output=True, text=True)
    assert out.returncode == 2 and "unknown key 'model.spec_typo'" in out.stderr
    assert "Traceback" not in out.stderr
    direct = subprocess.run([sys.executable, "-m", "jobs.pipeline", "--config", "smoke",
                             "model.max_length=-1"], cwd=REPO_ROOT, capture_output=True, text=True)
    assert direct.returncode == 2 and "'model.max_length'" in direct.stderr
    assert "Traceback" not in direct.stderr
