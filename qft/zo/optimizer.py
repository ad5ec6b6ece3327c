"""ZO-SGD as a ``torch.optim.Optimizer``, so that transformers' loop, LR schedulers and checkpoints drive it.

The trainer reports ``(seed, projected_grad)`` pairs with :meth:`ZoSGD.record` during ``training_step``;
``step()`` applies them (regenerating z) and advances the step counter that the next seeds derive from.
The counter is in ``state_dict()``, so a resumed run draws the same directions: resume is bit-exact.

The state also keeps each step's history: its directions' seeds and projected gradients, and each group's learning
rate and weight decay, a few numbers a step. With the seed trick that is the whole trajectory (MeZO, section 2:
a fine-tuned model can be stored as its seeds and projected gradients): :meth:`ZoSGD.replay` rebuilds the trained
weights from the starting ones, bit-exactly on the same kind of device, so a checkpoint's weights can be recovered
from its ``optimizer.pt`` alone: ``ZoSGD(params, ...).replay(torch.load("./optimizer.pt")["zo"]["history"])``.
"""

from __future__ import annotations

import torch

from qft.errors import QftError
from qft.zo.defer import DeferredUpdates
from qft.zo.spsa import MaskFn, apply_update_


class ZoSGD(torch.optim.Optimizer):
    """``defer=K`` (rank1 directions only): the weight matrices' rank-one updates are written into them every K steps
    and kept pending in between, where the perturbed forwards take them (:mod:`qft.zo.defer`: pass ``pending=
    opt.deferred`` to :func:`qft.zo.spsa.perturbed` or :func:`qft.zo.spsa.perturbed_pair`); call :meth:`flush` before
    anything else reads the weights. The ZO trainer does both."""

    def __init__(self, params, lr: float = 1e-6, weight_decay: float = 0.0, seed: int = 0,
                 mask_fn: MaskFn | None = None, dist: str = "gaussian", defer: int = 1):
        if lr < 0:
            raise ValueError(f"invalid learning rate {lr}")
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay))
        if weight_decay and getattr(mask_fn, "in_kernel", False):
            raise QftError("weight decay would move the weights a magnitude mask leaves out (and change the mask "
                           "before the update)", "pass --weight-decay 0 with an in-place Sparse-MeZO mask")
        self.mask_fn, self.dist, self.defer = mask_fn, dist, int(defer)
        self.deferred: DeferredUpdates | None = None
        if self.defer < 1:
            raise QftError(f"--zo-defer must be at least 1, got {defer}",
                           "pass --zo-defer 1 (write every step) or more")
        if self.defer > 1:
            if dist != "rank1":
                raise QftError(f"--zo-defer keeps rank-one updates pending; this run draws {dist} directions",
                               "pass --zo-distribution rank1, or leave --zo-defer at 1")
            if mask_fn is not None:
                raise QftError("--zo-defer does not apply under a mask (its directions are not rank one)",
                               "leave --zo-defer at 1 for Sparse-MeZO in place")
            if weight_decay or len(self.param_groups) > 1:
                raise QftError("--zo-defer needs one rate for all weights and no weight decay (it would rescale "
                               "weights whose updates are pending)", "pass --weight-decay 0, or leave --zo-defer at 1")
            self.deferred = DeferredUpdates(self.params, self.defer)
        self.zo_state = {"t": 0, "seed": int(seed), "history": []}
        self._pending: list[tuple[int, float]] = []

    @property
    def params(self) -> list[torch.Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    def step_seed(self, sample: int = 0) -> int:
        """The seed of direction ``sample`` of the coming step (the same on every rank)."""
        zo = self.zo_state
        return (zo["seed"] * 7_919 + zo["t"]) * 64 + sample

    def record(self, seed: int, projected_grad: float) -> None:
        self._pending.append((seed, float(projected_grad)))

    @torch.no_grad()
    def step(self, closure=None):
        if self._pending:
            # merge contributions of the same direction (gradient accumulation micro-batches)
            merged: dict[int, float] = {}
            for seed, g in self._pending:
                merged[seed] = merged.get(seed, 0.0) + g
            entry = {"t": self.zo_state["t"], "directions": [list(d) for d in merged.items()], "dist": self.dist,
                     "groups": [[group["lr"], group["weight_decay"], len(group["params"])]
                                for group in self.param_groups]}
            if self.deferred is not None:
                entry["deferred"] = True
            self._apply(entry)
            self.zo_state.setdefault("history", []).append(entry)
            self._pending.clear()
            if self.deferred is not None and self.deferred.steps >= self.defer:
                self.flush()
        self.zo_state["t"] += 1
        return None

    def flush(self) -> None:
        """Write the deferred updates (``defer`` > 1) into the weights, marking the point in the history (replay and
        resume write there too)."""
        if self.deferred is not None and self.deferred.write():
            self.zo_state["history"][-1]["flush"] = True

    def _deferred(self) -> DeferredUpdates:
        if self.deferred is None:  # replaying a run that deferred, with an optimizer that does not
            self.deferred = DeferredUpdates(self.params, self.defer)
        return self.deferred

    def _apply(self, entry: dict) -> None:
        directions = [(int(seed), float(g)) for seed, g in entry["directions"]]
        skip = self._deferred().which if entry.get("deferred") else ()
        for group, (lr, weight_decay, *_) in zip(self.param_groups, entry["groups"]):
            params = group["params"]
            apply_update_(params, directions, lr=lr, weight_decay=weight_decay,
                          decay_mask=[p.ndim >= 2 for p in params], mask_fn=self.mask_fn, dist=self.dist, skip=skip)
        if skip:
            self._defer(entry)

    def _defer(self, entry: dict) -> None:
        lr = entry["groups"][0][0]
        self._deferred().add([(int(seed), -lr * float(g)) for seed, g in entry["directions"]])

    @torch.no_grad()
    def replay(self, history: list[dict]) -> None:
        """Apply the updates of ``history`` (``state_dict()["zo"]["history"]`` of a run started from the weights this
        optimizer holds now) in order: the weights become that run's, bit-exactly on the same kind of device (the
        same kernels draw the same directions). The step counter and the history then continue from its end."""
        for entry in history[:1]:  # the same directions must be drawn, over the same tensors
            if entry.get("dist", self.dist) != self.dist:
                raise QftError(f"the checkpoint's steps were drawn with --zo-distribution {entry['dist']}, not "
                               f"{self.dist}", f"resume with --zo-distribution {entry['dist']}")
            sizes = [g[2] for g in entry["groups"] if len(g) > 2]
            if len(entry["groups"]) != len(self.param_groups) or sizes and sizes != [
                    len(g["params"]) for g in self.param_groups]:
                raise QftError(f"the checkpoint's steps updated {sum(sizes)} tensors, this model has "
                               f"{sum(len(g['params']) for g in self.param_groups)} trainable ones",
                               "resume with the same --model and method options as the run that saved it")
        for entry in history:
            self._apply(entry)
            if entry.get("flush") and self.deferred is not None:
                self.deferred.write()
        if history:
            self.zo_state["t"] = history[-1]["t"] + 1
            self.zo_state["history"] = [dict(e) for e in history]

    def zero_grad(self, set_to_none: bool = True):
        pass  # ZO keeps no gradients

    def state_dict(self):
        sd = super().state_dict()
        sd["zo"] = dict(self.zo_state)
        return sd

    def load_state_dict(self, state_dict):
        zo = state_dict.get("zo")
        super().load_state_dict({k: v for k, v in state_dict.items() if k != "zo"})
        if zo is not None:
            self.zo_state = {"history": [], **zo}
            if self.deferred is not None:
                self.deferred.clear()
            tail = []  # the deferred updates the saved weights do not hold yet: those since the last write
            for entry in reversed(self.zo_state["history"]):
                if entry.get("flush"):
                    break
                if entry.get("deferred"):
                    tail.append(entry)
            for entry in reversed(tail):
                self._defer(entry)
