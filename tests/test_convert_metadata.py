"""general.* KVs against the reference tree's own gguf-py metadata module.

For many folder names, config.json `_name_or_path`s, generation configs, README front matters and parameter
counts, a subprocess runs the tree's gguf-py as convert_hf_to_gguf.py's `prepare_metadata` does
(`Metadata.load`, the name and size-label fallbacks, `add_type`, `set_gguf_meta_model`) into a GGUFWriter,
writes the file and reads it back with GGUFReader; ggufkit's `general_kvs` must give the same KV list:
keys, order, types and values.
"""

from __future__ import annotations

import json
import random
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from ggufkit.conversion.metadata import _id_components, general_kvs, id_to_title, size_label
from ggufkit.errors import ConvertError
from ggufkit.gguf.types import GGUFValueType as V
from tests.helpers.llama_programs import source_tree

pytest.importorskip("yaml")

HARNESS = r"""
import json, logging, sys, tempfile, os
from pathlib import Path
sys.path[:0] = [sys.argv[1] + "/gguf-py"]
logging.disable(logging.CRITICAL)
import gguf
out = []
for folder, total in json.load(sys.stdin):
    d = Path(folder); r = {}
    try:
        md = gguf.Metadata.load(None, d, None, total)
        if md.name is None:
            md.name = d.name
        if md.size_label is None and total > 0:
            md.size_label = gguf.size_label(total, 0, 0, 0)
        fd, path = tempfile.mkstemp(suffix=".gguf"); os.close(fd)
        w = gguf.GGUFWriter(path, "llama")
        w.add_type(gguf.GGUFType.MODEL)
        md.set_gguf_meta_model(w)
        w.write_header_to_file(); w.write_kv_data_to_file(); w.close()
        kvs = []
        for f in gguf.GGUFReader(path).fields.values():
            if f.name.startswith("GGUF.") or f.name == "general.architecture":
                continue
            value = f.contents()
            sub = int(f.types[-1]) if int(f.types[0]) == 9 else None
            kvs.append([f.name, int(f.types[0]), value, sub])
        os.unlink(path)
        r["kvs"] = kvs
    except BaseException as e:
        r["error"] = f"{type(e).__name__}: {e}"[:300]
    out.append(r)
json.dump(out, sys.stdout)
"""


