"""GPU check for one H200 (run by tests/gpu/run_h200.sh): PESC forward/backward parity CUDA vs
CPU on a tiny model (packed sequences, GQA, the fused attention, grouped experts and LoRA on
all seven projections), LoRA's dropout masks and its A products over them, the
fused attention's varlen kernel against its per-sample SDPA path (bf16, error and time), the
grouped-GEMM experts against megatron-core's loop (bf16, error and time), then tokens/s and
model FLOP utilisation (MFU) of a Yi-34B-shaped PESC layer stack in bf16 and with the FP8 and
NF4 frozen bases. Prints a Markdown table; the last line is JSON. `--dry-run`: the same code on CPU
with tiny shapes, to check the script without a GPU.

FLOPs counted per token and layer (forward): attention projections 2*H*(2*H + 2*kv*d), core
attention 4*s*H (full score matrix, as Megatron-LM counts, although the packed samples need
less), shared FFN 6*H*F, router 2*H*E,
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


def build(shape: dict, layers: int, dtype: str, lora: bool = False):
    from pesc_megatron.model.builder import build_model
    from pesc_megatron.model.config import LORA_TARGETS, LoRAConfig, ModelConfig, PESCConfig
    from pesc_megatron.parallel.config import ParallelConfig

    return build_model(
        ModelConfig(hidden_size=shape["hidden"], intermediate_size=shape["ffn"],
                    num_hidden_layers=layers, num_attention_heads=shape["heads"],
                    num_key_value_heads=shape["kv_heads"], vocab_size=256,
                    max_position_embeddings=8192),
        PESCConfig(num_experts=shape["experts"], topk=shape["topk"],
                   adapter_dim=shape["adapter"], adapter_dropout=0.0),
        ParallelConfig(), dtype=dtype,
        lora=LoRAConfig(list(LORA_TARGETS), rank=8, dropout=0.0) if lora else None)


def batch(seq: int, mbs: int, device) -> dict:
    """A packed micro-batch: each sequence holds samples of seq/2, seq/4 and seq/4 positions
    (the data pipeline's collated layout: sample boundaries, no mask)."""
    from pesc_megatron.data import collate
    from pesc_megatron.train.step import model_inputs

    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 256, (mbs, seq + 1), generator=g)
    bounds = torch.tensor([0, seq // 2, 3 * seq // 4, seq], dtype=torch.int32)
    items = [dict(tokens=tokens[i, :-1], labels=tokens[i, 1:], loss_mask=torch.ones(seq),
                  position_ids=torch.cat([torch.arange(n) for n in bounds.diff().tolist()]),
                  cu_seqlens=bounds) for i in range(mbs)]
    return {k: v.to(device) if torch.is_tensor(v) else v
            for k, v in model_inputs(collate(items)).items()}


def step(model, data) -> torch.Tensor:
    model.zero_grad(set_to_none=True)
    loss = model(data["tokens"], data["position_ids"], data["attention_mask"],
                 labels=data["labels"], packed_seq_params=data["packed_seq_params"])
    loss = loss.float().mean()
    loss.backward()
    return loss


def cpu_reference(path: str) -> None:
    """In a child without CUDA: the tiny model's weights, loss and trainable gradients."""
    from pesc_megatron.parallel.config import ParallelConfig
    from pesc_megatron.parallel.distributed import destroy, initialize

    initialize(ParallelConfig(), seed=3)
    model = build(TINY, 2, "fp32", lora=True)
    with torch.no_grad():  # non-zero adapters and LoRA: every trainable tensor gets a gradient
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
    model = build(TINY, 2, "fp32", lora=True)
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


def _config(shape: dict, dtype: str):
    """The one-layer TransformerConfig of `shape` (dropout off)."""
    from pesc_megatron.model.builder import transformer_config
    from pesc_megatron.model.config import ModelConfig, PESCConfig
    from pesc_megatron.parallel.config import ParallelConfig

    return transformer_config(
        ModelConfig(hidden_size=shape["hidden"], intermediate_size=shape["ffn"],
                    num_hidden_layers=1, num_attention_heads=shape["heads"],
                    num_key_value_heads=shape["kv_heads"]),
        PESCConfig(num_experts=shape["experts"], topk=shape["topk"],
                   adapter_dim=shape["adapter"], adapter_dropout=0.0),
        ParallelConfig(), dtype)


def _timed(fn, device, repeats: int = 5) -> float:
    fn()
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def attention_check(shape: dict, seq: int, device) -> dict:
    """SDPAttention on packed bf16 samples (seq/2, seq/4, seq/4; GQA): torch's varlen kernel
    (CUDA) against the per-sample SDPA calls, output and input gradients, and the time of a
    forward + backward of each."""
    from megatron.core.packed_seq_params import PackedSeqParams
    from megatron.core.transformer.enums import AttnMaskType

    from pesc_megatron.model import attention

    heads, kv, d = shape["heads"], shape["kv_heads"], shape["hidden"] // shape["heads"]
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(seq, n, d, generator=g).to(device, torch.bfloat16).requires_grad_()
               for n in (heads, kv, kv))
    cu = torch.tensor([0, seq // 2, 3 * seq // 4, seq], dtype=torch.int32, device=device)
    packed = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                             max_seqlen_q=seq // 2, max_seqlen_kv=seq // 2)
    module = attention.SDPAttention(_config(shape, "bf16"), 1, AttnMaskType.causal, "self")
    grad = torch.randn(seq, heads * d, generator=g).to(device, torch.bfloat16)

    def run(varlen: bool):
        saved, attention.varlen_attn = attention.varlen_attn, (
            attention.varlen_attn if varlen else None)
        try:
            for x in (q, k, v):
                x.grad = None
            out = module(q, k, v, None, packed_seq_params=packed)
            out.backward(grad)
            return out.detach().float(), q.grad.float()
        finally:
            attention.varlen_attn = saved

    loop_out, loop_grad = run(False)
    result = dict(seq=seq, heads=heads, kv_heads=kv, head_dim=d,
                  loop_s=round(_timed(lambda: run(False), device), 5))
    if attention.varlen_attn is not None and device.type == "cuda":
        out, grad_q = run(True)
        result.update(
            varlen_s=round(_timed(lambda: run(True), device), 5),
            out_rel_err=((out - loop_out).abs().max() / loop_out.abs().max()).item(),
            grad_rel_err=((grad_q - loop_grad).abs().max() / loop_grad.abs().max()).item())
        result["ok"] = result["out_rel_err"] < 2e-2 and result["grad_rel_err"] < 2e-2
    return result


def experts_check(shape: dict, tokens: int, device) -> dict:
    """One PESC MoE layer (bf16, train mode, dropout off): the grouped-GEMM experts against
    megatron-core's SequentialMLP loop, output and input gradient, and forward + backward
    time of each."""
    from megatron.core.transformer.spec_utils import build_module

    from pesc_megatron.model.pesc_layer import grouped_mm_runs
    from pesc_megatron.model.spec import pesc_mlp_spec

    cfg = _config(shape, "bf16" if device.type == "cuda" else "fp32")
    layer = build_module(pesc_mlp_spec(), config=cfg, layer_number=1).to(device).train()
    with torch.no_grad():
        for expert in layer.experts.local_experts:
            expert.linear_fc2.weight.normal_(0.0, 0.02)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(tokens, 1, shape["hidden"], generator=g).to(device, cfg.params_dtype)
    x.requires_grad_()
    grad = torch.randn(x.shape, generator=g).to(device, cfg.params_dtype)

    def run(grouped: bool):
        layer.experts.grouped = grouped
        x.grad = None
        out = layer(x)[0]
        out.backward(grad)
        return out.detach().float(), x.grad.float()

    seq_out, seq_grad = run(False)
    out, grad_x = run(True)
    result = dict(tokens=tokens, grouped_kernel=grouped_mm_runs(x),
                  out_rel_err=((out - seq_out).abs().max() / seq_out.abs().max()).item(),
                  grad_rel_err=((grad_x - seq_grad).abs().max() / seq_grad.abs().max()).item(),
                  sequential_s=round(_timed(lambda: run(False), device), 5),
                  grouped_s=round(_timed(lambda: run(True), device), 5))
    result["ok"] = result["out_rel_err"] < 2e-2 and result["grad_rel_err"] < 2e-2
    return result


def lora_dropout_check(device) -> dict:
    """LoRA's dropout on this device: the masks' keep rate, and its A products over the masks
    (one autograd function) against autograd through x * mask and the product, fp32."""
    from pesc_megatron.model.lora import _DroppedA
    from pesc_megatron.model.pesc_layer import dropout_mask

    g = torch.Generator().manual_seed(4)
    x = torch.randn(2048, 1, 512, generator=g).to(device).requires_grad_()
    weights = [torch.randn(64, 512, generator=g).to(device).requires_grad_() for _ in range(3)]
    drawn = [dropout_mask(x, 0.1) for _ in weights]
    masks = [m for m, _ in drawn]
    grad = torch.randn(2048, 1, 192, generator=g).to(device)
    got = torch.autograd.grad(_DroppedA.apply(x, masks, *weights), [x, *weights], grad)
    want = torch.autograd.grad(torch.cat([(x * m) @ w.t() for m, w in zip(masks, weights)], -1),
                               [x, *weights], grad)
    err = max(((a - b).abs().max() / b.abs().max()).item() for a, b in zip(got, want))
    keep = torch.stack(masks).float().mean().item()
    return dict(ok=err < 1e-4 and abs(keep - 0.9) < 0.005, keep_rate=keep,
                factor=drawn[0][1], max_grad_rel_err=err)


def step_flops(shape: dict, layers: int, seq: int) -> float:
    h, f, d = shape["hidden"], shape["ffn"], shape["hidden"] // shape["heads"]
    projections = 2 * h * (2 * h + 2 * shape["kv_heads"] * d) + 6 * h * f
    core = 4 * seq * h
    trainable = 2 * h * shape["experts"] + 4 * h * shape["adapter"] * shape["topk"]
    return layers * (2 * projections + 3 * core + 3 * trainable)  # per token


def throughput(shape, layers, seq, mbs, frozen, steps, device) -> dict:
    from pesc_megatron.model.quantized import convert_frozen_weights

    model = build(shape, layers, "bf16")
    matmul = convert_frozen_weights(model, frozen) if frozen in ("fp8", "nf4") else None
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

    from pesc_megatron.parallel.config import ParallelConfig
    from pesc_megatron.parallel.distributed import destroy, device, initialize

    os.makedirs(args.workdir, exist_ok=True)
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 parity, not TF32's 10-bit mantissa
    initialize(ParallelConfig(), seed=3)
    dev = device()
    result = dict(device=torch.cuda.get_device_name() if dev.type == "cuda" else "cpu",
                  torch=torch.__version__, parity=parity(args.workdir))
    print(f"parity CUDA vs CPU: {result['parity']}", flush=True)
    result["lora_dropout"] = lora_dropout_check(dev)  # fp32 too: before TF32 is allowed
    print(f"LoRA dropout, masks and A products: {result['lora_dropout']}", flush=True)
    torch.backends.cuda.matmul.allow_tf32 = True
    shape, seq = (TINY, 32) if args.dry_run else (YI34B, args.seq)
    result["attention"] = attention_check(shape, 4 * seq, dev)
    print(f"fused attention, varlen vs per-sample SDPA: {result['attention']}", flush=True)
    result["experts"] = experts_check(shape, seq, dev)
    print(f"adapter experts, grouped vs sequential: {result['experts']}", flush=True)
    layers = args.layers or layers_that_fit(shape, seq, args.micro_batch, dev)
    result["runs"] = [throughput(shape, layers, seq, args.micro_batch, frozen, args.steps, dev)
                      for frozen in ("bf16", "fp8", "nf4")]
    destroy()
    print("| frozen base | products | layers | tokens/s | TFLOP/s | MFU (bf16 peak) | "
          "peak GiB |\n|---|---|---|---|---|---|---|")
    for r in result["runs"]:
        print(f"| {r['frozen']} | {r['matmul'] or 'bf16'} | {r['layers']} | "
              f"{r['tokens_per_s']} | {r['tflops']} | {r['mfu_bf16_peak']:.1%} | "
              f"{r['peak_bytes'] / 2**30:.1f} |")
    print(json.dumps(result))
    if not result["parity"]["ok"] or not all(result[k].get("ok", True)
                                             for k in ("attention", "experts",
                                                       "lora_dropout")):
        sys.exit(1)


if __name__ == "__main__":
    main()
