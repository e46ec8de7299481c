"""convert(): a Hugging Face checkpoint folder -> GGUF in one streaming pass (no intermediate file).

Two routes, one data path:
  - --type F32 | F16 | BF16 | Q8_0: the file convert_hf_to_gguf.py --outtype <type> writes. KVs in its
    order (general.architecture, metadata.general_kvs, hf.arch_kvs with general.file_type,
    general.quantization_version = 2, vocab.vocab_kvs; a repeated key keeps its first place and its last
    value, as gguf-py's writer does), tensor infos in tensors.plan_tensors' order, each tensor's type by
    tensors.output_type;
  - any other llama-quantize level: the file `convert_hf_to_gguf.py --outtype <checkpoint dtype>` followed
    by `llama-quantize <level>` writes. The converted model exists only in memory (its KVs and tensor
    table); ggufkit's quantize plan and stream run on it as on a file, with a source that makes each
    tensor's rows from the checkpoint instead of reading them from disk.
Either way the tensors go through quantize.stream: a tensor is transformed (transforms.work_array) when its
first chunk is asked for, its row chunks run through the block kernels (quants registry: F16, BF16, Q8_0,
K-quants, ...) on the worker pool, and the output is written in order through gguf.writer's atomic stream
writer. Memory: the tensors being worked on (one, or two at a tensor boundary) plus the chunks in flight.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .. import quants
from ..errors import ConvertError
from ..gguf.layout import tensor_nbytes
from ..gguf.types import GGMLQuantizationType as T
from ..gguf.types import GGUFValueType
from ..gguf.writer import GGUFStreamWriter, TensorEntry, kv_bytes
from . import tensors as tn
from .transforms import work_array

__all__ = ["ConvertProgress", "ConvertSummary", "convert", "default_output_path"]

GGML_QNT_VERSION = 2  # general.quantization_version


@dataclass(frozen=True)
class ConvertProgress:
    """Passed to the `progress` callback after each written chunk."""

    index: int
    n_tensors: int
    name: str
    bytes_done: int  # converted-model bytes processed so far
    bytes_total: int


@dataclass
class ConvertSummary:
    src: Path
    dst: Path | None  # None for a dry run
    type: str  # "F16", "Q8_0", "Q4_K_M", ...
    architecture: str  # the HF class
    arch: str  # the GGUF architecture
    source_dtype: str  # the checkpoint's dtype ("F32" | "F16" | "BF16")
    dry_run: bool
    n_tensors: int
    n_elements: int
    size_after: int  # tensor bytes of the output
    file_size: int | None
    threads: int
    seconds: float
    tensor_types: dict[str, str] = field(default_factory=dict)  # GGUF name -> stored type, file order
    tensor_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)  # GGUF name -> ggml shape
    fallbacks: list[str] = field(default_factory=list)  # tensors stored in another type than asked
    # The converted model's KVs (key -> value, in order): the file's own at F32/F16/BF16/Q8_0; at another
    # level those of the --outtype <checkpoint dtype> file the quantize plan starts from. With tensor_types
    # and tensor_shapes, a dry run is the converted file's header without a byte of tensor data read
    # (memory.sources estimates a checkpoint folder from it).
    kvs: dict = field(default_factory=dict, repr=False)

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.size_after / self.n_elements if self.n_elements else 0.0


def default_output_path(src_dir: str | os.PathLike, type_name: str) -> Path:
    """<folder>-<TYPE>.gguf beside the checkpoint folder (never inside it)."""
    src = Path(src_dir).resolve()
    return src.with_name(f"{src.name}-{type_name}.gguf")


def _check_paths(src: Path, dst: Path, ckpt) -> None:
    if dst.is_dir():
        raise ConvertError(f"output {dst} is a directory")
    if not dst.parent.is_dir():
        raise ConvertError(f"output folder {dst.parent} does not exist")
    target = os.path.realpath(dst)
    inputs = {os.path.realpath(ref.path) for ref in ckpt.tensors.values()}
    for name in ("config.json", "tokenizer.json", "tokenizer.model", "tokenizer_config.json",
                 "model.safetensors.index.json", "generation_config.json"):  # fmt: skip
        inputs.add(os.path.realpath(src / name))
    if target in inputs:
        raise ConvertError(f"output {dst} would overwrite an input file of {src}")


def _kv_entries(kvs) -> list[bytes]:
    """KV tuples -> serialized entries; a repeated key keeps its first position and takes the last value
    (gguf-py GGUFWriter.add_key_value)."""
    entries: dict[str, bytes] = {}
    for kv in kvs:
        key, vtype, value = kv[0], kv[1], kv[2]
        sub = kv[3] if len(kv) > 3 else None
        entries[key] = kv_bytes(key, vtype, value, sub_type=sub)
    return list(entries.values())


@dataclass(frozen=True)
class _VTensor:
    """A tensor of the (virtual) converted file, as quantize.stream.chunks reads a GGUFModel's."""

    name: str
    shape: tuple[int, ...]  # ggml order
    ggml_type: T
    offset: int
    nbytes: int
    n_elements: int


