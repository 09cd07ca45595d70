"""The benchmark scripts start: each imports, and those that read presets can find them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BENCH = sorted((Path(__file__).resolve().parents[1] / "bench").glob("bench_*.py"))


@pytest.mark.parametrize("script", [s for s in BENCH if "load_config" in s.read_text()], ids=lambda s: s.stem)
def test_a_bench_that_reads_presets_can_find_the_study_preset(script):
    # Run as the README runs it (a script, not a package import): the presets come from `jobs`.
    code = (f"import runpy, sys; sys.argv = [{str(script)!r}]; "
            f"runpy.run_path({str(script)!r}, run_name='bench'); "
            "from icm.config import load_config; load_config('study')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]


def test_zoo_steps_bench_reads_snapshots_in_step_order_and_names_a_wrong_folder(tmp_path):
    import json
    import runpy

    bench = runpy.run_path(str(BENCH[0].with_name("bench_zoo_steps.py")), run_name="bench")
    for step in (96, 24, 48):  # written out of order; folder names are zero-padded steps
        folder = tmp_path / "tasks" / "t" / "snapshots" / f"step-{step:06d}"
        folder.mkdir(parents=True)
        (folder / "snapshot.json").write_text(json.dumps({"step": step}))
    found = bench["snapshot_folders"](tmp_path, ["t", "not-trained"])
    assert list(found) == ["t"] and [step for step, _ in found["t"]] == [24, 48, 96]
    with pytest.raises(SystemExit, match="pass the longer run's zoo/ folder"):
        bench["snapshot_folders"](tmp_path / "evaluate", ["t"])


def test_condition_novelty_bench_compares_each_task_with_its_own_generators_training_tasks(tmp_path):
    """Familiarity is the best centred cosine to the tasks the task's generator recorded it
    trained on: a fold's generator never saw the fold's groups, so its tasks are compared
    without them."""
    import json
    import runpy

    import numpy as np
    import pandas as pd
    import yaml

    bench = runpy.run_path(str(BENCH[0].with_name("bench_condition_novelty.py")), run_name="bench")
    # Training: a1, a2 (group a), b1 (group b); held out: a3 (group a). Fold 0 holds out group a.
    vectors = {"a1": [1.0, 0.0], "a2": [0.9, 0.1], "b1": [0.0, 1.0], "a3": [1.0, 0.05]}
    means = pd.DataFrame({"task": list(vectors), "group": ["a", "a", "b", "a"],
                          "heldout": [False, False, False, True], "mode": "both", "layer": -1,
                          "pooling": "mean", "vector": [np.asarray(v, np.float32) for v in vectors.values()]})
    stage, evaluate = tmp_path / "task_vectors", tmp_path / "evaluate"
    stage.mkdir()
    evaluate.mkdir()
    means.to_parquet(stage / "task_means.parquet")
    (evaluate / "baselines.json").write_text(json.dumps({"folds": [["a"]]}))
    training = {-1: ["a1", "a2", "b1"], 0: ["b1"]}  # what each generator recorded it trained on
    for fold, directory in [(-1, tmp_path / "generator"), (0, evaluate / "folds" / "fold-0" / "generator")]:
        directory.mkdir(parents=True)
        (directory / "generator.json").write_text(json.dumps({"training": {"trained_on": {"tasks": training[fold]}}}))
    (evaluate / "config.resolved.yaml").write_text(yaml.safe_dump(
        {"seed": 0, "storage": {"root": str(tmp_path)},
         "generator": {"condition_layer": -1, "condition_pooling": "mean"}}))
    # Per-text NLL (2 texts of 10 tokens): base 4, oracle 2, generated 3 or 3.5, soup 3.2.
    nll = {"base": 40.0, "oracle": 20.0, "soup": 32.0}
    rows = [{"setting": setting, "fold": fold, "task": task, "group": "a", "variant": variant,
             "text_nll": [value, value], "text_tokens": [10, 10]}
            for setting, fold, task, generated in [("heldout", None, "a3", 30.0), ("fold", 0, "a3", 35.0),
                                                    ("fold", 0, "a1", 35.0)]
            for variant, value in {**nll, "generated": generated}.items()]
    pd.DataFrame(rows).to_parquet(evaluate / "results.parquet")
    assert bench["main"](["--evaluate", str(evaluate), "--resamples", "50"]) == 0
    text = (evaluate / "condition_novelty.md").read_text()
    table = bench["familiarity_table"](
        bench["task_log_ppl"](pd.read_parquet(evaluate / "results.parquet")),
        {t: np.asarray(v) for t, v in vectors.items()}, bench["trained_on"](evaluate, 1), "soup")
    by_key = {(row["setting"], row["task"]): row for _, row in table.iterrows()}
    # Held out: a3 against a1, a2, b1 (centred on their mean) -> closest to a1, cosine > 0.9.
    assert by_key[("heldout", "a3")]["familiarity"] > 0.9
    # Fold 0: every training task of group a is out, so a1 and a3 are compared with b1 alone
    # (one candidate: its centred deviation is zero, similarity 0).
    assert by_key[("fold", "a3")]["familiarity"] == 0.0 == by_key[("fold", "a1")]["familiarity"]
    assert by_key[("heldout", "a3")]["gap generated"] == 0.5  # (4 - 3) / (4 - 2)
    assert by_key[("fold", "a1")]["log ppl ratio to soup"] == pytest.approx(0.3)  # 3.5 - 3.2
    assert "Spearman rho" in text and "3 unseen tasks" in text
    with pytest.raises(SystemExit, match="--rival: 'ridge' was not scored"):
        bench["main"](["--evaluate", str(evaluate), "--rival", "ridge"])


def test_leak_effect_bench_finds_held_out_eval_texts_trained_on_and_drops_only_those(tmp_path):
    """A held-out eval text in a training task's train split is found (not one only another
    held-out task holds), and only that text leaves the held-out rows' per-text arrays."""
    import runpy

    import numpy as np
    import pandas as pd

    from icm.tasks import load_suite
    from tests.conftest import TINY_TASKS, make_suite

    bench = runpy.run_path(str(BENCH[0].with_name("bench_leak_effect.py")), run_name="bench")
    tasks = {name: (group, list(train), list(evaluation)) for name, (group, train, evaluation) in TINY_TASKS.items()}
    leaked = tasks["dogs"][2][1]  # the held-out task's second eval text ...
    tasks["code"][1].append(leaked)  # ... in a training task's train split
    suite = load_suite(make_suite(tmp_path / "suite", tasks=tasks))
    assert bench["leaked_eval_texts"](suite) == {"dogs": {1}}
    rows = pd.DataFrame([{"variant": v, "setting": s, "fold": None, "task": t, "group": "g",
                          "text_nll": np.array([1.0, 2.0, 3.0]), "text_tokens": np.array([4, 5, 6])}
                         for v in ("base", "oracle") for s, t in (("heldout", "dogs"), ("seen", "cats"))])
    cut = bench["without_texts"](rows, {"dogs": {1}})
    held, seen = cut[cut["setting"] == "heldout"], cut[cut["setting"] == "seen"]
    assert all(list(r) == [1.0, 3.0] for r in held["text_nll"]) and all(list(r) == [4, 6] for r in held["text_tokens"])
    assert all(list(r) == [1.0, 2.0, 3.0] for r in seen["text_nll"])


