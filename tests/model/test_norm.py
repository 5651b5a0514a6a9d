"""The RMSNorm autograd function against torch's own rms_norm: values and gradients (input and
weight) in float64 within float rounding, and in fp32 and bf16 within theirs; torch's default
eps, a weight wider than the input, and the shapes it leaves to torch."""
import pytest
import torch
import torch.nn.functional as F

from pesc_megatron.model.norm import RMSNorm


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5),
                                       (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("weight_grad", [False, True])
def test_rms_norm_equals_torch(dtype, tol, weight_grad):
    torch.manual_seed(0)
    norm = RMSNorm(48, eps=1e-5).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.3 * torch.randn(48))
    norm.weight.requires_grad_(weight_grad)
    x = (3 * torch.randn(5, 2, 48)).to(dtype).requires_grad_(True)
    grad = torch.randn(5, 2, 48).to(dtype)
    results = []
    for fn in (norm, lambda t: F.rms_norm(t, (48,), norm.weight, 1e-5)):
        out = fn(x)
        out.backward(grad)
        results.append((out.detach(), x.grad, norm.weight.grad))
        x.grad = norm.weight.grad = None
    (out, gx, gw), (ref, ref_gx, ref_gw) = results
    assert out.dtype == dtype
    torch.testing.assert_close(out, ref, rtol=tol, atol=tol)
    torch.testing.assert_close(gx, ref_gx, rtol=tol, atol=tol)
    assert (gw is None) == (not weight_grad)
    if weight_grad:
        torch.testing.assert_close(gw, ref_gw, rtol=tol, atol=tol * 10)


def test_rms_norm_edge_cases_equal_torch():
    torch.manual_seed(0)
    x = 0.01 * torch.randn(4, 16)
    # eps=None: torch takes fp32's eps for a bf16 input, not bf16's (which would dominate here)
    norm = RMSNorm(16).to(torch.bfloat16)
    torch.testing.assert_close(norm(x.bfloat16()), torch.nn.RMSNorm(16).bfloat16()(x.bfloat16()))
    # an fp64 weight over an fp32 input: computed in fp64, returned in fp32; weight grad only
    wide = RMSNorm(16, eps=1e-6).double()
    out = wide(x)
    out.sum().backward()
    ref_w = wide.weight.detach().clone().requires_grad_(True)
    ref = F.rms_norm(x.double(), (16,), ref_w, 1e-6)
    ref.sum().backward()
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref.float())
    torch.testing.assert_close(wide.weight.grad, ref_w.grad)
    # normalising over two dimensions: torch's own
    two = RMSNorm([2, 8], eps=1e-6)
    torch.testing.assert_close(two(x.view(4, 2, 8)), F.rms_norm(x.view(4, 2, 8), (2, 8),
                                                                 two.weight, 1e-6))
