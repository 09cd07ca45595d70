"""Config presets, overrides and rejection of bad keys/values."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from icm.config import (ConfigError, PipelineConfig, list_presets, load_config,
                        save_resolved_config)
from jobs import PRESETS


@pytest.mark.parametrize("preset", list_presets())
def test_every_shipped_preset_loads(preset):
    config = load_config(preset)
    assert isinstance(config, PipelineConfig) and config.name == preset
    # Each preset opens with the exact command that runs it (as torchtune's configs do).
    assert f"--config {preset}" in (PRESETS / f"{preset}.yaml").read_text().splitlines()[1]


def test_presets_required_by_the_design_exist():
    assert {"smoke", "demo"} <= set(list_presets())
    assert load_config("smoke").model.spec == "tiny-llama"
    assert load_config("demo").model.spec == "smollm2-135m" and load_config("demo").suite.tasks is None


def test_overrides_are_typed_and_nested():
    config = load_config("smoke", ["model.max_length=64", "suite.tasks=[a, b]", "ray.num_cpus=null",
                                   "storage.root=/tmp/x", "name=other"])
    assert config.model.max_length == 64 and config.suite.tasks == ["a", "b"]
    assert config.ray.num_cpus is None and config.storage.root == "/tmp/x" and config.name == "other"


def test_unknown_key_lists_valid_keys():
    with pytest.raises(ConfigError) as err:
        load_config("smoke", ["model.max_lenght=64"])
    message = str(err.value)
    assert "unknown key 'model.max_lenght'" in message
    assert "max_length" in message and "spec" in message  # the valid keys are listed


def test_a_removed_key_says_why_and_what_to_do():
    """evaluate.select_texts was declared, set by presets and never read (best-of-K scores on
    the task_vectors.k demonstrations): now an error naming it and the fix, not a silent no-op."""
    with pytest.raises(ConfigError, match=r"evaluate.select_texts was removed.*task_vectors.k.*delete the key"):
        load_config("smoke", ["evaluate.select_texts=3"])


def test_unknown_section_lists_valid_sections():
    with pytest.raises(ConfigError, match=r"unknown key 'modle'.*'model'"):
        load_config(None, ["modle.spec=x"])


def test_bad_values_name_the_field():
    with pytest.raises(ConfigError, match=r"'model.max_length'.*greater than or equal to 8"):
        load_config("smoke", ["model.max_length=2"])
    with pytest.raises(ConfigError, match=r"'model.dtype'"):
        load_config("smoke", ["model.dtype=float8"])
    with pytest.raises(ConfigError, match=r"'storage.root'.*not a storage URI"):
        load_config("smoke", ["storage.root=s3:///"])
    with pytest.raises(ConfigError, match="must look like section.field=value"):
        load_config("smoke", ["model.spec"])


def test_unknown_preset_and_missing_file():
    with pytest.raises(ConfigError, match=r"unknown config preset 'demoo'.*presets: \["):
        load_config("demoo")
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("/nonexistent/config.yaml")


def test_yaml_file_config_and_resolved_copy(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text(yaml.safe_dump({"name": "mine", "model": {"spec": "tiny-llama"}}))
    config = load_config(path, ["base_eval.batch_size=2"])
    written = save_resolved_config(config, tmp_path / "out")
    resolved = yaml.safe_load(written.read_text())
    assert resolved["name"] == "mine" and resolved["base_eval"]["batch_size"] == 2
    assert PipelineConfig.model_validate(resolved) == config  # the saved copy round-trips
    assert config.fingerprint("model") != load_config(None).fingerprint("model")


def test_config_show_cli(tmp_path):
    out = subprocess.run([sys.executable, "-m", "jobs", "config", "show", "--config", "smoke",
                          "model.max_length=99"], capture_output=True, text=True, check=True)
    assert yaml.safe_load(out.stdout)["model"]["max_length"] == 99
    bad = subprocess.run([sys.executable, "-m", "jobs", "config", "show", "--config", "smoke",
                          "model.nope=1"], capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown key 'model.nope'" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_a_config_that_extends_a_preset_holds_only_what_it_changes(tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text(yaml.safe_dump({"extends": "smoke", "name": "base",
                                    "model": {"max_length": 99},
                                    "task_vectors": {"poolings": ["mean", "last"]}}))
    child = tmp_path / "nested" / "child.yaml"
    child.parent.mkdir()
    child.write_text(yaml.safe_dump({"extends": "../base.yaml", "name": "child",
                                     "task_vectors": {"poolings": ["mean"]}}))
    smoke, config = load_config("smoke"), load_config(child, ["zoo.steps=3"])
    assert config.name == "child" and config.zoo.steps == 3
    assert config.model.max_length == 99 and config.model.spec == smoke.model.spec  # merged
    assert config.task_vectors.poolings == ["mean"]  # a list replaces the base's, never appends
    expected = load_config("smoke", ["name=child", "model.max_length=99", "zoo.steps=3",
                                     "task_vectors.poolings=[mean]"])
    assert config == expected


@pytest.mark.parametrize("extends, message", [
    ("self.yaml", "loops back to a file already read"),
    (["smoke", "demo"], "must name one preset"),
    ("missing.yaml", "does not exist"),
    ("demoo", "unknown config preset 'demoo'"),
])
def test_a_bad_extends_names_the_file_and_what_is_wrong(tmp_path, extends, message):
    path = tmp_path / "self.yaml"
    path.write_text(yaml.safe_dump({"extends": extends, "name": "x"}))
    with pytest.raises(ConfigError, match=message) as caught:
        load_config(path)
    assert str(caught.value).startswith(f"{path}: ")  # the file whose extends is wrong


RUNS = sorted((PRESETS / "runs").glob("*.yaml"))


@pytest.mark.parametrize("run", RUNS, ids=[p.stem for p in RUNS])
def test_every_named_run_loads_and_opens_with_its_command(run):
    assert load_config(run).name == run.stem
    assert load_config(f"runs/{run.stem}") == load_config(run)  # by name, from any directory
    assert f"--config runs/{run.stem}" in run.read_text().splitlines()[1]


# Runs H, X and X-lm as EVAL.md writes them out (sessions 39-48), copied here: the named runs
# must resolve to these flags, their storage and extra-vector roots aside.
CORE = ("suite.subset=core evaluate.folds=0 ray.num_cpus=2 zoo.steps=48 zoo.multitask=false "
        "oracles.replicates=0 evaluate.seen_tasks=0 task_vectors.poolings=[mean,last,chunks] "
        "generator.subspace_dim=null generator.width=128 generator.embedding_dim=32 "
        "generator.batch_size=32 generator.steps=600 generator.beta=0.01 "
        "generator.kl_warmup_steps=100 generator.lm_steps=200 generator.lm_lr=0.001 "
        "generator.arch=hyper generator.condition_pooling=mean generator.lm_context=prompt "
        "evaluate.variants=[base,in-context,oracle,generated,soup,similarity-soup,nearest,ridge] "
        "evaluate.extra_variants=[in-context+generated,in-context+soup,in-context+similarity-soup,"
        "in-context+nearest,in-context+ridge,in-context+oracle]")
FLAGS = {"core-h": CORE + " generator.objective=lm generator.cpus_per_task=2"
                          " generator.lm_condition_episodes=others",
         "core-x": CORE + " generator.objective=hybrid generator.cpus_per_task=1"
                          " generator.lm_condition=mean",
         "core-x-lm": CORE + " generator.objective=lm generator.cpus_per_task=1"
                             " generator.lm_condition=mean"}


@pytest.mark.parametrize("run", sorted(FLAGS))
def test_the_named_runs_h_x_and_x_lm_are_the_commands_eval_md_gives(run):
    named = load_config(PRESETS / "runs" / f"{run}.yaml")
    where = [f"name={run}", f"storage.root={named.storage.root}",
             f"generator.lm_extra_root={named.generator.lm_extra_root}"]
    assert named == load_config("study", FLAGS[run].split() + where)
    extra = load_config(PRESETS / "runs" / "core-extra-vectors.yaml")
    assert named.generator.lm_extra_root == extra.storage.root  # the vectors it reads


@pytest.mark.parametrize("overrides, message", [
    (["task_vectors.modes=[both]"], "generator.condition_modes ['description', 'demos']"),
    (["generator.condition_layer=3"], "generator.condition_layer=3"),
    (["task_vectors.modes=[description]", "generator.condition_modes=[description]"], "keep 'both'"),
])
def test_generator_conditions_must_be_extracted_by_the_task_vector_stage(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_config("smoke", overrides)


def test_a_relative_storage_root_is_made_absolute(tmp_path, monkeypatch):
    # The config travels to Ray workers (other working directories) and Tune/Train need absolute
    # storage paths: a relative root must be resolved once, on the driver.
    monkeypatch.chdir(tmp_path)
    config = load_config("smoke", ["storage.root=runs/a"])
    assert config.storage.root == str(tmp_path.resolve() / "runs" / "a")
    assert config.storage.path("zoo") == tmp_path.resolve() / "runs" / "a" / "zoo"


def test_a_uri_storage_root_is_kept_and_gets_an_absolute_local_mirror(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = load_config("smoke", ["storage.root=gs://bucket/runs/a", "storage.local_mirror=m"])
    assert config.storage.root == "gs://bucket/runs/a" and config.storage.is_remote
    assert config.storage.path("zoo") == tmp_path.resolve() / "m" / "zoo"
    assert config.storage.uri("zoo") == "gs://bucket/runs/a/zoo"


def test_a_shareable_dump_shows_a_root_under_the_working_directory_relative(tmp_path, monkeypatch):
    from icm.config import shareable_dump

    monkeypatch.chdir(tmp_path)
    inside = load_config("demo")  # root icm-runs/demo, made absolute at load
    assert inside.storage.root == str(tmp_path / "icm-runs" / "demo")
    assert shareable_dump(inside)["storage"]["root"] == "icm-runs/demo"
    elsewhere = load_config("demo", ["storage.root=/srv/runs/a"])
    assert shareable_dump(elsewhere)["storage"]["root"] == "/srv/runs/a"
    assert shareable_dump(inside)["zoo"] == inside.model_dump(mode="json")["zoo"]  # nothing else changes


def test_relative_suite_path_becomes_absolute(tmp_path, monkeypatch):
    """Ray workers run in another working directory: a relative suite.path failed there."""
    from icm.config import load_config

    monkeypatch.chdir(tmp_path)
    config = load_config("smoke", ["suite.path=my-suite"])
    assert config.suite.path == str(tmp_path / "my-suite")


@pytest.mark.parametrize("overrides, names", [
    (["generator.objective=reconstruction"], "generator.objective"),
    (["zoo.multitask=false"], "zoo.multitask"),
    (["generator.target=b"], "generator.target"),
    (["tune.enabled=true", "stages=[tune, generator]"], "tune.enabled"),
    (["evaluate.folds=2"], "evaluate.folds"),
])
def test_lm_anchor_multitask_is_refused_where_its_lora_saw_the_judged_tasks(overrides, names):
    """The multi-task LoRA trained on every training task: an anchor on it is allowed for the
    held-out set of an LM-trained generator only, and every other use names the field to fix."""
    ok = ["generator.lm_anchor=multitask", "generator.objective=lm", "tune.enabled=false",
          "evaluate.folds=0"]
    assert load_config("study", ok).generator.lm_anchor == "multitask"
    # folds only with a multi-task LoRA per fold, trained without the fold's groups
    assert load_config("study", [*ok, "evaluate.folds=2", "oracles.fold_multitask=true"])
    with pytest.raises(ConfigError, match=names.replace(".", r"\.")):
        load_config("study", [*ok, *overrides])


@pytest.mark.parametrize("preset", ["demo", "gpu"])
def test_a_preset_that_searches_searches_its_own_generator_first(preset):
    """With Tune on, the generator stage trains Tune's winner, and the configured generator is
    the search's first trial only if Tune searches its arch: a preset whose generator.arch is
    outside tune.archs would silently train another architecture."""
    from jobs.tune import default_point

    config = load_config(preset)
    assert config.tune.enabled and config.generator.arch in config.tune.archs
    first = default_point(config.generator.model_dump(), config.tune.archs)
    assert first and first[0]["arch"] == config.generator.arch
    assert first[0][f"width_{config.generator.arch}"] == config.generator.width
