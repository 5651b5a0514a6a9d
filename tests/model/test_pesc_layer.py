"""The PESC layer against an independent float64 implementation of the guide's formula, the
crafted model against the dense model, and the load-balancing loss."""
import math

import pytest
import torch
import torch.nn.functional as F

from pesc_megatron.model.config import ModelConfig, PESCConfig
from pesc_megatron.parallel.config import ParallelConfig

H, FFN, E = 32, 48, 4
MODEL = ModelConfig(hidden_size=H, intermediate_size=FFN, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, vocab_size=64)


def make_layer(**pesc):
    from megatron.core.transformer.spec_utils import build_module

    from pesc_megatron.model.builder import transformer_config
    from pesc_megatron.model.spec import pesc_mlp_spec

    cfg = transformer_config(MODEL, PESCConfig(**{"num_experts": E, "adapter_dim": 8,
                                                  "adapter_dropout": 0.0, **pesc}),
                             ParallelConfig())
    layer = build_module(pesc_mlp_spec(), config=cfg)
    layer.set_layer_number(1)
    return layer


def reference_pesc(layer, x, routing, renormalize, k, scaling):
    """The guide's formula in float64, one expert at a time, from the layer's weights."""
    x = x.double()
    w1 = layer.shared_experts.linear_fc1.weight.double()
    gate, up = w1.chunk(2, dim=0)
    f = (F.silu(x @ gate.T) * (x @ up.T)) @ layer.shared_experts.linear_fc2.weight.double().T
    logits = x @ layer.router.weight.double().T
    if routing == "topk_softmax":
        top, idx = logits.topk(k, dim=-1)
        w = top.softmax(-1)
    else:
        p = logits.softmax(-1)
        w, idx = p.topk(k, dim=-1)
        if renormalize:
            w = w / w.sum(-1, keepdim=True)
    y = f.clone()
    for j, expert in enumerate(layer.experts.local_experts):
        a = F.gelu(f @ expert.linear_fc1.weight.double().T) @ expert.linear_fc2.weight.double().T
        weight = (w * (idx == j)).sum(-1, keepdim=True)  # 0 where j was not chosen
        y = y + scaling * weight * a
    return y


@pytest.mark.parametrize("routing,renormalize", [("topk_softmax", True),
                                                 ("softmax_topk", False),
                                                 ("softmax_topk", True)])
def test_layer_matches_float64_formula(single_rank, routing, renormalize):
    torch.manual_seed(0)
    layer = make_layer(routing=routing, renormalize=renormalize, topk=2, adapter_scaling=0.25)
    with torch.no_grad():
        for expert in layer.experts.local_experts:  # non-zero adapters
            expert.linear_fc2.weight.normal_(0, 0.5)
    x = torch.randn(10, 3, H)
    y, bias = layer(x)
    assert bias is None
    want = reference_pesc(layer, x.reshape(-1, H), routing, renormalize, 2, 0.25)
    torch.testing.assert_close(y.reshape(-1, H).double(), want, rtol=1e-5, atol=1e-5)


def test_routing_orders_differ_without_renormalisation(single_rank):
    torch.manual_seed(0)
    x = torch.randn(16, 1, H)
    outs = []
    for routing, renorm in [("topk_softmax", True), ("softmax_topk", False)]:
        torch.manual_seed(1)
        layer = make_layer(routing=routing, renormalize=renorm)
        with torch.no_grad():
            for expert in layer.experts.local_experts:
                expert.linear_fc2.weight.normal_(0, 0.5)
        outs.append(layer(x)[0])
    assert not torch.allclose(outs[0], outs[1])


def test_fresh_layer_is_the_frozen_ffn(single_rank):
    layer = make_layer()
    x = torch.randn(7, 2, H)
    y, _ = layer(x)
    assert torch.equal(y, layer.shared_experts(x))


def test_init_is_torch_linear_default(single_rank):
    layer = make_layer()
    bound = 1 / math.sqrt(H)  # kaiming_uniform(a=sqrt(5)) on fan_in H
    for w in [layer.router.weight] + [e.linear_fc1.weight for e in layer.experts.local_experts]:
        assert w.abs().max() <= bound and w.abs().max() > 0.8 * bound
    assert all(torch.count_nonzero(e.linear_fc2.weight) == 0
               for e in layer.experts.local_experts)


