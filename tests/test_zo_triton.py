"""The fused Triton ZO kernels against the torch path's contracts (GPU only; skipped on CPU CI).

Run on a CUDA machine: python -m pytest -q tests/test_zo_triton.py
"""

import pytest
import torch

from qft.zo import triton_ops
from qft.zo.spsa import apply_update_, direction, perturbed

pytestmark = pytest.mark.skipif(not (torch.cuda.is_available() and triton_ops.triton is not None),
                                reason="needs CUDA and Triton")


def test_directions_are_standard_normal_and_reproducible():
    p = torch.empty(4096, 1024, device="cuda", dtype=torch.bfloat16)
    z = triton_ops.direction(p, 123)
    assert torch.equal(z, triton_ops.direction(p, 123)) and not torch.equal(z, triton_ops.direction(p, 124))
    assert abs(z.mean().item()) < 1e-2 and abs(z.std().item() - 1) < 1e-2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_perturbed_copy_and_update_match_the_direction(dtype):
    torch.manual_seed(0)
    p = torch.randn(3000, 700, device="cuda", dtype=dtype)
    z = triton_ops.direction(p, 7)
    tol = 1e-6 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(triton_ops.perturbed_copy(p, 7, 1e-3).float(), p.float() + 1e-3 * z, atol=tol, rtol=tol)
    q = p.clone()
    triton_ops.axpby_(q, 7, -0.5, keep=0.9)
    torch.testing.assert_close(q.float(), 0.9 * p.float() - 0.5 * z, atol=tol * 10, rtol=tol)


def test_training_path_uses_one_generator_throughout():
    """Forward perturbation, update and the reference direction all draw the same z on CUDA."""
    lin = torch.nn.Linear(512, 256, device="cuda")
    params = list(lin.parameters())
    before = [p.detach().clone() for p in params]
    x = torch.randn(8, 512, device="cuda")
    with torch.no_grad(), perturbed(lin, params, 5, 1e-2):
        y = lin(x)
    w_ref = before[0] + 1e-2 * direction(before[0], 5, 0)
    b_ref = before[1] + 1e-2 * direction(before[1], 5, 1)
    torch.testing.assert_close(y, x @ w_ref.T + b_ref, atol=1e-4, rtol=1e-4)
    apply_update_(params, [(5, 2.0)], lr=0.1)
    torch.testing.assert_close(params[0], before[0] - 0.2 * direction(before[0], 5, 0), atol=1e-6, rtol=1e-6)


def test_one_launch_over_many_tensors_equals_one_launch_each():
    ts = [torch.randn(*s, device="cuda", dtype=torch.bfloat16) for s in [(3, 700), (5000,), (1,), (4096, 1024)]]
    seeds = [1, 2, 3, 4]
    for t, s, c in zip(ts, seeds, triton_ops.perturbed_copies(ts, seeds, 1e-2)):
        assert torch.equal(c, triton_ops.perturbed_copy(t, s, 1e-2))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sparse_mezo_kernel_matches_the_reference(dtype):
    from qft.adapters.sparse_mezo.layer import SparseMezoLinear

    torch.manual_seed(0)
    layer = SparseMezoLinear(torch.nn.Linear(2500, 300, bias=False, device="cuda", dtype=dtype), "default",
                             density=0.2, delta_dtype="float32")
    with torch.no_grad():
        layer.sparse_mezo_delta["default"].normal_()
        assert layer._fused(layer.get_base_layer().weight)
        assert torch.equal(layer.effective_weight(), layer.effective_weight_reference())


def test_rademacher_directions_on_the_gpu():
    p = torch.empty(4096, 1000, device="cuda", dtype=torch.bfloat16)
    z = triton_ops.direction(p, 3, "rademacher")
    assert set(z.unique().tolist()) == {-1.0, 1.0} and abs(z.mean().item()) < 1e-2
    assert torch.equal(z.flatten()[:1000], triton_ops.direction(torch.empty(1000, device="cuda"), 3, "rademacher"))
    q = p.normal_()
    torch.testing.assert_close(triton_ops.perturbed_copy(q, 3, 0.5, "rademacher").float(), q.float() + 0.5 * z,
                               atol=2e-2, rtol=2e-2)


