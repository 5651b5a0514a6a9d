"""Rank code for the conversion tests: load a PESC checkpoint at a layout and compute logits."""
from __future__ import annotations

import zlib

import torch
import torch.distributed as dist


def logits_worker(ckpt: str, layout: dict, tokens_path: str, out_path: str,
                  randomize_adapters: bool = False, save_to: str | None = None) -> None:
    """Rank 0 saves the full-vocabulary logits of the checkpoint's model for `tokens`.
    Optionally first gives routers/adapters random values (the same at every layout: each
    global tensor is drawn from a generator seeded by its global name) and saves the result."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    from pesc_megatron.checkpoint import base as checkpoint
    from pesc_megatron.parallel.config import ParallelConfig
    from pesc_megatron.parallel.distributed import destroy, initialize

    par = ParallelConfig(**layout)
    initialize(par, seed=3)
    model, info = checkpoint.load(ckpt, par, dtype="fp32")
    if randomize_adapters:
        n_local = info.pesc.num_experts // par.ep
        with torch.no_grad():
            for name, p in model.named_parameters():
                if not p.requires_grad:
                    continue
                if "local_experts" in name:
                    parts = name.split(".")
                    i = parts.index("local_experts") + 1
                    parts[i] = str(int(parts[i]) + ps.get_expert_model_parallel_rank() * n_local)
                    name = ".".join(parts)
                g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        if save_to:
            checkpoint.save(model, save_to, info)
    tokens = torch.load(tokens_path)
    model.eval()
    with torch.no_grad():
        pos = torch.arange(tokens.shape[1]).expand_as(tokens)
        logits = model(tokens, pos, None)  # [b, s, vocab / tp]
        logits = gather_from_tensor_model_parallel_region(logits.contiguous())
    if dist.get_rank() == 0:
        torch.save(logits, out_path)
    destroy()
