"""The per-module hypernetwork generator (generator.arch=hyper): the layout's module structure,
the registry, and what sets it apart from the PCA-span `mlp` generator."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from icm.config import GeneratorConfig
from icm.eval.scoring import draw_spread
from icm.generator import train_generator
from icm.generator.archs import ARCHITECTURES, architecture, build_network
from icm.generator.hyper import module_segments
from icm.generator.inputs import ZooData
from icm.generator.networks import CVAESpec
from tests.unit.test_generator import FAST, LORA, synthetic_layout, synthetic_weights

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# beta 1e-2: with less KL weight the latent carries the task and z = 0 ignores the condition.
HYPER = {**FAST, "arch": "hyper", "subspace_dim": None, "width": 64, "embedding_dim": 8,
         "lr": 3e-3, "beta": 1e-2}


def test_segments_name_layer_module_type_and_part():
    layout = synthetic_layout()
    segments = module_segments(layout.keys, layout.sizes)
    assert segments[:4] == ((0, "self_attn.q_proj", "lora_A", 256), (0, "self_attn.q_proj", "lora_B", 256),
                            (0, "self_attn.v_proj", "lora_A", 256), (0, "self_attn.v_proj", "lora_B", 128))
    assert {s[0] for s in segments} == {0, 1} and sum(s[3] for s in segments) == layout.numel
    with pytest.raises(ValueError, match="not a lora_A/lora_B"):
        module_segments(["model.layers.0.mlp.weight"], [4])


def test_hyper_places_each_module_where_the_layout_has_it():
    """A module type's head writes exactly its instances' flat positions, every position once."""
    layout = synthetic_layout()
    spec = CVAESpec("hyper", input_dim=layout.numel, condition_dim=6, latent_dim=4, width=16,
                    segments=module_segments(layout.keys, layout.sizes), embedding_dim=4)
    torch.manual_seed(0)
    model = build_network(spec)
    written = torch.zeros(layout.numel, dtype=torch.long)
    for index in range(len(model.heads)):
        written[getattr(model, f"positions_{index}").reshape(-1)] += 1
    assert torch.equal(written, torch.ones_like(written))
    x, c = torch.randn(3, layout.numel), torch.randn(3, 6)
    x_hat, mu, _ = model(x, c, torch.randn(3, 4))
    assert x_hat.shape == x.shape and mu.shape == (3, 4)
    # Layers differ only through their embeddings: two layers' q_proj outputs are not equal.
    q = getattr(model, f"positions_{model.types.index('self_attn.q_proj')}")  # (2 layers, S)
    assert not torch.allclose(x_hat[:, q[0]], x_hat[:, q[1]])
    x_hat.square().sum().backward()  # every parameter takes part
    assert all(p.grad is not None for p in model.parameters())


def test_registry_is_the_one_place_an_arch_is_named():
    assert {"mlp", "conv1d", "hyper"} <= set(ARCHITECTURES)
    assert architecture("hyper").space(GeneratorConfig(arch="hyper")).key == "flat"
    assert architecture("mlp").space(GeneratorConfig(subspace_dim=8)).key == "subspace-8"
    with pytest.raises(ValueError, match="unknown generator arch 'transformer'; known: conv1d, hyper, hyper-attn, mlp"):
        GeneratorConfig(arch="transformer")


def _zoo(tasks, **kwargs):
    layout = synthetic_layout()
    vectors, conditions = synthetic_weights(layout, tasks, **kwargs)
    return ZooData(layout, vectors, "tiny-llama", {"peft_type": "LORA"}, LORA.model_dump(mode="json")), conditions


def _span_residual(vector: torch.Tensor, snapshots: torch.Tensor) -> float:
    """Relative distance of ``vector`` from the affine span of ``snapshots`` (N, L)."""
    mean = snapshots.mean(0)
    basis = torch.linalg.svd(snapshots - mean, full_matrices=False).Vh  # (N, L)
    centred = vector - mean
    return float((centred - (centred @ basis.T) @ basis).norm() / centred.norm())


def test_hyper_learns_the_adapters_and_leaves_the_zoos_span():
    """On 8 training tasks whose LoRAs depend linearly on their task vector, the hyper generator
    reproduces each task's adapter from its vector; for an unseen task it emits an adapter
    outside the training snapshots' span (the mlp generator never can), closer to that task's
    own adapter than the zoo's mean is."""
    tasks = [f"t{i}" for i in range(9)]
    zoo, conditions = _zoo(tasks, dim=4, snapshots=3)
    unseen = tasks[-1]
    train = ZooData(zoo.layout, {t: zoo.vectors[t] for t in tasks[:-1]}, zoo.model_spec,
                    zoo.peft_config, zoo.lora)
    cfg = GeneratorConfig(**{**HYPER, "steps": 400}, val_tasks=0, val_snapshots=0)
    generator = train_generator(train, {t: conditions[t] for t in tasks[:-1]}, cfg)
    seen = np.stack([conditions[t].mean(0) for t in tasks[:-1]])
    out = generator.sample(seen, z="zero")  # (8, L)
    targets = torch.stack([zoo.vectors[t].mean(0) for t in tasks[:-1]])  # (8, L)
    assert (torch.cdist(out, targets).argmin(1) == torch.arange(8)).all()
    snapshots = torch.cat([zoo.vectors[t] for t in tasks[:-1]])  # (24, L)
    new = generator.sample(conditions[unseen].mean(0), z="zero")[0]  # (L,)
    assert _span_residual(new, snapshots) > 1e-3
    mlp = train_generator(train, {t: conditions[t] for t in tasks[:-1]},
                          GeneratorConfig(**{**FAST, "subspace_dim": 16, "beta": 1e-2}, val_tasks=0,
                                          val_snapshots=0))
    assert _span_residual(mlp.sample(conditions[unseen].mean(0), z="zero")[0], snapshots) < 1e-3
    truth = zoo.vectors[unseen].mean(0)
    assert (new - truth).norm() < (snapshots.mean(0) - truth).norm()


