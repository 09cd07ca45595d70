"""The suite loader and validator: valid suites load, each kind of breakage names its place."""

from __future__ import annotations

import json
import shutil

import pytest
import yaml

from icm.tasks import (SuiteError, format_stats_table, load_suite, load_task, validate_suite,
                       write_suite_meta)


def test_valid_suite_loads_and_validates(tiny_suite):
    suite = load_suite(tiny_suite)
    assert suite.name == "tiny"
    assert list(suite.tasks) == ["cats", "code", "dogs", "sums"]
    assert suite.heldout == ("dogs",)
    assert [t.name for t in suite.training_tasks()] == ["cats", "code", "sums"]
    assert suite.groups() == {"animals": ["cats", "dogs"], "code": ["code"], "math": ["sums"]}
    stats = validate_suite(suite, count_tokens=lambda texts: sum(len(t.split()) for t in texts))
    by_name = {s.name: s for s in stats}
    assert by_name["cats"].n_train == 12 and by_name["cats"].n_eval == 2
    assert by_name["dogs"].heldout and not by_name["cats"].heldout
    table = format_stats_table(stats)
    assert "held-out" in table and "4 tasks" in table and "3 groups" in table
    lines = table.splitlines()
    assert len(lines) == 2 + 4 + 2 and lines[-2].startswith("----")  # header, rule, 4 tasks, totals
    totals = lines[-1].split()
    assert totals[-3:] == [str(sum(s.n_train for s in stats)), str(sum(s.n_eval for s in stats)),
                           str(sum(s.tokens for s in stats))]


def test_select_keeps_heldout_status_and_rejects_unknown(tiny_suite):
    suite = load_suite(tiny_suite).select(["dogs", "cats"])
    assert list(suite.tasks) == ["cats", "dogs"] and suite.heldout == ("dogs",)
    with pytest.raises(SuiteError, match=r"unknown task\(s\) \['owls'\].*choose from"):
        load_suite(tiny_suite).select(["owls"])


def test_fingerprint_changes_with_any_text(tiny_suite):
    before = load_suite(tiny_suite).fingerprint()
    with open(tiny_suite / "cats" / "eval.jsonl", "a") as handle:
        handle.write(json.dumps({"text": "One more cat."}) + "\n")
    assert load_suite(tiny_suite).fingerprint() != before


def test_missing_file(tiny_suite):
    (tiny_suite / "sums" / "eval.jsonl").unlink()
    with pytest.raises(SuiteError) as err:
        load_suite(tiny_suite)
    message = str(err.value)
    assert "task 'sums'" in message and "eval.jsonl" in message and "missing file" in message


def test_missing_task_yaml(tiny_suite):
    (tiny_suite / "code" / "task.yaml").unlink()
    with pytest.raises(SuiteError, match=r"task 'code'.*task\.yaml.*missing file"):
        load_suite(tiny_suite)


def test_empty_eval_split(tiny_suite):
    (tiny_suite / "cats" / "eval.jsonl").write_text("")
    suite = load_suite(tiny_suite)  # structure is fine; the texts are checked by validation
    with pytest.raises(SuiteError, match=r"task 'cats'.*eval\.jsonl.*has no texts"):
        validate_suite(suite)


def test_duplicate_task_names(tiny_suite):
    shutil.copytree(tiny_suite / "cats", tiny_suite / "cats-copy")
    with pytest.raises(SuiteError, match=r"duplicate task name 'cats'.*field 'name'|"
                                         r"field 'name'.*duplicate task name 'cats'"):
        load_suite(tiny_suite)


def test_malformed_json_line_names_line(tiny_suite):
    path = tiny_suite / "sums" / "train.jsonl"
    lines = path.read_text().splitlines()
    lines[4] = '{"text": "5 + 6 = 11"'  # missing closing brace on line 5
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(SuiteError) as err:
        validate_suite(tiny_suite)
    assert err.value.task == "sums" and err.value.line == 5
    assert "train.jsonl" in str(err.value) and "malformed JSON" in str(err.value)


def test_line_without_text_field(tiny_suite):
    path = tiny_suite / "code" / "eval.jsonl"
    path.write_text(path.read_text() + json.dumps({"txt": "oops"}) + "\n")
    with pytest.raises(SuiteError, match=r"line 3, field 'text'"):
        validate_suite(tiny_suite)


