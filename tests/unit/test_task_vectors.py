"""Task vectors without Ray: prompts, episodes, pooling, padding, bad input, loaders, metrics."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from icm.config import TaskVectorConfig
from icm.errors import InputError
from icm.task_vector_report import combo_metrics, compute_task_means, nearest_training_tasks
from icm.task_vectors import (MODES, PROMPT_TEMPLATE, TaskEncoder, TaskVectorExtractor,
                              TaskVectorInputError, build_episodes, format_prompt,
                              load_episode_vectors, load_task_means, split_last_block,
                              template_text)
from icm.tasks import SuiteError, load_suite, load_task, write_task
from tests.conftest import TINY_TASKS, make_suite

CFG = TaskVectorConfig(k=3, episodes=4, layers=[1, -1], poolings=["mean", "last"], batch_size=4,
                       max_prompt_tokens=256)
CUE = PROMPT_TEMPLATE["cue"]


@pytest.fixture
def suite(tmp_path):
    return load_suite(make_suite(tmp_path / "suite"))


@pytest.fixture(scope="module")
def encoder(tiny_llama):
    model, tokenizer = tiny_llama
    return TaskEncoder(model, tokenizer, CFG)


def _task(tmp_path: Path, train: list[str], name: str = "small") -> object:
    write_task(tmp_path / name, name=name, description="A small task.", group="g", source="tests",
               license="CC0-1.0", train=train, eval=["an eval text"])
    return load_task(tmp_path / name)


# ----------------------------------------------------------------------------- prompts, episodes


def test_format_prompt_holds_exactly_the_parts_of_its_mode():
    prompts = {mode: format_prompt("About cats.", ["cat one", "cat two"], mode=mode) for mode in MODES}
    assert prompts["description"] == "Task: About cats.\n\nText:"
    assert prompts["demos"] == "Text: cat one\n\nText: cat two\n\nText:"
    assert prompts["both"] == "Task: About cats.\n\n" + prompts["demos"]
    assert all(p.endswith(CUE) for p in prompts.values())
    saved = template_text()
    assert all(repr(block) in saved for block in PROMPT_TEMPLATE.values())
    assert "mode both" in saved and "DEMO 2" in saved


@pytest.mark.parametrize("description, demos, mode, field", [
    ("  ", [], "description", "description"),
    (None, ["a"], "both", "description"),
    ("d", [], "demos", "examples"),
    ("d", ["ok", " \n"], "both", "examples[1]"),
    ("d", ["ok"], "summary", "task_vectors.modes"),
])
def test_format_prompt_rejects_missing_or_empty_parts(description, demos, mode, field):
    with pytest.raises(TaskVectorInputError, match=re.escape(f"field '{field}'")) as err:
        format_prompt(description, demos, mode=mode)
    assert isinstance(err.value, InputError) and "Fix:" in str(err.value)


def test_episodes_are_seeded_and_drawn_from_the_train_split_only(suite):
    task = suite.tasks["cats"]
    first = build_episodes(task, CFG, mode="both")
    assert first == build_episodes(task, CFG, mode="both")  # same seed, same episodes
    other_seed = build_episodes(task, CFG.model_copy(update={"seed": 1}), mode="both")
    assert [e.demos for e in other_seed] != [e.demos for e in first]
    train, evaluation = set(task.train_texts()), set(task.eval_texts())
    assert [e.episode for e in first] == list(range(CFG.episodes))
    for episode in first:
        assert episode.task == "cats" and episode.mode == "both" and episode.n_demos == CFG.k
        assert set(episode.demos) <= train and not set(episode.demos) & evaluation
        assert len(set(episode.demos)) == CFG.k  # sampled without replacement
        assert episode.prompt == format_prompt(task.description, episode.demos, mode="both")
    assert len({e.demos for e in first}) > 1  # episodes differ
    # "demos" and "both" draw the same texts per episode: they differ only by the description
    assert [e.demos for e in build_episodes(task, CFG, mode="demos")] == [e.demos for e in first]
    described = build_episodes(task, CFG, mode="description")
    assert {e.prompt for e in described} == {f"Task: {task.description}\n\nText:"}
    assert all(e.n_demos == 0 for e in described)


def test_heldout_task_gets_episodes_from_its_own_train_split(suite):
    assert suite.is_heldout("dogs")
    episodes = build_episodes(suite.tasks["dogs"], CFG, mode="demos")
    assert all(set(e.demos) <= set(TINY_TASKS["dogs"][1]) for e in episodes)


def test_demonstrations_are_clipped_to_max_demo_chars(tmp_path):
    task = _task(tmp_path, ["x" * 500] * 4)
    cfg = CFG.model_copy(update={"max_demo_chars": 40})
    assert all(len(d) == 40 for e in build_episodes(task, cfg, mode="demos") for d in e.demos)


def test_fewer_train_texts_than_k_uses_all_of_them_with_a_warning(tmp_path, caplog):
    task = _task(tmp_path, ["only one text", "and a second"])
    with caplog.at_level(logging.WARNING, logger="icm.task_vectors"):
        episodes = build_episodes(task, CFG.model_copy(update={"k": 5}), mode="both")
    assert all(e.n_demos == 2 and set(e.demos) == {"only one text", "and a second"} for e in episodes)
    assert "task 'small'" in caplog.text and "task_vectors.k=5" in caplog.text


def test_task_without_train_texts_is_a_clear_error_for_demonstration_modes(tmp_path):
    task = _task(tmp_path, [])
    with pytest.raises(TaskVectorInputError, match="task 'small', field 'train.jsonl'"):
        build_episodes(task, CFG, mode="demos")
    assert len(build_episodes(task, CFG, mode="description")) == CFG.episodes  # needs no texts


def test_empty_train_text_is_reported_with_its_line(tmp_path):
    task = _task(tmp_path, ["fine"])
    (task.path / "train.jsonl").write_text('{"text": "fine"}\n{"text": "   "}\n')
    with pytest.raises(SuiteError, match="task 'small'.*line 2.*field 'text'"):
        build_episodes(task, CFG, mode="demos")


# ----------------------------------------------------------------------------- encoding


def test_encode_prompts_gives_one_float32_row_per_prompt_and_key(encoder):
    prompts = [format_prompt("About cats.", [], mode="description"), "Text: a\n\nText:"]
    vectors = encoder.encode_prompts(prompts)
    assert sorted(vectors) == sorted([(1, "mean"), (1, "last"), (-1, "mean"), (-1, "last")])
    for matrix in vectors.values():
        assert matrix.shape == (2, 64) and matrix.dtype == np.float32 and np.isfinite(matrix).all()
    assert not np.allclose(vectors[(-1, "mean")], vectors[(-1, "last")])
    assert not np.allclose(vectors[(1, "mean")], vectors[(-1, "mean")])


def test_pooling_is_the_mean_after_the_start_token_and_the_last_token(encoder, tiny_llama):
    model, tokenizer = tiny_llama
    prompt = "Text: The cat sat on the mat.\n\nText:"
    ids = torch.tensor([[encoder.start_id, *tokenizer(prompt, add_special_tokens=False)["input_ids"]]])
    with torch.inference_mode():
        hidden = model(input_ids=ids, output_hidden_states=True).hidden_states  # 3 x (1, T, 64)
    vectors = encoder.encode_prompts([prompt])
    for layer in (1, -1):
        np.testing.assert_allclose(vectors[(layer, "mean")][0], hidden[layer][0, 1:].mean(0).numpy(),
                                   rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(vectors[(layer, "last")][0], hidden[layer][0, -1].numpy(),
                                   rtol=1e-5, atol=1e-6)


def test_padding_and_batch_company_do_not_change_a_prompts_vector(encoder, suite):
    prompts = [e.prompt for name in ("cats", "sums", "code") for mode in MODES
               for e in build_episodes(suite.tasks[name], CFG, mode=mode)[:2]]
    assert len({encoder.count_tokens(p) for p in prompts}) > 3  # really different lengths
    batched = encoder.encode_prompts(prompts)
    reversed_ = encoder.encode_prompts(prompts[::-1])
    for index, prompt in enumerate(prompts):
        alone = encoder.encode_prompts([prompt])
        for key in batched:
            np.testing.assert_allclose(batched[key][index], alone[key][0], rtol=1e-4, atol=1e-5)
            np.testing.assert_allclose(reversed_[key][len(prompts) - 1 - index], alone[key][0],
                                       rtol=1e-4, atol=1e-5)


def test_single_request_takes_the_same_path_as_the_batch_job(encoder, suite):
    task = suite.tasks["cats"]
    episode = encoder.fit_episode(build_episodes(task, CFG, mode="both")[1])
    batch = encoder.encode_prompts([encoder.fit_episode(e).prompt
                                    for e in build_episodes(task, CFG, mode="both")])
    single = encoder.encode(description=task.description, examples=list(episode.demos))
    for key, vector in single.items():
        assert vector.shape == (64,)
        np.testing.assert_allclose(vector, batch[key][1], rtol=1e-4, atol=1e-5)
    described = encoder.encode(description=task.description)
    job_described = encoder.encode_prompts([build_episodes(task, CFG, mode="description")[0].prompt])
    np.testing.assert_allclose(described[(-1, "mean")], job_described[(-1, "mean")][0], rtol=1e-4, atol=1e-5)
    demos_only = encoder.encode(examples=list(episode.demos))
    assert not np.allclose(demos_only[(-1, "mean")], single[(-1, "mean")])
    extra = encoder.encode(examples=[*episode.demos, "one example more than k"])  # first k used
    np.testing.assert_array_equal(extra[(-1, "mean")], demos_only[(-1, "mean")])


@pytest.mark.parametrize("kwargs, field", [
    ({}, "description"), ({"description": " "}, "description"),
    ({"examples": ["fine", ""]}, "examples[1]"), ({"description": None, "examples": []}, "description"),
])
def test_single_request_bad_input_is_a_clear_error(encoder, kwargs, field):
    with pytest.raises(TaskVectorInputError, match=re.escape(f"field '{field}'")):
        encoder.encode(**kwargs)


def test_empty_raw_prompt_is_a_clear_error(encoder):
    with pytest.raises(TaskVectorInputError, match=r"field 'prompts\[1\]'"):
        encoder.encode_prompts(["Text: fine", ""])


def test_same_model_same_seed_gives_identical_vectors(tiny_llama, suite):
    from icm.models import load_base_model

    prompts = [e.prompt for e in build_episodes(suite.tasks["code"], CFG, mode="both")]
    first = TaskEncoder(*tiny_llama, CFG).encode_prompts(prompts)
    second = TaskEncoder(*load_base_model("tiny-llama"), CFG).encode_prompts(prompts)
    for key in first:
        np.testing.assert_array_equal(first[key], second[key])


def test_extractor_maps_a_batch_to_one_row_per_layer_and_pooling(suite):
    extractor = TaskVectorExtractor("tiny-llama", None, CFG.model_dump(mode="json"))
    prompts = [e.prompt for e in build_episodes(suite.tasks["sums"], CFG, mode="demos")]
    batch = {"task": np.array(["sums"] * 4, object), "episode": np.arange(4), "prompt": np.array(prompts, object)}
    out = extractor(batch)
    assert set(out) == {"task", "episode", "layer", "pooling", "vector"}
    assert out["vector"].shape == (16, 64) and out["vector"].dtype == np.float32
    assert sorted(zip(out["layer"], out["pooling"], out["episode"])) == sorted(
        (layer, pooling, e) for layer in (1, -1) for pooling in ("mean", "last") for e in range(4))
    expected = extractor.encoder.encode_prompts(prompts)
    for row in range(16):
        key = (int(out["layer"][row]), out["pooling"][row])
        np.testing.assert_array_equal(out["vector"][row], expected[key][out["episode"][row]])


# ----------------------------------------------------------------------------- budget and context


def test_long_prompt_drops_demonstrations_then_cuts_text_with_a_warning(tiny_llama, caplog):
    encoder = TaskEncoder(*tiny_llama, CFG.model_copy(update={"max_prompt_tokens": 48}))
    demos = [f"demonstration number {i} " * 4 for i in range(3)]
    with caplog.at_level(logging.WARNING, logger="icm.task_vectors"):
        fitted = encoder.fit_prompt("A task.", demos, mode="both", label="task 't'")
    assert fitted.truncated and 1 <= fitted.n_demos < 3 and fitted.n_tokens <= 48
    assert fitted.n_tokens == encoder.count_tokens(fitted.prompt) and fitted.prompt.endswith(CUE)
    assert "task 't'" in caplog.text and "max_prompt_tokens=48" in caplog.text
    cut = encoder.fit_prompt("word " * 500, [], mode="description")
    assert cut.truncated and cut.n_tokens <= 48 and cut.prompt.startswith("Task: word")
    assert cut.prompt.endswith("\n\n" + CUE)
    short = encoder.fit_prompt("A task.", demos[:1], mode="both")
    assert not short.truncated and short.prompt == format_prompt("A task.", demos[:1], mode="both")


def test_prompt_longer_than_the_model_context_is_fitted_not_a_torch_crash(tiny_llama, tmp_path):
    model, tokenizer = tiny_llama
    context = model.config.max_position_embeddings  # 2048
    cfg = CFG.model_copy(update={"max_prompt_tokens": context, "max_demo_chars": 40_000, "k": 2})
    encoder = TaskEncoder(model, tokenizer, cfg)
    task = _task(tmp_path, [" ".join(f"w{i}" for i in range(3000)), " ".join(f"v{i}" for i in range(3000))])
    episode = encoder.fit_episode(build_episodes(task, cfg, mode="both")[0])
    assert encoder.count_tokens(format_prompt(task.description, task.train_texts(), mode="both")) > context
    assert episode.truncated and episode.n_demos == 1 and episode.n_tokens <= context
    vectors = encoder.encode_prompts([episode.prompt])
    assert all(np.isfinite(v).all() for v in vectors.values())
    raw = encoder.encode_prompts(["Text: " + "w " * 5000])  # raw prompts are cut, not crashed on
    assert all(np.isfinite(v).all() for v in raw.values())


def test_token_budget_beyond_the_model_context_is_a_config_error(tiny_llama):
    with pytest.raises(TaskVectorInputError, match="field 'task_vectors.max_prompt_tokens'.*2048"):
        TaskEncoder(*tiny_llama, CFG.model_copy(update={"max_prompt_tokens": 4096}))


@pytest.mark.parametrize("layers", [[3], [-4], [2, -1]])
def test_layers_must_exist_once(tiny_llama, layers):
    with pytest.raises(TaskVectorInputError, match="field 'task_vectors.layers'"):
        TaskEncoder(*tiny_llama, CFG.model_copy(update={"layers": layers}))


# ----------------------------------------------------------------------------- outputs and metrics


def _write_vectors(folder: Path, rows: list[dict]) -> None:
    folder.mkdir(parents=True)
    table = pa.table({**{k: [r[k] for r in rows] for k in rows[0] if k != "vector"},
                      "vector": pa.array([r["vector"] for r in rows], pa.list_(pa.float32()))})
    half = len(rows) // 2  # two files, rows out of order: readers must not rely on either
    pq.write_table(table.slice(half), folder / "b.parquet")
    pq.write_table(table.slice(0, half), folder / "a.parquet")


def _synthetic_stage(tmp_path: Path) -> tuple[Path, dict]:
    """Two well-separated groups of 3 tasks (one held out each), 5 episodes per task."""
    rng = np.random.default_rng(0)
    centres = {"a": np.array([5.0, 0, 0, 0]), "b": np.array([0, 5.0, 0, 0])}
    tasks = {"a1": ("a", False), "a2": ("a", False), "a3": ("a", True),
             "b1": ("b", False), "b2": ("b", False), "b3": ("b", True)}
    rows, truth = [], {}
    for task, (group, heldout) in tasks.items():
        vectors = (centres[group] + rng.normal(0, 0.3, (5, 4))).astype(np.float32)
        truth[task] = vectors
        for episode in [3, 0, 4, 1, 2]:
            rows.append({"task": task, "group": group, "heldout": heldout, "episode": episode,
                         "mode": "both", "layer": -1, "pooling": "mean", "vector": vectors[episode]})
    stage_dir = tmp_path / "task_vectors"
    _write_vectors(stage_dir / "vectors" / "shard-00000", rows)
    means = compute_task_means(stage_dir / "vectors", batch_rows=7)  # batches split tasks
    means.to_parquet(stage_dir / "task_means.parquet", index=False)
    return stage_dir, truth


def test_episode_vectors_means_and_loaders_round_trip(tmp_path):
    stage_dir, truth = _synthetic_stage(tmp_path)
    loaded = load_episode_vectors(stage_dir, mode="both", layer=-1, pooling="mean")
    assert sorted(loaded) == sorted(truth)
    for task, vectors in truth.items():
        np.testing.assert_array_equal(loaded[task], vectors)  # episodes in index order
    means = load_task_means(stage_dir, mode="both", layer=-1, pooling="mean", tasks=["a1", "b3"])
    assert sorted(means) == ["a1", "b3"]
    np.testing.assert_allclose(means["b3"], truth["b3"].mean(0), rtol=1e-6)
    assert means["b3"].dtype == np.float32
    with pytest.raises(TaskVectorInputError, match="no vectors for mode='demos'"):
        load_episode_vectors(stage_dir, mode="demos", layer=-1, pooling="mean")
    with pytest.raises(TaskVectorInputError, match=r"task\(s\) \['nope'\]"):
        load_task_means(stage_dir, mode="both", layer=-1, pooling="mean", tasks=["a1", "nope"])


def test_metrics_find_separated_groups_and_neighbours_among_training_tasks(tmp_path):
    stage_dir, truth = _synthetic_stage(tmp_path)
    means = pd.read_parquet(stage_dir / "task_means.parquet")
    metrics = combo_metrics(means, truth)
    assert metrics["silhouette"] > 0.8 and metrics["silhouette_episodes"] > 0.8
    assert metrics["heldout_tasks"] == 2 and metrics["heldout_nearest_same_group"] == 1.0
    nearest = metrics["nearest_training_task"]
    assert set(nearest) == {"a3", "b3"} and nearest["a3"] in {"a1", "a2"} and nearest["b3"] in {"b1", "b2"}
    # Swap the groups of the held-out tasks: now no neighbour is in the own group.
    swapped = means.assign(group=np.where(means["task"] == "a3", "b",
                                          np.where(means["task"] == "b3", "a", means["group"])))
    assert combo_metrics(swapped)["heldout_nearest_same_group"] == 0.0
    assert nearest_training_tasks(means[~means["heldout"]], np.zeros(4)) == {}


# ----------------------------------------------------------------------------- pooling "chunks"


@pytest.mark.parametrize("length, chunks", [(17, 4), (10, 3), (3, 4), (2, 8)])
def test_chunk_spans_tile_the_prompt_body_and_none_is_empty(length, chunks):
    from icm.task_vectors import chunk_weights

    weights = chunk_weights(torch.tensor([length, 2]), chunks, width=length + 3)[0]  # (J, T)
    inside = weights > 0
    assert not inside[:, 0].any() and not inside[:, length:].any()  # text-start and padding out
    assert inside.any(1).all() and torch.allclose(weights.sum(1), torch.ones(chunks))
    first = inside.float().argmax(1)
    assert (first.diff() >= 0).all()  # spans in prompt order, each contiguous
    assert all(int(row.sum()) == int(row.nonzero().max() - row.nonzero().min() + 1) for row in inside)
    if length - 1 >= chunks:  # enough tokens: every body token in exactly one span
        assert torch.equal(inside[:, 1:length].sum(0), torch.ones(length - 1, dtype=torch.long))


def test_chunks_pooling_is_the_mean_pooling_split_into_spans(tiny_llama, suite):
    """Each prompt's J span means, weighted by span length, give back its mean pooling: the spans
    cover the same tokens (text-start left out), whatever the batch's padding."""
    cfg = CFG.model_copy(update={"poolings": ["mean", "chunks"], "chunks": 4})
    encoder = TaskEncoder(*tiny_llama, cfg)
    prompts = [e.prompt for e in build_episodes(suite.tasks["code"], cfg, mode="both")] + ["Text: a b c d e"]
    vectors = encoder.encode_prompts(prompts)
    lengths = torch.tensor([len(ids) for ids in encoder._prompt_ids(prompts)[0]])
    from icm.task_vectors import chunk_weights

    span_sizes = (chunk_weights(lengths, 4, int(lengths.max())) > 0).sum(-1).numpy()  # (N, J)
    for layer in cfg.layers:
        spans = vectors[(layer, "chunks")].reshape(len(prompts), 4, -1)  # (N, J, D)
        assert vectors[(layer, "chunks")].shape == (len(prompts), 4 * 64)
        weighted = (spans * span_sizes[..., None]).sum(1) / span_sizes.sum(1, keepdims=True)
        np.testing.assert_allclose(weighted, vectors[(layer, "mean")], rtol=1e-4, atol=1e-5)
        assert not np.allclose(spans[:, 0], spans[:, -1])  # spans differ: not one vector repeated


