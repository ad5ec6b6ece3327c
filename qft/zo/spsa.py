"""SPSA with the seed trick (MeZO, Malladi et al., 2023, arXiv:2305.17333, Algorithm 1).

The projected gradient along a random direction z is ``g = (L(θ + εz) − L(θ − εz)) / 2ε``, and the step is
``θ ← θ − lr·(g·z + wd·θ)``. z is never stored: every tensor's z is regenerated from ``(seed, index)``.

qft applies the ±εz perturbation *inside the forward*, one decoder layer at a time (:func:`perturbed`): a
layer's perturbed weights exist only while that layer runs, and the stored weights are never modified by a
perturbation. So the ±ε round trip restores θ exactly (the reference in-place version, :func:`perturb_inplace_`,
as MeZO's code does it, leaves floating-point residue), peak memory stays at the inference peak plus one
layer, and each step draws z three times (two forwards, one update) instead of MeZO's four.

A ``mask_fn(param) -> bool tensor or None`` restricts z to selected entries (Sparse-MeZO); it is evaluated on
the fly from the current tensor and never stored.

``dist`` chooses z's distribution: ``gaussian`` (MeZO's standard normal) or ``rademacher`` (±1 with equal
odds, classic SPSA; E[zzᵀ] = I as well, so the estimate stays unbiased up to O(ε²)). On the GPU a Rademacher
z costs one Philox draw per 128 elements instead of one per 4 plus Box-Muller. ``rank1`` draws each weight
matrix's z as u·vᵀ (:mod:`qft.zo.lowrank`), applied by forward hooks without touching the weights, and other
tensors' z as Gaussian.
"""

from __future__ import annotations

import contextlib
import functools
import os
from typing import Callable, Iterable, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from qft.errors import QftError
from qft.zo import lowrank, triton_ops
from qft.zo.mask import select

MaskFn = Callable[[torch.Tensor], "torch.Tensor | None"]
_MIX = 0x9E3779B97F4A7C15  # 2^64 / golden ratio (Knuth's multiplicative hashing constant)
DISTRIBUTIONS = ("gaussian", "rademacher", "rank1")


def _rank1(p: torch.Tensor, dist: str) -> bool:
    """Whether ``p``'s z is rank one: a matrix under ``dist="rank1"``."""
    return dist == "rank1" and p.dim() == 2


def _dense(dist: str) -> str:
    """The distribution the Triton kernels draw for the tensors that are not rank one."""
    return "gaussian" if dist == "rank1" else dist


CHUNK = 2**24  # elements per generated piece of z: bounds the extra memory of a step to one piece


def tensor_seed(step_seed: int, index: int, piece: int = 0) -> int:
    """A distinct, reproducible seed for piece ``piece`` of tensor ``index`` under one step's seed."""
    return (step_seed * 1_000_003 + (index + 1) * _MIX + piece * 0x2545F4914F6CDD1D) % (2**63 - 1)


def _pieces(numel: int):
    chunk = CHUNK  # read at call time (tests shrink it to exercise the splitting)
    for k, start in enumerate(range(0, numel, chunk)):
        yield k, start, min(start + chunk, numel)


def direction_piece(p: torch.Tensor, step_seed: int, index: int, piece: int, start: int, stop: int,
                    mask_fn: MaskFn | None = None, dist: str = "gaussian") -> torch.Tensor:
    """z for elements ``[start, stop)`` of ``p`` (flattened): standard normal (or ±1, or that slice of a matrix's
    u·vᵀ), ``p``'s dtype and device.

    ``mask_fn`` must be elementwise (it sees only this piece of ``p``)."""
    if _rank1(p, dist):  # one u, v per tensor, whatever the piece
        z = lowrank.direction_slice(p, tensor_seed(step_seed, index), start, stop, step_seed).to(p.dtype)
    else:
        g = torch.Generator(device=p.device).manual_seed(tensor_seed(step_seed, index, piece))
        if dist == "rademacher":
            z = torch.randint(0, 2, (stop - start,), generator=g, device=p.device).to(p.dtype).mul_(2).sub_(1)
        else:
            z = torch.randn(stop - start, generator=g, device=p.device, dtype=p.dtype)
    if mask_fn is not None:
        mask = select(mask_fn, p, p.detach().reshape(-1)[start:stop])
        if mask is not None:
            z.mul_(mask)
    return z


