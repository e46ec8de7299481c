"""config.json → hparams and `<arch>.*` KVs, against the reference itself.

For each config.json variant the reference tree's own converter classes run in a subprocess (the tree's
gguf-py, transformers 4.57.6): `AutoConfig.from_pretrained(folder).to_dict()` for the hparams, and the
architecture's `set_gguf_parameters()` for the KVs (keys, order, types, values). A seeded mutation corpus
of config.json files must each load or raise ConvertError; where both the reference and ggufkit accept a
mutant, their KVs must be equal.
"""

from __future__ import annotations

import copy
import json
import random
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from ggufkit.conversion.hf import FILE_TYPES, READ_KEYS, arch_kvs, load_model_config
from ggufkit.errors import ConvertError
from ggufkit.gguf.types import GGUFValueType as V
from tests.helpers.llama_programs import source_tree

pytest.importorskip("transformers", reason="the reference reads config.json through transformers")
pytest.importorskip("torch", reason="the reference converter imports torch")

# Runs in a subprocess: the tree's gguf-py must not replace the installed gguf in the test process.
HARNESS = r"""
import json, logging, sys, warnings
from pathlib import Path
tree, read_keys = sys.argv[1], json.loads(sys.argv[2])
sys.path[:0] = [tree, tree + "/gguf-py"]
logging.disable(logging.CRITICAL); warnings.simplefilter("ignore")
import gguf
from transformers import AutoConfig
from transformers.utils import logging as tlog
tlog.set_verbosity_error()
from conversion import get_model_class
out = []
for folder in json.load(sys.stdin):
    d = Path(folder); r = {}
    try:
        h = AutoConfig.from_pretrained(d).to_dict()
        r["hparams"] = {k: h[k] for k in read_keys if k in h}
    except Exception as e:
        r["auto_error"] = f"{type(e).__name__}: {e}"
    try:
        raw = json.load(open(d / "config.json"))
        m = get_model_class(raw["architectures"][0])(d, gguf.LlamaFileType.MOSTLY_F16, d / "out.gguf")
        m.set_gguf_parameters()
        r["kvs"] = [[k, int(v.type), v.value, None if v.sub_type is None else int(v.sub_type)]
                    for k, v in m.gguf_writer.kv_data[0].items() if k != "general.architecture"]
    except BaseException as e:
        r["error"] = f"{type(e).__name__}: {e}"[:300]
    out.append(r)
json.dump(out, sys.stdout)
"""


def run_reference(folders: list[Path]) -> list[dict]:
    proc = subprocess.run(
        [sys.executable, "-c", HARNESS, str(source_tree()), json.dumps(READ_KEYS)],
        input=json.dumps([str(f) for f in folders]),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


def _norm_kvs(kvs) -> list:
    """KVs comparable across the two sides: float32 values as their packed bytes."""
    out = []
    for key, vtype, value, *_ in kvs:
        vtype = int(vtype)
        if vtype == V.FLOAT32:
            value = struct.pack("<f", value)
        elif vtype == V.BOOL:
            value = bool(value)
        out.append((key, vtype, value))
    return out


LLAMA = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 64,
    "num_attention_heads": 4,
    "num_hidden_layers": 2,
    "intermediate_size": 128,
    "vocab_size": 256,
}
SMOLLM2 = {
    **LLAMA,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "hidden_act": "silu",
    "max_position_embeddings": 8192,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-05,
    "rope_theta": 100000,
    "tie_word_embeddings": True,
    "torch_dtype": "bfloat16",
    "use_cache": True,
    "vocab_size": 49152,
    "_name_or_path": "x/y",
}
LLAMA3 = {
    **LLAMA,
    "head_dim": 16,
    "max_position_embeddings": 131072,
    "rope_theta": 500000.0,
    "rope_scaling": {
        "factor": 32.0,
        "high_freq_factor": 4.0,
        "low_freq_factor": 1.0,
        "original_max_position_embeddings": 8192,
        "rope_type": "llama3",
    },
}
MISTRAL = {
    "architectures": ["MistralForCausalLM"],
    "model_type": "mistral",
    "hidden_size": 64,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "num_hidden_layers": 2,
    "intermediate_size": 128,
    "vocab_size": 256,
    "sliding_window": 4096,
    "rope_theta": 10000.0,
}
QWEN2 = {
    "architectures": ["Qwen2ForCausalLM"],
    "model_type": "qwen2",
    "hidden_size": 64,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "num_hidden_layers": 2,
    "intermediate_size": 128,
    "vocab_size": 256,
    "max_window_layers": 21,
    "sliding_window": 32768,
    "use_sliding_window": False,
    "rope_theta": 1000000.0,
    "tie_word_embeddings": True,
    "rms_norm_eps": 1e-06,
}
QWEN3 = {
    **QWEN2,
    "architectures": ["Qwen3ForCausalLM"],
    "model_type": "qwen3",
    "head_dim": 32,
    "attention_bias": False,
    "rope_scaling": None,
    "max_position_embeddings": 40960,
}
GEMMA3 = {
    "architectures": ["Gemma3ForCausalLM"],
    "model_type": "gemma3_text",
    "hidden_size": 64,
    "num_attention_heads": 4,
    "num_key_value_heads": 1,
    "num_hidden_layers": 6,
    "intermediate_size": 128,
    "vocab_size": 256,
    "head_dim": 32,
    "sliding_window": 512,
    "_sliding_window_pattern": 6,
    "rope_local_base_freq": 10000.0,
    "rope_theta": 1000000.0,
    "query_pre_attn_scalar": 256,
    "max_position_embeddings": 32768,
    "final_logit_softcapping": None,
    "rope_scaling": None,
    "layer_types": ["sliding_attention"] * 5 + ["full_attention"],
}


