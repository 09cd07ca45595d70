"""EVAL.md and its plot, from the per-text results of the evaluation (Ray-free).

``results`` has one row per (task, setting, fold, variant, sample) with ``text_nll`` and
``text_tokens`` lists. A variant's per-text NLL is the mean over its samples (the expected
score of one draw). Every comparison is paired text by text and its interval comes from the
two-level bootstrap of `icm.eval.stats` (tasks, then texts within each task).

The headline is the share of the base -> oracle log-perplexity gap a generated adapter closes on
tasks the generator never saw, and its perplexity ratio to the strongest baseline, on the fixed
held-out set and on the group folds, whichever way it comes out.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from icm.eval.stats import gap_recovered_ci, ratio_ci
from icm.eval.variants import VARIANTS, baseline_names, prompt_alone, registered_name

HEADLINE_VARIANT = "generated"
KEY = ["setting", "fold", "task"]


@dataclass
class Paired:
    """Per-text NLL of several variants on the same tasks and texts (tasks all variants have)."""

    keys: list[tuple]
    nll: dict[str, list[np.ndarray]]  # variant -> per task (n_i,)
    tokens: list[np.ndarray]  # per task (n_i,)


def _mean_text_nll(rows: pd.DataFrame) -> np.ndarray:
    """(n,) per-text NLL of one (task, variant), averaged over its samples."""
    return np.mean(np.stack([np.asarray(v, dtype=np.float64) for v in rows["text_nll"]]), axis=0)


def per_text(results: pd.DataFrame, variants: Sequence[str]) -> Paired:
    """Per-text NLL of ``variants`` (mean over samples), restricted to tasks that have all of them."""
    frame = results[results["variant"].isin(variants)].copy()
    frame["fold"] = frame["fold"].fillna(-1)
    grouped = {}
    for (setting, fold, task, variant), rows in frame.groupby(KEY + ["variant"], sort=True):
        grouped[(setting, fold, task, variant)] = (_mean_text_nll(rows),
                                                   np.asarray(rows["text_tokens"].iloc[0], dtype=np.float64))
    keys = sorted({k[:3] for k in grouped if all((*k[:3], v) in grouped for v in variants)})
    return Paired(keys, {v: [grouped[(*k, v)][0] for k in keys] for v in variants},
                  [grouped[(*k, variants[0])][1] for k in keys])


def task_log_ppl(results: pd.DataFrame) -> pd.DataFrame:
    """(setting, fold, task) x variant table of log perplexity (samples pooled by mean NLL)."""
    rows = []
    frame = results.assign(fold=results["fold"].fillna(-1))
    for (setting, fold, task, variant), group in frame.groupby(KEY + ["variant"]):
        nll = _mean_text_nll(group)
        rows.append({"setting": setting, "fold": fold, "task": task, "group": group["group"].iloc[0],
                     "variant": variant, "log_ppl": nll.sum() / float(np.sum(group["text_tokens"].iloc[0]))})
    return pd.DataFrame(rows).pivot(index=["setting", "fold", "task", "group"], columns="variant",
                                    values="log_ppl")


def ordered_variants(results: pd.DataFrame) -> list[str]:
    """The variants present, in registry order, then any others (e.g. another generator's
    ``generated[hyper]`` rows merged by `icm.eval.compare`) by name."""
    present = set(results["variant"])
    return [v for v in VARIANTS if v in present] + sorted(present - set(VARIANTS))


def is_baseline(variant: str) -> bool:
    return variant in VARIANTS and VARIANTS[variant].baseline


def is_yardstick(variant: str) -> bool:
    return variant in VARIANTS and VARIANTS[variant].yardstick


def generated_variants(results: pd.DataFrame) -> list[str]:
    """The generator's own variant and every merged generator's (``generated[label]``), then
    the selected variants built on them (``demo-selected``, ``demo-selected[label]``)."""
    def kind(variant: str) -> str | None:
        registered = VARIANTS.get(registered_name(variant))
        return registered.kind if registered else None

    present = ordered_variants(results)
    own = [v for v in present if v == HEADLINE_VARIANT or v.startswith(HEADLINE_VARIANT + "[")]
    return own + [v for v in present if kind(v) == "selected"]


def format_ci(ci) -> str:
    return f"{ci.estimate:.3f} [{ci.low:.3f}, {ci.high:.3f}]" if ci is not None and ci.n else "n/a"


def gap_row(results: pd.DataFrame, variant: str, resamples: int, seed: int):
    paired = per_text(results, [variant, "base", "oracle"])
    if not paired.keys:
        return None
    return gap_recovered_ci(paired.nll[variant], paired.nll["base"], paired.nll["oracle"],
                            paired.tokens, resamples=resamples, seed=seed)


def ratio_row(results: pd.DataFrame, variant: str, rival: str, resamples: int, seed: int):
    paired = per_text(results, [variant, rival])
    if not paired.keys:
        return None
    return ratio_ci(paired.nll[variant], paired.nll[rival], paired.tokens, resamples=resamples, seed=seed)


def strongest_baseline(results: pd.DataFrame) -> str | None:
    """The baseline with the lowest geometric-mean perplexity over the setting's tasks."""
    table = task_log_ppl(results)
    present = [b for b in baseline_names() if b in table.columns and table[b].notna().all()]
    return min(present, key=lambda b: table[b].mean()) if present else None


