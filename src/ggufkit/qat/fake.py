"""fake_quantize: a weight as llama.cpp will store it, with gradients for training through it.

Forward: the registry's own kernels, `dequantize(quantize(x, importance))`, run on the tensor's float32
numpy view; the values are the ones libggml's ggml_quantize_chunk + to_float give (the kernels are
byte-identical to it), so a model trained through this op holds, after conversion at the same type and
importance, exactly the weights it was trained with. Rows are the last dimension (ggml's rows: a
torch Linear weight [out, in] is quantized along `in`, as convert writes it), and must fill whole blocks.

Backward: the straight-through estimator, the identity, for every type and every element. Why no
clipping mask (the zero gradient outside the representable range that fixed-range QAT uses):
- the scales are recomputed from each block at every forward (for the searched types by llama.cpp's
  error search): they are constants of one step, with no gradient through the scale search, and there is
  no fixed range for a weight to leave; a weight pushed outward moves its block's scale at the next step.
- Q8_0, Q4_1, Q5_1 without importance fit the block's absolute max (Q8_0) or its min and max (Q4_1,
  Q5_1): nothing is clipped, only rounded. Q4_0 and Q5_0 map the signed max to -8 (-16) and so have one
  level less on the other side: a value there loses at most one step d, the size of a rounding error, and
  masking it alone would treat one rounding differently from the rest.
- the searched types (K-quants, IQ4, the legacy types with importance) may choose a scale that clips a
  few values of a block, because that minimized the block's (weighted) error; a zero gradient would
  freeze exactly the weights whose outward pull the next search should see.
- F16 and BF16 round each value; only F16's overflow (|x| >= 65520 -> inf) clips, far outside any weight.
The importance vector gets no gradient.
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import QuantizeError
from ..quants import registry


def _format(qtype) -> registry.BlockFormat:
    if isinstance(qtype, registry.BlockFormat):
        return qtype
    try:
        return registry.get_format(qtype)
    except ValueError as e:
        raise QuantizeError(f"fake_quantize: {e}") from None


def _importance(importance, fmt: registry.BlockFormat, n_per_row: int) -> np.ndarray | None:
    """llama.cpp's imatrix row for this tensor as float32 [n_per_row], or None (ignored by the formats
    without an importance-weighted algorithm, as registry.quantize and llama.cpp ignore it)."""
    if importance is None:
        return None
    if isinstance(importance, torch.Tensor):
        importance = importance.detach().to("cpu", torch.float32).numpy()
    imp = np.ascontiguousarray(importance, dtype=np.float32)
    if imp.shape != (n_per_row,):
        raise QuantizeError(
            f"fake_quantize {fmt.name}: importance must have shape ({n_per_row},) (the row length), "
            f"got {tuple(imp.shape)}"
        )
    return imp if fmt.uses_importance else None


def _check(x, fmt: registry.BlockFormat) -> None:
    if not isinstance(x, torch.Tensor):
        raise QuantizeError(f"fake_quantize {fmt.name}: expected a torch tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise QuantizeError(f"fake_quantize {fmt.name}: expected a floating-point tensor, got {x.dtype}")
    if x.dim() == 0 or x.shape[-1] == 0 or x.shape[-1] % fmt.block_size:
        raise QuantizeError(
            f"fake_quantize {fmt.name}: the row length (last dimension) must be a positive multiple of "
            f"the block size {fmt.block_size}; got shape {tuple(x.shape)}"
        )


def fake_quantize_numpy(x: np.ndarray, fmt: registry.BlockFormat, importance: np.ndarray | None):
    """dequantize(quantize(x)) of float32 rows [..., n_per_row], through the registry's kernels."""
    rows = np.ascontiguousarray(x, dtype=np.float32).reshape(-1, x.shape[-1])
    data = registry.quantize(rows, fmt.ggml_type, importance=importance)
    return registry.dequantize(data, fmt.ggml_type, rows.shape).reshape(x.shape)


class FakeQuantize(torch.autograd.Function):
    """forward(x, fmt, importance) = dequantize(quantize(x)); backward = the identity (see the module)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, fmt: registry.BlockFormat, importance: np.ndarray | None):
        view = x.detach().to("cpu", torch.float32).contiguous().numpy()
        out = fake_quantize_numpy(view, fmt, importance)
        return torch.from_numpy(out).to(device=x.device, dtype=x.dtype)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        return grad_output, None, None


def fake_quantize(x: torch.Tensor, qtype, importance=None) -> torch.Tensor:
    """x as llama.cpp stores it at `qtype` (any registry format: name, ggml type id or BlockFormat), with the
    straight-through gradient.

    x: a floating tensor of any shape whose last dimension (the row) is a multiple of the type's block
    size; computed in float32 on the CPU and returned in x's dtype and device (bit-exact in float32; for
    float16 / bfloat16 inputs the float32 result is then rounded to that dtype).
    importance: llama.cpp's imatrix row for the tensor ([row length], torch or numpy, cast to float32),
    used by the types with an importance-weighted algorithm and ignored by the others, as llama-quantize
    does. Raises QuantizeError for an unknown type, a non-floating tensor, or a row that does not fill
    whole blocks.
    """
    fmt = _format(qtype)
    _check(x, fmt)
    return FakeQuantize.apply(x, fmt, _importance(importance, fmt, x.shape[-1]))
