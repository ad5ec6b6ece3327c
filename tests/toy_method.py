"""A small but complete PEFT method defined outside qft and peft, to prove qft's registry.

"RowScale": every targeted Linear gets a learnable per-output-channel scale ``g`` (initialised to 1),
so ``y = g * (W x) + b``. Merging multiplies the rows of ``W`` (and ``b``) by ``g``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Union

import torch
from peft.config import PeftConfig
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from torch import nn

from qft.registry import register_method


@dataclass
class RowScaleConfig(PeftConfig):
    target_modules: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Module names (or a regex) to scale."}
    )

    def __post_init__(self):
        super().__post_init__()
        from peft.utils.peft_types import PeftType

        self.peft_type = PeftType.ROWSCALE


class RowScaleLayer(nn.Module, BaseTunerLayer):
    adapter_layer_names = ("rowscale_g",)

    def __init__(self, base_layer: nn.Linear, adapter_name: str):
        super().__init__()
        self.base_layer = base_layer
        self.rowscale_g = nn.ParameterDict()
        self.merged_adapters = []
        self.update_layer(adapter_name)

    def update_layer(self, adapter_name: str) -> None:
        w = self.get_base_layer().weight
        self.rowscale_g[adapter_name] = nn.Parameter(torch.ones(w.shape[0], dtype=w.dtype, device=w.device))
        self.set_adapter(self.active_adapters)

    def merge(self, safe_merge: bool = False, adapter_names=None) -> None:
        base = self.get_base_layer()
        for name in adapter_names or self.active_adapters:
            g = self.rowscale_g[name].data
            base.weight.data *= g[:, None]
            if base.bias is not None:
                base.bias.data *= g
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        base = self.get_base_layer()
        while self.merged_adapters:
            g = self.rowscale_g[self.merged_adapters.pop()].data
            base.weight.data /= g[:, None]
            if base.bias is not None:
                base.bias.data /= g

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        y = self.base_layer(x, *args, **kwargs)
        if self.disable_adapters or self.merged:
            return y
        for name in self.active_adapters:
            if name in self.rowscale_g:
                y = y * self.rowscale_g[name]
        return y


class RowScaleModel(BaseTuner):
    prefix = "rowscale_"
    tuner_layer_cls = RowScaleLayer
    target_module_mapping: dict = {}


    def _create_and_replace(self, config, adapter_name, target, target_name, parent, current_key=None, **kw):
        if isinstance(target, RowScaleLayer):
            target.update_layer(adapter_name)
            return
        if not isinstance(target, nn.Linear):
            raise ValueError(f"RowScale only targets nn.Linear, got {type(target).__name__} at {current_key}.")
        self._replace_module(parent, target_name, RowScaleLayer(target, adapter_name), target)


register_method(name="rowscale", config_cls=RowScaleConfig, model_cls=RowScaleModel)
