"""QLoRA (Dettmers et al., 2023, arXiv:2305.14314): peft's LoRA over a bitsandbytes 4-bit NF4 base.

qft adds no new adapter type here: the saved adapter is a standard peft LoRA adapter. What qft adds is
the loading (double quantization, bf16 compute on GPU, bitsandbytes' standard layout kept on CPU), the
lean RMSNorm/SwiGLU kernels, and the record of the base's quantization beside the adapter.
"""

from __future__ import annotations

from qft.adapters import MethodPlan


def lora_targets(spec: str):
    if spec.strip() == "all-linear":
        return "all-linear"
    return [t.strip() for t in spec.split(",") if t.strip()]


def plan(cfg) -> MethodPlan:
    from peft import LoraConfig

    from qft.kernels import apply_fused_layers
    from qft.models import QuantSettings, load_base

    quant = QuantSettings(double_quant=cfg.double_quant)
    return MethodPlan(
        load_base=lambda model_id: load_base(model_id, quant),
        peft_config=LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                               target_modules=lora_targets(cfg.target_modules), task_type="CAUSAL_LM"),
        describe_base=quant.to_dict,
        # The lean kernels save activation memory; under gradient checkpointing there is little left to save
        # and their recomputation made steps slower (0.81x stock TRL at the 8B shape on an H200), so they
        # are used only without checkpointing.
        after_load=apply_fused_layers if cfg.fused_kernels and not cfg.gradient_checkpointing else None,
    )
