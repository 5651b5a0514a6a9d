"""Instruction data: tokenizers, record formats and loss masks, the token cache, packing."""
from pesc_megatron.data.dataset import (
    DataStats,
    TokenDataset,
    build_dataset,
    collate,
    first_fit,
    read_records,
    tokenize_file,
)
from pesc_megatron.data.formats import DataError, detect_format, render_record, to_training_example
from pesc_megatron.data.tokenizer import (
    ChatTemplateError,
    HFTokenizer,
    SentencePieceTokenizer,
    Tokenizer,
    load_tokenizer,
)

__all__ = ["DataStats", "TokenDataset", "build_dataset", "collate", "first_fit", "read_records",
           "tokenize_file", "DataError", "detect_format", "render_record", "to_training_example",
           "ChatTemplateError", "HFTokenizer", "SentencePieceTokenizer", "Tokenizer",
           "load_tokenizer"]
