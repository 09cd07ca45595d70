"""The prepared accelerator check runs end to end on the CPU (gloo, float32, --quick), so it is
known to work before it first meets a GPU (scripts/gpu_check.sh)."""

from __future__ import annotations

import json
import subprocess

from tests.conftest import REPO_ROOT


def test_gpu_check_runs_every_section_on_the_cpu(tmp_path):
    out = tmp_path / "check.json"
    done = subprocess.run(["bash", "scripts/gpu_check.sh", "--model", "tiny-llama", "--quick",
                           "--device", "cpu", "--out", str(out), "--lm-tasks", "3", "--lm-texts", "2",
                           "--profile", "generate"],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(out.read_text())
    rows = {row["section"]: row for row in report["rows"]}
    assert report["environment"]["device"] == "cpu"
    for section in ("lora-deepspeed", "task-vectors", "generator-mlp", "generator-hyper", "generate",
                    "generator-lm", "generator-lm-teacher"):
        assert rows[section]["value"] > 0, rows[section]
    assert "skipped" in rows["vllm"] or rows["vllm"]["value"] > 0
    assert rows["generator-lm"]["detail"].startswith("3 tasks x 2 texts"), rows["generator-lm"]
    assert "a teacher prompt of" in rows["generator-lm-teacher"]["detail"]
    assert "teacher" not in rows["generator-lm"]["detail"]
    assert "--- profile of generate" in done.stdout and "Self CPU" in done.stdout
    assert "tokens/s" in done.stdout and "Attempting to get learning rate" not in done.stdout + done.stderr
