#!/usr/bin/env bash
# Wheels that scripts/gpu_check.sh needs on the lent GPU machine (Python 3.12, x86-64, no network),
# beyond what its image has (torch, transformers, accelerate, safetensors, pyyaml, tabulate, ...).
# Run here once; the wheels land in .whl/ (git-ignored) and travel with `carry: [.whl]`:
#   bash scripts/gpu_wheels.sh
#   then, there: WHEELS=.whl bash scripts/gpu_check.sh --model-dir .whl/smollm2-135m-shapes --random-weights
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qxF "/.whl/" .git/info/exclude 2>/dev/null || echo "/.whl/" >> .git/info/exclude
mkdir -p .whl
PIP=${PIP:-.venv/bin/python -m pip}
platforms="--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64"
# Binary wheels for the machine's CPython 3.12.
$PIP download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp $platforms \
    -d .whl pydantic==2.14.3 pydantic-core==2.50.4 annotated-types==0.8.0 typing-inspection==0.4.5 \
    platformdirs==4.14.7 filelock==4.2.11 peft==0.21.2 hjson==3.1.0 \
    transformers==5.23.0 tokenizers==0.23.3  # the pinned versions (the image has older ones)
# DeepSpeed ships as a source distribution: build its pure-Python wheel here (no ops compiled).
DS_BUILD_OPS=0 $PIP wheel -q --no-deps --no-build-isolation -w .whl deepspeed==0.19.8
# The default model's architecture and tokenizer, without its weights (the check builds it with
# random weights there: throughput does not depend on them, and the weights cannot travel).
cache=$(.venv/bin/python -c "from icm.models import ensure_smollm2_cache; print(ensure_smollm2_cache())")
mkdir -p .whl/smollm2-135m-shapes
cp "$cache"/config.json "$cache"/tokenizer.json "$cache"/tokenizer_config.json .whl/smollm2-135m-shapes/
ls -la .whl .whl/smollm2-135m-shapes
du -sh .whl
