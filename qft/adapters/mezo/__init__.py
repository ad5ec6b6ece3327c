"""MeZO (Malladi et al., 2023, arXiv:2305.17333): zeroth-order SGD over all weights, at inference memory.

``qft finetune --method mezo`` tunes every weight of a float32 base with two forward passes per step and
saves the whole model. ``--zo-adapter lora|qlora|peqa|spiel`` tunes that method's adapter instead, on that
method's base (NF4 for qlora, integers for peqa), and saves the adapter; from Python, pass the method's
``peft_config`` to ``qft.zo.trainer.zo_sft_trainer_cls()``.
"""

from __future__ import annotations

import functools

from qft.adapters import MethodPlan


ZO_ADAPTERS = ("lora", "qlora", "peqa", "spiel")


def float32_base(model_id: str):
    import torch

    from qft.models import load_base

    return load_base(model_id, None, dtype=torch.float32)


def zo_plan(cfg, peft_config, over: MethodPlan | None = None) -> MethodPlan:
    """Shared by MeZO and Sparse-MeZO: a float32 base and TRL's SFTTrainer driven by ZO-SGD; with ``over``
    (another method's plan), that method's base, adapter and base record instead."""
    from qft.zo.trainer import ZoArguments, zo_sft_trainer_cls

    zo = ZoArguments(eps=cfg.zo_eps, samples=cfg.zo_samples, distribution=cfg.zo_distribution,
                     paired=cfg.zo_paired, defer=cfg.zo_defer)
    return MethodPlan(
        load_base=over.load_base if over else float32_base,
        peft_config=over.peft_config if over else peft_config,
        trainer_cls=functools.partial(zo_sft_trainer_cls(), zo=zo),
        describe_base=over.describe_base if over else None,
        # MeZO's SST-2 settings (Malladi et al., Table 15): 1e-6 / 1e-7 for all weights, 1e-4 / 5e-5 for LoRA
        default_lr=1e-4 if over else 1e-6,
        sft_overrides={"bf16": False},
    )


def adapter_plan(cfg) -> MethodPlan:
    """The plan of the method ``--zo-adapter`` names: its base and adapter, not its trainer or callbacks (SpIEL's
    drop and regrow needs gradients, so under ZO its deltas keep their first selection)."""
    from qft.adapters import peqa, qlora, spiel

    if cfg.zo_adapter == "lora":  # LoRA's config on MeZO's float32 base
        return MethodPlan(load_base=float32_base, peft_config=qlora.plan(cfg).peft_config)
    return {"qlora": qlora.plan, "peqa": peqa.plan, "spiel": spiel.plan}[cfg.zo_adapter](cfg)


def with_zo_objective(plan: MethodPlan, objective) -> MethodPlan:
    """The same ZO plan with ``objective(model, inputs)`` as what the two forwards measure."""
    import dataclasses

    zo = dataclasses.replace(plan.trainer_cls.keywords["zo"], objective=objective)
    return dataclasses.replace(plan, trainer_cls=functools.partial(plan.trainer_cls.func, zo=zo))


def plan(cfg) -> MethodPlan:
    return zo_plan(cfg, None, adapter_plan(cfg) if cfg.zo_adapter else None)
