"""Calibration: what a model's activations say about its weights, collected by running it on a text.

In pipeline order: `stats` (the observer that sums squared matmul inputs per weight, and the GGUF / legacy
.dat imatrix files llama-imatrix writes), `hessian` (the full input covariances X^T X, on request), `run`
(`compute_imatrix()`: the text, the chunks, the passes, saving and interrupts).
"""

from .run import FORMATS, ImatrixInterrupted, ImatrixResult, compute_imatrix
from .stats import ImatrixStats

__all__ = ["FORMATS", "ImatrixInterrupted", "ImatrixResult", "ImatrixStats", "compute_imatrix"]
