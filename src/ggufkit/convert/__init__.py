"""Hugging Face checkpoint folder -> GGUF, in one streaming pass (ggufkit convert)."""