def direction(p: torch.Tensor, step_seed: int, index: int, mask_fn: MaskFn | None = None,
              dist: str = "gaussian") -> torch.Tensor:
    """The whole z of tensor ``index`` (for references and tests; the training path works piece by piece)."""
    if triton_ops.usable(p, mask_fn) and not _rank1(p, dist):
        z = triton_ops.direction(p, tensor_seed(step_seed, index), _dense(dist)).to(p.dtype)
        return z if mask_fn is None else z * select(mask_fn, p, p.detach())
    parts = [direction_piece(p, step_seed, index, k, a, b, mask_fn, dist) for k, a, b in _pieces(p.numel())]
    return torch.cat(parts).view(p.shape) if parts else torch.empty_like(p)


def perturbed_copy(p: torch.Tensor, step_seed: int, index: int, scale: float,
                   mask_fn: MaskFn | None = None, dist: str = "gaussian") -> torch.Tensor:
    """θ + scale·z as a new tensor, built piece by piece (one copy of θ plus one piece of z).

    On CUDA the fused Triton kernel does it in one pass (:mod:`qft.zo.triton_ops`); a matrix under ``rank1``
    that no hook can take gets its u·vᵀ here, piece by piece."""
    if triton_ops.usable(p, mask_fn) and not _rank1(p, dist):
        return triton_ops.perturbed_copy(p, tensor_seed(step_seed, index), scale, _dense(dist),
                                         _thresholds(mask_fn, [p]))
    out = p.detach().clone()
    flat = out.view(-1)
    for k, a, b in _pieces(p.numel()):
        flat[a:b].add_(direction_piece(p, step_seed, index, k, a, b, mask_fn, dist), alpha=scale)
    return out


def perturb_inplace_(params: Sequence[torch.Tensor], step_seed: int, scale: float,
                     mask_fn: MaskFn | None = None, dist: str = "gaussian") -> None:
    """Reference (MeZO's code): θ += scale·z in place, tensor by tensor."""
    with torch.no_grad():
        for i, p in enumerate(params):
            p.add_(direction(p, step_seed, i, mask_fn, dist), alpha=scale)


_CONTAINERS = (nn.ParameterDict, nn.ParameterList)  # hold parameters but never run a forward of their own


def _runner(name: str, holder: nn.Module, modules: dict[str, nn.Module]) -> nn.Module:
    """The module whose forward brackets the use of ``holder``'s parameters: the outermost child of a
    ModuleList above it (a decoder layer: its weights are perturbed together, in one launch on a GPU), else
    ``holder`` itself, or its parent when ``holder`` is a ParameterDict/ParameterList (as in peft layers)."""
    parts = name.split(".") if name else []
    for i in range(1, len(parts)):
        if isinstance(modules[".".join(parts[:i])], nn.ModuleList):
            return modules[".".join(parts[:i + 1])]
    if isinstance(holder, _CONTAINERS) and name:
        return modules[name.rpartition(".")[0]]
    return holder


def _thresholds(mask_fn, ps) -> list[float] | None:
    """The per-tensor thresholds a fused kernel compares with (:class:`qft.zo.mask.MagnitudeMask`), or None."""
    return None if mask_fn is None else [mask_fn.threshold(p) for p in ps]


def perturbed_copies(ps: Sequence[torch.Tensor], step_seed: int, indices: Sequence[int], scale: float,
                     mask_fn: MaskFn | None = None, dist: str = "gaussian", pending=None) -> list[torch.Tensor]:
    """:func:`perturbed_copy` of each tensor; those the fused kernel takes go in one launch per dtype. ``pending``
    (:class:`qft.zo.defer.DeferredUpdates`): the matrices' updates not yet written go into their copies."""
    out = [None] * len(ps)
    fused = [k for k, p in enumerate(ps) if triton_ops.usable(p, mask_fn) and not _rank1(p, dist)]
    if fused:
        copies = triton_ops.perturbed_copies([ps[k] for k in fused],
                                             [tensor_seed(step_seed, indices[k]) for k in fused], scale, _dense(dist),
                                             _thresholds(mask_fn, [ps[k] for k in fused]))
        for k, c in zip(fused, copies):
            out[k] = c
    for k, p in enumerate(ps):
        if out[k] is None:
            out[k] = perturbed_copy(p, step_seed, indices[k], scale, mask_fn, dist)
        if pending and indices[k] in pending.offsets:
            pending.add_to(out[k], indices[k])
    return out


