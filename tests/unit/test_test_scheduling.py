"""The README test command's two pytest-xdist workers: every integration test in one worker, in
collection order, the unit tests in the other (tests/conftest.py's scheduler)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.conftest import REPO_ROOT

RECORD = '''
import json, os, time
def _record(name):
    with open(os.environ["RUN_LOG"], "a") as log:
        log.write(json.dumps([os.environ["PYTEST_XDIST_WORKER"], name]) + "\\n")
    time.sleep(0.2)
'''


def test_integration_tests_run_in_one_worker_in_order_and_unit_tests_beside_them(tmp_path):
    (tmp_path / "tests" / "integration").mkdir(parents=True)
    (tmp_path / "tests" / "unit").mkdir()
    (tmp_path / "tests" / "conftest.py").write_text(
        "from tests_under_test.conftest import pytest_xdist_make_scheduler  # noqa: F401\n")
    (tmp_path / "tests_under_test").symlink_to(REPO_ROOT / "tests")
    for folder, module, count in (("integration", "test_a", 3), ("integration", "test_b", 3),
                                  ("unit", "test_c", 6)):
        tests = "".join(f"def test_{module}_{i}():\n    _record('{module}_{i}')\n" for i in range(count))
        (tmp_path / "tests" / folder / f"{module}.py").write_text(RECORD + tests)
    log = tmp_path / "run.jsonl"
    out = subprocess.run([sys.executable, "-m", "pytest", "-n", "2", "-q", "-p", "no:cacheprovider", "tests"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "RUN_LOG": str(log),
                              "PYTHONPATH": f"{tmp_path}:{REPO_ROOT}"})
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    runs = [json.loads(line) for line in log.read_text().splitlines()]
    integration = [(worker, name) for worker, name in runs if name.startswith(("test_a", "test_b"))]
    assert len(integration) == 6 and len({worker for worker, _ in integration}) == 1
    assert [name for _, name in integration] == [f"test_{m}_{i}" for m in "ab" for i in range(3)]
    unit_workers = {worker for worker, name in runs if name.startswith("test_c")}
    assert unit_workers - {integration[0][0]}, "no unit test ran beside the integration tests"


def test_unit_tests_run_on_one_cpu_thread_and_pass_it_to_their_commands():
    """tests/unit/conftest.py: without it, unit tests beside the integration lane oversubscribe
    the 2 cores (the box's CPU time over a suite run fell from ~3,400-3,900 to ~2,100 core-s
    with it and the session's integration-test merges)."""
    import torch

    assert torch.get_num_threads() == 1 and os.environ["OMP_NUM_THREADS"] == "1"
    child = subprocess.run([sys.executable, "-c", "import torch; print(torch.get_num_threads())"],
                           capture_output=True, text=True, timeout=120)
    assert child.stdout.strip() == "1", child.stderr[-2000:]
