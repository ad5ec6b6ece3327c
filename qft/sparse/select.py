"""Which entries of a weight a sparse delta trains: initial choice, drop, regrow, and the state remap.

SpIEL (Ansell et al., 2024, arXiv:2401.16405) keeps a fixed number ``k`` of active entries per weight and,
every few steps, drops the fraction of them with the smallest ``|delta|`` and regrows as many inactive ones:

- SpIEL-AG (RigL-style): the inactive entries with the largest accumulated gradient over a few steps;
- SpIEL-MA: the inactive entries with the largest approximate second moment from SM3's row/column
  accumulators, ``min``-free upper bound ``row_acc[i] * col_acc[j]`` as in the reference implementation.

Indices are flat (``row * in + col``), int64 and sorted. Dropped entries are dropped: their value leaves the
delta (their contribution is reset to the base weight), a regrown entry starts at 0 with zero optimizer
moments. A dropped entry that is also the best regrowth candidate simply stays, with its value and moments.
"""

from __future__ import annotations

import math

import torch


def random_indices(numel: int, k: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """``k`` distinct flat indices in ``[0, numel)``, sorted, drawn without a ``numel``-sized permutation."""
    if not 0 < k <= numel:
        raise ValueError(f"cannot choose {k} of {numel} entries")
    if 2 * k > numel:  # dense regime: a permutation is no bigger than the choice itself
        return torch.randperm(numel, generator=generator)[:k].sort().values
    chosen = torch.empty(0, dtype=torch.int64)
    while chosen.numel() < k:
        draw = torch.randint(0, numel, (int((k - chosen.numel()) * 1.2) + 16,), generator=generator)
        chosen = torch.cat([chosen, draw]).unique(sorted=False)
        # unique() sorts on CPU; shuffle so that truncation below does not favour small indices
        chosen = chosen[torch.randperm(chosen.numel(), generator=generator)]
    return chosen[:k].sort().values


def drop_smallest(values: torch.Tensor, n: int) -> torch.Tensor:
    """Positions (into ``values``) of the ``n`` entries with the smallest magnitude."""
    if n <= 0:
        return torch.empty(0, dtype=torch.int64, device=values.device)
    return torch.topk(values.detach().abs().float(), n, largest=False, sorted=False).indices


def _isin(elements: torch.Tensor, sorted_set: torch.Tensor) -> torch.Tensor:
    if sorted_set.numel() == 0:
        return torch.zeros_like(elements, dtype=torch.bool)
    pos = torch.searchsorted(sorted_set, elements).clamp(max=sorted_set.numel() - 1)
    return sorted_set[pos] == elements


def regrow_from_scores(scores: torch.Tensor, exclude: torch.Tensor, n: int) -> torch.Tensor:
    """The ``n`` flat indices with the largest ``scores`` (a dense ``out x in`` score) outside ``exclude``."""
    flat = scores.reshape(-1).float().clone()
    flat[exclude] = -math.inf
    n = min(n, flat.numel() - exclude.numel())
    return torch.topk(flat, n, sorted=False).indices


def regrow_from_candidates(candidates: torch.Tensor, scores: torch.Tensor, exclude: torch.Tensor,
                           n: int) -> torch.Tensor:
    """The at most ``n`` ``candidates`` with the largest ``scores`` outside the sorted set ``exclude``."""
    ok = ~_isin(candidates, exclude)
    candidates, scores = candidates[ok], scores[ok]
    best = torch.topk(scores.float(), min(n, candidates.numel()), sorted=False).indices
    return candidates[best]


def reselect(indices: torch.Tensor, values: torch.Tensor, n_drop: int, grow) -> torch.Tensor:
    """The new sorted index set after dropping the ``n_drop`` smallest ``|values|`` and regrowing.

    ``grow(exclude, n)`` returns up to ``n`` flat indices outside the sorted set ``exclude`` (the survivors).
    If it returns fewer, the largest of the dropped entries are kept, so the count never changes.
    """
    k = indices.numel()
    drop = drop_smallest(values, n_drop)
    keep_mask = torch.ones(k, dtype=torch.bool, device=indices.device)
    keep_mask[drop] = False
    kept = indices[keep_mask]  # sorted, since indices is
    grown = grow(kept, n_drop)
    missing = n_drop - grown.numel()
    if missing > 0:
        dropped = indices[drop]
        spare = ~_isin(dropped, grown.sort().values)
        order = values.detach()[drop][spare].abs().argsort(descending=True)
        grown = torch.cat([grown, dropped[spare][order[:missing]]])
    new = torch.cat([kept, grown]).sort().values
    assert new.numel() == k and new.unique().numel() == k
    return new


def remap_state(old_indices: torch.Tensor, new_indices: torch.Tensor, tensor: torch.Tensor) -> torch.Tensor:
    """Per-entry state (values, Adam moments) moved to the new index order; entries that are new get 0."""
    pos = torch.searchsorted(old_indices, new_indices).clamp(max=old_indices.numel() - 1)
    survived = old_indices[pos] == new_indices
    out = torch.zeros_like(tensor)
    out[survived] = tensor[pos[survived]]
    return out


_BNB_BLOCKSIZES = (256, 2048, 4096, 64, 128, 512, 1024)  # 256 first: bitsandbytes' 8-bit optimizers use it


def _blocksize(numel: int, blocks: int) -> int:
    for size in _BNB_BLOCKSIZES:
        if -(-numel // size) == blocks:
            return size
    raise ValueError(f"cannot tell the block size of {blocks} blocks over {numel} entries")


def remap_optimizer_state(state: dict, old_indices: torch.Tensor, new_indices: torch.Tensor, numel: int) -> None:
    """Move one parameter's optimizer state (``optimizer.state[values]``) to the new index order, in place.

    - float tensors of one number per entry (torch AdamW's ``exp_avg``/``exp_avg_sq``, bitsandbytes' 32-bit
      ``state1``/``state2``): ``remap_state``;
    - bitsandbytes' 8-bit blockwise state (``paged_adamw_8bit``, ``adamw_8bit``, ``lion_8bit``...: ``stateN``
      uint8 codes into ``qmapN``, scaled by ``absmaxN``, one per block of 256 entries): dequantized, remapped
      and requantized. The codes are not values: code 0 is ``-0.99 * absmax`` in the signed map, so zeroing
      codes would give every regrown entry a large negative momentum and no second moment (an update of up
      to thousands of times the learning rate, all of one sign), and moving codes across blocks rescales them
      by another block's ``absmax``.

    Tensors are overwritten in place, so paged buffers stay paged. Any other per-entry state raises.
    """
    for key in list(state):
        value = state[key]
        if not torch.is_tensor(value) or value.shape != (numel,) or key.startswith(("qmap", "absmax")):
            continue
        if value.is_floating_point():
            value.copy_(remap_state(old_indices, new_indices, value))
            continue
        n = key[len("state"):] if key.startswith("state") else ""
        if value.dtype == torch.uint8 and f"qmap{n}" in state and f"absmax{n}" in state:
            import bitsandbytes.functional as bnbf

            qmap, absmax = state[f"qmap{n}"], state[f"absmax{n}"]
            size = _blocksize(numel, absmax.numel())
            dense = bnbf.dequantize_blockwise(value, absmax=absmax, code=qmap, blocksize=size)
            codes, qs = bnbf.quantize_blockwise(remap_state(old_indices, new_indices, dense), code=qmap,
                                                blocksize=size)
            value.copy_(codes)
            absmax.copy_(qs.absmax)
            continue
        raise ValueError(f"cannot remap optimizer state {key!r} ({value.dtype}) after a SpIEL reselection: "
                         "use a float optimizer state or bitsandbytes' blockwise 8-bit one")


def remap_state_reference(old_indices, new_indices, tensor):
    where = {int(i): j for j, i in enumerate(old_indices.tolist())}
    out = torch.zeros_like(tensor)
    for j, i in enumerate(new_indices.tolist()):
        if i in where:
            out[j] = tensor[where[i]]
    return out


def reselect_fraction(step: int, total: int, initial: float, decay: str = "linear") -> float:
    """The fraction of active entries replaced at ``step`` of ``total``: decays from ``initial`` to 0."""
    t = min(max(step / max(total, 1), 0.0), 1.0)
    if decay == "linear":
        return initial * (1 - t)
    if decay == "cosine":
        return initial * (1 + math.cos(math.pi * t)) / 2
    raise ValueError(f"unknown decay {decay!r}")


def sm3_update(row_acc: torch.Tensor, col_acc: torch.Tensor, indices: torch.Tensor, grad: torch.Tensor) -> None:
    """One SM3 step (Anil et al., 2019) of the row/column accumulators, from the gradient of active entries.

    ``nu_ij = min(row_i, col_j) + g_ij**2``; ``row_i = max_j nu_ij``, ``col_j = max_i nu_ij``. Inactive entries
    (``g = 0``) have ``nu <= min(row_i, col_j)``, so leaving them out changes no maximum. In place.
    """
    n_in = col_acc.numel()
    rows, cols = indices // n_in, indices % n_in
    g = grad.float()
    nu = torch.minimum(row_acc[rows], col_acc[cols]) + g * g
    row_acc.scatter_reduce_(0, rows, nu, "amax", include_self=True)
    col_acc.scatter_reduce_(0, cols, nu, "amax", include_self=True)


def sm3_update_reference(row_acc, col_acc, indices, grad):
    """The dense definition of ``sm3_update`` (zeros for inactive entries)."""
    g = torch.zeros(row_acc.numel() * col_acc.numel()).index_put_((indices,), grad.float())
    g = g.view(row_acc.numel(), col_acc.numel())
    nu = torch.minimum(row_acc[:, None], col_acc[None, :]) + g * g
    row_acc.copy_(torch.maximum(row_acc, nu.amax(1)))
    col_acc.copy_(torch.maximum(col_acc, nu.amax(0)))


def sm3_scores(row_acc: torch.Tensor, col_acc: torch.Tensor) -> torch.Tensor:
    """The approximate second moment of every entry, ``row_acc[i] * col_acc[j]`` (dense ``out x in``)."""
    return torch.outer(row_acc, col_acc)
