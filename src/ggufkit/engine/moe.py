"""Mixtral-style mixture-of-experts FFN for the llama engine (llama.cpp's build_moe_ffn as the llama graph
calls it: softmax gating, norm_w = true, expert_weights_scale, no expert-selection bias, no groups).

    p = softmax(h Wgate_inp)                   [N, n_expert], float32, the exp sum in double
    top = the expert_used_count largest p      (ggml_argsort_top_k: descending)
    w = p[top] / max(sum p[top], 2^-14)        (the sum clamped at the smallest F16 normal, as llama.cpp)
    w *= expert_weights_scale                  (when it is neither 0 nor 1)
    out = sum over slots j of w_j * (silu(h Wgate[e_j]) * h Wup[e_j]) Wdown[e_j]

Each expert runs on the rows routed to it (MUL_MAT_ID); the per-slot results are added in slot order, as
ggml adds its views. The observer sees each expert's rows with expert=e, n_expert=E, as llama-imatrix's
MUL_MAT_ID hook counts them per expert.
"""

from __future__ import annotations

import numpy as np

from .numerics import silu

MOE_FFN = ("ffn_gate_inp", "ffn_gate_exps", "ffn_up_exps", "ffn_down_exps")
_F16_MIN_NORMAL = np.float32(6.103515625e-5)


def moe_ffn(model, h: np.ndarray, w: dict, ty: dict, nm: dict) -> np.ndarray:
    """The expert FFN of h [N, D] for one layer of `model` (a LlamaModel): w, ty the layer's weights and
    types, nm the names shown to the observer (None: not shown)."""
    a = model.args
    logits = model._matmul(h, w["ffn_gate_inp"], ty["ffn_gate_inp"], name=nm["ffn_gate_inp"])
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True, dtype=np.float64).astype(np.float32)
    k = a.expert_used_count
    top = np.argsort(-probs, axis=1, kind="stable")[:, :k]  # [N, k]
    weights = np.take_along_axis(probs, top, axis=1)
    weights /= np.maximum(weights.sum(axis=1, keepdims=True), _F16_MIN_NORMAL)
    if a.expert_weights_scale not in (0.0, 1.0):
        weights *= np.float32(a.expert_weights_scale)
    n_expert = w["ffn_gate_exps"].shape[0]
    slots = np.zeros((h.shape[0], k, h.shape[1]), np.float32)

    def matmul(x, short, e, rounded):
        if nm[short] is not None:
            model.observer(nm[short], x, expert=e, n_expert=n_expert)
        return model._matmul(x, w[short][e], ty[short], rounded)

    for e in range(n_expert):
        rows, slot = np.nonzero(top == e)
        if rows.size == 0:
            continue
        x = h[rows]
        rounded: dict = {}  # x rounded once for gate and up
        g = silu(matmul(x, "ffn_gate_exps", e, rounded))
        g *= matmul(x, "ffn_up_exps", e, rounded)
        slots[rows, slot] = matmul(g, "ffn_down_exps", e, None) * weights[rows, slot][:, None]
    out = slots[:, 0]
    for j in range(1, k):
        out = out + slots[:, j]
    return out
