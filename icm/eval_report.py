"""Tables and plots from the evaluation's per-row results (Ray-free).

``results`` has one row per (task, variant, sample) with perplexity and bits per character. The
report aggregates samples (mean +- std), relates every variant to the base model and to a
reference (seen tasks: the task's own trained LoRA; held-out tasks: the multi-task LoRA), and
states the headline numbers the method is judged on, whichever way they come out.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

VARIANT_ORDER = ["base", "trained", "generated", "generated-best-of-k", "generated-z0",
                 "cond-description", "cond-demos", "soup", "nearest", "multitask",
                 "control-random", "control-shuffled"]


def per_task(results: pd.DataFrame) -> pd.DataFrame:
    """One row per (task, variant): mean and std of perplexity over samples, mean BPC, cosine."""
    grouped = results.groupby(["task", "group", "heldout", "variant"], sort=False)
    table = grouped.agg(ppl=("perplexity", "mean"), ppl_std=("perplexity", "std"),
                        bpc=("bits_per_char", "mean"), samples=("perplexity", "size"),
                        cosine_to_trained=("cosine_to_trained", "mean"),
                        adapter_seconds=("adapter_seconds", "mean")).reset_index()
    table["ppl_std"] = table["ppl_std"].fillna(0.0)
    wide = table.pivot(index="task", columns="variant", values="ppl")
    base = table["task"].map(wide["base"])
    reference = table.apply(lambda r: wide.at[r.task, "multitask" if r.heldout else "trained"]
                            if ("multitask" if r.heldout else "trained") in wide.columns else np.nan,
                            axis=1)
    table["ratio_to_base"] = table["ppl"] / base
    table["ratio_to_reference"] = table["ppl"] / reference
    gap = np.log(base) - np.log(reference)
    table["gap_recovered"] = np.where(gap > 0, (np.log(base) - np.log(table["ppl"])) / gap, np.nan)
    order = {v: i for i, v in enumerate(VARIANT_ORDER)}
    return table.sort_values(["heldout", "group", "task", "variant"],
                             key=lambda c: c.map(order) if c.name == "variant" else c
                             ).reset_index(drop=True)


def headline(table: pd.DataFrame) -> dict[str, float]:
    """The numbers the method is judged on (NaN where a variant is missing)."""
    wide = table.pivot(index="task", columns="variant", values="ppl")
    heldout = table.groupby("task")["heldout"].first()
    seen, unseen = wide[~heldout.reindex(wide.index)], wide[heldout.reindex(wide.index)]
    out: dict[str, float] = {"seen_tasks": float(len(seen)), "heldout_tasks": float(len(unseen))}
    for variant in ("generated", "generated-best-of-k", "generated-z0", "soup", "nearest", "multitask"):
        if variant in wide and "trained" in wide and len(seen):
            out[f"seen_median_ratio_{variant}_to_trained"] = float((seen[variant] / seen["trained"]).median())
    if "generated" in wide and len(unseen):
        out["heldout_share_generated_beats_base"] = float((unseen["generated"] < unseen["base"]).mean())
        for rival in ("soup", "nearest", "multitask", "generated-best-of-k"):
            if rival in wide:
                out[f"heldout_share_generated_beats_{rival}"] = float(
                    (unseen["generated"] < unseen[rival]).mean())
                out[f"heldout_median_ratio_generated_to_{rival}"] = float(
                    (unseen["generated"] / unseen[rival]).median())
    return out


def variant_summary(table: pd.DataFrame) -> pd.DataFrame:
    """Per (seen/held-out, variant): median perplexity ratio to base and to the reference,
    median gap recovered, median cosine to the trained adapter."""
    frame = table.assign(split=np.where(table["heldout"], "held-out", "seen"))
    summary = frame.groupby(["split", "variant"]).agg(
        tasks=("task", "size"), median_ratio_to_base=("ratio_to_base", "median"),
        median_ratio_to_reference=("ratio_to_reference", "median"),
        median_gap_recovered=("gap_recovered", "median"),
        median_cosine_to_trained=("cosine_to_trained", "median"),
        median_adapter_seconds=("adapter_seconds", "median")).reset_index()
    order = {v: i for i, v in enumerate(VARIANT_ORDER)}
    return summary.sort_values(["split", "variant"], key=lambda c: c.map(order)
                               if c.name == "variant" else c, ascending=[False, True]).reset_index(drop=True)


def plot_per_task(table: pd.DataFrame, out: Path, variants=("base", "trained", "generated",
                  "soup", "nearest", "multitask")) -> Path:
    """Grouped bars of perplexity relative to base, per task, one bar per variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    wide = table.pivot(index="task", columns="variant", values="ratio_to_base")
    tasks = list(table.drop_duplicates("task").sort_values(["heldout", "group", "task"])["task"])
    present = [v for v in variants if v in wide.columns]
    fig, ax = plt.subplots(figsize=(max(8, 0.5 * len(tasks)), 5))
    width = 0.8 / max(len(present), 1)
    for i, variant in enumerate(present):
        ax.bar(np.arange(len(tasks)) + i * width, wide.reindex(tasks)[variant], width, label=variant)
    heldout = set(table.loc[table["heldout"], "task"])
    ax.set_xticks(np.arange(len(tasks)) + 0.4 - width / 2)
    ax.set_xticklabels([f"{t}*" if t in heldout else t for t in tasks], rotation=75, fontsize=7)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_ylabel("perplexity / base perplexity (lower is better)")
    ax.set_title("Eval perplexity by variant (* = held-out task)")
    ax.legend(fontsize=7, ncol=3)
    return _save(fig, out)


