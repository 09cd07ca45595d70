"""Does the generator's edge over a baseline shrink as the task's condition gets less familiar?

    python tests/bench/bench_condition_novelty.py --evaluate RUN/evaluate [--rival soup]
        [--rival-from OTHER/evaluate] [--resamples N]

For every unseen task a finished evaluate stage scored (held-out and fold settings), its
familiarity is the highest centred cosine between its condition (the mean "both" task vector
the generator reads, with the generator's layer and pooling) and the conditions of the tasks its
generator was trained on (as each generator's generator.json records them: a fold generator's
exclude the fold's groups), centred on their mean as the similarity soup does. Beside it: the gap to the oracle
recovered by the generated adapter and by ``--rival``, and log(ppl generated / ppl rival). The
Spearman correlation of familiarity with that log ratio has a bootstrap interval over tasks: a
clearly negative one says the generator is worth its adapter only for tasks like those it was
trained on, and that a user should fall back to the rival for the rest. Reads files only (no
model, no scoring); prints the table and writes ``condition_novelty.md`` beside ``--evaluate``.
``--rival-from`` takes the rival's rows from another evaluate folder of the same zoo and texts
(e.g. a baselines-only run beside a generated-only one).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import yaml  # noqa: E402

from icm.eval.baselines import centred_cosines  # noqa: E402
from icm.eval.report import task_log_ppl  # noqa: E402
from icm.task_vectors import load_task_means  # noqa: E402

GENERATED = "generated"


def trained_on(evaluate: Path, folds: int) -> dict[int, list[str]]:
    """Fold (-1: the held-out setting's main generator) -> the tasks that generator trained on,
    as its generator.json recorded them."""
    directories = {-1: evaluate.parent / "generator",
                   **{k: evaluate / "folds" / f"fold-{k}" / "generator" for k in range(folds)}}
    return {k: json.loads((d / "generator.json").read_text())["training"]["trained_on"]["tasks"]
            for k, d in directories.items()}


def familiarity_table(log_ppl: pd.DataFrame, vectors: dict[str, np.ndarray],
                      training: dict[int, list[str]], rival: str) -> pd.DataFrame:
    """One row per unseen task: familiarity, gaps recovered and log(ppl generated / ppl rival);
    ``training``: fold (-1 for held-out) -> the tasks its generator trained on."""
    rows = []
    for (setting, fold, task, group), ppl in log_ppl.iterrows():
        if setting == "seen" or pd.isna(ppl.get(rival)) or pd.isna(ppl.get(GENERATED)):
            continue
        others = np.stack([vectors[t] for t in training[int(fold)] if t != task])  # (N, D)
        gap = ppl["base"] - ppl["oracle"]  # log-ppl gap base -> oracle
        rows.append({"setting": setting, "fold": None if fold < 0 else int(fold), "task": task,
                     "group": group, "familiarity": float(centred_cosines(vectors[task], others).max()),
                     "gap generated": (ppl["base"] - ppl[GENERATED]) / gap,
                     f"gap {rival}": (ppl["base"] - ppl[rival]) / gap,
                     f"log ppl ratio to {rival}": ppl[GENERATED] - ppl[rival]})
    table = pd.DataFrame(rows).astype({"fold": "Int64"})  # held-out rows: no fold
    return table.sort_values("familiarity", ignore_index=True)


def spearman_ci(x: np.ndarray, y: np.ndarray, resamples: int, seed: int) -> tuple[float, float, float]:
    """Spearman's rho of (x, y) and a 95% percentile interval from resampling tasks."""
    rho = lambda a, b: pd.Series(a).rank().corr(pd.Series(b).rank())  # noqa: E731
    rng = np.random.default_rng(seed)
    draws = [rho(x[i], y[i]) for i in (rng.integers(0, len(x), len(x)) for _ in range(resamples))]
    low, high = np.nanpercentile(draws, [2.5, 97.5])
    return float(rho(x, y)), float(low), float(high)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--evaluate", required=True, type=Path, help="a finished evaluate folder")
    parser.add_argument("--rival", default="soup", help="the baseline variant to compare with")
    parser.add_argument("--rival-from", type=Path, default=None,
                        help="an evaluate folder of the same zoo and texts that scored the rival")
    parser.add_argument("--resamples", type=int, default=2000)
    args = parser.parse_args(argv)
    results_file = args.evaluate / "results.parquet"
    if not results_file.is_file():
        raise SystemExit(f"--evaluate: {results_file} is missing: pass a finished evaluate folder")
    config = yaml.safe_load((args.evaluate / "config.resolved.yaml").read_text())
    generator, root = config["generator"], Path(config["storage"]["root"])
    stage = args.evaluate.parent / "task_vectors"  # the run's own task vectors, wherever it moved
    stage = stage if stage.is_dir() else root / "task_vectors"
    vectors = load_task_means(stage, mode="both", layer=generator["condition_layer"],
                              pooling=generator["condition_pooling"])
    folds = len(json.loads((args.evaluate / "baselines.json").read_text())["folds"])
    results = pd.read_parquet(results_file)
    if args.rival_from is not None:  # the rival's rows from a run of the same zoo and texts
        rival = pd.read_parquet(args.rival_from / "results.parquet")
        results = pd.concat([results[results["variant"] != args.rival],
                             rival[rival["variant"] == args.rival]], ignore_index=True)
    log_ppl = task_log_ppl(results)
    if args.rival not in log_ppl.columns:
        raise SystemExit(f"--rival: {args.rival!r} was not scored; scored: {', '.join(log_ppl.columns)}")
    table = familiarity_table(log_ppl, vectors, trained_on(args.evaluate, folds), args.rival)
    rho, low, high = spearman_ci(table["familiarity"].to_numpy(), table.iloc[:, -1].to_numpy(),
                                 args.resamples, config.get("seed", 0))
    verdict = (f"Spearman rho(familiarity, log ppl generated / {args.rival}) = {rho:.3f} "
               f"[{low:.3f}, {high:.3f}] over {len(table)} unseen tasks")
    text = table.round(3).to_markdown(index=False) + f"\n\n{verdict}\n"
    print(text)
    command = "python tests/bench/bench_condition_novelty.py " + " ".join(sys.argv[1:] if argv is None else argv)
    (args.evaluate / "condition_novelty.md").write_text(f"`{command}`\n\n{text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
