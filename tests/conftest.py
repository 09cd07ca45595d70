"""Shared fixtures. Tests never touch a model hub: builtin models load from the package cache."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from icm.tasks import write_suite_meta, write_task  # noqa: E402
import jobs  # noqa: E402,F401  (registers the project's presets: --config smoke, demo, ...)

REPO_ROOT = Path(__file__).resolve().parent.parent

TINY_TASKS = {
    # name: (group, train texts, eval texts) - small but real-looking text
    "cats": ("animals", [f"The cat number {i} sat on the warm mat and purred." for i in range(12)],
             ["A grey cat chased the red ball across the floor.", "Cats sleep most of the day."]),
    "dogs": ("animals", [f"Dog {i} fetched the stick and wagged its tail happily." for i in range(12)],
             ["The old dog barked at the mailman.", "Dogs love long walks in the park."]),
    "sums": ("math", [f"{i} + {i + 1} = {2 * i + 1}" for i in range(12)],
             ["40 + 2 = 42", "17 + 25 = 42"]),
    "code": ("code", [f"def f{i}(x):\n    return x * {i}\n" for i in range(12)],
             ["def add(a, b):\n    return a + b\n", "def neg(x):\n    return -x\n"]),
}


def make_suite(root: Path, *, heldout=("dogs",), tasks=TINY_TASKS) -> Path:
    """Write a small valid suite under ``root`` and return its path."""
    for name, (group, train, evaluation) in tasks.items():
        write_task(root / name, name=name, description=f"Short texts about {name}.", group=group,
                   source="tests", license="CC0-1.0", train=train, eval=evaluation)
    write_suite_meta(root, name="tiny", heldout=list(heldout))
    return root


@pytest.hookimpl(optionalhook=True)  # an xdist hook: unknown when pytest runs without it
def pytest_xdist_make_scheduler(config, log):
    """The README test command runs ``pytest -n 2``: every integration test goes to one worker,
    in order (they start Ray clusters, Serve apps and vLLM engines, `ray job submit` and
    ``address="auto"`` lookups: two at once would collide), while the other worker runs the
    CPU-bound unit tests beside them, each on one CPU thread (tests/unit/conftest.py: with two,
    the lanes oversubscribed the cores; BENCHMARKS.md, "The test suite"). (Not ``--dist
    loadgroup``: with pytest 9.2 it silently stops grouping, pytest-xdist issue 1386.)"""
    from xdist.scheduler import LoadScopeScheduling

    class IntegrationInOneWorker(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return "integration" if nodeid.startswith("tests/integration/") else nodeid

    return IntegrationInOneWorker(config, log)


@pytest.fixture
def tiny_suite(tmp_path: Path) -> Path:
    return make_suite(tmp_path / "suite")


@pytest.fixture(scope="session")
def tiny_llama():
    from icm.models import load_base_model

    return load_base_model("tiny-llama")


@pytest.fixture(scope="session")
def smollm2():
    from icm.models import load_base_model

    return load_base_model("smollm2-135m")


@pytest.fixture(scope="session")
def default_suite(tmp_path_factory):
    """The real default suite, built once per test session from the installed packages."""
    from icm.default_suite import build_default_suite
    from icm.tasks import load_suite

    return load_suite(build_default_suite(tmp_path_factory.mktemp("default") / "suite"))


@pytest.fixture(scope="module")
def one_torch_thread():
    """Small tensors: one thread is fastest, and immune to a busy shared CPU."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
