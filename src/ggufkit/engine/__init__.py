"""The built-in engine: a numpy forward pass of llama-family GGUFs and their tokenizer."""

from .llama import SUPPORTED, LlamaModel, ModelArgs

__all__ = ["SUPPORTED", "LlamaModel", "ModelArgs"]
