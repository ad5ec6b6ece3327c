"""``SpielModel``: peft's tuner that puts a ``SpielLinear`` on every targeted Linear."""

from __future__ import annotations

import zlib

import torch
from peft.tuners.tuners_utils import BaseTuner, check_target_module_exists
from torch import nn

from qft.adapters.spiel.layer import SpielLinear
from qft.sparse import parse_density


class SpielModel(BaseTuner):
    prefix = "spiel_"
    tuner_layer_cls = SpielLinear
    target_module_mapping: dict = {}


    def _counts(self, config, adapter_name: str) -> dict[str, int]:
        """Entries per targeted module, over all targets at once (a total count is shared out)."""
        cache = self.__dict__.setdefault("_spiel_counts", {})
        if adapter_name not in cache:
            keys, shapes = [], []
            for key, module in self.model.named_modules():
                layer = module.get_base_layer() if isinstance(module, SpielLinear) else module
                if isinstance(layer, nn.Linear) and check_target_module_exists(config, key):
                    keys.append(key)
                    shapes.append((layer.out_features, layer.in_features))
            cache[adapter_name] = dict(zip(keys, parse_density(config.density).counts(shapes)))
        return cache[adapter_name]

    def _create_and_replace(self, config, adapter_name, target, target_name, parent, current_key=None, **kw):
        k = self._counts(config, adapter_name)[current_key]
        seed = zlib.crc32(f"{config.seed}:{current_key}".encode())  # per layer, stable across processes
        dtype = getattr(torch, config.delta_dtype)
        if isinstance(target, SpielLinear):
            target.update_layer(adapter_name, k, seed, dtype)
            return
        if not isinstance(target, nn.Linear):
            raise ValueError(f"SpIEL only targets Linear layers, got {type(target).__name__} at {current_key}.")
        self._replace_module(parent, target_name, SpielLinear(target, adapter_name, k, seed, dtype), target)

    def spiel_layers(self):
        """(name, layer) of every SpielLinear in the model."""
        return [(n, m) for n, m in self.model.named_modules() if isinstance(m, SpielLinear)]
