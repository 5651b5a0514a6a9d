"""The FP8 frozen base (torchao float8 weights in megatron-core's frozen linears): accuracy
within e4m3's rounding, gradients, memory, LoRA, and the precision settings' errors."""
import pytest
import torch

from pesc_megatron.model.precision import PrecisionConfig, check_fp8_machine, validate_precision
from pesc_megatron.schema import ConfigError
from tests.helpers.quantized_check import check_frozen_linear, tiny_model


@pytest.mark.parametrize("matmul", ["dequantize", "scaled_mm"])
@pytest.mark.parametrize("kind", ["column", "row"])
def test_frozen_linear_within_e4m3_rounding(single_rank, kind, matmul):
    ratios = check_frozen_linear(kind, matmul)
    # The bound is a worst case; the errors must still be of its order (FP8, not fp32).
    assert max(ratios.values()) > 0.05, ratios


@pytest.mark.parametrize("output_layer", [False, True])
def test_frozen_weights_take_at_most_55_percent_of_bf16(single_rank, output_layer):
    from torchao.quantization import Float8Tensor

    from pesc_megatron.model.quantized import (
        QUANTIZED_MODULES,
        convert_frozen_weights,
        frozen_weight_bytes,
    )

    model = tiny_model(hidden=128)  # tied embedding and output layer
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert frozen_weight_bytes(model)["bytes"] == 4 * frozen_weight_bytes(model)["parameters"]
    convert_frozen_weights(model, "fp8", "dequantize", output_layer=output_layer)
    names = [name for name, module in model.named_modules()
             if isinstance(module, QUANTIZED_MODULES) and isinstance(module.weight, Float8Tensor)]
    # qkv, proj, fc1, fc2 of both layers; the embedding, tied to the output layer, on request.
    assert len(names) == 8 + output_layer
    embedding = model.embedding.word_embeddings.weight
    assert isinstance(embedding, Float8Tensor) == output_layer
    # Trainable tensors and the norms are untouched.
    assert {n: p for n, p in model.named_parameters() if p.requires_grad} == trainable
    assert all(p.dtype == torch.float32 and not isinstance(p, Float8Tensor)
               for n, p in model.named_parameters() if "norm" in n)
    fp8 = [p for p in model.parameters() if isinstance(p, Float8Tensor)]
    fp8_bytes = sum(p.qdata.untyped_storage().nbytes() + p.scale.untyped_storage().nbytes()
                    for p in fp8)
    assert fp8_bytes <= 0.55 * 2 * sum(p.numel() for p in fp8)
    stats = frozen_weight_bytes(model)  # the norms (and the kept embedding) stay fp32
    if output_layer:
        assert stats["bytes"] <= 0.55 * stats["bf16_bytes"]
    else:
        assert stats["bytes"] == fp8_bytes + 4 * (stats["parameters"] - sum(
            p.numel() for p in fp8))


@pytest.mark.parametrize("frozen,matmul", [("fp8", "dequantize"), ("fp8", "scaled_mm"),
                                           ("nf4", "dequantize")])
def test_trainable_gradients_flow_with_lora(single_rank, frozen, matmul):
    """LoRA and the adapters keep training on an FP8 or NF4 base. With `dequantize` the model
    is exactly the model whose frozen weights are the rounded ones (same loss and gradients up
    to fp32 summation order); `scaled_mm` also rounds activations, so only the direction of
    each gradient is compared (to the fp32 model's)."""
    from pesc_megatron.checkpoint.sharded import trainable_sharded_state_dict
    from pesc_megatron.model.quantized import convert_frozen_weights, dense, is_quantized

    model, reference = tiny_model(hidden=64, lora=True), tiny_model(hidden=64, lora=True)
    reference.load_state_dict(model.state_dict())
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 256, (4, 32), generator=g)  # 128 tokens: every expert used
    positions = torch.arange(32).expand(4, 32)
    mask = torch.ones(4, 1, 32, 32, dtype=torch.bool).triu(1)

    def loss_and_grads(m):
        m.zero_grad()
        loss = m(tokens, positions, mask, labels=tokens.roll(-1, 1)).mean()
        loss.backward()
        return loss.item(), {n: p.grad.clone() for n, p in m.named_parameters()
                             if p.requires_grad}

    convert_frozen_weights(model, frozen, matmul)
    assert all(not is_quantized(p) and p.dtype == torch.float32
               for n, p in model.named_parameters() if ".lora." in n)
    loss8, grads8 = loss_and_grads(model)
    if matmul == "scaled_mm":
        loss, grads = loss_and_grads(reference)
    else:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if is_quantized(p):
                    reference.get_parameter(name).copy_(dense(p))
        loss, grads = loss_and_grads(reference)
    assert grads8.keys() == grads.keys() and any(".lora." in n for n in grads)
    assert abs(loss8 - loss) <= (0.01 if matmul == "scaled_mm" else 1e-6) * loss
    for name, grad in grads8.items():
        assert torch.isfinite(grad).all() and grad.abs().max() > 0, name
        if matmul == "scaled_mm":
            cosine = torch.nn.functional.cosine_similarity(grad.flatten(),
                                                           grads[name].flatten(), 0)
            assert cosine > 0.9, (name, cosine.item())
        else:
            torch.testing.assert_close(grad, grads[name], rtol=1e-4,
                                       atol=1e-5 * grads[name].abs().max().item(), msg=name)
    # A training checkpoint still takes the trainable tensors, all of them plain.
    saved = trainable_sharded_state_dict(model)
    assert len(saved) == len(grads)
    assert all(type(t.data) in (torch.Tensor, torch.nn.Parameter) for t in saved.values())


