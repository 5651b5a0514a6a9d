"""Hugging Face dense (or Camelidae) folder -> PESC megatron-core checkpoint."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from pesc_megatron.checkpoint import base as checkpoint
from pesc_megatron.checkpoint.format import CheckpointInfo, check_out
from pesc_megatron.data.tokenizer import HF_TOKENIZER_FILES
from pesc_megatron.interop.mapping import expand, read_hf_config, rules_for
from pesc_megatron.interop.reshape import to_megatron
from pesc_megatron.model.builder import build_model
from pesc_megatron.model.config import PESCConfig
from pesc_megatron.parallel.config import ParallelConfig
from pesc_megatron.parallel.distributed import initialize
from pesc_megatron.schema import ConfigError

# Copied into the checkpoint's tokenizer folder: every file of the tokenizer's identity
# (data/tokenizer.py), and the generation defaults.
TOKENIZER_FILES = HF_TOKENIZER_FILES + ("generation_config.json",)
# Tensors some checkpoints carry that the model recomputes.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


class HFWeights:
    """Reads tensors one at a time from a Hugging Face folder: safetensors or PyTorch .bin,
    sharded (with an index) or not. Files are opened lazily (safetensors memory-mapped)."""

    def __init__(self, folder: Path):
        self.folder = folder
        self._handles = {}
        for index_name, single in (("model.safetensors.index.json", "model.safetensors"),
                                   ("pytorch_model.bin.index.json", "pytorch_model.bin")):
            index = folder / index_name
            if index.is_file():
                self.file_of = json.loads(index.read_text())["weight_map"]
                break
            if (folder / single).is_file():
                self.file_of = None
                self._single = single
                break
        else:
            raise ConfigError(f"{folder}: no model.safetensors, pytorch_model.bin or their "
                              "index files")
        if self.file_of is None:
            self.file_of = {name: self._single for name in self._open(self._single).keys()}
        for name in sorted(set(self.file_of.values())):
            if not (folder / name).is_file():
                raise ConfigError(f"{folder / name}: shard listed in the index is missing")

    def _open(self, name: str):
        if name not in self._handles:
            path = self.folder / name
            try:
                if name.endswith(".safetensors"):
                    from safetensors import safe_open

                    handle = safe_open(str(path), framework="pt")
                else:
                    handle = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
            except Exception as e:
                raise ConfigError(f"{path}: cannot be read, truncated or corrupt ({e})") from None
            self._handles[name] = handle
        return self._handles[name]

    def names(self) -> set[str]:
        return set(self.file_of)

    def get(self, name: str) -> torch.Tensor:
        if name not in self.file_of:
            raise ConfigError(f"{self.folder}: tensor {name} is missing")
        fname = self.file_of[name]
        handle = self._open(fname)
        try:
            return handle.get_tensor(name) if fname.endswith(".safetensors") else handle[name]
        except Exception as e:
            raise ConfigError(f"{self.folder / fname}: cannot read {name}, truncated or corrupt "
                              f"({e})") from None


def convert(hf_dir: str | Path, out: str | Path, pesc: dict | None = None, dtype: str = "bf16",
            force: bool = False) -> Path:
    """Converts a Hugging Face folder into a PESC checkpoint at `out` (single process).

    `pesc` holds PESCConfig fields for crafting a dense model; a Camelidae checkpoint brings
    its own settings, router and adapters, and must not be given any."""
    hf_dir, out = Path(hf_dir), Path(out)
    check_out(out, force, source=hf_dir)
    config_path = hf_dir / "config.json"
    if not config_path.is_file():
        raise ConfigError(f"{hf_dir}: no config.json (not a Hugging Face model folder)")
    hf_config = json.loads(config_path.read_text())
    arch, model_cfg, pesc_cfg = read_hf_config(hf_config, str(config_path))
    if pesc_cfg is not None and pesc:
        raise ConfigError(f"{config_path}: a Camelidae checkpoint brings its own PESC settings; "
                          f"do not pass {', '.join(sorted(pesc))}")
    pesc_cfg = pesc_cfg or PESCConfig(**(pesc or {}))
    weights = HFWeights(hf_dir)  # fails early on missing shards

    initialize(ParallelConfig())
    # No random init of the base: every dense weight is overwritten below.
    model = build_model(model_cfg, pesc_cfg, ParallelConfig(), dtype, initialize=False)
    params = dict(model.named_parameters())
    crafted = arch != "CamelidaeForCausalLM"
    used = set()
    rules = rules_for(arch, model_cfg, with_pesc=not crafted)
    with torch.no_grad():
        for mname, hf_names, kind in expand(rules, model_cfg.num_hidden_layers,
                                            pesc_cfg.num_experts):
            tensors = [weights.get(n) for n in hf_names]
            used.update(hf_names)
            value = to_megatron(kind, tensors, model_cfg)
            target = params[mname]
            if value.shape != target.shape:
                shapes = ", ".join(f"{n} {list(t.shape)}" for n, t in zip(hf_names, tensors))
                raise ConfigError(f"{hf_dir}: {shapes} do not fit {mname} {list(target.shape)} "
                                  f"required by {config_path.name}")
            target.copy_(value)
    unused = sorted(n for n in weights.names() - used
                    if not n.endswith(_IGNORED_SUFFIXES)
                    and not (n == "lm_head.weight" and model_cfg.tie_word_embeddings))
    if unused:
        raise ConfigError(f"{hf_dir}: {len(unused)} tensors have no place in {arch}, e.g. "
                          f"{unused[0]}")
    tokenizer = [hf_dir / f for f in TOKENIZER_FILES if (hf_dir / f).is_file()]
    info = CheckpointInfo(model_cfg, pesc_cfg, dtype, hf_config)
    return checkpoint.save(model, out, info, tokenizer, force=force)
