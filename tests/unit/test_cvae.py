"""The CVAE network and its loss: exact shapes, no batch broadcasting, masking, warm-up, training."""

from __future__ import annotations

import pytest
import torch

from icm.config import GeneratorConfig
from icm.generator.archs import build_network
from icm.generator.data import SampleSet
from icm.generator.networks import CVAESpec, cvae_loss, kl_divergence, kl_weight, reconstruction_error
from icm.generator.training import fit_cvae, generation_mse, load_checkpoint

pytestmark = pytest.mark.usefixtures("one_torch_thread")


SPECS = {
    "mlp-concat": CVAESpec("mlp", input_dim=24, condition_dim=6, latent_dim=4, width=32, depth=2),
    "mlp-film": CVAESpec("mlp", input_dim=24, condition_dim=6, latent_dim=4, width=32, depth=2,
                         injection="film"),
    "conv1d-concat": CVAESpec("conv1d", input_dim=64, condition_dim=6, latent_dim=4, width=2,
                              conv_stages=3),
    "conv1d-film": CVAESpec("conv1d", input_dim=64, condition_dim=6, latent_dim=4, width=2,
                            conv_stages=3, injection="film"),
}


@pytest.mark.parametrize("name", sorted(SPECS))
def test_output_shape_equals_target_shape_exactly(name):
    spec = SPECS[name]
    torch.manual_seed(0)
    model = build_network(spec)
    x, c = torch.randn(5, spec.input_dim), torch.randn(5, spec.condition_dim)  # (B, F), (B, D)
    x_hat, mu, logvar = model(x, c, torch.randn(5, spec.latent_dim))
    assert x_hat.shape == x.shape == (5, spec.input_dim)
    assert mu.shape == logvar.shape == (5, spec.latent_dim)
    assert model.decode(torch.zeros(3, spec.latent_dim), c[:3]).shape == (3, spec.input_dim)


def test_loss_is_per_sample_and_refuses_the_reference_broadcast():
    torch.manual_seed(0)
    x_hat, x, w = torch.randn(4, 10), torch.randn(4, 10), torch.full((10,), 0.1)
    with pytest.raises(ValueError, match="shapes differ"):
        reconstruction_error(x_hat, x.unsqueeze(1), w)  # the reference's [B, L] vs [B, 1, L]
    per_sample = reconstruction_error(x_hat, x, w)  # (B,)
    assert per_sample.shape == (4,)
    assert torch.allclose(per_sample, ((x_hat - x) ** 2).mean(1))
    # Another sample's target never changes this sample's error (the broadcast version does).
    moved = x.clone()
    moved[1:] += 5.0
    assert torch.allclose(reconstruction_error(x_hat, moved, w)[0], per_sample[0])
    broadcast = ((x_hat - moved.unsqueeze(1)) ** 2).mean(-1)  # (B, B): sample 0 vs every target
    assert not torch.allclose(broadcast.mean(0)[0], per_sample[0])


def test_padded_positions_do_not_count():
    w = torch.tensor([0.25, 0.25, 0.25, 0.25, 0.0, 0.0])  # 4 real values + 2 padding
    x = torch.zeros(2, 6)
    x_hat = torch.zeros(2, 6)
    x_hat[:, 4:] = 100.0
    assert torch.equal(reconstruction_error(x_hat, x, w), torch.zeros(2))


def test_kl_warm_up_and_value():
    assert kl_weight(0, 0.5, 100) == 0.0 and kl_weight(50, 0.5, 100) == 0.25
    assert kl_weight(100, 0.5, 100) == kl_weight(10**6, 0.5, 100) == 0.5 and kl_weight(0, 0.5, 0) == 0.5
    mu, logvar = torch.zeros(3, 4), torch.zeros(3, 4)
    assert torch.equal(kl_divergence(mu, logvar), torch.zeros(3))  # posterior == prior
    assert torch.allclose(kl_divergence(torch.ones(1, 4), torch.zeros(1, 4)), torch.tensor([2.0]))
    terms = cvae_loss(torch.zeros(2, 3), torch.ones(2, 3), torch.ones(2, 4), torch.zeros(2, 4),
                      weights=torch.full((3,), 1 / 3), beta=0.5, offset=torch.tensor([0.1, 0.3]))
    assert torch.isclose(terms["recon"], torch.tensor(1.2)) and torch.isclose(terms["kl"], torch.tensor(2.0))
    assert torch.isclose(terms["loss"], torch.tensor(2.2))


