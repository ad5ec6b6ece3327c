"""Integer weight quantization for PEQA (Kim et al., 2023, arXiv:2305.14152): pure functions, tensors in and out.

A weight ``W`` of shape (out, in) is split along its input dimension into groups of ``group_size`` columns
(``group_size=0``: one group per output channel, the paper's default). Each (row, group) gets an asymmetric
round-to-nearest (RTN) code of ``bits`` bits::

    W ≈ s · (q − z),   q ∈ {0, …, 2^bits − 1},   z ∈ {0, …, 2^bits − 1} (an integer, frozen),  s > 0

PEQA trains only ``s``. The integers ``q`` are stored packed: 4-bit two per byte, 2-bit four per byte and
3-bit eight per three bytes (24 bits), each value's bits least-significant first.

A ``group_size`` that does not divide ``in_features`` is allowed: the last group is shorter (the columns
are padded with zeros while statistics are computed, which never changes them because the quantization
range always contains zero, then the padding is dropped). Scales then have ``ceil(in / group_size)`` columns.

    q, scales, zeros = quantize_rtn(w, bits=3, group_size=128)
    w_hat = dequantize(q, scales, zeros, group_size=128)
    packed = pack_bits(q, 3); assert torch.equal(unpack_bits(packed, 3, q.numel()).view_as(q), q)
"""

from __future__ import annotations

import math

import torch

from qft.errors import QftError

SUPPORTED_BITS = (2, 3, 4)


def check_bits(bits: int) -> int:
    if bits not in SUPPORTED_BITS:
        raise QftError(f"PEQA supports 2, 3 or 4 integer bits, got bits={bits}", "pass --bits 2, 3 or 4")
    return bits


def check_group_size(group_size: int) -> int:
    if not isinstance(group_size, int) or isinstance(group_size, bool) or group_size < 0:
        raise QftError(f"group size must be 0 (per output channel) or a positive number of input weights, "
                       f"got {group_size!r}", "pass --group-size 0, 64 or 128")
    return group_size


def n_groups(in_features: int, group_size: int) -> int:
    """Scale columns per row: one per group; a last, shorter group when ``group_size`` doesn't divide ``in``."""
    return 1 if group_size == 0 else math.ceil(in_features / group_size)


def expand_groups(t: torch.Tensor, group_size: int, in_features: int) -> torch.Tensor:
    """(out, n_groups) -> (out, in): each group's value repeated over its columns."""
    if group_size == 0:
        return t.expand(t.shape[0], in_features)
    return t.repeat_interleave(group_size, dim=1)[:, :in_features]


def reduce_groups(t: torch.Tensor, group_size: int) -> torch.Tensor:
    """(out, in) -> (out, n_groups): the sum over each group's columns (the adjoint of ``expand_groups``)."""
    out, in_features = t.shape
    if group_size == 0:
        return t.sum(dim=1, keepdim=True)
    pad = n_groups(in_features, group_size) * group_size - in_features
    return torch.nn.functional.pad(t, (0, pad)).view(out, -1, group_size).sum(dim=2)


def quantize_rtn(w: torch.Tensor, bits: int, group_size: int, scale_dtype: torch.dtype = torch.float16):
    """Asymmetric round-to-nearest quantization, per output channel or per group of input weights.

    Returns ``q`` (out, in) uint8 in [0, 2^bits − 1], ``scales`` (out, n_groups) in ``scale_dtype`` and
    ``zeros`` (out, n_groups) uint8, with ``w ≈ scales · (q − zeros)`` groupwise. The range of every group is
    widened to contain 0 (as GPTQ's quantizer does) so that the zero point is an integer inside the code range.
    The scale is rounded to ``scale_dtype`` *before* the integers are chosen, so the stored scale is the one
    the integers were rounded against.
    """
    check_bits(bits)
    check_group_size(group_size)
    out, in_features = w.shape
    maxq = 2**bits - 1
    w32 = w.detach().float()
    gs = in_features if group_size == 0 else group_size
    ng = n_groups(in_features, group_size)
    padded = torch.nn.functional.pad(w32, (0, ng * gs - in_features)).view(out, ng, gs)  # zeros: range unchanged
    lo = padded.amin(dim=2).clamp(max=0)
    hi = padded.amax(dim=2).clamp(min=0)
    # An all-zero group would get s = 0; any positive scale represents it exactly (q = z). The floor keeps
    # fp16 scales normal numbers (fp16's smallest normal is 6.1e-5).
    tiny = torch.finfo(scale_dtype).tiny if scale_dtype in (torch.float16, torch.bfloat16) else 1e-12
    scales = ((hi - lo) / maxq).clamp(min=tiny).to(scale_dtype)  # (out, ng)
    s = scales.float()
    zeros = torch.round(-lo / s).clamp(0, maxq)  # (out, ng)
    q = torch.round(padded / s[..., None]) + zeros[..., None]
    q = q.clamp(0, maxq).view(out, ng * gs)[:, :in_features]
    return q.to(torch.uint8), scales, zeros.to(torch.uint8)


def dequantize(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int,
               dtype: torch.dtype | None = None) -> torch.Tensor:
    """``W = s · (q − z)`` of shape (out, in), computed in ``dtype`` (default: the scales' dtype)."""
    dtype = dtype or scales.dtype
    in_features = q.shape[1]
    centered = q.to(dtype) - expand_groups(zeros.to(dtype), group_size, in_features)
    return centered * expand_groups(scales.to(dtype), group_size, in_features)


