"""A linear layer's sparse delta in forward and backward, without forming the dense ``out x in`` delta.

For a weight delta ``D`` (``out x in``) held as sorted flat ``indices`` and ``values``:

- forward: ``x @ D.T`` (a sparse-dense product, CSR since sorted flat indices are already in row order);
- backward: ``grad_x = grad_out @ D`` and ``grad_values = (grad_out.T @ x).flatten()[indices]`` (an SDDMM),
  computed for the active entries only, by gathering rows of ``grad_out.T`` and ``x.T`` in chunks.

Memory: besides the inputs, the fast path holds the CSR copy of the delta (``k`` values + ``k`` columns +
``out + 1`` row pointers) and one chunk of ``_CHUNK`` gathered products; the dense ``grad_W`` is formed only
when a caller asks for it (``probe``, used by RigL-style regrowth for a few steps per cycle), one layer at a
time. The ``*_reference`` functions form dense matrices and are the slow, obviously-right versions.
"""

from __future__ import annotations

import warnings
from typing import Callable

import torch

_CHUNK = 1 << 22  # elements of one gathered (chunk x tokens) block in the SDDMM: 16 MiB in float32


def scatter_dense(values: torch.Tensor, indices: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """The dense ``out x in`` delta (reference paths and merging)."""
    return torch.zeros(shape[0] * shape[1], dtype=values.dtype, device=values.device).index_put_(
        (indices,), values).view(shape)


def _csr(values: torch.Tensor, indices: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    rows, cols = indices // shape[1], indices % shape[1]
    crow = torch.searchsorted(rows, torch.arange(shape[0] + 1, device=indices.device))
    with warnings.catch_warnings():  # "sparse CSR support is in beta"
        warnings.simplefilter("ignore")
        return torch.sparse_csr_tensor(crow, cols, values, shape)


def delta_matmul_reference(x: torch.Tensor, values, indices, shape) -> torch.Tensor:
    """``x @ D.T``: (..., in) -> (..., out), through the dense delta."""
    return x @ scatter_dense(values.to(x.dtype), indices, shape).T


def delta_matmul(x: torch.Tensor, values, indices, shape) -> torch.Tensor:
    """``x @ D.T`` through a CSR product; computes in ``values.dtype`` (CPU sparse kernels lack bf16, so
    autocast, which the Trainer turns on for bf16 runs, is switched off around the product)."""
    x2 = x.reshape(-1, shape[1]).to(values.dtype)  # (tokens, in)
    with torch.autocast(x.device.type, enabled=False):
        y = (_csr(values, indices, shape) @ x2.T).T  # (tokens, out)
    return y.to(x.dtype).reshape(*x.shape[:-1], shape[0])


def _delta_t_matmul(g2: torch.Tensor, values, indices, shape) -> torch.Tensor:
    """``g @ D``: (tokens, out) -> (tokens, in)."""
    with torch.autocast(g2.device.type, enabled=False):
        return (_csr(values, indices, shape).t() @ g2.to(values.dtype).T).T


def sddmm_reference(grad_out: torch.Tensor, x: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """``(grad_out.T @ x).flatten()[indices]``: the dense weight gradient, read at the active entries."""
    g2, x2 = grad_out.reshape(-1, grad_out.shape[-1]), x.reshape(-1, x.shape[-1])
    return (g2.T.float() @ x2.float()).reshape(-1)[indices]


def sddmm(grad_out: torch.Tensor, x: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """The same entries as ``sddmm_reference`` without the dense ``out x in`` gradient (float32 result)."""
    g_t = grad_out.reshape(-1, grad_out.shape[-1]).T.float().contiguous()  # (out, tokens)
    x_t = x.reshape(-1, x.shape[-1]).T.float().contiguous()  # (in, tokens)
    n_in = x_t.shape[0]
    rows, cols = indices // n_in, indices % n_in
    out = torch.empty(indices.numel(), dtype=torch.float32, device=indices.device)
    step = max(1, _CHUNK // max(1, g_t.shape[1]))
    for s in range(0, indices.numel(), step):
        out[s:s + step] = (g_t[rows[s:s + step]] * x_t[cols[s:s + step]]).sum(1)
    return out


class SparseDeltaMatmul(torch.autograd.Function):
    """``x @ D.T`` with gradients for ``x`` and for the active ``values`` only.

    ``probe``, when given, receives the dense ``grad_W`` (out x in, float32) of this backward: the regrowth
    criterion of RigL needs gradients of inactive weights. It is the only place a dense gradient is formed.
    """

    @staticmethod
    def forward(ctx, x, values, indices, shape, probe: Callable | None = None):
        ctx.save_for_backward(x, values, indices)
        ctx.shape, ctx.probe = shape, probe
        return delta_matmul(x, values, indices, shape)

    @staticmethod
    def backward(ctx, grad_out):
        x, values, indices = ctx.saved_tensors
        shape = ctx.shape
        grad_x = grad_values = None
        if ctx.needs_input_grad[0]:
            g2 = grad_out.reshape(-1, shape[0])
            grad_x = _delta_t_matmul(g2, values, indices, shape).to(x.dtype).reshape(x.shape)
        if ctx.probe is not None:
            g2, x2 = grad_out.reshape(-1, shape[0]), x.reshape(-1, shape[1])
            with torch.autocast(x.device.type, enabled=False):
                dense = g2.T.float() @ x2.float()  # (out, in), transient
            ctx.probe(dense)
            if ctx.needs_input_grad[1]:
                grad_values = dense.reshape(-1)[indices].to(values.dtype)
        elif ctx.needs_input_grad[1]:
            grad_values = sddmm(grad_out, x, indices).to(values.dtype)
        return grad_x, grad_values, None, None, None


def sparse_delta_matmul(x, values, indices, shape, probe=None) -> torch.Tensor:
    return SparseDeltaMatmul.apply(x, values, indices, tuple(shape), probe)
