"""`pesc bench compare`: the reference design computes PESC's formula, the upcycled model's
experts are copies of the dense FFN, and a tiny run's bookkeeping is right (no timing checks:
benchmarks print numbers, tests check what they count)."""
import torch
import torch.nn.functional as F

from pesc_megatron.bench.compare import ReferencePESC, _build, _ratios, markdown, measure
from pesc_megatron.model.config import PESCConfig
from pesc_megatron.model.size import PRESETS, count_parameters


def test_reference_design_is_the_pesc_formula():
    torch.manual_seed(0)
    h, f, e, k, r, s = 16, 24, 4, 2, 8, 0.25
    gate, up, down = (torch.nn.Linear(h, f, bias=False), torch.nn.Linear(h, f, bias=False),
                      torch.nn.Linear(f, h, bias=False))

    def mlp(x):
        return down(F.silu(gate(x)) * up(x))

    ref = ReferencePESC(mlp, h, e, k, r, scaling=s).eval()
    x = torch.randn(2, 5, h)
    with torch.no_grad():
        got = ref(x)
        xd = x.reshape(-1, h).double()
        fx = mlp(x).reshape(-1, h).double()
        logits = xd @ ref.router.weight.double().T
        top, idx = logits.topk(k, dim=-1)
        w = top.softmax(-1)
        want = fx.clone()
        for t in range(xd.shape[0]):  # token by token, expert by expert
            for slot in range(k):
                j = idx[t, slot]
                a = ref.up[j].weight.double() @ F.gelu(ref.down[j].weight.double() @ fx[t])
                want[t] += s * w[t, slot] * a
    torch.testing.assert_close(got.reshape(-1, h).double(), want, rtol=1e-5, atol=1e-6)


def test_upcycled_experts_copy_the_dense_ffn(single_rank):
    import dataclasses

    model_cfg = dataclasses.replace(PRESETS["smollm2-135m"], num_hidden_layers=1)
    model, _ = _build(dict(variant="upcycle", model_cfg=model_cfg, experts=4, topk=2,
                           adapter_dim=8, lora_rank=4))
    experts = model.decoder.layers[0].mlp.experts.local_experts
    assert len(experts) == 4
    for expert in experts[1:]:
        assert torch.equal(expert.linear_fc1.weight, experts[0].linear_fc1.weight)
        assert torch.equal(expert.linear_fc2.weight, experts[0].linear_fc2.weight)
    assert all(p.requires_grad for p in model.parameters())


def test_tiny_run_counts(single_rank):
    """The bookkeeping of three variants, measured in this process (`measure` is what each
    child process of `pesc bench compare` runs)."""
    import dataclasses

    spec = dict(model="smollm2-135m", layers=1, experts=8, topk=2, adapter_dim=8, lora_rank=4,
                batch=1, seq=16, steps=1, warmup=0, seed=1)
    rows = {v: measure(dict(spec, variant=v)) for v in ("pesc", "upcycle", "reference")}
    m = PRESETS["smollm2-135m"]
    counts = count_parameters(dataclasses.replace(m, num_hidden_layers=1),
                              PESCConfig(num_experts=8, topk=2, adapter_dim=8))
    for name in ("pesc", "reference"):  # the same trainable set in both designs
        assert rows[name]["trainable_params"] == counts["trainable"]
        # AdamW: weights + grads + two moments, fp32
        assert rows[name]["trainable_and_optim_bytes"] == 16 * counts["trainable"]
        assert rows[name]["checkpoint_bytes"] == 12 * counts["trainable"]
    up = rows["upcycle"]
    assert up["trainable_params"] == up["total_params"] == (
        counts["dense"] + 7 * 3 * m.hidden_size * m.intermediate_size + 8 * m.hidden_size)
    table = markdown(list(rows.values()), rows["pesc"])
    assert table.count("\n") == 2 + 3 and "| upcycle |" in table
    ratios = _ratios(list(rows.values()))
    assert ratios["pesc_over_upcycle_trainable_optim_bytes"] == (
        rows["pesc"]["trainable_and_optim_bytes"] / up["trainable_and_optim_bytes"])