def comparison_table(results: pd.DataFrame, resamples: int, seed: int) -> pd.DataFrame:
    """Every variant of a setting: gap recovered (CI), ratio to the oracle, and the generated
    adapter's ratio to it (CI, wins, sign test; a merged run's where the setting has no
    ``generated`` of its own, see `headline_generator`)."""
    rows = []
    generator = headline_generator(results)
    for variant in ordered_variants(results):
        gap = gap_row(results, variant, resamples, seed) if variant not in ("base", "oracle") else None
        to_oracle = ratio_row(results, variant, "oracle", resamples, seed) if variant != "oracle" else None
        versus = (ratio_row(results, generator, variant, resamples, seed)
                  if variant != generator else None)
        rows.append({
            "variant": variant, "baseline": is_baseline(variant),
            "tasks": int(results.loc[results["variant"] == variant, "task"].nunique()),
            "gap recovered, median [95% CI]": format_ci(gap) if gap else "",
            "ppl / oracle [95% CI]": format_ci(to_oracle) if to_oracle else "",
            f"{generator} / this [95% CI]": format_ci(versus) if versus else "",
            f"{generator} wins": f"{versus.wins}/{versus.n}" if versus else "",
            "sign p": f"{versus.sign_p:.3g}" if versus else "",
            "median task ratio": f"{versus.median_task_ratio:.3f}" if versus else ""})
    return pd.DataFrame(rows)


def headline_generator(results: pd.DataFrame) -> str:
    """The generator a headline row reports: ``generated`` where these rows have it, else the
    first merged run's (``generated[<label>]``, `icm.eval.compare`), e.g. the folds of a
    folds-only run merged onto a held-out-only reference."""
    # in row order, i.e. merge order (ordered_variants would sort merged labels by name)
    generators = [v for v in dict.fromkeys(results["variant"])
                  if registered_name(v) == HEADLINE_VARIANT]
    return HEADLINE_VARIANT if HEADLINE_VARIANT in generators or not generators else generators[0]


def headline_row(label: str, results: pd.DataFrame, resamples: int, seed: int) -> dict:
    best = strongest_baseline(results)
    generator = headline_generator(results)
    if generator != HEADLINE_VARIANT:
        label = f"{label}, {generator}"
    gap = gap_row(results, generator, resamples, seed)
    best_gap = gap_row(results, best, resamples, seed) if best else None
    versus = ratio_row(results, generator, best, resamples, seed) if best else None
    return {"tasks evaluated": label, "n": int(results["task"].nunique()),
            "generated: gap to oracle recovered, median [95% CI]": format_ci(gap) if gap else "n/a",
            "strongest baseline": best or "-",
            "its gap recovered": format_ci(best_gap) if best_gap else "n/a",
            "generated / strongest baseline, ppl ratio [95% CI]": format_ci(versus) if versus else "n/a",
            "wins": f"{versus.wins}/{versus.n} (p {versus.sign_p:.2g})" if versus else "n/a"}


def headline_table(results: pd.DataFrame, folds: Sequence[Sequence[str]], resamples: int, seed: int) -> pd.DataFrame:
    rows = []
    held = results[results["setting"] == "heldout"]
    if len(held):
        rows.append(headline_row("fixed held-out set", held, resamples, seed))
    fold_rows = results[results["setting"] == "fold"]
    if len(fold_rows):
        rows.append(headline_row(f"group folds ({len(folds)} folds pooled)", fold_rows, resamples, seed))
        for index, groups in enumerate(folds):
            part = fold_rows[fold_rows["fold"] == index]
            if len(part):
                rows.append(headline_row(f"fold {index}: {', '.join(groups)}", part, resamples, seed))
    return pd.DataFrame(rows)