def test_rank1_directions_on_the_gpu_match_the_reference():
    """rank1 on CUDA: hooks on the matrices, the Triton kernels on the vectors, against the in-place reference."""
    import copy

    from qft.zo.spsa import perturb_inplace_
    from tests.tiny import tiny_inputs, tiny_model

    model = tiny_model("llama").cuda()
    params = [p for p in model.parameters() if p.requires_grad]
    x = {k: v.cuda() for k, v in tiny_inputs(model, batch=4, seq=32).items()}
    with torch.no_grad():
        with perturbed(model, params, 4, 1e-2, dist="rank1") as seen:
            ours = model(**x).logits
        assert len(seen) == len(params)
        ref = copy.deepcopy(model)
        perturb_inplace_([p for p in ref.parameters() if p.requires_grad], 4, 1e-2, dist="rank1")
        torch.testing.assert_close(ours, ref(**x).logits, atol=1e-4, rtol=1e-4)
    w = params[1]
    before = w.detach().clone()
    apply_update_(params, [(4, 3.0)], lr=0.1, dist="rank1")
    torch.testing.assert_close(w, before - 0.3 * direction(before, 4, 1, dist="rank1"), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dist", ["gaussian", "rank1"])
@pytest.mark.parametrize("family", ["llama", "opt", "gpt2"])
def test_several_directions_in_one_paired_forward_on_the_gpu(dist, family):
    """--zo-paired --zo-samples 3 on CUDA: the factors drawn by the kernel and stacked, the norms' copies made up
    front; the forward equals the six perturbed forwards (OPT: flattened tokens; GPT-2: one row of position ids)."""
    from tests.test_zo import _gpt2, check_paired_forward_several
    from tests.tiny import tiny_model

    make = _gpt2 if family == "gpt2" else lambda: tiny_model(family)
    check_paired_forward_several(dist, make, device="cuda", atol=1e-4)


@pytest.mark.parametrize("paired,samples", [(False, 1), (True, 1), (True, 2)], ids=["two-forwards", "paired", "q2"])
@pytest.mark.parametrize("family", ["llama", "opt", "gpt2"])
def test_deferred_updates_on_the_gpu(family, paired, samples):
    """--zo-defer on CUDA (float32 weights, the kernel's factors): the same gradients and weights as writing every
    update at once, to TF32-free float32 rounding."""
    from tests.test_zo import _gpt2
    from tests.test_zo_defer import check_deferred_against_written
    from tests.tiny import tiny_model

    make = _gpt2 if family == "gpt2" else lambda: tiny_model(family)
    check_deferred_against_written(make, paired, samples, device="cuda", g_tol=1e-3, w_tol=2e-5)


@pytest.mark.parametrize("shape", [(2048, 14336), (4097, 1100)])
def test_rank_one_add_kernel_on_the_gpu(shape):
    """rank1's outer-product add (hook outputs and updates) against float64 arithmetic, bf16, odd edges included."""
    torch.manual_seed(0)
    out = torch.randn(*shape, device="cuda", dtype=torch.bfloat16)
    a = torch.randn(shape[0], device="cuda", dtype=torch.bfloat16)
    b = torch.randn(shape[1], device="cuda", dtype=torch.bfloat16)
    assert triton_ops.addr_usable(out)
    sign = torch.ones(shape[0], device="cuda", dtype=torch.float64)
    sign[shape[0] // 3:] = -1
    for flip, signs in ((None, 1.0), (shape[0] // 3, sign)):  # flip: a paired forward's second half, -alpha
        ours = out.clone()
        triton_ops.addr_(ours, a, b, -0.3, beta=0.9, flip=flip)
        exact = 0.9 * out.double() - 0.3 * (signs * a.double())[:, None] * b.double()
        assert ((ours.double() - exact).abs() <= 2**-7 * exact.abs() + 1e-6).all()


@pytest.mark.parametrize("shape,k", [((4096, 14336), 9), ((4097, 1100), 2)])
def test_small_product_add_kernel_on_the_gpu(shape, k):
    """The hooks' rank-k term (several directions, deferred updates) against float64 arithmetic, bf16, odd edges."""
    torch.manual_seed(0)
    out = torch.randn(*shape, device="cuda", dtype=torch.bfloat16)
    a = torch.randn(shape[0], k, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(k, shape[1], device="cuda", dtype=torch.bfloat16)
    ours = out.clone()
    triton_ops.addmm_small_(ours, a, b, -0.3)
    exact = out.double() - 0.3 * a.double() @ b.double()
    size = out.double().abs() + 0.3 * a.double().abs() @ b.double().abs()
    assert ((ours.double() - exact).abs() <= 2**-7 * size + 1e-6).all()


def test_rank_one_add_of_many_matrices_on_the_gpu():
    """rank1's update in one launch per shape equals one launch per matrix, bit for bit."""
    torch.manual_seed(0)
    shapes = [(4096, 1024), (1024, 4096), (4096, 1024), (2048, 2049)]
    outs = [torch.randn(*s, device="cuda", dtype=torch.bfloat16) for s in shapes]
    a = [torch.randn(s[0], device="cuda", dtype=torch.bfloat16) for s in shapes]
    b = [torch.randn(s[1], device="cuda", dtype=torch.bfloat16) for s in shapes]
    alone = [o.clone() for o in outs]
    for o, x, y, beta in zip(alone, a, b, [1.0, 0.9, 1.0, 0.5]):
        triton_ops.addr_(o, x, y, -0.3, beta=beta)
    together = [o.clone() for o in outs]
    triton_ops.addr_multi_(together, a, b, -0.3, [1.0, 0.9, 1.0, 0.5])
    assert all(torch.equal(t, o) for t, o in zip(together, alone))


def test_many_matrix_kernels_take_views_that_do_not_start_on_16_bytes():
    """The one-launch kernels read their tensors as offsets from a base and are told those are multiples of 16
    bytes (so they move whole vectors) only when they are: views into a buffer at an odd element still come out
    right."""
    torch.manual_seed(0)
    shapes = [(1024, 4096), (1024, 4096)]
    buf = torch.randn(1 + sum(m * n for m, n in shapes), device="cuda", dtype=torch.bfloat16)
    outs, at = [], 1  # bf16 at element 1: 2 bytes past an aligned start
    for m, n in shapes:
        outs.append(buf[at:at + m * n].view(m, n))
        at += m * n
    assert triton_ops._offsets(outs[0], outs + [buf[:8]])[1] == 1
    a = [torch.randn(s[0], device="cuda", dtype=torch.bfloat16) for s in shapes]
    b = [torch.randn(s[1], device="cuda", dtype=torch.bfloat16) for s in shapes]
    alone = [o.clone() for o in outs]  # separate allocations: 16-byte multiples apart
    assert triton_ops._offsets(alone[0], alone)[1] == 8
    for o, x, y in zip(alone, a, b):
        triton_ops.addr_(o, x, y, -0.3)
    triton_ops.addr_multi_(outs, a, b, -0.3, [1.0, 1.0])
    assert all(torch.equal(t, o) for t, o in zip(outs, alone))
    # the fused Gaussian update of a view at an odd element equals that of an aligned copy
    odd, even = outs[0], outs[0].clone()
    triton_ops.axpby_multi_([odd], [7], -0.5, keep=0.9, decay=[True])
    triton_ops.axpby_multi_([even], [7], -0.5, keep=0.9, decay=[True])
    assert torch.equal(odd, even)


@pytest.mark.parametrize("dist", ["gaussian", "rademacher"])
def test_masked_kernels_on_the_gpu(dist):
    """In-place Sparse-MeZO's copies and update (qft.zo.mask.MagnitudeMask): the unmasked kernel's numbers where
    |θ| <= the tensor's threshold, θ elsewhere, bf16, one launch over tensors of several thresholds."""
    torch.manual_seed(0)
    ts = [torch.randn(*s, device="cuda", dtype=torch.bfloat16) for s in [(4096, 1024), (1024, 4097)]]
    thresholds = [0.2, 0.7]
    plain = triton_ops.perturbed_copies(ts, [5, 6], 1e-2, dist)
    masked = triton_ops.perturbed_copies(ts, [5, 6], 1e-2, dist, thresholds)
    upd, ref = [t.clone() for t in ts], [t.clone() for t in ts]
    triton_ops.axpby_multi_(upd, [5, 6], -0.5, dist=dist, thresholds=thresholds)
    triton_ops.axpby_multi_(ref, [5, 6], -0.5, dist=dist)
    for t, p, m, u, r, h in zip(ts, plain, masked, upd, ref, thresholds):
        sel = t.float().abs() <= h
        assert torch.equal(m[sel], p[sel]) and torch.equal(m[~sel], t[~sel])
        assert torch.equal(u[sel], r[sel]) and torch.equal(u[~sel], t[~sel])
