"""ShareGPT and OpenAI-style records (tool calls, tool results), the per-turn weight, the loss
policies and the chat template override, token by token, with both tokenizer kinds; and the
bad records of those formats, named by file and line."""
import json

import pytest

from pesc_megatron.data import DataError, build_dataset, load_tokenizer, render_record
from tests.conftest import needs_smollm2
from tests.data.conftest import write_jsonl

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather of a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]

CHAT = {"messages": [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4"},
    {"role": "user", "content": "And 4+4?"},
    {"role": "assistant", "content": "8"}]}
SHAREGPT = {"system": "Answer briefly.", "conversations": [
    {"from": "human", "value": "What is 2+2?"}, {"from": "gpt", "value": "4"},
    {"from": "user", "value": "And 4+4?"}, {"from": "assistant", "value": "8"}]}

CHAT_TOOLS = {"tools": TOOLS, "messages": [
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function",
         "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
    {"role": "tool", "tool_call_id": "c1", "content": '{"temp": 21}'},
    {"role": "assistant", "content": "It is 21 degrees."}]}
SHAREGPT_TOOLS = {"tools": TOOLS, "conversations": [
    {"from": "human", "value": "Weather in Paris?"},
    {"from": "function_call", "value": '{"name": "get_weather", "arguments": {"city": "Paris"}}'},
    {"from": "observation", "value": '{"temp": 21}'},
    {"from": "gpt", "value": "It is 21 degrees."}]}

# ChatML with Hermes/Qwen2-style tool calls: what a user gives SmolLM2 (whose own template
# renders no tool calls) through data.chat_template.
HERMES = (
    "{%- if tools %}<|im_start|>system\n{{ tools | tojson }}<|im_end|>\n{% endif -%}"
    "{%- for m in messages -%}<|im_start|>{{ m.role }}\n{{ m.content or '' }}"
    "{%- for c in m.tool_calls or [] -%}\n<tool_call>\n"
    "{{ {'name': c.function.name, 'arguments': c.function.arguments} | tojson }}\n</tool_call>"
    "{%- endfor -%}<|im_end|>\n{% endfor -%}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{% endif -%}")
# Llama-2's rule: roles must alternate user/assistant after an optional system message.
ALTERNATING = (
    "{%- for m in messages -%}"
    "{%- if (m.role == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant') }}"
    "{%- endif -%}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor -%}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{% endif -%}")


def targets(ids, mask):
    return [i for i, m in zip(ids, mask) if m]


@pytest.fixture(scope="module")
def hermes(smol_folder, tmp_path_factory):
    path = tmp_path_factory.mktemp("template") / "hermes.jinja"
    path.write_text(HERMES)
    return load_tokenizer(smol_folder, chat_template=path), path


@pytest.mark.parametrize("kind", ["sp", pytest.param("hf", marks=needs_smollm2)])
def test_sharegpt_is_the_chat_record(kind, request):
    tok = request.getfixturevalue(kind)
    assert render_record(SHAREGPT, tok) == render_record(CHAT, tok)


def test_tool_calls_builtin_template(sp):
    ids, mask = render_record(CHAT_TOOLS, sp)
    assert render_record(SHAREGPT_TOOLS, sp) == (ids, mask)
    call = json.dumps({"name": "get_weather", "arguments": {"city": "Paris"}})
    want = (sp.encode(f"<tool_call>\n{call}\n</tool_call>") + [sp.eos_id]
            + sp.encode("It is 21 degrees.") + [sp.eos_id])
    assert targets(ids, mask) == want  # the call and the answer; not the tool's result
    tools_turn = sp.encode(f"<|im_start|>tools\n{json.dumps(TOOLS)}") + [sp.eos_id]
    assert ids[1:1 + len(tools_turn)] == tools_turn


@needs_smollm2
def test_tool_calls_need_a_template_that_renders_them(hf, hermes, tmp_path):
    with pytest.raises(DataError, match=r"f.jsonl:1: the chat template drops "
                       r"messages\[1\].tool_calls; set data.chat_template"):
        render_record(CHAT_TOOLS, hf, "f.jsonl:1")
    tok, _ = hermes
    ids, mask = render_record(CHAT_TOOLS, tok)
    assert render_record(SHAREGPT_TOOLS, tok) == (ids, mask)
    text = tok.tok.apply_chat_template(CHAT_TOOLS["messages"][:1] + [
        {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {
            "name": "get_weather", "arguments": {"city": "Paris"}}}]},
        *CHAT_TOOLS["messages"][2:]], tools=TOOLS, tokenize=False)
    assert ids == tok.encode(text)  # exactly the template's rendering
    got = tok.decode(targets(ids, mask))
    assert got == ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
                   '</tool_call><|im_end|>It is 21 degrees.<|im_end|>')