def test_free_bits_leave_the_kl_below_the_floor_unpenalised_and_report_the_true_kl():
    """Per latent dimension, the batch-mean KL under ``free_bits`` costs free_bits (no gradient
    towards the prior: what lets the latent stay in use); above it, the plain KL."""
    x, weights = torch.ones(2, 3), torch.full((3,), 1 / 3)
    mu = torch.tensor([[0.1, 2.0], [0.1, 2.0]], requires_grad=True)  # KL per dim: 0.005, 2.0
    logvar = torch.zeros(2, 2)
    terms = cvae_loss(torch.ones(2, 3), x, mu, logvar, weights=weights, beta=1.0, free_bits=0.5)
    assert torch.isclose(terms["kl"], torch.tensor(2.005))  # reported: the true KL
    assert torch.isclose(terms["loss"], torch.tensor(0.5 + 2.0))  # penalised: max(KL_d, 0.5)
    terms["loss"].backward()
    assert mu.grad[:, 0].abs().max() == 0 and mu.grad[:, 1].abs().min() > 0
    plain = cvae_loss(torch.ones(2, 3), x, mu, logvar, weights=weights, beta=1.0)
    assert torch.isclose(plain["loss"], torch.tensor(2.005))


def test_conv_channels_follow_the_reference():
    spec = CVAESpec("conv1d", input_dim=4096, condition_dim=8, latent_dim=8, width=8)
    assert spec.conv_channels() == [8, 16, 32, 64, 128, 256, 256, 128, 64, 32, 16, 8]
    with pytest.raises(ValueError, match="multiple of"):
        build_network(CVAESpec("conv1d", input_dim=4000, condition_dim=8, latent_dim=8, width=8))


def test_film_starts_as_identity_and_then_depends_on_the_condition():
    torch.manual_seed(0)
    model = build_network(SPECS["mlp-film"])
    z, c = torch.zeros(2, 4), torch.randn(2, 6)
    assert torch.allclose(model.decode(z, c), model.decode(z, torch.zeros(2, 6)))  # FiLM zero-initialised
    for film in model.decoder.films:
        torch.nn.init.normal_(film.proj.weight)
    assert not torch.allclose(model.decode(z, c), model.decode(z, torch.zeros(2, 6)))


def _two_task_set(features: int, seed: int = 0) -> SampleSet:
    """Two tasks whose snapshots sit around different centres, each with 3 episode vectors."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(2, features, generator=g)
    inputs = torch.cat([centres[t] + 0.05 * torch.randn(4, features, generator=g) for t in range(2)])
    conditions = torch.cat([torch.full((3, 6), float(2 * t - 1)) + 0.1 * torch.randn(3, 6, generator=g)
                            for t in range(2)])
    return SampleSet(inputs, torch.zeros(8), torch.tensor([0] * 4 + [1] * 4), conditions,
                     torch.tensor([0, 3]), torch.tensor([3, 3]), ("a", "b"))


@pytest.mark.parametrize("name", ["mlp-concat", "mlp-film", "conv1d-concat"])
def test_training_fits_the_data_and_resumes_exactly(name, tmp_path):
    spec = SPECS[name]
    data = _two_task_set(spec.input_dim)
    weights = torch.full((spec.input_dim,), 1.0 / spec.input_dim)
    cfg = GeneratorConfig(steps=120, report_every=40, batch_size=16, lr=3e-3, beta=1e-4,
                          kl_warmup_steps=20)
    torch.manual_seed(0)
    model = build_network(spec)
    start = generation_mse(model, data, weights)
    saved = []
    def report(metrics, save):
        save(tmp_path / str(metrics["step"]))
        saved.append(metrics)

    result = fit_cvae(model, data, cfg, weights=weights, validation={"val": data}, report=report)
    assert [m["step"] for m in saved] == [40, 80, 120] and result.steps == 120
    assert result.final["val_mse"] == result.final["val_mse"] < start / 4  # finite, and learnt
    # Resuming from step 80 replays steps 81..120 exactly.
    torch.manual_seed(0)
    again = build_network(spec)
    fit_cvae(again, data, cfg, weights=weights, resume_state=load_checkpoint(tmp_path / "80"))
    for a, b in zip(model.state_dict().values(), again.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6)
