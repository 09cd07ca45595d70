"""icm.io's shared helpers: the cache directory and the inter-process file lock."""

from __future__ import annotations

import multiprocessing
import time
from pathlib import Path

from icm.io import default_cache_dir, file_lock


def test_cache_dir_honours_icm_cache_dir_then_xdg(monkeypatch, tmp_path):
    monkeypatch.setenv("ICM_CACHE_DIR", str(tmp_path / "mine"))
    assert default_cache_dir() == tmp_path / "mine"
    monkeypatch.delenv("ICM_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "icm-ray"


def _hold(path: str, seconds: float, ready) -> None:
    with file_lock(path):
        ready.set()
        time.sleep(seconds)


def test_file_lock_excludes_another_process(tmp_path):
    path = tmp_path / "locks" / "a.lock"  # the folder is created
    ready = multiprocessing.Event()
    holder = multiprocessing.Process(target=_hold, args=(str(path), 1.0, ready))
    holder.start()
    assert ready.wait(30)
    with file_lock(path, blocking=False) as taken:
        assert not taken  # held by the other process: refused at once
    started = time.perf_counter()
    with file_lock(path) as taken:  # blocks until the holder lets go
        assert taken and time.perf_counter() - started > 0.2
    holder.join(30)
    with file_lock(Path(path), blocking=False) as taken:
        assert taken
