"""The tokenizers of the data tests: SmolLM2's HF tokenizer (its chat template) and a small
sentencepiece model trained here (the built-in template)."""
import json

import pytest

from pesc_megatron.data import load_tokenizer


@pytest.fixture(scope="module")
def smol_folder(smollm2_folder):
    return smollm2_folder


@pytest.fixture(scope="module")
def hf(smol_folder):
    return load_tokenizer(smol_folder)


@pytest.fixture(scope="module")
def sp(tmp_path_factory):
    import sentencepiece
    d = tmp_path_factory.mktemp("sp")
    import random
    rng = random.Random(0)
    words = ["".join(rng.choices("abcdefghijklmnopqrstuvwxyz", k=rng.randint(2, 7)))
             for _ in range(600)] + "cats dogs rivers the answer question more".split()
    marks = ["### Human:", "### Assistant:", "### System:", "<|im_start|>user", "?", "'", "+"]
    lines = [" ".join(rng.choices(words + marks, k=rng.randint(3, 12))) + f" {i}"
             for i in range(400)]
    (d / "corpus.txt").write_text("\n".join(lines) + "\n")
    sentencepiece.SentencePieceTrainer.train(
        input=str(d / "corpus.txt"), model_prefix=str(d / "sp"), vocab_size=200,
        model_type="unigram", minloglevel=2)
    return load_tokenizer(d / "sp.model")


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path
