from __future__ import annotations

import torch
import torch.nn.functional as F
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from qft.adapters.sparse_mezo import kernel
from qft.zo.mask import magnitude_threshold, small_magnitude_mask


class SparseMezoLinear(nn.Module, BaseTunerLayer):
    """A frozen Linear plus tuned values at its smallest-magnitude entries.

    ``W_eff = W`` with ``W_eff[mask] = W[mask] + delta``, ``mask = |W| <= threshold`` recomputed from the frozen
    ``W`` on the fly. ``delta`` (1-D, one value per selected entry in row-major order) is the only trainable
    tensor; the saved adapter holds ``delta`` and the threshold, so its size is proportional to the tuned count.
    """

    adapter_layer_names = ("sparse_mezo_delta",)
    other_param_names = ("sparse_mezo_threshold",)

    def __init__(self, base_layer: nn.Linear, adapter_name: str, density: float, delta_dtype: str):
        super().__init__()
        self.base_layer = base_layer
        self.sparse_mezo_delta = nn.ParameterDict()
        self.sparse_mezo_threshold = BufferDict({}, persistent=True)
        self.merged_adapters = []
        self._merged_index: dict[str, torch.Tensor] = {}
        self._row_offset_cache: dict[str, tuple[tuple, torch.Tensor]] = {}
        self.update_layer(adapter_name, density, delta_dtype)

    def update_layer(self, adapter_name: str, density: float, delta_dtype: str) -> None:
        w = self.get_base_layer().weight
        threshold = magnitude_threshold(w, density)
        count = int(small_magnitude_mask(w, threshold).sum())
        self.sparse_mezo_threshold[adapter_name] = threshold
        self.sparse_mezo_delta[adapter_name] = nn.Parameter(
            torch.zeros(count, dtype=getattr(torch, delta_dtype), device=w.device))
        self.set_adapter(self.active_adapters)

    def mask(self, adapter_name: str) -> torch.Tensor:
        return small_magnitude_mask(self.get_base_layer().weight, self.sparse_mezo_threshold[adapter_name])

    def _unmerged_names(self):
        return [n for n in self.active_adapters if n in self.sparse_mezo_delta and n not in self.merged_adapters]

    def _unmerged_deltas(self):
        """(mask, delta) of every active, unmerged adapter."""
        for name in self._unmerged_names():
            yield self.mask(name), self.sparse_mezo_delta[name]

    def _fused(self, w: torch.Tensor) -> bool:
        """The one-pass Triton kernel (:mod:`.kernel`) on CUDA; the torch path elsewhere."""
        return all(kernel.usable(w, self.sparse_mezo_delta[n]) for n in self._unmerged_names())

    def _row_offsets(self, name: str, w: torch.Tensor) -> torch.Tensor:
        """Per row, the selected entries above it: fixed while ``w`` and the threshold are, so cached."""
        threshold = self.sparse_mezo_threshold[name]
        key = (w.data_ptr(), w._version, threshold.data_ptr())
        hit = self._row_offset_cache.get(name)
        if hit is None or hit[0] != key:
            hit = self._row_offset_cache[name] = (key, kernel.row_offsets(w, threshold))
        return hit[1]

    def effective_weight(self) -> torch.Tensor:
        """``W`` with each active delta added at its selected entries.

        The k-th selected entry (row-major) takes ``delta[k]``: its index is the running count of selected
        entries before it (a cumsum of the mask), gathered and applied with ``torch.where``. Every op stays on
        the device; boolean indexing would wait for the host at every layer of every forward.
        """
        w = out = self.get_base_layer().weight
        if self._fused(w):
            for name in self._unmerged_names():
                delta = self.sparse_mezo_delta[name]
                if delta.numel():
                    out = kernel.effective_weight(w, out, delta, self.sparse_mezo_threshold[name],
                                                  self._row_offsets(name, w))
            return out
        for m, delta in self._unmerged_deltas():
            if delta.numel():
                slot = (m.reshape(-1).cumsum(0, dtype=torch.int32) - 1).clamp_min_(0).view(m.shape)
                out = torch.where(m, (out.to(delta.dtype) + delta[slot]).to(w.dtype), out)
        return out

    def effective_weight_reference(self) -> torch.Tensor:
        """Slow reference of ``effective_weight`` through boolean indexing."""
        w = out = self.get_base_layer().weight
        for m, delta in self._unmerged_deltas():
            out = out.masked_scatter(m, (out[m].to(delta.dtype) + delta).to(w.dtype))
        return out

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.disable_adapters or not any(n in self.sparse_mezo_delta for n in self.active_adapters):
            return self.base_layer(x, *args, **kwargs)
        base = self.get_base_layer()
        return F.linear(x, self.effective_weight(), base.bias)

    def merge(self, safe_merge: bool = False, adapter_names=None) -> None:
        w = self.get_base_layer().weight
        for name in adapter_names or self.active_adapters:
            if name in self.merged_adapters or name not in self.sparse_mezo_delta:
                continue
            index = self.mask(name).flatten().nonzero().squeeze(1)  # kept only while merged, for unmerge
            new = w.data.flatten().clone()
            new[index] = (new[index].to(self.sparse_mezo_delta[name].dtype) + self.sparse_mezo_delta[name].data).to(w.dtype)
            if safe_merge and not torch.isfinite(new).all():
                raise ValueError(f"merging adapter {name} produced non-finite weights")
            w.data = new.view_as(w)
            self._merged_index[name] = index
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        w = self.get_base_layer().weight
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            index = self._merged_index.pop(name)
            flat = w.data.flatten().clone()
            flat[index] = (flat[index].to(self.sparse_mezo_delta[name].dtype) - self.sparse_mezo_delta[name].data).to(w.dtype)
            w.data = flat.view_as(w)
