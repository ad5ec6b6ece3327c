"""SpIEL (Ansell et al., 2024, "Scaling Sparse Fine-Tuning to Large Language Models", arXiv:2401.16405).

Every targeted Linear weight ``W`` (float, or bitsandbytes NF4 for "sparse QLoRA") gets a sparse delta: a
sorted index buffer and a values vector, the only trainable tensors. ``SpielCallback`` (a transformers
``TrainerCallback``) drops the smallest deltas every ``reselect_every`` steps and regrows as many new
entries, RigL-style (accumulated gradients) or from SM3 row/column accumulators, remapping Adam's state.

    model = get_peft_model(base, qft.SpielConfig(density="0.01"))
    SFTTrainer(model=model, ..., callbacks=[qft.SpielCallback()])
"""

from __future__ import annotations

from qft.adapters import MethodPlan
from qft.adapters.spiel.callback import SpielCallback
from qft.adapters.spiel.config import SpielConfig
from qft.adapters.spiel.layer import SpielLinear
from qft.adapters.spiel.model import SpielModel
from qft.registry import register_method

register_method(name="spiel", config_cls=SpielConfig, model_cls=SpielModel, prefix="spiel_")

__all__ = ["SpielCallback", "SpielConfig", "SpielLinear", "SpielModel", "plan"]


# SST-2 on SmolLM2-135M at LoRA r8's parameter count, 300 steps: 1e-3 gave 90.1 (CPU, float32) where LoRA's
# 5e-4 gave 87.8 (H200); sparse deltas start from a random set of entries and need the larger step
DEFAULT_LR = 1e-3


def plan(cfg) -> MethodPlan:
    """``qft finetune --method spiel --density 0.01``: sparse deltas over the float base (TRL's SFTTrainer).

    ``--quantize-base`` (``quantize_base=True``) loads the base in NF4 instead ("sparse QLoRA").
    """
    import torch

    from qft.adapters.qlora import lora_targets
    from qft.models import QuantSettings, load_base

    config = SpielConfig(density=cfg.density if cfg.density is not None else "0.01",
                         target_modules=lora_targets(cfg.target_modules), reselect_every=cfg.reselect_every,
                         accumulation_steps=min(5, cfg.reselect_every), seed=cfg.seed, task_type="CAUSAL_LM",
                         regrow=cfg.regrow)
    if cfg.quantize_base:
        quant = QuantSettings(double_quant=cfg.double_quant)
        return MethodPlan(load_base=lambda model_id: load_base(model_id, quant), peft_config=config,
                          callbacks=[SpielCallback()], describe_base=quant.to_dict, default_lr=DEFAULT_LR)
    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32  # the deltas stay float32
    return MethodPlan(load_base=lambda model_id: load_base(model_id, None, dtype=dtype), peft_config=config,
                      callbacks=[SpielCallback()], default_lr=DEFAULT_LR)
