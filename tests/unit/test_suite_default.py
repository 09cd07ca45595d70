"""`icm tasks validate` on the real default suite and on a broken one (the builder itself is
covered by test_default_suite.py)."""

from __future__ import annotations

import re
import subprocess
import sys

from tests.conftest import REPO_ROOT


def test_cli_validate_prints_the_table(default_suite):
    out = subprocess.run([sys.executable, "-m", "jobs", "tasks", "validate", str(default_suite.path)],
                         capture_output=True, text=True, cwd=REPO_ROOT)
    assert out.returncode == 0, out.stderr
    assert re.search(r"145 tasks\s+14 groups\s+28 held out", out.stdout)
    assert "tokens" in out.stdout and "bible-psalms" in out.stdout


def test_cli_validate_reports_a_broken_suite(tiny_suite):
    (tiny_suite / "code" / "train.jsonl").write_text('{"text": "ok"}\n{"text": \n')
    out = subprocess.run([sys.executable, "-m", "jobs", "tasks", "validate", str(tiny_suite),
                          "--no-tokens"], capture_output=True, text=True, cwd=REPO_ROOT)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "task 'code'" in out.stderr and "train.jsonl" in out.stderr and "line 2" in out.stderr
