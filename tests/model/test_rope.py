"""model/rope.py, the RoPE megatron-core's attention runs here (patched over its unfused path),
against megatron-core's own `apply_rotary_pos_emb` in float64: values and input gradients for
[s, b, heads, d] and for packed THD samples (positions restarting per sample, and the case
where the angles cover the whole batch), the cached angles, and the cases it leaves to
megatron-core."""
from types import SimpleNamespace

import pytest
import torch
from megatron.core.models.common.embeddings import rope_utils

from pesc_megatron.model import rope


def _freqs(n, d=16):
    """Angles for n positions: random and different in the two halves (RoPE's own repeat
    the halves), so that a rotation mixing up the halves' sines is seen."""
    return 3 * torch.randn(n, 1, 1, d, dtype=torch.float64,
                           generator=torch.Generator().manual_seed(n))


CONFIG = SimpleNamespace(apply_rope_fusion=False, rotary_interleaved=False,
                         multi_latent_attention=False)


def _both(t, freqs, cu=None, mscale=1.0, config=CONFIG):
    """(ours, megatron-core's) outputs and input gradients."""
    grad = torch.randn_like(t)
    out = []
    for fn in (lambda x: rope.apply_rotary_pos_emb(x, freqs, cu, mscale),
               lambda x: rope_utils.apply_rotary_pos_emb(x, freqs, config, cu_seqlens=cu,
                                                         mscale=mscale)):
        x = t.clone().requires_grad_(True)
        y = fn(x)
        y.backward(grad)
        out.append((y.detach(), x.grad))
    return out


@pytest.mark.parametrize("layout", ["sbhd", "thd", "thd_whole_batch"])
def test_rope_equals_megatron_core(single_rank, layout):
    torch.manual_seed(0)
    if layout == "sbhd":
        t, freqs, cu = torch.randn(12, 2, 3, 16, dtype=torch.float64), _freqs(12), None
    else:
        cu = torch.tensor([0, 5, 6, 13, 20], dtype=torch.int32)
        t = torch.randn(20, 3, 16, dtype=torch.float64)
        freqs = _freqs(20 if layout == "thd_whole_batch" else 7)  # longest sample: 7
    (ours, g_ours), (ref, g_ref) = _both(t, freqs, cu, mscale=1.25)
    torch.testing.assert_close(ours, ref, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(g_ours, g_ref, rtol=1e-14, atol=1e-14)


def test_angles_are_computed_once_per_forward(single_rank):
    freqs, cu = _freqs(7), torch.tensor([0, 5, 12], dtype=torch.int32)
    first = rope._angles.get(freqs, cu, torch.float64, 1.0, 12)
    assert rope._angles.get(freqs, cu, torch.float64, 1.0, 12) is first  # the next layer
    assert rope._angles.get(freqs, cu.clone(), torch.float64, 1.0, 12) is not first  # new batch
    assert rope._angles.get(freqs, cu, torch.float32, 1.0, 12)[0].dtype == torch.float32


def test_angles_follow_an_in_place_update(single_rank):
    """A loader that refills one cu_seqlens tensor for each micro-batch: the same object, new
    sample boundaries, megatron-core's angles for them."""
    freqs, cu = _freqs(9), torch.tensor([0, 5, 12], dtype=torch.int32)
    t = torch.randn(12, 3, 16, dtype=torch.float64)
    _both(t, freqs, cu)
    cu.copy_(torch.tensor([0, 9, 12], dtype=torch.int32))
    (ours, _), (ref, _) = _both(t, freqs, cu)
    torch.testing.assert_close(ours, ref, rtol=1e-14, atol=1e-14)


def test_angles_from_inference_mode_do_not_reach_training(single_rank):
    """megatron-core's RotaryEmbedding caches its freqs: the same object comes back for a
    training forward after an inference-mode one, whose angles autograd could not save."""
    freqs, t = _freqs(6), torch.randn(6, 1, 2, 16, dtype=torch.float64)
    with torch.inference_mode():
        rope.apply_rotary_pos_emb(t, freqs)
    x = t.clone().requires_grad_(True)
    rope.apply_rotary_pos_emb(x, freqs).sum().backward()
    assert x.grad is not None


def test_the_patch_runs_here_and_leaves_the_rest_to_megatron_core(single_rank):
    from megatron.core.transformer import attention

    t, freqs = torch.randn(4, 1, 2, 16), _freqs(4).float()
    assert attention.apply_rotary_pos_emb(t, freqs, CONFIG).grad_fn is None  # no grad asked
    x = t.clone().requires_grad_(True)
    assert type(attention.apply_rotary_pos_emb(x, freqs, CONFIG).grad_fn).__name__ == \
        "_RotateBackward"
    interleaved = SimpleNamespace(**{**CONFIG.__dict__, "rotary_interleaved": True})
    assert not rope.rotary_runs_here(t, freqs, interleaved, None)
    assert not rope.rotary_runs_here(t, freqs[..., :8], CONFIG, None)  # partial rotary
    torch.testing.assert_close(attention.apply_rotary_pos_emb(t, freqs, interleaved),
                               rope_utils.apply_rotary_pos_emb(t, freqs, interleaved))
    packed, cu = torch.randn(9, 2, 16), torch.tensor([0, 4, 9], dtype=torch.int32)
    freqs = _freqs(5).float()
    torch.testing.assert_close(attention.apply_rotary_pos_emb(packed, freqs, CONFIG, cu),
                               rope_utils.apply_rotary_pos_emb(packed, freqs, CONFIG, cu))