def test_crafted_model_gives_the_dense_models_logits(single_rank):
    """PESC GPTModel (zero adapters) vs megatron-core's dense GPTModel with the same weights
    and attention (megatron-core's local one), within fp32 rounding: the dense model's norms
    are torch's rms_norm, the PESC model's model/norm.py."""
    import dataclasses

    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer import TransformerConfig

    from pesc_megatron.model.builder import build_model

    torch.manual_seed(0)
    pesc = build_model(MODEL, PESCConfig(num_experts=E, adapter_dim=8), ParallelConfig(),
                       attention="local")
    fields = {f.name: getattr(pesc.config, f.name)
              for f in dataclasses.fields(TransformerConfig) if f.init}
    fields.update(num_moe_experts=None, moe_ffn_hidden_size=None,
                  moe_shared_expert_intermediate_size=None)
    dense = GPTModel(config=TransformerConfig(**fields),
                     transformer_layer_spec=get_gpt_layer_local_spec(normalization="RMSNorm"),
                     vocab_size=MODEL.vocab_size,
                     max_sequence_length=MODEL.max_position_embeddings,
                     position_embedding_type="rope")
    state = {k.replace("mlp.shared_experts.", "mlp."): v
             for k, v in pesc.state_dict().items()
             if ".router." not in k and ".experts." not in k}
    missing, unexpected = dense.load_state_dict(state, strict=False)
    assert not unexpected and all("_extra_state" in k for k in missing)
    tokens = torch.randint(0, MODEL.vocab_size, (2, 12))
    pos = torch.arange(12).expand(2, 12)
    pesc.eval(), dense.eval()
    with torch.no_grad():
        torch.testing.assert_close(pesc(tokens, pos, None), dense(tokens, pos, None),
                                   rtol=1e-5, atol=1e-6)


def test_only_router_and_adapters_train(single_rank):
    from pesc_megatron.model.builder import build_model
    from pesc_megatron.train.step import wrap_ddp

    model = build_model(MODEL, PESCConfig(num_experts=E, adapter_dim=8), ParallelConfig())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".mlp.router." in n or ".mlp.experts." in n for n in trainable)
    assert len(trainable) == MODEL.num_hidden_layers * (1 + 2 * E)
    ddp = wrap_ddp(model)
    for name, p in model.named_parameters():
        assert hasattr(p, "main_grad") == p.requires_grad, name
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert sum(b.numel for b in ddp.buffers + ddp.expert_parallel_buffers) == n_trainable

    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    opt = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=1e-3, clip_grad=0.0), [ddp])
    for p in model.parameters():
        if p.requires_grad:
            p.main_grad.normal_()
    opt.step()
    states = [s for o in opt.chained_optimizers for s in o.optimizer.state.values()]
    assert sum(s["exp_avg"].numel() for s in states) == n_trainable


def is_trainable(name: str) -> bool:
    """The independent expectation, by name: the routers, the adapter experts and LoRA."""
    return ".mlp.router." in name or ".mlp.experts." in name or ".lora." in name


def test_trainable_by_module_type_agrees_with_the_checkpoint_key_rule(single_rank):
    """freeze_base decides by module type (router, adapter experts, LoRA) and marks the role;
    checkpoints select their entries by that mark: both pick exactly the parameters the names
    say, LoRA included."""
    from pesc_megatron.checkpoint.sharded import sharded_roles
    from pesc_megatron.model.builder import build_model
    from pesc_megatron.model.config import LORA_TARGETS, LoRAConfig

    model = build_model(MODEL, PESCConfig(num_experts=E, adapter_dim=8), ParallelConfig(),
                        lora=LoRAConfig(targets=list(LORA_TARGETS), rank=4))
    names = dict(model.named_parameters())
    assert any(".lora." in n for n in names) and any(p.requires_grad for p in names.values())
    for name, p in names.items():
        assert p.requires_grad == is_trainable(name), name
    for key, role in sharded_roles(model).items():
        assert (role is not None) == is_trainable("." + key), key
        assert (role == "lora") == (".lora." in key), key


def _imbalance(layer, x):
    with torch.no_grad():
        probs, routing_map = layer.router(x)
    f = routing_map.float().mean(0)
    return (f.max() / f.mean()).item()


