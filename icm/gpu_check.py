"""A prepared accelerator check of the icm core, Ray-free (``scripts/gpu_check.sh`` runs it).

    python -m icm.gpu_check [--model SPEC | --model-dir DIR --random-weights] [--quick] [--out F]

On one CUDA GPU it measures, and prints as a table:

    lora-deepspeed    LoRA steps through ``deepspeed.initialize`` (bf16, NCCL), tokens/s
    task-vectors      frozen-model forward passes of in-context prompts (`TaskEncoder`), prompts/s
    generator-<arch>  reconstruction training steps of the mlp and hyper generators, steps/s
    generate          adapter generation (`LoraGenerator.sample`), median ms per adapter
    generator-lm      the `lm` objective: hyper-generator steps through the frozen model, steps/s
    vllm              vLLM's multi-LoRA engine with a generated adapter, output tokens/s

It runs on the CPU as well (gloo, float32; ``--quick`` shrinks every section), so it is known to
work before it first meets a GPU: the tests run it that way. A section that cannot run (vLLM not
installed) is reported as skipped, one that fails as failed with its error, and the others still
run. ``--model-dir DIR --random-weights`` builds the architecture of ``DIR/config.json`` with
random weights (throughput does not depend on the weights), for machines where the model's
weights cannot travel.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch


def load_model(args) -> tuple[Any, Any, str]:
    """(model, tokenizer, what was loaded) on the check's device and dtype."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from icm.models import load_base_model

    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    if args.model_dir:
        tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        if args.random_weights:
            config = AutoConfig.from_pretrained(args.model_dir)
            torch.manual_seed(0)
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
            label = f"{args.model_dir} (random weights)"
        else:
            model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=dtype)
            label = args.model_dir
        return model.to(args.device).eval(), tokenizer, label
    model, tokenizer = load_base_model(args.model, dtype="bfloat16" if args.device == "cuda" else "float32",
                                       device=args.device)
    return model, tokenizer, args.model


