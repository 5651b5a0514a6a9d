"""Instruction data: tokenizers, record formats and loss masks, sources, the token store, packing."""
from pesc_megatron.data.dataset import DataStats, TokenDataset, build_dataset, collate, first_fit
from pesc_megatron.data.formats import (
    LOSS_ON,
    DataError,
    detect_format,
    render_record,
    to_training_example,
)
from pesc_megatron.data.sources import Source, parse_entry
from pesc_megatron.data.store import TokenStore, write_store
from pesc_megatron.data.tokenizer import (
    ChatTemplateError,
    HFTokenizer,
    SentencePieceTokenizer,
    Tokenizer,
    load_tokenizer,
)

__all__ = ["DataStats", "TokenDataset", "build_dataset", "collate", "first_fit", "LOSS_ON",
           "DataError", "detect_format", "render_record", "to_training_example", "Source",
           "parse_entry", "TokenStore", "write_store", "ChatTemplateError", "HFTokenizer",
           "SentencePieceTokenizer", "Tokenizer", "load_tokenizer"]