def _layout(model: nn.Module, params: Sequence[nn.Parameter], mask_fn: MaskFn | None, dist: str):
    """Where :func:`perturbed` puts its hooks: (param index by id, holders of each param, ids of the matrices
    perturbed by rank-one output hooks (in ``params``'s order), {runner id: (runner, [(holder, name)])} for the
    rest, for :func:`perturbed_pair` the same rest by the module that uses them: {module id: (module, [(holder,
    name)])}, and the rank-one matrices' forward hooks, :class:`_RankOneHooks`).

    Walking the module tree costs milliseconds on a 30-layer model, twice a step, so the layout is kept per model
    (an attribute of the model, so it lives and dies with it) and reused while the same tensors sit in the same
    slots; :func:`release` drops it and its hooks."""
    key = (tuple(id(p) for p in params), mask_fn is None, dist)
    cached = model.__dict__.get("_qft_zo_layout")
    if cached is not None and cached[0] == key and all(
            holder._parameters.get(n) is params[cached[1][0][pid]]
            for pid, hs in cached[1][1].items() for _, holder, n in hs):
        return cached[1]
    release(model)
    index = {id(p): i for i, p in enumerate(params)}
    modules = dict(model.named_modules())
    holders: dict[int, list[tuple[str, nn.Module, str]]] = {}
    for name, holder in modules.items():
        for n, p in holder.named_parameters(recurse=False):
            if id(p) in index:
                holders.setdefault(id(p), []).append((name, holder, n))
    hooked = [id(p) for p in params if id(p) in holders and mask_fn is None and _rank1(p, dist)
              and all(lowrank.hook_kind(h, n) for _, h, n in holders[id(p)])]
    plan: dict[int, tuple[nn.Module, list[tuple[nn.Module, str]]]] = {}
    splits: dict[int, tuple[nn.Module, list[tuple[nn.Module, str]]]] = {}
    for pid, hs in holders.items():
        if pid not in hooked:
            for name, holder, n in hs:
                runner = _runner(name, holder, modules)
                plan.setdefault(id(runner), (runner, []))[1].append((holder, n))
                own = modules[name.rpartition(".")[0]] if isinstance(holder, _CONTAINERS) and name else holder
                splits.setdefault(id(own), (own, []))[1].append((holder, n))
    layout = (index, holders, hooked, plan, splits, _RankOneHooks(holders, hooked))
    model.__dict__["_qft_zo_layout"] = (key, layout)
    return layout


def release(model: nn.Module) -> None:
    """Remove the ZO forward hooks that :func:`perturbed` and :func:`perturbed_pair` left on ``model`` (inert outside
    them) and forget its layout. The ZO trainer calls it at the end of training."""
    cached = model.__dict__.pop("_qft_zo_layout", None)
    if cached is not None:
        cached[1][-1].remove()


class _RankOneHooks:
    """The forward hooks of the rank1 matrices' modules, registered once per model layout and inert outside a ZO
    forward; within one, :meth:`active`'s ``term(pid, kind, module, args, kwargs, output)`` gives the module's output
    (a step's rank-one terms added).

    Registering 226 hooks and removing them again, twice a step at the Llama-3-8B shape, cost about 2 ms of Python a
    step (and the garbage collector's time for their closures and handles), while the GPU waited (session 15's
    profile)."""

    def __init__(self, holders: dict, hooked: Sequence[int]):
        self.term = None
        self.handles = [holder.register_forward_hook(functools.partial(self._hook, pid, lowrank.hook_kind(holder, n)),
                                                     with_kwargs=True)
                        for pid in hooked for _, holder, n in holders[pid]]

    def _hook(self, pid, kind, module, args, kwargs, output):
        term = self.term
        return None if term is None else term(pid, kind, module, args, kwargs, output)

    @contextlib.contextmanager
    def active(self, term):
        if self.term is not None:
            raise QftError("a ZO forward ran inside another one's perturbation of the same model",
                           "run the perturbed forwards one after the other")
        self.term = term
        try:
            yield
        finally:
            self.term = None

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []


