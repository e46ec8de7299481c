"""prepare(model, level): train a transformers model through the types a llama-quantize level gives it.

The plan is convert's own: the model's config.json resolved as `ggufkit convert` resolves it
(conversion/hf.load_model_config), its parameters as save_pretrained would write them mapped to GGUF names
with their transforms (conversion/tensors.header_tensors), and the level's per-tensor types with their
row-length fallbacks (conversion/job.level_plan -> quantize/plan.plan_quantization). Every weight the plan
quantizes gets a torch parametrization that returns fake_quantize(weight, its type); the optimizer keeps
updating the latent (unquantized) weight. `finish(model)` removes the parametrizations and leaves the
latent weights, which is what to save: converting them at the same level writes, tensor for tensor, the
values the forward saw (tests/test_qat.py checks it bit for bit through a real convert).

llama's q_proj/k_proj rows are permuted by convert (ggml's rope layout): a permutation of whole rows,
while every format quantizes each row on its own, so fake-quantizing in the HF layout and permuting gives
the same values as permuting and then fake-quantizing; no permute/unpermute is needed in the forward.
(The test compares with the converted file, where the rows are permuted, so it would see it otherwise.)
A tied output (lm_head sharing the embeddings' parameter, stored once as token_embd) is fake-quantized
with token_embd's type, as llama.cpp then multiplies with token_embd.
Gemma 3 needs nothing more: its norms (+1 in the file), the embedding scale (sqrt(hidden), applied by
both) and the vocabulary cut touch no quantized weight. What can differ is the graph: config.json's
`layer_types` does not reach the GGUF (neither convert nor convert_hf_to_gguf.py writes it) and llama.cpp
makes every 6th layer global (models/gemma3.cpp, load_swa_pattern(ml, 6)); a model whose layer_types say
otherwise runs another rope base (and window) on those layers in llama.cpp, so prepare warns about it
(tests/test_qat.py measures the difference).
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch.nn.utils import parametrize

from ..errors import QuantizeError
from ..quants import registry
from .fake import fake_quantize

log = logging.getLogger(__name__)


class Prepared(NamedTuple):
    """One fake-quantized parameter: its HF name, its GGUF name, the type the level gives it, and the
    imatrix vector convert will quantize it with (None: without)."""

    hf_name: str
    gguf_name: str
    qtype: str
    importance: np.ndarray | None = None


class _FakeQuant(torch.nn.Module):
    def __init__(self, fmt: registry.BlockFormat, importance: np.ndarray | None):
        super().__init__()
        self.fmt, self.importance = fmt, importance

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return fake_quantize(weight, self.fmt, importance=self.importance)

    def extra_repr(self) -> str:
        return self.fmt.name


def _dtype_name(dtype: torch.dtype) -> str:
    """The safetensors / convert name of a torch float dtype (what save_pretrained writes it as)."""
    if dtype == torch.bfloat16:
        return "BF16"
    return f"F{torch.finfo(dtype).bits}"


def _config(model):
    from ..conversion.hf import load_model_config

    raw = model.config.to_dict()
    raw["architectures"] = [type(model).__name__]  # as save_pretrained writes it
    with tempfile.TemporaryDirectory(prefix="ggufkit-qat-") as d:
        (Path(d) / "config.json").write_text(json.dumps(raw))
        return load_model_config(d)


def plan_model(model, level: str, *, imatrix=None) -> list[Prepared]:
    """The parameters a convert of `model` (saved as it is) at `level` (with `imatrix`, a llama-imatrix
    file, as convert --imatrix) quantizes, their types and importance vectors."""
    from ..conversion import tensors as tn
    from ..conversion.job import level_plan
    from ..quantize.imatrix import match_tensor
    from ..quantize.job import load_imatrix
    from ..quantize.levels import level as level_of

    lv = level_of(str(level).strip().upper())
    cfg = _config(model)
    params = dict(model.named_parameters(remove_duplicate=True))  # a tied lm_head is not saved either
    header = {n: (_dtype_name(p.dtype), tuple(p.shape)) for n, p in params.items() if p.is_floating_point()}
    plan = tn.header_tensors(cfg, header)
    conv_type = tn.source_ftype(_Header(header))
    types = {t.name: tn.output_type(t, conv_type) for t in plan}
    vectors = load_imatrix(imatrix, (), ())[0] if imatrix is not None else {}
    qplan = level_plan(cfg, plan, types, lv.name, imatrix=vectors or None)
    src = {t.name: t.src for t in plan}
    return [
        Prepared(
            src[tp.name],
            tp.name,
            tp.dst_type.name,
            match_tensor(vectors, tp.name, tp.shape) if tp.use_importance else None,
        )
        for tp in qplan.tensors
        if tp.quantize and src[tp.name] is not None
    ]


class _Header:
    """A checkpoint header as tensors.source_ftype reads it."""

    class _Ref(NamedTuple):
        dtype: str
        shape: tuple

    def __init__(self, header: dict):
        self.tensors = {n: self._Ref(d, s) for n, (d, s) in header.items()}


def llama_cpp_layer_types(model) -> list[str] | None:
    """Gemma 3: the attention of each layer as llama.cpp will run `model` once converted (None for the other
    architectures, whose layers are all global). llama.cpp's gemma3 loader sets set_swa_pattern(6) when the
    GGUF has a sliding window: layer il is global when il % 6 == 5; convert writes the sliding window unless
    config.json says sliding_window_pattern == 1 (then every layer is global)."""
    cfg = _config(model)
    if cfg.arch != "gemma3":
        return None
    n = int(cfg.hparams["num_hidden_layers"])
    if cfg.hparams.get("sliding_window_pattern") == 1:
        return ["full_attention"] * n
    return ["full_attention" if i % 6 == 5 else "sliding_attention" for i in range(n)]


def _check_layer_types(model) -> None:
    want = llama_cpp_layer_types(model)
    have = getattr(model.config, "layer_types", None)
    if want is None or have is None or list(have) == want:
        return
    odd = [i for i, (a, b) in enumerate(zip(have, want)) if a != b]
    log.warning(
        "prepare: config.json's layer_types gives layer(s) %s; llama.cpp will run %s there (the GGUF does "
        "not carry layer_types): the converted file's forward will differ from this model's",
        ", ".join(f"{i} {have[i]}" for i in odd),
        ", ".join(want[i] for i in odd),
    )


def prepare(model, level: str, *, imatrix=None) -> list[Prepared]:
    """Fake-quantize `model`'s weights in its forward as a convert at `level` (a llama-quantize level:
    Q4_K_M, Q6_K, IQ4_XS, ...) will store them; returns what was prepared. The model (a transformers
    LlamaForCausalLM, Qwen2/Qwen3ForCausalLM or Gemma3ForCausalLM) keeps training its latent weights;
    `finish` removes the fake quantization before saving (a Gemma 3 whose layer_types llama.cpp will not
    follow is prepared with a warning: see the module doc). imatrix: a llama-imatrix file (GGUF or .dat), as
    `convert --imatrix` takes it: its presence changes some types and the searched types use its vectors.
    Raises ConvertError for a model convert does not
    take, QuantizeError for an unknown level or a model already prepared."""
    if any(parametrize.is_parametrized(m) for m in model.modules()):
        raise QuantizeError("prepare: the model is already prepared (call ggufkit.qat.finish first)")
    done = plan_model(model, level, imatrix=imatrix)
    _check_layer_types(model)
    embed, output = model.get_input_embeddings(), model.get_output_embeddings()
    tied = output is not None and embed is not None and output.weight is embed.weight
    for p in done:
        module = model.get_submodule(p.hf_name.rpartition(".")[0])
        fmt = registry.get_format(p.qtype)
        parametrize.register_parametrization(module, "weight", _FakeQuant(fmt, p.importance))
        if tied and module is embed:  # llama.cpp multiplies the output with token_embd
            parametrize.register_parametrization(output, "weight", _FakeQuant(fmt, p.importance))
    return done


def finish(model) -> None:
    """Remove prepare's fake quantization, leaving the latent weights (what to save and convert)."""
    for module in model.modules():
        if parametrize.is_parametrized(module, "weight"):
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=False)
