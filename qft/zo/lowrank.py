"""Rank-one ZO directions for weight matrices (``dist="rank1"``): z = u·vᵀ with u, v standard normal.

The idea is LOZO's (Chen et al., 2024, "Enhancing Zeroth-order Fine-tuning for Language Models with Low-rank
Structures", arXiv:2410.07698), at rank one and with both factors drawn afresh each step. z is still an unbiased
direction: E[vec(uvᵀ)vec(uvᵀ)ᵀ] = E[vvᵀ] ⊗ E[uuᵀ] = I, as for a dense Gaussian z.

What it buys is speed. A dense z must be added to the weights: a copy of every matrix per forward (or an
in-place pass), which at the Llama-3-8B shape is most of a MeZO step's time over its two forwards. A rank-one
z never touches the weights. For a linear layer y = x·Wᵀ, the perturbed output is

    x·(W + ε·u·vᵀ)ᵀ = x·Wᵀ + ε·(x·v)·uᵀ

so a forward hook adds a rank-one term to the output (one matrix-vector product with the input and one outer
product into the output, both the size of activations). An embedding adds ε·u[ids]·vᵀ to its looked-up rows;
GPT-2's Conv1D (y = x·W, W stored as in × out) adds ε·(x·u)·vᵀ. The update θ ← keep·θ − lr·g·u·vᵀ is one
``addr_`` per matrix. u and v (m + n numbers per m × n matrix) are regenerated from the seed, never stored.

Matrices whose modules are not plain ``nn.Linear`` / ``nn.Embedding`` / ``Conv1D`` (or that a mask restricts)
get the same u·vᵀ materialized, through the copy path of :mod:`qft.zo.spsa`; tensors that are not matrices
(norms, biases, Sparse-MeZO's deltas) get dense Gaussian directions.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from qft.zo import triton_ops

_STEP: dict = {"step": None, "factors": {}}  # the factors of the step in progress (see prefetch)
_F32 = torch.float32


def factors(p: torch.Tensor, seed: int, dtype: torch.dtype = _F32,
            step: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(u, v), standard normals of lengths ``p.shape[0]`` and ``p.shape[1]`` on ``p``'s device, drawn in float32
    (one draw of m + n numbers) and returned in ``dtype``.

    ``step`` (the step's seed) keeps them for the rest of that step (see :func:`prefetch`). Callers must not
    modify them in place."""
    if step is None:
        u, v = _draw_many([p], [seed])[0][0]
        return u.to(dtype), v.to(dtype)
    return prefetch([p], [seed], step, dtype)[0]


def prefetch(ps, seeds, step: int, dtype: torch.dtype = _F32) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """:func:`factors` of many matrices of one step at once: those not yet drawn this step are drawn together
    (on a GPU one Triton launch for all of them, :func:`_draw_many`) and cast together (one op per device).

    Both forwards and the update of a step then reuse the same u, v, so each matrix's are drawn (and cast) once
    a step, not three times, and a step costs a handful of launches for them, not one or more per matrix. Those
    drawn here come in ``dtype`` from one cast of their buffer.
    Asking for another step's drops them. They are a few numbers per matrix row and column (about 12 MB a step
    at the Llama-3-8B shape)."""
    if _STEP["step"] != step:
        _STEP["step"], _STEP["factors"] = step, {}
    cache = _STEP["factors"]
    keys = [(seed, tuple(p.shape), p.device) for p, seed in zip(ps, seeds)]
    new = {k: p for k, p in zip(keys, ps) if k + (_F32,) not in cache}
    if new:
        drawn, cast = _draw_many(list(new.values()), [k[0] for k in new], dtype)
        cache.update((k + (_F32,), uv) for k, uv in zip(new, drawn))
        if dtype != _F32:
            cache.update((k + (dtype,), uv) for k, uv in zip(new, cast))
    if dtype != _F32:
        todo = list(dict.fromkeys(k for k in keys if k + (dtype,) not in cache))
        for device in dict.fromkeys(k[2] for k in todo):  # one cat, cast and split per device
            mine = [k for k in todo if k[2] == device]
            flat = torch.cat([t for k in mine for t in cache[k + (_F32,)]]).to(dtype)
            parts = flat.split([n for k in mine for n in k[1]])
            cache.update((k + (dtype,), (parts[2 * j], parts[2 * j + 1])) for j, k in enumerate(mine))
    return [cache[k + (dtype,)] for k in keys]