def _rank1_factors(params: Sequence[torch.Tensor], which: Sequence[int], step_seed: int,
                   float32: bool = False) -> dict[int, dict]:
    """{id(param): {dtype: (u, v)}} for the matrices ``which`` (indices into ``params``), in each matrix's own dtype
    (``float32``: in float32): drawn for all of them at once (:func:`qft.zo.lowrank.prefetch`) rather than one by one
    inside the forward, where each draw would cost a launch or more. Other dtypes are drawn (from the step's cache)
    when asked for: :func:`qft.zo.lowrank.factors`."""
    ps = [params[i] for i in which]
    seeds = [tensor_seed(step_seed, i) for i in which]
    out: dict[int, dict] = {id(p): {} for p in ps}
    for dtype in [torch.float32] if float32 else list(dict.fromkeys(p.dtype for p in ps)):
        mine = [k for k, p in enumerate(ps) if float32 or p.dtype == dtype]
        for k, uv in zip(mine, lowrank.prefetch([ps[k] for k in mine], [seeds[k] for k in mine], step_seed, dtype)):
            out[id(ps[k])][dtype] = uv
    return out


def _hook_input(module, args, kwargs, output, check=None):
    """(the module's input, its output, the dtype a rank1 hook's factors take) for a forward hook; with ``check``,
    the input and output as ``check(x, module, output)`` gives them back (a paired forward's one-row input expanded).

    The factors go in the activations' dtype, so the term casts nothing; in float32 when the input and output dtypes
    differ, as under autocast (:func:`qft.zo.lowrank.perturb_output` then casts as it needs)."""
    x = args[0] if args else next(iter(kwargs.values()))
    if check is not None:
        x, output = check(x, module, output)
    return x, output, output.dtype if x.dtype == output.dtype or not x.is_floating_point() else torch.float32


def _rank1_term(params, index, hooked, step_seed: int, scale: float, seen: set, check=None, paired: bool = False):
    """The term of :class:`_RankOneHooks` that adds each rank1 matrix's ``scale·u·vᵀ`` to its modules' outputs
    (:func:`perturbed`); ``paired``: with −scale on the second half of the rows (:func:`perturbed_pair`), after
    ``check(x, module)``."""
    factors = _rank1_factors(params, [index[pid] for pid in hooked], step_seed)

    def term(pid, kind, module, args, kwargs, output):
        x, output, dtype = _hook_input(module, args, kwargs, output, check)
        pairs = factors[pid]
        uv = pairs.get(dtype)  # drawn once a step
        if uv is None:
            i = index[pid]
            uv = pairs[dtype] = lowrank.factors(params[i], tensor_seed(step_seed, i), dtype, step_seed)
        seen.add(pid)
        return lowrank.perturb_output(kind, x, output, uv[0], uv[1], scale, paired)

    return term


@contextlib.contextmanager
def _taking(pending):
    """Marks a ZO forward in progress: it takes ``pending``'s updates in its hooks and copies, so they need no
    writing before it (:mod:`qft.zo.defer`)."""
    if pending is None:
        yield
        return
    pending.active += 1
    try:
        yield
    finally:
        pending.active -= 1


@contextlib.contextmanager
def perturbed(model: nn.Module, params: Sequence[nn.Parameter], step_seed: int, scale: float,
              mask_fn: MaskFn | None = None, dist: str = "gaussian", pending=None):
    """Within the block, every forward of ``model`` sees ``θ + scale·z``; the stored θ is untouched.

    The module whose forward uses a parameter (see :func:`_runner`: its decoder layer, or its owner) gets a
    pre-hook that swaps in perturbed copies for the duration of its forward, and a hook that swaps the
    originals back, so at most one layer's perturbed weights exist at a time. Yields the set of parameter
    ids perturbed so far, so callers can check that every tuned tensor took part.

    With ``dist="rank1"``, a matrix held only by plain linear, embedding or Conv1D modules is not copied at
    all: a forward hook on each of its modules adds the rank-one term to the output (:mod:`qft.zo.lowrank`).
    ``pending`` (:class:`qft.zo.defer.DeferredUpdates`): updates of those matrices not yet written into them, which
    the forward then sees as if they were (in the same hooks' products, and in the copies).
    """
    index, holders, hooked, plan, _, rank_one = _layout(model, params, mask_fn, dist)
    seen: set[int] = set()

    def make_hooks(slots):
        saved: list[tuple[nn.Module, str, nn.Parameter]] = []

        def pre_hook(module, args):
            ps = [holder._parameters[pname] for holder, pname in slots]
            copies = perturbed_copies(ps, step_seed, [index[id(p)] for p in ps], scale, mask_fn, dist, pending)
            for (holder, pname), p, c in zip(slots, ps, copies):
                saved.append((holder, pname, p))
                seen.add(id(p))
                holder._parameters[pname] = c

        def post_hook(module, args, output):
            restore()

        def restore():
            while saved:
                holder, pname, p = saved.pop()
                holder._parameters[pname] = p

        return pre_hook, post_hook, restore

    handles, restorers = [], []
    if pending:  # the step's term and the pending updates', in one product a module
        term = _rank1_term_stacked(params, index, hooked, [step_seed], torch.tensor([[scale]]), seen, None, pending)
    else:
        term = _rank1_term(params, index, hooked, step_seed, scale, seen)
    try:
        for runner, slots in plan.values():
            pre, post, restore = make_hooks(slots)
            handles.append(runner.register_forward_pre_hook(pre))
            handles.append(runner.register_forward_hook(post, always_call=True))
            restorers.append(restore)
        with rank_one.active(term), _taking(pending):
            yield seen
    finally:
        for h in handles:
            h.remove()
        for restore in restorers:  # a forward that raised mid-way
            restore()


