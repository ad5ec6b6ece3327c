"""Fused ZO kernels (Triton, CUDA): θ·keep + scale·z in one pass, z drawn in-register from (seed, offset).

The torch path (:mod:`qft.zo.spsa`) materializes z with ``torch.randn`` and then adds it: three memory
passes per tensor and a full-size temporary. Here each program draws its block of z with Philox, so a
perturbed copy costs one read and one write of θ, and an update one read-modify-write, with no temporary.

Two things keep the step cheap on a GPU:

* **One launch for many tensors.** A launch takes a table of (source, destination, seed, decay) per tensor
  (sources and destinations as offsets from the first source: see ``_entry``)
  and a cached map from program to (tensor, block), so the update of every tuned tensor is one launch, and
  the perturbed copies of one decoder layer's weights another - not one launch (and one Python round trip)
  per tensor, which is what bounds the step of a small model.
* **Four normals per Philox draw.** ``randn4x`` turns one Philox round (four 32-bit words) into four
  normals, where ``randn`` keeps one. Element ``i`` of a tensor takes normal ``k`` of the draw at counter
  ``(i // 4Q)·Q + i % Q`` with ``k = (i % 4Q) // Q`` and ``Q = QUARTER``: every block of ``4Q`` elements is
  four contiguous quarters sharing ``Q`` draws.
* **128 signs per draw** for Rademacher directions (``dist="rademacher"``): within a block, element
  ``k·Q + 32c + b`` takes bit ``b`` of word ``k`` of the draw at counter ``(i // 4Q)·32 + c``, so a block
  needs 32 draws, and no logarithms or square roots.

z is a deterministic function of (seed, element index) alone, not of the launch: regenerating it for the
update, in another grouping, or after a resume gives the same numbers. The kernels draw a different z than
the torch path (another generator), so a tensor must always go through the same path; :func:`usable`
decides it from the tensor alone (CUDA, floating point, contiguous, no mask or one the kernels compare
in-register), so the forward perturbations and the update of one step always agree.

The kernels also run under Triton's CPU interpreter (``TRITON_INTERPRET=1``) on CPU tensors, which is how
``tests/test_zo_triton_interpret.py`` checks them without a GPU.
"""

from __future__ import annotations

import contextlib
import os
from typing import Sequence

import torch

try:  # Triton ships with CUDA builds of torch; CPU-only installs have none
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised on CPU CI
    triton = None

QUARTER = 1024  # normals per quarter block (= 32 words x 32 sign bits); a program handles 4 * QUARTER elements
BLOCK = 4 * QUARTER
MAX_NUMEL = 2**31 - BLOCK  # int32 element offsets (and the Philox counter) within one tensor

_FLOATS = (torch.float32, torch.bfloat16, torch.float16)


def usable(p: torch.Tensor, mask_fn=None) -> bool:
    """Whether the fused kernels take ``p`` (CUDA, a float dtype, contiguous): unmasked, or under a mask they compare
    in-register (``mask_fn.in_kernel``: :class:`qft.zo.mask.MagnitudeMask`)."""
    return (triton is not None and p.is_cuda and p.is_contiguous() and p.dtype in _FLOATS
            and (mask_fn is None or getattr(mask_fn, "in_kernel", False))
            and p.numel() < MAX_NUMEL and os.environ.get("QFT_ZO_TRITON", "1") != "0")