def test_poolings_of_different_widths_reach_parquet_and_the_task_means(tmp_path, suite):
    """`mean` (D) and `chunks` (J x D) rows in one batch: stored as list<float>, averaged per
    (task, mode, layer, pooling), read back by the loaders with each pooling's own width."""
    from icm.task_vectors import ParquetTaskVectorExtractor

    cfg = CFG.model_copy(update={"poolings": ["mean", "chunks"], "chunks": 3, "layers": [-1]})
    extractor = ParquetTaskVectorExtractor("tiny-llama", None, cfg.model_dump(mode="json"))
    prompts = [e.prompt for e in build_episodes(suite.tasks["sums"], cfg, mode="demos")]
    n = len(prompts)
    batch = {"task": np.array(["sums"] * n, object), "group": np.array(["g"] * n, object),
             "heldout": np.zeros(n, bool), "mode": np.array(["demos"] * n, object),
             "episode": np.arange(n), "prompt": np.array(prompts, object)}
    table = extractor(batch)
    folder = tmp_path / "task_vectors"
    (folder / "vectors").mkdir(parents=True)
    pq.write_table(table, folder / "vectors" / "a.parquet")
    compute_task_means(folder / "vectors", batch_rows=3).to_parquet(folder / "task_means.parquet", index=False)
    expected = extractor.encoder.encode_prompts(prompts)
    for pooling, width in (("mean", 64), ("chunks", 3 * 64)):
        episodes = load_episode_vectors(folder, mode="demos", layer=-1, pooling=pooling)["sums"]
        assert episodes.shape == (n, width)
        np.testing.assert_array_equal(episodes, expected[(-1, pooling)])
        mean = load_task_means(folder, mode="demos", layer=-1, pooling=pooling)["sums"]
        np.testing.assert_allclose(mean, episodes.mean(0), rtol=1e-5, atol=1e-6)


