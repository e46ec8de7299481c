"""The GGUF file format: ggml's type ids and sizes (types), a validating reader (reader) and a streaming
writer (writer). Nothing here knows what a tensor means; the quantize job and the engine do."""
