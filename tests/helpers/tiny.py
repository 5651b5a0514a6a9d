"""A tiny real job for training tests: a byte-pair tokenizer trained here, a random 2-layer
Llama with its vocabulary, converted to a PESC checkpoint, and instruction records; and the
commands that run it as users do (torchrun)."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import torch

WORDS = ("cat dog sun moon red blue one two three four five six seven eight nine ten add "
         "sum what is the answer yes no big small left right up down sort list word").split()
PESC = dict(num_experts=4, topk=2, adapter_dim=8, adapter_scaling=1.0, adapter_dropout=0.1)


def make_tokenizer(folder: Path, vocab_size: int = 128) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    rng = random.Random(0)
    corpus = [" ".join(rng.choices(WORDS, k=8)) + " ### Human: ### Assistant: ### System: :"
              for _ in range(200)]
    tok.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>", "<pad>"]))
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                            unk_token="<unk>", pad_token="<pad>").save_pretrained(folder)


def make_byte_tokenizer(folder: Path, vocab_size: int = 300) -> None:
    """A byte-level BPE (GPT-2 style: every string encodes, spaces are kept), trained on the
    shipped lm-eval tasks' words and digits."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    rng = random.Random(0)
    corpus = [f"Question: Which is the largest of {rng.randint(10, 999)}? What is "
              f"{rng.randint(2, 60)} + {rng.randint(2, 60)}?\nAnswer: " + " ".join(
                  rng.choices(WORDS, k=8)) for _ in range(300)]
    tok.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                            pad_token="<pad>").save_pretrained(folder)


def make_checkpoint(root: Path, layers: int = 2, pesc: dict | None = None,
                    intermediate: int = 64, hidden: int = 32, heads: int = 4, kv_heads: int = 2,
                    vocab: int = 128, tokenizer=make_tokenizer) -> Path:
    """root/hf (`tokenizer(folder)` + random Llama) -> root/base (PESC checkpoint). Single
    process. `vocab` may exceed the tokenizer's (unused rows, e.g. to split over 3 TP ranks)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from pesc_megatron.interop.hf_to_pesc import convert

    hf = root / "hf"
    tokenizer(hf)
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(
        hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=vocab,
        max_position_embeddings=256,
        tie_word_embeddings=False)).save_pretrained(hf)
    return convert(hf, root / "base", dict(PESC, **(pesc or {})), dtype="fp32")


def records(n: int, seed: int) -> list[dict]:
    """Chat, Camelidae, Alpaca and text records with a learnable answer pattern."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        a, b = rng.sample(WORDS, 2)
        q, ans = f"what is {a} {b}", f"the answer is {b} {a}"
        kind = i % 4
        if kind == 0:
            out.append({"messages": [{"role": "user", "content": q},
                                     {"role": "assistant", "content": ans}]})
        elif kind == 1:
            out.append({"instruction": "", "conversation": [{"input": q, "output": ans}],
                        "corpus": ""})
        elif kind == 2:
            out.append({"instruction": q, "input": "", "output": ans})
        else:
            out.append({"text": f"{q} {ans}"})
    return out


