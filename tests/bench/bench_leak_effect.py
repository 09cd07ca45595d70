"""How much did held-out eval texts that training tasks also trained on move a finished evaluation?

    python tests/bench/bench_leak_effect.py --suite SUITE_DIR --evaluate RUN/evaluate
        [--with OTHER/evaluate ...] [--resamples N]

Suites built before default-suite version 3 could hold the same text (a GNU licence notice, a
shared chapter) in a held-out task's eval split and in a training task's train split, so the
zoo, the multi-task LoRA and every baseline built from the zoo had trained on a few texts they
were then scored on as unseen. ``--suite`` is the suite the evaluation scored (a version-2
build for the runs before 2026-12-03); `icm.tasks.cross_task_leaks` names the leaking texts.
For the held-out setting, every variant's gap recovered and the generated adapter's perplexity
ratio to each baseline are computed twice, on all scored texts and without the leaked ones, with
the same paired bootstrap as the report. ``--with`` merges further evaluate folders of the same
zoo and texts (`icm.eval.compare.merge_runs`: e.g. a baselines-only run). Reads files only;
prints a markdown table.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from icm.eval.compare import merge_runs  # noqa: E402
from icm.eval.report import format_ci, gap_row, ratio_row  # noqa: E402
from icm.tasks import Suite, cross_task_leaks, load_suite  # noqa: E402

GENERATED = "generated"


def leaked_eval_texts(suite: Suite) -> dict[str, set[int]]:
    """Held-out task -> 0-based indices of its eval texts some training task trains on."""
    splits = {name: (task.train_texts(), task.eval_texts()) for name, task in suite.tasks.items()}
    trained = {text for name, leaks in cross_task_leaks(splits, suite.heldout).items()
               if not suite.is_heldout(name) for text in leaks}
    return {name: {i for i, text in enumerate(splits[name][1]) if text in trained}
            for name in suite.heldout}


def without_texts(results: pd.DataFrame, drop: dict[str, set[int]]) -> pd.DataFrame:
    """``results`` with the held-out setting's rows cut to the texts not in ``drop``."""
    rows = results.copy()
    for index, row in rows.iterrows():
        if row["setting"] != "heldout" or not drop.get(row["task"]):
            continue
        keep = [i for i in range(len(row["text_nll"])) if i not in drop[row["task"]]]
        rows.at[index, "text_nll"] = np.asarray(row["text_nll"])[keep]
        rows.at[index, "text_tokens"] = np.asarray(row["text_tokens"])[keep]
    return rows


def effect_table(results: pd.DataFrame, drop: dict[str, set[int]], resamples: int) -> pd.DataFrame:
    heldout = results[results["setting"] == "heldout"]
    clean = without_texts(heldout, drop)
    rows = []
    for variant in sorted(set(heldout["variant"]) - {"base", "oracle"}):
        row = {"variant": variant}
        for label, frame in (("all texts", heldout), ("without leaked", clean)):
            row[f"gap, {label}"] = format_ci(gap_row(frame, variant, resamples, 0))
            if variant != GENERATED and GENERATED in set(frame["variant"]):
                row[f"generated / it, {label}"] = format_ci(ratio_row(frame, GENERATED, variant, resamples, 0))
        rows.append(row)
    return pd.DataFrame(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", type=Path, required=True, help="the suite the evaluation scored")
    parser.add_argument("--evaluate", type=Path, required=True, help="a finished evaluate folder")
    parser.add_argument("--with", dest="others", type=Path, nargs="*", default=[],
                        help="more evaluate folders of the same zoo and texts")
    parser.add_argument("--resamples", type=int, default=2000)
    args = parser.parse_args(argv)
    results = merge_runs(pd.read_parquet(args.evaluate / "results.parquet"),
                         {str(p): pd.read_parquet(p / "results.parquet") for p in args.others})
    results["variant"] = results["variant"].str.replace(r"\[.*\]$", "", regex=True)
    scored = results[results["setting"] == "heldout"].groupby("task")["text_nll"].first().map(len)
    drop = {task: {i for i in indices if i < scored.get(task, 0)}
            for task, indices in leaked_eval_texts(load_suite(args.suite)).items()}
    drop = {task: indices for task, indices in drop.items() if indices}
    total = int(scored.sum())
    print(f"leaked held-out eval texts among those scored: {sum(map(len, drop.values()))} of {total} "
          f"({', '.join(f'{t} {len(i)}/{scored[t]}' for t, i in sorted(drop.items())) or 'none'})\n")
    print(effect_table(results, drop, args.resamples).fillna("").to_markdown(index=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
