"""MeZO (Malladi et al., 2023, arXiv:2305.17333): zeroth-order SGD over all weights, at inference memory.

``qft finetune --method mezo`` tunes every weight of a float32 base with two forward passes per step and
saves the whole model. For ZO over an adapter instead (LoRA, PEQA scales, SpIEL deltas), use
``qft.zo.trainer.zo_sft_trainer_cls()`` with that method's ``peft_config`` from Python.
"""

from __future__ import annotations

from qft.adapters import MethodPlan


def plan(cfg) -> MethodPlan:
    from qft.adapters.sparse_mezo import zo_plan

    return zo_plan(cfg, None)