def plot_gap_by_group(table: pd.DataFrame, out: Path,
                      variants=("generated", "generated-best-of-k", "soup", "nearest")) -> Path:
    """Median share of the base -> reference gap recovered, per group, seen and held-out."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    frame = table[table["variant"].isin(variants)]
    frame = frame.assign(split=np.where(frame["heldout"], "held-out", "seen"))
    medians = frame.groupby(["group", "split", "variant"])["gap_recovered"].median().unstack("variant")
    fig, ax = plt.subplots(figsize=(9, 4.5))
    labels = [f"{g}\n{s}" for g, s in medians.index]
    width = 0.8 / max(len(medians.columns), 1)
    for i, variant in enumerate(medians.columns):
        ax.bar(np.arange(len(labels)) + i * width, medians[variant], width, label=variant)
    ax.set_xticks(np.arange(len(labels)) + 0.4 - width / 2)
    ax.set_xticklabels(labels, fontsize=7)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_ylabel("gap recovered (1 = reference)")
    ax.set_title("Base -> reference gap recovered (seen: trained LoRA; held-out: multi-task LoRA)")
    ax.legend(fontsize=7)
    return _save(fig, out)


def _save(fig, out: Path) -> Path:
    import matplotlib.pyplot as plt

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp.png")
    fig.tight_layout()
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(out)
    return out


def markdown_report(table: pd.DataFrame, *, command: str, config_yaml: str, title: str) -> str:
    """EVAL.md: headline, per-variant summary, per-task perplexities, the command and config."""
    numbers = headline(table)
    lines = [f"# {title}", "", f"Produced by `{command}`; the resolved config is at the end.", "",
             "## Headline", "", "| measure | value |", "|---|---:|"]
    lines += [f"| {k} | {v:.3f} |" for k, v in numbers.items() if not math.isnan(v)]
    lines += ["", "## By variant (medians over tasks)", "",
              variant_summary(table).to_markdown(index=False, floatfmt=".3f"), "",
              "## Per task: eval perplexity (generated = mean over samples)", ""]
    wide = table.pivot(index="task", columns="variant", values="ppl")
    wide = wide[[v for v in VARIANT_ORDER if v in wide.columns]]
    meta = table.drop_duplicates("task").set_index("task")[["group", "heldout"]]
    lines += [meta.join(wide).sort_values(["heldout", "group"]).reset_index()
              .to_markdown(index=False, floatfmt=".2f"), "",
              "## Resolved config", "", "```yaml", config_yaml.rstrip(), "```", ""]
    return "\n".join(lines)
