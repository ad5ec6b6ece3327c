"""qft.sparse: density parsing, the sparse-delta matmuls against dense references, drop/regrow, remap, SM3.

Measured (float32, CPU, the shapes below): fast vs reference |error| <= 3e-6 for x (W + D)^T and <= 7e-6 for
the SDDMM (summing over 64 tokens in another order); the tolerances are 1e-4, about 15x that.
"""

import pytest
import torch

from qft.errors import QftError
from qft.sparse import (
    allocate,
    drop_smallest,
    parse_density,
    random_indices,
    regrow_from_candidates,
    regrow_from_scores,
    remap_optimizer_state,
    remap_state,
    remap_state_reference,
    reselect,
    reselect_fraction,
    sddmm,
    sddmm_reference,
    sm3_scores,
    sm3_update,
    sm3_update_reference,
    sparse_delta_linear,
    sparse_delta_linear_reference,
)
from qft.sparse.ops import scatter_dense

TOL = dict(atol=1e-4, rtol=1e-4)


def _delta(out, inn, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    return random_indices(out * inn, k, g), torch.randn(k, generator=g)


@pytest.mark.parametrize("spec,kind,value", [
    ("0.01", "fraction", 0.01), (0.5, "fraction", 0.5), ("250000", "count", 250000), (12, "count", 12),
    ("lora:8", "lora", 8), (" LoRA:2 ", "lora", 2), ("1e-3", "fraction", 1e-3), ("3e2", "count", 300),
])
def test_parse_density(spec, kind, value):
    d = parse_density(spec)
    assert (d.kind, d.value) == (kind, value)


@pytest.mark.parametrize("spec", ["0", "-0.1", "1", "1.0", "1.5", "abc", "lora:", "lora:0", "lora:x", "nan",
                                  "", None, "0.5%"])
def test_parse_density_refuses_bad_values(spec):
    with pytest.raises(QftError) as err:
        parse_density(spec)
    assert "Fix:" in str(err.value) and "\n" not in str(err.value)


def test_counts_fraction_count_and_lora():
    shapes = [(64, 64), (128, 64), (64, 128)]
    assert parse_density("0.1").counts(shapes) == [410, 819, 819]
    assert sum(parse_density("1000").counts(shapes)) == 1000  # a count is met exactly
    assert parse_density("1000").counts(shapes) == [200, 400, 400]
    assert parse_density("lora:4").counts(shapes) == [4 * 128, 4 * 192, 4 * 192]
    with pytest.raises(QftError, match="more entries"):
        parse_density(str(64 * 64 * 5 + 1)).counts(shapes)
    with pytest.raises(QftError, match="more than it has"):
        parse_density("lora:64").counts(shapes)


def test_allocate_sums_exactly():
    for total in (1, 7, 999, 1000):
        parts = allocate(total, [3, 5, 11, 13])
        assert sum(parts) == total and all(p >= 0 for p in parts)


@pytest.mark.parametrize("numel,k", [(100, 90), (10_000, 37), (4096, 4096)])
def test_random_indices_distinct_sorted_seeded(numel, k):
    a = random_indices(numel, k, torch.Generator().manual_seed(3))
    b = random_indices(numel, k, torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and a.dtype == torch.int64 and a.numel() == k
    assert a.unique().numel() == k and torch.equal(a, a.sort().values) and 0 <= a.min() and a.max() < numel


@pytest.mark.parametrize("out,inn,k", [(48, 64, 100), (64, 32, 2048), (7, 5, 1)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_sparse_delta_linear_matches_dense(out, inn, k, with_bias):
    idx, v = _delta(out, inn, k)
    w, b = torch.randn(out, inn), (torch.randn(out) if with_bias else None)
    w0 = w.clone()
    x = torch.randn(3, 11, inn)
    torch.testing.assert_close(sparse_delta_linear(x, lambda: w, b, [v], [idx]),
                               sparse_delta_linear_reference(x, w, b, [v], [idx], (out, inn)), **TOL)
    assert torch.equal(w, w0)  # the frozen weight is read, never modified


def test_two_deltas_add():
    (i1, v1), (i2, v2) = _delta(24, 40, 90, seed=1), _delta(24, 40, 60, seed=2)
    w, x = torch.randn(24, 40), torch.randn(5, 40)
    w0 = w.clone()
    torch.testing.assert_close(sparse_delta_linear(x, lambda: w, None, [v1, v2], [i1, i2]),
                               x @ (w + scatter_dense(v1, i1, (24, 40)) + scatter_dense(v2, i2, (24, 40))).T, **TOL)
    assert torch.equal(w, w0)


def test_sddmm_matches_dense(monkeypatch):
    idx, _ = _delta(48, 64, 500)
    g, x = torch.randn(4, 16, 48), torch.randn(4, 16, 64)
    ref = sddmm_reference(g, x, idx)
    torch.testing.assert_close(sddmm(g, x, idx), ref, **TOL)
    monkeypatch.setattr("qft.sparse.ops._BLOCK", 64 * 7)  # blocks of 7 rows, the last one partial
    torch.testing.assert_close(sddmm(g, x, idx), ref, **TOL)
    few, _ = _delta(48, 64, 5)
    monkeypatch.setattr("qft.sparse.ops._BLOCK", 1)  # one row per block, most of them empty
    torch.testing.assert_close(sddmm(g, x, few), sddmm_reference(g, x, few), **TOL)


@pytest.mark.parametrize("with_probe", [False, True])
def test_autograd_matches_dense_reference(with_probe):
    out, inn = 24, 40
    idx, v0 = _delta(out, inn, 90)
    w0, b0 = torch.randn(out, inn), torch.randn(out)
    x0 = torch.randn(2, 5, inn)
    seen = []
    x, v = x0.clone().requires_grad_(), v0.clone().requires_grad_()
    y = sparse_delta_linear(x, lambda: w0, b0, [v], [idx], [seen.append if with_probe else None])
    w = torch.randn_like(y)
    (y * w).sum().backward()
    # reference: a dense delta built with autograd
    xr, vr = x0.clone().requires_grad_(), v0.clone().requires_grad_()
    yr = xr @ (w0 + scatter_dense(vr, idx, (out, inn))).T + b0
    (yr * w).sum().backward()
    torch.testing.assert_close(y, yr, **TOL)
    torch.testing.assert_close(x.grad, xr.grad, **TOL)
    torch.testing.assert_close(v.grad, vr.grad, **TOL)
    if with_probe:
        dense = w.reshape(-1, out).T @ x0.reshape(-1, inn)
        torch.testing.assert_close(seen[0], dense, **TOL)


def test_drop_smallest():
    v = torch.tensor([0.5, -0.01, 2.0, 0.02, -3.0, 0.0])
    assert set(drop_smallest(v, 3).tolist()) == {1, 3, 5}
    assert drop_smallest(v, 0).numel() == 0


def test_regrow_excludes_survivors_and_takes_the_best():
    scores = torch.arange(20.0)
    exclude = torch.tensor([17, 19])
    assert set(regrow_from_scores(scores, exclude, 3).tolist()) == {18, 16, 15}
    cand, cs = torch.tensor([3, 17, 9, 12]), torch.tensor([1.0, 9.0, 5.0, 2.0])
    assert set(regrow_from_candidates(cand, cs, exclude, 2).tolist()) == {9, 12}
    assert set(regrow_from_candidates(cand, cs, exclude, 10).tolist()) == {3, 9, 12}


def test_reselect_keeps_the_count_and_drops_the_smallest():
    idx = torch.tensor([2, 5, 8, 11, 14, 20])
    v = torch.tensor([0.9, -0.05, 0.3, 0.01, -2.0, 0.5])
    new = reselect(idx, v, 2, lambda exclude, n: regrow_from_scores(torch.arange(30.0), exclude, n))
    assert new.tolist() == [2, 8, 14, 20, 28, 29]  # 5 and 11 (|v| smallest) out, the two best scores in
    # too few candidates: the largest dropped entries come back, so the count never changes
    new = reselect(idx, v, 3, lambda exclude, n: regrow_from_candidates(torch.tensor([25]), torch.ones(1),
                                                                        exclude, n))
    assert new.tolist() == [2, 5, 8, 14, 20, 25]  # 11, the smallest dropped, stays out


def test_remap_state_matches_reference():
    g = torch.Generator().manual_seed(0)
    old = random_indices(500, 60, g)
    new = reselect(old, torch.randn(60, generator=g), 20,
                   lambda exclude, n: regrow_from_scores(torch.rand(500, generator=g), exclude, n))
    state = torch.randn(60, generator=g)
    fast = remap_state(old, new, state)
    assert torch.equal(fast, remap_state_reference(old, new, state))
    survived = torch.isin(new, old)
    assert (fast[~survived] == 0).all() and survived.sum() >= 40


def test_remap_optimizer_state_float_in_place_and_unknown_layouts_raise():
    g = torch.Generator().manual_seed(0)
    old = random_indices(500, 60, g)
    new = reselect(old, torch.randn(60, generator=g), 20,
                   lambda exclude, n: regrow_from_scores(torch.rand(500, generator=g), exclude, n))
    moment, step = torch.randn(60, generator=g), torch.tensor(7.0)
    state = {"exp_avg": moment.clone(), "step": step}
    buffer = state["exp_avg"]
    remap_optimizer_state(state, old, new, 60)
    assert state["exp_avg"] is buffer  # in place: a paged buffer stays paged
    assert torch.equal(buffer, remap_state_reference(old, new, moment)) and state["step"] is step
    with pytest.raises(ValueError, match="cannot remap optimizer state 'codes'"):
        remap_optimizer_state({"codes": torch.zeros(60, dtype=torch.uint8)}, old, new, 60)


def test_sm3_update_matches_dense_definition():
    g = torch.Generator().manual_seed(1)
    idx = random_indices(12 * 9, 30, g)
    rows, cols = torch.zeros(12), torch.zeros(9)
    rows_r, cols_r = rows.clone(), cols.clone()
    for _ in range(4):
        grad = torch.randn(30, generator=g)
        sm3_update(rows, cols, idx, grad)
        sm3_update_reference(rows_r, cols_r, idx, grad)
        torch.testing.assert_close(rows, rows_r, atol=0, rtol=0)
        torch.testing.assert_close(cols, cols_r, atol=0, rtol=0)
    assert sm3_scores(rows, cols).shape == (12, 9)


def test_reselect_fraction_decays_to_zero():
    assert reselect_fraction(0, 100, 0.2) == 0.2 and reselect_fraction(100, 100, 0.2) == 0
    assert reselect_fraction(50, 100, 0.2) == pytest.approx(0.1)
    assert reselect_fraction(50, 100, 0.2, "cosine") == pytest.approx(0.1)
    assert reselect_fraction(25, 100, 0.2, "cosine") > reselect_fraction(25, 100, 0.2, "linear")


def test_autograd_under_bf16_autocast():
    """The Trainer runs bf16 models under autocast: the op computes in bf16, the deltas' gradients stay float32."""
    idx, v0 = _delta(24, 40, 90)
    w0 = torch.randn(24, 40)
    x = torch.randn(2, 5, 40, generator=torch.Generator().manual_seed(4)).bfloat16().requires_grad_()
    v = v0.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = sparse_delta_linear(x, lambda: w0, None, [v], [idx])
    y.float().sum().backward()
    assert y.dtype == torch.bfloat16 and x.grad.dtype == torch.bfloat16 and v.grad.dtype == torch.float32
    ref = sparse_delta_linear_reference(x.detach(), w0, None, [v0], [idx], (24, 40))
    # weights and output are rounded to bf16 (relative step 2^-8 = 0.0039)
    torch.testing.assert_close(y.float(), ref, atol=5e-2, rtol=2e-2)


def test_probe_under_bf16_autocast_is_float32_from_a_bf16_product():
    """RigL's dense gradient: one matmul in the compute dtype (bf16), handed over as float32."""
    idx, v0 = _delta(24, 40, 90)
    x = torch.randn(2, 5, 40).bfloat16().requires_grad_()
    v = v0.clone().requires_grad_()
    seen = []
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = sparse_delta_linear(x, lambda: torch.randn(24, 40), None, [v], [idx], [seen.append])
    g = torch.randn_like(y)
    (y.float() * g.float()).sum().backward()
    ref = g.float().reshape(-1, 24).T @ x.detach().float().reshape(-1, 40)
    assert seen[0].dtype == torch.float32
    torch.testing.assert_close(seen[0], ref, atol=5e-2, rtol=2e-2)
    torch.testing.assert_close(v.grad, ref.reshape(-1)[idx], atol=5e-2, rtol=2e-2)
