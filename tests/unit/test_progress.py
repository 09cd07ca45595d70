"""Live progress: plain log lines (no carriage returns) off a terminal, rate and ETA."""

from __future__ import annotations

import io
import logging
import time

from icm.progress import FileCountWatcher, Progress


def test_off_a_terminal_it_logs_done_total_rate_and_eta(caplog):
    caplog.set_level(logging.INFO, logger="icm.progress")
    progress = Progress("zoo", 10, "LoRAs", initial=2, interval=0.0, stream=io.StringIO())
    assert progress.bar is None
    time.sleep(0.05)
    progress.update(4)
    progress.update(4)  # no change: no line
    progress.update(10)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2 and lines[0].startswith("zoo: 4/10 LoRAs (40%)")
    assert "/min, ETA" in lines[0] and lines[1].startswith("zoo: 10/10 LoRAs (100%)")
    assert not any("\r" in line for line in lines)


def test_lines_are_throttled_but_the_end_is_always_logged(caplog):
    caplog.set_level(logging.INFO, logger="icm.progress")
    progress = Progress("evaluate", 5, "items", interval=3600, stream=io.StringIO())
    for done in range(1, 6):
        progress.update(done)
    assert [r.getMessage()[:21] for r in caplog.records] == ["evaluate: 5/5 items ("]


def test_watcher_polls_a_count_until_closed(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="icm.progress")
    progress = Progress("zoo", 3, "LoRAs", interval=0.0, stream=io.StringIO())
    with FileCountWatcher(progress, lambda: len(list(tmp_path.glob("*.json"))), period=0.05):
        for name in ("a", "b"):
            (tmp_path / f"{name}.json").write_text("{}")
            time.sleep(0.3)
        assert progress.done == 2
        (tmp_path / "c.json").write_text("{}")
    assert progress.done == 3 and caplog.records[-1].getMessage().startswith("zoo: 3/3")
