"""Ray Tune's search space covers every registered generator architecture: jobs/tune.py reads
each one's widths and whether it has a depth from icm/generator/archs.py, so a trial of any
registered arch becomes a valid generator config (`tune.archs: [hyper]` once raised KeyError)."""

from __future__ import annotations

import optuna
import pytest

from icm.config import GeneratorConfig
from icm.generator.archs import ARCHITECTURES
from jobs.tune import default_point, search_space, trial_config


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_every_registered_arch_is_searchable(arch):
    base = GeneratorConfig().model_dump(mode="json")  # configured arch: mlp, width 256
    entry = ARCHITECTURES[arch]
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
