"""The benchmark scripts start: each imports, and those that read presets can find them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BENCH = sorted((Path(__file__).resolve().parents[1] / "bench").glob("bench_*.py"))


@pytest.mark.parametrize("script", [s for s in BENCH if "load_config" in s.read_text()], ids=lambda s: s.stem)
def test_a_bench_that_reads_presets_can_find_the_study_preset(script):
    # Run as the README runs it (a script, not a package import): the presets come from `jobs`.
    code = (f"import runpy, sys; sys.argv = [{str(script)!r}]; "
            f"runpy.run_path({str(script)!r}, run_name='bench'); "
            "from icm.config import load_config; load_config('study')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]


def test_zoo_steps_bench_reads_snapshots_in_step_order_and_names_a_wrong_folder(tmp_path):
    import json
    import runpy

    bench = runpy.run_path(str(BENCH[0].with_name("bench_zoo_steps.py")), run_name="bench")
    for step in (96, 24, 48):  # written out of order; folder names are zero-padded steps
        folder = tmp_path / "tasks" / "t" / "snapshots" / f"step-{step:06d}"
        folder.mkdir(parents=True)
        (folder / "snapshot.json").write_text(json.dumps({"step": step}))
    found = bench["snapshot_folders"](tmp_path, ["t", "not-trained"])
    assert list(found) == ["t"] and [step for step, _ in found["t"]] == [24, 48, 96]
    with pytest.raises(SystemExit, match="pass the longer run's zoo/ folder"):
        bench["snapshot_folders"](tmp_path / "evaluate", ["t"])