def _draw_many(ps, seeds, dtype: torch.dtype = _F32) -> tuple[list, list]:
    """(float32 (u, v) of each matrix, the same in ``dtype``: one cast of each device's buffer, or the float32 ones
    themselves when ``dtype`` is float32). u, v are a function of the seed (and the matrix's shape) alone, whatever
    the grouping: on a GPU with Triton, the fused kernel's Philox normals (element i of the m + n numbers from
    (seed, i); all matrices of a device in one launch), elsewhere ``torch.randn`` from a generator seeded per matrix
    (:func:`_draw`). Each device's factors are views of one buffer, cut in one call (a cut per matrix cost a
    Llama-3-8B step about a millisecond of Python)."""
    drawn: list = [None] * len(ps)
    cast: list = [None] * len(ps)
    groups: dict = {}
    for j, p in enumerate(ps):
        groups.setdefault(p.device, []).append(j)
    for device, idx in groups.items():
        sizes = [n for j in idx for n in ps[j].shape]  # u, v, u, v, ...
        buf = torch.zeros(sum(sizes), dtype=_F32, device=device)
        views = buf.split([ps[j].shape[0] + ps[j].shape[1] for j in idx])
        if triton_ops.usable(buf):
            triton_ops.axpby_multi_(views, [seeds[j] for j in idx], 1.0)  # zeros + z: z itself, one launch
        else:
            for j, view in zip(idx, views):
                view.copy_(torch.cat(_draw(ps[j], seeds[j], _F32)))
        parts = buf.split(sizes)
        typed = parts if dtype == _F32 else buf.to(dtype).split(sizes)
        for k, j in enumerate(idx):
            drawn[j], cast[j] = (parts[2 * k], parts[2 * k + 1]), (typed[2 * k], typed[2 * k + 1])
    return drawn, cast


