"""Sparse-MeZO's selection (Liu et al., 2024, arXiv:2402.15751): per layer, the weights of smallest magnitude.

The paper perturbs and updates only weights whose magnitude is below a per-layer threshold (the large
weights are left alone: perturbing them adds noise to the estimate without helping). The threshold is the
``density``-quantile of |W| in each layer, and the mask ``|W| <= threshold`` is recomputed from the frozen
weight whenever it is needed, never stored.
"""

from __future__ import annotations

import torch


def magnitude_threshold(weight: torch.Tensor, density: float) -> torch.Tensor:
    """The k-th smallest |w| with k = round(density * numel) (at least 1): a 0-d tensor."""
    flat = weight.detach().abs().flatten()
    k = max(1, min(flat.numel(), round(density * flat.numel())))
    # kthvalue in float32 handles any size (torch.quantile refuses tensors over 16M elements); on the weight's
    # own device (on the CPU, an 8B model's 224 layers took minutes), the CPU if that device can't
    try:
        return flat.float().kthvalue(k).values
    except (RuntimeError, NotImplementedError):  # pragma: no cover - a device without kthvalue
        return flat.float().cpu().kthvalue(k).values.to(weight.device)


def small_magnitude_mask(weight: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """Boolean mask of the selected entries (same shape as ``weight``), computed on the fly."""
    return weight.abs() <= threshold.to(weight.dtype)
