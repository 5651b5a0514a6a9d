"""Hugging Face Camelidae modeling code vs transformers' Llama/Qwen2, a float64 reference; remote-code loading."""

import json
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from pesc_megatron.interop.hf_modeling import (
    CamelidaeConfig,
    CamelidaeForCausalLM,
    register_auto_classes,
)

TINY = dict(
    vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-6, rope_theta=10000.0,
    bos_token_id=1, eos_token_id=2, pad_token_id=0,
)
PESC = dict(num_experts=4, topk=2, adapter_dim=8, moe_scaling=0.25)


def tiny_camelidae(seed=0, **kw):
    torch.manual_seed(seed)
    model = CamelidaeForCausalLM(CamelidaeConfig(**TINY, **PESC, **kw)).eval()
    with torch.no_grad():  # non-zero adapters, so the expert path shows in every output
        for name, p in model.named_parameters():
            if name.endswith("adapter_up.weight"):
                p.normal_(0.0, 0.5)
    return model


def ids(batch=2, seq=7, seed=1):
    return torch.randint(3, TINY["vocab_size"], (batch, seq), generator=torch.Generator().manual_seed(seed))


def test_zero_adapters_equal_llama(tmp_path):
    torch.manual_seed(0)
    llama = LlamaForCausalLM(LlamaConfig(**TINY)).eval()
    model = CamelidaeForCausalLM(CamelidaeConfig(**TINY, **PESC)).eval()
    res = model.load_state_dict(llama.state_dict(), strict=False)
    assert not res.unexpected_keys
    assert res.missing_keys and all(".mlp.moe_adapter." in k for k in res.missing_keys)
    # Router and adapter_down are random; only the zero adapter_up (the PESC init) makes the model dense.
    assert model.model.layers[0].mlp.moe_adapter.router.weight.abs().sum() > 0
    x = ids()
    with torch.no_grad():
        assert torch.equal(model(x).logits, llama(x).logits)

    # Crafting from a dense HF checkpoint: HF's init of the missing keys must keep adapter_up at zero.
    llama.save_pretrained(tmp_path)
    crafted = CamelidaeForCausalLM.from_pretrained(tmp_path, config=model.config).eval()
    with torch.no_grad():
        assert torch.equal(crafted(x).logits, llama(x).logits)


def reference_mlp(mlp, x, cfg):
    """Per-token, per-expert float64 evaluation of the PESC formula from the weights alone."""
    W = {k: v.double() for k, v in mlp.state_dict().items()}
    gelu = lambda u: 0.5 * u * (1.0 + torch.erf(u / math.sqrt(2.0)))  # noqa: E731
    out = []
    for xt in x.double().reshape(-1, x.shape[-1]):
        g, u = W["gate_proj.weight"] @ xt, W["up_proj.weight"] @ xt
        f = W["down_proj.weight"] @ (g * torch.sigmoid(g) * u)
        logits = (W["moe_adapter.router.weight"] @ xt).tolist()
        if cfg.routing == "topk_softmax":
            chosen = sorted(range(cfg.num_experts), key=lambda e: -logits[e])[: cfg.topk]
            z = sum(math.exp(logits[e]) for e in chosen)
            weights = {e: math.exp(logits[e]) / z for e in chosen}
        else:
            z = sum(math.exp(v) for v in logits)
            probs = [math.exp(v) / z for v in logits]
            chosen = sorted(range(cfg.num_experts), key=lambda e: -probs[e])[: cfg.topk]
            norm = sum(probs[e] for e in chosen) if cfg.renormalize else 1.0
            weights = {e: probs[e] / norm for e in chosen}
        y = f.clone()
        for e, w in weights.items():
            pre = f"moe_adapter.experts.expert_{e}."
            y += cfg.moe_scaling * w * (W[pre + "adapter_up.weight"] @ gelu(W[pre + "adapter_down.weight"] @ f))
        out.append(y)
    return torch.stack(out).reshape(x.shape)