def test_heldout_name_that_does_not_exist(tiny_suite):
    write_suite_meta(tiny_suite, name="tiny", heldout=["dogs", "owls"])
    with pytest.raises(SuiteError) as err:
        load_suite(tiny_suite)
    assert err.value.field == "heldout" and "'owls' does not exist" in str(err.value)
    assert "suite.yaml" in str(err.value)


def test_eval_text_also_in_train_is_leakage(tiny_suite):
    path = tiny_suite / "cats" / "eval.jsonl"
    train_text = load_task(tiny_suite / "cats").train_texts()[3]
    path.write_text(path.read_text() + json.dumps({"text": train_text}) + "\n")
    with pytest.raises(SuiteError, match=r"eval\.jsonl, line 3.*leakage"):
        validate_suite(tiny_suite)


def _append_train(suite_dir, task, text):
    path = suite_dir / task / "train.jsonl"
    path.write_text(path.read_text() + json.dumps({"text": text}) + "\n")
    return len(path.read_text().splitlines())  # the appended text's line


@pytest.mark.parametrize("trained_on, owner, split", [
    ("cats", "code", "eval"),    # a training task trains on another task's eval text
    ("dogs", "cats", "eval"),    # the held-out task's oracle trains on a training task's eval text
    ("sums", "dogs", "train"),   # a training task trains on a held-out task's (train) text
])
def test_a_text_measured_on_one_task_in_another_tasks_train_split_is_leakage(
        tiny_suite, trained_on, owner, split):
    text = getattr(load_task(tiny_suite / owner), f"{split}_texts")()[0]
    line = _append_train(tiny_suite, trained_on, text)
    with pytest.raises(SuiteError, match=rf"task '{trained_on}', file .*{trained_on}/train\.jsonl, "
                                         rf"line {line}.*also in task '{owner}'.*leakage across tasks"):
        validate_suite(tiny_suite)


def test_train_texts_shared_by_training_tasks_are_not_leakage(tiny_suite):
    """Two training tasks may share a train text: neither is measured on it."""
    _append_train(tiny_suite, "code", load_task(tiny_suite / "cats").train_texts()[0])
    validate_suite(tiny_suite)


def test_cross_task_leaks_names_each_leaking_text_once_with_its_owner():
    from icm.tasks import cross_task_leaks

    splits = {"a": (["x", "shared", "b-eval"], ["a-eval"]), "b": (["y", "shared"], ["b-eval"]),
              "held": (["h-train", "a-eval"], ["h-eval"]), "c": (["h-train", "h-eval", "z"], ["c-eval"])}
    assert cross_task_leaks(splits, heldout=["held"]) == {
        "a": {"b-eval": "b"}, "held": {"a-eval": "a"}, "c": {"h-train": "held", "h-eval": "held"}}


def test_task_yaml_missing_field_and_unknown_field(tiny_suite):
    meta_path = tiny_suite / "cats" / "task.yaml"
    meta = yaml.safe_load(meta_path.read_text())
    del meta["description"]
    meta_path.write_text(yaml.safe_dump(meta))
    with pytest.raises(SuiteError, match=r"field 'description'.*missing"):
        load_suite(tiny_suite)
    meta["description"], meta["descriptoin"] = "Cats.", "typo"
    meta_path.write_text(yaml.safe_dump(meta))
    with pytest.raises(SuiteError, match=r"unknown field\(s\) \['descriptoin'\].*valid fields"):
        load_suite(tiny_suite)


def test_bad_task_name(tiny_suite):
    meta_path = tiny_suite / "cats" / "task.yaml"
    meta = yaml.safe_load(meta_path.read_text())
    meta["name"] = "Cats and/or Dogs"
    meta_path.write_text(yaml.safe_dump(meta))
    with pytest.raises(SuiteError, match="not a valid task name"):
        load_suite(tiny_suite)


def test_not_a_suite_directory(tmp_path):
    with pytest.raises(SuiteError, match="does not exist"):
        load_suite(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SuiteError, match=r"suite\.yaml.*missing file"):
        load_suite(tmp_path / "empty")


def test_task_folder_on_its_own(tiny_suite, tmp_path):
    standalone = shutil.copytree(tiny_suite / "code", tmp_path / "my-task")
    task = load_task(standalone)
    assert task.name == "code" and task.group == "code" and len(task.eval_texts()) == 2
