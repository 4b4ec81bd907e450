"""Model I/O tests: chat templates, tokenizers, GGUF import and the default model."""
