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


class MagnitudeMask:
    """Sparse-MeZO over the weights themselves, as the paper states it: an entry of a tuned tensor takes part in a
    step while its current magnitude is at most its tensor's threshold, ``|θ_t| <= h`` (Liu et al., 2024, eq. for
    the mask of θ_t). The thresholds are fixed at the start, per tensor the ``density``-quantile of ``|W|``.

    A ZO ``mask_fn`` (``ZoArguments(mask_fn=...)``, ``ZoSGD(mask_fn=...)``) that needs no delta tensor: the weights
    are perturbed and updated where they stand, so memory is the inference peak (plus one layer's perturbed copy),
    where the PEFT method (``SparseMezoConfig``) keeps a float32 delta per selected entry (1.3x the inference peak at
    the Llama-3-8B shape, density 0.2). The mask is recomputed from the weights on the fly and never stored: the
    Triton kernels compare in-register. An unselected entry never moves, and a selected one that grows past ``h``
    stops moving, so every entry that ever changes is one of ``|W0| <= h``.

    Two restrictions keep each step's update on the entries its forwards perturbed: no weight decay (it would move
    unselected weights and change the mask before the update) and one direction per step."""

    in_kernel = True  # the fused kernels take it (a per-tensor threshold), not only the torch path

    def __init__(self, params=None, density: float = 0.2):
        self.density, self.thresholds = density, {}
        if params is not None:
            self.build(params)

    def build(self, params) -> "MagnitudeMask":
        """Fix the thresholds from ``params`` as they stand (the starting weights). A mask made without params gets
        them here, so it can be handed to a trainer before the model is loaded."""
        self.thresholds = {id(p): float(magnitude_threshold(p, self.density)) for p in params}
        return self

    def threshold(self, p: torch.Tensor) -> float:
        """``h`` of tensor ``p`` (one of the tensors the mask was built for)."""
        try:
            return self.thresholds[id(p)]
        except KeyError:
            raise ValueError("MagnitudeMask was not built for this tensor: build it from the tensors ZO tunes "
                             "(and make them the only trainable ones)") from None

    def select(self, p: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """The selected entries among ``values`` (a piece of ``p``, as it stands now)."""
        return small_magnitude_mask(values, torch.tensor(self.threshold(p), dtype=values.dtype, device=values.device))

    def __call__(self, values: torch.Tensor) -> torch.Tensor:
        raise TypeError("MagnitudeMask needs the tensor a piece belongs to: call select(p, values)")


def select(mask_fn, p: torch.Tensor, values: torch.Tensor):
    """The ZO mask of ``values`` (a piece of ``p``): ``mask_fn(values)``, or ``mask_fn.select(p, values)`` for a
    mask that depends on the tensor (:class:`MagnitudeMask`)."""
    return mask_fn.select(p, values) if hasattr(mask_fn, "select") else mask_fn(values)
