"""Records -> (input_ids, loss_mask), the format detected per record.

Mask convention: `loss_mask[i] == 1` means token `i` is a target, i.e. the model is trained to
predict `input_ids[i]` from `input_ids[:i]`. Token 0 has no prefix and is never a target. The
trainer shifts: `to_training_example` gives `tokens = ids[:-1]`, `labels = ids[1:]`,
`loss_mask = mask[1:]`, so `loss_mask[t]` says whether `labels[t]` counts; a sample of n ids
fills n - 1 positions (the "+1": a whole sample of seq_length positions has seq_length + 1 ids).

Formats, tried in this order by the keys a record has:
- chat `{"messages": [{"role", "content"}, ...]}`: roles system/user/assistant, rendered with the
  tokenizer's chat template (see tokenizer.py); targets: each assistant turn's content and its
  end-of-turn token(s), nothing else.
- Camelidae `{"instruction", "conversation": [{"input", "output"}, ...], "corpus"}`:
  `[BOS]` once (when the tokenizer has one; the text itself never adds another), then per turn t
  the prompt `("### System:\\n{instruction}\\n" if t == 0 and instruction else "")
  + "### Human:\\n{input}\\n### Assistant:\\n"`, then the target `encode(output) + [EOS]`.
  Turn t+1's prompt follows turn t's EOS directly. Every turn's output+EOS is a target.
- Alpaca `{"instruction", "input", "output"}` (input may be missing): the Camelidae prompt with
  one turn: instruction as system and input as human, or, when input is empty, the instruction
  as the human turn and no system. Target `encode(output) + [EOS]`.
- plain `{"text"}`: `ids = encode_default(text) + [EOS]` (`tokenizer(text).input_ids + [eos]`;
  SmolLM2 adds no BOS, a sentencepiece model with a BOS gets it); every token but the first is a
  target.
Each piece of text is encoded on its own, so the prompt's ids are exactly those an inference-time
prompt gets. An empty output / assistant content / text (after stripping) is no target; a record
left with no target at all is an empty target (the dataset counts and drops it). Anything else
wrong with a record is a DataError naming `file:line` and the reason.
"""
from __future__ import annotations

from typing import Any, Optional

import torch

from pesc_megatron.data.tokenizer import ROLES, ChatTemplateError, Tokenizer
from pesc_megatron.schema import UserError

FORMAT_VERSION = 1  # part of the token cache key: bump when any rule here changes
FORMATS = ("chat", "camelidae", "alpaca", "text")


class DataError(UserError):
    """A bad data file or record. `kind` groups reasons for skip counts; str() is one line."""

    def __init__(self, where: str, reason: str, kind: str = "malformed record"):
        super().__init__(f"{where}: {reason}" if where else reason)
        self.where, self.reason, self.kind = where, reason, kind


def detect_format(record: Any) -> str:
    if not isinstance(record, dict):
        raise DataError("", f"record is a JSON {type(record).__name__}, not an object",
                        "not an object")
    if "messages" in record:
        return "chat"
    if "conversation" in record:
        return "camelidae"
    if "instruction" in record and "output" in record:
        return "alpaca"
    if "text" in record:
        return "text"
    keys = ", ".join(sorted(record)) or "none"
    raise DataError("", f"unknown record format (keys: {keys}); expected messages, "
                    "instruction+conversation, instruction+input+output or text",
                    "unknown format")


def render_record(record: Any, tok: Tokenizer, where: str = "") -> tuple[list[int], list[int]]:
    """(input_ids, loss_mask) of one record; DataError (with `where`) when it is malformed."""
    try:
        fmt = detect_format(record)
        if fmt == "chat":
            segs = tok.chat_segments(_messages(record))
        elif fmt == "camelidae":
            instruction = _str(record, "instruction", optional=True)
            conv = record["conversation"]
            if not isinstance(conv, list) or not conv:
                raise DataError("", "conversation must be a non-empty list")
            turns = [(_str(t, "input", f"conversation[{i}]."),
                      _str(t, "output", f"conversation[{i}].")) for i, t in enumerate(conv)]
            segs = camelidae_segments(tok, instruction, turns)
        elif fmt == "alpaca":
            instruction = _str(record, "instruction")
            inp = _str(record, "input", optional=True)
            output = _str(record, "output")
            system, human = (instruction, inp) if inp.strip() else ("", instruction)
            segs = camelidae_segments(tok, system, [(human, output)])
        else:
            text = _str(record, "text")
            segs = [(tok.encode_default(text) + [tok.eos_id], bool(text.strip()))]
    except DataError as e:
        raise DataError(where, e.reason, e.kind) from None
    except ChatTemplateError as e:
        raise DataError(where, str(e), "chat template") from None
    ids = [i for s, _ in segs for i in s]
    mask = [int(t) for s, t in segs for _ in s]
    if mask:
        mask[0] = 0  # token 0 has no prefix to be predicted from
    return ids, mask


def camelidae_segments(tok: Tokenizer, instruction: str,
                       turns: list[tuple[str, str]]) -> list[tuple[list[int], bool]]:
    segs = [([tok.bos_id], False)] if tok.bos_id is not None else []
    for t, (inp, out) in enumerate(turns):
        system = f"### System:\n{instruction}\n" if t == 0 and instruction else ""
        segs.append((tok.encode(f"{system}### Human:\n{inp}\n### Assistant:\n"), False))
        segs.append((tok.encode(out) + [tok.eos_id], bool(out.strip())))
    return segs


def to_training_example(ids: list[int], mask: list[int], seq_length: int,
                        pad_id: int = 0) -> dict[str, torch.Tensor]:
    """One unpacked sample as [seq_length] tensors: tokens = ids[:-1], labels = ids[1:],
    loss_mask = mask[1:] (so loss_mask[t] says whether labels[t] counts), position_ids 0..s-1;
    cut to seq_length positions (seq_length + 1 ids) and padded with pad_id and loss_mask 0."""
    n = min(len(ids) - 1, seq_length)
    pad = seq_length - n
    out = {"tokens": ids[:n] + [pad_id] * pad, "labels": ids[1:n + 1] + [pad_id] * pad,
           "loss_mask": mask[1:n + 1] + [0] * pad, "position_ids": list(range(seq_length))}
    return {k: torch.tensor(v, dtype=torch.float32 if k == "loss_mask" else torch.long)
            for k, v in out.items()}


def _messages(record: dict) -> list[dict]:
    msgs = record["messages"]
    if not isinstance(msgs, list) or not msgs:
        raise DataError("", "messages must be a non-empty list")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise DataError("", f"messages[{i}] is not an object")
        role = _str(m, "role", f"messages[{i}].")
        if role not in ROLES:
            raise DataError("", f"messages[{i}].role is {role!r}, not one of {', '.join(ROLES)}")
        out.append({"role": role, "content": _str(m, "content", f"messages[{i}].")})
    return out


def _str(obj: Any, key: str, prefix: str = "", optional: bool = False) -> Optional[str]:
    if not isinstance(obj, dict):
        raise DataError("", f"{prefix.rstrip('.')} is not an object")
    value = obj.get(key)
    if value is None and optional:
        return ""
    if key not in obj:
        raise DataError("", f"missing key {prefix}{key}")
    if not isinstance(value, str):
        raise DataError("", f"{prefix}{key} must be a string, not {type(value).__name__}")
    return value
