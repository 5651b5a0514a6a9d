"""LoRA on the frozen base: each LoRA linear equals its base with PEFT's merged weight
W + (alpha/r) B A (built in Hugging Face's per-projection layout, then fused by the converter's
own mapping), a fresh LoRA changes nothing, the trainable set, and the configuration errors."""
import pytest
import torch

from pesc_megatron.model.config import (
    LORA_TARGETS,
    LoRAConfig,
    ModelConfig,
    PESCConfig,
    validate_lora,
)
from pesc_megatron.parallel.config import ParallelConfig
from pesc_megatron.schema import ConfigError

MODEL = ModelConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, vocab_size=64)
PESC = PESCConfig(num_experts=4, adapter_dim=8, adapter_dropout=0.0)


def build(targets, rank=4, alpha=8.0, dtype="fp64"):
    from pesc_megatron.model.builder import build_model

    lora = LoRAConfig(targets=list(targets), rank=rank, alpha=alpha, dropout=0.0)
    return build_model(MODEL, PESC, ParallelConfig(), dtype=dtype, lora=lora)


def merged_weight(linear, name):
    """The base weight plus every targeted projection's (alpha/r) B A, fused like the base."""
    from pesc_megatron.interop.reshape import to_megatron
    from pesc_megatron.model.config import LINEAR_TARGETS

    lora = linear.lora
    kind = {"linear_qkv": "qkv", "linear_fc1": "gate_up"}.get(name, "copy")
    deltas = []
    for t in LINEAR_TARGETS[name]:
        pair = getattr(lora, t, None)
        base_rows = {"q_proj": 32, "k_proj": 16, "v_proj": 16, "gate_proj": 48,
                     "up_proj": 48}.get(t, linear.weight.shape[0])
        if pair is None:
            deltas.append(torch.zeros(base_rows, linear.weight.shape[1], dtype=torch.float64))
        else:
            deltas.append(lora.scaling * pair.lora_B.weight @ pair.lora_A.weight)
    return linear.weight + to_megatron(kind, deltas, MODEL)


@pytest.mark.parametrize("targets", [LORA_TARGETS, ("q_proj", "v_proj"),
                                     ("up_proj", "o_proj", "k_proj"), ("gate_proj",)])
def test_lora_linear_equals_merged_weight(single_rank, targets):
    torch.manual_seed(0)
    model = build(targets).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora." in name:
                p.normal_(0, 0.3)
    layer = model.decoder.layers[1]
    linears = {"linear_qkv": layer.self_attention.linear_qkv,
               "linear_proj": layer.self_attention.linear_proj,
               "linear_fc1": layer.mlp.shared_experts.linear_fc1,
               "linear_fc2": layer.mlp.shared_experts.linear_fc2}
    checked = 0
    for name, linear in linears.items():
        if not hasattr(linear, "lora"):
            continue
        x = torch.randn(5, 2, linear.weight.shape[1], dtype=torch.float64)
        with torch.no_grad():
            got, _ = linear(x)
            want = x @ merged_weight(linear, name).T
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12, msg=name)
        assert (got - x @ linear.weight.T).abs().max() > 1e-3  # LoRA did contribute
        checked += 1
    from pesc_megatron.model.config import LINEAR_TARGETS

    assert checked == sum(bool(set(v) & set(targets)) for v in LINEAR_TARGETS.values())


def test_fresh_lora_changes_nothing_and_is_trainable(single_rank):
    from pesc_megatron.model.builder import build_model

    torch.manual_seed(1)
    plain = build_model(MODEL, PESC, ParallelConfig(), dtype="fp64").eval()
    with_lora = build(LORA_TARGETS).eval()
    missing, unexpected = with_lora.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and missing and all(".lora." in k for k in missing)
    tokens = torch.randint(0, 64, (2, 9))
    pos = torch.arange(9).expand(2, 9)
    with torch.no_grad():
        torch.testing.assert_close(with_lora(tokens, pos, None), plain(tokens, pos, None),
                                   rtol=0, atol=0)
    lora = {n: p for n, p in with_lora.named_parameters() if ".lora." in n}
    assert len(lora) == 2 * 7 * MODEL.num_hidden_layers
    assert all(p.requires_grad for p in lora.values())
    assert all(torch.count_nonzero(p) == 0 for n, p in lora.items() if "lora_B" in n)
    assert all(torch.count_nonzero(p) == p.numel() for n, p in lora.items() if "lora_A" in n)
    frozen = [n for n, p in with_lora.named_parameters() if not p.requires_grad]
    assert all(".lora." not in n and ".router." not in n for n in frozen)


@pytest.mark.parametrize("settings,message", [
    (dict(targets=["q_proj", "qkv_proj"]), r"lora.targets: 'qkv_proj' matches no module"),
    (dict(targets="q_proj"), r"lora.targets='q_proj': expected a list"),
    (dict(targets=["q_proj", "q_proj"]), r"listed twice"),
    (dict(targets=["q_proj"], rank=0), r"lora.rank=0: must be >= 1"),
    (dict(targets=["q_proj"], rank=-4), r"lora.rank=-4: must be >= 1"),
    (dict(targets=["k_proj"], rank=17),
     r"lora.rank=17: larger than k_proj \(32 inputs, 16 outputs\); use at most 16"),
    (dict(targets=["q_proj"], rank=4, alpha=0), r"lora.alpha=0: must be > 0"),
    (dict(targets=["q_proj"], rank=4, dropout=1.0), r"lora.dropout=1.0: must be in \[0, 1\)"),
])
def test_bad_lora_settings(settings, message):
    with pytest.raises(ConfigError, match=message) as e:
        validate_lora(LoRAConfig(**settings), MODEL)
    assert "\n" not in str(e.value)


