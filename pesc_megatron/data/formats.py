"""Records -> (input_ids, loss_mask), the format detected per record.

Mask convention: `loss_mask[i] == 1` means token `i` is a target, i.e. the model is trained to
predict `input_ids[i]` from `input_ids[:i]`. Token 0 has no prefix and is never a target. The
trainer shifts: `to_training_example` gives `tokens = ids[:-1]`, `labels = ids[1:]`,
`loss_mask = mask[1:]`, so `loss_mask[t]` says whether `labels[t]` counts; a sample of n ids
fills n - 1 positions (the "+1": a whole sample of seq_length positions has seq_length + 1 ids).

Formats, tried in this order by the keys a record has:
- chat `{"messages": [{"role", "content"}, ...], "tools"?}` (OpenAI's layout): roles
  system/user/assistant/tool, rendered with the tokenizer's chat template (see tokenizer.py).
  An assistant message may have `tool_calls` (`[{"type": "function", "function": {"name",
  "arguments"}}]`; arguments given as a JSON string are parsed, as HF templates want a dict)
  and `content` null or missing; a `tool` message must answer a call of an earlier assistant
  message (one tool message per call at most).
- ShareGPT `{"conversations": [{"from", "value"}, ...], "system"?, "tools"?}`: `from` is
  system, human/user, gpt/assistant, tool/function/observation (a tool result), or
  function_call (an assistant tool call; value is `{"name", "arguments"}` JSON). It becomes the
  equivalent chat record, so it gives exactly that record's tokens and mask.
- Camelidae `{"instruction", "conversation": [{"input", "output"}, ...], "corpus"}`:
  `[BOS]` once (when the tokenizer has one; the text itself never adds another), then per turn t
  the prompt `("### System:\\n{instruction}\\n" if t == 0 and instruction else "")
  + "### Human:\\n{input}\\n### Assistant:\\n"`, then the turn `encode(output) + [EOS]`.
  Turn t+1's prompt follows turn t's EOS directly.
- Alpaca `{"instruction", "input", "output"}` (input may be missing): the Camelidae prompt with
  one turn: instruction as system and input as human, or, when input is empty, the instruction
  as the human turn and no system.
- plain `{"text"}`: `ids = encode_default(text) + [EOS]` (`tokenizer(text).input_ids + [eos]`;
  SmolLM2 adds no BOS, a sentencepiece model with a BOS gets it); every token but the first is a
  target, whatever the loss policy.
Targets of the turn formats, by the loss policy `loss_on`:
- `assistant` (default): every assistant turn (chat/ShareGPT: its content, tool calls and end
  of turn; Camelidae/Alpaca: output + EOS);
- `last`: the last assistant turn only;
- `all`: every token, the prompts too.
A turn with `"weight": 0` (OpenAI's fine-tuning flag, on a message, a ShareGPT turn or a
Camelidae turn; 1 is the default) is never a target, and an assistant turn with no content (after
stripping) and no tool call is none under `assistant`/`last`.
Each piece of text is encoded on its own, so the prompt's ids are exactly those an inference-time
prompt gets. A record left with no target at all is an empty target (the dataset counts and
drops it). Anything else wrong with a record is a DataError naming `file:line` (`file:row N`
for Parquet/Arrow) and the field.
"""
from __future__ import annotations

import json
from typing import Any, Optional

import torch

from pesc_megatron.data.tokenizer import ROLES, ChatTemplateError, Tokenizer
from pesc_megatron.schema import UserError

FORMAT_VERSION = 2  # part of the token cache key: bump when any rule here changes
FORMATS = ("chat", "sharegpt", "camelidae", "alpaca", "text")
LOSS_ON = ("assistant", "last", "all")
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant",
                  "assistant": "assistant", "tool": "tool", "function": "tool",
                  "observation": "tool", "function_call": "assistant"}


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
    if "conversations" in record:
        return "sharegpt"
    if "conversation" in record:
        return "camelidae"
    if "instruction" in record and "output" in record:
        return "alpaca"
    if "text" in record:
        return "text"
    keys = ", ".join(sorted(record)) or "none"
    raise DataError("", f"unknown record format (keys: {keys}); expected messages, "
                    "conversations, instruction+conversation, instruction+input+output or text",
                    "unknown format")


def render_record(record: Any, tok: Tokenizer, where: str = "", loss_on: str = "assistant"
                  ) -> tuple[list[int], list[int]]:
    """(input_ids, loss_mask) of one record; DataError (with `where`) when it is malformed."""
    try:
        fmt = detect_format(record)
        if fmt in ("chat", "sharegpt"):
            msgs = _messages(record) if fmt == "chat" else sharegpt_messages(record)
            tools = record.get("tools") or None
            if tools is not None and not isinstance(tools, list):
                raise DataError("", f"tools must be a list, not {type(tools).__name__}")
            segs = tok.chat_segments(msgs, tools=tools)
            turns = {i: m for i, m in enumerate(msgs) if m["role"] == "assistant"}
            weights = {i: _weight(m, f"messages[{i}].") for i, m in turns.items()}
            has_text = {i: bool(m["content"].strip() or m.get("tool_calls"))
                        for i, m in turns.items()}
        elif fmt == "camelidae":
            instruction = _str(record, "instruction", optional=True)
            conv = record["conversation"]
            if not isinstance(conv, list) or not conv:
                raise DataError("", "conversation must be a non-empty list")
            pairs = [(_str(t, "input", f"conversation[{i}]."),
                      _str(t, "output", f"conversation[{i}].")) for i, t in enumerate(conv)]
            segs = camelidae_segments(tok, instruction, pairs)
            weights = {i: _weight(t, f"conversation[{i}].") for i, t in enumerate(conv)}
            has_text = {i: bool(out.strip()) for i, (_, out) in enumerate(pairs)}
        elif fmt == "alpaca":
            instruction = _str(record, "instruction")
            inp = _str(record, "input", optional=True)
            output = _str(record, "output")
            system, human = (instruction, inp) if inp.strip() else ("", instruction)
            segs = camelidae_segments(tok, system, [(human, output)])
            weights, has_text = {0: 1}, {0: bool(output.strip())}
        else:
            text = _str(record, "text")
            segs = [(tok.encode_default(text) + [tok.eos_id], 0)]
            weights, has_text, loss_on = {0: 1}, {0: bool(text.strip())}, "assistant"
    except DataError as e:
        raise DataError(where, e.reason, e.kind) from None
    except ChatTemplateError as e:
        raise DataError(where, str(e), "chat template") from None
    last = max(weights) if weights else None

    def is_target(owner: int) -> bool:
        if owner >= 0 and not weights[owner]:
            return False
        if loss_on == "all":
            return True
        return owner >= 0 and has_text[owner] and (loss_on == "assistant" or owner == last)

    ids = [i for s, _ in segs for i in s]
    mask = [int(t) for s, owner in segs for t in [is_target(owner)] * len(s)]
    if mask:
        mask[0] = 0  # token 0 has no prefix to be predicted from
    return ids, mask


