"""``SpielLinear``: a Linear (float or bitsandbytes 4-bit) plus a sparse delta, ``y = x (W + D)^T + b``.

The forward is ``qft.sparse.sparse_delta_linear``: the frozen weight (dequantized for a 4-bit base) plus the
scattered deltas, one dense matmul, whose backward gives gradients to ``x`` and to the active values only. The 4-bit base is never modified except by an explicit merge, which dequantizes,
adds the delta and requantizes, recording the requantization error in ``base_layer.qft_merge_error``.
"""

from __future__ import annotations

import logging

import torch
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from qft.sparse import random_indices, sparse_delta_linear
from qft.sparse.ops import scatter_dense

log = logging.getLogger("qft.spiel")


def is_4bit(weight) -> bool:
    return getattr(weight, "quant_state", None) is not None


class SpielLinear(nn.Module, BaseTunerLayer):
    adapter_layer_names = ("spiel_values",)
    other_param_names = ("spiel_indices",)

    def __init__(self, base_layer: nn.Linear, adapter_name: str, k: int, seed: int, dtype: torch.dtype):
        super().__init__()
        self.base_layer = base_layer
        self.shape = (base_layer.out_features, base_layer.in_features)
        self.spiel_values = nn.ParameterDict()
        # persistent, so that peft's state dict (which takes every tensor of a tuner layer) saves the indices
        self.spiel_indices = BufferDict(persistent=True)
        self.spiel_probe: dict = {}  # adapter -> callable receiving the dense grad_W (set during RigL scoring)
        self.merged_adapters = []
        self.update_layer(adapter_name, k, seed, dtype)

    def update_layer(self, adapter_name: str, k: int, seed: int, dtype: torch.dtype) -> None:
        device = self.base_layer.weight.device
        g = torch.Generator().manual_seed(seed)
        idx = random_indices(self.shape[0] * self.shape[1], k, g)
        self.spiel_indices[adapter_name] = idx.to(device)
        self.spiel_values[adapter_name] = nn.Parameter(torch.zeros(k, dtype=dtype, device=device))
        self.set_adapter(self.active_adapters)

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        return scatter_dense(self.spiel_values[adapter_name].detach(), self.spiel_indices[adapter_name], self.shape)

    def _add_to_base(self, adapter_name: str, sign: float) -> None:
        base = self.get_base_layer()
        values = self.spiel_values[adapter_name].detach() * sign
        idx = self.spiel_indices[adapter_name]
        if not is_4bit(base.weight):
            base.weight.data.view(-1).index_add_(0, idx, values.to(base.weight.dtype))
            return
        import bitsandbytes as bnb

        from qft.quant.bnb import dequantize_nf4

        weight = base.weight
        target = dequantize_nf4(weight).float()
        target.view(-1).index_add_(0, idx, values.float())
        kwargs = {k: v for k, v in weight.__dict__.items() if not k.startswith("_") and k != "data"}
        kwargs.update(requires_grad=False, bnb_quantized=False)
        dtype = weight.quant_state.dtype
        base.weight = bnb.nn.Params4bit(target.to(dtype).to("cpu"), **kwargs).to(weight.device)
        got = dequantize_nf4(base.weight).float()
        err = ((got - target).norm() / target.norm().clamp_min(1e-12)).item()
        base.qft_merge_error = err  # relative Frobenius error of one NF4 requantization
        log.info("merged a sparse delta into a 4-bit %dx%d weight: relative requantization error %.3g",
                 *self.shape, err)

    def merge(self, safe_merge: bool = False, adapter_names=None) -> None:
        for name in adapter_names or self.active_adapters:
            if name in self.spiel_values and name not in self.merged_adapters:
                if safe_merge and not torch.isfinite(self.spiel_values[name]).all():
                    raise ValueError(f"NaNs in the sparse delta of adapter {name!r}")
                self._add_to_base(name, 1.0)
                self.merged_adapters.append(name)

    def unmerge(self) -> None:
        while self.merged_adapters:
            self._add_to_base(self.merged_adapters.pop(), -1.0)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        active = [n for n in self.active_adapters if n in self.spiel_values]
        if self.disable_adapters or self.merged or not active:
            return self.base_layer(x, *args, **kwargs)
        base = self.get_base_layer()
        four_bit = is_4bit(base.weight)
        if four_bit:
            from qft.quant.bnb import dequantize_nf4

            weight = lambda: dequantize_nf4(base.weight)  # noqa: E731
        else:
            weight = lambda: base.weight  # noqa: E731
        return sparse_delta_linear(x, weight, base.bias, [self.spiel_values[n] for n in active],
                                   [self.spiel_indices[n] for n in active], [self.spiel_probe.get(n) for n in active],
                                   fresh=four_bit, out_in_input_dtype=four_bit,
                                   compute_dtype=getattr(base, "compute_dtype", None) if four_bit else None)

    def __repr__(self) -> str:
        return "spiel." + super().__repr__()
