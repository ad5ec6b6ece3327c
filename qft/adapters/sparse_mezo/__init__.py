"""Sparse-MeZO (Liu et al., 2024, arXiv:2402.15751) as a PEFT method: MeZO on each layer's small weights.

    model = peft.get_peft_model(base, qft.SparseMezoConfig(density=0.2))
    trainer = qft.zo.trainer.zo_sft_trainer_cls()(model=model, args=SFTConfig(learning_rate=1e-6, ...), ...)

``qft finetune --method sparse-mezo --density 0.2`` does the same from the command line.
"""

from __future__ import annotations

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


def plan(cfg) -> MethodPlan:
    from qft.adapters.mezo import zo_plan
    from qft.adapters.qlora import lora_targets

    return zo_plan(cfg, SparseMezoConfig(density=parse_fraction(cfg.density, 0.2),
                                         target_modules=lora_targets(cfg.target_modules), task_type="CAUSAL_LM"))