@dataclass(frozen=True)
class _StepPlan:
    tensors: list


class _VModel:
    data_offset = 0

    def __init__(self, tensors):
        self.tensors = tensors


@dataclass(frozen=True)
class _Step:
    """A plan entry as quantize.stream.chunks reads it."""

    name: str
    dst_type: T
    use_importance: bool = False


def _cast(data, have: T, want: T):
    """numpy data of type `have` (float32, float16, or uint16 BF16 bits) as `want`, the way gguf-py's
    quantize writes it: F16 = numpy astype (RNE), BF16 = ggml's fp32 -> bf16 rounding (quiet NaN kept)."""
    import numpy as np

    if have == want:
        return data
    if have == T.BF16:
        data = (data.astype(np.uint32) << 16).view(np.float32)
    x = data.astype(np.float32, copy=False)
    if want == T.F32:
        return x
    if want == T.F16:
        return x.astype(np.float16)
    n = x.view(np.uint32)
    n = np.where((n & 0x7FFFFFFF) > 0x7F800000, (n & 0xFFFF0000) | (64 << 16), n)
    return ((n.astype(np.uint64) + (0x7FFF + ((n >> 16) & 1))) >> 16).astype(np.uint16)


class _CheckpointSource:
    """quantize.stream's source: each chunk's rows of the converted tensor, in the chunk's src_type.

    A tensor is made (read, transformed, cast) when its first chunk is asked for and kept until all its
    rows have been copied out; chunks may be asked for from several threads. The checkpoint's pages are
    released as they are used (Checkpoint.release): a chunk's rows once copied (when the tensor is a view
    of the map, they are the only copy in use), the whole tensor's at the end; so the process holds the
    chunks and transformed tensors in flight, not every page of the checkpoint it has read."""

    def __init__(self, ckpt, by_name: dict[str, tn.ConvertTensor], types: dict[str, T], hparams: dict):
        self.ckpt, self.by_name, self.types, self.hparams = ckpt, by_name, types, hparams
        self._lock = threading.Lock()
        self._ready: dict[str, list] = {}  # name -> [bytes as uint8 [n_rows, row_bytes], rows not copied]

    def _get(self, c):
        with self._lock:
            entry = self._ready.get(c.name)
            if entry is None:
                t = self.by_name[c.name]
                data = _cast(work_array(self.ckpt, t, self.hparams), t.work_type, self.types[c.name])
                n_rows = t.n_elements // t.shape[-1]
                entry = [data.reshape(n_rows, -1).view("uint8"), n_rows]
                self._ready[c.name] = entry
            return entry[0]

    def _copied(self, c) -> None:
        t = self.by_name[c.name]
        with self._lock:
            entry = self._ready[c.name]
            entry[1] -= c.n_rows
            done = entry[1] <= 0
            if done:
                del self._ready[c.name]
        if t.src is None:
            return
        if done:
            self.ckpt.release(t.src)
        else:  # the chunk's rows as stored (a row-major prefix of the checkpoint tensor, kept rows first)
            row = t.shape[-1] * self.ckpt.tensors[t.src].itemsize
            self.ckpt.release(t.src, c.first_row * row, (c.first_row + c.n_rows) * row)

    def readinto(self, c, view: memoryview) -> None:
        rows = self._get(c)
        block = rows[c.first_row : c.first_row + c.n_rows]
        view[: c.nbytes] = block.reshape(-1).data
        self._copied(c)


def _run(source, vmodel, plan, vectors, writer, threads, progress, total) -> None:
    """quantize.stream over the virtual model: chunks of each planned tensor, kernels, writer, in order."""
    from ..quantize import stream

    report = None
    if progress:
        n = len(plan.tensors)

        def report(c, done):
            progress(ConvertProgress(c.index, n, c.name, done, total))

    todo = stream.chunks(vmodel, plan, vectors, allow_nonfinite=False)
    stream.run(source, todo, writer, threads=threads, progress=report)