def _drop(d: dict, *keys) -> dict:
    return {k: v for k, v in d.items() if k not in keys}


VARIANTS = {
    "llama-minimal": LLAMA,
    "smollm2": SMOLLM2,
    "tinyllama-gqa": {
        **LLAMA,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-5,
        "max_position_embeddings": 2048,
    },
    "llama-kv-null": {**LLAMA, "num_key_value_heads": None},
    "llama-head-dim-null": {**LLAMA, "head_dim": None},
    "llama-head-dim-32": {**LLAMA, "head_dim": 32},
    "llama3": LLAMA3,
    "llama3-type-key": {
        **LLAMA3,
        "rope_scaling": {**_drop(LLAMA3["rope_scaling"], "rope_type"), "type": "llama3"},
    },
    "llama-linear": {**LLAMA, "rope_scaling": {"type": "linear", "factor": 2.0}},
    "llama-dynamic": {**LLAMA, "rope_scaling": {"rope_type": "dynamic", "factor": 2.0}},
    "llama-yarn": {
        **LLAMA,
        "max_position_embeddings": 16384,
        "rope_scaling": {
            "rope_type": "yarn",
            "factor": 4.0,
            "original_max_position_embeddings": 4096,
            "beta_fast": 32.0,
            "beta_slow": 1.0,
            "attention_factor": 1.1,
        },
    },
    "llama-yarn-int": {
        **LLAMA,
        "rope_scaling": {"rope_type": "yarn", "factor": 4, "original_max_position_embeddings": 512},
    },
    "llama-no-ctx": _drop(LLAMA, "max_position_embeddings"),
    "llama-int-theta": {**LLAMA, "rope_theta": 500000, "rms_norm_eps": 1e-5},
    "llama-not-causal": {**LLAMA, "is_causal": False},
    "mistral": MISTRAL,
    "mistral-7b": {
        **MISTRAL,
        "hidden_size": 4096,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "intermediate_size": 14336,
        "max_position_embeddings": 32768,
        "vocab_size": 32000,
    },
    "mistral-minimal": _drop(MISTRAL, "num_key_value_heads", "rope_theta", "sliding_window"),
    "mistral-head-dim": {**MISTRAL, "head_dim": 32, "sliding_window": None},
    "mistral-kv-null": {**MISTRAL, "num_key_value_heads": None},
    "mistral-as-llama": {**MISTRAL, "architectures": ["LlamaForCausalLM"]},
    "qwen2": QWEN2,
    "qwen2-minimal": _drop(
        QWEN2, "max_window_layers", "sliding_window", "use_sliding_window", "num_key_value_heads"
    ),
    "qwen2-sliding": {**QWEN2, "use_sliding_window": True},
    "qwen2-yarn": {
        **QWEN2,
        "rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768},
    },
    "qwen2-kv-null": {**QWEN2, "num_key_value_heads": None},
    "qwen3": QWEN3,
    "qwen3-no-head-dim": _drop(QWEN3, "head_dim"),
    "qwen3-head-dim-null": {**QWEN3, "head_dim": None},
    "qwen3-linear": {**QWEN3, "rope_scaling": {"rope_type": "linear", "factor": 2.0}},
    "gemma3": GEMMA3,
    "gemma3-minimal": {
        k: GEMMA3[k] for k in ("architectures", "model_type", "hidden_size", "num_attention_heads")
    },
    "gemma3-pattern-1": {**GEMMA3, "sliding_window_pattern": 1},
    "gemma3-pattern-6": {**_drop(GEMMA3, "layer_types"), "sliding_window_pattern": 6},
    "gemma3-linear": {**GEMMA3, "rope_scaling": {"rope_type": "linear", "factor": 8.0}},
    "gemma3-softcap": {**GEMMA3, "final_logit_softcapping": 30.0},
    "gemma3-no-head-dim": _drop(GEMMA3, "head_dim"),
    "gemma3-bidirectional": {**GEMMA3, "use_bidirectional_attention": True},
    "gemma3-local-theta": {**GEMMA3, "rope_local_base_freq": 20000.0, "rms_norm_eps": 1e-5},
    "gemma3-kv-null": {**GEMMA3, "num_key_value_heads": 2, "max_position_embeddings": 8192},
}


