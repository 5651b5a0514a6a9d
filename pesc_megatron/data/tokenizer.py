"""One tokenizer interface over a Hugging Face tokenizer folder and a sentencepiece `.model` file.

    tok = load_tokenizer(path)     # HF folder, checkpoint folder with tokenizer/, or x.model
    tok.encode(text)               # ids, never with special tokens
    tok.encode_default(text)       # what `tokenizer(text).input_ids` gives (the plain-text rule)
    tok.chat_segments(messages)    # [(ids, owner)], concatenating to the rendered chat

Messages are `{"role", "content"}` dicts (roles system/user/assistant/tool); an assistant
message may carry OpenAI-style `tool_calls` (`[{"type": "function", "function": {"name",
"arguments": dict}}]`), and `tools` (function schemas) go to the template as HF's `tools=`.
Segments are (ids, owner): owner is the index of the assistant message whose turn the ids are
(its content, tool calls and end of turn: the candidate target), or -1 for everything else.

Chat rendering. A tokenizer with a chat template (its own, or `chat_template=` text that
replaces it) renders through it. The whole conversation is rendered and encoded once; the turns
are found from renderings of its prefixes, as text: for each assistant message i, the text of
`messages[:i]` with the generation prompt, then of `messages[:i+1]`; between the two is that
turn. The turn runs up to and including its last EOS token (the template's end-of-turn, e.g.
SmolLM2's `<|im_end|>`); what follows it (the `\\n` between turns) is glue. Each rendering must
be a text prefix of the conversation's that ends on a token boundary, so the segments
concatenate to exactly `encode(template(messages))`; a template that is not incremental in
that sense, or that drops an assistant message's tool_calls, is a ChatTemplateError rather
than a silently wrong mask.

Without a template (sentencepiece always) the built-in ChatML-like template is used:
`[BOS] <|im_start|>{role}\\n{content}[EOS] <|im_start|>{role}\\n{content}[EOS] ...`, the markers
as plain text and the end of each turn as the EOS id (plain text cannot produce a control id).
Tool calls follow the assistant content as Hermes/Qwen2 `<tool_call>\\n{"name": ..., "arguments":
...}\\n</tool_call>` lines; `tools` come first as a `<|im_start|>tools\\n{json}[EOS]` turn.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Optional, Sequence

from pesc_megatron.schema import UserError

import json

Segments = list  # list[tuple[list[int], int]]: (ids, owner: assistant message index or -1)

BUILTIN_TEMPLATE_VERSION = 1  # part of a tokenizer's identity: bump when the built-in changes
ROLES = ("system", "user", "assistant", "tool")
# Files that define an HF tokenizer; their bytes are its identity (model weights are not read).
HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                       "added_tokens.json", "chat_template.jinja", "chat_template.json",
                       "vocab.json", "vocab.txt", "merges.txt", "tokenizer.model")


class ChatTemplateError(ValueError):
    """The chat template failed on, or cannot be masked for, one conversation."""


class Tokenizer:
    """Common interface; `HFTokenizer` and `SentencePieceTokenizer` implement the encoding."""

    kind = ""
    bos_id: Optional[int] = None
    eos_id: int = 0
    pad_id: int = 0
    vocab_size: int = 0
    identity: str = ""  # hash of the tokenizer's files and kind: keys the token cache

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def encode_default(self, text: str) -> list[int]:
        """The tokenizer's default call, `tokenizer(text).input_ids` (with its special tokens)."""
        raise NotImplementedError

    def decode(self, ids: Sequence[int]) -> str:
        raise NotImplementedError

    @property
    def has_chat_template(self) -> bool:
        return False

    def chat_segments(self, messages: list[dict], add_generation_prompt: bool = False,
                      tools: Optional[list] = None) -> Segments:
        """`messages` (already validated) as (ids, owner) segments. With
        `add_generation_prompt` the result ends with the assistant header (for inference)."""
        return _builtin_chat(self, messages, add_generation_prompt, tools)


