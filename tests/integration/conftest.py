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
