"""QST, Quantized Side Tuning (Zhang et al., 2024, arXiv:2401.07159), as a peft method.

The LLM (4-bit NF4 in real use) stays frozen and runs without autograd; a small side network, fed by the
LLM's per-layer hidden states through downsample modules and mixed in by learned gates, produces the state
that goes into the LLM's LM head. Memory for weights (4-bit), optimizer states (few trainable parameters)
and activations (no backward through the LLM) all shrink.

    model = get_peft_model(model, QstConfig(r=16, downsample="lora"))

With TRL, pass ``callbacks=[QstFloat32Callback()]``: SFTTrainer casts a quantized model's trainable
parameters to bf16 (its QLoRA policy); the callback casts the side network back to float32 before training.
"""

from __future__ import annotations

from transformers import TrainerCallback

from qft.adapters import MethodPlan
from qft.adapters.qst.config import DOWNSAMPLE_KINDS, QstConfig
from qft.adapters.qst.layer import QstLayer, SideNetwork
from qft.adapters.qst.model import SUPPORTED_MODEL_TYPES, QstModel
from qft.registry import register_method

__all__ = ["QstConfig", "QstModel", "QstLayer", "SideNetwork", "QstFloat32Callback", "SUPPORTED_MODEL_TYPES",
           "DOWNSAMPLE_KINDS", "plan"]

register_method(name="qst", config_cls=QstConfig, model_cls=QstModel, prefix="qst_")


class QstFloat32Callback(TrainerCallback):
    """Keep the side network in float32 (the optimizer's state is created at the first step, after this)."""

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        for module in model.modules():
            if isinstance(module, QstLayer):
                module.qst_net.float()


def plan(cfg) -> MethodPlan:
    """``qft finetune --method qst``: NF4 base, QstConfig(r=--side-reduction, downsample=--downsample)."""
    from qft.models import QuantSettings, load_base

    quant = QuantSettings(double_quant=cfg.double_quant)
    return MethodPlan(
        load_base=lambda model_id: load_base(model_id, quant),
        peft_config=QstConfig(r=cfg.side_reduction, downsample=cfg.downsample, dropout=cfg.lora_dropout,
                              input_norm=cfg.side_input_norm, standardize=cfg.side_standardize,
                              uniform_attention=cfg.side_uniform_attention, gate_init=cfg.side_gate_init,
                              gate_scale=cfg.side_gate_scale, readout=cfg.side_readout),
        describe_base=quant.to_dict,
        callbacks=[QstFloat32Callback()],
        # a side network trained from scratch needs a larger step than LoRA: 3e-3 reached 0.97 on the default
        # task in 150 steps where 5e-4 barely moved it (SmolLM2-135M, CPU, examples/qst)
        default_lr=3e-3,
    )
