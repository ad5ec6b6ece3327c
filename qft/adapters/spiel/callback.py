"""``SpielCallback``: SpIEL's drop-and-regrow cycle as a transformers ``TrainerCallback`` (TRL included).

Every ``reselect_every`` optimizer steps (read from the model's ``SpielConfig``), for every sparse delta:

1. drop the fraction ``f`` of active entries with the smallest ``|delta|`` (their values leave the delta);
2. regrow as many inactive entries: with ``regrow="rigl"``, those with the largest ``|sum of gradients|``
   over the last ``accumulation_steps`` steps (candidates: the top-k dense-gradient entries of the first of
   those steps, as in the reference code); with ``regrow="sm3"``, the largest ``row_acc[i] * col_acc[j]`` of
   SM3 accumulators fed by the active entries' gradients every step;
3. remap the optimizer's per-entry state (Adam's ``exp_avg``/``exp_avg_sq``, float or bitsandbytes 8-bit, which
   is dequantized, remapped and requantized): surviving entries keep their moments at their new positions,
   new entries start at 0 (value and moments).

``f`` decays linearly (or by a cosine) from ``reselect_fraction`` at step 0 to 0 at the last step; no
reselection happens at the last step, which would throw trained values away. Memory: RigL scoring forms
one layer's dense ``grad_W`` at a time during the accumulation steps and keeps ``2 k`` numbers per layer;
SM3 keeps ``out + in`` numbers per layer and forms one layer's dense score at each reselection. The
candidate sums and accumulators are not saved in checkpoints: a resumed run restarts them.
"""

from __future__ import annotations

import logging

import torch
from transformers import TrainerCallback

from qft.adapters.spiel.layer import SpielLinear
from qft.sparse import (
    regrow_from_candidates,
    regrow_from_scores,
    remap_optimizer_state,
    remap_state,
    reselect,
    reselect_fraction,
    sm3_scores,
    sm3_update,
)

log = logging.getLogger("qft.spiel")


class SpielCallback(TrainerCallback):
    """Drop and regrow SpIEL's sparse deltas during training; ``history`` records every reselection."""

    def __init__(self):
        self.history: list[dict] = []
        self._cand: dict = {}  # (layer id, adapter) -> [candidate indices, summed gradients]
        self._sm3: dict = {}  # (layer id, adapter) -> (row accumulator, column accumulator)

    # --- which deltas --------------------------------------------------------------------------------------
    @staticmethod
    def deltas(model):
        """(layer, adapter name, config) of every active sparse delta in ``model``."""
        configs = getattr(model, "peft_config", {})
        out = []
        for m in model.modules():
            if isinstance(m, SpielLinear):
                for name in m.active_adapters:
                    if name in m.spiel_values and name in configs:
                        out.append((m, name, configs[name]))
        return out

    # --- RigL: accumulate dense gradients of candidates during the last steps of each cycle ---------------
    def _probe(self, key, k):
        @torch.no_grad()
        def probe(grad_w: torch.Tensor):
            flat = grad_w.reshape(-1)
            if key not in self._cand:
                cand = torch.topk(flat.abs(), min(k, flat.numel()), sorted=False).indices
                self._cand[key] = [cand, flat[cand].clone()]
            else:
                cand, sums = self._cand[key]
                sums += flat[cand]

        return probe

    def on_step_begin(self, args, state, control, model=None, **kw):
        step = state.global_step + 1  # the step about to run
        for layer, name, cfg in self.deltas(model):
            scoring = cfg.regrow == "rigl" and (-step) % cfg.reselect_every < cfg.accumulation_steps
            if scoring and name not in layer.spiel_probe:
                layer.spiel_probe[name] = self._probe((id(layer), name), layer.spiel_values[name].numel())

    # --- SM3: row/column accumulators of the active entries' squared gradients -----------------------------
    def on_pre_optimizer_step(self, args, state, control, model=None, **kw):
        for layer, name, cfg in self.deltas(model):
            grad = layer.spiel_values[name].grad
            if cfg.regrow != "sm3" or grad is None:
                continue
            key = (id(layer), name)
            if key not in self._sm3:
                dev = grad.device
                self._sm3[key] = (torch.zeros(layer.shape[0], device=dev), torch.zeros(layer.shape[1], device=dev))
            sm3_update(*self._sm3[key], layer.spiel_indices[name], grad)

    # --- the reselection -------------------------------------------------------------------------------------
    def on_step_end(self, args, state, control, model=None, optimizer=None, **kw):
        step, total = state.global_step, state.max_steps
        for layer, name, cfg in self.deltas(model):
            if step % cfg.reselect_every or step >= total:
                continue
            layer.spiel_probe.pop(name, None)
            frac = reselect_fraction(step, total, cfg.reselect_fraction, cfg.reselect_decay)
            replaced = self.reselect_layer(layer, name, cfg.regrow, frac, optimizer)
            self.history.append({"step": step, "fraction": frac, "replaced": replaced,
                                 "active": layer.spiel_indices[name].numel()})
        if self.history and self.history[-1]["step"] == step:
            rows = [h for h in self.history if h["step"] == step]
            log.info("step %d: SpIEL replaced %d of %d active entries", step, sum(h["replaced"] for h in rows),
                     sum(h["active"] for h in rows))

    @torch.no_grad()
    def reselect_layer(self, layer: SpielLinear, name: str, regrow: str, fraction: float, optimizer=None) -> int:
        """Drop and regrow one delta in place; returns how many entries changed."""
        key = (id(layer), name)
        values, old = layer.spiel_values[name], layer.spiel_indices[name]
        n = int(values.numel() * fraction)
        if regrow == "rigl":
            cand = self._cand.pop(key, None)
            if cand is None:  # no backward ran in the scoring window: nothing to regrow from
                return 0
            grow = lambda exclude, m: regrow_from_candidates(cand[0], cand[1].abs(), exclude, m)  # noqa: E731
        else:
            if key not in self._sm3:
                return 0
            grow = lambda exclude, m: regrow_from_scores(sm3_scores(*self._sm3[key]), exclude, m)  # noqa: E731
        if n == 0:
            return 0
        new = reselect(old, values, n, grow)
        changed = int((remap_state(old, new, torch.ones_like(values)) == 0).sum())
        values.copy_(remap_state(old, new, values))
        opt = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps the torch optimizer
        if opt is not None and values in opt.state:  # Adam's moments, float or 8-bit (bitsandbytes)
            remap_optimizer_state(opt.state[values], old, new, values.numel())
        old.copy_(new)
        return changed
