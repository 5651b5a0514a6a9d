"""Answers one chat prompt with an exported PESC model (Camelidae layout) in transformers.

    python examples/chat.py DIR ["What is the capital of France?"]
"""
import sys

from transformers import AutoModelForCausalLM, AutoTokenizer


def main(folder: str, prompt: str = "What is the capital of France?") -> str:
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
    ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                        add_generation_prompt=True,
                                        return_tensors="pt")["input_ids"]
    out = model.generate(ids, max_new_tokens=32, do_sample=False)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


if __name__ == "__main__":
    print(main(*sys.argv[1:]))