PAIRED_READY_BYTES = 64 * 2**20  # up to this many bytes of tensors that take copies, perturbed_pair makes them all first


@contextlib.contextmanager
def perturbed_pair(model: nn.Module, params: Sequence[nn.Parameter], step_seed: int | Sequence[int], eps: float,
                   batch: int, mask_fn: MaskFn | None = None, dist: str = "gaussian", seq: int | None = None,
                   pending=None):
    """Both of SPSA's forwards in one: within the block, a forward of ``model`` over ``2·batch`` rows (the batch
    twice) sees ``θ + eps·z`` on its first ``batch`` rows and ``θ − eps·z`` on the rest. Yields the set of
    parameter ids perturbed so far, as :func:`perturbed` does.

    ``step_seed`` may also be q seeds (q directions, ``ZoArguments(samples=q)``): the forward then takes the batch
    2q times, blocks 2k and 2k+1 (``batch`` rows each) seeing ``θ ± eps·z_k``. On a small model, whose step is bound
    by Python and launches, q directions then cost little more than one.

    One forward of twice the batch instead of two: the same arithmetic, half the Python and kernel launches, which
    is what bounds a small model's step on a GPU (a 135M model's two forwards keep an H200 busy 8 ms of 41-68).
    rank1 matrices take their rank-one term with a sign per row (no copies); every other tensor's module runs
    once per block inside the forward, each time with its perturbed copy. So a tuned module's first argument must
    hold the rows batch first: the ``2q·batch`` rows themselves (norms, linear layers, peft layers), with ``seq``
    (tokens a row) their ``2q·batch·seq`` tokens flattened into one 2-D tensor, rows in order (OPT's feed-forward
    layers), or one row of indices that stands for every row (GPT-2's position ids: expanded, so that each block
    gets its own term). Any other input is refused: a mixture-of-experts layer's gathered tokens, say, whose rows
    could not be told apart. ``pending``: updates not yet written, as for :func:`perturbed`."""
    seeds = [step_seed] if isinstance(step_seed, int) else [int(s) for s in step_seed]
    blocks = [(seed, sign) for seed in seeds for sign in (1.0, -1.0)]  # block b: rows [b·batch, (b+1)·batch)
    rows_total = len(blocks) * batch
    index, holders, hooked, _, splits, rank_one = _layout(model, params, mask_fn, dist)
    seen: set[int] = set()
    fix = "leave --zo-paired off for this model"

    def check(x, module, out=None):
        """(x, out) with x's first dimension the rows, or their tokens flattened in row order; a one-row x of
        indices (and its output) expanded to every row."""
        if torch.is_tensor(x) and x.dim():
            n, same = x.shape[0], out is None or out.shape[0] == x.shape[0]
            if same and (n == rows_total or (seq is not None and x.dim() == 2 and n == rows_total * seq)):
                return x, out
            if n == 1 and same and not x.is_floating_point():  # GPT-2's position ids: each block its own term
                x = x.expand(rows_total, *x.shape[1:])
                return x, None if out is None else out.expand(rows_total, *out.shape[1:]).contiguous()
        raise QftError(f"a paired ZO forward needs every tuned module to take the batch first; "
                       f"{type(module).__name__} got {type(x).__name__} "
                       f"{tuple(x.shape) if torch.is_tensor(x) else ''}", fix)

    ready: dict[tuple[int, int], torch.Tensor] = {}  # (param id, block) -> its perturbed copy, made up front

    def make_split(module, slots):
        inner = module.forward

        def forward(*args, **kwargs):
            x0 = args[0] if args else None
            x, _ = check(x0, module)
            per_block = x.shape[0] // len(blocks)
            # keyword tensors along x's rows are cut with it (not those of one row for all, as x itself was)
            cut = {k for k, v in kwargs.items()
                   if torch.is_tensor(v) and v.dim() and v.shape[0] == x0.shape[0] == x.shape[0]}
            outs = []
            for b, (seed, sign) in enumerate(blocks):
                rows = slice(b * per_block, (b + 1) * per_block)
                ps = [holder._parameters[n] for holder, n in slots]
                copies = [ready.get((id(p), b)) for p in ps]
                if any(c is None for c in copies):
                    copies = perturbed_copies(ps, seed, [index[id(p)] for p in ps], sign * eps, mask_fn, dist,
                                              pending)
                for (holder, n), c in zip(slots, copies):
                    holder._parameters[n] = c
                try:
                    kw = {k: v[rows] if k in cut else v for k, v in kwargs.items()}
                    outs.append(inner(x[rows], *args[1:], **kw))
                finally:
                    for (holder, n), p in zip(slots, ps):
                        holder._parameters[n] = p
                seen.update(id(p) for p in ps)
            if not all(torch.is_tensor(o) for o in outs):
                raise QftError(f"a paired ZO forward needs {type(module).__name__} to return one tensor", fix)
            return torch.cat(outs)

        return forward

    split_ps = list({id(h._parameters[n]): h._parameters[n] for _, slots in splits.values() for h, n in slots}.values())
    if sum(p.numel() * p.element_size() for p in split_ps) * len(seeds) <= PAIRED_READY_BYTES:
        for b, (seed, sign) in enumerate(blocks):  # norms and biases: all copies in one go (one launch per dtype
            # on a GPU), not two per module and forward
            copies = perturbed_copies(split_ps, seed, [index[id(p)] for p in split_ps], sign * eps, mask_fn, dist,
                                      pending)
            ready.update(((id(p), b), c) for p, c in zip(split_ps, copies))
    if len(seeds) == 1 and not pending:  # the first half's rows +eps, the second's -eps
        term = _rank1_term(params, index, hooked, seeds[0], eps, seen, check, paired=True)
    else:  # block 2k: +eps along direction k, block 2k+1: -eps
        coef = torch.zeros(2 * len(seeds), len(seeds))
        k = torch.arange(len(seeds))
        coef[2 * k, k], coef[2 * k + 1, k] = eps, -eps
        term = _rank1_term_stacked(params, index, hooked, seeds, coef, seen, check, pending)
    overridden = []
    try:
        for module, slots in splits.values():
            overridden.append((module, module.__dict__.get("forward")))
            module.forward = make_split(module, slots)  # an instance attribute: nn.Module.__call__ runs it
        with rank_one.active(term), _taking(pending):
            yield seen
    finally:
        for module, own in overridden:  # back to the class's forward, or to the instance's own (accelerate's hooks)
            if own is None:
                del module.forward
            else:
                module.forward = own


