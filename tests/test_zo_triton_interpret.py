"""The fused Triton ZO kernels run under Triton's CPU interpreter (TRITON_INTERPRET=1): the many-tensor
launch, the four-normals-per-draw layout and the layer-grouped perturbation, checked without a GPU.

Needs the ``triton`` package (CUDA builds of torch bring it; CPU CI has none, and skips). The interpreter
must be switched on before Triton is imported, so the outer test re-runs this file in a fresh process.
"""

import os
import subprocess
import sys
from importlib.util import find_spec

import pytest
import torch

pytestmark = pytest.mark.skipif(find_spec("triton") is None, reason="needs the triton package")
INSIDE = os.environ.get("TRITON_INTERPRET") == "1"
inside = pytest.mark.skipif(not INSIDE, reason="runs in the interpreter process started by test_interpreted")


@pytest.mark.skipif(INSIDE, reason="the launcher itself")
def test_interpreted():
    env = dict(os.environ, TRITON_INTERPRET="1", QFT_ZO_TRITON="1")
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__], env=env,
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert " passed" in r.stdout and "skipped" in r.stdout  # the launcher skips itself inside


@pytest.fixture
def ops(monkeypatch):
    from qft.zo import triton_ops

    # the interpreter runs the kernels on CPU tensors: let the training path take them there
    monkeypatch.setattr(triton_ops, "usable", lambda p, mask_fn=None: mask_fn is None and p.dtype in triton_ops._FLOATS)
    monkeypatch.setattr(triton_ops, "ADDR_MIN_NUMEL", 0)  # the rank-one kernel for small matrices too
    return triton_ops


@inside
def test_rademacher_directions_are_signs_reproducible_and_independent_of_the_tensor_size(ops):
    n = 3 * ops.BLOCK + 77
    z = ops.direction(torch.empty(n), 9, "rademacher")
    assert set(z.unique().tolist()) == {-1.0, 1.0} and abs(z.mean().item()) < 0.03
    assert torch.equal(z, ops.direction(torch.empty(n), 9, "rademacher"))
    assert not torch.equal(z, ops.direction(torch.empty(n), 10, "rademacher"))
    torch.testing.assert_close(ops.direction(torch.empty(100), 9, "rademacher"), z[:100], rtol=0, atol=0)
    # neighbouring bits, words and quarters are not copies of one another
    assert len({tuple(z[k * 1024:k * 1024 + 64].tolist()) for k in range(4)}) == 4
    torch.testing.assert_close(ops.perturbed_copy(torch.ones(n), 9, 0.5, "rademacher"), 1 + 0.5 * z)


@inside
def test_directions_are_standard_normal_reproducible_and_independent_of_the_tensor_size(ops):
    n = 5 * ops.BLOCK + 123  # a partial last block
    z = ops.direction(torch.empty(n), 123)
    assert torch.equal(z, ops.direction(torch.empty(n), 123)) and not torch.equal(z, ops.direction(torch.empty(n), 124))
    assert abs(z.mean().item()) < 0.03 and abs(z.std().item() - 1) < 0.03
    # z of element i depends on (seed, i) alone: a shorter tensor draws a prefix of a longer one's z
    torch.testing.assert_close(ops.direction(torch.empty(ops.BLOCK + 7), 123), z[:ops.BLOCK + 7], rtol=0, atol=0)
    # the four quarters of a block are four different normals, not copies
    q = ops.QUARTER
    assert len({round(z[k * q].item(), 6) for k in range(4)}) == 4


@inside
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_launch_over_many_tensors_equals_one_launch_each(ops, dtype):
    torch.manual_seed(0)
    ts = [torch.randn(*s).to(dtype) for s in [(3, 700), (5000,), (1,), (2, ops.BLOCK)]]
    seeds = [11, 12, 13, 14]
    together = ops.perturbed_copies(ts, seeds, 1e-2)
    for t, s, c in zip(ts, seeds, together):
        assert c.shape == t.shape and c.dtype == dtype
        torch.testing.assert_close(c, ops.perturbed_copy(t, s, 1e-2), rtol=0, atol=0)
        tol = 1e-6 if dtype == torch.float32 else 1e-2
        torch.testing.assert_close(c.float(), t.float() + 1e-2 * ops.direction(t, s), rtol=tol, atol=tol)
    # the update, with decay on some tensors only
    upd = [t.clone() for t in ts]
    ops.axpby_multi_(upd, seeds, -0.5, keep=0.9, decay=[True, False, True, False])
    for t, s, u, d in zip(ts, seeds, upd, [0.9, 1.0, 0.9, 1.0]):
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(u.float(), d * t.float() - 0.5 * ops.direction(t, s), rtol=tol, atol=tol)


