"""The default suite built from installed packages: size, spread, splits, determinism, isolation."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from icm.default_suite import DEFAULT_TASKS, build_default_suite, heldout_names
from icm.tasks import load_suite, validate_suite
from tests.conftest import REPO_ROOT


def test_size_groups_and_heldout_spread(default_suite):
    stats = validate_suite(default_suite)
    groups = default_suite.groups()
    assert len(stats) >= 32 and len(groups) >= 4
    assert len(default_suite.heldout) >= 6
    heldout_groups = {default_suite.tasks[n].group for n in default_suite.heldout}
    assert heldout_groups == set(groups)  # every group has held-out tasks
    for group, names in groups.items():
        assert len([n for n in names if not default_suite.is_heldout(n)]) >= 4, group


def test_heldout_never_offered_for_training(default_suite):
    training = {task.name for task in default_suite.training_tasks()}
    assert training.isdisjoint(default_suite.heldout)
    assert training | set(default_suite.heldout) == set(default_suite.tasks)
    assert list(default_suite.heldout) == heldout_names()  # the documented rule, nothing else


def test_descriptions_are_hand_written_sentences(default_suite):
    descriptions = [task.description for task in default_suite.tasks.values()]
    assert len(set(descriptions)) == len(descriptions)
    for task in default_suite.tasks.values():
        sentences = [s for s in re.split(r"(?<=[.!?])\s+", task.description) if s]
        assert 1 <= len(sentences) <= 2 and 40 <= len(task.description) <= 300, task.name
        assert task.name not in task.description  # written for people, not from the slug
        assert task.license and task.source


def test_splits_are_sized_bounded_and_disjoint(default_suite):
    for task in default_suite.tasks.values():
        train, evaluation = task.train_texts(), task.eval_texts()
        assert len(train) >= 100 and len(evaluation) >= 20, task.name
        assert len(set(train)) == len(train) and len(set(evaluation)) == len(evaluation)
        assert not set(train) & set(evaluation)
        assert all(40 <= len(t) <= 600 for t in train + evaluation), task.name


def test_same_seed_same_bytes_other_seed_other_split(tmp_path, default_suite):
    again = build_default_suite(tmp_path / "again")
    for task in DEFAULT_TASKS:
        for name in ("task.yaml", "train.jsonl", "eval.jsonl"):
            assert (again / task.name / name).read_bytes() == \
                (default_suite.path / task.name / name).read_bytes(), (task.name, name)
    other = load_suite(build_default_suite(tmp_path / "other", seed=1, max_train=50, max_eval=10))
    task = other.tasks["bible-psalms"]
    assert len(task.train_texts()) == 50 and len(task.eval_texts()) == 10
    assert task.eval_texts() != default_suite.tasks["bible-psalms"].eval_texts()[:10]


def test_cli_validate_prints_the_table(default_suite):
    out = subprocess.run([sys.executable, "-m", "icm", "tasks", "validate", str(default_suite.path)],
                         capture_output=True, text=True, cwd=REPO_ROOT)
    assert out.returncode == 0, out.stderr
    assert re.search(r"32 tasks\s+4 groups\s+8 held out", out.stdout)
    assert "tokens" in out.stdout and "bible-psalms" in out.stdout


def test_cli_validate_reports_a_broken_suite(tiny_suite):
    (tiny_suite / "code" / "train.jsonl").write_text('{"text": "ok"}\n{"text": \n')
    out = subprocess.run([sys.executable, "-m", "icm", "tasks", "validate", str(tiny_suite),
                          "--no-tokens"], capture_output=True, text=True, cwd=REPO_ROOT)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "task 'code'" in out.stderr and "train.jsonl" in out.stderr and "line 2" in out.stderr


def test_missing_source_names_the_install_command(monkeypatch, tmp_path):
    import icm.default_suite as default_suite

    monkeypatch.setattr(default_suite, "FORTUNES_DIR", tmp_path / "no-fortunes")
    with pytest.raises(FileNotFoundError, match="apt-get install fortunes"):
        build_default_suite(tmp_path / "out")
    assert not (tmp_path / "out").exists()  # nothing half-built is left behind