def _rank1_term_stacked(params, index, hooked, seeds: Sequence[int], coef: torch.Tensor, seen: set, check,
                        pending=None):
    """:func:`_rank1_term` for q directions in one forward, and for updates not yet written (``pending``,
    :class:`qft.zo.defer.DeferredUpdates`): each matrix's q factor pairs, drawn per direction as for one and stacked
    (:func:`qft.zo.lowrank.stacked`), the pending ones below them, in one term of two small products per module
    (:func:`qft.zo.lowrank.perturb_output_multi`). The forward's rows are ``coef.shape[0]`` blocks; block b gets
    Σ_k coef[b, k]·u_k·v_kᵀ over the directions, and every block all the pending updates."""
    if not hooked:
        return None
    which = pending.which if pending else [index[pid] for pid in hooked]  # pending: its rows' layout
    by_dir = []
    for seed in seeds:
        factors = _rank1_factors(params, which, seed, float32=True)
        by_dir.append([factors[id(params[i])][torch.float32] for i in which])
    flat, offsets = lowrank.stacked(by_dir)
    at = dict(zip(which, offsets))
    if pending:
        coef = torch.cat([coef, torch.ones(coef.shape[0], len(pending.rows))], 1)
    cast: dict = {}  # (device, dtype) -> (the stacked factors, the blocks' coefficients) in that dtype

    def in_dtype(device, dtype):
        got = cast.get((device, dtype))
        if got is None:
            stack, sel = flat.to(device=device, dtype=dtype), coef.to(device=device, dtype=dtype)
            if pending:
                stack = torch.cat([stack, pending.flat(dtype).to(device)])
            # zero rows (and columns) up to multiples of 8: the hooks' x·Vᵀ then has a column count and row stride
            # that cuBLAS's aligned kernels take (with 1 + P columns it ran an unaligned one, 7.9 ms of an 8B step)
            rows = -stack.shape[0] % 8
            stack, sel = F.pad(stack, (0, -stack.shape[1] % 8, 0, rows)), F.pad(sel, (0, rows))
            got = cast[(device, dtype)] = (stack, sel[:, None, :])  # blocks x 1 x cols
        return got

    def term(pid, kind, module, args, kwargs, output):
        x, output, dtype = _hook_input(module, args, kwargs, output, check)
        stack, sel = in_dtype(output.device, dtype)
        i = index[pid]
        u, v = lowrank.split_stacked(stack, at[i], params[i].shape)
        seen.add(pid)
        return lowrank.perturb_output_multi(kind, x, output, u, v, 1.0, sel)

    return term


