"""How much a tensor's output error costs the model: one factor per tensor on its measured damage.

allocate.measure gives each tensor's calibration-weighted output error sum e H e^T; the allocation adds them
up, which is only right if a unit of that error costs the model's KL divergence the same in every tensor.
It does not (an error in the last layers' ffn_down, or in the embedding, which no imatrix weighs, reaches
the logits differently from one in layer 0's attn_k). The weightings (WEIGHTINGS):

    none     1 for every tensor: the raw output errors are summed.
    perturb  measured. The tensors are grouped by kind (attn_q, ffn_down, token_embd, ...) and depth (the
             layers cut into DEPTH_BUCKETS runs); for each group, every tensor of the group is replaced by
             its quantization at its cheapest candidate type and the built-in engine runs one calibration
             chunk of PERTURB_TOKENS tokens; the group's factor is the KL divergence of those logits from
             the unperturbed ones, over the damage allocate.measure predicted for the same types. The KLD
             is near quadratic in small weight errors, as the damage is, so KLD ~ factor x damage per
             group, and the allocation minimizes the model's predicted KLD. Cost: one forward pass of one
             chunk per group (29 for a 30-layer llama), each resumed from the unperturbed pass's residual
             stream at the group's first layer (the same logits, 5/8 of the layers on average), and one
             quantization of every tensor.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence

import numpy as np

__all__ = ["DEPTH_BUCKETS", "PERTURB_TOKENS", "WEIGHTINGS", "factors", "groups"]

WEIGHTINGS = ("perturb", "none")
DEPTH_BUCKETS = 4
PERTURB_TOKENS = 256
_LAYER = re.compile(r"^blk\.(\d+)\.([^.]+)")


def groups(names: Sequence[str], n_layer: int) -> list[tuple[str, int]]:
    """Each tensor's (kind, depth bucket); tensors outside the blocks get bucket -1."""
    out = []
    for n in names:
        m = _LAYER.match(n)
        if m is None:
            out.append((n.split(".")[0], -1))
        else:
            out.append((m.group(2), int(m.group(1)) * DEPTH_BUCKETS // max(1, n_layer)))
    return out


def _kld(base: np.ndarray, other: np.ndarray) -> float:
    """Mean over positions of KL(softmax(base) || softmax(other)), in float64."""
    a = base.astype(np.float64)
    b = other.astype(np.float64)
    la = a - a.max(axis=1, keepdims=True)
    la -= np.log(np.exp(la).sum(axis=1, keepdims=True))
    lb = b - b.max(axis=1, keepdims=True)
    lb -= np.log(np.exp(lb).sum(axis=1, keepdims=True))
    return float((np.exp(la) * (la - lb)).sum(axis=1).mean())


def _tokens(model, text: str) -> np.ndarray:
    from ..engine.tokenizer import load_tokenizer

    tok = load_tokenizer(model)
    ids = np.asarray(tok.encode(text[: 16 * PERTURB_TOKENS]), dtype=np.int32)[:PERTURB_TOKENS]
    ids = ids.copy()
    if tok.add_bos and tok.bos_id is not None:
        ids[0] = tok.bos_id
    return ids


def perturbed_klds(model, text: str, perturbations: Iterable[dict[str, np.ndarray]]) -> list[float]:
    """KL divergence of the engine's logits on the first PERTURB_TOKENS tokens of `text` with each set of
    replaced tensors (name -> float32 numpy [rows, ne0]) from its logits with none."""
    from ..engine import model_class

    cls = model_class(model)

    class Replaced(cls):
        replaced: dict[str, np.ndarray] = {}

        def _weight(self, name):
            w = self.replaced.get(name)
            return super()._weight(name) if w is None else w

        def _embed(self, ids):
            w = self.replaced.get("token_embd.weight")
            return super()._embed(ids) if w is None else w[np.asarray(ids).reshape(-1)]

    engine = Replaced(model)
    ids = _tokens(model, text)[None, :]
    streams: dict[int, np.ndarray] = {}  # the unperturbed residual stream entering each layer
    base = next(engine.chunk_logits(ids, keep=streams))
    out = []
    for rep in perturbations:
        engine.replaced = rep
        # the layers before the first replaced tensor run as in the unperturbed pass: resume after them
        start = first_layer(rep, engine.args.block_count)
        logits = (
            engine.chunk_logits(ids, start=start, resid=streams[start]) if start else engine.chunk_logits(ids)
        )
        out.append(_kld(base, next(logits)))
    engine.replaced = {}
    return out


def first_layer(names: Iterable[str], n_layer: int) -> int:
    """The first layer whose input a replacement of `names` changes: a block tensor's layer, n_layer for the
    output weight alone (only the logits change), 0 for anything else (the embedding)."""
    first = n_layer
    for n in names:
        m = _LAYER.match(n)
        if m is not None:
            first = min(first, int(m.group(1)))
        elif n != "output.weight":
            return 0
    return first


def factors(
    weighting: str,
    model,
    names: Sequence[str],
    damages: Sequence[float],
    quantized: Callable[[str], np.ndarray],
    *,
    text: str,
) -> list[float]:
    """One factor per tensor of `names`. damages[i]: tensor i's predicted damage at the type `quantized(name)`
    used (its cheapest candidate); quantized(name): the tensor dequantized back from that type, float32
    numpy [rows, ne0]."""
    if weighting == "none":
        return [1.0] * len(names)
    if weighting != "perturb":
        raise ValueError(f"unknown weighting {weighting!r}")
    from ..engine import model_args

    g = groups(names, model_args(model).block_count)
    keys = sorted(set(g), key=lambda k: (k[1], k[0]))
    members = {k: [i for i in range(len(names)) if g[i] == k] for k in keys}
    # a generator: one group's replaced tensors are held at a time
    klds = perturbed_klds(model, text, ({names[i]: quantized(names[i]) for i in members[k]} for k in keys))
    out = [1.0] * len(names)
    for k, kld in zip(keys, klds):
        d = sum(damages[i] for i in members[k])
        f = kld / d if d > 0 else 0.0
        for i in members[k]:
            out[i] = f
    return out
