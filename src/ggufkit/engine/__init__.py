"""The built-in engine: a numpy forward pass of llama-family GGUFs and their tokenizer."""

from .llama import SUPPORTED, LlamaModel, ModelArgs
from .tokenizer import GGUFTokenizer, load_tokenizer

__all__ = ["SUPPORTED", "GGUFTokenizer", "LlamaModel", "ModelArgs", "load_tokenizer"]
