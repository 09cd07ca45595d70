"""Measurement-only LoRAs: an oracle per held-out task and replicates of some seen tasks.

    python -m jobs.oracles --config study [key=value ...]      (or: icm oracles ...)

The same Ray Train + DeepSpeed trainers and the zoo's own settings as ``jobs.zoo``, into
their own folder ``<storage.root>/oracles/`` (same layout as the zoo). Nothing that trains, tunes
or feeds the generator reads that folder (a test watches every file those stages open); only
the evaluation does, to measure how much of the base -> oracle gap a generated adapter closes.
Resumable like the zoo: a finished LoRA is never retrained.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from icm.config import PipelineConfig
from icm.stages import open_suite
from icm.tasks import Suite
from jobs.common import ensure_writable_root, parse_job_args, user_errors_exit_2
from jobs.zoo import run_oracles


def run(cfg: PipelineConfig, suite: Suite) -> dict:
    return run_oracles(cfg, suite)


@user_errors_exit_2
def main(argv: Sequence[str] | None = None) -> int:
    cfg = parse_job_args(__doc__.split("\n\n")[0], argv)
    ensure_writable_root(cfg)
    record = run(cfg, open_suite(cfg))
    print(f"oracles: {record['outputs']['tasks']} LoRAs -> {record['outputs']['zoo']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
