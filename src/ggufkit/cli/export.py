"""`ggufkit export MODEL.gguf HF_DIR [--dtype f32|f16|bf16] [--force]`: a GGUF back to an HF folder."""

from __future__ import annotations


def add_parser(sub):
    p = sub.add_parser(
        "export",
        help="write a Hugging Face folder (safetensors, config, tokenizer) from a GGUF",
        description="The way back from a GGUF: dequantized safetensors in Hugging Face names and layout, "
        "config.json, generation_config.json, tokenizer.json or tokenizer.model, tokenizer_config.json with "
        "the chat template — a folder transformers loads and `ggufkit convert` takes back. Architectures: "
        "llama, qwen2, qwen3, gemma3.",
    )
    p.add_argument("model", metavar="MODEL.gguf", help="the GGUF file")
    p.add_argument("hf_dir", metavar="HF_DIR", help="the folder to write (must be empty unless --force)")
    p.add_argument(
        "--dtype",
        choices=("f32", "f16", "bf16"),
        default=None,
        help="type of the weight matrices (default: the GGUF's own if F32/F16/BF16, else f32); "
        "norms and biases are always f32",
    )
    p.add_argument("--force", action="store_true", help="write into a non-empty HF_DIR")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..conversion.export import export

    s = export(args.model, args.hf_dir, dtype=args.dtype, overwrite=args.force)
    print(f"{s.path}: {s.architecture}, {s.n_tensors} tensors ({s.dtype}), {', '.join(s.files)}")
    return 0
