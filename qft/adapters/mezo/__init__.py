"""MeZO (Malladi et al., 2023, arXiv:2305.17333): zeroth-order SGD over all weights, at inference memory.

``qft finetune --method mezo`` tunes every weight of a float32 base with two forward passes per step and
saves the whole model. For ZO over an adapter instead (LoRA, PEQA scales, SpIEL deltas), use
``qft.zo.trainer.zo_sft_trainer_cls()`` with that method's ``peft_config`` from Python.
"""

from __future__ import annotations

import functools

from qft.adapters import MethodPlan


def zo_plan(cfg, peft_config) -> MethodPlan:
    """Shared by MeZO and Sparse-MeZO: a float32 base and TRL's SFTTrainer driven by ZO-SGD."""
    import torch

    from qft.models import load_base
    from qft.zo.trainer import ZoArguments, zo_sft_trainer_cls

    zo = ZoArguments(eps=cfg.zo_eps, samples=cfg.zo_samples, distribution=cfg.zo_distribution,
                     paired=cfg.zo_paired)
    return MethodPlan(
        load_base=lambda model_id: load_base(model_id, None, dtype=torch.float32),
        peft_config=peft_config,
        trainer_cls=functools.partial(zo_sft_trainer_cls(), zo=zo),
        default_lr=1e-6,  # MeZO's SST-2 setting (Malladi et al., Table 15: 1e-6 / 1e-7 for full-parameter ZO)
        sft_overrides={"bf16": False},
    )


def with_zo_objective(plan: MethodPlan, objective) -> MethodPlan:
    """The same ZO plan with ``objective(model, inputs)`` as what the two forwards measure."""
    import dataclasses

    zo = dataclasses.replace(plan.trainer_cls.keywords["zo"], objective=objective)
    return dataclasses.replace(plan, trainer_cls=functools.partial(plan.trainer_cls.func, zo=zo))


def plan(cfg) -> MethodPlan:
    return zo_plan(cfg, None)