class HFTokenizer(Tokenizer):
    kind = "hf"

    def __init__(self, folder: str | os.PathLike, chat_template: Optional[str] = None):
        from transformers import AutoTokenizer  # slow import: only when an HF tokenizer is used

        self.path = Path(folder)
        self.tok = AutoTokenizer.from_pretrained(str(folder))
        if chat_template is not None:
            self.tok.chat_template = chat_template
        self.bos_id = self.tok.bos_token_id
        if self.tok.eos_token_id is None:
            raise ValueError(f"{folder}: the tokenizer defines no EOS token")
        self.eos_id = self.tok.eos_token_id
        self.pad_id = self.tok.pad_token_id if self.tok.pad_token_id is not None else self.eos_id
        self.vocab_size = len(self.tok)
        files = [self.path / n for n in HF_TOKENIZER_FILES if (self.path / n).is_file()]
        self.identity = _hash_files(files, f"hf/{BUILTIN_TEMPLATE_VERSION}", chat_template)

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False)

    def encode_default(self, text: str) -> list[int]:
        return list(self.tok(text).input_ids)

    def decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode(list(ids))

    @property
    def has_chat_template(self) -> bool:
        return bool(self.tok.chat_template)

    def chat_segments(self, messages: list[dict], add_generation_prompt: bool = False,
                      tools: Optional[list] = None) -> Segments:
        if not self.has_chat_template:
            return _builtin_chat(self, messages, add_generation_prompt, tools)
        return _template_chat(self, messages, add_generation_prompt, tools)

    def render_text(self, messages: list[dict], add_generation_prompt: bool,
                    tools: Optional[list] = None) -> str:
        """The template's text for `messages`."""
        try:
            return self.tok.apply_chat_template(messages, tools=tools, tokenize=False,
                                                add_generation_prompt=add_generation_prompt)
        except Exception as e:  # jinja's own errors (e.g. "roles must alternate")
            raise ChatTemplateError(f"chat template failed: {e}") from None

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """encode(text) and each token's character span."""
        backend = getattr(self.tok, "backend_tokenizer", None)
        if backend is not None:  # the Rust tokenizer itself: a fifth of the time of the call
            enc = backend.encode(text, add_special_tokens=False)
            return enc.ids, enc.offsets
        enc = self.tok(text, add_special_tokens=False, return_offsets_mapping=True)
        return list(enc.input_ids), list(enc.offset_mapping)


class SentencePieceTokenizer(Tokenizer):
    kind = "sentencepiece"

    def __init__(self, model_file: str | os.PathLike):
        import sentencepiece

        self.path = Path(model_file)
        self.sp = sentencepiece.SentencePieceProcessor(model_file=str(model_file))
        opt = lambda i: i if i >= 0 else None  # noqa: E731 (sentencepiece says -1 for "none")
        self.bos_id = opt(self.sp.bos_id())
        eos = opt(self.sp.eos_id())
        if eos is None:
            raise ValueError(f"{model_file}: the sentencepiece model defines no EOS (</s>) piece")
        self.eos_id = eos
        self.pad_id = next(i for i in (opt(self.sp.pad_id()), self.eos_id) if i is not None)
        self.vocab_size = self.sp.get_piece_size()
        self.identity = _hash_files([self.path], f"sentencepiece/{BUILTIN_TEMPLATE_VERSION}")

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def encode_default(self, text: str) -> list[int]:
        # As HF's sentencepiece-backed tokenizers (Llama) do by default: BOS, no EOS.
        return ([self.bos_id] if self.bos_id is not None else []) + self.encode(text)

    def decode(self, ids: Sequence[int]) -> str:
        return self.sp.decode(list(ids))


def load_tokenizer(path: str | os.PathLike, chat_template: Optional[str | os.PathLike] = None
                   ) -> Tokenizer:
    """A `.model` file -> sentencepiece; a folder with a `tokenizer/` subfolder (a checkpoint)
    -> HF on that subfolder; another folder -> HF. `chat_template`: a Jinja file replacing the
    HF tokenizer's template (a sentencepiece model cannot encode a template's special tokens
    from text, so it keeps the built-in one)."""
    p = Path(path)
    template = None
    if chat_template is not None:
        try:
            template = Path(chat_template).read_text()
        except OSError as e:
            raise UserError(f"{chat_template}: chat template not readable ({e.strerror})"
                            ) from None
    if p.is_file() and p.suffix == ".model":
        if template is not None:
            raise UserError(f"{chat_template}: a chat template needs an HF tokenizer folder; "
                             f"{path} is a sentencepiece model (it uses the built-in template)")
        return SentencePieceTokenizer(p)
    if p.is_dir():
        sub = p / "tokenizer"
        return HFTokenizer(sub if sub.is_dir() else p, template)
    raise FileNotFoundError(f"tokenizer not found: {path} (want an HF folder or a .model file)")