def test_chunks_changes_the_fingerprint_only_where_a_pooling_reads_it():
    plain = TaskVectorConfig(poolings=["mean"])
    assert "chunks" not in plain.vector_settings()  # stages made before it existed stay valid
    assert plain.model_copy(update={"chunks": 5}).vector_settings() == plain.vector_settings()
    read = TaskVectorConfig(poolings=["mean", "chunks"])
    assert read.vector_settings()["chunks"] == 8 != read.model_copy(update={"chunks": 5}).vector_settings()["chunks"]


# ----------------------------------------------------------------------------- pooling shift


def test_last_block_is_the_last_demonstration_with_the_cue_or_the_cue_alone():
    demos = ["cat one", "cat two"]
    both = format_prompt("About cats.", demos, mode="both")
    last = "\n\nText: cat two\n\nText:"
    assert split_last_block(both) == ("Task: About cats.\n\nText: cat one", last)
    assert split_last_block(format_prompt(None, demos, mode="demos"))[1] == last
    assert split_last_block(format_prompt("About cats.", [], mode="description")) == (
        "Task: About cats.", "\n\n" + CUE)
    alone = format_prompt(None, ["only"], mode="demos")
    assert split_last_block(alone) == ("", "Text: only\n\nText:")
    for prompt in (both, "no template at all", "Text: a\n\nText: b"):
        assert "".join(split_last_block(prompt)) == prompt


