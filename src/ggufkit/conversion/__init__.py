"""Hugging Face checkpoints <-> GGUF.

    job.convert(hf_dir, dst, type="F16")       a checkpoint folder to GGUF at any level, one pass
    export.export(gguf_path, hf_dir, dtype)    a GGUF back to a folder transformers loads

Both are public as ggufkit.convert and ggufkit.export; importing this package loads none of its modules.
"""
