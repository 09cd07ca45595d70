"""Every unit test on one CPU thread (torch's and, through OMP_NUM_THREADS, the commands it runs).

The README command runs the unit tests in one pytest-xdist worker beside the integration tests
in the other, on a 2-core box: a unit test's 2 torch threads plus the integration lane's work
oversubscribe the cores, and OpenMP threads spin-waiting for a core waste it (measured ~5x on
small tensors, tests/integration/test_serve.py). One thread each leaves a core to the
integration lane, which is the suite's length.
"""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def one_cpu_thread(monkeypatch):
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # subprocesses (`icm ...`, `python -m jobs ...`)
    yield
    torch.set_num_threads(before)