def write_jsonl(path: Path, recs: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return path


def write_job(path: Path, ckpt: Path, data_dir: Path, out_dir: Path, **sections) -> Path:
    """A YAML job for the tiny model; `sections` update the defaults, e.g. train={...}."""
    import yaml

    job = {
        "model": {"checkpoint": str(ckpt)},
        "data": {"train": [str(data_dir / "train.jsonl")], "valid": [str(data_dir /
                                                                       "valid.jsonl")],
                 "seq_length": 64, "packing": True},
        "optim": {"lr": 1e-2, "warmup_steps": 2, "clip_grad": 1.0},
        "train": {"micro_batch_size": 2, "global_batch_size": 8, "iters": 6, "seed": 7,
                  "log_interval": 1, "out_dir": str(out_dir)},
    }
    for key, value in sections.items():
        job.setdefault(key, {}).update(value)
    path.write_text(yaml.safe_dump(job))
    return path


def make_job(root: Path, train_records: int, **sections) -> tuple[Path, Path]:
    """root/base (the tiny checkpoint), root/{train,valid}.jsonl and root/job.yaml (`sections`
    as for write_job; train.out_dir defaults to root/run). Returns (checkpoint, job file)."""
    ckpt = make_checkpoint(root)
    write_jsonl(root / "train.jsonl", records(train_records, 1))
    write_jsonl(root / "valid.jsonl", records(16, 2))
    return ckpt, write_job(root / "job.yaml", ckpt, root, root / "run", **sections)


# Running it as users do: torchrun (gloo, CPU), from the repository root.
ROOT = Path(__file__).resolve().parents[2]  # the repository
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", PYTHONFAULTHANDLER="1")
TIMEOUT = 600  # seconds for one job: a hang fails its test with every process's stacks


def torchrun(nproc: int, *args, popen: bool = False, env: dict | None = None,
             check: bool = True, **kwargs):
    """`torchrun --standalone` from the repository root (`env` adds variables); asserts exit
    code 0 unless `check=False`."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={nproc}", *args]
    env = dict(ENV, **(env or {}))
    if popen:
        return subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kwargs)
    try:
        stdout, stderr = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        stdout, stderr = dump_stacks_and_kill(proc)
        raise AssertionError(f"{' '.join(cmd)}\nran past {TIMEOUT} s; every process's Python "
                             f"stacks (faulthandler):\n{stdout[-3000:]}{stderr[-20000:]}")
    run = subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)
    assert run.returncode == 0 or not check, run.stdout[-3000:] + run.stderr[-3000:]
    return run


def dump_stacks_and_kill(proc: subprocess.Popen) -> tuple[str, str]:
    """A hung job's diagnosis: SIGABRT to torchrun's workers and their children makes
    faulthandler (PYTHONFAULTHANDLER, in ENV) print every thread's stack; then SIGKILL to all.
    Returns what the job printed."""
    tree = psutil.Process(proc.pid)
    for p in tree.children(recursive=True):
        try:
            p.send_signal(signal.SIGABRT)
        except psutil.Error:
            pass
    time.sleep(5)
    kill_tree(proc)
    return proc.communicate()


def train(nproc: int, config: Path, *overrides: str, **kwargs):
    return torchrun(nproc, "-m", "pesc_megatron.cli", "train", str(config), *overrides,
                    **kwargs)


def evaluate(nproc: int, ckpt: Path, data: Path, *flags: str) -> dict:
    run = torchrun(nproc, "-m", "pesc_megatron.cli", "eval", "--ckpt", str(ckpt), "--data",
                   str(data), "--seq-length", "64", *flags)
    return json.loads(run.stdout.strip().splitlines()[-1])


def history(out_dir: Path) -> dict[int, dict]:
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in rows if "lm_loss" in r}


def job_processes(tag: str) -> list:
    """Live processes started with PESC_TEST_TAG=tag in their environment (torchrun, its
    ranks, their helper processes): what a job left behind."""
    found = []
    for p in psutil.process_iter():
        try:
            if p.environ().get("PESC_TEST_TAG") == tag:
                found.append(p)
        except (psutil.Error, OSError):
            pass
    return found


def ep2_job(root: Path, train_records: int, **train_section) -> Path:
    """make_job's job at EP=2 with these `train` settings (each test passes its out_dir)."""
    return make_job(root, train_records, parallel={"ep": 2},
                    train=dict(train_section, out_dir=str(root / "unused")))[1]


def wait_for(proc: subprocess.Popen, predicate, timeout: float = 300) -> None:
    """Polls `predicate` while the job `proc` (torchrun, popen=True) runs."""
    deadline = time.time() + timeout
    while not predicate():
        assert proc.poll() is None and time.time() < deadline, proc.stdout.read()[-3000:]
        time.sleep(0.05)


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILLs torchrun and every process it started (its workers run in sessions of their
    own, so a signal to its group would miss them)."""
    tree = psutil.Process(proc.pid)
    for p in [*tree.children(recursive=True), tree]:
        p.send_signal(signal.SIGKILL)
    proc.wait()