def test_hyper_artifact_round_trip_and_draws_differ(tmp_path):
    zoo, conditions = _zoo(("a", "b", "c"))
    generator = train_generator(zoo, conditions, GeneratorConfig(**{**HYPER, "steps": 30},
                                                                 val_tasks=0, val_snapshots=0))
    from icm.generator import LoraGenerator

    generator.save(tmp_path / "gen")
    again = LoraGenerator.load(tmp_path / "gen")
    c = conditions["a"].mean(0)
    assert torch.equal(generator.sample(c, num_samples=3, seed=4), again.sample(c, num_samples=3, seed=4))
    draws = again.sample(c, num_samples=4, seed=1)  # (4, L)
    assert (draws - draws.mean(0)).norm(dim=1).min() > 0  # the latent changes the adapter


def test_free_bits_keep_the_latent_in_use_so_draws_differ():
    """A KL weight that collapses the posterior (KL ~ 0: z is ignored, draws nearly equal) does
    not with free bits: the latent keeps carrying where on its training trajectory a snapshot
    lies, and draws from the prior spread over it (the synthetic snapshots differ by step)."""
    zoo, conditions = _zoo(("a", "b", "c"), dim=4, snapshots=6)
    result = {}
    for free_bits in (0.0, 0.5):
        cfg = GeneratorConfig(**{**HYPER, "steps": 150, "beta": 1.0, "free_bits": free_bits},
                              val_tasks=0, val_snapshots=0)
        generator = train_generator(zoo, conditions, cfg)
        spread = np.mean([draw_spread(generator.sample(conditions[t].mean(0), num_samples=8, seed=1))
                          for t in conditions])
        result[free_bits] = (generator.summary["history"][-1]["train_kl"], spread)
    (plain_kl, plain_spread), (kept_kl, kept_spread) = result[0.0], result[0.5]
    assert plain_kl < 0.01 < 1.0 < kept_kl
    assert kept_spread > 3 * plain_spread
