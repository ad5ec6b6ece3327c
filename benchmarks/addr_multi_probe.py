"""Why rank1's one-launch update moved 2.2 TB/s where the per-matrix rank-one kernel (``triton_ops.addr_``) moved
3.7 (session-9 profile of a Llama-3-8B step): time the variants on one GPU.

    python benchmarks/addr_multi_probe.py --out probe.json

Variants over 32 bf16 matrices of 14336 x 4096 (the MLP weights of Llama-3-8B), each read and written once:
  per-matrix     ``addr_`` once per matrix (pointers as kernel arguments: Triton knows their alignment)
  pointer-table  one launch reading each matrix's address from a table (qft's kernel before session 9)
  pointer-table-w8  the same with 8 warps
  multi          ``addr_multi_``: one launch, the table holding offsets from a base pointer argument

The session-9 run (results/session9/bench/addr-multi-probe.json, H200) measured 3.71, 2.18, 1.17 and 3.75 TB/s;
its "multi" was the pointer table and its "multi-offset" what ``addr_multi_`` does now.
"""

from __future__ import annotations

import argparse
import json

import torch
import triton
import triton.language as tl

from qft.zo import triton_ops


@triton.jit
def _pointer_table(table, n_mats, m, n, alpha, DTYPE: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
    t = tl.program_id(2)
    out = tl.load(table + t).to(tl.pointer_type(DTYPE))
    a = tl.load(table + n_mats + t).to(tl.pointer_type(DTYPE))
    b = tl.load(table + 2 * n_mats + t).to(tl.pointer_type(DTYPE))
    triton_ops._addr_tile(out, a, b, m, n, 1.0, alpha, m, BM, BN)


def pointer_table(outs, a, b, alpha, warps: int = 4):
    table = torch.tensor([t.data_ptr() for t in list(outs) + list(a) + list(b)], dtype=torch.int64,
                         device=outs[0].device)
    m, n = outs[0].shape
    grid = (triton.cdiv(m, triton_ops.ADDR_BM), triton.cdiv(n, triton_ops.ADDR_BN), len(outs))
    _pointer_table[grid](table, len(outs), m, n, float(alpha), DTYPE=tl.bfloat16, BM=triton_ops.ADDR_BM,
                         BN=triton_ops.ADDR_BN, num_warps=warps)


def timed(fn, reps: int = 10) -> float:
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--mats", type=int, default=32)
    args = ap.parse_args()
    torch.manual_seed(0)
    m, n = 14336, 4096
    outs = [torch.randn(m, n, device="cuda", dtype=torch.bfloat16) for _ in range(args.mats)]
    a = [torch.randn(m, device="cuda", dtype=torch.bfloat16) for _ in outs]
    b = [torch.randn(n, device="cuda", dtype=torch.bfloat16) for _ in outs]
    gb = 2 * sum(o.numel() * o.element_size() for o in outs) / 1e9  # read + write
    variants = {
        "per-matrix": lambda: [triton_ops.addr_(o, x, y, -1e-9) for o, x, y in zip(outs, a, b)],
        "pointer-table": lambda: pointer_table(outs, a, b, -1e-9),
        "pointer-table-w8": lambda: pointer_table(outs, a, b, -1e-9, warps=8),
        "multi": lambda: triton_ops.addr_multi_(outs, a, b, -1e-9, [1.0] * len(outs)),
    }
    # the one-launch variants compute what per-matrix does: check on copies
    ref, table, multi = ([o.clone() for o in outs[:2]] for _ in range(3))
    for o, x, y in zip(ref, a, b):
        triton_ops.addr_(o, x, y, 0.5)
    pointer_table(table, a[:2], b[:2], 0.5)
    triton_ops.addr_multi_(multi, a[:2], b[:2], 0.5, [1.0, 1.0])
    result = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
              "matrices": [args.mats, m, n],
              "equal": all(torch.equal(r, t) and torch.equal(r, u) for r, t, u in zip(ref, table, multi)),
              "ms": {}, "tb_per_s": {}}
    for name, fn in variants.items():
        ms = timed(fn)
        result["ms"][name] = round(ms, 3)
        result["tb_per_s"][name] = round(gb / ms, 2)
        print(name, result["ms"][name], "ms", result["tb_per_s"][name], "TB/s", flush=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
