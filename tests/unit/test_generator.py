"""The generator: data preparation, training, sampling, the artifact, peft round trip, bad input.

Helpers here build small zoos: `synthetic_zoo` in memory (a LoRA-shaped layout, snapshots that
depend linearly on each task's condition), `write_zoo` as real peft files on disk (tiny-llama,
the same seeded initialisation for every task, like the zoo job). The integration test and the
benchmark import them.
"""

from __future__ import annotations

import warnings

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from icm.config import GeneratorConfig, ZooConfig, load_config
from icm.generator import LoraGenerator, train_generator
from icm.generator.data import Subspace, TensorNorm, WeightCodec, prepare_data, split_tasks
from icm.generator.inputs import (ConditionMismatchError, GeneratorInputError, ZooData, ZooInputError,
                                  compare_layouts, initial_lora_state, load_generator_inputs, load_zoo)
from icm.lora_io import LoraLayout
from tests.conftest import make_suite

pytestmark = pytest.mark.usefixtures("one_torch_thread")


LORA = ZooConfig(rank=4, alpha=8.0, dropout=0.0)
FAST = dict(steps=150, report_every=50, batch_size=32, width=64, depth=2, latent_dim=8, lr=3e-3,
            beta=1e-4, kl_warmup_steps=20, subspace_dim=16)


def synthetic_layout() -> LoraLayout:
    """tiny-llama's q/v LoRA layout at rank 4 (1,792 values)."""
    keys, shapes = [], []
    for layer in range(2):
        for module, out in (("q_proj", 64), ("v_proj", 32)):
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{module}"
            keys += [f"{prefix}.lora_A.weight", f"{prefix}.lora_B.weight"]
            shapes += [(4, 64), (out, 4)]
    return LoraLayout(tuple(keys), tuple(shapes))


def synthetic_weights(layout: LoraLayout, tasks, *, snapshots=6, dim=16, episodes=5, seed=0,
                      init: torch.Tensor | None = None):
    """Per task: a centre m_t (D,), episodes m_t + noise, and a trajectory init + s/S * W m_t."""
    g = torch.Generator().manual_seed(seed)
    mixing = torch.randn(layout.numel, dim, generator=g) * 0.05  # (L, D) condition -> weights
    init = torch.randn(layout.numel, generator=g) * 0.1 if init is None else init
    vectors, conditions = {}, {}
    for task in tasks:
        centre = torch.randn(dim, generator=g)
        delta = mixing @ centre  # (L,)
        vectors[task] = torch.stack([init + (s + 1) / snapshots * delta
                                     + 0.002 * torch.randn(layout.numel, generator=g)
                                     for s in range(snapshots)])  # (S, L)
        conditions[task] = (centre + 0.1 * torch.randn(episodes, dim, generator=g)).numpy()
    return vectors, conditions


def synthetic_zoo(tasks=("t0", "t1", "t2"), **kwargs) -> tuple[ZooData, dict[str, np.ndarray]]:
    layout = synthetic_layout()
    vectors, conditions = synthetic_weights(layout, tasks, **kwargs)
    zoo = ZooData(layout, vectors, "tiny-llama", {"peft_type": "LORA"}, LORA.model_dump(mode="json"))
    return zoo, conditions


def write_zoo(root: Path, tasks, *, snapshots=4, dim=16, episodes=4, multitask=True, seed=0):
    """A real zoo on disk (tiny-llama, peft files, manifest, zoo.json) + its task vectors."""
    from peft import set_peft_model_state_dict

    from icm.lora_io import unflatten
    from icm.lora_train import build_lora_model
    from icm.models import load_base_model
    from icm.zoo import check_or_create_zoo, write_manifest, write_snapshot, zoo_identity

    peft_model = build_lora_model(load_base_model("tiny-llama")[0], LORA)
    layout, init_state = initial_lora_state("tiny-llama", LORA.model_dump(mode="json"))
    init = torch.cat([init_state[k].reshape(-1) for k in layout.keys])
    vectors, conditions = synthetic_weights(layout, [*tasks, "multitask"], snapshots=snapshots,
                                            dim=dim, episodes=episodes, seed=seed, init=init)
    lora = LORA.model_dump(include={"rank", "alpha", "dropout", "target_modules", "init_seed"})
    check_or_create_zoo(root, zoo_identity("tiny-llama", lora, layout), layout)
    for task in [*tasks, "multitask"] if multitask else tasks:
        for s, vector in enumerate(vectors[task]):
            set_peft_model_state_dict(peft_model, unflatten(vector, layout))
            write_snapshot(peft_model, layout, root, task=task, step=10 * (s + 1),
                           record={"train_loss": 1.0, "eval_ppl": 2.0, "node_id": "test"})
    write_manifest(root)
    conditions.pop("multitask")
    return conditions


