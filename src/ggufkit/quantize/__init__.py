"""The quantize job: which level (levels), which type each tensor gets (rules, plan), the importance
matrix it may use (imatrix), and the streaming pass that writes the file (stream, job)."""

__all__ = ["quantize_file"]


def __getattr__(name):  # lazy: the planner and the CLI's type check import this package without the job
    if name == "quantize_file":
        from .job import quantize_file

        return quantize_file
    raise AttributeError(name)
