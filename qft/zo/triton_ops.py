"""Fused ZO kernels (Triton, CUDA): θ·keep + scale·z in one pass, z drawn in-register from (seed, offset).

The torch path (:mod:`qft.zo.spsa`) materializes z with ``torch.randn`` and then adds it: three memory
passes per tensor and a full-size temporary. Here each program draws its block of z with Philox
(``tl.randn(seed, offset)``), so a perturbed copy costs one read and one write of θ, and an update one
read-modify-write, with no temporary. z is a deterministic function of (seed, element offset): regenerating
it for the update or after a resume gives the same numbers.

The kernels draw a different z than the torch path (another generator), so a tensor must always go through
the same path; :func:`usable` decides it from the tensor alone (CUDA, floating point, no mask), so the forward
perturbations and the update of one step always agree.
"""

from __future__ import annotations

import os

import torch

try:  # Triton ships with CUDA builds of torch; CPU-only installs have none
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised on CPU CI
    triton = None

BLOCK = 4096


def usable(p: torch.Tensor, mask_fn=None) -> bool:
    return (triton is not None and p.is_cuda and p.is_contiguous()
            and p.dtype in (torch.float32, torch.bfloat16, torch.float16) and mask_fn is None and os.environ.get("QFT_ZO_TRITON", "1") != "0")


def _seed32(seed: int) -> int:
    return int(seed % (2**31 - 1))


if triton is not None:

    @triton.jit
    def _axpby_randn(src, dst, n, seed, keep, scale, BLOCK_SIZE: tl.constexpr):
        pid = tl.program_id(0)
        offs = pid * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
        m = offs < n
        x = tl.load(src + offs, mask=m, other=0.0).to(tl.float32)
        z = tl.randn(seed, offs)
        tl.store(dst + offs, (x * keep + scale * z).to(dst.dtype.element_ty), mask=m)


def _launch(src: torch.Tensor, dst: torch.Tensor, seed: int, keep: float, scale: float) -> None:
    n = src.numel()
    if n >= 2**31:
        raise ValueError("tensors of 2**31 elements or more are not supported by the fused ZO kernel")
    grid = (triton.cdiv(n, BLOCK),)
    _axpby_randn[grid](src, dst, n, _seed32(seed), float(keep), float(scale), BLOCK_SIZE=BLOCK)


def perturbed_copy(p: torch.Tensor, seed: int, scale: float) -> torch.Tensor:
    """A new tensor θ + scale·z (one read of θ, one write)."""
    src = p.detach().contiguous()
    out = torch.empty_like(src)
    _launch(src, out, seed, 1.0, scale)
    return out


def axpby_(p: torch.Tensor, seed: int, scale: float, keep: float = 1.0) -> None:
    """In place: θ ← keep·θ + scale·z (the ZO-SGD update with decoupled weight decay folded into ``keep``)."""
    if not p.is_contiguous():
        raise ValueError("the fused ZO update needs contiguous parameters")
    _launch(p.detach(), p.detach(), seed, keep, scale)


def direction(p: torch.Tensor, seed: int) -> torch.Tensor:
    """z itself (for tests): the kernel applied to zeros."""
    z = torch.zeros_like(p, dtype=torch.float32)
    _launch(z, z, seed, 0.0, 1.0)
    return z