@inside
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rank_one_add_kernel_is_addr_to_the_dtypes_rounding(ops, dtype):
    """The rank-one term of rank1 hooks and updates: tiles at the edges of odd shapes, decay, both dtypes."""
    torch.manual_seed(0)
    for m, n in [(3, 5), (33, 700), (17, 257), (1, 1)]:
        out, a, b = torch.randn(m, n).to(dtype), torch.randn(m).to(dtype), torch.randn(n).to(dtype)
        ulp = 2.0**-23 if dtype == torch.float32 else 2.0**-7  # one unit in the last place of the stored dtype
        for flip in (None, m // 2):  # rows from flip on take -alpha (a paired forward's second half)
            ours = out.clone()
            ops.addr_(ours, a, b, -0.3, beta=0.9, flip=flip)
            signed = a.double() * torch.tensor([1.0 if flip is None or i < flip else -1.0 for i in range(m)],
                                               dtype=torch.float64)
            exact = 0.9 * out.double() - 0.3 * signed[:, None] * b.double()  # float32 arithmetic inside
            assert ((ours.double() - exact).abs() <= 4 * ulp * exact.abs() + 1e-6).all()
    assert ops.addr_usable(torch.zeros(2, 3)) and not ops.addr_usable(torch.zeros(2, 3).t())


@inside
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_small_product_add_kernel_is_addmm_to_the_dtypes_rounding(ops, dtype):
    """The hooks' term of several directions or deferred updates, out += alpha·a @ b for a few columns: tiles at the
    edges of odd shapes, one to sixteen columns, a strided b (a view of the stacked factors), both dtypes; the
    multi-direction term takes it for a large enough output."""
    torch.manual_seed(0)
    for m, n, k in [(3, 5, 1), (33, 700, 2), (17, 257, 9), (1, 1, 16)]:
        out, a = torch.randn(m, n).to(dtype), torch.randn(m, k).to(dtype)
        strided = torch.randn(k, 2 * n).to(dtype)[:, ::2]  # a column stride of 2: copied
        rows = torch.randn(k, n + 7).to(dtype)[:, :n]  # a row stride past n: read in place
        for b in (strided, rows):
            ours = out.clone()
            ops.addmm_small_(ours, a, b, -0.3)
            exact = out.double() - 0.3 * a.double() @ b.double()  # float32 arithmetic inside
            size = out.double().abs() + 0.3 * a.double().abs() @ b.double().abs()
            ulp = 2.0**-23 if dtype == torch.float32 else 2.0**-7
            assert ((ours.double() - exact).abs() <= 4 * ulp * size + 1e-6).all()
    from qft.zo import lowrank

    x, out = torch.randn(4, 6, 8), torch.randn(4, 6, 5)
    u, v, sel = torch.randn(3, 5), torch.randn(3, 8), torch.randn(2, 3)
    with torch.no_grad():
        got = lowrank.perturb_output_multi("linear", x, out.clone(), u, v, 0.5, sel)
    want = out + 0.5 * ((x @ v.t()).view(2, -1, 3) * sel[:, None, :]).view(4, 6, 3) @ u
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@inside
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rank_one_add_of_many_matrices_in_one_launch_per_shape_equals_each_alone(ops, dtype):
    """rank1's update: one launch per shape gives every matrix exactly what its own launch gives (its own factors
    and decay), with tiles at the edges of odd shapes."""
    torch.manual_seed(1)
    shapes = [(3, 5), (33, 700), (3, 5), (17, 257), (33, 700), (1, 1)]
    outs = [torch.randn(*s).to(dtype) for s in shapes]
    a = [torch.randn(s[0]).to(dtype) for s in shapes]
    b = [torch.randn(s[1]).to(dtype) for s in shapes]
    betas = [1.0, 0.99, 0.5, 1.0, 0.999, 2.0]
    alone = [o.clone() for o in outs]
    for o, x, y, beta in zip(alone, a, b, betas):
        ops.addr_(o, x, y, -0.3, beta=beta)
    together = [o.clone() for o in outs]
    ops.addr_multi_(together, a, b, -0.3, betas)
    assert all(torch.equal(t, o) for t, o in zip(together, alone))
    # views into one buffer, at an element that is not on 16 bytes: the kernel is not told they are aligned
    buf = torch.zeros(1 + sum(o.numel() for o in outs), dtype=dtype)
    views, at = [], 1
    for o in outs:
        views.append(buf[at:at + o.numel()].view(o.shape))
        views[-1].copy_(o)
        at += o.numel()
    assert ops._offsets(views[0], views + [buf[:2]])[1] == 1
    ops.addr_multi_(views, a, b, -0.3, betas)
    assert all(torch.equal(v, o) for v, o in zip(views, alone))
    with pytest.raises(ValueError, match="contiguous factors in their matrix's dtype"):
        ops.addr_multi_(together[:1], [a[0].double()], b[:1], 1.0, [1.0])


@inside
def test_rank1_factors_of_many_matrices_in_one_launch_equal_each_drawn_alone(ops):
    """On a GPU every matrix's u, v of a step come from one launch; they are the kernel's normals for the matrix's
    seed, whatever else shares the launch, and their cast to bf16 in one op is each one's own cast."""
    from qft.zo import lowrank

    ps = [torch.zeros(3, 5), torch.zeros(700, 2), torch.zeros(1, 1), torch.zeros(2, ops.BLOCK)]
    seeds = [21, 22, 23, 24]
    together = lowrank.prefetch(ps, seeds, step=7)
    halves = lowrank.prefetch(ps, seeds, step=7, dtype=torch.bfloat16)
    for p, s, (u, v), (u16, v16) in zip(ps, seeds, together, halves):
        assert u.shape == (p.shape[0],) and v.shape == (p.shape[1],)
        alone = lowrank.factors(p, s)  # no step: drawn on its own
        assert torch.equal(u, alone[0]) and torch.equal(v, alone[1])
        assert torch.equal(torch.cat([u, v]), ops.direction(torch.zeros(p.shape[0] + p.shape[1]), s))
        assert torch.equal(u16, u.bfloat16()) and torch.equal(v16, v.bfloat16())
    big = torch.cat([uv for u_v in together for uv in u_v])
    assert abs(big.mean().item()) < 0.1 and abs(big.std().item() - 1) < 0.1


@inside
@pytest.mark.parametrize("dist", ["gaussian", "rademacher", "rank1"])  # rank1: the vectors take the kernels
def test_layer_grouped_perturbation_and_update_agree_with_the_directions(ops, dist):
    from qft.zo.spsa import apply_update_, direction, perturbed

    import copy

    from tests.tiny import tiny_inputs, tiny_model

    model = tiny_model("llama")  # its decoder layers sit in a ModuleList: one launch per layer
    params = list(model.parameters())
    before = [p.detach().clone() for p in params]
    x = tiny_inputs(model)
    with torch.no_grad(), perturbed(model, params, 5, 1e-2, dist=dist) as seen:
        y = model(**x).logits
    assert len(seen) == len(params)
    assert all(torch.equal(p, b) for p, b in zip(params, before))  # the stored weights were never touched
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for r, b, i in zip(ref.parameters(), before, range(len(params))):
            r.copy_(b + 1e-2 * direction(b, 5, i, dist=dist))
        torch.testing.assert_close(y, ref(**x).logits, atol=1e-5, rtol=1e-5)
    apply_update_(params, [(5, 2.0), (6, -1.0)], lr=0.1, dist=dist)
    for i, (p, b) in enumerate(zip(params, before)):
        torch.testing.assert_close(p, b - 0.2 * direction(b, 5, i, dist=dist) + 0.1 * direction(b, 6, i, dist=dist),
                                   atol=1e-5, rtol=1e-5)


@inside
@pytest.mark.parametrize("dtype,cols", [(torch.float32, 300), (torch.bfloat16, 2500)])
def test_sparse_mezo_effective_weight_kernel_matches_the_torch_path(dtype, cols):
    """One program per row, numbering its selected entries from the row's offset: the same matrix as the
    whole-matrix cumsum + gather of the torch path (rows longer than a block, a partial last block)."""
    from qft.adapters.sparse_mezo import SparseMezoConfig, kernel
    from qft.adapters.sparse_mezo.layer import SparseMezoLinear

    torch.manual_seed(0)
    lin = torch.nn.Linear(cols, 37, bias=False).to(dtype)
    layer = SparseMezoLinear(lin, "default", density=0.3, delta_dtype="float32")
    delta = layer.sparse_mezo_delta["default"]
    with torch.no_grad():
        delta.copy_(torch.randn_like(delta))
    thr = layer.sparse_mezo_threshold["default"]
    w = lin.weight.detach()
    got = kernel.effective_weight(w, w, delta.detach(), thr, kernel.row_offsets(w, thr))
    ref = layer.effective_weight().detach()  # CPU tensors: the torch path
    assert torch.equal(got != w, ref != w) and (got != w).any()  # the same entries changed
    if dtype == torch.float32:
        assert torch.equal(got, ref)
    else:  # the interpreter's float32 -> bf16 cast may round the other way: one bf16 step at most
        torch.testing.assert_close(got, ref, rtol=2**-7, atol=0)
    assert SparseMezoConfig  # the package imports with the kernel module inside it


@inside
@pytest.mark.parametrize("dist", ["gaussian", "rank1"])
def test_paired_forward_with_the_kernels(ops, dist):
    """--zo-paired with the kernels' directions (the norms' copies made up front, rank1 factors in one launch)."""
    from tests.test_zo import check_paired_forward_several

    check_paired_forward_several(dist, seeds=3)  # one direction: the batch twice
    check_paired_forward_several(dist)  # q directions in one forward: the factors drawn by the kernel, stacked


@inside
@pytest.mark.parametrize("paired,samples", [(False, 1), (True, 1), (True, 2)], ids=["two-forwards", "paired", "q2"])
def test_deferred_updates_with_the_kernels(ops, paired, samples):
    """--zo-defer against writing every step when the kernels draw the factors and write the updates (the rank-one
    kernel for the written ones, one addmm a matrix for the deferred)."""
    from tests.test_zo import _tied_llama
    from tests.test_zo_defer import check_deferred_against_written

    check_deferred_against_written(_tied_llama, paired, samples)


@inside
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dist", ["gaussian", "rademacher"])
def test_masked_kernels_change_only_the_entries_under_each_tensors_threshold(ops, dtype, dist):
    """In-place Sparse-MeZO (qft.zo.mask.MagnitudeMask): the copy and the update take z where |θ| <= the tensor's own
    threshold, the unmasked kernel's exact numbers there, and θ itself elsewhere."""
    torch.manual_seed(0)
    ts = [torch.randn(*s).to(dtype) for s in [(3, 700), (5000,), (2, ops.BLOCK)]]
    thresholds = [0.1, 0.5, 1.0]
    seeds = [21, 22, 23]
    plain = ops.perturbed_copies(ts, seeds, 1e-2, dist)
    masked = ops.perturbed_copies(ts, seeds, 1e-2, dist, thresholds)
    for t, p, m, h in zip(ts, plain, masked, thresholds):
        sel = t.float().abs() <= h
        assert 0 < int(sel.sum()) < t.numel()
        assert torch.equal(m[sel], p[sel]) and torch.equal(m[~sel], t[~sel])
    upd, ref = [t.clone() for t in ts], [t.clone() for t in ts]
    ops.axpby_multi_(upd, seeds, -0.5, dist=dist, thresholds=thresholds)
    ops.axpby_multi_(ref, seeds, -0.5, dist=dist)
    for t, u, r, h in zip(ts, upd, ref, thresholds):
        sel = t.float().abs() <= h
        assert torch.equal(u[sel], r[sel]) and torch.equal(u[~sel], t[~sel])


@inside
def test_in_place_sparse_mezo_through_the_kernels(ops, monkeypatch):
    """MagnitudeMask through the training path with the kernels: only entries under their tensor's threshold move,
    and a replay rebuilds the weights bit-exactly."""
    from qft.zo.mask import MagnitudeMask
    from qft.zo.optimizer import ZoSGD
    from qft.zo.trainer import zo_projected_grad
    from tests.tiny import tiny_inputs, tiny_model

    monkeypatch.setattr(ops, "usable", lambda p, mask_fn=None: p.dtype in ops._FLOATS
                        and (mask_fn is None or getattr(mask_fn, "in_kernel", False)))
    model = tiny_model("llama")
    mats = [p for n, p in model.named_parameters() if ".layers." in n and p.dim() == 2]
    for p in model.parameters():
        p.requires_grad_(any(p is m for m in mats))
    start = [p.detach().clone() for p in mats]
    mask = MagnitudeMask(mats, 0.3)
    x = tiny_inputs(model)
    opt = ZoSGD(mats, lr=0.05, seed=2, mask_fn=mask)
    for _ in range(3):
        seed = opt.step_seed()
        g, _ = zo_projected_grad(model, mats, seed, 1e-3, lambda: model(**x, labels=x["input_ids"]).loss, mask)
        opt.record(seed, g.item())
        opt.step()
    for p, b in zip(mats, start):
        moved = p.detach() != b
        assert moved.any() and not (moved & (b.abs() > mask.threshold(p))).any()
    copies = [torch.nn.Parameter(b.clone()) for b in start]
    again = ZoSGD(copies, lr=0.05, seed=2, mask_fn=MagnitudeMask(copies, 0.3))
    again.replay(opt.state_dict()["zo"]["history"])
    assert all(torch.equal(a, b) for a, b in zip(copies, mats))