def _folder(root: Path, name: str, config) -> Path:
    d = root / name
    d.mkdir(parents=True)
    (d / "config.json").write_text(config if isinstance(config, str) else json.dumps(config))
    return d


@pytest.fixture(scope="module")
def variants(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    folders = {name: _folder(root, name, cfg) for name, cfg in VARIANTS.items()}
    results = run_reference(list(folders.values()))
    return {name: (folders[name], r) for name, r in zip(folders, results)}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_hparams_equal_transformers(variants, name):
    folder, ref = variants[name]
    assert "hparams" in ref, ref.get("auto_error")
    ours = load_model_config(folder).hparams
    for key in READ_KEYS:
        assert (key in ours) == (key in ref["hparams"]), key
        if key in ours:
            assert ours[key] == ref["hparams"][key], key


@pytest.mark.parametrize("name", list(VARIANTS))
def test_arch_kvs_equal_reference(variants, name):
    folder, ref = variants[name]
    assert "kvs" in ref, ref.get("error")
    cfg = load_model_config(folder)
    assert cfg.architecture == VARIANTS[name]["architectures"][0]
    assert (
        cfg.arch
        == {"Llama": "llama", "Mistr": "llama", "Qwen2": "qwen2", "Qwen3": "qwen3", "Gemma": "gemma3"}[
            cfg.architecture[:5]
        ]
    )
    assert _norm_kvs(arch_kvs(cfg, FILE_TYPES["F16"])) == _norm_kvs(ref["kvs"])


def test_file_types():
    cfg = load_model_config_from(LLAMA)
    for name, value in (("F32", 0), ("F16", 1), ("Q8_0", 7), ("BF16", 32)):
        kvs = {k: v for k, _, v in arch_kvs(cfg, FILE_TYPES[name])}
        assert kvs["general.file_type"] == value


def load_model_config_from(config, tmp=[]):  # noqa: B006 - one scratch folder per test process
    import tempfile

    if not tmp:
        tmp.append(Path(tempfile.mkdtemp()))
    d = tmp[0] / f"c{len(list(tmp[0].iterdir()))}"
    d.mkdir()
    (d / "config.json").write_text(config if isinstance(config, str) else json.dumps(config))
    return load_model_config(d)


@pytest.mark.parametrize(
    "config, message",
    [
        (
            {**LLAMA, "architectures": ["GPT2LMHeadModel"]},
            r"'GPT2LMHeadModel' is not supported.*LlamaForCausalLM",
        ),
        ({**LLAMA, "architectures": []}, "architectures"),
        (_drop(LLAMA, "architectures"), "architectures"),
        (_drop(LLAMA, "model_type"), "model_type"),
        ({**LLAMA, "model_type": "gpt2"}, "model_type 'gpt2'"),
        ("{not json", "not valid JSON"),
        ("[1, 2]", "not an object"),
        (b"\xff\xfe".decode("latin-1"), "not valid JSON"),
        ({**LLAMA, "num_attention_heads": 0}, "num_attention_heads"),
        ({**LLAMA, "hidden_size": "64"}, "hidden_size"),
        ({**LLAMA, "num_hidden_layers": -1}, "block_count"),
        ({**LLAMA, "rms_norm_eps": "x"}, "rms_norm_eps"),
        ({**LLAMA, "rope_theta": 1e300}, "rope_theta"),
        ({**LLAMA, "rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "lacks the key"),
        ({**LLAMA, "rope_scaling": {"rope_type": "linear"}}, "'factor'"),
        ({**LLAMA, "rope_scaling": [1]}, "rope_scaling"),
        ({**LLAMA, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "original_max_position_embeddings"),
        ({**GEMMA3, "rope_scaling": {"type": "linear", "factor": 8.0}}, "'rope_type'"),
        ({**GEMMA3, "sliding_window": None}, "sliding_window"),
        ({**GEMMA3, "attn_logit_softcapping": 50.0}, "attn_logit_softcapping"),
        ({**QWEN2, "num_experts": 8}, "mixture-of-experts"),
        ({**LLAMA, "quantization_config": {"quant_method": "gptq"}}, "quantized"),
        ({**LLAMA, "text_config": {}}, "text_config"),
    ],
)
def test_bad_config_refused(config, message):
    with pytest.raises(ConvertError, match=message):
        load_model_config_from(config)


def test_missing_config(tmp_path):
    with pytest.raises(ConvertError, match="config.json: missing"):
        load_model_config(tmp_path)


# ---- seeded mutation corpus over config.json -----------------------------------------------------------

_POOL = [
    None,
    0,
    1,
    -1,
    2**31,
    2**40,
    0.5,
    1e40,
    True,
    False,
    "x",
    "",
    [],
    [1],
    {},
    {"rope_type": "llama3"},
    {"rope_type": "yarn", "factor": 2.0},
    {"type": "linear", "factor": "2"},
    {"rope_type": 5},
]
_KEYS = [
    "architectures",
    "model_type",
    "hidden_size",
    "num_attention_heads",
    "num_key_value_heads",
    "num_hidden_layers",
    "intermediate_size",
    "vocab_size",
    "head_dim",
    "rope_theta",
    "rope_scaling",
    "rms_norm_eps",
    "max_position_embeddings",
    "sliding_window",
    "sliding_window_pattern",
    "use_sliding_window",
    "final_logit_softcapping",
    "rope_local_base_freq",
    "is_causal",
    "n_head",
    "use_bidirectional_attention",
    "layer_norm_eps",
]


def _mutant(rng: random.Random, base: dict) -> str:
    kind = rng.choice(["set", "set", "drop", "text"])
    cfg = copy.deepcopy(base)
    if kind == "set":
        for _ in range(rng.randint(1, 2)):
            cfg[rng.choice(_KEYS)] = copy.deepcopy(rng.choice(_POOL))
    elif kind == "drop":
        cfg.pop(rng.choice(list(cfg)), None)
    else:
        text = bytearray(json.dumps(cfg).encode())
        if rng.random() < 0.5:
            del text[rng.randrange(len(text)) :]
        else:
            text[rng.randrange(len(text))] = rng.randrange(256)
        return text.decode("utf-8", "replace")
    return json.dumps(cfg)


def test_config_mutation_corpus(tmp_path):
    rng = random.Random(7)
    bases = [LLAMA, SMOLLM2, LLAMA3, MISTRAL, QWEN2, QWEN3, GEMMA3]
    folders = [_folder(tmp_path, f"m{i}", _mutant(rng, rng.choice(bases))) for i in range(240)]
    refs = run_reference(folders)
    counts = {"both": 0, "ours only": 0, "reference only": 0, "neither": 0}
    for folder, ref in zip(folders, refs):
        try:
            cfg = load_model_config(folder)
            ours = arch_kvs(cfg, FILE_TYPES["F16"])
        except ConvertError:
            ours = None
        except Exception as e:  # noqa: BLE001 - the property under test
            pytest.fail(f"{folder.name}: {type(e).__name__}: {e}\n{(folder / 'config.json').read_text()}")
        if ours is not None and "kvs" in ref and "auto_error" not in ref:
            counts["both"] += 1
            assert _norm_kvs(ours) == _norm_kvs(ref["kvs"]), (folder / "config.json").read_text()
        else:
            key = "ours only" if ours is not None else "reference only" if "kvs" in ref else "neither"
            counts[key] += 1
    assert counts["both"] > 40, counts
    print(counts)


def test_synthetic_checkpoints_equal_reference():
    from tests.helpers.checkpoints import synthetic_checkpoint

    folders = [
        synthetic_checkpoint(arch, dtype, rope=rope)
        for arch, dtype, rope in (
            ("llama", "F16", "llama3"),
            ("llama", "BF16", None),
            ("mistral", "F32", None),
            ("qwen2", "F16", None),
            ("qwen3", "BF16", None),
            ("gemma3", "F32", None),
        )
    ]
    for folder, ref in zip(folders, run_reference(folders)):
        assert "kvs" in ref, ref.get("error")
        cfg = load_model_config(folder)
        assert {k: cfg.hparams[k] for k in READ_KEYS if k in cfg.hparams} == ref["hparams"], folder
        assert _norm_kvs(arch_kvs(cfg, FILE_TYPES["F16"])) == _norm_kvs(ref["kvs"]), folder