def generators_table(results: pd.DataFrame, resamples: int, seed: int) -> pd.DataFrame:
    """Per unseen setting and generator: gap recovered, and its perplexity ratio to every
    baseline, then to every yardstick scored (95% CI; below 1 the generator is better, wins in
    brackets)."""
    rows = []
    for setting, label in (("heldout", "held-out"), ("fold", "folds")):
        part = results[results["setting"] == setting]
        present = ordered_variants(part)
        rivals = [v for v in present if is_baseline(v)] + [v for v in present if is_yardstick(v)]
        for variant in generated_variants(part):
            gap = gap_row(part, variant, resamples, seed)
            row = {"setting": label, "generator": variant, "gap recovered": format_ci(gap) if gap else "n/a"}
            for rival in rivals:
                ci = ratio_row(part, variant, rival, resamples, seed)
                row[f"/ {rival}"] = f"{format_ci(ci)} ({ci.wins}/{ci.n})" if ci else "n/a"
            rows.append(row)
    return pd.DataFrame(rows)


def stacked_table(results: pd.DataFrame, resamples: int, seed: int) -> pd.DataFrame:
    """Per unseen setting, each adapter read under the in-context prompt: gap recovered, and
    its perplexity ratio (95% CI) to the prompt alone and to every adapter baseline scored under
    the same prompt (the honest rivals of an adapter stacked on it; opt-in, so a column only
    where scored)."""
    rivals = ["in-context"] + [v for v in ordered_variants(results) if _stacks_baseline(v)]
    rows = []
    for setting, label in (("heldout", "held-out"), ("fold", "folds")):
        part = results[results["setting"] == setting]
        stacked = [v for v in ordered_variants(part)
                   if (spec := VARIANTS.get(registered_name(v))) is not None and spec.with_adapter]
        for variant in stacked:
            gap = gap_row(part, variant, resamples, seed)
            row = {"setting": label, "variant": variant, "gap recovered": format_ci(gap) if gap else "n/a"}
            for rival in _same_prompt(rivals, variant, results):
                ci = ratio_row(part, variant, rival, resamples, seed) if rival != variant else None
                row[f"/ {rival}"] = f"{format_ci(ci)} ({ci.wins}/{ci.n})" if ci else ""
            rows.append(row)
    return pd.DataFrame(rows).fillna("")  # a rival of another prompt: no entry


def _same_prompt(rivals: list[str], variant: str, results: pd.DataFrame) -> list[str]:
    """The rivals read under the prompt ``variant`` reads (a description-only prompt is judged
    against that prompt alone, not against one that also holds the demonstrations); a
    fine-tuned adapter also against the adapter it started from, under the same prompt."""
    spec, scored = VARIANTS[registered_name(variant)], set(results["variant"])
    chosen = rivals if spec.prompt_mode == "both" else [
        alone for alone in [prompt_alone(variant)] if alone in scored]
    label = variant[len(registered_name(variant)):]  # "[M]" of another run's, else ""
    # in-context+generated-finetuned[M] -> in-context+generated[M]
    start = f"in-context+{spec.with_adapter}{label}"
    if spec.finetune and start in scored:
        chosen = chosen + [start]
    # a draw with a condition -> the same generator's blind mode under the same prompt
    under, blind = VARIANTS[spec.with_adapter], f"in-context+generated-blind{label}"
    if (under.kind == "generated" and under.condition_scale != 0 and spec.prompt_mode == "both"
            and blind in scored):
        chosen = chosen + [blind]
    return chosen


def _stacks_baseline(variant: str) -> bool:
    """True for a registered variant that reads the prompt with an adapter baseline active."""
    spec = VARIANTS.get(variant)
    return spec is not None and spec.with_adapter is not None and is_baseline(spec.with_adapter)


def seen_table(results: pd.DataFrame, resamples: int, seed: int) -> pd.DataFrame:
    """Seen tasks: each variant's ppl ratio to the task's own trained LoRA, and dW cosine to it."""
    seen = results[results["setting"] == "seen"]
    rows = []
    for variant in [v for v in ordered_variants(seen) if v != "oracle"]:
        ratio = ratio_row(seen, variant, "oracle", resamples, seed)
        cosine = seen.loc[seen["variant"] == variant, "delta_cosine_to_oracle"].dropna()
        rows.append({"variant": variant, "ppl / trained LoRA [95% CI]": format_ci(ratio) if ratio else "",
                     "tasks": ratio.n if ratio else 0,
                     "median dW cosine to trained": f"{cosine.median():.3f}" if len(cosine) else ""})
    return pd.DataFrame(rows)