# ----------------------------------------------------------------------------- data


def test_subspace_loss_is_the_full_space_mse_including_the_residual():
    zoo, _ = synthetic_zoo(tasks=("a", "b", "c", "d"))
    x = torch.cat(list(zoo.vectors.values()))  # (24, L)
    norm = TensorNorm.fit(x, synthetic_layout().sizes)
    xn = norm.normalize(x)
    codec = WeightCodec(norm, Subspace.fit(xn, 5))  # 5 directions: most, not all, of the variance
    basis = codec.subspace.basis
    assert torch.allclose(basis @ basis.T, torch.eye(5), atol=1e-4)
    inputs, offsets = codec.encode_normalised(xn)  # (24, 5), (24,)
    assert offsets.min() > 0  # snapshots have parts outside the subspace
    guess = inputs + 0.3 * torch.randn_like(inputs)
    weighted = ((guess - inputs) ** 2 * codec.weights()).sum(1) + offsets
    full = ((norm.normalize(codec.decode(guess)) - xn) ** 2).mean(1)  # per-element MSE over L
    assert torch.allclose(weighted, full, rtol=1e-3)


def test_normalisation_is_per_tensor_and_guards_constant_tensors():
    x = torch.cat([torch.randn(3, 4) * 5 + 2, torch.zeros(3, 2)], dim=1)  # tensor 2 is all zero
    norm = TensorNorm.fit(x, [4, 2])
    xn = norm.normalize(x)
    assert torch.isfinite(xn).all() and norm.std[1] == 1.0
    assert abs(float(xn[:, :4].mean())) < 1e-5 and abs(float(xn[:, :4].std(unbiased=False)) - 1) < 1e-5
    assert torch.allclose(norm.denormalize(xn), x, atol=1e-5)


def test_validation_split_is_seeded_and_keeps_the_last_snapshots_out():
    zoo, conditions = synthetic_zoo(tasks=("a", "b", "c", "d", "e"))
    cfg = GeneratorConfig(**FAST, val_tasks=2, val_snapshots=2)
    split = split_tasks(zoo, cfg, validation=True)
    assert split == split_tasks(zoo, cfg, validation=True) and len(split.val_tasks) == 2
    assert sorted(split.train_tasks + split.val_tasks) == ["a", "b", "c", "d", "e"]
    data = prepare_data(zoo, conditions, cfg, validation=True)
    rep = data.representation(cfg)
    assert len(rep.train) == 3 * 4 and len(rep.validation["val_seen"]) == 3 * 2
    assert rep.validation["val_unseen"].tasks == split.val_tasks and len(rep.validation["val_unseen"]) == 12
    final = prepare_data(zoo, conditions, cfg, validation=False)
    assert len(final.representation(cfg).train) == 30 and final.split.val_tasks == ()


def test_validation_never_takes_a_task_an_evaluation_fold_holds_out():
    """The bug: Tune drew validation tasks from every zoo task, so with group folds it could
    select hyperparameters on the texts of a task a fold generator (with those hyperparameters)
    is then tested on."""
    from icm.generator.data import GeneratorInputError

    zoo, _ = synthetic_zoo(tasks=("a", "b", "c", "d", "e"))
    cfg = GeneratorConfig(**FAST, val_tasks=2, val_snapshots=1)
    everything = split_tasks(zoo, cfg, validation=True)
    assert split_tasks(zoo, cfg, validation=True, val_excluded=()) == everything  # unchanged
    for held in ([*everything.val_tasks], ["a", "b", "c"]):
        split = split_tasks(zoo, cfg, validation=True, val_excluded=held)
        assert len(split.val_tasks) == 2 and not set(split.val_tasks) & set(held)
        assert sorted(split.train_tasks + split.val_tasks) == ["a", "b", "c", "d", "e"]
    with pytest.raises(GeneratorInputError, match="generator.val_tasks=2, but only 1 .* evaluate.folds"):
        split_tasks(zoo, cfg, validation=True, val_excluded=["a", "b", "c", "d"])


