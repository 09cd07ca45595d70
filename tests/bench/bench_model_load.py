"""Base-model load time: SmolLM2 from its GGUF vs from the icm safetensors cache.

    python tests/bench/bench_model_load.py [--repeats 3]

Both loads run side by side in one process (imports warm), alternating, repeated; prints the
median of each and their ratio as a Markdown table for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

from icm.models import ensure_smollm2_cache, load_base_model, smollm2_gguf_path  # noqa: E402


def load_gguf():
    gguf = smollm2_gguf_path()
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    return AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)


def load_cache():
    return load_base_model("smollm2-135m")[0]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    hf_logging.disable_progress_bar()
    ensure_smollm2_cache()
    load_cache()  # warm imports and the page cache for both paths before timing
    times: dict[str, list[float]] = {"GGUF (model + tokenizer)": [], "icm cache (model + tokenizer)": []}
    for _ in range(args.repeats):
        for label, loader in zip(times, (load_gguf, load_cache)):
            started = time.perf_counter()
            loader()
            times[label].append(time.perf_counter() - started)
    medians = {label: statistics.median(values) for label, values in times.items()}
    gguf_median, cache_median = medians.values()
    print(f"| load path | median s (n={args.repeats}) | all runs s |\n|---|---|---|")
    for label, values in times.items():
        print(f"| {label} | {medians[label]:.2f} | {', '.join(f'{v:.2f}' for v in values)} |")
    print(f"\ncache speed-up: {gguf_median / cache_median:.0f}x")


if __name__ == "__main__":
    main()