@pytest.mark.parametrize("settings,dtype,message", [
    (dict(frozen_weights="fp16"), "fp32", r"precision.frozen_weights='fp16': must be one of "
                                          r"fp32, bf16, fp8, nf4"),
    (dict(frozen_weights="bf16"), "fp32", r"frozen_weights='bf16': the base computes in the "
                                          r"model dtype fp32; use fp32, fp8 or nf4"),
    (dict(frozen_weights="fp8", fp8_matmul="fast"), "fp32", r"precision.fp8_matmul='fast'"),
    (dict(fp8="hybrid"), "bf16", r"precision.fp8='hybrid': must be one of delayed, "
                                 r"tensorwise, blockwise"),
    (dict(fp8="delayed", frozen_weights="fp8"), "bf16", r"precision.fp8='delayed': .*exclude"),
    (dict(fp8="tensorwise", frozen_weights="nf4"), "bf16",
     r"precision.fp8='tensorwise': Transformer Engine FP8 and precision.frozen_weights=nf4 "
     r"exclude each other"),
    (dict(fp8="delayed", fp8_margin=-1), "bf16", r"precision.fp8_margin=-1: must be >= 0"),
    (dict(fp8="delayed", fp8_amax_history_len=0), "bf16", r"fp8_amax_history_len=0"),
    (dict(frozen_weights="fp8", output_outliers=-1), "bf16",
     r"precision.output_outliers=-1: must be >= 0"),
    (dict(frozen_weights="nf4", linear_outliers=-2), "bf16",
     r"precision.linear_outliers=-2: must be >= 0"),
])
def test_precision_errors(settings, dtype, message):
    with pytest.raises(ConfigError, match=message) as e:
        validate_precision(PrecisionConfig(**settings), dtype)
    assert "\n" not in str(e.value)
    validate_precision(PrecisionConfig(frozen_weights=dtype), dtype)  # the model dtype is fine


def test_te_fp8_without_te_names_the_alternative():
    try:
        import transformer_engine.pytorch  # noqa: F401
        pytest.skip("Transformer Engine is installed")
    except ImportError:
        pass
    with pytest.raises(ConfigError, match=r"precision.fp8=delayed: Transformer Engine does not "
                                          r"import .*use precision.frozen_weights=fp8") as e:
        check_fp8_machine(PrecisionConfig(fp8="delayed"))
    assert "\n" not in str(e.value)
    check_fp8_machine(PrecisionConfig(frozen_weights="fp8", fp8_matmul="scaled_mm"))  # CPU: ok