def centered_codes(q: torch.Tensor, zeros: torch.Tensor, group_size: int, dtype: torch.dtype) -> torch.Tensor:
    """``q − z`` of shape (out, in): the derivative of ``W`` with respect to its group's scale."""
    return q.to(dtype) - expand_groups(zeros.to(dtype), group_size, q.shape[1])


# ---------------------------------------------------------------------------------------------------------
# Bit packing. A chunk of ``values_per_chunk`` codes fills ``bytes_per_chunk`` bytes exactly
# (lcm(bits, 8) bits): 4-bit 2 values/1 byte, 2-bit 4/1, 3-bit 8/3.


def chunk_shape(bits: int) -> tuple[int, int]:
    """(values per chunk, bytes per chunk) for ``bits``-bit codes."""
    check_bits(bits)
    chunk_bits = math.lcm(bits, 8)
    return chunk_bits // bits, chunk_bits // 8


def packed_nbytes(numel: int, bits: int) -> int:
    per, nbytes = chunk_shape(bits)
    return math.ceil(numel / per) * nbytes


def pack_bits(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes in [0, 2^bits) into a flat uint8 tensor of ``packed_nbytes(q.numel(), bits)`` bytes.

    Value ``i`` of a chunk occupies bits ``i·bits … i·bits + bits − 1`` of the chunk's little-endian word.
    """
    per, nbytes = chunk_shape(bits)
    flat = q.reshape(-1).to(torch.int32)
    if flat.numel() and int(flat.max()) >= 2**bits:
        raise ValueError(f"codes do not fit in {bits} bits")
    flat = torch.nn.functional.pad(flat, (0, (-flat.numel()) % per)).view(-1, per)  # (chunks, per)
    shifts = torch.arange(per, dtype=torch.int32, device=q.device) * bits
    word = (flat << shifts).sum(dim=1, dtype=torch.int32)  # (chunks,), at most 24 bits
    byte_shifts = torch.arange(nbytes, dtype=torch.int32, device=q.device) * 8
    return ((word[:, None] >> byte_shifts) & 0xFF).to(torch.uint8).reshape(-1)


def unpack_bits(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """The inverse of :func:`pack_bits`: the first ``numel`` codes, flat, as uint8."""
    per, nbytes = chunk_shape(bits)
    chunks = packed.reshape(-1, nbytes).to(torch.int32)  # (chunks, nbytes)
    byte_shifts = torch.arange(nbytes, dtype=torch.int32, device=packed.device) * 8
    word = (chunks << byte_shifts).sum(dim=1, dtype=torch.int32)
    shifts = torch.arange(per, dtype=torch.int32, device=packed.device) * bits
    return ((word[:, None] >> shifts) & (2**bits - 1)).to(torch.uint8).reshape(-1)[:numel]


def pack_bits_reference(q: torch.Tensor, bits: int) -> bytes:
    """Slow, obviously right: write every code's bits (least significant first) into one bit string."""
    per, _ = chunk_shape(bits)
    values = q.reshape(-1).tolist()
    values += [0] * ((-len(values)) % per)
    bitstream = [(v >> k) & 1 for v in values for k in range(bits)]
    return bytes(sum(bit << k for k, bit in enumerate(bitstream[i:i + 8])) for i in range(0, len(bitstream), 8))


def codes_from_dequantized(w: torch.Tensor, scales: torch.Tensor, group_size: int, bits: int):
    """Recover integer codes from a weight another quantizer dequantized (e.g. a GPTQ layer): ``w ≈ s · k``
    with integer ``k = q − z``. Returns ``q`` (out, in) and ``zeros`` (out, n_groups), uint8, choosing per
    group the zero point that puts the group's codes in [0, 2^bits − 1] (only ``q − z`` matters for ``W`` and
    for the scale gradient, so any such ``z`` is exact). Refuses weights that are not on the scale grid.
    """
    check_bits(bits)
    maxq = 2**bits - 1
    ratio = w.float() / expand_groups(scales.float(), group_size, w.shape[1])
    k = torch.round(ratio)
    if not (ratio - k).abs().max().item() <= 0.1:  # fp16 rounding of s·k leaves at most |k|·2^-11 < 0.01
        raise QftError("the quantized layer's weights are not integer multiples of its scales",
                       "pass a GPTQ model without act-order (desc_act=False) loaded with gptqmodel's torch backend")
    # (out, ng): the zero point that makes the group's smallest code 0 (or 0 if all codes are positive)
    lo = (-reduce_groups_min(k, group_size)).clamp(min=0)
    q = k + expand_groups(lo, group_size, w.shape[1])
    if q.max().item() > maxq:
        raise QftError(f"the quantized layer uses more than {bits} bits per weight",
                       f"pass --bits matching the checkpoint's quantization_config (not {bits})")
    return q.to(torch.uint8), lo.to(torch.uint8)


def reduce_groups_min(t: torch.Tensor, group_size: int) -> torch.Tensor:
    """(out, in) -> (out, n_groups): each group's minimum."""
    out, in_features = t.shape
    if group_size == 0:
        return t.amin(dim=1, keepdim=True)
    pad = n_groups(in_features, group_size) * group_size - in_features
    return torch.nn.functional.pad(t, (0, pad), value=float("inf")).view(out, -1, group_size).amin(dim=2)