def _interpreted() -> bool:
    """Whether Triton's CPU interpreter runs the kernels: its tile product reads bfloat16 tiles as integers, so
    :func:`addmm_small_` multiplies them as float32 there (the same products; only the summation order may differ)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _seed32(seed: int) -> int:
    return int(seed % (2**31 - 1))


if triton is not None:

    @triton.jit
    def _entry(base, table, i, ALIGN: tl.constexpr):
        """``base`` moved by entry ``i`` of ``table`` (an offset in elements): a tensor of a one-launch kernel.

        The table holds offsets from a pointer argument, not addresses. Triton knows an argument's alignment (it
        specializes on it) and, through the hint, that the offsets are multiples of ``ALIGN`` elements, so it
        moves whole 16-byte vectors; a pointer loaded from a table it must treat as unaligned, element by
        element (and ``tl.multiple_of`` on a loaded address does not change that). rank1's update of a
        Llama-3-8B step ran at 2.2 TB/s that way, 3.75 with offsets (benchmarks/addr_multi_probe.py, H200)."""
        offset = tl.load(table + i)
        if ALIGN > 1:
            offset = tl.multiple_of(offset, ALIGN)
        return base + offset

    @triton.jit
    def _axpy_piece(src, dst, offs, n, keep, scale, z, thr, MASKED: tl.constexpr):
        """dst = src·keep + scale·z; ``MASKED``: only where |src| <= thr (src elsewhere)."""
        m = offs < n
        x = tl.load(src + offs, mask=m, other=0.0).to(tl.float32)
        y = x * keep + scale * z
        if MASKED:
            y = tl.where(tl.abs(x) <= thr, y, x)
        tl.store(dst + offs, y.to(dst.dtype.element_ty), mask=m)

    @triton.jit
    def _sign_piece(src, dst, start, n, keep, scale, word, thr, MASKED: tl.constexpr):
        """32 x 32 elements from 32 words: element start + 32c + b gets bit b of word c as ±1."""
        c = tl.arange(0, 32)
        b = tl.arange(0, 32)
        bits = (word[:, None] >> b[None, :].to(tl.uint32)) & 1
        z = bits.to(tl.float32) * 2.0 - 1.0
        _axpy_piece(src, dst, start + c[:, None] * 32 + b[None, :], n, keep, scale, z, thr, MASKED)

    @triton.jit
    def _axpby_randn_multi(base, table, n_tensors, numels, block_tensor, block_start, keep, scale,
                           Q: tl.constexpr, RADEMACHER: tl.constexpr, ALIGN: tl.constexpr, MASKED: tl.constexpr):
        """dst[t] = src[t]·(keep if decay[t] else 1) + scale·z(seed[t]) over one block of 4Q elements; ``MASKED``:
        only where |src[t]| <= threshold[t] (float bits in the table), src[t] elsewhere."""
        pid = tl.program_id(0)
        t = tl.load(block_tensor + pid)
        start = tl.load(block_start + pid)  # int32, a multiple of 4Q
        n = tl.load(numels + t)
        src = _entry(base, table, t, ALIGN)
        dst = _entry(base, table, n_tensors + t, ALIGN)
        seed = tl.load(table + 2 * n_tensors + t)
        k = tl.where(tl.load(table + 3 * n_tensors + t) != 0, keep, 1.0)
        thr = 0.0
        if MASKED:
            thr = tl.load(table + 4 * n_tensors + t).to(tl.int32).to(tl.float32, bitcast=True)
        if RADEMACHER:  # Q = 32 x 32: four quarters of 32 words x 32 bits
            w0, w1, w2, w3 = tl.randint4x(seed, start // 128 + tl.arange(0, 32))
            _sign_piece(src, dst, start, n, k, scale, w0, thr, MASKED)
            _sign_piece(src, dst, start + Q, n, k, scale, w1, thr, MASKED)
            _sign_piece(src, dst, start + 2 * Q, n, k, scale, w2, thr, MASKED)
            _sign_piece(src, dst, start + 3 * Q, n, k, scale, w3, thr, MASKED)
        else:
            r = tl.arange(0, Q)
            z0, z1, z2, z3 = tl.randn4x(seed, start // 4 + r)
            offs = start + r
            _axpy_piece(src, dst, offs, n, k, scale, z0, thr, MASKED)
            _axpy_piece(src, dst, offs + Q, n, k, scale, z1, thr, MASKED)
            _axpy_piece(src, dst, offs + 2 * Q, n, k, scale, z2, thr, MASKED)
            _axpy_piece(src, dst, offs + 3 * Q, n, k, scale, z3, thr, MASKED)


    @triton.jit
    def _addr_tile(out, a, b, m, n, beta, alpha, flip, BM: tl.constexpr, BN: tl.constexpr):
        """out[i, j] = beta·out[i, j] + alpha·a[i]·b[j] over tile (program_id(0), program_id(1)) of BM x BN
        (float32 arithmetic), with −alpha on the rows i >= ``flip`` (a paired forward's second half)."""
        rm = tl.program_id(0) * BM + tl.arange(0, BM)
        rn = tl.program_id(1) * BN + tl.arange(0, BN)
        av = tl.load(a + rm, mask=rm < m, other=0.0).to(tl.float32) * tl.where(rm < flip, alpha, -alpha)
        bv = tl.load(b + rn, mask=rn < n, other=0.0).to(tl.float32)
        offs = rm[:, None].to(tl.int64) * n + rn[None, :]
        inside = (rm[:, None] < m) & (rn[None, :] < n)
        x = tl.load(out + offs, mask=inside, other=0.0).to(tl.float32)
        tl.store(out + offs, (beta * x + av[:, None] * bv[None, :]).to(out.dtype.element_ty), mask=inside)

    @triton.jit
    def _addr_kernel(out, a, b, m, n, beta, alpha, flip, BM: tl.constexpr, BN: tl.constexpr):
        _addr_tile(out, a, b, m, n, beta, alpha, flip, BM, BN)

    @triton.jit
    def _addmm_small_kernel(out, a, b, m, n, k, sa, sb, alpha, BM: tl.constexpr, BN: tl.constexpr,
                            BK: tl.constexpr, F32: tl.constexpr):
        """out[i, j] += alpha·Σ_c a[i, c]·b[c, j] over tile (program_id(0), program_id(1)), for k <= BK columns c
        (``a``: m x k, row stride ``sa``; ``b``: k x n, row stride ``sb``; unit column strides): one BM x BK and one
        BK x BN load, then one tile product with float32 accumulation (``F32``: operands multiplied as float32, not
        TF32 or bfloat16)."""
        rm = tl.program_id(0) * BM + tl.arange(0, BM)
        rn = tl.program_id(1) * BN + tl.arange(0, BN)
        rk = tl.arange(0, BK)
        at = tl.load(a + rm[:, None].to(tl.int64) * sa + rk[None, :], mask=(rm[:, None] < m) & (rk[None, :] < k),
                     other=0.0)
        bt = tl.load(b + rk[:, None].to(tl.int64) * sb + rn[None, :], mask=(rk[:, None] < k) & (rn[None, :] < n),
                     other=0.0)
        if F32:
            acc = tl.dot(at.to(tl.float32), bt.to(tl.float32), input_precision="ieee")
        else:
            acc = tl.dot(at, bt)
        offs = rm[:, None].to(tl.int64) * n + rn[None, :]
        inside = (rm[:, None] < m) & (rn[None, :] < n)
        x = tl.load(out + offs, mask=inside, other=0.0).to(tl.float32)
        tl.store(out + offs, (x + alpha * acc).to(out.dtype.element_ty), mask=inside)

    @triton.jit
    def _addr_multi_kernel(base, table, n_mats, m, n, alpha, BM: tl.constexpr, BN: tl.constexpr,
                           ALIGN: tl.constexpr):
        """:func:`_addr_tile` of matrix program_id(2) of many of one shape: its out, a, b pointers and its beta
        (float bits) from ``table``."""
        t = tl.program_id(2)
        out = _entry(base, table, t, ALIGN)
        a = _entry(base, table, n_mats + t, ALIGN)
        b = _entry(base, table, 2 * n_mats + t, ALIGN)
        beta = tl.load(table + 3 * n_mats + t).to(tl.int32).to(tl.float32, bitcast=True)
        _addr_tile(out, a, b, m, n, beta, alpha, m, BM, BN)

_BLOCK_MAPS: dict[tuple, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}


def _block_map(numels: tuple[int, ...], device: torch.device):
    """(numels, block → tensor, block → first element), on ``device``; cached per list of sizes."""
    key = (numels, str(device))
    hit = _BLOCK_MAPS.get(key)
    if hit is None:
        counts = torch.tensor([-(-n // BLOCK) for n in numels], dtype=torch.int64)
        tensor_of = torch.repeat_interleave(torch.arange(len(numels), dtype=torch.int32), counts)
        first = torch.cumsum(counts, 0) - counts  # each tensor's first block
        start = ((torch.arange(int(counts.sum())) - torch.repeat_interleave(first, counts)) * BLOCK).to(torch.int32)
        if len(_BLOCK_MAPS) > 512:  # the sets of sizes seen are few (one per layer kind); never grow unbounded
            _BLOCK_MAPS.clear()
        hit = _BLOCK_MAPS[key] = (torch.tensor(numels, dtype=torch.int32).to(device), tensor_of.to(device),
                                  start.to(device))
    return hit


def _offsets(base: torch.Tensor, tensors: Sequence[torch.Tensor]) -> tuple[list[int], int]:
    """(each tensor's start as an offset in elements from ``base``'s, the largest ALIGN those offsets allow: 16
    bytes' worth of elements when every one is a multiple of 16 bytes, as separate allocations are, else 1).
    The tensors share ``base``'s dtype and device."""
    size = base.element_size()
    start = base.data_ptr()
    gaps = [t.data_ptr() - start for t in tensors]
    align = 16 // size if size <= 16 and all(g % 16 == 0 for g in gaps) else 1
    return [g // size for g in gaps], align


def _device_table(values: list[int], device: torch.device) -> torch.Tensor:
    """int64 ``values`` on ``device`` for a kernel to read (offsets, seeds, flags)."""
    table = torch.tensor(values, dtype=torch.int64)
    if device.type == "cuda":  # a copy from pageable memory first waits for the stream to drain: the CPU could
        table = table.pin_memory()  # not run ahead of the GPU, which bounds a small model's step
    return table.to(device, non_blocking=True)


def _float_bits(values: Sequence[float]) -> list[int]:
    """float32 ``values`` as the int32 bit patterns a kernel reads back from an int64 table."""
    return torch.tensor([float(v) for v in values], dtype=torch.float32).view(torch.int32).tolist()


def _launch(srcs: Sequence[torch.Tensor], dsts: Sequence[torch.Tensor], seeds: Sequence[int], scale: float,
            keep: float = 1.0, decay: Sequence[bool] | None = None, dist: str = "gaussian",
            thresholds: Sequence[float] | None = None) -> None:
    """One launch over tensors of one dtype and device: ``dsts[t] = srcs[t]·keep_t + scale·z(seeds[t])``, only where
    ``|srcs[t]| <= thresholds[t]`` when thresholds are given."""
    if not srcs:
        return
    numels = tuple(s.numel() for s in srcs)
    if max(numels) >= MAX_NUMEL:
        raise ValueError("tensors of 2**31 elements or more are not supported by the fused ZO kernel")
    device = srcs[0].device
    n = len(srcs)
    flags = [1 if d else 0 for d in decay] if decay is not None else [0] * n
    base = srcs[0]
    offsets, align = _offsets(base, list(srcs) + list(dsts))
    table = _device_table(offsets + [_seed32(s) for s in seeds] + flags
                          + (_float_bits(thresholds) if thresholds is not None else []), device)
    sizes, tensor_of, start = _block_map(numels, device)
    with _on(device):  # the launch goes to the current device: make it the tensors' one (layers spread over GPUs)
        _axpby_randn_multi[(tensor_of.numel(),)](base, table, n, sizes, tensor_of, start, float(keep), float(scale),
                                                 Q=QUARTER, RADEMACHER=dist == "rademacher", ALIGN=align,
                                                 MASKED=thresholds is not None)


def _on(device: torch.device):
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _by_kind(tensors: Sequence[torch.Tensor]) -> dict[tuple, list[int]]:
    groups: dict[tuple, list[int]] = {}
    for i, t in enumerate(tensors):
        groups.setdefault((t.device, t.dtype), []).append(i)
    return groups


def perturbed_copies(tensors: Sequence[torch.Tensor], seeds: Sequence[int], scale: float,
                     dist: str = "gaussian", thresholds: Sequence[float] | None = None) -> list[torch.Tensor]:
    """New tensors ``θ_t + scale·z(seed_t)``, one launch per dtype; each group's copies share one buffer. With
    ``thresholds``, z only where ``|θ_t| <= thresholds[t]`` (:class:`qft.zo.mask.MagnitudeMask`)."""
    out: list[torch.Tensor | None] = [None] * len(tensors)
    for (device, dtype), idx in _by_kind(tensors).items():
        srcs = [tensors[i].detach() for i in idx]
        buf = torch.empty(sum(s.numel() for s in srcs), dtype=dtype, device=device)
        views, at = [], 0
        for s in srcs:
            views.append(buf[at:at + s.numel()].view(s.shape))
            at += s.numel()
        _launch(srcs, views, [seeds[i] for i in idx], scale, dist=dist,
                thresholds=None if thresholds is None else [thresholds[i] for i in idx])
        for i, v in zip(idx, views):
            out[i] = v
    return out


def axpby_multi_(tensors: Sequence[torch.Tensor], seeds: Sequence[int], scale: float, keep: float = 1.0,
                 decay: Sequence[bool] | None = None, dist: str = "gaussian",
                 thresholds: Sequence[float] | None = None) -> None:
    """In place: ``θ_t ← keep_t·θ_t + scale·z(seed_t)`` with ``keep_t = keep`` where ``decay[t]``, else 1
    (the ZO-SGD update with decoupled weight decay folded in), one launch per dtype; with ``thresholds``, only
    the entries with ``|θ_t| <= thresholds[t]`` before the update."""
    if any(not t.is_contiguous() for t in tensors):
        raise ValueError("the fused ZO update needs contiguous parameters")
    for idx in _by_kind(tensors).values():
        ts = [tensors[i].detach() for i in idx]
        _launch(ts, ts, [seeds[i] for i in idx], scale, keep, None if decay is None else [decay[i] for i in idx], dist,
                None if thresholds is None else [thresholds[i] for i in idx])


def perturbed_copy(p: torch.Tensor, seed: int, scale: float, dist: str = "gaussian",
                   thresholds: Sequence[float] | None = None) -> torch.Tensor:
    """A new tensor θ + scale·z (one read of θ, one write)."""
    return perturbed_copies([p.detach().contiguous()], [seed], scale, dist, thresholds)[0]


def axpby_(p: torch.Tensor, seed: int, scale: float, keep: float = 1.0, dist: str = "gaussian") -> None:
    """In place: θ ← keep·θ + scale·z."""
    axpby_multi_([p], [seed], scale, keep, [True], dist)


def direction(p: torch.Tensor, seed: int, dist: str = "gaussian") -> torch.Tensor:
    """z itself (for tests): the kernel applied to zeros."""
    z = torch.zeros_like(p, dtype=torch.float32)
    axpby_(z, seed, 1.0, keep=0.0, dist=dist)
    return z


ADDR_BM, ADDR_BN = 16, 256  # a tile of 4,096 elements: rows of 256 contiguous elements, vectorized loads and stores
# below this many elements torch's addr_ stays: it takes microseconds on the GPU either way, and a Triton launch
# costs more CPU time than torch's, which is what bounds a small model's step
ADDR_MIN_NUMEL = 2**22


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)  # Triton's cdiv is a constexpr function now: microseconds a call from Python, in every hook


def addr_(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, alpha: float, beta: float = 1.0,
          flip: int | None = None) -> None:
    """In place: ``out ← beta·out + alpha·a ⊗ b`` for a contiguous matrix ``out`` (``torch.Tensor.addr_``); the rows
    from ``flip`` on take ``−alpha`` (a paired ZO forward's second half, whose term has the other sign).

    The rank-one term of every linear layer's output (forward hooks) and of every weight's update
    (:mod:`qft.zo.lowrank`) under ``dist="rank1"``. torch's ``addr_`` reads its two broadcast vectors through
    a generic strided loop: at the Llama-3-8B shape its 678 calls a step took 45 ms on an H200, about 1.2 TB/s
    (benchmarks/results/session6/profile-8b.json); this kernel reads and writes ``out`` in 16 x 256 tiles."""
    m, n = out.shape
    grid = (_cdiv(m, ADDR_BM), _cdiv(n, ADDR_BN))
    with _on(out.device):
        _addr_kernel[grid](out, a.contiguous(), b.contiguous(), m, n, float(beta), float(alpha),
                           m if flip is None else flip, BM=ADDR_BM, BN=ADDR_BN)


ADDMM_SMALL_MAX_K = 16  # columns up to which addmm_small_ takes a product: past it a matrix product's tiles pay


def addmm_small_(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, alpha: float = 1.0) -> None:
    """In place: ``out ← out + alpha·a @ b`` for a contiguous matrix ``out`` and a few columns (``a``: m x k,
    ``b``: k x n, k <= ADDMM_SMALL_MAX_K, each with unit column stride or copied to it): the rank-k term of several
    rank1 directions and of deferred updates in the forward hooks' outputs
    (:func:`qft.zo.lowrank.perturb_output_multi`). :func:`addr_`'s tiles, each with one tile product of inner
    dimension 16: one read and one write of ``out``, where torch's ``addmm_`` runs a matrix product's kernel.
    ``a`` and ``b`` share ``out``'s dtype (float32 ones are multiplied as float32, not TF32)."""
    m, n = out.shape
    a = a if a.stride(-1) == 1 else a.contiguous()
    b = b if b.stride(-1) == 1 else b.contiguous()
    grid = (_cdiv(m, ADDR_BM), _cdiv(n, ADDR_BN))
    with _on(out.device):
        _addmm_small_kernel[grid](out, a, b, m, n, a.shape[1], a.stride(0), b.stride(0), float(alpha),
                                  BM=ADDR_BM, BN=ADDR_BN, BK=ADDMM_SMALL_MAX_K,
                                  F32=a.dtype == torch.float32 or _interpreted())


class AddrGroup:
    """Matrices of one shape, dtype and device that :func:`addr_multi_` updates in one launch: their positions
    ``idx`` in the list, and their offsets from the first one's storage (fixed while they live where they are). It
    keeps no tensor."""

    def __init__(self, outs: Sequence[torch.Tensor], idx: list[int]):
        base = outs[idx[0]]
        self.idx, self.device, self.dtype, (self.m, self.n) = idx, base.device, base.dtype, base.shape
        self.offsets, self.align = _offsets(base, [outs[i] for i in idx])


def addr_multi_plan(outs: Sequence[torch.Tensor]) -> list[AddrGroup]:
    """:func:`addr_multi_`'s launches for the matrices ``outs``, made once for a run's updates (the same matrices in
    the same storage each time)."""
    groups: dict[tuple, list[int]] = {}
    for i, o in enumerate(outs):
        if not o.is_contiguous():
            raise ValueError("addr_multi_ needs contiguous matrices")
        groups.setdefault((o.device, o.dtype, tuple(o.shape)), []).append(i)
    return [AddrGroup(outs, idx) for idx in groups.values()]


def addr_multi_(outs: Sequence[torch.Tensor], a: Sequence[torch.Tensor], b: Sequence[torch.Tensor], alpha: float,
                betas: Sequence[float], groups: list[AddrGroup] | None = None) -> None:
    """:func:`addr_` of many matrices, ``outs[t] ← betas[t]·outs[t] + alpha·a[t] ⊗ b[t]``: one launch per shape,
    dtype and device instead of one per matrix (rank1's update: a Llama-3-8B step updates 226 matrices of five
    shapes). Each matrix gets exactly what :func:`addr_` would give it; ``a``, ``b`` must be contiguous and of their
    matrix's dtype. ``groups``: :func:`addr_multi_plan` of ``outs``, made before; a step's launches then cost the
    factors' offsets, not the grouping."""
    for grp in addr_multi_plan(outs) if groups is None else groups:
        idx = grp.idx
        if any(a[i].dtype != grp.dtype or b[i].dtype != grp.dtype or not a[i].is_contiguous()
               or not b[i].is_contiguous() for i in idx):
            raise ValueError("addr_multi_ needs contiguous factors in their matrix's dtype")
        base = outs[idx[0]]
        factors, align = _offsets(base, [a[i] for i in idx] + [b[i] for i in idx])
        table = _device_table(grp.offsets + factors + _float_bits([betas[i] for i in idx]), grp.device)
        grid = (_cdiv(grp.m, ADDR_BM), _cdiv(grp.n, ADDR_BN), len(idx))
        with _on(grp.device):
            _addr_multi_kernel[grid](base, table, len(idx), grp.m, grp.n, float(alpha), BM=ADDR_BM, BN=ADDR_BN,
                                     ALIGN=min(align, grp.align))


def addr_usable(out: torch.Tensor) -> bool:
    """Whether :func:`addr_` takes ``out``: as :func:`usable`, for a large enough matrix whose tile grid fits a
    launch (a function of ``out``'s device, dtype and shape alone)."""
    return (usable(out) and out.dim() == 2 and out.is_contiguous() and out.numel() >= ADDR_MIN_NUMEL
            and _cdiv(out.shape[1], ADDR_BN) < 65536)
