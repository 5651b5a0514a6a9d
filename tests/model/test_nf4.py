"""The NF4 frozen base (torchao NF4 tensors in megatron-core's frozen linears): the three fixes
to torchao's op table against the dequantized weight, the chunked conversion against torchao's
own, the linears at TP=1 (TP=2 + SP: test_quantized_layouts.py), memory and the errors."""
import subprocess
import sys

import pytest
import torch
from torchao.quantization import NF4Tensor

from pesc_megatron.model.nf4 import (
    dequantize,
    exact_columns,
    keep_exact_columns,
    nf4_rows,
    scaler_block_size,
    to_nf4,
)
from pesc_megatron.schema import ConfigError
from tests.helpers.quantized_check import check_nf4_linear, tiny_model


def weight(rows: int, cols: int, dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(rows * cols)
    return (torch.randn(rows, cols, generator=g)
            * torch.logspace(-2, 1, rows).unsqueeze(1)).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_products_and_lookup_use_the_dequantized_weight(dtype):
    w = weight(192, 128, dtype)
    q = to_nf4(w)
    d = q.get_original_weight()
    assert d.dtype == dtype and (d - w).abs().max() > 0  # 4 bits: not the weight itself
    assert q.t().shape == (128, 192) and torch.equal(dequantize(q.t()), d.t())
    x = torch.randn(3, 5, 128, dtype=dtype)
    g = torch.randn(3, 5, 192, dtype=dtype)
    # megatron-core's frozen linear: forward x @ w.t(), backward to the input grad @ w.
    torch.testing.assert_close(torch.matmul(x, q.t()), torch.matmul(x, d.t()), rtol=0, atol=0)
    torch.testing.assert_close(g.matmul(q), g.matmul(d), rtol=0, atol=0)
    index = torch.tensor([[0, 5, 191], [7, 7, 100]])
    assert torch.equal(torch.nn.functional.embedding(index, q), d[index])
    assert torch.equal(nf4_rows(q, index), d[index])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_exact_columns_reach_every_product(dtype):
    w = weight(192, 128, dtype)
    q = to_nf4(w)
    index = torch.tensor([3, 64, 127])
    keep_exact_columns(q, index, w[:, index])
    want = q.get_original_weight()
    want[:, index] = w[:, index]
    assert torch.equal(dequantize(q), want) and torch.equal(dequantize(q.t()), want.t())
    assert torch.equal(dequantize(q.t().t()), want)  # both transposes carry them
    for kept in (q.detach(), torch.nn.Parameter(q, requires_grad=False)):  # and detach
        assert torch.equal(dequantize(kept), want) and exact_columns(kept)[0] is index
    x = torch.randn(3, 5, 128, dtype=dtype)
    g = torch.randn(3, 5, 192, dtype=dtype)
    torch.testing.assert_close(torch.matmul(x, q.t()), torch.matmul(x, want.t()), rtol=0, atol=0)
    torch.testing.assert_close(g.matmul(q), g.matmul(want), rtol=0, atol=0)
    rows = torch.tensor([[0, 5, 191], [7, 7, 100]])
    assert torch.equal(nf4_rows(q, rows), want[rows])


def test_the_loader_reads_each_linears_exact_columns_from_the_base(tmp_path, single_rank):
    """`precision.linear_outliers` at TP=1 (TP=2, PP=2: test_quantized_layouts.py; which
    columns: test_frozen_linear_is_the_dequantized_product)."""
    from tests.helpers import tiny
    from tests.helpers.quantized_check import check_loaded_exact_columns

    check_loaded_exact_columns(str(tiny.make_checkpoint(tmp_path)))


@pytest.mark.parametrize("shape", [(1024, 576), (960, 576), (4096, 512), (2, 64)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_conversion_is_torchaos(shape, dtype):
    """Each part of the tensor equals torchao's `from_tensor` on the whole weight."""
    w = weight(*shape, dtype)
    ours, theirs = to_nf4(w), NF4Tensor.from_tensor(w, 64, scaler_block_size(w.numel()))
    assert (ours.block_size, ours.n_blocks, ours.scaler_block_size) == (
        theirs.block_size, theirs.n_blocks, theirs.scaler_block_size)
    for name in theirs.__tensor_flatten__()[0]:
        assert torch.equal(getattr(ours, name), getattr(theirs, name)), name


def test_double_quantization_groups():
    # 256 absmaxes per scale where they divide the tensor (QLoRA), else the largest power of 2.
    assert scaler_block_size(4096 * 4096) == 256
    assert scaler_block_size(576 * 576) == 64  # SmolLM2's attention projection: 5184 blocks
    assert scaler_block_size(64) == 1


def test_a_shard_the_block_size_does_not_divide():
    with pytest.raises(ConfigError, match=r"precision.frozen_weights=nf4: decoder.layers.0.x."
                                          r"weight has a shard of shape \[3, 20\] on this rank, "
                                          r"60 values, which the NF4 block size 64 does not "
                                          r"divide") as e:
        to_nf4(torch.randn(3, 20), "decoder.layers.0.x.weight")
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("keep", [0, 3])
@pytest.mark.parametrize("kind", ["column", "row"])
def test_frozen_linear_is_the_dequantized_product(single_rank, kind, keep):
    ratios = check_nf4_linear(kind, keep)
    assert max(ratios.values()) <= 1.0, ratios


@pytest.mark.parametrize("output_layer", [False, True])
def test_frozen_weights_take_at_most_30_percent_of_bf16(single_rank, output_layer):
    from pesc_megatron.model.quantized import (
        QUANTIZED_MODULES,
        convert_frozen_weights,
        frozen_weight_bytes,
    )

    model = tiny_model(hidden=128).to(torch.bfloat16)
    trainable = {n: p.clone() for n, p in model.named_parameters() if p.requires_grad}
    convert_frozen_weights(model, "nf4", output_layer=output_layer)
    names = [name for name, module in model.named_modules()
             if isinstance(module, QUANTIZED_MODULES) and isinstance(module.weight, NF4Tensor)]
    assert len(names) == 8 + output_layer  # 4 linears x 2 layers (+ the tied embedding)
    after = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert after.keys() == trainable.keys()
    assert all(torch.equal(after[n], p) and not isinstance(after[n], NF4Tensor)
               for n, p in trainable.items())
    nf4 = [p for p in model.parameters() if isinstance(p, NF4Tensor)]
    # data: 4 bits; one int8 absmax per 64 values; a bf16 scale per group, the mean, 16 levels
    want = sum(p.numel() // 2 + p.numel() // 64 + 2 * (p.numel() // 64 // p.scaler_block_size)
               + 2 + 2 * 16 for p in nf4)
    stats = frozen_weight_bytes(model)
    rest = stats["parameters"] - sum(p.numel() for p in nf4)  # norms (, embedding): bf16
    assert stats["bytes"] == want + 2 * rest
    if output_layer:  # (no calibration pass here: no high-precision columns)
        assert stats["bytes"] <= 0.30 * stats["bf16_bytes"]


@pytest.mark.multiprocess
def test_eval_of_a_base_nf4_cannot_store_exits_2(tmp_path, single_rank):
    """FFN size 65: the down projection's 32 x 65 values are not whole NF4 blocks."""
    from tests.helpers import tiny

    ckpt = tiny.make_checkpoint(tmp_path, layers=1, intermediate=65)
    valid = tiny.write_jsonl(tmp_path / "valid.jsonl", tiny.records(4, 2))
    run = subprocess.run([sys.executable, "-m", "pesc_megatron.cli", "eval", "--ckpt", str(ckpt),
                          "--data", str(valid), "--seq-length", "32", "--frozen-weights", "nf4"],
                         capture_output=True, text=True, timeout=600, env=tiny.ENV)
    assert run.returncode == 2, run.stderr[-2000:]
    err = run.stderr.strip().splitlines()
    assert err[-1].startswith("pesc eval: error: precision.frozen_weights=nf4: decoder.layers.0."
                              "mlp.shared_experts.linear_fc2.weight has a shard of shape [32, 65]")
