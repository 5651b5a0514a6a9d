"""GPU check for one H200 (run by tests/gpu/run_h200.sh): PESC forward/backward parity CUDA vs
CPU on a tiny model, then tokens/s and model FLOP utilisation (MFU) of a Yi-34B-shaped PESC
layer stack in bf16 and with the FP8 frozen base. Prints a Markdown table; the last line is
JSON. `--dry-run`: the same code on CPU with tiny shapes, to check the script without a GPU.

FLOPs counted per token and layer (forward): attention projections 2*H*(2*H + 2*kv*d), core
attention 4*s*H (full score matrix, as Megatron-LM counts), shared FFN 6*H*F, router 2*H*E,
adapters 4*H*r*k. A training step runs the frozen projections and FFN forward + input
gradient (2x), core attention, router and adapters forward + backward (3x).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

YI34B = dict(hidden=7168, ffn=20480, heads=56, kv_heads=8, experts=8, topk=2, adapter=512)
TINY = dict(hidden=64, ffn=128, heads=4, kv_heads=2, experts=4, topk=2, adapter=16)
# NVIDIA H200 SXM, dense tensor-core peaks (datasheet: 1,979 / 3,958 TFLOPS with sparsity).
PEAK = {"bf16": 989e12, "fp8": 1979e12}


def build(shape: dict, layers: int, dtype: str):
    from pesc_megatron.config import ModelConfig, ParallelConfig, PESCConfig
    from pesc_megatron.model.builder import build_model

    return build_model(
        ModelConfig(hidden_size=shape["hidden"], intermediate_size=shape["ffn"],
                    num_hidden_layers=layers, num_attention_heads=shape["heads"],
                    num_key_value_heads=shape["kv_heads"], vocab_size=256,
                    max_position_embeddings=8192),
        PESCConfig(num_experts=shape["experts"], topk=shape["topk"],
                   adapter_dim=shape["adapter"], adapter_dropout=0.0),
        ParallelConfig(), dtype=dtype)


def batch(seq: int, mbs: int, device):
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 256, (mbs, seq + 1), generator=g)
    mask = torch.ones(mbs, 1, seq, seq, dtype=torch.bool).triu(1)
    return [t.to(device) for t in (tokens[:, :-1], torch.arange(seq).expand(mbs, seq), mask,
                                   tokens[:, 1:])]


def step(model, data) -> torch.Tensor:
    tokens, positions, mask, labels = data
    model.zero_grad(set_to_none=True)
    loss = model(tokens, positions, mask, labels=labels).float().mean()
    loss.backward()
    return loss


def cpu_reference(path: str) -> None:
    """In a child without CUDA: the tiny model's weights, loss and trainable gradients."""
    from pesc_megatron.config import ParallelConfig
    from pesc_megatron.runtime.distributed import destroy, initialize

    initialize(ParallelConfig(), seed=3)
    model = build(TINY, 2, "fp32")
    with torch.no_grad():  # non-zero adapters: every trainable tensor gets a gradient
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.2)
    loss = step(model, batch(32, 2, "cpu"))
    torch.save(dict(state=model.state_dict(), loss=loss.item(),
                    grads={n: p.grad for n, p in model.named_parameters() if p.requires_grad}),
               path)
    destroy()


def parity(workdir: str) -> dict:
    """The CPU child's weights on this device: loss and gradients within fp32 rounding."""
    path = os.path.join(workdir, "cpu_reference.pt")
    subprocess.run([sys.executable, __file__, "--cpu-reference", path], check=True,
                   env=dict(os.environ, CUDA_VISIBLE_DEVICES=""))
    ref = torch.load(path, weights_only=False)  # megatron-core's _extra_state entries
    model = build(TINY, 2, "fp32")
    model.load_state_dict(ref["state"])
    loss = step(model, batch(32, 2, next(model.parameters()).device)).item()
    worst = 0.0
    for name, p in model.named_parameters():
        if p.requires_grad:
            want = ref["grads"][name]
            err = (p.grad.cpu() - want).abs().max() / want.abs().max()
            worst = max(worst, err.item())
    ok = abs(loss - ref["loss"]) <= 1e-5 * abs(ref["loss"]) and worst <= 1e-4
    return dict(ok=ok, loss=loss, cpu_loss=ref["loss"], max_grad_rel_err=worst)