def test_shift_is_the_last_blocks_states_after_the_head_minus_read_alone(tiny_llama, suite):
    """By hand: the tail's mean state read after text-start + head, minus its mean state read
    after text-start alone; the same whatever the batch; zeros for a prompt with no head. The
    other poolings keep their values beside it (head and tail tokenise as the whole prompt)."""
    model, tokenizer = tiny_llama
    cfg = CFG.model_copy(update={"poolings": ["mean", "last", "shift"]})
    encoder = TaskEncoder(model, tokenizer, cfg)
    prompts = [e.prompt for mode in MODES
               for e in build_episodes(suite.tasks["cats"], cfg, mode=mode)[:2]]
    prompts.append(format_prompt(None, ["a lone text"], mode="demos"))
    vectors = encoder.encode_prompts(prompts)
    plain = TaskEncoder(model, tokenizer, CFG).encode_prompts(prompts)

    def states(ids):
        with torch.inference_mode():
            return model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states

    for index, prompt in enumerate(prompts):
        head, tail = split_last_block(prompt)
        head_ids = tokenizer(head, add_special_tokens=False)["input_ids"]
        tail_ids = tokenizer(tail, add_special_tokens=False)["input_ids"]
        n = len(tail_ids)
        in_context = states([encoder.start_id, *head_ids, *tail_ids])
        alone = states([encoder.start_id, *tail_ids])
        alone_vectors = encoder.encode_prompts([prompt])
        for layer in cfg.layers:
            expected = (in_context[layer][0, -n:].mean(0) - alone[layer][0, 1:].mean(0)).numpy()
            for got in (vectors[(layer, "shift")][index], alone_vectors[(layer, "shift")][0]):
                np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
            for key in ((layer, "mean"), (layer, "last")):
                np.testing.assert_allclose(vectors[key][index], plain[key][index],
                                           rtol=1e-5, atol=1e-6)
    assert np.abs(vectors[(-1, "shift")][-1]).max() < 1e-5  # no head: nothing to shift by
    assert np.abs(vectors[(-1, "shift")][:-1]).max(1).min() > 1e-3  # a head moves every other