def _draw(p: torch.Tensor, seed: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator(device=p.device).manual_seed(seed)
    uv = torch.randn(p.shape[0] + p.shape[1], generator=g, device=p.device).to(dtype)
    return uv[:p.shape[0]], uv[p.shape[0]:]


def direction_slice(p: torch.Tensor, seed: int, start: int, stop: int, step: int | None = None) -> torch.Tensor:
    """Elements ``[start, stop)`` of u·vᵀ flattened (float32), from the rows that hold them only: the copy path
    and masked directions, piece by piece like every other z."""
    u, v = factors(p, seed, step=step)
    n = p.shape[1]
    first, last = start // n, (stop - 1) // n + 1
    return torch.outer(u[first:last], v).reshape(-1)[start - first * n:stop - first * n]


@functools.cache
def _conv1d_type():
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers is a dependency
        return None
    return Conv1D


def hook_kind(holder: nn.Module, pname: str) -> str | None:
    """How a forward hook can apply the rank-one term for ``holder.<pname>``, or None when it cannot.

    Exact module types only: a subclass may compute something else from its weight."""
    if pname != "weight":
        return None
    kind = type(holder)
    if kind is nn.Linear:
        return "linear"
    if kind is nn.Embedding and holder.max_norm is None:  # max_norm renormalizes the weight in place
        return "embedding"
    if kind is _conv1d_type():
        return "conv1d"
    return None


def _as(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t if t.dtype == dtype else t.to(dtype)  # a no-op .to() still costs a dispatch, in every hook call


def _add_outer(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float, paired: bool) -> torch.Tensor:
    """out + scale·a ⊗ b over out's last dimension (a: out's leading shape, b: its last), in place when no
    autograd graph is being built; ``paired``: −scale on the second half of a's first dimension."""
    a, b = _as(a, out.dtype), _as(b, out.dtype)
    if not torch.is_grad_enabled() and out.is_contiguous():
        a = a.reshape(-1)  # row-major: its first half is the first half of the rows
        addr_(out.view(-1, out.shape[-1]), a, b, scale, flip=a.numel() // 2 if paired else None)
        return out
    if paired:
        a = _negated_from(a, a.shape[0] // 2)
    return out + scale * a.unsqueeze(-1) * b


def _negated_from(a: torch.Tensor, start: int) -> torch.Tensor:
    """``a`` with its rows from ``start`` on negated (a new tensor): a paired forward's second half, on torch's path."""
    return torch.cat([a[:start], -a[start:]])


def perturb_output(kind: str, inputs: torch.Tensor, out: torch.Tensor, u: torch.Tensor, v: torch.Tensor,
                   scale: float, paired: bool = False) -> torch.Tensor:
    """The module's output as if its weight were W + scale·u·vᵀ (``inputs``: its first positional argument);
    ``paired``: the rows of the first half of the batch (its first dimension) see W + scale·u·vᵀ, the others
    W − scale·u·vᵀ (:func:`qft.zo.spsa.perturbed_pair`; the sign goes into the rank-one add's kernel, no launch of
    its own)."""
    if kind == "linear":  # W: out × in, u: out, v: in
        a, b = inputs @ _as(v, inputs.dtype), u
    elif kind == "conv1d":  # W: in × out, u: in, v: out
        a, b = inputs @ _as(u, inputs.dtype), v
    else:  # embedding, W: num × dim, u: num, v: dim
        a, b = u[inputs], v
    return _add_outer(out, a, b, scale, paired)


def stacked(factor_sets: list[list[tuple[torch.Tensor, torch.Tensor]]]) -> tuple[torch.Tensor, list[int]]:
    """q directions' factors of the same matrices, as one float32 tensor of q rows (``factor_sets[k]``: direction
    k's (u, v) of each matrix, in one order) and each matrix's offset in a row: matrix j's U (q × m) and V (q × n)
    are slices of it (:func:`split_stacked`). One cat per direction and one stack, not a launch per matrix."""
    rows = [torch.cat([t for uv in uvs for t in uv]) for uvs in factor_sets]
    offsets, at = [], 0
    for u, v in factor_sets[0]:
        offsets.append(at)
        at += u.numel() + v.numel()
    return torch.stack(rows), offsets


def split_stacked(flat: torch.Tensor, offset: int, shape) -> tuple[torch.Tensor, torch.Tensor]:
    """Matrix ``shape``'s (U, V), q × m and q × n views of :func:`stacked`'s tensor at ``offset``."""
    m, n = shape
    return flat[:, offset:offset + m], flat[:, offset + m:offset + m + n]


def perturb_output_multi(kind: str, inputs: torch.Tensor, out: torch.Tensor, u: torch.Tensor, v: torch.Tensor,
                         scale: float, signs: torch.Tensor) -> torch.Tensor:
    """:func:`perturb_output` for several rank-one terms at once (``u``: c × m, ``v``: c × n, row k term k's factors),
    over a batch of B blocks of rows: block b sees W + scale·Σ_k signs[b, k]·u_k·v_kᵀ. ``signs`` is B × c, or its
    B × 1 × c view: for q paired directions the 2q × q matrix of ±1 (block 2k +, block 2k+1 −, 0 elsewhere); the ZO
    hooks pass ±eps there and scale 1, with a column of ones for each deferred update (:mod:`qft.zo.defer`). Each
    row's term is picked by a product with its block's row of ``signs``, so the whole term is two small matrix
    products, whatever c."""
    if kind == "linear":  # W: out × in
        a, b = inputs @ _as(v, inputs.dtype).t(), u
    elif kind == "conv1d":  # W: in × out
        a, b = inputs @ _as(u, inputs.dtype).t(), v
    else:  # embedding: the looked-up rows of each u
        a, b = u.t()[inputs], v
    signs = signs if signs.dim() == 3 else signs[:, None, :]
    a = (a.reshape(signs.shape[0], -1, a.shape[-1]) * _as(signs, a.dtype)).reshape(-1, a.shape[-1])
    a, b = _as(a, out.dtype), _as(b, out.dtype)
    if not torch.is_grad_enabled() and out.is_contiguous():
        flat = out.view(-1, out.shape[-1])
        if triton_ops.addr_usable(flat) and a.shape[-1] <= triton_ops.ADDMM_SMALL_MAX_K:
            triton_ops.addmm_small_(flat, a, b, scale)  # one pass over the output, as for one direction
        else:
            flat.addmm_(a, b, alpha=scale)
        return out
    return out + scale * (a @ b).view(out.shape)


def addr_(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, alpha: float, beta: float = 1.0,
          flip: int | None = None) -> None:
    """``out.addr_(a, b, beta=beta, alpha=alpha)``, through the Triton kernel where it takes ``out`` (a GPU: torch's
    own is bandwidth-starved there, see :func:`qft.zo.triton_ops.addr_`). The choice depends on ``out`` alone, so
    a step's two forwards and its update always take the same path. Rows ``flip`` and after take −alpha."""
    if triton_ops.addr_usable(out):
        triton_ops.addr_(out, a, b, alpha, beta, flip)
        return
    if flip is not None:  # the same products as the kernel's: alpha·(±a_i)·b_j
        a = _negated_from(a, flip)
    out.addr_(a, b, beta=beta, alpha=alpha)

