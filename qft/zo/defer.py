"""Deferred rank-one updates (``ZoSGD(defer=K)``, ``--zo-defer K``): a rank1 step's update of each weight matrix,
−lr·g·u·vᵀ, kept as its factors for up to K steps and then written into the weights all at once.

Why: at the Llama-3-8B shape a rank1 paired step costs about 1.2× two forwards, and a third of the gap is the
update: one read and one write of every weight matrix (8.0 ms of the 25 on an H200, session 13's profile). The
forward hooks that add a step's rank-one perturbation already compute x·v and add an outer product into each
layer's output; they take the pending updates in the same two products (x·[v_0 … v_P] and one add of inner
dimension 1 + P, :func:`qft.zo.lowrank.perturb_output_multi`), so a pending update costs a forward little, and the
weights are read and written once every K steps (W += Uᵀ·V over the P pending factor pairs: one addmm a matrix).
Measured in session 14 at that shape (K = 4, 8), it was no faster with torch's ``addmm_`` taking the hooks'
products. In session 15, with Triton's ``addmm_small_`` and padded factors, the GPU's busy time fell below the
paired step's (130.1 against 133.5 ms), but the wall time did not follow (1.15× to 1.24× two forwards against 1.15×
to 1.21× paired): the step was bound by its Python. In session 16, with that Python cut (persistent hooks, a cached
update plan), the paired step took 1.12× to 1.13× and defer-8 1.11× to 1.14× (README, MeZO speed): no reliable gain,
and at the 1.1B shape defer-8 is slower and above 1.05× the inference memory.

The model computes the same function as with the updates written, up to rounding (in bfloat16 the K updates are
rounded into the weights once, not K times). Whatever reads the weights other than a ZO forward must see them
written: the optimizer writes them every K steps, and the ZO trainer before any other forward of the model's modules
(evaluation, generation), before its weights are saved and at the end of training. Each write is marked in the
optimizer's history, so that replay (:meth:`qft.zo.optimizer.ZoSGD.replay`) and resume write at the same points and
stay bit-exact.

Deferred: the weight matrices that rank1 directions without a mask perturb (those :func:`qft.zo.spsa.apply_update_`
moves by rank-one adds); norms, biases and other tensors are updated every step as before.
"""

from __future__ import annotations

from typing import Sequence

import torch

from qft.errors import QftError
from qft.zo import lowrank


class DeferredUpdates:
    """The rank-one updates of ``params``'s matrices not yet written into them: P rows of factors, each row c·u
    and v of every matrix one after another (c: the update's coefficient, −lr·g), float32, on the matrices'
    device (they must share one)."""

    def __init__(self, params: Sequence[torch.Tensor], every: int):
        self.params, self.every = list(params), int(every)
        self.which = [i for i, p in enumerate(self.params) if p.dim() == 2]
        devices = {self.params[i].device for i in self.which}
        if len(devices) > 1:
            raise QftError(f"--zo-defer keeps the pending updates on one device; the tuned matrices sit on "
                           f"{len(devices)} ({', '.join(sorted(map(str, devices)))})",
                           "leave --zo-defer at 1 for a model spread over several devices")
        self.offsets, at = {}, 0
        for i in self.which:
            self.offsets[i] = at
            at += sum(self.params[i].shape)
        self.rows: list[torch.Tensor] = []
        self.steps = 0  # steps whose updates are pending
        self.active = 0  # ZO forwards in progress: they take the pending updates in their hooks
        self._cast: dict[torch.dtype, torch.Tensor] = {}
        self._u: torch.Tensor | None = None

    def __bool__(self) -> bool:
        return bool(self.rows)

    def _u_mask(self) -> torch.Tensor:
        """True where a row holds a u (scaled by the update's coefficient), False where a v."""
        if self._u is None:
            device = self.params[self.which[0]].device
            self._u = torch.zeros(sum(sum(self.params[i].shape) for i in self.which), dtype=torch.bool, device=device)
            for i in self.which:
                self._u[self.offsets[i]:self.offsets[i] + self.params[i].shape[0]] = True
        return self._u

    def add(self, seeds_and_coefs: Sequence[tuple[int, float]]) -> None:
        """Keep one step's updates, ``coef``·u·vᵀ of each matrix for each direction ``seed`` (the factors the step's
        forwards drew, :func:`qft.zo.lowrank.prefetch`)."""
        from qft.zo.spsa import tensor_seed

        if not self.which:
            return
        ps = [self.params[i] for i in self.which]
        for seed, coef in seeds_and_coefs:
            uvs = lowrank.prefetch(ps, [tensor_seed(seed, i) for i in self.which], seed)
            row, _ = lowrank.stacked([uvs])
            self.rows.append(row * torch.where(self._u_mask(), coef, 1.0))
        self.steps += 1
        self._cast.clear()

    def flat(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The pending rows as one P × (Σ m + n) tensor in ``dtype`` (cast once while they stay the same)."""
        got = self._cast.get(dtype)
        if got is None:
            got = self._cast[dtype] = torch.cat(self.rows).to(dtype)
        return got

    def add_to(self, t: torch.Tensor, i: int) -> None:
        """t += the pending updates of matrix ``i`` (``t``: the matrix itself or a perturbed copy of it)."""
        u, v = lowrank.split_stacked(self.flat(t.dtype), self.offsets[i], t.shape)
        t.addmm_(u.t(), v)

    @torch.no_grad()
    def write(self) -> bool:
        """Write the pending updates into the matrices and forget them; whether there were any."""
        had = bool(self.rows)
        if had:
            for i in self.which:
                self.add_to(self.params[i], i)
        self.clear()
        return had

    def clear(self) -> None:
        """Forget the pending updates without writing them."""
        self.rows.clear()
        self._cast.clear()
        self.steps = 0
