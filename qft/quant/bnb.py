"""bitsandbytes 4-bit weights behind one interface.

bitsandbytes 0.50 on CPU silently repacks a ``Linear4bit`` weight into a CPU-only layout the first time
the layer runs under ``no_grad`` in eval mode (``_convert_weight_packed_for_cpu``). Afterwards
``bnb.functional.dequantize_4bit`` and the training path both read that layout as if it were the
standard one: peft's 4-bit merge then produces garbage (relative weight error ~1.4 measured on a tiny
Llama) and training after an evaluation diverges. qft keeps the standard layout, so evaluation, training
and merging can interleave on any device.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


def keep_bnb_layout(model: nn.Module) -> int:
    """Undo any CPU repacking and stop ``Linear4bit`` layers from repacking again; returns layers touched."""
    try:
        import bitsandbytes as bnb
        from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse
    except ImportError:  # no bitsandbytes: nothing can be repacked
        return 0
    n = 0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False  # the only switch for the repacking, checked per forward
            weight = module.weight
            state = getattr(weight, "quant_state", None)
            if state is not None and getattr(state, "packing_format_for_cpu", False):
                weight.data, weight.quant_state = _convert_weight_packed_for_cpu_inverse(weight.data, state)
                module.quant_state = weight.quant_state
            n += 1
    return n


def dequantize_nf4(weight) -> torch.Tensor:
    """The dense weight of a bitsandbytes ``Params4bit`` in the standard layout."""
    import bitsandbytes as bnb

    state = weight.quant_state
    if getattr(state, "packing_format_for_cpu", False):
        from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

        # the inverse edits the state it is given in place; work on a copy so the layer stays usable
        data, state = _convert_weight_packed_for_cpu_inverse(weight.data, copy.deepcopy(state))
        return bnb.functional.dequantize_4bit(data, state)
    return bnb.functional.dequantize_4bit(weight.data, state)