def test_lm_step_bench_alternates_layouts_and_pairs_throughput_by_round():
    import runpy

    bench = runpy.run_path(str(BENCH[0].with_name("bench_lm_step.py")), run_name="bench")
    assert bench["round_orders"](["a", "b"], 3) == [["a", "b"], ["b", "a"], ["a", "b"]]
    assert bench["parse_layout"]("2x1") == (2, 1)
    with pytest.raises(SystemExit, match="--layouts: '2-1' is not PxT"):
        bench["parse_layout"]("2-1")
    low, high = bench["bootstrap_median_ci"]([1.0, 1.1, 1.2, 1.3, 1.9])
    assert 1.0 <= low <= 1.2 <= high <= 1.9 and low < high
    timings = {(1, 1): {"s_per_step": [5.0, 6.0], "steps_per_s": [0.2, 0.1]},
               (2, 1): {"s_per_step": [6.0, 6.0], "steps_per_s": [0.3, 0.3]}}
    rows = bench["table"](timings, (1, 1))
    assert [r["layout"] for r in rows] == ["1x1", "2x1"]
    assert rows[1]["throughput_ratio"] == pytest.approx(2.25)  # median of 1.5 and 3.0, by round


def test_context_steering_bench_calibrates_the_demos_toward_the_prompt_and_scales_to_base(
        tiny_suite):
    """The steering probe (EVAL.md, session 48): the demonstrations' tokens are paired with the
    same tokens in the prompt (a pairing off by one token was a bug: the first token of a text
    in the prompt starts at the space before it); its rank-1 LoRA moves their mean residual
    toward the prompt's at every layer; at strength 0 it scores exactly as the base model."""
    import runpy

    import torch

    from icm.models import load_base_model
    from icm.tasks import load_task

    bench = runpy.run_path(str(BENCH[0].with_name("bench_context_steering.py")), run_name="bench")
    model, tokenizer = load_base_model("smollm2-135m")  # its own copy: the probe adds hooks
    steering = bench["Steering"](model, tokenizer)
    demos = steering.demonstrations(load_task(tiny_suite / "cats"))
    assert len(demos["alone"]) == 5
    for (in_prompt, own), alone in zip(demos["pairs"], demos["alone"]):
        assert own and [demos["ids"][p] for p in in_prompt] == [alone[p] for p in own]
    steering.fit_detector([demo.strip() for demo in demos["demos"]])
    steering.constant_delta(demos)
    masks = [[0] + [1] * (len(s) - 1) for s in demos["alone"]]

    def distances(alpha):  # per layer: |mean residual of the demos alone - the prompt's|
        steering.alpha = alpha
        steering.forward("grab", demos["alone"], masks)
        weights = steering.mask[..., None]
        return torch.stack([((steering.mids[i] * weights).sum((0, 1)) / weights.sum()
                             - steering.targets[i]).norm() for i in range(len(steering.layers))])

    before, after = distances(0.0), distances(1.0)
    # only the o_proj image of a value shift is reachable (192 of 576 dimensions): closer at
    # every layer, and less than half as far where the layers' shifts add up, at the last
    assert (after < before).all() and after[-1] < 0.5 * before[-1], (after / before)
    texts = load_task(tiny_suite / "cats").eval_texts()
    assert steering.score(texts, 0.0) == steering.score(texts)
    assert steering.score(texts, 1.0) != steering.score(texts)
    assert bench["share"](100.0, 50.0, 100.0) == 0.0
    assert abs(bench["share"](100.0, 50.0, 50.0) - 1.0) < 1e-12