def _bucketed_pieces(params: Sequence[torch.Tensor], max_bytes: int):
    """Group (tensor index, piece, start, stop) into buckets of at most ``max_bytes`` (one dtype and device)."""
    bucket, size, key = [], 0, None
    for i, p in enumerate(params):
        for k, a, b in _pieces(p.numel()):
            nbytes = (b - a) * p.element_size()
            if bucket and (size + nbytes > max_bytes or (p.device, p.dtype) != key):
                yield bucket
                bucket, size = [], 0
            bucket.append((i, k, a, b))
            size, key = size + nbytes, (p.device, p.dtype)
    if bucket:
        yield bucket


def apply_update_(params: Sequence[torch.Tensor], seeds_and_grads: Sequence[tuple[int, float]], lr: float,
                  weight_decay: float = 0.0, decay_mask: Sequence[bool] | None = None,
                  mask_fn: MaskFn | None = None, bucket_bytes: int = 256 * 2**20, dist: str = "gaussian",
                  skip: Sequence[int] = ()) -> None:
    """θ ← θ − lr·(Σ_j g_j·z_j + wd·θ), with z_j regenerated from seed j; the tensors ``skip`` (indices into
    ``params``, whose positions seed their directions) are left as they are.

    The adds run as ``torch._foreach`` ops over buckets of pieces (at most ``bucket_bytes`` of directions),
    so the extra memory is one bucket, never a copy of the parameters.
    """
    with torch.no_grad():
        keep = 1.0 - lr * weight_decay if weight_decay and decay_mask is not None else 1.0
        plan = _update_plan(params, mask_fn, dist, skip, decay_mask)
        ranked, small = plan.ranked, plan.small
        # one rank-one add per matrix and direction, the decay folded into the first (masked: the torch path);
        # the factors of all matrices at once, those the step's forwards drew; the matrices the Triton kernel
        # takes, in one launch per shape (226 launches a step at the Llama-3-8B shape became five)
        for j, (seed, g) in enumerate(seeds_and_grads):
            uvs: dict[int, tuple] = {}
            for dtype, mine in plan.by_dtype.items():
                uvs.update(zip(mine, lowrank.prefetch([params[i] for i in mine], [tensor_seed(seed, i) for i in mine],
                                                      seed, dtype)))
            decay = j == 0 and keep != 1.0  # keep != 1 only with a decay mask
            if plan.big:
                triton_ops.addr_multi_([params[i] for i in plan.big], [uvs[i][0] for i in plan.big],
                                       [uvs[i][1] for i in plan.big], -lr * g,
                                       [keep if decay and decay_mask[i] else 1.0 for i in plan.big], plan.groups)
            for i in small:
                lowrank.addr_(params[i], uvs[i][0], uvs[i][1], -lr * g, keep if decay and decay_mask[i] else 1.0)
        if not seeds_and_grads and keep != 1.0:  # keep != 1 only with a decay mask
            for i in ranked:
                if decay_mask[i]:
                    params[i].mul_(keep)
        fused = plan.fused
        if fused:  # one fused read-modify-write per direction (one launch per dtype); the first folds in the decay
            ps = [params[i] for i in fused]
            for j, (seed, g) in enumerate(seeds_and_grads):
                triton_ops.axpby_multi_(ps, [tensor_seed(seed, i) for i in fused], -lr * g, keep if j == 0 else 1.0,
                                        plan.decay, _dense(dist), _thresholds(mask_fn, ps))
        _torch_update(params, plan.rest, seeds_and_grads, lr, weight_decay, decay_mask, mask_fn, bucket_bytes, dist)