def test_balancing_loss_is_switch_loss_and_its_gradient_balances(single_rank):
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    from pesc_megatron.parallel.mcore_compat import clear_moe_aux_losses, moe_aux_loss_tracker

    torch.manual_seed(0)
    alpha, k = 0.01, 2
    layer = make_layer(aux_loss_coeff=alpha, topk=k, z_loss_coeff=0.0)
    MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(1.0))
    x = torch.randn(512, 1, H) + 2.0 * torch.randn(H)  # a shared direction...
    with torch.no_grad():  # ...that the router sends to expert 0
        layer.router.weight[0] += 0.02 * x.mean((0, 1))
    start = _imbalance(layer, x)
    assert start > 1.9  # expert 0 takes every token (2.0 is the top-2 maximum)

    # The logged loss is the guide's alpha * E * sum_i f_i P_i.
    clear_moe_aux_losses()
    layer(x)
    logits = x.reshape(-1, H) @ layer.router.weight.detach().T
    idx = logits.topk(k, dim=-1).indices
    f = torch.zeros(E).index_add_(0, idx.flatten(), torch.ones(idx.numel())) / idx.numel()
    P = logits.softmax(-1).mean(0)
    logged = moe_aux_loss_tracker()["load_balancing_loss"]["values"][0]
    torch.testing.assert_close(logged * alpha, alpha * E * (f * P).sum(), rtol=1e-5, atol=0)

    # Gradient descent on the balancing loss alone (zero LM gradient) balances the router.
    opt = torch.optim.SGD([layer.router.weight], lr=3.0)
    for _ in range(20):
        opt.zero_grad()
        y, _ = layer(x)
        (y * 0).sum().backward()
        assert layer.router.weight.grad.norm() > 0
        opt.step()
    assert _imbalance(layer, x) < 1.3  # from ~2.0 (1.0 is perfectly balanced)


def test_expert_load_counts_every_assignment(single_rank):
    from pesc_megatron.analysis.balance import load_imbalance
    from pesc_megatron.train.metrics import pop_expert_load

    layer = make_layer(topk=2)
    layer(torch.randn(20, 3, H))
    load = pop_expert_load(layer, num_layers=1)
    assert load.shape == (1, E) and abs(load.sum().item() - 1) < 1e-9
    assert torch.count_nonzero(layer.expert_load) == 0  # popped
    assert load_imbalance(load).item() >= 1.0


def test_padding_is_not_routing_load(single_rank):
    """Pad positions (padding_mask True) count neither in the expert load nor in the balancing
    loss: the loss with padding equals the loss of the valid tokens alone."""
    from pesc_megatron.parallel.mcore_compat import clear_moe_aux_losses, moe_aux_loss_tracker

    torch.manual_seed(0)
    layer = make_layer(topk=2, aux_loss_coeff=1.0)
    layer.train()
    x = torch.randn(10, 2, H)  # [s, b, h]
    padding = torch.zeros(2, 10, dtype=torch.bool)  # [b, s], megatron-core's input layout
    padding[0, 6:] = True
    padding[1, 3:] = True

    def balance(*args, **kwargs):
        clear_moe_aux_losses()
        layer.expert_load.zero_()
        layer(*args, **kwargs)
        return (moe_aux_loss_tracker()["load_balancing_loss"]["values"][0].item(),
                layer.expert_load.sum().item())

    with_pad, counted = balance(x, padding_mask=padding)
    assert counted == (6 + 3) * 2
    valid = torch.cat([x[:6, 0], x[:3, 1]]).unsqueeze(1)  # the 9 valid tokens alone
    alone, _ = balance(valid)
    assert with_pad == pytest.approx(alone, rel=1e-5)
    full, _ = balance(x)
    assert full != pytest.approx(alone, rel=1e-3)
    clear_moe_aux_losses()


def test_capacity_factor_drops_tokens(single_rank):
    layer = make_layer(capacity_factor=0.5, topk=2)
    with torch.no_grad():
        layer.router.weight[0] += 5.0  # crowd one expert
    x = torch.randn(64, 1, H).abs()
    layer(x)
    routed = layer.expert_load.sum().item()
    assert routed < 64 * 2  # some assignments dropped
    assert layer.expert_load.max().item() <= math.ceil(64 * 2 / E * 0.5)


def test_dropout_rate_scale_and_gradient():
    from pesc_megatron.model.pesc_layer import dropout_unscaled

    torch.manual_seed(0)
    x = torch.ones(512, 1001, requires_grad=True)  # not a multiple of 4: padded 16-bit draws
    kept, scale = dropout_unscaled(x, 0.1)
    y = kept * scale
    assert scale == 65536 / (65536 - round(0.1 * 65536))
    mask = y != 0
    assert abs(mask.float().mean().item() - 0.9) < 0.003
    for word in range(4):  # the four 16-bit words of each 64-bit draw (bit 63 included)
        assert abs(mask.view(-1)[word:-1:4].float().mean().item() - 0.9) < 0.005
    assert torch.equal(y[mask], torch.full_like(y[mask], scale))
    y.sum().backward()
    assert torch.equal(x.grad, mask.float() * scale)
    torch.manual_seed(0)
    assert torch.equal(dropout_unscaled(x.detach(), 0.1)[0] * scale, y.detach())  # seeded
    assert dropout_unscaled(x, 0.0) == (x, 1.0)


