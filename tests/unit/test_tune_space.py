"""Ray Tune's search space covers every registered generator architecture: jobs/tune.py reads
each one's widths and whether it has a depth from icm/generator/archs.py, so a trial of any
registered arch becomes a valid generator config (`tune.archs: [hyper]` once raised KeyError)."""

from __future__ import annotations

import optuna
import pytest

from icm.config import GeneratorConfig
from icm.errors import InputError
from icm.generator.archs import ARCHITECTURES
from jobs.tune import default_point, search_space, trial_config


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_every_registered_arch_is_searchable(arch):
    entry = ARCHITECTURES[arch]
    # configured arch: mlp, width 256; a condition an arch that reads spans can attend over
    base = GeneratorConfig(condition_pooling="chunks" if entry.reads_chunks else "mean").model_dump(mode="json")
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    widths = set()
    for _ in range(12):
        trial = study.ask()
        search_space(trial, (arch,), base)
        cfg = trial_config(base, trial.params)
        assert cfg.arch == arch
        assert ("depth" in trial.params) == entry.has_depth
        widths.add(cfg.width)
        study.tell(trial, 0.0)
    # Another arch than the configured one searches its own widths only.
    expected = set(entry.tune_widths) | ({base["width"]} if arch == base["arch"] else set())
    assert widths <= expected and len(widths) > 1


def test_the_configured_hyper_generator_is_the_first_trial_of_a_mixed_search():
    base = GeneratorConfig(arch="hyper", subspace_dim=None, width=128, depth=2).model_dump(mode="json")
    [point] = default_point(base, ("mlp", "hyper"))
    assert point["width_hyper"] == 128 and point["depth"] == 2  # hyper's decoder has hidden layers
    cfg = trial_config(base, point)
    assert (cfg.arch, cfg.width, cfg.depth, cfg.subspace_dim) == ("hyper", 128, 2, None)
    assert default_point(base, ("mlp",)) == []  # not searched: no trial of it




def test_tune_scores_a_validation_task_on_its_mean_both_vector(tmp_path, monkeypatch):
    """Model selection conditions the generator as the evaluation's `generated` variant does (the
    task's mean 'both' vector, read with the generator's inputs from the task-vector stage), not
    on the mean over every mode's episodes, which nothing reports (a real generator on a
    tiny-llama zoo, scored for real)."""
    from types import SimpleNamespace

    import numpy as np
    import pandas as pd

    from icm.config import PipelineConfig
    from icm.generator import fit_generator
    from icm.generator.data import prepare_data
    from icm.generator.inputs import initial_lora_state, load_both_means, load_zoo
    from icm.tasks import load_suite
    from jobs.tune import ValidationScorer
    from tests.conftest import make_suite
    from tests.unit.test_generator import FAST, LORA, write_zoo

    tasks = ["cats", "code", "sums"]
    conditions = write_zoo(tmp_path / "zoo", tasks, multitask=False)  # (episodes, 16) per task
    _, init_state = initial_lora_state("tiny-llama", LORA.model_dump(mode="json"))
    gen_cfg = GeneratorConfig(**{**FAST, "steps": 10}, val_tasks=0, val_snapshots=0)
    data = prepare_data(load_zoo(tmp_path / "zoo", include=tasks), conditions, gen_cfg,
                        validation=False, init_state=init_state)
    generator = fit_generator(data, gen_cfg)
    offsets = {"description": 0.0, "demos": 10.0, "both": 100.0}  # the modes differ
    rows = [{"task": task, "group": "g", "heldout": False, "mode": mode, "layer": -1, "pooling": "mean",
             "episode": episode, "vector": np.full(16, offsets[mode] + i + episode, np.float32)}
            for i, task in enumerate(tasks) for mode in offsets for episode in (0, 1)]
    (tmp_path / "run" / "task_vectors" / "vectors").mkdir(parents=True)
    pd.DataFrame(rows).to_parquet(tmp_path / "run" / "task_vectors" / "vectors" / "part-0.parquet")
    cfg = PipelineConfig.model_validate({"storage": {"root": str(tmp_path / "run")},
                                         "model": {"spec": "tiny-llama"}})
    both_means = load_both_means(cfg, tasks)
    np.testing.assert_allclose(both_means["sums"], np.full(16, 102.5))  # 'both', episodes 0 and 1
    split = SimpleNamespace(val_tasks=("sums",), train_tasks=("cats", "code"))
    suite = load_suite(make_suite(tmp_path / "suite"))
    scorer = ValidationScorer(cfg, suite, SimpleNamespace(split=split), both_means)
    seen, sample = [], generator.sample
    monkeypatch.setattr(generator, "sample", lambda c, **kw: seen.append(np.asarray(c)) or sample(c, **kw))
    perplexity = scorer.generator_perplexities(generator)
    assert list(perplexity) == ["sums"] and perplexity["sums"] > 1
    np.testing.assert_allclose(seen[0], np.full(16, 102.5))  # not the blend of the three modes (39.2)
    with pytest.raises(InputError, match=r"no mean 'both' task vector.*\['sums'\].*task_vectors.modes"):
        ValidationScorer(cfg, suite, SimpleNamespace(split=split), {})


@pytest.mark.parametrize("overrides, message", [
    (["tune.objectives=[reconstruction,hybrid]"], "tune.objectives.*generator.val_tasks is 0"),
    (["tune.rescore_top=2"], "tune.rescore_top=2.*generator.val_tasks is 0.*rescore_top=0"),
])
def test_perplexity_selection_without_validation_tasks_is_refused(overrides, message):
    """Without validation tasks the re-scoring fell back to two training tasks' own train texts."""
    import jobs  # noqa: F401  (the presets)
    from icm.config import load_config
    from jobs.tune import check_selection_tasks

    cfg = load_config("smoke", ["generator.val_tasks=0", "tune.rescore_top=0", *overrides])
    with pytest.raises(InputError, match=message):
        check_selection_tasks(cfg, ())
    check_selection_tasks(cfg, ("cats",))  # with a validation task: fine
    check_selection_tasks(load_config("smoke", ["generator.val_tasks=0", "tune.rescore_top=0"]), ())
