"""PEQA's layers: a frozen integer-quantized linear layer, and the tuner layer that trains only its scales.

``IntLinear`` replaces a float ``nn.Linear``: packed b-bit integers, integer zero points, its scales and bias,
all buffers (nothing trainable). ``PeqaLinear`` wraps it (peft's ``base_layer``) and owns the one trainable
tensor per adapter, ``peqa_scales[adapter]`` of shape (out, n_groups), initialised to the base's scales.

The forward dequantizes one layer at a time, ``W = s · (q − z)``; the dense ``W`` is never kept between
forward and backward: :class:`ScaleOnlyLinear` saves the packed integers and recomputes ``q`` in backward,
where ``∂L/∂s = Σ_group (∂L/∂W ⊙ (q − z))`` and ``∂L/∂W = grad_out^T · x`` (Kim et al., 2023, eq. 2). With
one scale per output channel that sum is ``Σ_tokens grad_out ⊙ (y − b) / s``, taken from the saved output
with no weight-gradient product (the input is then not saved at all).
:func:`scale_only_linear_reference` is the same layer through plain autograd, the reference in the tests.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from qft.adapters.peqa.fused import fused_backward, fused_channel_backward, fused_dequantize
from qft.errors import QftError
from qft.quant.intq import (check_bits, check_group_size, dequantize, n_groups, pack_bits, packed_nbytes,
                            quantize_rtn, unpack_bits)


def default_scale_dtype(weight_dtype: torch.dtype) -> torch.dtype:
    """Scales are fp16 (the paper's storage), bf16 for bf16 models (whose range fp16 may not cover)."""
    return torch.bfloat16 if weight_dtype == torch.bfloat16 else torch.float16


class IntLinear(nn.Module):
    """A frozen linear layer stored as packed ``bits``-bit integers: ``y = x · (s · (q − z))^T + b``."""

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int, bias: bool = False,
                 dtype: torch.dtype = torch.float32, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size = check_bits(bits), check_group_size(group_size)
        ng = n_groups(in_features, group_size)
        self.register_buffer("packed", torch.zeros(packed_nbytes(out_features * in_features, bits),
                                                   dtype=torch.uint8, device=device))
        self.register_buffer("zeros", torch.zeros(out_features, ng, dtype=torch.uint8, device=device))
        self.register_buffer("scales", torch.ones(out_features, ng, dtype=dtype, device=device))
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device) if bias else None)

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int, group_size: int) -> "IntLinear":
        """RTN-quantize a float layer (deterministic: the same weights always give the same integers)."""
        w = linear.weight
        layer = cls(linear.in_features, linear.out_features, bits, group_size, linear.bias is not None,
                    dtype=w.dtype, device=w.device)
        q, scales, zeros = quantize_rtn(w, bits, group_size, default_scale_dtype(w.dtype))
        layer.packed.copy_(pack_bits(q, bits))
        layer.zeros.copy_(zeros)
        layer.scales.copy_(scales)
        if linear.bias is not None:
            layer.bias.copy_(linear.bias.detach())
        return layer

    @property
    def qweight(self) -> torch.Tensor:
        # peft's BaseTuner looks for ``qweight`` (GPTQ's name) to place new adapter modules on the right device
        return self.packed

    def codes(self) -> torch.Tensor:
        """The integers ``q``, (out, in) uint8."""
        return unpack_bits(self.packed, self.bits, self.out_features * self.in_features).view(
            self.out_features, self.in_features)

    def dequantize_weight(self, scales: torch.Tensor | None = None, dtype: torch.dtype | None = None):
        """``s · (q − z)`` (out, in), with this layer's scales or the given ones."""
        s = self.scales if scales is None else scales
        return dequantize(self.codes(), s, self.zeros, self.group_size, dtype or s.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ScaleOnlyLinear.apply(x, self.scales, self.packed, self.zeros, self.bias, self._meta())

    def _meta(self):
        return self.bits, self.group_size, self.out_features, self.in_features

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, bias={self.bias is not None}")


class ScaleOnlyLinear(torch.autograd.Function):
    """``F.linear(x, s · (q − z), b)`` with gradients for ``x`` and ``s`` only, from the packed integers."""

    @staticmethod
    def forward(ctx, x, scales, packed, zeros, bias, meta):
        w = fused_dequantize(packed, scales, zeros, *meta, x.dtype)  # (out, in), dropped on return
        y = F.linear(x, w, None if bias is None else bias.to(x.dtype))
        ctx.meta, ctx.x_dtype = meta, x.dtype
        ctx.per_channel = meta[1] == 0
        if ctx.per_channel:  # the scale gradient comes from the output (see channel_backward); x is not kept
            ctx.save_for_backward(y, bias, scales, packed, zeros)
        else:
            ctx.save_for_backward(x, scales, packed, zeros)
        return y

    @staticmethod
    def backward(ctx, grad_out):
        bits, group_size, out_f, in_f = ctx.meta
        grad_out = grad_out.to(ctx.x_dtype)  # under autocast the output (and its gradient) may be lower precision
        need_x, need_s = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        # W recomputed from the packed integers, never saved dense
        if ctx.per_channel:
            y, bias, scales, packed, zeros = ctx.saved_tensors
            grad_x, grad_s = fused_channel_backward(grad_out, y, bias, scales, packed, zeros, bits, out_f, in_f,
                                                    need_x, need_s)
        else:
            x, scales, packed, zeros = ctx.saved_tensors
            grad_x, grad_s = fused_backward(grad_out, x, scales, packed, zeros, *ctx.meta, need_x, need_s)
        grad_s = None if grad_s is None else grad_s.to(scales.dtype)  # (out, n_groups)
        return grad_x, grad_s, None, None, None, None


def scale_only_linear_reference(x, scales, q, zeros, group_size, bias=None):
    """Slow and obviously right: materialize ``W`` and let autograd differentiate through it."""
    return F.linear(x, dequantize(q, scales, zeros, group_size, dtype=x.dtype), bias)


class PeqaLinear(nn.Module, BaseTunerLayer):
    """PEQA's tuner layer over an :class:`IntLinear`: the adapter is a new set of scales."""

    adapter_layer_names = ("peqa_scales",)

    def __init__(self, base_layer: IntLinear, adapter_name: str):
        super().__init__()
        self.base_layer = base_layer
        self.peqa_scales = nn.ParameterDict()
        self.merged_adapters = []
        self._scales_before_merge: torch.Tensor | None = None
        self.update_layer(adapter_name)

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    def update_layer(self, adapter_name: str) -> None:
        base = self.get_base_layer()
        self.peqa_scales[adapter_name] = nn.Parameter(base.scales.detach().clone())
        self.set_adapter(self.active_adapters)

    def _adapter(self) -> str | None:
        names = [a for a in self.active_adapters if a in self.peqa_scales]
        if len(names) > 1:
            raise QftError(f"PEQA adapters replace the base's scales and cannot be combined (active: {names})",
                           "activate one adapter with model.set_adapter(name)")
        return names[0] if names else None

    def merge(self, safe_merge: bool = False, adapter_names=None) -> None:
        """Make the adapter's scales the base layer's own: the result is a plain quantized layer."""
        names = [a for a in (adapter_names or self.active_adapters) if a in self.peqa_scales]
        if not names:
            return
        if self.merged or len(names) > 1:
            raise QftError(f"PEQA merges exactly one adapter into a base that has none merged (asked: {names}, "
                           f"merged: {self.merged_adapters})", "unmerge first, then merge a single adapter")
        new = self.peqa_scales[names[0]].detach().clone()
        if safe_merge and not torch.isfinite(new).all():
            raise QftError(f"adapter {names[0]!r} has non-finite scales", "retrain with a lower learning rate")
        base = self.get_base_layer()
        self._scales_before_merge = base.scales
        base.scales = new
        self.merged_adapters.append(names[0])

    def unmerge(self) -> None:
        if self.merged:
            self.get_base_layer().scales = self._scales_before_merge
            self._scales_before_merge = None
            self.merged_adapters.clear()

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        base = self.get_base_layer()
        if self.disable_adapters:
            self.unmerge()
            return base(x)
        name = None if self.merged else self._adapter()
        if name is None:
            return base(x)
        return ScaleOnlyLinear.apply(x, self.peqa_scales[name], base.packed, base.zeros, base.bias, base._meta())

    def __repr__(self) -> str:
        return "peqa." + super().__repr__()
