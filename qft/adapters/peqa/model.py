"""``PeqaModel``: peft's BaseTuner for PEQA. It RTN-quantizes the targeted float ``nn.Linear`` layers (or takes
already-quantized :class:`IntLinear` layers as they are) and wraps each in a :class:`PeqaLinear`.

Loading an adapter onto a float base re-quantizes it the same way (RTN is deterministic), so the saved adapter
holds only the scales.
"""

from __future__ import annotations

from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from torch import nn

from qft.adapters.peqa.gptq import int_linear_from_gptq, is_gptq_layer
from qft.adapters.peqa.layer import IntLinear, PeqaLinear
from qft.errors import QftError

ALL_LINEAR = "all-linear"


def linear_module_names(model: nn.Module) -> set[str]:
    """Every float or integer linear layer except the output head and layers inside adapters."""
    found = {name for name, m in model.named_modules()
             if isinstance(m, (nn.Linear, IntLinear, PeqaLinear)) or is_gptq_layer(m)}
    inside = {f"{prefix}.{sub}" for prefix, m in model.named_modules() if isinstance(m, BaseTunerLayer)
              for sub, _ in m.named_modules() if sub}
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    heads = {name for name, m in model.named_modules() if head is not None and m is head}
    return found - inside - heads


def check_settings(layer: IntLinear, bits: int, group_size: int, where: str) -> None:
    if (layer.bits, layer.group_size) != (bits, group_size):
        raise QftError(
            f"{where} is quantized to {layer.bits} bits in groups of {layer.group_size}, but the PEQA adapter "
            f"expects {bits} bits in groups of {group_size}",
            f"use an adapter trained on this base, or quantize the base with --bits {bits} --group-size {group_size}")


class PeqaModel(BaseTuner):
    prefix = "peqa_"
    tuner_layer_cls = PeqaLinear
    target_module_mapping: dict = {}

    def _prepare_model(self, peft_config, model: nn.Module) -> None:
        # peft's own 'all-linear' sees only nn.Linear; PEQA also targets integer layers of a quantized base
        if isinstance(peft_config.target_modules, str) and peft_config.target_modules.lower() == ALL_LINEAR:
            names = linear_module_names(model)
            if not names:
                raise QftError("the model has no linear layers for PEQA to quantize",
                               "pass a decoder-only transformer (Llama, Qwen2, OPT...)")
            peft_config.target_modules = names


    def _create_and_replace(self, peft_config, adapter_name, target, target_name, parent, current_key=None, **kw):
        bits, group_size = peft_config.bits, peft_config.group_size
        if isinstance(target, PeqaLinear):
            check_settings(target.get_base_layer(), bits, group_size, current_key)
            target.update_layer(adapter_name)
            return
        if isinstance(target, IntLinear):
            check_settings(target, bits, group_size, current_key)
        elif isinstance(target, nn.Linear):
            target = IntLinear.from_linear(target, bits, group_size)
        elif is_gptq_layer(target):  # GPTQ's integers and scales, taken as they are
            target = int_linear_from_gptq(target)
            check_settings(target, bits, group_size, current_key)
        else:
            raise QftError(f"PEQA quantizes linear layers, but target {current_key!r} is of type {type(target).__name__}",
                           "pass --target-modules names of nn.Linear layers (e.g. q_proj,v_proj) or 'all-linear'")
        self._replace_module(parent, target_name, PeqaLinear(target, adapter_name), target)

    def _replace_module(self, parent, child_name, new_module, child) -> None:
        # peft's generic version copies ``weight``/``bias`` between modules; PEQA's layers carry their own
        # buffers, created on the device of the layer they replace, so setting the attribute is all it takes.
        setattr(parent, child_name, new_module)
