"""The converter's transforms applied: a planned tensor's data read from the checkpoint, transformed, and
checked finite, as the block kernels take it (convert_hf_to_gguf.py's modify_tensors and
prepare_tensors; spec §2.3).

Transforms (in this order, as tensors.plan_tensors records them on each ConvertTensor):
  1. a BF16 tensor is widened to float32 (exact); F16 and F32 stay as they are;
  2. llama/mistral: q_proj rows permuted per head (rows [0, d/2) and [d/2, d) interleaved: new row 2i = old
     row i, 2i+1 = old d/2+i; k_proj with the KV head count); gemma3: the embedding cut to the vocabulary's
     real size, and every `*norm.weight` + 1.0 computed in the tensor's current dtype (float16 for an F16
     checkpoint: the sum in float32 then rounded to half, as torch does it on the CPU).
The result is in the tensor's "work" type (ConvertTensor.work_type): F16 when the checkpoint holds it as
F16 and the transforms keep it so, BF16 when it is BF16 and nothing changes its values (a BF16 -> F32 -> X
widening is exact, so the kernels' BF16 input gives the same bytes), float32 otherwise.
"""

from __future__ import annotations

from ..errors import ConvertError
from ..gguf.types import GGMLQuantizationType as T
from .hparams import rope_freqs
from .tensors import ConvertTensor

__all__ = ["work_array"]


def _bf16_bits_to_f32(bits):
    import numpy as np

    return (bits.astype(np.uint32) << 16).view(np.float32)


def work_array(ckpt, t: ConvertTensor, hparams: dict):
    """The tensor after the transforms, in t.work_type: float32, float16, or uint16 BF16 bit patterns;
    C-contiguous, numpy shape t.shape. Refuses NaN and infinities by tensor name (ConvertError).

    Untransformed, it is a view of the checkpoint's map, whose pages the check releases span by span
    behind it (Checkpoint.release), so checking a large tensor does not make it all resident at once;
    transformed, it is a copy, and the checkpoint's pages are released when it is made."""
    import numpy as np

    if t.src is None:
        return rope_freqs(hparams)
    data = raw = ckpt.read(t.src)
    if t.keep_rows is not None:
        data = data[: t.keep_rows]
    if t.src_dtype == "BF16" and t.work_type == T.F32:
        data = _bf16_bits_to_f32(data)
    if t.permute_heads:
        n = t.permute_heads
        shape = data.shape
        data = data.reshape(n, 2, shape[0] // n // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)
    if t.add_one:
        if data.dtype == np.float16:
            data = (data.astype(np.float32) + np.float32(1.0)).astype(np.float16)
        else:
            data = data.astype(np.float32) + np.float32(1.0)
    data = np.ascontiguousarray(data)
    if np.may_share_memory(data, raw):  # a prefix of the stored tensor: element i is at byte i * itemsize
        size = data.itemsize
        _check_finite(t, data, done=lambda a, b: ckpt.release(t.src, a * size, b * size))
    else:
        ckpt.release(t.src)
        _check_finite(t, data)
    return data


_CHECK_SPAN = 1 << 20  # elements per step of the check: its temporaries stay a few MB


def _check_finite(t: ConvertTensor, data, done=None) -> None:
    """ConvertError naming the first non-finite element's row, if any; done(begin, end) after each span of
    elements is checked."""
    import numpy as np

    flat = data.reshape(-1)
    for start in range(0, flat.size, _CHECK_SPAN):
        span = flat[start : start + _CHECK_SPAN]
        if data.dtype == np.uint16:  # BF16 bits: exponent all ones is an infinity or a NaN
            bad = (span & 0x7F80) == 0x7F80
        else:
            with np.errstate(over="ignore", invalid="ignore"):
                if np.isfinite(np.add.reduce(span, dtype=np.float32)):
                    bad = None
                else:
                    bad = ~np.isfinite(span)
        if bad is not None and bad.any():
            _refuse_nonfinite(t, data, start + int(np.argmax(bad)))
        if done is not None:
            done(start, start + span.size)


def _refuse_nonfinite(t: ConvertTensor, data, flat: int) -> None:
    row = flat // data.shape[-1] if data.ndim > 1 else 0
    raise ConvertError(
        f"tensor {t.src!r} ({t.name}) has non-finite values (NaN or Inf) in row {row}; llama.cpp refuses "
        f"such weights"
    )