def convert(
    src_dir: str | os.PathLike,
    dst: str | os.PathLike | None = None,
    *,
    type: str = "F16",  # noqa: A002 - the command's --type
    imatrix: str | os.PathLike | None = None,
    threads: int | None = None,
    dry_run: bool = False,
    progress: Callable[[ConvertProgress], None] | None = None,
) -> ConvertSummary:
    """Convert the Hugging Face checkpoint folder `src_dir` to a GGUF file `dst` (default
    <folder>-<TYPE>.gguf beside the folder) at `type`: F32, F16, BF16 or Q8_0 as convert_hf_to_gguf.py
    --outtype writes them, or any llama-quantize level (Q4_K_M, Q6_K, IQ4_XS, ...; `imatrix` as
    llama-quantize --imatrix) as convert_hf_to_gguf.py at the checkpoint's dtype then llama-quantize would.
    Raises ConvertError (and other GgufkitError) for anything that cannot be done; the destination is
    written atomically and left as it was on any error."""
    from .hf import arch_kvs, load_model_config
    from .metadata import general_kvs
    from .safetensors import open_checkpoint
    from .vocab import n_vocab_real, vocab_kvs

    t0 = time.perf_counter()
    src = Path(src_dir)
    if not src.is_dir():
        raise ConvertError(f"{src} is not a folder (a Hugging Face checkpoint: config.json, *.safetensors)")
    want = str(type).strip().upper()
    direct = want in tn.OUTPUT_TYPES
    level = None
    if not direct:
        from ..quantize.levels import level as level_of

        level = level_of(want)
        want = level.name
    if direct and imatrix is not None:
        raise ConvertError(f"--imatrix has no effect at --type {want} (no importance-weighted format)")
    cfg = load_model_config(src)
    with open_checkpoint(src) as ckpt:
        dst_path = None if dry_run else Path(dst) if dst is not None else default_output_path(src, want)
        if dst_path is not None:
            _check_paths(src, dst_path, ckpt)
        n_real = n_vocab_real(src, cfg) if cfg.arch == "gemma3" else None
        plan = tn.plan_tensors(ckpt, cfg, n_vocab_real=n_real)
        src_dtype = tn.source_ftype(ckpt)
        conv_type = want if direct else src_dtype  # the converted file's --outtype
        types = {t.name: tn.output_type(t, conv_type) for t in plan}
        total_params = sum(t.n_elements for t in plan)
        kvs = [
            ("general.architecture", GGUFValueType.STRING, cfg.arch),
            *general_kvs(src, cfg, total_params=total_params),
            *arch_kvs(cfg, tn.OUTPUT_TYPES[conv_type][1]),
            ("general.quantization_version", GGUFValueType.UINT32, GGML_QNT_VERSION),
            *vocab_kvs(src, cfg),
        ]
        by_name = {t.name: t for t in plan}
        summary = ConvertSummary(
            src=src, dst=dst_path, type=want, architecture=cfg.architecture, arch=cfg.arch,
            source_dtype=src_dtype, dry_run=dry_run, n_tensors=len(plan), n_elements=total_params,
            size_after=0, file_size=None, threads=0, seconds=0.0,
        )  # fmt: skip
        if direct:
            # The kernels start from each tensor's work type; the source hands it over unchanged.
            src_types = {t.name: t.work_type for t in plan}
            vectors = {}
            order = [t.name for t in plan]
            dst_types = types
            entries_kv = _kv_entries(kvs)
            summary.fallbacks = [
                t.name for t in plan if want == "Q8_0" and types[t.name] == T.F16 and not t.is_norm_or_1d
            ]
        else:
            qplan, vectors, entries_kv = _quantize_plan(src, plan, types, kvs, cfg, level, imatrix, dry_run)
            src_types = types
            order = [tp.name for tp in qplan.tensors]
            dst_types = {tp.name: T(tp.dst_type) for tp in qplan.tensors}
            summary.fallbacks = [tp.name for tp in qplan.fallbacks()]
        shapes = {t.name: t.ggml_shape for t in plan}
        entries = [TensorEntry(n, shapes[n], dst_types[n]) for n in order]
        summary.tensor_types = {n: dst_types[n].name for n in order}
        summary.tensor_shapes = {n: shapes[n] for n in order}
        summary.kvs = {kv[0]: kv[2] for kv in kvs}  # a repeated key: its first place, its last value
        summary.size_after = sum(e.nbytes for e in entries)
        if dry_run:
            summary.seconds = time.perf_counter() - t0
            return summary

        vtensors, offset = [], 0
        for n in order:
            nbytes = tensor_nbytes(shapes[n], src_types[n])
            vtensors.append(_VTensor(n, shapes[n], src_types[n], offset, nbytes, by_name[n].n_elements))
            offset += nbytes
        run_plan = _StepPlan([_Step(n, dst_types[n]) for n in order]) if direct else qplan
        source = _CheckpointSource(ckpt, by_name, src_types, cfg.hparams)
        from ..quantize.job import passive_omp_waits, set_threads

        with passive_omp_waits():
            n_threads, restore = set_threads(threads)
            summary.threads = n_threads
            try:
                quants.backend()  # loads (or, the first time, builds) the kernels before any output
                with GGUFStreamWriter(dst_path, entries_kv, entries) as writer:
                    _run(source, _VModel(vtensors), run_plan, vectors, writer, n_threads, progress, offset)
                    writer.commit()
                    summary.file_size = writer.file_size
            except OSError as e:
                raise ConvertError(f"cannot write {dst_path}: {e.strerror or e}") from None
            finally:
                restore()
    summary.seconds = time.perf_counter() - t0
    return summary