@pytest.mark.parametrize("recompute", ["selective", "full"])
def test_activation_recompute_gives_the_same_gradients(single_rank, recompute):
    """megatron-core's recompute (with adapter dropout: the RNG is replayed) changes memory,
    not the loss or the router/adapter gradients."""
    from pesc_megatron.model.builder import build_model
    from pesc_megatron.parallel.distributed import set_seed
    from pesc_megatron.train.step import forward_backward, wrap_ddp

    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    # Earlier tests ran backward outside megatron-core's schedules, which (in 0.19) leaves a
    # 0-d aux-loss scale that the schedule's in-place copy of a [1] scale then rejects.
    MoEAuxLossAutoScaler.main_loss_backward_scale = None
    pesc = PESCConfig(num_experts=E, adapter_dim=8, adapter_dropout=0.1)
    tokens = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    batch = dict(tokens=tokens, labels=tokens.roll(-1, 1), loss_mask=torch.ones(2, 16))
    results, weights = [], None
    for mode in ("none", recompute):
        model = build_model(MODEL, pesc, ParallelConfig(), recompute=mode)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "linear_fc2" in name and ".experts." in name:
                    p.normal_(0, 0.1)
        weights = weights or model.state_dict()
        model.load_state_dict(weights)
        ddp = wrap_ddp(model)
        ddp.zero_grad_buffer()
        set_seed(5)
        loss = forward_backward(ddp, [batch], 1, 16, 2)
        grads = {n: p.main_grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        results.append((loss, grads))
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert model.config.recompute_granularity == recompute
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-6, atol=0)
    assert grads_a.keys() == grads_b.keys() and len(grads_a) > 0
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-5, atol=1e-7)


def test_grouped_experts_with_dropout_equal_the_sequential_loop(single_rank):
    """Dropout on: the grouped GEMMs see the same per-(token, expert) masks as megatron-core's
    loop (drawn before either runs), so the same RNG state gives the same output and gradients;
    a token's two routed rows get different masks."""
    from megatron.core import tensor_parallel

    layer = make_layer(adapter_dropout=0.1, topk=2).train()
    with torch.no_grad():
        for expert in layer.experts.local_experts:
            expert.linear_fc2.weight.normal_(0, 0.1)
    x = torch.randn(64, 1, H, requires_grad=True)
    tracker = tensor_parallel.get_cuda_rng_tracker()
    results = {}
    for grouped in (True, False):
        layer.experts.grouped = grouped
        states = tracker.get_states()
        x.grad = None
        for p in layer.parameters():
            p.grad = None
        out = layer(x)[0]
        out.square().sum().backward()
        tracker.set_states(states)  # the next run draws the same masks
        results[grouped] = (out.detach(), x.grad.clone(),
                            [p.grad.clone() for p in layer.experts.parameters()])
    (o1, g1, p1), (o2, g2, p2) = results[True], results[False]
    torch.testing.assert_close(o1, o2, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(g1, g2, rtol=1e-6, atol=1e-7)
    for a, b in zip(p1, p2):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    from pesc_megatron.model.pesc_layer import dropout_unscaled

    rows = dropout_unscaled(torch.ones(2, 4096), 0.1)[0] == 0  # two rows, as for top-2
    assert 0.08 < rows.float().mean() < 0.12 and not torch.equal(rows[0], rows[1])


def test_logits_at_loss_positions_only_equal_the_full_output(single_rank):
    """PESCGPTModel computes the output layer and cross entropy at the loss positions only:
    the per-token losses there and every trainable gradient equal megatron-core's GPTModel
    over all positions (float64), and the other positions are 0."""
    from pesc_megatron.model.builder import build_model

    torch.manual_seed(0)
    model = build_model(MODEL, PESCConfig(num_experts=E, adapter_dim=8, adapter_dropout=0.0),
                        ParallelConfig(), dtype="fp64", attention="local")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.normal_(0, 0.2)
    tokens = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 12)
    mask[0, :5], mask[1, 9:] = 0, 0  # a prompt; a padding tail
    position_ids = torch.arange(12).expand(2, 12)
    results = []
    for loss_mask in (None, mask):  # None: GPTModel's own postprocess
        model.zero_grad()
        loss = model(tokens, position_ids, None, labels=tokens.roll(-1, 1), loss_mask=loss_mask)
        (loss * mask).sum().backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                                        if p.requires_grad}))
    (full, full_grads), (selected, grads) = results
    assert selected.shape == full.shape == (2, 12)
    torch.testing.assert_close(selected, full * mask, rtol=1e-12, atol=1e-12)
    assert (selected[mask == 0] == 0).all() and len(grads) > 0
    for name, g in grads.items():
        assert g.abs().max() > 0, name
        torch.testing.assert_close(g, full_grads[name], rtol=1e-10, atol=1e-12, msg=name)