def _hash_files(files: list[Path], kind: str, extra: Optional[str] = None) -> str:
    h = hashlib.sha256(kind.encode())
    for f in sorted(files):
        h.update(f.name.encode() + b"\0" + f.read_bytes() + b"\0")
    if extra is not None:  # a chat template override
        h.update(b"template\0" + extra.encode())
    return h.hexdigest()


def _builtin_chat(tok: Tokenizer, messages: list[dict], add_generation_prompt: bool,
                  tools: Optional[list] = None) -> Segments:
    segs: Segments = [([tok.bos_id], -1)] if tok.bos_id is not None else []
    if tools:
        segs.append((tok.encode(f"<|im_start|>tools\n{json.dumps(tools)}") + [tok.eos_id], -1))
    for i, m in enumerate(messages):
        segs.append((tok.encode(f"<|im_start|>{m['role']}\n"), -1))
        text = m["content"]
        calls = [json.dumps({"name": c["function"]["name"],
                             "arguments": c["function"]["arguments"]})
                 for c in m.get("tool_calls") or ()]
        if calls:
            text = "\n".join(([m["content"]] if m["content"] else [])
                             + [f"<tool_call>\n{c}\n</tool_call>" for c in calls])
        segs.append((tok.encode(text) + [tok.eos_id], i if m["role"] == "assistant" else -1))
    if add_generation_prompt:
        segs.append((tok.encode("<|im_start|>assistant\n"), -1))
    return segs


def _template_chat(tok: HFTokenizer, messages: list[dict], add_generation_prompt: bool,
                   tools: Optional[list] = None) -> Segments:
    """The conversation is encoded once; the turns' boundaries come from rendering its
    prefixes as text (each must be a text prefix of the next, and fall on a token boundary)."""
    final = tok.render_text(messages, add_generation_prompt, tools)
    ids, offsets = tok.encode_with_offsets(final)
    starts = {0: 0}  # char position -> index of the token starting there
    for j, (a, b) in enumerate(offsets):
        starts.setdefault(a, j)
    starts[len(final)] = len(ids)
    cuts: list[tuple[int, int]] = []  # (char position, owner of what follows it)

    def cut(text: str, upto: int, owner: int) -> None:
        if not final.startswith(text) or len(text) not in starts:
            raise ChatTemplateError(f"chat template is not incremental at message {upto}: the "
                                    "rendering of the earlier messages is not a token prefix")
        cuts.append((len(text), owner))

    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        cut(tok.render_text(messages[:i], True, tools), i, i)
        full = tok.render_text(messages[:i + 1], False, tools)
        if m.get("tool_calls"):
            bare = tok.render_text(messages[:i] + [{**m, "tool_calls": []}], False, tools)
            if bare == full:
                raise ChatTemplateError(
                    f"the chat template drops messages[{i}].tool_calls; set data.chat_template "
                    "to a Jinja template that renders tool calls")
        cut(full, i, -1)
    segs: Segments = []
    begin, owner = 0, -1
    for pos, nxt in cuts + [(len(final), -1)]:
        piece = ids[starts[begin]:starts[pos]]
        if owner >= 0:  # the turn ends with its last EOS; the rest (e.g. "\n") is template glue
            ends = [j for j, t in enumerate(piece) if t == tok.eos_id]
            end = ends[-1] + 1 if ends else len(piece)
            segs += [(piece[:end], owner), (piece[end:], -1)]
        else:
            segs.append((piece, -1))
        begin, owner = pos, nxt
    return [(p, o) for p, o in segs if p]
