"""PEQA (Kim et al., 2023, arXiv:2305.14152): quantize the base's linear layers to 2/3/4-bit integers with RTN and
fine-tune only the quantization scales. The adapter is the new scales (a few hundred KiB for a 100M model);
merging gives a self-contained integer model.

    from peft import get_peft_model
    from qft.adapters.peqa import PeqaConfig
    model = get_peft_model(float_model, PeqaConfig(bits=3, group_size=128))   # quantizes, then trains scales
"""

from __future__ import annotations

from qft.adapters import MethodPlan
from qft.adapters.peqa.config import QUANT_METHOD, PeqaConfig
from qft.adapters.peqa.layer import IntLinear, PeqaLinear
from qft.adapters.peqa.model import PeqaModel
from qft.adapters.peqa.storage import (is_quantized_folder, load_quantized, quantize_model, quantize_to_folder,
                                       save_quantized)
from qft.registry import register_method

register_method(name="peqa", config_cls=PeqaConfig, model_cls=PeqaModel)

__all__ = ["PeqaConfig", "PeqaModel", "PeqaLinear", "IntLinear", "plan", "quantize_model", "save_quantized",
           "load_quantized", "quantize_to_folder", "is_quantized_folder", "QUANT_METHOD"]


def plan(cfg) -> MethodPlan:
    """``qft finetune --method peqa --bits 3 --group-size 128``: a float base (quantized when the adapter is
    applied) or a folder written by ``qft quantize`` (its settings must match ``--bits``/``--group-size``)."""
    import torch

    from qft.adapters.peqa.gptq import gptq_settings, load_gptq
    from qft.adapters.qlora import lora_targets
    from qft.errors import QftError
    from qft.models import load_base

    peft_config = PeqaConfig(bits=cfg.bits, group_size=cfg.group_size, target_modules=lora_targets(cfg.target_modules),
                             task_type="CAUSAL_LM")
    source = {}

    def load(model_id: str):
        if is_quantized_folder(model_id):
            source["quantized_base"] = model_id
            return load_quantized(model_id, expect=(cfg.bits, cfg.group_size))
        gptq = gptq_settings(model_id)
        if gptq is not None:  # PEQA on GPTQ's integers (optional gptqmodel)
            if gptq != (cfg.bits, cfg.group_size):
                raise QftError(f"{model_id} is GPTQ-quantized to {gptq[0]} bits in groups of {gptq[1]}",
                               f"pass --bits {gptq[0]} --group-size {gptq[1]}")
            source["quantized_base"], source["rounding"] = model_id, "gptq"
            return load_gptq(model_id)
        return load_base(model_id, None)

    return MethodPlan(load_base=load, peft_config=peft_config,
                      describe_base=lambda: {**peft_config.quant_record(), **source})
