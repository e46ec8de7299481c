"""Exception classes, one per domain. The CLI turns any of them into one line on stderr and exit status 2."""


class GgufkitError(Exception):
    """Base of every error ggufkit reports to a user (bad input, unsupported model, failed check)."""


class GGUFError(GgufkitError):
    """A GGUF file is malformed or unsupported. `offset` is the byte offset where reading failed, if known."""

    def __init__(self, reason: str, *, offset: int | None = None, path=None):
        self.reason = reason
        self.offset = offset
        self.path = path
        where = f" at byte {offset}" if offset is not None else ""
        name = f"{path}: " if path is not None else ""
        super().__init__(f"{name}{reason}{where}")


class QuantizeError(GgufkitError):
    """A quantization job cannot be done as asked (type, requantize, imatrix mismatch, non-finite weights)."""


class EvalError(GgufkitError):
    """An evaluation cannot run (architecture, text too short, vocabularies differ)."""


class CalibrationError(GgufkitError):
    """Calibration statistics cannot be collected as asked (text too short, files that do not fit)."""


class MemoryEstimateError(GgufkitError):
    """A memory estimate cannot be made from the given source."""


class PickError(GgufkitError):
    """A pick cannot be made as asked (task, report)."""


class ModelFetchError(GgufkitError):
    """The default model could not be fetched or did not verify."""


class ConvertError(GgufkitError):
    """A Hugging Face checkpoint cannot be converted as asked (architecture, tensors, shapes, values)."""


class QatError(GgufkitError):
    """Quantization-aware training cannot run as asked (folder, text too short, checkpoint of another run)."""