def test_streamed_pca_finds_the_exact_principal_subspace():
    g = torch.Generator().manual_seed(0)
    scales = torch.tensor([8.0, 6.0, 4.0, 3.0, 2.0, 1.5])  # a decaying spectrum, then noise
    x = (torch.randn(60, 6, generator=g) * scales) @ torch.linalg.qr(torch.randn(900, 6, generator=g)).Q.T
    x = x + 0.05 * torch.randn(60, 900, generator=g) + 3.0  # (60, 900), off-centre
    exact = Subspace.fit(x, 4)
    streamed = Subspace.fit_streamed(lambda: iter(x.split(7)), 4)  # blocks of 7 rows, as tasks come
    assert torch.allclose(streamed.mean, exact.mean, atol=1e-5)
    overlap = torch.linalg.svdvals(streamed.basis @ exact.basis.T)  # cosines of principal angles
    assert overlap.min() > 0.999, overlap
    assert torch.allclose(streamed.scale, exact.scale, rtol=1e-3)
    assert torch.allclose(streamed.explained, exact.explained, rtol=1e-3)


def test_a_zoo_over_the_memory_budget_is_streamed_with_the_same_result():
    zoo, conditions = synthetic_zoo(tasks=("a", "b", "c", "d", "e"))
    reads = []

    class CountingVectors(dict):  # how often, and how much at once, preparation reads
        def __getitem__(self, task):
            reads.append(task)
            return super().__getitem__(task)

    zoo.vectors = CountingVectors(zoo.vectors)
    for arch, extra in (("mlp", {}), ("hyper", {"subspace_dim": None})):
        cfg = GeneratorConfig(**{**FAST, **extra}, arch=arch, val_tasks=1, val_snapshots=1)
        reads.clear()
        whole = prepare_data(zoo, conditions, cfg, validation=True)
        assert sorted(reads) == ["a", "b", "c", "d", "e"] and not whole.zoo_summary["streamed"]
        tiny = cfg.model_copy(update={"data_memory_mb": 0})  # 30 x 1,792 floats are over 0 MB
        reads.clear()
        streamed = prepare_data(zoo, conditions, tiny, validation=True)
        assert streamed.zoo_summary["streamed"] and len(reads) > 5  # one task at a time, per pass
        a, b = whole.representation(cfg), streamed.representation(tiny)
        assert torch.allclose(a.codec.norm.mean, b.codec.norm.mean, atol=1e-6)
        assert torch.allclose(a.codec.norm.std, b.codec.norm.std, rtol=1e-5)
        for name in ("val_seen", "val_unseen"):
            assert b.validation[name].tasks == a.validation[name].tasks
            assert b.baselines[f"{name}_mean_mse"] == pytest.approx(a.baselines[f"{name}_mean_mse"], rel=1e-3)
        if arch == "mlp":  # coefficients agree up to each direction's sign
            assert b.info["pca"] == "randomized, streamed" and a.info["pca"] == "exact"
            assert torch.allclose(b.train.inputs.abs(), a.train.inputs.abs(), atol=1e-2)
            assert b.info["train_residual_mse"] == pytest.approx(a.info["train_residual_mse"], rel=1e-2)
        else:  # flat inputs, in a memory-mapped scratch file, equal the in-memory ones
            assert torch.allclose(b.train.inputs, a.train.inputs, atol=1e-5)


