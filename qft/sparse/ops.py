"""A linear layer with a sparse weight delta, ``y = x (W + D)^T + b``, in forward and backward.

For a weight delta ``D`` (``out x in``) held as sorted flat ``indices`` and ``values``:

- forward: the frozen weight (dequantized first for a 4-bit base) plus ``scatter(values)``, one transient
  ``out x in`` tensor in the compute dtype, then one dense matmul: the cost of the base layer's own forward
  (bitsandbytes dequantizes the same way). Adding fp32 deltas into a bf16 copy is mixed precision as usual:
  the deltas themselves stay float32, like master weights;
- backward: ``grad_x = grad_out @ (W + D)`` (the weight rebuilt, not saved) and ``grad_values``, the weight
  gradient read at the active entries only (an SDDMM). The SDDMM runs in row blocks: each block's
  ``grad_out[:, rows].T @ x`` is one matmul of at most ``_BLOCK`` elements, read at the active entries of
  those rows and dropped, so the dense ``out x in`` gradient never exists whole.

The dense ``grad_W`` is formed whole only when a caller asks for it (``probe``, used by RigL-style regrowth
for a few steps per cycle), one layer at a time. The ``*_reference`` functions form dense matrices and are the
slow, obviously-right versions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F

_BLOCK = 1 << 24  # elements of one (rows x in) block of the weight gradient in the SDDMM: 32 MiB in bf16


def scatter_dense(values: torch.Tensor, indices: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """The dense ``out x in`` delta (reference paths and merging)."""
    return torch.zeros(shape[0] * shape[1], dtype=values.dtype, device=values.device).index_put_(
        (indices,), values).view(shape)


def sddmm_reference(grad_out: torch.Tensor, x: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """``(grad_out.T @ x).flatten()[indices]``: the dense weight gradient, read at the active entries."""
    g2, x2 = grad_out.reshape(-1, grad_out.shape[-1]), x.reshape(-1, x.shape[-1])
    return (g2.T.float() @ x2.float()).reshape(-1)[indices]


def sddmm(grad_out: torch.Tensor, x: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """The entries of ``sddmm_reference`` (float32), one block of rows of the weight gradient at a time.

    Computes in the inputs' dtype (bf16 on GPU: one tensor-core matmul per block); ``indices`` must be sorted.
    """
    g2, x2 = grad_out.reshape(-1, grad_out.shape[-1]), x.reshape(-1, x.shape[-1])
    dtype = torch.promote_types(g2.dtype, x2.dtype)
    g2, x2 = g2.to(dtype), x2.to(dtype)
    n_out, n_in = g2.shape[1], x2.shape[1]
    rows = max(1, _BLOCK // n_in)
    edges = torch.arange(0, n_out + rows, rows, device=indices.device).clamp_max(n_out)
    cuts = torch.searchsorted(indices, edges * n_in).tolist()  # the active entries of each block of rows
    out = torch.empty(indices.numel(), dtype=torch.float32, device=indices.device)
    with torch.autocast(x.device.type, enabled=False):
        for b, (s, e) in enumerate(zip(cuts[:-1], cuts[1:])):
            if s == e:
                continue
            r0 = b * rows
            block = g2[:, r0:r0 + rows].T @ x2  # (rows, in)
            out[s:e] = block.reshape(-1)[indices[s:e] - r0 * n_in].float()
    return out


@dataclass
class DeltaSpec:
    """What ``SparseDeltaLinear`` needs besides its differentiable inputs.

    ``weight`` returns the frozen base weight as a dense tensor (``fresh``: a new tensor the op may modify,
    such as a dequantized 4-bit weight); ``indices`` and ``probes`` are per delta, in the order of the values.
    """

    weight: Callable[[], torch.Tensor]
    fresh: bool
    bias: Optional[torch.Tensor]
    indices: Sequence[torch.Tensor]
    probes: Sequence[Optional[Callable]]
    out_in_input_dtype: bool  # bitsandbytes layers return the input's dtype; float Linear the compute dtype
    compute_dtype: Optional[torch.dtype] = None  # outside autocast (default: the input's dtype)

    def merged(self, values: Sequence[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        w = self.weight().detach()
        w = w.to(dtype, copy=not self.fresh)
        flat = w.view(-1)
        for idx, v in zip(self.indices, values):
            flat.index_add_(0, idx, v.detach().to(dtype))
        return w


def _compute_dtype(x: torch.Tensor, default: Optional[torch.dtype]) -> torch.dtype:
    kind = x.device.type
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else (default or x.dtype)


class SparseDeltaLinear(torch.autograd.Function):
    """``x (W + sum_k D_k)^T + b`` with gradients for ``x`` and each delta's active values only."""

    @staticmethod
    def forward(ctx, x, spec: DeltaSpec, *values):
        dtype = _compute_dtype(x, spec.compute_dtype)
        ctx.spec, ctx.dtype = spec, dtype
        ctx.save_for_backward(x, *values)
        with torch.autocast(x.device.type, enabled=False):
            w = spec.merged(values, dtype)
            bias = spec.bias.to(dtype) if spec.bias is not None else None
            y = F.linear(x.to(dtype), w, bias)
        return y.to(x.dtype) if spec.out_in_input_dtype else y

    @staticmethod
    def backward(ctx, grad_out):
        x, *values = ctx.saved_tensors
        spec, dtype = ctx.spec, ctx.dtype
        grad_x = None
        with torch.autocast(x.device.type, enabled=False):
            g = grad_out.to(dtype)
            if ctx.needs_input_grad[0]:
                grad_x = (g @ spec.merged(values, dtype)).to(x.dtype)
            grads = []
            dense = None
            for k, (idx, v) in enumerate(zip(spec.indices, values)):
                if not ctx.needs_input_grad[2 + k]:
                    grads.append(None)
                    continue
                probe = spec.probes[k]
                if probe is not None:
                    if dense is None:  # (out, in), transient: one matmul in the compute dtype (bf16 on GPU:
                        # a float32 matmul there runs at a tenth of the speed), handed over as float32
                        dense = (g.reshape(-1, g.shape[-1]).T @ x.reshape(-1, x.shape[-1]).to(dtype)).float()
                    probe(dense)
                    grads.append(dense.reshape(-1)[idx].to(v.dtype))
                else:
                    grads.append(sddmm(g, x.to(dtype), idx).to(v.dtype))
        return (grad_x, None, *grads)


def sparse_delta_linear(x: torch.Tensor, weight: Callable[[], torch.Tensor], bias, values: Sequence[torch.Tensor],
                        indices: Sequence[torch.Tensor], probes: Sequence[Optional[Callable]] | None = None,
                        fresh: bool = False, out_in_input_dtype: bool = False,
                        compute_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """``x (W + D)^T + b`` for one or more sparse deltas over the frozen weight ``weight()``."""
    spec = DeltaSpec(weight, fresh, bias, tuple(indices), tuple(probes or [None] * len(values)), out_in_input_dtype,
                     compute_dtype)
    return SparseDeltaLinear.apply(x, spec, *values)


def sparse_delta_linear_reference(x, weight: torch.Tensor, bias, values, indices, shape) -> torch.Tensor:
    """Slow reference of ``sparse_delta_linear``: the dense deltas added with autograd, float32."""
    w = weight.detach().float()
    for v, idx in zip(values, indices):
        w = w + scatter_dense(v.float(), idx, shape)
    return F.linear(x.float(), w, None if bias is None else bias.float())
