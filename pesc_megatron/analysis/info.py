"""The settings (model, PESC, LoRA) of any model source the analysis commands accept."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from pesc_megatron.checkpoint.format import read_info
from pesc_megatron.interop.mapping import read_hf_config
from pesc_megatron.model.config import LoRAConfig, PESCConfig
from pesc_megatron.model.size import PRESETS
from pesc_megatron.schema import ConfigError
from pesc_megatron.train.config import load_job


def read_source(source: str):
    """(model, pesc, lora) of any SOURCE the command accepts."""
    if source in PRESETS:
        return PRESETS[source], PESCConfig(), LoRAConfig()
    path = Path(source)
    if not path.exists():
        raise ConfigError(f"{source}: neither a preset ({', '.join(PRESETS)}) nor a file or "
                          "folder")
    if path.suffix in (".yaml", ".yml"):
        job = load_job(source)
        info = read_info(job.model.checkpoint)
        return info.model, dataclasses.replace(info.pesc, **job.pesc), job.lora
    if path.is_dir() and not (path / "config.json").is_file():
        info = read_info(path)  # a PESC checkpoint or run folder
        return info.model, info.pesc, info.lora
    hf_config = path / "config.json" if path.is_dir() else path
    try:
        cfg = json.loads(hf_config.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"{hf_config}: not a readable Hugging Face config.json ({e})") from None
    _, model, pesc = read_hf_config(cfg, str(hf_config))
    return model, pesc or PESCConfig(), LoRAConfig()
