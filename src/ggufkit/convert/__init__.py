"""From a Hugging Face checkpoint folder to GGUF (`ggufkit convert`)."""
