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




def test_a_text_in_two_tasks_stays_with_the_smaller_and_no_split_leaks():
    from icm.default_suite import leak_free_splits, shared_texts, split_texts
    from icm.tasks import cross_task_leaks

    pools = {"big": [f"g{i}" for i in range(30)] + ["notice", "quote"],
             "small": [f"s{i}" for i in range(12)] + ["notice", "tie"],
             "other": [f"o{i}" for i in range(12)] + ["quote", "tie"]}  # as large as small
    # Each shared text stays with the task with the fewest texts; a tie goes to the earlier.
    assert shared_texts(pools) == {"big": {"notice", "quote"}, "small": set(), "other": {"tie"}}
    for seed in (0, 1):
        splits = leak_free_splits(pools, seed=seed, max_train=400, max_eval=3)
        for name in ("small",):  # gives nothing up: exactly split_texts's split
            assert splits[name] == split_texts(pools[name], name, seed, 400, 3)
        shuffled = split_texts(pools["big"], "big", seed, 400, 0)[0]
        kept = [t for t in shuffled if t not in ("notice", "quote")]
        assert splits["big"] == (kept[3:], kept[:3])  # the shuffle's order, the shared texts out
        assert {n: set(tr + ev) for n, (tr, ev) in splits.items()} == {
            "big": set(pools["big"]) - {"notice", "quote"}, "small": set(pools["small"]),
            "other": set(pools["other"]) - {"tie"}}  # what a task keeps: not the seed's choice
        assert cross_task_leaks(splits, heldout=["small"]) == {}