def test_fp8_on_a_gpu_without_fp8(monkeypatch):
    """An A100 (compute capability 8.0) has no FP8 arithmetic: asking for FP8 products says so."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA A100-SXM4-80GB")
    with pytest.raises(ConfigError, match=r"precision.fp8_matmul=scaled_mm: NVIDIA A100-SXM4-80GB "
                                          r"\(compute capability 8.0\) has no FP8 arithmetic"):
        check_fp8_machine(PrecisionConfig(frozen_weights="fp8", fp8_matmul="scaled_mm"))
    check_fp8_machine(PrecisionConfig(frozen_weights="fp8", fp8_matmul="dequantize"))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    check_fp8_machine(PrecisionConfig(frozen_weights="fp8", fp8_matmul="scaled_mm"))


def test_cli_precision_errors_exit_2(capsys, tmp_path):
    from pesc_megatron.cli import main

    with pytest.raises(SystemExit) as e:
        main(["eval", "--ckpt", str(tmp_path), "--data", "x.jsonl", "--frozen-weights", "bf16"])
    assert e.value.code == 2
    assert ("--frozen-weights bf16: the base computes in --dtype fp32; use fp32, fp8 or nf4"
            in capsys.readouterr().err)


def test_te_fp8_settings_map_to_megatron_core_fields():
    """Transformer Engine's FP8 cannot run here; its settings are checked against megatron-core's
    own TransformerConfig fields and recipe names (which the TE path hands them to)."""
    import dataclasses

    from megatron.core.enums import Fp8Recipe
    from megatron.core.transformer.transformer_config import TransformerConfig

    from pesc_megatron.model.builder import te_fp8_fields
    from pesc_megatron.model.precision import TE_FP8_RECIPES

    assert te_fp8_fields(PrecisionConfig()) == {} and te_fp8_fields(None) == {}
    fields = {f.name for f in dataclasses.fields(TransformerConfig)}
    assert set(TE_FP8_RECIPES) <= {r.value for r in Fp8Recipe}
    for recipe in TE_FP8_RECIPES:
        got = te_fp8_fields(PrecisionConfig(fp8=recipe, fp8_margin=2, fp8_amax_history_len=16))
        assert set(got) <= fields
        assert got == dict(fp8="hybrid", fp8_recipe=recipe, fp8_margin=2,
                           fp8_amax_history_len=16)


def test_te_layer_spec():
    """The TE spec names megatron-core's own TE linears for the frozen base (which raise
    ImportError when built without TE: no stand-ins here) and keeps the adapter experts local;
    LoRA (a subclass of the local linears) is refused."""
    from megatron.core.extensions.transformer_engine import (
        TEColumnParallelLinear,
        TERowParallelLinear,
    )
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

    from pesc_megatron.model.spec import get_pesc_layer_te_spec

    spec = get_pesc_layer_te_spec(8)
    attn = spec.submodules.self_attention.submodules
    mlp = spec.submodules.mlp.submodules
    assert (attn.linear_qkv, attn.linear_proj) == (TEColumnParallelLinear, TERowParallelLinear)
    shared, experts = mlp.shared_experts.submodules, mlp.experts.submodules
    assert (shared.linear_fc1, shared.linear_fc2) == (TEColumnParallelLinear, TERowParallelLinear)
    assert (experts.linear_fc1, experts.linear_fc2) == (ColumnParallelLinear, RowParallelLinear)
    with pytest.raises(ConfigError, match="LoRA on Transformer Engine's linears"):
        get_pesc_layer_te_spec(8, lora_targets=("q_proj",))


def test_job_precision_section():
    from pesc_megatron.train.config import job_from_dict

    base = {"model": {"checkpoint": "ckpt"}, "data": {"train": ["a.jsonl"]}}
    job = job_from_dict({**base, "precision": {"frozen_weights": "fp8"}})
    assert (job.precision.frozen_weights, job.precision.fp8_matmul) == ("fp8", "auto")
    assert job_from_dict(base).precision.frozen_weights is None
    with pytest.raises(ConfigError, match=r"precision.frozen: unknown option \(known: fp8, "):
        job_from_dict({**base, "precision": {"frozen": "fp8"}})
    with pytest.raises(ConfigError, match=r"precision.frozen_weights='bf16': the base computes "
                                          r"in the model dtype fp32"):
        job_from_dict({**base, "precision": {"frozen_weights": "bf16"}})
    with pytest.raises(ConfigError, match=r"precision.fp8=delayed with lora.targets: LoRA on "
                                          r"Transformer Engine's linears is not implemented"):
        job_from_dict({**base, "precision": {"fp8": "delayed"}, "lora": {"targets": ["q_proj"]}})


def test_cli_train_precision_errors_exit_2(tmp_path, capsys, single_rank):
    from pesc_megatron.cli import main
    from tests.helpers import tiny

    ckpt = tiny.make_checkpoint(tmp_path, layers=1)
    tiny.write_jsonl(tmp_path / "train.jsonl", tiny.records(8, 1))
    tiny.write_jsonl(tmp_path / "valid.jsonl", tiny.records(4, 2))
    job = tiny.write_job(tmp_path / "job.yaml", ckpt, tmp_path, tmp_path / "out")
    for overrides, message in (
            (["precision.frozen_weights=fp4"], "precision.frozen_weights='fp4': must be one of"),
            (["precision.fp8=delayed"], "precision.fp8=delayed: Transformer Engine does not "
                                        "import"),
            (["precision.frozen_weights=nf4", "precision.fp8=delayed"],
             "precision.fp8='delayed': Transformer Engine FP8 and precision.frozen_weights=nf4 "
             "exclude each other")):
        assert main(["train", str(job), *overrides]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith("pesc train: error: ") and message in err[-1], err
    assert not (tmp_path / "out").exists()


def test_output_layer_outlier_columns(single_rank):
    from tests.helpers.quantized_check import check_output_outliers

    check_output_outliers()


def test_calibration_finds_the_massive_dimension(single_rank):
    """Through the whole tiny model: one forward over pseudo-random tokens finds the hidden
    dimension the final norm makes massive, and keeping it brings the FP8 logits back towards
    the fp32 model's."""
    from pesc_megatron.model.quantized import calibration_batches, convert_frozen_weights
    from pesc_megatron.train.step import forward_only

    batches = calibration_batches(256, 32)
    batch = batches[0]

    def logits(model):
        with torch.no_grad():
            model.eval()
            return model(batch["tokens"], batch["position_ids"], None)

    errors = {}
    for outliers in (0, 4):
        model = tiny_model(hidden=128)
        with torch.no_grad():
            model.decoder.final_layernorm.weight[77] = 40.0
        want = logits(model)
        convert_frozen_weights(model, "fp8", "dequantize", output_layer=True,
                               outliers=outliers,
                               calibrate=lambda: forward_only(model, batches, 32, 1))
        errors[outliers] = (logits(model) - want).abs().max().item()
        if outliers:
            assert 77 in model.output_layer.outlier_columns.index.tolist()
    assert errors[4] < 0.5 * errors[0], errors