def test_a_stored_snapshot_of_another_layout_is_named_when_read(disk_zoo, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    zoo_root, _ = disk_zoo
    copy = tmp_path / "zoo"
    shutil.copytree(zoo_root, copy)
    zoo = load_zoo(copy, include=["cats"])  # lazy: nothing read yet
    vector_file = next((copy / "tasks" / "cats").rglob("vector.safetensors"))
    save_file(load_file(vector_file), vector_file, metadata={"layout_fingerprint": "another"})
    with pytest.raises(ZooInputError, match="another key order or shapes"):
        zoo.vectors["cats"]


# ----------------------------------------------------------------------------- training + sampling


def test_cvae_overfits_one_task():
    zoo, conditions = synthetic_zoo(tasks=("solo",), snapshots=8)
    cfg = GeneratorConfig(**{**FAST, "report_every": 10, "steps": 300, "kl_warmup_steps": 100,
                             "beta": 1e-5, "subspace_dim": 8}, val_tasks=0, val_snapshots=0)
    history = train_generator(zoo, conditions, cfg).summary["history"]
    first, last = history[0]["train_recon"], history[-1]["train_recon"]
    assert last * 10 <= first, [round(h["train_recon"], 5) for h in history]


def test_task_vector_decides_the_adapter():
    zoo, conditions = synthetic_zoo(tasks=("a", "b", "c"))
    generator = train_generator(zoo, conditions, GeneratorConfig(**FAST, val_tasks=0, val_snapshots=0))
    means = np.stack([conditions[t].mean(0) for t in ("a", "b", "c")])  # (3, D)
    out = generator.sample(means, z="zero")  # (3, L)
    assert out.shape == (3, zoo.layout.numel)
    targets = torch.stack([zoo.vectors[t].mean(0) for t in ("a", "b", "c")])  # (3, L)
    distance = torch.cdist(out, targets)  # (generated, task)
    assert (distance.argmin(1) == torch.arange(3)).all(), distance  # each nearest its own task
    assert torch.cdist(out, out).fill_diagonal_(1.0).min() > 0.05 * targets.norm(dim=1).mean()


def test_sampling_shapes_seeds_and_zero_latent():
    zoo, conditions = synthetic_zoo()
    generator = train_generator(zoo, conditions, GeneratorConfig(**{**FAST, "steps": 20}, val_tasks=0,
                                                                 val_snapshots=0))
    c = conditions["t0"][:2]  # (2, D)
    draws = generator.sample(c, num_samples=3, seed=1)
    assert draws.shape == (6, zoo.layout.numel) and draws.dtype == torch.float32
    assert torch.equal(draws, generator.sample(c, num_samples=3, seed=1))
    assert not torch.equal(draws, generator.sample(c, num_samples=3, seed=2))
    zero = generator.sample(c[0], num_samples=2, z="zero", seed=5)  # (D,) input works too
    assert zero.shape == (2, zoo.layout.numel) and torch.equal(zero[0], zero[1])
    assert torch.allclose(zero[:1], generator.sample(c[:1], z="zero", seed=9), atol=1e-6)
    frozen = c.copy()
    frozen.flags.writeable = False  # as task vectors read from parquet arrive
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch warns on a non-writable array it would share
        assert torch.equal(generator.sample(frozen, num_samples=3, seed=1), draws)


def test_target_b_keeps_the_zoos_initial_a(tmp_path):
    layout, init_state = initial_lora_state("tiny-llama", LORA.model_dump(mode="json"))
    init = torch.cat([init_state[k].reshape(-1) for k in layout.keys])
    vectors, conditions = synthetic_weights(layout, ["a", "b"], init=init)
    zoo = ZooData(layout, vectors, "tiny-llama", {"peft_type": "LORA"})
    cfg = GeneratorConfig(**{**FAST, "steps": 30}, target="b", val_tasks=0, val_snapshots=0)
    with pytest.raises(GeneratorInputError, match="target=b"):
        train_generator(zoo, conditions, cfg)
    generator = train_generator(zoo, conditions, cfg, init_state=init_state)
    generator.save(tmp_path / "gen")
    loaded = LoraGenerator.load(tmp_path / "gen")
    state = loaded.state_dict(loaded.sample(conditions["a"][0], z="zero")[0])
    for key in layout.keys:
        if ".lora_A." in key:
            assert torch.equal(state[key], init_state[key])
        else:
            assert not torch.equal(state[key], init_state[key])  # B is generated (init B = 0)


# ----------------------------------------------------------------------------- artifact + peft


@pytest.fixture(scope="module")
def disk_zoo(tmp_path_factory):
    root = tmp_path_factory.mktemp("zoo")
    conditions = write_zoo(root / "zoo", ["cats", "code", "dogs", "sums"])
    return root / "zoo", conditions


def test_artifact_round_trip_to_a_peft_adapter(disk_zoo, tmp_path, tiny_llama):
    from peft import PeftModel

    from icm.lora_io import adapter_state_dict, flatten
    from icm.models import load_base_model

    zoo_root, conditions = disk_zoo
    zoo = load_zoo(zoo_root, exclude=("dogs",), model_spec="tiny-llama")
    assert sorted(zoo.vectors) == ["cats", "code", "sums"]  # no held-out task, no multitask LoRA
    generator = train_generator(zoo, conditions, GeneratorConfig(**{**FAST, "steps": 60}),
                                validation=True, condition_spec={"mode": "both"})
    generator.save(tmp_path / "generator")
    files = sorted(p.name for p in (tmp_path / "generator").iterdir())
    assert files == ["generator.json", "generator.safetensors"]
    meta = json.loads((tmp_path / "generator" / "generator.json").read_text())
    assert meta["model_spec"] == "tiny-llama" and meta["layout"]["keys"] == list(zoo.layout.keys)
    assert meta["condition_spec"] == {"mode": "both", "condition_dim": 16}
    assert meta["peft_config"]["r"] == 4 and len(meta["normalisation"]) == len(zoo.layout.keys)
    assert meta["size"]["zoo_adapter_bytes"] == zoo.adapter_bytes > 0 and meta["size"]["generator_bytes"] > 0
    training = meta["training"]
    assert training["trained_on"]["validation_tasks"] and training["final"]["val_unseen_mse"] > 0

    loaded = LoraGenerator.load(tmp_path / "generator")
    vector = loaded.sample(conditions["cats"], num_samples=1, seed=3)[0]  # (L,)
    assert torch.equal(vector, generator.sample(conditions["cats"], seed=3)[0])
    out = loaded.write_adapter(vector, tmp_path / "adapter", extra={"request.json": {"task": "cats"}})
    assert json.loads((out / "request.json").read_text()) == {"task": "cats"}
    assert json.loads((out / "generation.json").read_text())["model_spec"] == "tiny-llama"
    base, tokenizer = load_base_model("tiny-llama")
    ids = tokenizer("The cat sat on the mat.", return_tensors="pt")
    with torch.inference_mode():
        base_logits = base(**ids).logits
        adapted = PeftModel.from_pretrained(base, str(out)).eval()
        logits = adapted(**ids).logits
    assert torch.equal(flatten(adapter_state_dict(adapted), zoo.layout), vector)
    assert not torch.allclose(logits, base_logits)


def test_held_out_tasks_never_reach_generator_training(disk_zoo, tmp_path):
    zoo_root, conditions = disk_zoo
    suite = make_suite(tmp_path / "suite")  # "dogs" is held out; the zoo has snapshots of it anyway
    root = zoo_root.parent
    cfg = load_config("smoke", [f"storage.root={root}", "zoo.rank=4", "zoo.alpha=8.0", "zoo.dropout=0.0",
                                "generator.val_tasks=1", "generator.subspace_dim=8"])
    from icm.tasks import load_suite

    asked = {}

    def loader(stage_dir, **kwargs):  # the task-vector stage has vectors of every task
        asked.update(kwargs)
        return conditions

    inputs = load_generator_inputs(cfg, load_suite(suite), load_conditions=loader)
    assert "dogs" not in asked["tasks"] and "dogs" not in inputs.conditions
    assert sorted(inputs.zoo.vectors) == ["cats", "code", "sums"]
    data = prepare_data(inputs.zoo, {**inputs.conditions, "dogs": conditions["dogs"]}, cfg.generator,
                        validation=True)
    seen = set(data.split.train_tasks) | set(data.split.val_tasks) | set(data.task_means)
    rep = data.representation(cfg.generator)
    seen |= {t for s in [rep.train, *rep.validation.values()] for t in s.tasks}
    assert seen == {"cats", "code", "sums"}


# ----------------------------------------------------------------------------- bad input


def test_condition_size_mismatch_is_named():
    zoo, conditions = synthetic_zoo()
    generator = train_generator(zoo, conditions, GeneratorConfig(**{**FAST, "steps": 5}, val_tasks=0,
                                                                 val_snapshots=0))
    with pytest.raises(ConditionMismatchError, match=r"\(N, 16\) task vectors"):
        generator.sample(np.zeros((2, 12), np.float32))
    with pytest.raises(ConditionMismatchError, match="NaN"):
        generator.sample(np.full(16, np.nan, np.float32))
    bad = {**conditions, "t1": conditions["t1"][:, :8]}
    with pytest.raises(ConditionMismatchError, match="differ in size"):
        train_generator(zoo, bad, GeneratorConfig(**FAST))
    with pytest.raises(ConditionMismatchError, match=r"no task vectors for zoo task\(s\) \['t2'\]"):
        train_generator(zoo, {k: v for k, v in conditions.items() if k != "t2"}, GeneratorConfig(**FAST))


def test_empty_zoo_and_impossible_splits_are_named(tmp_path):
    zoo, conditions = synthetic_zoo()
    with pytest.raises(ZooInputError, match="empty"):
        train_generator(ZooData(zoo.layout, {}, "tiny-llama", {}), conditions, GeneratorConfig(**FAST))
    with pytest.raises(ZooInputError, match="no LoRA zoo"):
        load_zoo(tmp_path / "nothing")
    with pytest.raises(GeneratorInputError, match="generator.val_tasks=3"):
        train_generator(zoo, conditions, GeneratorConfig(**FAST, val_tasks=3), validation=True)
    with pytest.raises(GeneratorInputError, match="generator.val_snapshots=6"):
        train_generator(zoo, conditions, GeneratorConfig(**FAST, val_snapshots=6), validation=True)


def test_zoo_from_another_base_model_or_key_order_is_named(disk_zoo, tmp_path):
    zoo_root, _ = disk_zoo
    with pytest.raises(ZooInputError, match="model.spec.*'tiny-llama'.*'smollm2-135m'"):
        load_zoo(zoo_root, model_spec="smollm2-135m")
    layout = LoraLayout.load(zoo_root / "lora_layout.json")
    swapped = LoraLayout((layout.keys[1], layout.keys[0], *layout.keys[2:]),
                         (layout.shapes[1], layout.shapes[0], *layout.shapes[2:]))
    assert "key order differs at position 0" in compare_layouts(layout, swapped)
    with pytest.raises(ZooInputError, match="key order differs"):
        load_zoo(zoo_root, layout=swapped)
    smaller = LoraLayout(layout.keys, ((2, 64), *layout.shapes[1:]))
    assert "has shape [2, 64], expected [4, 64]" in compare_layouts(layout, smaller)
    # a config whose zoo settings differ from the recorded zoo is refused before anything loads
    cfg = load_config("smoke", [f"storage.root={zoo_root.parent}", "zoo.rank=8", "zoo.alpha=8.0",
                                "zoo.dropout=0.0"])
    from icm.tasks import load_suite

    with pytest.raises(ZooInputError, match="zoo.rank: zoo has 4, config 8"):
        load_generator_inputs(cfg, load_suite(make_suite(tmp_path / "suite")), load_conditions=dict)


def test_missing_task_vectors_are_named(disk_zoo, tmp_path):
    from icm.tasks import load_suite

    zoo_root, _ = disk_zoo
    cfg = load_config("smoke", [f"storage.root={zoo_root.parent}", "zoo.rank=4", "zoo.alpha=8.0",
                                "zoo.dropout=0.0"])
    with pytest.raises(ConditionMismatchError, match="no task vectors at .*icm task-vectors"):
        load_generator_inputs(cfg, load_suite(make_suite(tmp_path / "suite")))