def _texts(n: int, chars: int = 400) -> list[str]:
    words = ("the model reads a few examples of a task and writes an adapter for it while the "
             "cluster trains many small adapters at once and a generator learns them all ").split()
    return [" ".join(words[(i + j) % len(words)] for j in range(chars // 5))[:chars] for i in range(n)]


# ----------------------------------------------------------------------------- sections


def check_lora_deepspeed(ctx: dict) -> dict:
    """LoRA training steps through DeepSpeed (ZeRO-2; bf16 + NCCL on CUDA, fp32 + gloo on CPU)."""
    import deepspeed

    from icm.config import ZooConfig
    from icm.io import free_port
    from icm.lora_train import (build_lora_model, collate, deepspeed_config, release_engine,
                                skip_deepspeed_shm_build, step_seed, tokenize_texts, train_step)

    os.environ.update({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0",
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())})
    skip_deepspeed_shm_build()
    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if ctx["device"] == "cuda" else "gloo")
    steps, batch, seq = (3, 2, 32) if ctx["quick"] else (30, 8, 256)
    zoo = ZooConfig(steps=steps + 2, batch_size=batch, seq_len=seq, lr=1e-4)
    model = build_lora_model(ctx["model"], zoo)
    engine, *_ = deepspeed.initialize(
        model=model, config=deepspeed_config(zoo, world_size=1, bf16=ctx["device"] == "cuda"),
        model_parameters=[p for p in model.parameters() if p.requires_grad])
    sequences = tokenize_texts(ctx["tokenizer"], _texts(batch, chars=seq * 6), seq)
    data = collate(sequences, ctx["tokenizer"].pad_token_id)
    for step in range(2):  # warm-up: kernels, allocator
        train_step(engine, data, seed=step_seed(0, step))
    _sync(ctx)
    started = time.perf_counter()
    for step in range(2, steps + 2):
        train_step(engine, data, seed=step_seed(0, step))
    _sync(ctx)
    seconds = time.perf_counter() - started
    tokens = int(data["attention_mask"].sum()) * steps
    release_engine(engine)
    ctx["model"] = model.unload() if hasattr(model, "unload") else ctx["model"]  # the bare model back
    return {"value": tokens / seconds, "unit": "tokens/s",
            "detail": f"{steps} steps of {batch} x {seq} tokens, LoRA r={zoo.rank} on {list(zoo.target_modules)}"}


def check_task_vectors(ctx: dict) -> dict:
    """Pooled hidden states of in-context prompts (description + 5 demonstrations)."""
    from icm.config import TaskVectorConfig
    from icm.task_vectors import TaskEncoder, format_prompt

    count = 8 if ctx["quick"] else 256
    cfg = TaskVectorConfig(batch_size=8 if ctx["quick"] else 32, max_prompt_tokens=512)
    encoder = TaskEncoder(ctx["model"], ctx["tokenizer"], cfg)
    prompts = [format_prompt("Short texts about adapters.", _texts(5, 200), mode="both")] * count
    with torch.inference_mode():
        encoder.encode_prompts(prompts[:cfg.batch_size])  # warm-up
        _sync(ctx)
        started = time.perf_counter()
        vectors = encoder.encode_prompts(prompts)
        _sync(ctx)
    seconds = time.perf_counter() - started
    ctx["condition_dim"] = next(iter(vectors.values())).shape[1]
    return {"value": count / seconds, "unit": "prompts/s",
            "detail": f"{count} prompts of {encoder.count_tokens(prompts[0])} tokens, batch {cfg.batch_size}"}


def _synthetic_zoo(ctx: dict):
    """A zoo of the model's real LoRA layout with random low-rank snapshots and conditions."""
    import numpy as np

    from icm.config import ZooConfig
    from icm.generator.inputs import ZooData
    from icm.lora_io import LoraLayout, adapter_state_dict
    from icm.lora_train import build_lora_model

    if "zoo" not in ctx:
        zoo_cfg = ZooConfig()
        peft_model = build_lora_model(_fresh_model(ctx), zoo_cfg)
        layout = LoraLayout.of(adapter_state_dict(peft_model))
        with tempfile.TemporaryDirectory() as folder:  # the adapter_config.json a real zoo holds
            peft_model.save_pretrained(folder)
            peft_config = json.loads(Path(folder, "adapter_config.json").read_text())
        tasks, snapshots = (4, 3) if ctx["quick"] else (48, 6)
        g = torch.Generator().manual_seed(0)
        dim = ctx.get("condition_dim", 64)
        vectors = {f"t{i}": torch.randn(snapshots, layout.numel, generator=g) * 0.01 for i in range(tasks)}
        conditions = {t: np.random.default_rng(i).normal(size=(4, dim)).astype(np.float32)
                      for i, t in enumerate(vectors)}
        ctx["zoo"] = (ZooData(layout, vectors, "gpu-check", peft_config,
                              zoo_cfg.model_dump(mode="json")), conditions)
    return ctx["zoo"]


def _fresh_model(ctx: dict):
    """A copy of the base model on the CPU (only its LoRA layout is read)."""
    import copy

    return copy.deepcopy(ctx["model"]).to("cpu").float()


def check_generator(arch: str) -> Callable[[dict], dict]:
    def run(ctx: dict) -> dict:
        from icm.config import GeneratorConfig
        from icm.generator import train_generator

        zoo, conditions = _synthetic_zoo(ctx)
        steps = 20 if ctx["quick"] else 300
        extra = {"subspace_dim": None, "width": 256} if arch == "hyper" else {}
        cfg = GeneratorConfig(arch=arch, steps=steps, report_every=steps, batch_size=64,
                              val_tasks=0, val_snapshots=0, **extra)
        generator = train_generator(zoo, conditions, cfg, device=ctx["device"])
        summary = generator.summary
        ctx[f"generator-{arch}"] = generator
        return {"value": summary["steps"] / summary["train_seconds"], "unit": "steps/s",
                "detail": f"batch 64, L = {zoo.layout.numel:,} LoRA values, "
                          f"{len(zoo.vectors)} tasks x {len(next(iter(zoo.vectors.values())))} snapshots"}
    return run


def check_generate(ctx: dict) -> dict:
    """One adapter from one task vector (z ~ N(0, I), de-normalised), median over calls."""
    generator = ctx.get("generator-mlp") or ctx.get("generator-hyper")
    if generator is None:
        return {"skipped": "no generator was trained"}
    generator.to(ctx["device"])
    condition = torch.randn(generator.condition_dim).numpy()
    times = []
    for index in range(5 if ctx["quick"] else 100):
        started = time.perf_counter()
        generator.sample(condition, seed=index)
        _sync(ctx)
        times.append(time.perf_counter() - started)
    generator.to("cpu")
    return {"value": 1000 * statistics.median(times[1:] or times), "unit": "ms/adapter",
            "detail": f"{generator.config.arch} generator, median of {len(times)} calls"}


def check_generator_lm(teacher_weight: float = 0.0) -> Callable[[dict], dict]:
    """The `lm` objective's cost: hyper-generator steps by the frozen model's LM loss with the
    generated LoRA applied (lm_tasks x lm_texts texts of lm_seq_len tokens per step). With
    ``teacher_weight`` (generator.lm_teacher_weight) the base model also reads each text after
    a prompt of two 400-character demonstrations, the teacher's extra forward pass."""

    def run(ctx: dict) -> dict:
        import copy

        from icm.generator.lm import FunctionalLora, fit_lm, lm_tasks

        generator = ctx.get("generator-hyper")
        if generator is None:
            return {"skipped": "no hyper generator was trained (add generator-hyper to --sections)"}
        zoo, conditions = _synthetic_zoo(ctx)
        steps = 2 if ctx["quick"] else 40
        cfg = generator.config.model_copy(update={
            "objective": "lm", "lm_steps": steps, "report_every": steps,
            "lm_tasks": ctx["lm_tasks"], "lm_texts": ctx["lm_texts"],
            "lm_seq_len": 32 if ctx["quick"] else 64, "lm_teacher_weight": teacher_weight})
        generator.to(ctx["device"])
        # A copy: the wrapper injects LoRA layers into the model, which vLLM's section saves bare.
        applier = FunctionalLora(copy.deepcopy(ctx["model"]), zoo.peft_config, zoo.layout)
        texts = {name: _texts(8, 400) for name in conditions}
        tasks = lm_tasks(texts, conditions, generator, ctx["tokenizer"], cfg,
                         _demo_prompts(texts, conditions) if teacher_weight else None)
        pad_id = ctx["tokenizer"].pad_token_id or 0
        warm_up = cfg.model_copy(update={"lm_steps": 1})
        fit_lm(generator, applier, tasks, warm_up, pad_id=pad_id)
        _sync(ctx)
        result = fit_lm(generator, applier, tasks, cfg, pad_id=pad_id)
        _sync(ctx)
        generator.to("cpu")
        prompt = (f", a teacher prompt of {len(tasks[0].teacher.prompts[0])} tokens"
                  if teacher_weight else "")
        return {"value": result.steps / result.train_seconds, "unit": "steps/s",
                "detail": f"{min(cfg.lm_tasks, len(tasks))} tasks x {cfg.lm_texts} texts x "
                          f"{cfg.lm_seq_len} tokens per step{prompt}, final train loss "
                          f"{result.history[-1]['train_lm_nll']:.2f}"}

    return run


def _demo_prompts(texts: dict[str, list[str]], conditions: dict) -> dict[str, list]:
    """Per task, one demonstrations prompt per condition row: its first two texts (never a
    target under it)."""
    from icm.generator.lm import EpisodePrompt
    from icm.task_vectors import format_prompt

    return {name: [EpisodePrompt(format_prompt(None, texts[name][:2], mode="demos"),
                                 tuple(texts[name][:2]))] * len(conditions[name])
            for name in texts}


def check_vllm(ctx: dict) -> dict:
    """vLLM with LoRA enabled: the base model plus one generated adapter, greedy decoding."""
    try:
        from vllm import LLM, SamplingParams
        from vllm.lora.request import LoRARequest
    except ImportError as err:
        return {"skipped": f"vllm is not installed ({err.name})"}
    generator = ctx.get("generator-mlp")
    if generator is None or ctx["device"] != "cuda":
        return {"skipped": "needs a GPU and a trained generator"}
    with tempfile.TemporaryDirectory() as folder:
        ctx["model"].save_pretrained(f"{folder}/model")
        ctx["tokenizer"].save_pretrained(f"{folder}/model")
        adapter = generator.write_adapter(generator.sample(torch.randn(generator.condition_dim).numpy())[0],
                                          f"{folder}/adapter")
        llm = LLM(model=f"{folder}/model", enable_lora=True, max_lora_rank=8, dtype="bfloat16",
                  gpu_memory_utilization=0.5)
        params = SamplingParams(max_tokens=128, temperature=0.0, ignore_eos=True)
        prompts = _texts(64, 200)
        llm.generate(prompts[:4], params, lora_request=LoRARequest("gen", 1, str(adapter)))  # warm-up
        started = time.perf_counter()
        outputs = llm.generate(prompts, params, lora_request=LoRARequest("gen", 1, str(adapter)))
        seconds = time.perf_counter() - started
    tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    return {"value": tokens / seconds, "unit": "output tokens/s",
            "detail": f"{len(prompts)} prompts x 128 tokens, one LoRA"}


SECTIONS: dict[str, Callable[[dict], dict]] = {
    "lora-deepspeed": check_lora_deepspeed,
    "task-vectors": check_task_vectors,
    "generator-mlp": check_generator("mlp"),
    "generator-hyper": check_generator("hyper"),
    "generate": check_generate,
    "generator-lm": check_generator_lm(),
    "generator-lm-teacher": check_generator_lm(teacher_weight=0.5),
    "vllm": check_vllm,
}


def _sync(ctx: dict) -> None:
    if ctx["device"] == "cuda":
        torch.cuda.synchronize()


def run_checks(args) -> list[dict]:
    model, tokenizer, label = load_model(args)
    ctx = {"device": args.device, "quick": args.quick, "model": model, "tokenizer": tokenizer,
           "lm_tasks": args.lm_tasks, "lm_texts": args.lm_texts}
    rows = []
    for name in args.sections or list(SECTIONS):
        started = time.perf_counter()
        try:
            with _profiled(name in (args.profile or ()), ctx["device"], name):
                result = SECTIONS[name](ctx)
        except Exception as err:  # noqa: BLE001 - one broken section must not hide the others
            result = {"failed": f"{type(err).__name__}: {err}", "trace": traceback.format_exc(limit=6)}
        rows.append({"section": name, "model": label, "seconds": round(time.perf_counter() - started, 1),
                     **result})
        print(_line(rows[-1]), flush=True)
    return rows


@contextlib.contextmanager
def _profiled(enabled: bool, device: str, name: str):
    """With ``enabled``, torch.profiler around a section: its busiest ops by self time on the
    device (CPU time on the CPU), and the device's busy share of the wall time, to stdout."""
    if not enabled:
        yield
        return
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    started = time.perf_counter()
    with profile(activities=activities) as prof:
        yield
    wall = time.perf_counter() - started
    events = prof.key_averages()
    sort_by = "self_device_time_total" if device == "cuda" else "self_cpu_time_total"
    print(f"--- profile of {name}: {wall:.1f} s wall", flush=True)
    if device == "cuda":
        from torch.autograd import DeviceType

        # Kernels' own rows only: a CPU op's row also carries the time of the kernels it launched.
        busy = sum(e.self_device_time_total for e in events
                   if e.device_type == DeviceType.CUDA and not getattr(e, "is_user_annotation", False)
                   ) / 1e6  # us -> s
        print(f"device busy {busy:.2f} s ({100 * busy / wall:.0f}% of wall)", flush=True)
    print(events.table(sort_by=sort_by, row_limit=15, max_name_column_width=60), flush=True)


def _line(row: dict) -> str:
    if "value" in row:
        return f"{row['section']:<16} {row['value']:>12.1f} {row['unit']:<16} {row['detail']}"
    status = "skipped" if "skipped" in row else "FAILED"
    return f"{row['section']:<16} {status:>12} {'':<16} {row.get('skipped') or row.get('failed')}"


def environment(device: str) -> dict:
    info = {"torch": torch.__version__, "device": device, "python": sys.version.split()[0]}
    if device == "cuda":
        info.update(gpu=torch.cuda.get_device_name(0), capability=".".join(map(str, torch.cuda.get_device_capability(0))),
                    bf16=torch.cuda.is_bf16_supported())
    return info


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m", help="model spec (icm.models)")
    parser.add_argument("--model-dir", help="a folder with config.json and tokenizer files")
    parser.add_argument("--random-weights", action="store_true",
                        help="with --model-dir: the architecture with random weights")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (the CPU smoke test)")
    parser.add_argument("--sections", nargs="*", choices=list(SECTIONS), help="default: all")
    parser.add_argument("--out", help="write the rows and the environment as JSON here")
    parser.add_argument("--lm-tasks", type=_positive, default=4, help="generator-lm: tasks per step")
    parser.add_argument("--lm-texts", type=_positive, default=4, help="generator-lm: texts per task and step")
    parser.add_argument("--profile", nargs="*", choices=list(SECTIONS),
                        help="sections to run under torch.profiler (busiest ops to stdout)")
    args = parser.parse_args(argv)
    from icm.logs import quiet_known_noise

    quiet_known_noise()
    env = environment(args.device)
    print("gpu-check: " + ", ".join(f"{k} {v}" for k, v in env.items()), flush=True)
    rows = run_checks(args)
    if args.out:
        Path(args.out).write_text(json.dumps({"environment": env, "rows": rows}, indent=2, default=str))
    return 1 if any("failed" in row for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
