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



def test_leak_free_splits_skip_what_another_task_is_measured_on_and_refill():
    from icm.default_suite import leak_free_splits, split_texts

    def rest_and_eval(pool, name):  # split_texts with every text past eval in train
        return split_texts(pool, name, 0, len(pool), 3)

    b, held = [f"b{i}" for i in range(12)], [f"h{i}" for i in range(12)]
    b_eval, held_train = rest_and_eval(b, "b")[1][0], rest_and_eval(held, "held")[0][0]
    a = [f"a{i}" for i in range(41)] + [b_eval, held_train]
    a_rest, a_eval = rest_and_eval(a, "a")
    assert {b_eval, held_train} <= set(a_rest)  # both fell into a's train side of the shuffle
    held.append(a_eval[0])  # the held-out task's oracle would train on a's eval text
    pools = {"a": a, "b": b, "held": held}
    for max_train in (20, 5):  # all the rest / a cut refilled past the skipped texts
        splits = leak_free_splits(pools, ["held"], seed=0, max_train=max_train, max_eval=3)
        assert all(splits[n][1] == rest_and_eval(pool, n)[1] for n, pool in pools.items())  # eval kept
        assert splits["a"][0] == [t for t in a_rest if t not in (b_eval, held_train)][:max_train]
        assert a_eval[0] not in splits["held"][0] and len(splits["held"][0]) == min(max_train, 9)
        assert splits["b"][0] == rest_and_eval(b, "b")[0][:max_train]  # no leak: untouched
