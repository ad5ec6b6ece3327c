from __future__ import annotations

from peft.tuners.tuners_utils import BaseTuner
from torch import nn

from qft.adapters.sparse_mezo.layer import SparseMezoLinear
from qft.errors import QftError


class SparseMezoModel(BaseTuner):
    prefix = "sparse_mezo_"
    tuner_layer_cls = SparseMezoLinear
    target_module_mapping: dict = {}


    def _create_and_replace(self, config, adapter_name, target, target_name, parent, current_key=None, **kw):
        if isinstance(target, SparseMezoLinear):
            target.update_layer(adapter_name, config.density, config.delta_dtype)
            return
        if type(target) is not nn.Linear:
            raise QftError(f"Sparse-MeZO targets float nn.Linear layers; {current_key} is {type(target).__name__}",
                           "load the base in float (not 4-bit) or target other layers")
        new = SparseMezoLinear(target, adapter_name, config.density, config.delta_dtype)
        self._replace_module(parent, target_name, new, target)
