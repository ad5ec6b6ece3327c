"""qft's methods, one package each: ``qft/adapters/<method>/{config,layer,model}.py`` (peft's layout).

Each package registers its peft method on import and exposes ``plan(cfg) -> MethodPlan``, which tells
``qft.train.finetune`` how to load the base, which peft config to apply, and which trainer and callbacks
to use.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable


@dataclass
class MethodPlan:
    """How ``finetune`` runs one method. Only ``peft_config`` and ``load_base`` are required."""

    load_base: Callable[[str], Any]  # model id/path -> base model (quantized or not)
    peft_config: Any  # a peft config passed to SFTTrainer(peft_config=...); None tunes the whole model
    trainer_cls: Any = None  # default: trl.SFTTrainer
    callbacks: list = field(default_factory=list)
    sft_overrides: dict = field(default_factory=dict)  # extra SFTConfig fields (e.g. optim for ZO methods)
    describe_base: Callable[[], dict] | None = None  # the base's quantization record, saved beside the adapter
    after_load: Callable[[Any], None] | None = None  # e.g. lean kernels
    export: Callable[[Any, Any], None] | None = None  # (trained model, folder): writes an adapter there itself
    default_lr: float = 5e-4  # used when the user gives no --learning-rate