def test_shift_of_a_raw_prompt_cut_to_the_budget_reads_what_is_left_of_its_last_block(
        tiny_llama, caplog):
    """A raw prompt over max_prompt_tokens loses its end: the shift compares the part of the last
    block that is left, read after the head and alone."""
    model, tokenizer = tiny_llama
    cfg = CFG.model_copy(update={"poolings": ["shift"], "layers": [-1], "max_prompt_tokens": 16})
    encoder = TaskEncoder(model, tokenizer, cfg)
    prompt = "Task: x.\n\nText: " + "one two three four five six seven " * 4 + "\n\nText:"
    head, tail = split_last_block(prompt)
    head_ids = tokenizer(head, add_special_tokens=False)["input_ids"]
    with caplog.at_level(logging.WARNING):
        shift = encoder.encode_prompts([prompt])[(-1, "shift")][0]
    assert "cut to task_vectors.max_prompt_tokens=16" in caplog.text
    ids = encoder._prompt_ids([prompt])[0][0]
    kept = 16 - 1 - len(head_ids)
    assert len(ids) == 16 and 0 < kept < len(tokenizer(tail, add_special_tokens=False)["input_ids"])
    with torch.inference_mode():
        in_context = model(input_ids=torch.tensor([ids]),
                           output_hidden_states=True).hidden_states[-1]
        alone = model(input_ids=torch.tensor([[encoder.start_id, *ids[-kept:]]]),
                      output_hidden_states=True).hidden_states[-1]
    expected = (in_context[0, -kept:].mean(0) - alone[0, 1:].mean(0)).numpy()
    np.testing.assert_allclose(shift, expected, rtol=1e-4, atol=1e-5)
