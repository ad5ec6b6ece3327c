"""Sparse-MeZO's effective weight in one pass on the GPU (Triton): ``W`` with ``delta`` added at the selected
entries (``|W| <= threshold``), the k-th selected entry (row-major) taking ``delta[k]``.

The torch version (:meth:`SparseMezoLinear.effective_weight`) needs the running count of selected entries
over the whole matrix: ``abs``, a comparison, an int32 ``cumsum`` and a gather, each a full-size temporary,
at every layer of every forward. Here one program per row reads the row once, recomputes the mask, and
numbers its selected entries with an in-block prefix sum that starts from the row's offset; the offsets
(one integer per row: the selected entries before it) depend only on the frozen weight and the threshold,
so they are computed once per layer. The mask itself is never stored.
"""

from __future__ import annotations

import torch

from qft.zo import triton_ops

triton, tl = triton_ops.triton, (triton_ops.tl if triton_ops.triton is not None else None)
BLOCK = 1024


def usable(w: torch.Tensor, delta: torch.Tensor) -> bool:
    """Where the ZO kernels run (CUDA, a float dtype, contiguous, ``QFT_ZO_TRITON`` not 0), for a matrix."""
    return triton_ops.usable(w) and w.dim() == 2 and delta.dtype in triton_ops._FLOATS


if triton is not None:

    @triton.jit
    def _effective_weight(w_ptr, src_ptr, out_ptr, delta_ptr, row_offsets, thr_ptr, N_COLS: tl.constexpr,
                          BLOCK_SIZE: tl.constexpr):
        row = tl.program_id(0)
        base = row.to(tl.int64) * N_COLS
        thr = tl.load(thr_ptr)
        taken = tl.load(row_offsets + row)  # selected entries before this row (int64)
        for c0 in range(0, N_COLS, BLOCK_SIZE):  # N_COLS constant: one compile per layer width
            cols = c0 + tl.arange(0, BLOCK_SIZE)
            inside = cols < N_COLS
            w = tl.load(w_ptr + base + cols, mask=inside, other=0.0)
            sel = (tl.abs(w) <= thr) & inside
            k = sel.to(tl.int32)
            slot = taken + (tl.cumsum(k, 0) - k)
            d = tl.load(delta_ptr + slot, mask=sel, other=0.0).to(tl.float32)
            x = tl.load(src_ptr + base + cols, mask=inside, other=0.0)
            y = tl.where(sel, (x.to(tl.float32) + d).to(x.dtype), x)
            tl.store(out_ptr + base + cols, y, mask=inside)
            taken += tl.sum(k, 0)


def row_offsets(w: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """(rows,) int64: how many entries of the rows above each row are selected."""
    counts = (w.abs() <= threshold.to(w.dtype)).sum(dim=1)
    return torch.cumsum(counts, 0) - counts


def effective_weight(w: torch.Tensor, src: torch.Tensor, delta: torch.Tensor, threshold: torch.Tensor,
                     offsets: torch.Tensor) -> torch.Tensor:
    """``src`` with ``delta`` added where ``|w| <= threshold`` (a new tensor; ``w`` decides the mask)."""
    out = torch.empty_like(src)
    thr = threshold.to(device=w.device, dtype=w.dtype).reshape(1)
    with triton_ops._on(w.device):
        _effective_weight[(w.shape[0],)](w, src.contiguous(), out, delta, offsets, thr, N_COLS=w.shape[1],
                                         BLOCK_SIZE=BLOCK)
    return out
