"""Sparse-MeZO (Liu et al., 2024, arXiv:2402.15751) as a PEFT method: MeZO on each layer's small weights.

    model = peft.get_peft_model(base, qft.SparseMezoConfig(density=0.2))
    trainer = qft.zo.trainer.zo_sft_trainer_cls()(model=model, args=SFTConfig(learning_rate=1e-6, ...), ...)

``qft finetune --method sparse-mezo --density 0.2`` does the same from the command line.
"""

from __future__ import annotations

import functools

from qft.adapters import MethodPlan
from qft.adapters.sparse_mezo.config import SparseMezoConfig
from qft.adapters.sparse_mezo.layer import SparseMezoLinear
from qft.adapters.sparse_mezo.model import SparseMezoModel
from qft.errors import QftError
from qft.registry import register_method

register_method(name="sparse_mezo", config_cls=SparseMezoConfig, model_cls=SparseMezoModel)

__all__ = ["SparseMezoConfig", "SparseMezoLinear", "SparseMezoModel", "plan"]


def parse_fraction(spec: str | None, default: float) -> float:
    if spec is None:
        return default
    try:
        value = float(spec)
    except ValueError:
        raise QftError(f"--density {spec!r} is not a number", "pass a fraction such as 0.2") from None
    if not 0 < value < 1:
        raise QftError(f"--density must be in (0, 1) for Sparse-MeZO, got {value}", "pass a fraction such as 0.2")
    return value


def zo_plan(cfg, peft_config) -> MethodPlan:
    """Shared by MeZO and Sparse-MeZO: a float32 base and TRL's SFTTrainer driven by ZO-SGD."""
    import torch

    from qft.models import load_base
    from qft.zo.trainer import ZoArguments, zo_sft_trainer_cls

    zo = ZoArguments(eps=cfg.zo_eps, samples=cfg.zo_samples)
    return MethodPlan(
        load_base=lambda model_id: load_base(model_id, None, dtype=torch.float32),
        peft_config=peft_config,
        trainer_cls=functools.partial(zo_sft_trainer_cls(), zo=zo),
        default_lr=1e-6,  # MeZO's SST-2 setting (Malladi et al., Table 15: 1e-6 / 1e-7 for full-parameter ZO)
        sft_overrides={"bf16": False},
    )


def plan(cfg) -> MethodPlan:
    from qft.adapters.qlora import lora_targets

    return zo_plan(cfg, SparseMezoConfig(density=parse_fraction(cfg.density, 0.2),
                                         target_modules=lora_targets(cfg.target_modules), task_type="CAUSAL_LM"))