def test_rank_16_fits_k_proj():
    validate_lora(LoRAConfig(targets=["k_proj"], rank=16), MODEL)


@pytest.mark.parametrize("name", ["linear_qkv", "linear_fc2"])
def test_lora_dropout_is_unbiased(single_rank, name):
    """Training-mode LoRA dropout (each projection its own mask, the rescaling applied to the
    rank-r path's output): the mean update over many draws is the update without dropout."""
    from pesc_megatron.model.builder import build_model

    torch.manual_seed(0)
    lora = LoRAConfig(targets=list(LORA_TARGETS), rank=4, alpha=8.0, dropout=0.5)
    model = build_model(MODEL, PESC, ParallelConfig(), lora=lora)
    layer = model.decoder.layers[0]
    linear = {"linear_qkv": layer.self_attention.linear_qkv,
              "linear_fc2": layer.mlp.shared_experts.linear_fc2}[name]
    with torch.no_grad():
        for p in linear.lora.parameters():
            p.normal_(0, 0.3)
        x = torch.randn(3, 1, linear.weight.shape[1])
        zeros = x.new_zeros(3, 1, linear.weight.shape[0])
        want = linear.lora.eval()(x, zeros.clone())
        linear.lora.train()
        draws = torch.stack([linear.lora(x, zeros.clone()) for _ in range(4000)])
    assert not torch.equal(draws[0], draws[1])
    torch.testing.assert_close(draws.mean(0), want, rtol=0, atol=0.06 * want.abs().max().item())


def test_dropped_a_products_equal_autograd_and_keep_no_copies(single_rank):
    """The parts' A products over their own dropout masks (one autograd function) equal
    autograd through x * mask and the product in float64, value and every gradient, and what
    backward keeps is x and the 1-byte masks, not a dropped float copy of x per part."""
    from pesc_megatron.model.lora import _DroppedA

    torch.manual_seed(0)
    x = torch.randn(6, 2, 32, dtype=torch.float64, requires_grad=True)
    weights = [torch.randn(4, 32, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    masks = [(torch.rand(6, 2, 32) > 0.3).to(torch.uint8) for _ in range(3)]
    grad = torch.randn(6, 2, 12, dtype=torch.float64)
    got = _DroppedA.apply(x, masks, *weights)
    got_grads = torch.autograd.grad(got, [x, *weights], grad)
    want = torch.cat([(x * m) @ w.t() for m, w in zip(masks, weights)], dim=-1)
    want_grads = torch.autograd.grad(want, [x, *weights], grad)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(lambda x, *w: _DroppedA.apply(x, masks, *w),
                                    (x, *weights))

    from pesc_megatron.model.builder import build_model

    lora = LoRAConfig(targets=list(LORA_TARGETS), rank=4, alpha=8.0, dropout=0.1)
    model = build_model(MODEL, PESC, ParallelConfig(), lora=lora)
    linear = model.decoder.layers[0].self_attention.linear_qkv
    x = torch.randn(64, 2, 32, requires_grad=True)
    saved = {}

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        linear.lora.train()(x, x.new_zeros(64, 2, linear.weight.shape[0])).sum().backward()
    weights = sum(p.numel() * 4 for p in linear.lora.parameters())
    rank_wide = 64 * 2 * 3 * 4 * 4  # B's input: the tokens' r-wide products of three parts
    # x (4 bytes an element) and three 1-byte masks, besides the weights and B's input
    assert sum(saved.values()) <= x.numel() * (4 + 3) + weights + rank_wide


@pytest.mark.parametrize("groups,offsets,view", [(3, [0, 4, 5], False), (3, [4], False),
                                                 (1, [0, 6], False), (1, [0], True)])
def test_b_products_added_in_place_equal_autograd(single_rank, groups, offsets, view):
    """The parts' B products added into their columns of the base's output (per query group
    for qkv) equal autograd through the products, a cat and an add in float64, value and every
    gradient; a view is not changed in place."""
    from pesc_megatron.model.lora import _AddB

    torch.manual_seed(0)
    width = 6 if groups == 3 else 12  # one group's columns: q 4, k 1, v 1 / gate 6, up 6
    sizes = {0: 4 if groups == 3 else 6, 4: 1, 5: 1, 6: 6}
    r = 3
    weights = [torch.randn(sizes[o] * groups, r, dtype=torch.float64, requires_grad=True)
               for o in offsets]
    h = torch.randn(5, 2, r * len(offsets), dtype=torch.float64, requires_grad=True)
    base = torch.randn(5, 2, groups * width, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(5, 2, groups * width, dtype=torch.float64)

    def want_fn(base, h, *weights):
        update = base.new_zeros(10, groups, width)
        for hp, w, o in zip(h.reshape(10, -1).chunk(len(weights), -1), weights, offsets):
            part = (hp @ w.t()).view(10, groups, -1)
            update = update + torch.nn.functional.pad(
                part, (o, width - o - part.shape[-1]))
        return base + update.view(base.shape)

    def got_fn(base, h, *weights):
        out = base.view(base.shape) if view else base * 1.0
        return _AddB.apply(out, groups, offsets, h, *weights)

    want = want_fn(base, h, *weights)
    got = got_fn(base, h, *weights)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    inputs = [base, h, *weights]
    for g, w in zip(torch.autograd.grad(got, inputs, grad),
                    torch.autograd.grad(want, inputs, grad)):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(got_fn, tuple(inputs))