@pytest.mark.parametrize(
    "routing,renormalize", [("topk_softmax", True), ("softmax_topk", True), ("softmax_topk", False)]
)
def test_mlp_matches_float64_reference(routing, renormalize):
    model = tiny_camelidae(routing=routing, renormalize=renormalize)
    mlp = model.model.layers[1].mlp
    with torch.no_grad():  # O(1) activations, so the expert term and the routing choices are far from rounding
        for p in mlp.parameters():
            p.normal_(0.0, 0.3)
    x = torch.randn(3, 5, TINY["hidden_size"], generator=torch.Generator().manual_seed(2))
    ref = reference_mlp(mlp, x, model.config)
    dense = super(type(mlp), mlp).forward(x).double()
    assert (ref - dense).abs().max() > 0.1  # the experts contribute visibly
    with torch.no_grad():
        torch.testing.assert_close(mlp(x).double(), ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(mlp.double()(x.double()), ref, rtol=1e-12, atol=1e-12)


SUBPROCESS = textwrap.dedent(
    """
    import sys
    sys.modules["pesc_megatron"] = None  # the exported folder must work without our package
    import torch
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
    assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
    x = torch.load(sys.argv[2])
    with torch.no_grad():
        logits = model(x).logits
    gen = model.generate(x, max_new_tokens=5, do_sample=False)
    torch.save({"logits": logits, "gen": gen}, sys.argv[3])
    """
)


@pytest.mark.multiprocess
def test_save_and_load_with_remote_code(tmp_path):
    model = tiny_camelidae()
    export = tmp_path / "export"
    model.save_pretrained(export)
    config = json.loads((export / "config.json").read_text())
    assert config["model_type"] == "camelidae"
    assert config["auto_map"] == {
        "AutoConfig": "configuration_camelidae.CamelidaeConfig",
        "AutoModelForCausalLM": "modeling_camelidae.CamelidaeForCausalLM",
    }
    assert (export / "modeling_camelidae.py").exists() and (export / "configuration_camelidae.py").exists()

    x = ids(batch=1, seq=4)
    torch.save(x, tmp_path / "ids.pt")
    (tmp_path / "load.py").write_text(SUBPROCESS)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_MODULES_CACHE=str(tmp_path / "modules"), HF_HUB_OFFLINE="1")
    proc = subprocess.run(
        [sys.executable, "load.py", str(export), "ids.pt", "out.pt"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = torch.load(tmp_path / "out.pt")

    with torch.no_grad():
        assert torch.equal(out["logits"], model(x).logits)
        gen = model.generate(x, max_new_tokens=5, do_sample=False)
        assert torch.equal(out["gen"], gen) and gen.shape == (1, 9)
        # Greedy decoding with the KV cache equals argmax of a full, cache-free forward.
        full = model(gen, use_cache=False).logits.argmax(-1)
        assert torch.equal(full[0, 3:-1], gen[0, 4:])


def test_registered_auto_classes(tmp_path):
    model = tiny_camelidae()
    model.save_pretrained(tmp_path)
    register_auto_classes()
    register_auto_classes()  # idempotent
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is CamelidaeForCausalLM
    x = ids()
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, model(x).logits)


def test_released_config_loads(tmp_path):
    # Keys as in the released Camelidae configs (transformers 4.36): no routing/adapter_act/..., legacy rope keys.
    released = dict(
        TINY, model_type="camelidae", architectures=["LlamaForCausalLM"], num_experts=8, topk=2, adapter_dim=512,
        moe_scaling=0.25, moe_dtype="bfloat16", output_router_logits=False, rope_scaling=None, rope_theta=5e6,
        pretraining_tp=1, torch_dtype="bfloat16", transformers_version="4.36.2", use_cache=False,
    )
    (tmp_path / "config.json").write_text(json.dumps(released))
    register_auto_classes()
    cfg = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(cfg, CamelidaeConfig)
    assert (cfg.routing, cfg.renormalize, cfg.adapter_act, cfg.adapter_dropout, cfg.qkv_bias) == (
        "topk_softmax", True, "gelu", 0.1, False
    )
    assert cfg.rope_parameters["rope_theta"] == 5e6 and cfg.dtype == torch.bfloat16


def test_qkv_bias_matches_qwen2():
    model = tiny_camelidae(qkv_bias=True)
    names = set(model.state_dict())
    for proj in ("q_proj", "k_proj", "v_proj"):
        assert f"model.layers.0.self_attn.{proj}.bias" in names
    assert "model.layers.0.self_attn.o_proj.bias" not in names
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("_proj.bias"):
                p.normal_(0.0, 0.5)
            elif name.endswith("adapter_up.weight"):
                p.zero_()  # dense, to compare with transformers' Qwen2
    qwen = Qwen2ForCausalLM(Qwen2Config(**TINY)).eval()
    res = qwen.load_state_dict(model.state_dict(), strict=False)
    assert not res.missing_keys and all(".moe_adapter." in k for k in res.unexpected_keys)
    x = ids()
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, qwen(x).logits, rtol=0, atol=1e-6)


def test_camelidae_config_defaults_are_pescconfigs():
    """configuration_camelidae.py is copied into every export and imports only transformers, so
    it repeats PESCConfig's defaults (the released models' values): they must agree."""
    from pesc_megatron.interop.mapping import CAMELIDAE_OPTIONAL
    from pesc_megatron.model.config import PESCConfig

    cfg, ours = CamelidaeConfig(), PESCConfig()
    assert (cfg.num_experts, cfg.topk, cfg.adapter_dim, cfg.moe_scaling) == (
        ours.num_experts, ours.topk, ours.adapter_dim, ours.adapter_scaling)
    for theirs, name in CAMELIDAE_OPTIONAL.items():
        assert getattr(cfg, theirs) == getattr(ours, name), theirs

