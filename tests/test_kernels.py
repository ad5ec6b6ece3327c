"""The lean RMSNorm/SwiGLU match transformers' eager modules in value and gradient."""

import copy

import pytest
import torch

from qft.kernels import apply_fused_layers, rms_norm, swiglu
from tests.tiny import tiny_inputs, tiny_model


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.bfloat16, 2e-2)])
def test_rms_norm_matches_reference(dtype, tol):
    torch.manual_seed(0)
    x = torch.randn(3, 5, 64, dtype=dtype, requires_grad=True)
    w = torch.randn(64, dtype=dtype, requires_grad=True)

    def ref(x, w):
        xf = x.float() if dtype != torch.float64 else x
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)
        return w * y.to(dtype)

    g = torch.randn(3, 5, 64, dtype=dtype)
    gx, gw = torch.autograd.grad((rms_norm(x, w, 1e-6) * g).sum(), (x, w))
    rx, rw = torch.autograd.grad((ref(x, w) * g).sum(), (x, w))
    torch.testing.assert_close(rms_norm(x, w, 1e-6), ref(x, w), atol=tol, rtol=tol)
    torch.testing.assert_close(gx, rx, atol=tol * 5, rtol=tol)
    torch.testing.assert_close(gw, rw, atol=tol * 20, rtol=tol)


def test_swiglu_gradcheck():
    torch.manual_seed(0)
    a = torch.randn(4, 7, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, 7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(swiglu, (a, b))


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_patched_model_matches_eager(family):
    eager = tiny_model(family)
    fused = copy.deepcopy(eager)
    assert apply_fused_layers(fused) == 2 * 2 + 1 + 2  # 2 norms + 1 MLP per layer, plus the final norm
    x = tiny_inputs(eager)
    for m in (eager, fused):
        m.train()
        m(**x, labels=x["input_ids"]).loss.backward()
    torch.testing.assert_close(fused(**x).logits, eager(**x).logits, atol=1e-5, rtol=1e-5)
    for (n, p), (_, q) in zip(eager.named_parameters(), fused.named_parameters()):
        torch.testing.assert_close(q.grad, p.grad, atol=1e-5, rtol=1e-4, msg=n)
