"""Better files at the same size: calibrated quantization into llama.cpp's standard tensor types.

`ggufkit quantize --optimize` writes a GGUF every stock llama.cpp loads (only the ggml types llama.cpp
supports for each tensor's shape), no larger than llama-quantize's file at the same level (or any
`--target-bpw` / `--target-size`), with less damage. The ideas, each in its own module:

    optimize/feedback.py   how one tensor is quantized: GPTQ-style error feedback inside ggml's block
                           formats, driven by the layer's input covariance H = X^T X (calibrate/hessian.py),
                           scales refit on the updated weights; with only the diagonal (an imatrix) it is
                           importance-weighted rounding with a refined scale search.
                               quantize_tensor(w, qtype, *, hessian=None, importance=None) -> block bytes
    optimize/allocate.py   which type each tensor gets: every allowed type's measured damage per tensor,
                           then the cheapest total damage within the byte budget.
    optimize/sensitivity.py  how much a unit of each tensor's error moves the logits (perturbation passes).
    optimize/job.py        optimize_file(): calibration (the built-in engine over held-out text), the
                           allocation, and the streaming write through quantize/'s writer, each tensor
                           rounded by the kernel asked for (feedback by default when the job has the
                           covariances, standard otherwise).
"""
