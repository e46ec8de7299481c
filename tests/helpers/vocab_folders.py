"""Tokenizer folders for the vocabulary tests, and the reference converter's tokenizer.* KVs for a folder.

Real tokenizer files come from the GGUF models that ship in packages: SmolLM2-135M's tokenizer.json is
rebuilt from its GGUF (tokens, merges, token types, chat template) with SmolLM2's published pre-tokenizer
(Digits then ByteLevel), so llama.cpp's pre-tokenizer hash of it is the real "smollm". Small synthetic
ones (a Llama-3-style BPE, a trained SentencePiece model) cover the other paths.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from ggufkit.gguf.reader import open_gguf

CONTROL = 3

LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def tiny_llama_config(vocab_size: int, **extra) -> dict:
    cfg = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 1,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 256,
        "rms_norm_eps": 1e-5,
        "vocab_size": vocab_size,
        "torch_dtype": "float32",
    }
    cfg.update(extra)
    return cfg


def smollm2_gguf_vocab(gguf_path: Path) -> dict:
    m = open_gguf(gguf_path)
    return {
        "tokens": list(m.get("tokenizer.ggml.tokens")),
        "types": np.asarray(m.get("tokenizer.ggml.token_type")),
        "merges": list(m.get("tokenizer.ggml.merges")),
        "chat_template": m.get("tokenizer.chat_template"),
    }


def smollm2_tokenizer_json(vocab: dict, *, pair_merges: bool = False) -> dict:
    """SmolLM2's tokenizer.json (its published structure) with the GGUF's vocabulary."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    tokens = vocab["tokens"]
    merges = [tuple(m.split(" ", 1)) for m in vocab["merges"]]
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
        ]
    )
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.decoder = decoders.ByteLevel()
    specials = [tokens[i] for i in np.flatnonzero(vocab["types"] == CONTROL)]
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    data = json.loads(tok.to_str())
    if not pair_merges:
        data["model"]["merges"] = [" ".join(p) for p in data["model"]["merges"]]
    return data


def write_folder(folder: Path, files: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        path = folder / name
        if isinstance(content, bytes):
            path.write_bytes(content)
        elif isinstance(content, str):
            path.write_text(content, encoding="utf-8")
        else:
            path.write_text(json.dumps(content, ensure_ascii=False, indent=1), encoding="utf-8")
    return folder


def read_tokenizer_kvs(tree: Path, path: Path) -> list[tuple[str, int, object]]:
    code = (
        "import sys, json; sys.path.insert(0, sys.argv[1] + '/gguf-py');"
        "from gguf import GGUFReader, GGUFValueType as V; r = GGUFReader(sys.argv[2]); out = []\n"
        "for f in r.fields.values():\n"
        "    if not f.name.startswith('tokenizer.'): continue\n"
        "    t = f.types[0]\n"
        "    if t == V.ARRAY:\n"
        "        st = f.types[1]\n"
        "        vals = [bytes(f.parts[i]).decode('utf-8', 'surrogateescape') if st == V.STRING\n"
        "                else f.parts[i].tolist()[0] for i in f.data]\n"
        "        out.append([f.name, int(t), [int(st), vals]])\n"
        "    elif t == V.STRING: out.append([f.name, int(t), bytes(f.parts[-1]).decode()])\n"
        "    else: out.append([f.name, int(t), f.parts[-1].tolist()[0]])\n"
        "json.dump(out, sys.stdout)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(tree), str(path)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-3000:])
    return [tuple(kv) for kv in json.loads(proc.stdout)]


def normalize_ours(kvs) -> list[tuple[str, int, object]]:
    """Our KV list in read_tokenizer_kvs's form (floats through float32, as the file stores them)."""
    out = []
    for kv in kvs:
        key, vtype, value = kv[0], int(kv[1]), kv[2]
        if vtype == 9:
            sub = int(kv[3])
            vals = list(value)
            if sub == 6:
                vals = np.asarray(vals, dtype=np.float32).tolist()
            else:
                vals = [v if isinstance(v, str) else int(v) for v in vals]
            out.append((key, vtype, [sub, vals]))
        elif vtype == 6:
            out.append((key, vtype, float(np.float32(value))))
        elif vtype == 7:
            out.append((key, vtype, bool(value)))
        else:
            out.append((key, vtype, value))
    return out