def run_reference(cases: list[tuple[Path, int]]) -> list[dict]:
    proc = subprocess.run(
        [sys.executable, "-c", HARNESS, str(source_tree())],
        input=json.dumps([[str(f), t] for f, t in cases]),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


def _norm(kvs) -> list:
    out = []
    for key, vtype, value, *rest in kvs:
        vtype = int(vtype)
        if vtype == V.FLOAT32:
            value = struct.pack("<f", value)
        sub = rest[0] if rest and rest[0] is not None else None
        out.append((key, vtype, value, None if sub is None else int(sub)))
    return out


NAMES = [
    "SmolLM2-135M-Instruct",
    "Llama-3.2-1B-Instruct",
    "Qwen2.5-0.5B",
    "tiny",
    "mistral-7b-v0.1",
    "gemma-3-270m-it",
    "TinyLlama-1.1B-Chat-v1.0",
    "Qwen3-0.6B-Base",
    "Mistral-7B-Instruct-v0.3",
    "bloom-7b1",
    "model",
    "Phi-3-mini-128k-instruct",
    "my_model",
    "x-32k",
    "Meta-Llama-3-8B-Instruct-Q4_K_M",
    "v2-7B",
    "1-2-3",
    "a--b",
    "Llama-2-7b-chat-hf",
    "gpt2-xl",
    "Mixtral-8x7B-v0.1",
    "DeepSeek-Coder-V2-Lite-Instruct",
    "Qwen2.5-Coder-1.5B-Instruct-GGUF",
    "smollm2_135m",
    "OLMo-2-0425-1B-SFT",
    "llama-30b-iter2",
    "b-BF16",
]
NAME_OR_PATH = [
    None,
    "HuggingFaceTB/SmolLM2-135M-Instruct",
    "/home/u/models/x",
    "./local-7b",
    "meta-llama/Llama-3.2-1B",
    "Qwen/Qwen2.5-0.5B-Instruct",
    "a model with spaces",
    "google/gemma-3-270m",
]
GENERATION = [
    None,
    {
        "bos_token_id": 1,
        "do_sample": True,
        "temperature": 0.6,
        "top_p": 0.9,
        "transformers_version": "4.45.0",
    },
    {"top_k": 20, "repetition_penalty": 1.05, "min_p": 0.0, "temperature": 0.7},
    "{not json",
    {"penalty_repeat": None, "repetition_penalty": 1.1, "top_k": None},
    {
        "sequence": "",
        "mirostat": 2,
        "mirostat_tau": 5,
        "mirostat_eta": 0.1,
        "penalty_last_n": 64,
        "xtc_probability": 0.5,
        "xtc_threshold": 0.1,
        "temperature": 1,
    },
    {"sequence": "edskypmxt", "top_p": True, "penalty_repeat": 1.3},
]
CARDS = [
    None,
    "# Just a title\n\nNo front matter.\n",
    "---\nlibrary_name: transformers\nlicense: apache-2.0\nlanguage:\n- en\npipeline_tag: text-generation\n"
    "tags:\n- safetensors\n- onnx\n- transformers.js\nbase_model:\n- HuggingFaceTB/SmolLM2-135M\n"
    "---\n\n# SmolLM2\n",
    "---\nlanguage:\n- en\n- de\n- no\n- it\nlibrary_name: transformers\nlicense: llama3.2\npipeline_tag: "
    'text-generation\ntags:\n- facebook\n- meta\n- llama\nextra_gated_prompt: "x"\n---\nbody\n---\n',
    "---\nname: Fancy\nversion: v2\nmodel_creator: Someone\nmodel_type: llama\nauthor: Me\n"
    "organization: Org\ndescription: desc\nfinetune: chat\nbasename: fancy\nsize_label: 3B\n"
    "url: https://x\ndoi: 10.1/x\nuuid: u\n"
    "repo_url: https://git\nquantized_by: q\n---\n",
    "---\nlicense:\n- mit\n- apache-2.0\nlicense_name: custom\nlicense_link: https://l\ndatasets:\n"
    "- HuggingFaceTB/smollm-corpus\n- https://huggingface.co/datasets/x/y\n- https://huggingface.co/org/name-v1.5\n"
    "- {name: D, url: https://d}\nbase_model: https://huggingface.co/google/gemma-3-270m\n---\n",
    "---\ntags:\n\t- tabbed\n\t- tags\nbase_model: null\nlanguages: fr\nlanguage: [en]\n---\n",
    "---\nmodel_name: Card Name\nmodel_version: v1\nmodel_size_label: 7B\nmodel_finetune: Inst\n"
    "base_models:\n- org/Base-Model-7B-v0.2\n- {name: Other, organization: O, repo_url: r}\n"
    "dataset_sources: single/dataset\ntags: []\npipeline_tag: text-generation\n---\n",
    "---\n- just\n- a list\n---\n",
    "---\n---\n",
]
TOTALS = [134_515_008, 0, 1_235_814_400, 494_032_768, 12345, 7_241_732_096, 268_098_176, 999_999]


def _make(root: Path, i: int, name: str, name_or_path, gen, card) -> Path:
    d = root / f"case{i}" / name
    d.mkdir(parents=True)
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama"}
    if name_or_path is not None:
        cfg["_name_or_path"] = name_or_path
    (d / "config.json").write_text(json.dumps(cfg))
    if gen is not None:
        (d / "generation_config.json").write_text(gen if isinstance(gen, str) else json.dumps(gen))
    if card is not None:
        (d / "README.md").write_text(card)
    return d


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    root = tmp_path_factory.mktemp("meta")
    rng = random.Random(13)
    out = []
    for i, name in enumerate(NAMES):  # each name alone, then with the other sources around it
        out.append((_make(root, len(out), name, None, None, None), TOTALS[i % len(TOTALS)]))
        out.append((_make(root, len(out), name, None, None, None), 0))
    for _ in range(70):
        args = (rng.choice(NAMES), rng.choice(NAME_OR_PATH), rng.choice(GENERATION), rng.choice(CARDS))
        out.append((_make(root, len(out), *args), rng.choice(TOTALS)))
    for card in CARDS:
        for gen in GENERATION:
            out.append((_make(root, len(out), "SmolLM2-135M-Instruct", None, gen, card), TOTALS[0]))
    return list(zip(out, run_reference(out)))


def test_general_kvs_equal_reference(cases):
    for (folder, total), ref in cases:
        assert "kvs" in ref, (folder, ref.get("error"))
        ours = general_kvs(folder, None, total_params=total)
        assert _norm(ours) == _norm(ref["kvs"]), (folder, total)


def test_well_known_names():
    assert id_to_title("SmolLM2-135M-Instruct") == "SmolLM2 135M Instruct"
    assert id_to_title("tiny") == "Tiny"
    assert _id_components("SmolLM2-135M-Instruct", 134_515_008)[2:] == ("SmolLM2", "Instruct", None, "135M")
    assert size_label(134_515_008) == "135M" and size_label(1_235_814_400) == "1.2B"


def test_model_card_front_matter_that_does_not_parse(tmp_path):
    d = _make(tmp_path, 0, "m", None, None, "---\nkey: [unclosed\n---\n")
    with pytest.raises(ConvertError, match="README.md.*does not parse"):
        general_kvs(d, None, total_params=10)
    (d / "README.md").write_bytes(b"---\nname: \xff\n---\n")
    with pytest.raises(ConvertError, match="README.md"):
        general_kvs(d, None, total_params=10)


def test_bad_sampling_value_refused(tmp_path):
    d = _make(tmp_path, 0, "m", None, {"top_k": 2.5}, None)
    with pytest.raises(ConvertError, match="top_k"):
        general_kvs(d, None, total_params=10)


def test_synthetic_checkpoints_equal_reference():
    from ggufkit.conversion.hf import load_model_config
    from tests.helpers.checkpoints import synthetic_checkpoint

    folders = [
        synthetic_checkpoint(a, d) for a, d in (("llama", "BF16"), ("qwen3", "BF16"), ("gemma3", "F32"))
    ]
    cases = [(f, 1_234_567) for f in folders]
    for (folder, total), ref in zip(cases, run_reference(cases)):
        assert "kvs" in ref, ref.get("error")
        ours = general_kvs(folder, load_model_config(folder), total_params=total)
        assert _norm(ours) == _norm(ref["kvs"]), folder
