"""What the tests and benchmarks/ share, imported as tests.helpers.<module> from the repository root.

Oracles: libggml (libggml through ctypes, the reference for every block format), llama_programs (llama.cpp's
programs built from the llama-cpp-python sdist, and llama_model_quantize), memory_oracle (llama.cpp's own
memory use). Files: gguf_build (the one tiny-GGUF builder, and raw bytes for hostile files), synthetic
(seeded synthetic llama models). Data: quant_data (seeded hostile block-format inputs and byte checks).
"""
