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
from qft.zo.spsa import MaskFn, apply_update_


class ZoSGD(torch.optim.Optimizer):
    def __init__(self, params, lr: float = 1e-6, weight_decay: float = 0.0, seed: int = 0,
                 mask_fn: MaskFn | None = None, dist: str = "gaussian"):
        if lr < 0:
            raise ValueError(f"invalid learning rate {lr}")
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay))
        if weight_decay and getattr(mask_fn, "in_kernel", False):
            raise QftError("weight decay would move the weights a magnitude mask leaves out (and change the mask "
                           "before the update)", "pass --weight-decay 0 with an in-place Sparse-MeZO mask")
        self.mask_fn, self.dist = mask_fn, dist
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
            self._apply(entry)
            self.zo_state.setdefault("history", []).append(entry)
            self._pending.clear()
        self.zo_state["t"] += 1
        return None

    def _apply(self, entry: dict) -> None:
        directions = [(int(seed), float(g)) for seed, g in entry["directions"]]
        for group, (lr, weight_decay, *_) in zip(self.param_groups, entry["groups"]):
            params = group["params"]
            apply_update_(params, directions, lr=lr, weight_decay=weight_decay,
                          decay_mask=[p.ndim >= 2 for p in params], mask_fn=self.mask_fn, dist=self.dist)

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
