"""Where a model's shapes come from: a GGUF (header and tensor table only, no tensor data), a Hugging Face
checkpoint folder (the header of the GGUF `ggufkit convert --type F16` would write, from convert's dry
run: config.json, the tokenizer and the safetensors headers, no tensor data), a folder with a config.json
and no weights (see hf_config.py), or a bare size such as "7B" or "qwen2:1.5B" (see sizes.py).

A GGUF and a checkpoint are read by the same code (_from_header): the keys llama.cpp loads and the tensor
table, so `ram` of a folder and `ram` of the file convert makes of it are the same numbers by construction."""

from __future__ import annotations

import math
import os
from pathlib import Path

from ..errors import GgufkitError, MemoryEstimateError
from ..gguf.layout import pad, tensor_nbytes
from ..gguf.types import GGMLQuantizationType as T
from .hf_config import from_folder
from .model import ModelInfo, per_layer, swa_layers
from .sizes import from_size

CHECKPOINT_TYPE = "F16"  # a checkpoint folder is estimated as the GGUF `ggufkit convert --type F16` writes


def load_source(source: str | os.PathLike) -> ModelInfo:
    """A GGUF file, a Hugging Face checkpoint folder (config.json + *.safetensors), a folder or path with
    only a config.json, or a bare size ("7B", "qwen2:1.5B")."""
    path = Path(source)
    if path.is_dir():
        return from_checkpoint(path) if has_weights(path) else from_folder(path)
    if path.is_file():
        if path.name == "config.json":
            return from_folder(path.parent)
        return from_gguf(path)
    if os.sep in str(source) or str(source).endswith(".gguf"):
        raise MemoryEstimateError(f"{source}: no such file or folder")
    return from_size(str(source))


def has_weights(folder: Path) -> bool:
    """Whether the folder holds a safetensors checkpoint (an index, or model*.safetensors files), as
    conversion.safetensors finds one."""
    from ..conversion.safetensors import INDEX_FILE

    try:
        names = os.listdir(folder)
    except OSError as e:
        raise MemoryEstimateError(f"{folder}: cannot list: {e.strerror or e}") from None
    return INDEX_FILE in names or any(n.startswith("model") and n.endswith(".safetensors") for n in names)


def from_checkpoint(folder: Path) -> ModelInfo:
    """The model `ggufkit convert FOLDER --type F16` would write, from convert's dry run (ConvertError, a
    GgufkitError, for a folder convert refuses)."""
    from ..conversion.job import convert

    s = convert(folder, type=CHECKPOINT_TYPE, dry_run=True)
    tensors, offset = [], 0
    for name, type_name in s.tensor_types.items():  # in file order, each aligned as the writer aligns it
        shape, qtype = s.tensor_shapes[name], T[type_name]
        nbytes = tensor_nbytes(shape, qtype)
        tensors.append((name, shape, qtype, nbytes, offset))
        offset += pad(nbytes)
    note = f"{s.source_dtype} checkpoint, as converted to {CHECKPOINT_TYPE}"
    return _from_header(folder, folder.name, "hf", s.kvs.get, tensors, note=note)


_SWA_DEFAULT = {"gemma2": 4096, "llama4": 8192}  # window when the GGUF has no sliding_window key


def from_gguf(path: Path) -> ModelInfo:
    from ..gguf.reader import open_gguf

    try:
        model = open_gguf(path)
    except GgufkitError:
        raise
    except OSError as e:
        raise MemoryEstimateError(f"{path}: cannot read: {e.strerror or e}") from None
    tensors = [(t.name, tuple(t.shape), T(t.ggml_type), t.nbytes, t.offset) for t in model.tensors]
    return _from_header(path, path.name, "gguf", model.get, tensors)


def _from_header(path: Path, name: str, kind: str, get, tensors: list, note: str = "") -> ModelInfo:
    """ModelInfo from a GGUF header: get(key, default) reads a KV, tensors are (name, shape, type, nbytes,
    offset) in file order (offsets from the data section)."""
    from ..quantize.plan import TensorSpec

    arch = get("general.architecture")
    if not arch or not isinstance(arch, str):
        raise MemoryEstimateError(f"{path}: GGUF has no general.architecture")

    def key(name, default=None, *, required=True):
        value = get(f"{arch}.{name}", default)
        if value is None and required:
            raise MemoryEstimateError(f"{path}: GGUF lacks {arch}.{name}, needed for the estimate")
        return value

    n_layer = int(key("block_count"))
    n_embd = int(key("embedding_length"))
    head_count = key("attention.head_count")
    n_head = per_layer(head_count, n_layer, f"{arch}.attention.head_count")[0]
    n_head_kv = per_layer(
        key("attention.head_count_kv", head_count), n_layer, f"{arch}.attention.head_count_kv"
    )
    hd_k = int(key("attention.key_length", n_embd // max(n_head, 1)))
    hd_v = int(key("attention.value_length", hd_k))
    n_ff = max(per_layer(key("feed_forward_length", 0), n_layer, f"{arch}.feed_forward_length"))
    tokens = get("tokenizer.ggml.tokens")
    merges = get("tokenizer.ggml.merges")
    n_vocab = int(key("vocab_size", len(tokens) if tokens is not None else None))
    n_swa = int(key("attention.sliding_window", _SWA_DEFAULT.get(arch, 0)))
    is_swa = swa_layers(arch, n_layer, n_swa, key("attention.sliding_window_pattern", None, required=False))
    specs = [TensorSpec(t[0], t[1], t[2]) for t in tensors]
    file_type = _file_type_name(get("general.file_type"), specs)
    return ModelInfo(
        name=name,
        kind=kind,
        arch=arch,
        n_layer=n_layer,
        n_embd=n_embd,
        n_head=n_head,
        n_head_kv=n_head_kv,
        head_dim_k=hd_k,
        head_dim_v=hd_v,
        n_ff=n_ff,
        n_vocab=n_vocab,
        n_ctx_train=int(key("context_length", 0)),
        n_merges=len(merges) if merges is not None else 0,
        n_swa=n_swa,
        is_swa=is_swa,
        n_expert=int(key("expert_count", 0)),
        n_expert_used=int(key("expert_used_count", 0)),
        n_ff_exp=int(key("expert_feed_forward_length", 0)),
        tensors=specs,
        file_type=file_type,
        path=path,
        note=note,
        file_tensors=tensors,
    )


def _file_type_name(ftype, specs) -> str:
    from ..quantize.levels import LEVELS

    if ftype is not None:
        for lv in LEVELS.values():
            if lv.ftype_id == int(ftype):
                return lv.name
    counts: dict[str, int] = {}
    for s in specs:
        counts[s.ggml_type.name] = counts.get(s.ggml_type.name, 0) + math.prod(s.shape)
    return max(counts, key=counts.get) if counts else "?"
