"""Sparse weight deltas as pure functions: density parsing, index selection, drop/regrow, state remap, and
the matmuls of a linear layer with a sparse delta (SpIEL, Ansell et al., 2024, arXiv:2401.16405).

A sparse delta of an ``out x in`` weight is a sorted int64 vector of flat indices (``row * in + col``) and a
values vector of the same length. Every fast path here has a slow, obviously-right reference beside it.

    from qft.sparse import parse_density, reselect
"""

from qft.sparse.density import Density, allocate, parse_density
from qft.sparse.ops import (
    SparseDeltaLinear,
    sddmm,
    sddmm_reference,
    sparse_delta_linear,
    sparse_delta_linear_reference,
)
from qft.sparse.select import (
    drop_smallest,
    random_indices,
    regrow_from_candidates,
    regrow_from_scores,
    remap_optimizer_state,
    remap_state,
    remap_state_reference,
    reselect,
    reselect_fraction,
    sm3_scores,
    sm3_update,
    sm3_update_reference,
)

__all__ = [
    "Density", "allocate", "parse_density",
    "SparseDeltaLinear", "sddmm", "sddmm_reference", "sparse_delta_linear", "sparse_delta_linear_reference",
    "drop_smallest", "random_indices", "regrow_from_candidates", "regrow_from_scores", "remap_optimizer_state",
    "remap_state", "remap_state_reference", "reselect", "reselect_fraction", "sm3_scores", "sm3_update",
    "sm3_update_reference",
]