def camelidae_segments(tok: Tokenizer, instruction: str,
                       turns: list[tuple[str, str]]) -> list[tuple[list[int], int]]:
    """(ids, owner) segments, owner = the turn index of an output, -1 for a prompt."""
    segs = [([tok.bos_id], -1)] if tok.bos_id is not None else []
    for t, (inp, out) in enumerate(turns):
        system = f"### System:\n{instruction}\n" if t == 0 and instruction else ""
        segs.append((tok.encode(f"{system}### Human:\n{inp}\n### Assistant:\n"), -1))
        segs.append((tok.encode(out) + [tok.eos_id], t))
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
    """The chat record's messages, checked and normalised to role/content(/tool_calls)."""
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
        calls = m.get("tool_calls") if role == "assistant" else None
        content = _str(m, "content", f"messages[{i}].", optional=bool(calls))
        msg = {"role": role, "content": content}
        if calls:
            msg["tool_calls"] = _tool_calls(calls, f"messages[{i}].tool_calls")
        if role == "tool":  # some templates (Mistral's) render which call a result answers
            msg.update({k: m[k] for k in ("tool_call_id", "name") if isinstance(m.get(k), str)})
        if "weight" in m:
            msg["weight"] = m["weight"]
        out.append(msg)
    _check_tool_answers(out, "messages")
    return out


def sharegpt_messages(record: dict) -> list[dict]:
    """A ShareGPT record as the equivalent chat messages (checked like a chat record's)."""
    conv = record["conversations"]
    if not isinstance(conv, list) or not conv:
        raise DataError("", "conversations must be a non-empty list")
    system = _str(record, "system", optional=True)
    out = [{"role": "system", "content": system}] if system else []
    for i, turn in enumerate(conv):
        where = f"conversations[{i}]."
        frm = _str(turn, "from", where)
        if frm not in SHAREGPT_ROLES:
            raise DataError("", f"{where}from is {frm!r}, not one of "
                            f"{', '.join(SHAREGPT_ROLES)}", "unknown role")
        value = _str(turn, "value", where)
        if frm == "function_call":
            try:
                call = json.loads(value)
            except json.JSONDecodeError as e:
                raise DataError("", f"{where}value of a function_call is not JSON ({e.msg})")
            msg = {"role": "assistant", "content": "",
                   "tool_calls": _tool_calls([{"type": "function", "function": call}],
                                             f"{where}value")}
        else:
            msg = {"role": SHAREGPT_ROLES[frm], "content": value}
        if "weight" in turn:
            msg["weight"] = turn["weight"]
        out.append(msg)
    _check_tool_answers(out, "conversations")
    return out


def _tool_calls(calls: Any, where: str) -> list[dict]:
    if not isinstance(calls, list):
        raise DataError("", f"{where} must be a list, not {type(calls).__name__}")
    out = []
    for j, c in enumerate(calls):
        fn = c.get("function") if isinstance(c, dict) else None
        if not isinstance(fn, dict):
            raise DataError("", f"{where}[{j}] has no function object")
        name = _str(fn, "name", f"{where}[{j}].function.")
        args = fn.get("arguments", {})
        if isinstance(args, str):
            try:
                args = json.loads(args) if args.strip() else {}
            except json.JSONDecodeError as e:
                raise DataError("", f"{where}[{j}].function.arguments is not JSON ({e.msg})")
        if not isinstance(args, dict):
            raise DataError("", f"{where}[{j}].function.arguments must be an object")
        call = {"type": "function", "function": {"name": name, "arguments": args}}
        if "id" in c:
            call["id"] = c["id"]
        out.append(call)
    return out


def _check_tool_answers(msgs: list[dict], key: str) -> None:
    """Each tool message answers a call of the assistant message before it (one per call)."""
    pending = 0
    for i, m in enumerate(msgs):
        if m["role"] == "tool":
            if pending == 0:
                raise DataError("", f"{key}[{i}] is a tool message with no tool call before "
                                "it", "tool without call")
            pending -= 1
        else:
            pending = len(m.get("tool_calls") or ())


def _weight(obj: dict, prefix: str) -> int:
    w = obj.get("weight", 1)
    if w not in (0, 1) or isinstance(w, float) and w != int(w):
        raise DataError("", f"{prefix}weight must be 0 or 1, not {w!r}")
    return int(w)


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
