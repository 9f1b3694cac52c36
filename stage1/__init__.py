"""Stage one: tokenizers (quantized autoencoders) that turn data into codes and back."""

from stage1.tokenizer import CheckpointKindError, Tokenizer, load_tokenizer, read_checkpoint

__all__ = ["CheckpointKindError", "Tokenizer", "load_tokenizer", "read_checkpoint"]
