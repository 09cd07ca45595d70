"""icm.zoo without training: the loss plot (Figure API, no pyplot state)."""

from __future__ import annotations

import json
import subprocess
import sys


def test_loss_plot_draws_every_task_without_pyplot(tmp_path):
    for task, offset in (("cats", 0.0), ("sums", 0.5)):
        folder = tmp_path / "tasks" / task
        folder.mkdir(parents=True)
        (folder / "losses.json").write_text(json.dumps([[s, 3.0 - 0.1 * s + offset] for s in range(1, 9)]))
    code = ("import sys; from pathlib import Path; from icm.zoo import plot_losses\n"
            f"out = plot_losses(Path({str(tmp_path)!r}))\n"
            "assert out.stat().st_size > 5000, out.stat().st_size\n"
            "assert 'matplotlib.pyplot' not in sys.modules\n")
    subprocess.run([sys.executable, "-c", code], check=True)
    assert (tmp_path / "losses.png").is_file() and not list(tmp_path.glob("*.tmp.png"))
