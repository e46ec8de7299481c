"""The built-in engine: numpy forward passes of GGUF models and their tokenizer.

One model class per architecture family (llama.py: llama, qwen2, qwen3; gemma3.py: Gemma 3 text), chosen
by general.architecture (`model_class`, `load_model`); all share args.py's ModelArgs, weights.py's
weights, llama.py's matmul and numerics.py's rounding."""

from ..errors import EvalError
from ..gguf.reader import GGUFModel
from .args import ModelArgs
from .gemma3 import Gemma3Args, Gemma3Model
from .llama import LlamaModel
from .tokenizer import GGUFTokenizer, load_tokenizer

# general.architecture -> the model class that runs it
MODEL_CLASSES: dict[str, type[LlamaModel]] = {
    **{arch: LlamaModel for arch in ModelArgs.ARCHITECTURES},
    **{arch: Gemma3Model for arch in Gemma3Args.ARCHITECTURES},
}
SUPPORTED = tuple(MODEL_CLASSES)


def model_class(model: GGUFModel) -> type[LlamaModel]:
    """The class that runs `model`; EvalError naming the architecture when the engine has none."""
    arch = model.architecture
    if arch not in MODEL_CLASSES:
        raise EvalError(
            f"{model.path}: architecture {arch!r} is not supported by the built-in engine "
            f"(supported: {', '.join(SUPPORTED)})"
        )
    return MODEL_CLASSES[arch]


def model_args(model: GGUFModel) -> ModelArgs:
    """`model`'s hyper-parameters as its model class reads them (EvalError for what the engine cannot run)."""
    return model_class(model).args_type.from_gguf(model)


def load_model(model: GGUFModel, **kwargs) -> LlamaModel:
    """`model` ready to run with the class for its architecture (kwargs: LlamaModel's)."""
    return model_class(model)(model, **kwargs)


__all__ = [
    "MODEL_CLASSES",
    "SUPPORTED",
    "GGUFTokenizer",
    "Gemma3Model",
    "LlamaModel",
    "ModelArgs",
    "load_model",
    "load_tokenizer",
    "model_args",
    "model_class",
]