def per_task_table(results: pd.DataFrame, setting: str) -> pd.DataFrame:
    part = results[results["setting"] == setting]
    if not len(part):
        return pd.DataFrame()
    table = np.exp(task_log_ppl(part)).reset_index().drop(columns=["setting"])
    order = ["fold", "task", "group"] + [v for v in ordered_variants(part) if v in table.columns]
    table = table[order]
    if setting != "fold":
        table = table.drop(columns=["fold"])
    return table.sort_values([c for c in ("fold", "group", "task") if c in table.columns])


def markdown_report(results: pd.DataFrame, *, command: str, config_yaml: str, title: str,
                    resamples: int = 2000, seed: int = 0, folds: Sequence[Sequence[str]] = ()) -> str:
    lines = [f"# {title}", "", f"Produced by `{command}`; the resolved config is at the end.", "",
             "## Headline: tasks the generator never saw", "",
             "Gap recovered = (log ppl base - log ppl variant) / (log ppl base - log ppl oracle), "
             "median over tasks; the oracle is a LoRA trained on the task with the zoo's settings. "
             "Ratios are geometric means over tasks of ppl(generated) / ppl(baseline): below 1 the "
             f"generated adapter is better. 95% CIs: paired bootstrap over tasks and texts "
             f"({resamples} resamples). Wins: tasks where generated has the lower perplexity; p: "
             "exact two-sided sign test. Median task ratio (the every-variant tables): the median "
             "over tasks of the same per-task ratio, without an interval; where it and the "
             "geometric mean disagree, a few tasks carry the mean.", ""]
    headline = headline_table(results, folds, resamples, seed)
    lines += [headline.to_markdown(index=False) if len(headline) else "(no unseen tasks scored)", ""]
    generators = generators_table(results, resamples, seed)
    if len(generators):
        lines += ["## Each generator against each baseline (unseen tasks)", "",
                  "Perplexity ratio generator / baseline, geometric mean over tasks [95% CI] "
                  "(tasks the generator wins / tasks). Columns after the baselines, where scored, "
                  "are yardsticks, not rivals (oracle-projection: the zoo's span; below 1 the "
                  "generator left the span of the training tasks' LoRAs).", "",
                  generators.to_markdown(index=False), ""]
    stacked = stacked_table(results, resamples, seed)
    if len(stacked):
        lines += ["## Adapters stacked on the prompt (unseen tasks)", "",
                  "Each adapter active while the model reads the in-context prompt; perplexity "
                  "ratio to the prompt alone and to each adapter baseline scored under the same "
                  "prompt (the rivals of an adapter stacked on it) [95% CI] (wins / tasks). Below "
                  "1 against the prompt alone, the adapter adds to what the prompt gives.", "",
                  stacked.to_markdown(index=False), ""]
    for setting, heading in (("heldout", "Fixed held-out set: every variant"),
                             ("fold", "Group folds (pooled): every variant")):
        part = results[results["setting"] == setting]
        if len(part):
            table = comparison_table(part, resamples, seed)
            # numparse off: tabulate would turn "1.000" into "1" and "0.810" into "0.81"
            lines += [f"## {heading}", "", table.to_markdown(index=False, disable_numparse=True), ""]
    if (results["setting"] == "seen").any():
        lines += ["## Seen tasks: against their own trained LoRA", "",
                  "The replicate is an independent LoRA of the task (another data seed): its ratio is "
                  "the noise floor of 'as good as the trained LoRA'. The lookup is the mean of the "
                  "task's own snapshots. dW cosine compares B @ A per module, not the raw vectors.", "",
                  seen_table(results, resamples, seed).to_markdown(index=False), ""]
    spread = results.loc[results["variant"] == "generated-best-of-k", "draw_spread"].dropna() \
        if "draw_spread" in results else pd.Series(dtype=float)
    if len(spread):
        lines += [f"Spread of the generator's draws (mean distance from their mean / its norm): "
                  f"median {spread.median():.4f} over {len(spread)} tasks.", ""]
    lines += selection_lines(results)
    lines += ["## Variants", "", "| variant | what it is |", "|---|---|"]
    lines += [f"| {v} | {_describe(v)} |" for v in ordered_variants(results)]
    for setting in ("heldout", "fold", "seen"):
        table = per_task_table(results, setting)
        if len(table):
            lines += ["", f"## Per task ({setting}): eval perplexity", "",
                      table.to_markdown(index=False, floatfmt=".2f")]
    lines += ["", "## Resolved config", "", "```yaml", config_yaml.rstrip(), "```", ""]
    return "\n".join(lines)