def step_flops(shape: dict, layers: int, seq: int) -> float:
    h, f, d = shape["hidden"], shape["ffn"], shape["hidden"] // shape["heads"]
    projections = 2 * h * (2 * h + 2 * shape["kv_heads"] * d) + 6 * h * f
    core = 4 * seq * h
    trainable = 2 * h * shape["experts"] + 4 * h * shape["adapter"] * shape["topk"]
    return layers * (2 * projections + 3 * core + 3 * trainable)  # per token


def throughput(shape, layers, seq, mbs, frozen, steps, device) -> dict:
    from pesc_megatron.model.fp8 import convert_frozen_weights

    model = build(shape, layers, "bf16")
    matmul = convert_frozen_weights(model) if frozen == "fp8" else None
    data = batch(seq, mbs, device)
    times = []
    for i in range(steps + 2):  # two warm-up steps
        sync(device)
        t0 = time.perf_counter()
        loss = step(model, data)
        sync(device)
        if i >= 2:
            times.append(time.perf_counter() - t0)
    assert torch.isfinite(loss), loss
    seconds = statistics.median(times)
    tokens_per_s = seq * mbs / seconds
    achieved = step_flops(shape, layers, seq) * tokens_per_s
    del model, data
    peak = release(device)
    return dict(frozen=frozen, matmul=matmul, layers=layers, seq=seq, micro_batch=mbs,
                step_s=round(seconds, 4), tokens_per_s=round(tokens_per_s, 1),
                tflops=round(achieved / 1e12, 1), mfu_bf16_peak=round(achieved / PEAK["bf16"], 4),
                peak_bytes=peak)


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def release(device) -> int:
    """The peak bytes allocated since the last call; frees the cache for the next run."""
    if device.type != "cuda":
        return 0
    peak = torch.cuda.max_memory_allocated()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    return peak


def layers_that_fit(shape, seq, mbs, device) -> int:
    """Layers of the bf16 stack that fit in 85% of the GPU, scaled from a two-layer step
    (whose fixed overheads, counted per layer, keep the estimate on the safe side)."""
    if device.type != "cuda":
        return 2
    two = throughput(shape, 2, seq, mbs, "bf16", 1, device)
    total = torch.cuda.get_device_properties(device).total_memory
    return max(2, int(0.85 * total / (two["peak_bytes"] / 2)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu-reference", help=argparse.SUPPRESS)
    ap.add_argument("--dry-run", action="store_true", help="tiny shapes on CPU")
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--micro-batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--layers", type=int, help="default: as many as fit (bf16)")
    ap.add_argument("--workdir", default="/tmp/pesc_h200")
    args = ap.parse_args()
    if args.cpu_reference:
        return cpu_reference(args.cpu_reference)
    if not args.dry_run and not torch.cuda.is_available():
        sys.exit("no CUDA device (use --dry-run to check the script on CPU)")

    from pesc_megatron.config import ParallelConfig
    from pesc_megatron.runtime.distributed import destroy, device, initialize

    os.makedirs(args.workdir, exist_ok=True)
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 parity, not TF32's 10-bit mantissa
    initialize(ParallelConfig(), seed=3)
    dev = device()
    result = dict(device=torch.cuda.get_device_name() if dev.type == "cuda" else "cpu",
                  torch=torch.__version__, parity=parity(args.workdir))
    print(f"parity CUDA vs CPU: {result['parity']}", flush=True)
    torch.backends.cuda.matmul.allow_tf32 = True
    shape, seq = (TINY, 32) if args.dry_run else (YI34B, args.seq)
    layers = args.layers or layers_that_fit(shape, seq, args.micro_batch, dev)
    result["runs"] = [throughput(shape, layers, seq, args.micro_batch, frozen, args.steps, dev)
                      for frozen in ("bf16", "fp8")]
    destroy()
    print("| frozen base | products | layers | tokens/s | TFLOP/s | MFU (bf16 peak) | "
          "peak GiB |\n|---|---|---|---|---|---|---|")
    for r in result["runs"]:
        print(f"| {r['frozen']} | {r['matmul'] or 'bf16'} | {r['layers']} | "
              f"{r['tokens_per_s']} | {r['tflops']} | {r['mfu_bf16_peak']:.1%} | "
              f"{r['peak_bytes'] / 2**30:.1f} |")
    print(json.dumps(result))
    if not result["parity"]["ok"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
