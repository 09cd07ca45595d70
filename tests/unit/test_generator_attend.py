"""The attending hypernetwork (generator.arch=hyper-attn) over a condition of J prompt spans
(task_vectors pooling `chunks`): it starts as `hyper`, its modules read the spans by attention,
it round-trips as an artifact, and a condition it cannot read is a config error."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from icm.config import GeneratorConfig, PipelineConfig
from icm.generator import LoraGenerator, train_generator
from icm.generator.archs import ARCHITECTURES, build_network
from icm.generator.hyper import module_segments
from icm.generator.networks import CVAESpec
from tests.unit.test_generator import FAST, synthetic_layout, synthetic_zoo

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ATTEND = {**FAST, "arch": "hyper-attn", "subspace_dim": None, "width": 32, "embedding_dim": 8,
          "lr": 3e-3, "beta": 1e-2, "condition_pooling": "chunks"}
CHUNKS = {"pooling": "chunks", "task_vectors": {"chunks": 4}}  # what the task_vectors stage records


def _spec(arch: str, tokens: int = 4) -> CVAESpec:
    layout = synthetic_layout()
    return CVAESpec(arch, input_dim=layout.numel, condition_dim=4 * 6, latent_dim=4, width=16,
                    segments=module_segments(layout.keys, layout.sizes), embedding_dim=4,
                    condition_tokens=tokens)


def test_untrained_it_is_hyper_exactly_and_every_part_learns():
    """Its read of the spans starts at zero: with the same seed it emits what `hyper` emits.
    After one step on a loss, the attention's queries and keys get gradients too."""
    torch.manual_seed(0)
    hyper = build_network(_spec("hyper", tokens=1))
    torch.manual_seed(0)
    attend = build_network(_spec("hyper-attn"))
    x, c, z = torch.randn(3, hyper.spec.input_dim), torch.randn(3, 24), torch.randn(3, 4)
    assert torch.equal(hyper.decode(z, c), attend.decode(z, c))
    weights = attend.attention(0, c)  # (B, M_t, J)
    assert weights.shape == (3, 2, 4) and torch.allclose(weights.sum(-1), torch.ones(3, 2))
    optimizer = torch.optim.SGD(attend.parameters(), lr=0.1)
    for _ in range(2):
        optimizer.zero_grad()
        attend(x, c, z)[0].square().sum().backward()
        optimizer.step()
    assert all(p.grad is not None and p.grad.abs().sum() > 0
               for p in (attend.queries.weight, attend.keys.weight, attend.values.weight))
    assert not torch.equal(hyper.decode(z, c), attend.decode(z, c))


def test_a_condition_without_spans_is_refused_with_the_fix():
    with pytest.raises(ValueError, match="condition_pooling=chunks"):
        build_network(_spec("hyper-attn", tokens=1))
    with pytest.raises(ValueError, match="Fix: set generator.condition_pooling=chunks"):
        GeneratorConfig(arch="hyper-attn")
    with pytest.raises(ValueError, match="must be among task_vectors.layers"):
        PipelineConfig.model_validate({"generator": {"arch": "hyper-attn", "condition_pooling": "chunks"}})
    with pytest.raises(ValueError, match="drop them from tune.archs"):
        PipelineConfig.model_validate({"tune": {"archs": ["hyper", "hyper-attn"]}})
    ok = PipelineConfig.model_validate({"generator": {"arch": "hyper-attn", "condition_pooling": "chunks"},
                                        "task_vectors": {"poolings": ["mean", "chunks"]}})
    assert ok.generator.arch in ARCHITECTURES and ARCHITECTURES["hyper-attn"].reads_chunks


def test_trained_on_spans_it_reproduces_tasks_and_round_trips(tmp_path):
    """On a zoo whose conditions are 4 spans of 4 (16 values), it reproduces each training
    task's adapter from its condition, saves the span count with the network and loads it back."""
    zoo, conditions = synthetic_zoo(tuple(f"t{i}" for i in range(6)), dim=16, snapshots=3)
    cfg = GeneratorConfig(**{**ATTEND, "steps": 300}, val_tasks=0, val_snapshots=0)
    generator = train_generator(zoo, conditions, cfg, condition_spec=CHUNKS)
    assert generator.model.spec.condition_tokens == 4
    means = np.stack([conditions[t].mean(0) for t in sorted(conditions)])
    out = generator.sample(means, z="zero")  # (6, L)
    targets = torch.stack([zoo.vectors[t].mean(0) for t in sorted(conditions)])
    assert (torch.cdist(out, targets).argmin(1) == torch.arange(6)).all()
    assert generator.model.read.weight.abs().sum() > 0  # the attention path was used
    generator.save(tmp_path / "gen")
    again = LoraGenerator.load(tmp_path / "gen")
    assert again.model.spec.condition_tokens == 4
    assert torch.equal(generator.sample(means, z="zero"), again.sample(means, z="zero"))


def _span_config(root, chunks: int, poolings=("mean", "chunks")) -> PipelineConfig:
    return PipelineConfig.model_validate({
        "storage": {"root": str(root)}, "task_vectors": {"poolings": list(poolings), "chunks": chunks},
        "generator": {"arch": "hyper-attn", "condition_pooling": "chunks"}})


def test_vectors_cut_into_other_spans_than_configured_are_refused(tmp_path):
    """A generator must split each condition where the stage cut it: task vectors pooled into 8
    spans, read with task_vectors.chunks=4, would train on wrong 'tokens' of 2 x D unnoticed."""
    import yaml

    from icm.generator.inputs import ConditionMismatchError, condition_spec_of

    made = _span_config(tmp_path, 8)
    folder = made.storage.path("task_vectors")
    folder.mkdir(parents=True)
    (folder / "config.resolved.yaml").write_text(yaml.safe_dump(made.model_dump(mode="json")))
    assert condition_spec_of(made)["task_vectors"]["chunks"] == 8
    with pytest.raises(ConditionMismatchError, match="chunks=8 spans, the config says 4. Fix: set task_vectors.chunks=8"):
        condition_spec_of(_span_config(tmp_path, 4))


def test_the_span_count_changes_no_hash_where_no_pooling_reads_it(tmp_path):
    """Stages finished before pooling `chunks` existed (evaluate hashes the task_vectors section)
    keep their fingerprint; where a pooling reads it, it is part of the hash."""
    from icm.io import sha256_json

    plain = PipelineConfig.model_validate({"storage": {"root": str(tmp_path)}})
    before = plain.model_dump(mode="json")
    del before["task_vectors"]["chunks"]  # the config as it was before the field existed
    for name in ("baseline_pooling", *plain.evaluate.FINETUNE_FIELDS):  # (and evaluate's unread)
        del before["evaluate"][name]
    assert plain.fingerprint("model", "evaluate", "task_vectors") == sha256_json(
        {k: before[k] for k in ("model", "evaluate", "task_vectors")})
    other = plain.model_copy(update={"task_vectors": plain.task_vectors.model_copy(update={"chunks": 4})})
    assert other.fingerprint("task_vectors") == plain.fingerprint("task_vectors")
    assert _span_config(tmp_path, 4).fingerprint("task_vectors") != _span_config(tmp_path, 8).fingerprint("task_vectors")
