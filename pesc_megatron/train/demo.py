"""The CPU demo (`pesc demo`): crafts a small random
Llama-shaped model into PESC experts, shows that it computes the dense model, then trains only
the routers and adapters on a synthetic next-token task with megatron-core's DDP, schedule and
optimizer. Run under torchrun; with 2 ranks it uses expert parallelism (EP=2)."""
from __future__ import annotations

import json
import time

import torch
from megatron.core import parallel_state as ps

from pesc_megatron.analysis.balance import load_imbalance
from pesc_megatron.model.builder import build_model
from pesc_megatron.model.config import ModelConfig, PESCConfig
from pesc_megatron.parallel.config import ParallelConfig, validate_layout
from pesc_megatron.parallel.distributed import destroy, device, initialize, say
from pesc_megatron.train.config import OptimConfig
from pesc_megatron.train.metrics import pop_expert_load, pop_router_losses
from pesc_megatron.train.optim import build_optimizer
from pesc_megatron.train.step import train_step, wrap_ddp

MODEL = ModelConfig(hidden_size=128, intermediate_size=352, num_hidden_layers=4,
                    num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
                    max_position_embeddings=256, tie_word_embeddings=True)


def synthetic_batches(steps: int, micro_batches: int, seq: int, vocab: int, seed: int):
    """Sequences of a fixed random 'grammar': each token is followed by next_of[token]
    with probability 0.9, else a random token. A bigram task the adapters can learn."""
    g = torch.Generator().manual_seed(seed)
    next_of = torch.randperm(vocab, generator=g)
    for _ in range(steps):
        step = []
        for _ in range(micro_batches):
            tokens = torch.empty(1, seq + 1, dtype=torch.long)
            tokens[0, 0] = torch.randint(vocab, (1,), generator=g)
            noise = torch.rand(seq, generator=g) < 0.1
            rand = torch.randint(vocab, (seq,), generator=g)
            for t in range(seq):
                tokens[0, t + 1] = rand[t] if noise[t] else next_of[tokens[0, t]]
            step.append(dict(tokens=tokens[:, :-1], labels=tokens[:, 1:],
                             loss_mask=torch.ones(1, seq)))
        yield step


def run(args, pesc: PESCConfig, par: ParallelConfig, world: int) -> dict:
    """The demo on this rank; `args` has steps, seq, micro_batches and lr. Returns the
    summary (first and last LM loss)."""
    validate_layout(MODEL, pesc, par, world)
    initialize(par, seed=1234)
    model = build_model(MODEL, pesc, par)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    say(f"PESC demo: world={world} tp={par.tp} pp={par.pp} ep={par.ep} | {pesc.num_experts} "
        f"experts top-{pesc.topk}, adapter {pesc.adapter_dim} | trainable {trainable:,} of "
        f"{total:,} parameters on rank 0")

    # 1. A freshly crafted model is the dense model: adapters' W_up is zero. (Direct calls
    # need the whole model on one stage, so with pipeline parallelism this check is skipped.)
    if par.pp == 1:
        probe = next(synthetic_batches(1, 1, args.seq, MODEL.vocab_size, seed=1))[0]
        model.eval()
        with torch.no_grad():
            tokens = probe["tokens"].to(device())
            pos = torch.arange(args.seq, device=device()).unsqueeze(0)
            logits = model(tokens, pos, None)
            layers = [m for m in model.modules() if hasattr(m, "adapter_scaling")]
            for layer in layers:
                layer.adapter_scaling, saved = 0.0, layer.adapter_scaling
            dense = model(tokens, pos, None)
            for layer in layers:
                layer.adapter_scaling = saved
        say(f"crafted vs dense logits: max |diff| = {(logits - dense).abs().max().item():.1e}")
    pop_expert_load(model, MODEL.num_hidden_layers)
    pop_router_losses(1)
    model.train()

    # 2. Train routers and adapters only.
    ddp = wrap_ddp(model)
    opt = build_optimizer(ddp, OptimConfig(lr=args.lr, clip_grad=0.0))
    dp_rank, dp = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
    history = []
    data = synthetic_batches(args.steps, args.micro_batches * dp, args.seq, MODEL.vocab_size, 7)
    for step, batch in enumerate(data, start=1):
        t0 = time.perf_counter()
        mine = batch[dp_rank * args.micro_batches:(dp_rank + 1) * args.micro_batches]
        loss, _ = train_step(ddp, opt, mine, args.micro_batches, args.seq, 1)
        aux = pop_router_losses(args.micro_batches).get("load_balancing_loss")
        imbalance = load_imbalance(pop_expert_load(model, MODEL.num_hidden_layers))
        # lb_loss: E * sum_i f_i P_i averaged over layers, before the coefficient; 1.0 = uniform.
        row = dict(step=step, lm_loss=round(loss, 4),
                   lb_loss=round(aux.mean().item(), 5) if aux is not None else None,
                   max_load_over_mean=round(imbalance.mean().item(), 3),
                   step_time_s=round(time.perf_counter() - t0, 3))
        history.append(row)
        if step == 1 or step % 5 == 0:
            say(" ".join(f"{k}={v}" for k, v in row.items()))
    summary = dict(first_loss=history[0]["lm_loss"], last_loss=history[-1]["lm_loss"],
                   steps=len(history), trainable_params=trainable)
    say(json.dumps(summary))
    destroy()
    return summary