@needs_smollm2
def test_template_override_changes_the_tokenizer_identity(hf, hermes):
    tok, path = hermes
    assert tok.identity != hf.identity
    assert load_tokenizer(hf.path, chat_template=path).identity == tok.identity


def test_template_override_needs_an_hf_tokenizer(sp, tmp_path):
    (tmp_path / "t.jinja").write_text(HERMES)
    with pytest.raises(Exception, match="a chat template needs an HF tokenizer folder"):
        load_tokenizer(sp.path, chat_template=tmp_path / "t.jinja")


MULTI = {"messages": CHAT["messages"] + [{"role": "user", "content": "And 8+8?"},
                                         {"role": "assistant", "content": "16"}]}


@pytest.mark.parametrize("kind", ["sp", pytest.param("hf", marks=needs_smollm2)])
def test_loss_policies_and_weight(kind, request):
    tok = request.getfixturevalue(kind)
    ids, every = render_record(MULTI, tok)
    answers = [tok.encode(a) for a in ("4", "8", "16")]

    def turn_targets(mask):  # the target runs, decoded
        runs, cur = [], []
        for i, m in zip(ids, mask):
            if m:
                cur.append(i)
            elif cur:
                runs.append(cur)
                cur = []
        return runs + ([cur] if cur else [])

    runs = turn_targets(every)
    assert [r[:len(a)] for r, a in zip(runs, answers)] == answers and len(runs) == 3
    same_ids, last = render_record(MULTI, tok, loss_on="last")
    assert same_ids == ids and turn_targets(last) == runs[2:]
    _, everything = render_record(MULTI, tok, loss_on="all")
    assert everything == [0] + [1] * (len(ids) - 1)
    weighted = json.loads(json.dumps(MULTI))
    weighted["messages"][4]["weight"] = 0  # the second answer is context only
    for policy, want in (("assistant", [runs[0], runs[2]]), ("last", [runs[2]])):
        w_ids, w_mask = render_record(weighted, tok, loss_on=policy)
        assert w_ids == ids and turn_targets(w_mask) == want, policy
    _, w_all = render_record(weighted, tok, loss_on="all")
    off = [m for m, a in zip(w_all, every) if a and m == 0]  # only the weight-0 turn's targets
    assert len(off) == len(runs[1]) and sum(w_all) == len(ids) - 1 - len(runs[1])


def test_camelidae_last_turn_policy(sp):
    rec = {"instruction": "", "conversation": [{"input": "a", "output": "cats"},
                                               {"input": "b", "output": "dogs"}]}
    ids, mask = render_record(rec, sp, loss_on="last")
    assert targets(ids, mask) == sp.encode("dogs") + [sp.eos_id]
    rec["conversation"][1]["weight"] = 0
    assert not any(render_record(rec, sp, loss_on="last")[1])  # an empty target: dropped


@pytest.mark.parametrize("record, reason", [
    ({"conversations": [{"from": "human", "value": "hi"}, {"from": "bot", "value": "yo"}]},
     r"conversations\[1\].from is 'bot', not one of system, human"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "tool", "content": "21"}]},
     r"messages\[1\] is a tool message with no tool call before it"),
    ({"conversations": [{"from": "human", "value": "hi"}, {"from": "observation", "value": "x"}]},
     r"conversations\[1\] is a tool message with no tool call before it"),
    ({"messages": [{"role": "user", "content": "hi"},
                   {"role": "assistant", "content": "yo", "weight": 0.5}]},
     r"messages\[1\].weight must be 0 or 1, not 0.5"),
    ({"messages": [{"role": "assistant", "content": None, "tool_calls": [
        {"function": {"name": "f", "arguments": "{oops"}}]}]},
     r"messages\[0\].tool_calls\[0\].function.arguments is not JSON"),
])
def test_bad_conversations_name_file_line_and_field(sp, tmp_path, record, reason):
    f = write_jsonl(tmp_path / "d.jsonl", [{"text": "fine"}, record])
    with pytest.raises(DataError, match=rf"^{f}:2: {reason}"):
        build_dataset([f], sp, seq_length=64)
    ds = build_dataset([f], sp, seq_length=64, on_error="skip", cache_dir=tmp_path / "c")
    assert ds.stats.records == 2 and ds.stats.samples == 1 and sum(ds.stats.skipped.values()) == 1


@needs_smollm2
def test_template_that_requires_alternation(smol_folder, tmp_path):
    (tmp_path / "alt.jinja").write_text(ALTERNATING)
    tok = load_tokenizer(smol_folder, chat_template=tmp_path / "alt.jinja")
    f = write_jsonl(tmp_path / "d.jsonl", [
        {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
        {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"},
                      {"role": "assistant", "content": "c"}]}])
    with pytest.raises(DataError, match=rf"^{f}:2: chat template failed: Conversation roles "
                       "must alternate"):
        build_dataset([f], tok, seq_length=64, cache_dir=tmp_path / "cache")
    assert not list((tmp_path / "cache").iterdir())  # nothing half-written
