"""How much a tensor's output error costs the model: one factor per tensor on its measured damage.

allocate.measure gives each tensor's calibration-weighted output error sum e H e^T; the allocation adds them
up, which is only right if a unit of error costs the model's KL divergence the same in every tensor. It
does not: the weightings here are factors per tensor (WEIGHTINGS).

    none   1 for every tensor.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

__all__ = ["WEIGHTINGS", "factors"]

WEIGHTINGS = ("none",)


def factors(weighting: str, model, names: Sequence[str], vectors: Mapping) -> list[float]:
    if weighting == "none":
        return [1.0] * len(names)
    raise ValueError(weighting)
