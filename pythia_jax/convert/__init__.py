"""Weight converters: Hugging Face directories (``hf``) and GPT-NeoX DeepSpeed checkpoints (``neox``)."""