class _UpdatePlan:
    """How :func:`apply_update_` moves each of ``params`` (indices into them): ``ranked`` by rank-one adds (``big``:
    the Triton kernel's, in ``groups`` of one launch, :func:`qft.zo.triton_ops.addr_multi_plan`; ``small``: torch's),
    ``fused`` by the fused kernel, ``rest`` by the torch path. It holds no tensor, so a cached plan keeps no model's
    weights alive."""

    def __init__(self, params, mask_fn, dist, skip, decay_mask):
        skip = set(skip)
        self.ranked = [i for i, p in enumerate(params) if _rank1(p, dist) and mask_fn is None and i not in skip]
        self.big = [i for i in self.ranked if triton_ops.addr_usable(params[i])]
        big = set(self.big)
        self.small = [i for i in self.ranked if i not in big]
        self.groups = triton_ops.addr_multi_plan([params[i] for i in self.big]) if self.big else None
        self.by_dtype: dict = {}  # dtype -> the ranked matrices of that dtype
        for i in self.ranked:
            self.by_dtype.setdefault(params[i].dtype, []).append(i)
        self.fused = [i for i, p in enumerate(params)
                      if triton_ops.usable(p, mask_fn) and not _rank1(p, dist) and i not in skip]
        self.decay = [bool(decay_mask[i]) for i in self.fused] if decay_mask is not None else None
        done = set(self.fused) | set(self.ranked) | skip
        self.rest = [i for i in range(len(params)) if i not in done]


_PLANS: dict = {}


def _update_plan(params, mask_fn, dist, skip, decay_mask) -> _UpdatePlan:
    """:class:`_UpdatePlan` of ``params``, kept while the same tensors hold the same storage (the split is a function
    of each tensor's device, dtype, shape, layout and the options). Making it took most of a Llama-3-8B update's
    Python, milliseconds a step while the GPU waited."""
    key = (tuple(map(id, params)), dist, mask_fn is None, getattr(mask_fn, "in_kernel", False), tuple(sorted(skip)),
           None if decay_mask is None else tuple(map(bool, decay_mask)), triton_ops.ADDR_MIN_NUMEL,
           os.environ.get("QFT_ZO_TRITON"))
    marks = [(p.data_ptr(), p.shape, p.stride(), p.dtype) for p in params]
    hit = _PLANS.get(key)
    if hit is not None and hit[0] == marks:
        return hit[1]
    if len(_PLANS) > 16:  # a few live at once (one per parameter group); never grow unbounded
        _PLANS.clear()
    plan = _PLANS[key] = (marks, _UpdatePlan(params, mask_fn, dist, skip, decay_mask))
    return plan[1]


def _torch_update(params, which, seeds_and_grads, lr, weight_decay, decay_mask, mask_fn, bucket_bytes,
                  dist) -> None:
    """The torch path of :func:`apply_update_` for the tensors ``which`` (by index into ``params``)."""
    with torch.no_grad():
        if weight_decay and decay_mask is not None:
            decayed = [params[i] for i in which if decay_mask[i]]
            if decayed:
                torch._foreach_mul_(decayed, 1.0 - lr * weight_decay)
        sub = [params[i] for i in which]
        for bucket in _bucketed_pieces(sub, bucket_bytes):
            bucket = [(which[i], k, a, b) for i, k, a, b in bucket]
            views = [params[i].view(-1)[a:b] for i, _, a, b in bucket]
            for seed, g in seeds_and_grads:
                zs = [direction_piece(params[i], seed, i, k, a, b, mask_fn, dist) for i, k, a, b in bucket]
                torch._foreach_add_(views, zs, alpha=-lr * g)