def level_plan(cfg, plan, types, level_name: str, *, imatrix=None):
    """The quantize plan convert follows at a llama-quantize level: plan_quantization over the converted
    file's tensors (`plan` from tensors.plan_tensors, stored as `types`: the --outtype of the checkpoint's
    dtype), with the hparams of config.json. ggufkit.qat.prepare uses the same plan."""
    from ..quantize.plan import Hparams, TensorSpec, plan_quantization

    hp = cfg.hparams
    n_head = int(hp["num_attention_heads"])
    hparams = Hparams(
        arch=cfg.arch,
        n_layer=int(hp["num_hidden_layers"]),
        n_head=n_head,
        n_head_kv=int(hp.get("num_key_value_heads") or n_head),
        n_expert=0,
        n_embd=int(hp["hidden_size"]),
    )
    specs = [
        TensorSpec(t.name, t.ggml_shape, types[t.name], tensor_nbytes(t.ggml_shape, types[t.name]))
        for t in plan
    ]
    return plan_quantization(specs, hparams, level_name, imatrix=imatrix)


def _quantize_plan(src, plan, types, kvs, cfg, level, imatrix, dry_run):
    """The quantize plan of the converted model, its importance vectors, and llama-quantize's KVs for it:
    the converted file's KVs in order, general.quantization_version and general.file_type moved to the
    end, then the quantize.imatrix.* entries (quantize/job.py's output_kvs, on the virtual input)."""
    from ..errors import QuantizeError
    from ..quantize.job import GGML_QNT_VERSION as QV
    from ..quantize.job import imatrix_kvs, load_imatrix

    vectors, meta = {}, None
    if imatrix is not None:
        vectors, meta = load_imatrix(imatrix, (), ())
        names = {t.name for t in plan}
        if vectors and not any(n in names for n in vectors):
            some = ", ".join(sorted(vectors)[:3])
            raise QuantizeError(f"imatrix {imatrix} was made for another model: none of its entries ({some}, "
                                f"...) is a tensor of {src}")  # fmt: skip
    qplan = level_plan(cfg, plan, types, level.name, imatrix=vectors if vectors else None)
    if not dry_run:
        qplan.check_imatrix_requirement()
    entries: dict[str, bytes] = {}
    for kv in kvs:  # the converted file's KVs (gguf-py: a repeated key keeps its place)
        entries[kv[0]] = kv_bytes(kv[0], kv[1], kv[2], sub_type=kv[3] if len(kv) > 3 else None)
    tail = [
        ("general.quantization_version", GGUFValueType.UINT32, QV),
        ("general.file_type", GGUFValueType.UINT32, int(level.ftype_id)),
    ]
    if vectors:
        tail += imatrix_kvs(meta)
    for key, vtype, value in tail:  # gguf_set_*: remove, then append
        entries.pop(key, None)
        entries[key] = kv_bytes(key, vtype, value)
    return qplan, vectors, list(entries.values())
