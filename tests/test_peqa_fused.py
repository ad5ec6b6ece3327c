"""PEQA's compiled path (qft.adapters.peqa.fused) against the plain PyTorch reference, compiled on the CPU.

On a GPU the same functions compile to Triton kernels (the default there); CI has no GPU, so these tests force
compilation with QFT_PEQA_COMPILE=1 and TorchInductor's CPU backend.
"""

import pytest
import torch

from qft.adapters.peqa import fused
from qft.adapters.peqa.layer import IntLinear, ScaleOnlyLinear, scale_only_linear_reference
from qft.quant.intq import unpack_bits


@pytest.fixture
def compiled(monkeypatch):
    monkeypatch.setenv("QFT_PEQA_COMPILE", "1")
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _layer(bits, group_size, out_f=48, in_f=160):
    torch.manual_seed(bits)
    return IntLinear.from_linear(torch.nn.Linear(in_f, out_f, bias=True), bits, group_size)


@pytest.mark.parametrize("bits,group_size", [(4, 64), (3, 32), (2, 0)])
def test_compiled_layer_matches_reference(compiled, bits, group_size):
    layer = _layer(bits, group_size)
    meta = layer._meta()
    q = unpack_bits(layer.packed, bits, meta[2] * meta[3]).view(meta[2], meta[3])
    x = torch.randn(3, 5, meta[3])
    s = layer.scales.detach().float().clone().requires_grad_()
    xr, sr = x.clone().requires_grad_(), s.detach().clone().requires_grad_()
    x.requires_grad_()
    y = ScaleOnlyLinear.apply(x, s, layer.packed, layer.zeros, layer.bias.float(), meta)
    yr = scale_only_linear_reference(xr, sr, q, layer.zeros, group_size, layer.bias.float())
    w = torch.randn_like(y)
    (y * w).sum().backward()
    (yr * w).sum().backward()
    torch.testing.assert_close(y, yr, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x.grad, xr.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(s.grad, sr.grad, atol=1e-4, rtol=1e-4)
    assert fused.fused_dequantize.compiled is not None and not fused.fused_dequantize.failed
    backward = fused.fused_channel_backward if group_size == 0 else fused.fused_backward
    assert backward.compiled is not None and not backward.failed


def test_a_compile_failure_falls_back_to_plain_pytorch(compiled, monkeypatch, caplog):
    def broken(*a, **k):
        raise RuntimeError("no compiler here")

    c = fused.Compiled(fused.dequantize_packed)
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: broken)
    layer = _layer(4, 64)
    got = c(layer.packed, layer.scales, layer.zeros, *layer._meta(), torch.float32)
    torch.testing.assert_close(got, layer.dequantize_weight(dtype=torch.float32))
    assert c.failed and "using plain PyTorch" in caplog.text


def test_plain_on_cpu_by_default(monkeypatch):
    monkeypatch.delenv("QFT_PEQA_COMPILE", raising=False)
    assert not fused.wanted(torch.device("cpu")) and fused.wanted(torch.device("cuda"))
    monkeypatch.setenv("QFT_PEQA_COMPILE", "0")
    assert not fused.wanted(torch.device("cuda"))