def selection_lines(results: pd.DataFrame) -> list[str]:
    """What each selected variant (``demo-selected``) chose, counted per setting: the generator's
    draws as one candidate, each adapter by name."""
    if "selected_candidate" not in results:
        return []
    chosen = results.dropna(subset=["selected_candidate"])
    lines = []
    for (variant, setting), part in chosen.groupby(["variant", "setting"], sort=False):
        picks = part["selected_candidate"].map(lambda name: "a draw" if name.startswith("draw-") else name)
        counts = picks.value_counts()
        lines.append(f"{variant} on {setting} ({len(part)} tasks) chose: "
                     + ", ".join(f"{name} {count}" for name, count in counts.items()) + ".")
    return lines + [""] if lines else []


def _describe(variant: str) -> str:
    if variant in VARIANTS:
        return VARIANTS[variant].description
    base, _, label = variant.partition("[")
    what = VARIANTS[base].description if base in VARIANTS else variant
    return f"as {base}, from the generator of run '{label.rstrip(']')}': {what}"


def plot_per_task(results: pd.DataFrame, out: Path,
                  variants=("oracle", "generated", "similarity-soup", "soup", "nearest", "ridge",
                            "in-context", "multitask")) -> Path:
    """Per unseen task (held-out and folds): log-ppl gap recovered by each variant. A run that
    scored seen tasks only (``evaluate.heldout=false``) plots those instead, against their own
    trained LoRA (the seen tasks' oracle), so its plot is never an empty frame."""
    from matplotlib.figure import Figure

    unseen = results[results["setting"] != "seen"]
    tasks, title = unseen, "Unseen tasks (h = held-out set, f<k> = fold k)"
    if unseen.empty:
        tasks = results[results["setting"] == "seen"]
        title = "Seen tasks (s; oracle = the task's own trained LoRA)"
    fig = Figure(figsize=(12, 5))
    ax = fig.subplots()
    # The gap needs base and oracle; a run that scored only a generator (icm eval-compare's
    # other runs) has neither: its plot stays empty, the merged report draws it.
    if len(tasks) and {"base", "oracle"} <= set(tasks["variant"]):
        table = task_log_ppl(tasks)
        gap = (table["base"].values[:, None] - table.values) / (table["base"] - table["oracle"]).values[:, None]
        frame = pd.DataFrame(gap, index=table.index, columns=table.columns)
        present = [v for v in variants if v in frame.columns]
        labels = [f"{s[0]}{'' if f < 0 else int(f)}:{t}" for s, f, t, _ in frame.index]
        width = 0.8 / max(len(present), 1)
        for i, variant in enumerate(present):
            ax.bar(np.arange(len(frame)) + i * width, frame[variant].clip(-1, 1.5), width, label=variant)
        ax.set_xticks(np.arange(len(frame)) + 0.4 - width / 2)
        ax.set_xticklabels(labels, rotation=80, fontsize=5)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.axhline(0.0, color="grey", linewidth=0.6)
        ax.legend(fontsize=6, ncol=4)
    ax.set_ylabel("gap to oracle recovered (1 = oracle, 0 = base; clipped)")
    ax.set_title(title)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp.png")
    fig.tight_layout()
    fig.savefig(tmp, dpi=110)
    tmp.replace(out)
    return out


def headline_numbers(results: pd.DataFrame, resamples: int = 500, seed: int = 0) -> dict[str, float]:
    """A few numbers for the pipeline's summary line (NaN where a setting is missing)."""
    out: dict[str, float] = {}
    for setting in ("heldout", "fold"):
        part = results[results["setting"] == setting]
        gap = gap_row(part, HEADLINE_VARIANT, resamples, seed) if len(part) else None
        out[f"{setting}_gap_recovered_median"] = gap.estimate if gap else math.nan
        best = strongest_baseline(part) if len(part) else None
        versus = ratio_row(part, HEADLINE_VARIANT, best, resamples, seed) if best else None
        out[f"{setting}_ratio_to_strongest_baseline"] = versus.estimate if versus else math.nan
    return out
