"""PEQA's fast GPU path: the unpack + dequantize of the forward and the input and scale gradients of the
backward, each compiled by ``torch.compile`` (TorchInductor) into fused kernels.

In plain PyTorch each of them is a chain of full-size temporaries (int32 words, shifted codes, expanded zero
points and scales, the product with the weight gradient): several memory passes over every weight, three
times per step. Compiled, each is one or two passes. The plain functions stay the reference; the tests run
both, compiled on the CPU too, and compare.

With one scale per output channel the scale gradient needs no weight-gradient product at all
(:func:`channel_backward`): the backward is one matmul, as in a frozen layer.

``QFT_PEQA_COMPILE``: ``auto`` (default: compiled on CUDA, plain on CPU, where compiling costs more than it
saves on small layers), ``1`` (always), ``0`` (never). A compilation failure logs one warning and falls back
to the plain functions for the rest of the process.
"""

from __future__ import annotations

import logging
import os

import torch

from qft.quant.intq import centered_codes, dequantize, reduce_groups, unpack_bits

log = logging.getLogger("qft.peqa")


def dequantize_packed(packed, scales, zeros, bits: int, group_size: int, out_f: int, in_f: int,
                      dtype: torch.dtype) -> torch.Tensor:
    """``s · (q − z)`` (out, in) in ``dtype`` straight from the packed integers."""
    q = unpack_bits(packed, bits, out_f * in_f).view(out_f, in_f)
    return dequantize(q, scales, zeros, group_size, dtype)


def scale_only_backward(grad_out, x, scales, packed, zeros, bits: int, group_size: int, out_f: int, in_f: int,
                        need_x: bool, need_s: bool):
    """(∂L/∂x, ∂L/∂s) of ``F.linear(x, s · (q − z))``, unpacking the integers once for both:
    ``∂L/∂x = grad_out · W`` and ``∂L/∂s = Σ_group (grad_outᵀ · x) ⊙ (q − z)``, (out, n_groups)."""
    q = unpack_bits(packed, bits, out_f * in_f).view(out_f, in_f)
    grad_x = grad_s = None
    if need_x:
        grad_x = grad_out @ dequantize(q, scales, zeros, group_size, x.dtype)  # (..., in)
    if need_s:
        grad_w = grad_out.reshape(-1, out_f).T @ x.reshape(-1, in_f)  # (out, in)
        grad_s = reduce_groups(grad_w * centered_codes(q, zeros, group_size, grad_w.dtype), group_size)
    return grad_x, grad_s


def channel_backward(grad_out, y, bias, scales, packed, zeros, bits: int, out_f: int, in_f: int, need_x: bool,
                     need_s: bool):
    """The same two gradients for one scale per output channel (``group_size=0``, the paper's default), from
    the layer's saved *output* instead of its input: ``y = s ⊙ (x · (q − z)ᵀ) + b``, so
    ``∂L/∂s = Σ_tokens grad_out ⊙ (y − b) / s`` - a reduction over the output, no weight-gradient matmul.
    (Scales are never 0: the quantizer floors them at the dtype's smallest normal number.)"""
    grad_x = grad_s = None
    if need_x:
        q = unpack_bits(packed, bits, out_f * in_f).view(out_f, in_f)
        grad_x = grad_out @ dequantize(q, scales, zeros, 0, grad_out.dtype)
    if need_s:
        acc = torch.promote_types(y.dtype, torch.float32)  # float32 sums for bf16/fp16 outputs
        u = y.reshape(-1, out_f).to(acc)
        if bias is not None:
            u = u - bias.to(acc)
        grad_s = (grad_out.reshape(-1, out_f).to(acc) * u).sum(dim=0)[:, None] / scales.to(acc)
    return grad_x, grad_s


def wanted(device: torch.device) -> bool:
    mode = os.environ.get("QFT_PEQA_COMPILE", "auto").lower()
    if mode in ("0", "false", "no", "off"):
        return False
    return mode in ("1", "true", "yes", "on") or device.type == "cuda"


class Compiled:
    """``fn`` through ``torch.compile`` where :func:`wanted`, the plain ``fn`` elsewhere or after a failure."""

    def __init__(self, fn):
        self.fn, self.compiled, self.failed = fn, None, False

    def __call__(self, *args):
        if self.failed or not wanted(args[0].device):
            return self.fn(*args)
        try:
            if self.compiled is None:
                self.compiled = torch.compile(self.fn, dynamic=False)
            return self.compiled(*args)
        except Exception as exc:  # a missing compiler or an Inductor bug must not stop training
            self.failed = True
            log.warning("PEQA: torch.compile of %s failed (%s: %s); using plain PyTorch", self.fn.__name__,
                        type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
            return self.fn(*args)


fused_dequantize = Compiled(dequantize_packed)
fused_backward = Compiled(scale_only_backward)
fused_channel_backward = Compiled(channel_backward)
