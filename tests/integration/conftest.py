"""Fixtures shared by the integration modules."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def smol_generator(tmp_path_factory) -> Path:
    """One SmolLM2 generator (a 3-task LoRA zoo, task vectors, a CVAE: ~30 s) for every module
    that serves it through vLLM; they only read it."""
    from icm.models import SMOLLM2
    from tests.integration.test_serve import build_tiny_generator

    return build_tiny_generator(tmp_path_factory.mktemp("smol") / "generator", model_spec=SMOLLM2,
                                steps=8, snapshots=4)


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory):
    """The smoke pipeline, killed after its zoo and resumed from a URI root on a fresh mirror
    (tests/integration/smoke_pipeline.py): test_pipeline checks every stage of it, test_zoo its
    zoo. Modules only read it, or write under fresh mirrors and roots of their own."""
    from tests.integration.smoke_pipeline import killed_and_resumed_smoke_run

    return killed_and_resumed_smoke_run(tmp_path_factory.mktemp("pipeline"))
