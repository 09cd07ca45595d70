"""Offline vLLM engine throughput (no Ray, no HTTP): what the engine itself gives on this machine,
to tell the engine's cost from the serving stack's.

    python tests/bench/bench_vllm_engine.py --adapters DIR [DIR ...] --prompts 16
    python tests/bench/bench_vllm_engine.py --adapters DIR --target-modules q_proj v_proj
    python tests/bench/bench_vllm_engine.py --no-lora

``--prompts`` completions of ``--tokens`` tokens (greedy, EOS ignored) submitted at once, adapters
assigned round-robin; one warm-up, then ``--rounds`` rounds; prints tokens/s of each and their
median as one Markdown row. Engine settings travel as environment (VLLM_CPU_OMP_THREADS_BIND,
OMP_NUM_THREADS, VLLM_CPU_KVCACHE_SPACE) exactly as Serve passes them to a replica. vLLM starts
its engine with spawn: this file keeps its work under the main guard.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


def measure(args) -> list[float]:
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    from icm.models import weights_location

    lora = dict(enable_lora=True, max_loras=max(1, len(args.adapters)), max_lora_rank=16,
                lora_target_modules=args.target_modules) if args.adapters else {}
    llm = LLM(model=weights_location(args.model), dtype=args.dtype, max_model_len=512,
              max_num_seqs=max(64, args.prompts), **lora)
    params = SamplingParams(temperature=0, max_tokens=args.tokens, ignore_eos=True)
    requests = [LoRARequest(f"adapter{i}", i + 1, str(Path(d).resolve()))
                for i, d in enumerate(args.adapters)]
    per_prompt = [requests[i % len(requests)] for i in range(args.prompts)] if requests else None
    prompts = [args.prompt] * args.prompts
    llm.generate(prompts[:2], params, lora_request=per_prompt[:2] if per_prompt else None)
    rates = []
    for _ in range(args.rounds):
        started = time.perf_counter()
        outputs = llm.generate(prompts, params, lora_request=per_prompt, use_tqdm=False)
        tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
        rates.append(tokens / (time.perf_counter() - started))
    return rates


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    lora = parser.add_mutually_exclusive_group(required=True)
    lora.add_argument("--adapters", nargs="+", help="peft adapter folders (generated adapters)")
    lora.add_argument("--no-lora", action="store_true", help="base model, LoRA off")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--target-modules", nargs="+", default=None,
                        help="vLLM lora_target_modules (default: every module vLLM supports)")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--prompt", default="The cat")
    args = parser.parse_args(argv)
    args.adapters = args.adapters or []
    rates = measure(args)
    env = " ".join(f"{k}={os.environ[k]}" for k in ("VLLM_CPU_OMP_THREADS_BIND", "OMP_NUM_THREADS")
                   if k in os.environ) or "-"
    print("| adapters | target modules | prompts | env | tokens/s per round | median |")
    print("|--:|:--|--:|:--|:--|--:|")
    print(f"| {len(args.adapters)} | {' '.join(args.target_modules or ['all'])} | {args.prompts} | "
          f"{env} | {' / '.join(f'{r:.1f}' for r in rates)} | {statistics.median(rates):.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
