#!/usr/bin/env bash
# Another generator on a finished study run, beside that run's baselines (one EVAL row per
# generator, paired text by text):
#
#   bash scripts/compare_generators.sh LABEL [generator.key=value ...]
#   bash scripts/compare_generators.sh hyper generator.arch=hyper generator.subspace_dim=null
#
# It reuses the reference run's zoo, oracles and task vectors (symlinks; nothing is retrained),
# trains the generator and every fold generator anew in <reference>-LABEL/, scores only the
# `generated` variant on the same tasks and texts, and writes <reference>-LABEL/EVAL-compare.md
# with `icm eval-compare`. The reference is icm-runs/study (STUDY_ROOT to change it; PRESET for
# another preset). Resumable like any run: rerun the same command after a kill.
set -euo pipefail
if [ $# -lt 1 ]; then
    echo "usage: $0 LABEL [generator.key=value ...]" >&2
    exit 2
fi
label=$1
shift
reference=${STUDY_ROOT:-icm-runs/study}
preset=${PRESET:-study}
root="${reference%/}-${label}"
if [ ! -f "$reference/evaluate/results.parquet" ]; then
    echo "$reference/evaluate/results.parquet is missing: run 'icm run --config $preset' first" >&2
    exit 2
fi
mkdir -p "$root"
for stage in zoo oracles task_vectors; do
    [ -e "$root/$stage" ] || ln -s "$(realpath "$reference/$stage")" "$root/$stage"
done
icm run --config "$preset" "storage.root=$root" "stages=[generator,evaluate]" \
    "evaluate.variants=[generated]" evaluate.seen_tasks=0 "$@"
icm eval-compare --reference "$reference/evaluate" --run "$label=$root/evaluate" \
    --out "$root/EVAL-compare.md"
