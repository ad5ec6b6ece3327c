"""The host side of a MeZO step: the GPU path's Python, timed on a CPU with the Triton launches stubbed out.

At the TinyLlama-1.1B shape an H200 waits for a paired ZO step's Python (hooks, launch tables, the update's set-up);
at 8B it did too, before session 16 cut it. This script runs the step functions of the `qft bench mezo` paths
(:func:`qft.bench.zo_worker.build_step`) on a narrow, deep random Llama in float32 on the CPU, with
:func:`qft.zo.triton_ops.usable` taking every float tensor and the kernels replaced by no-ops. So the Python of the
GPU path runs, hooks, tables and plans included, over arithmetic that costs little. It reports each path's step time
(best of several rounds) and its time over ``inference`` (two forwards). The kernels' results are not computed, so
only the timings mean anything. Needs no GPU and no Triton.

    python benchmarks/zo_host_overhead.py --paths inference,qft-mezo-rank1-paired --out host.json
"""

from __future__ import annotations

import argparse
import time

import torch


class _NoLaunch:
    """A kernel stand-in: ``kernel[grid](...)`` does nothing."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def stub_kernels() -> None:
    """Route float tensors through qft's Triton path on any device, with every kernel a no-op."""
    from qft.zo import triton_ops

    for name in ("_axpby_randn_multi", "_addr_kernel", "_addmm_small_kernel", "_addr_multi_kernel"):
        setattr(triton_ops, name, _NoLaunch())
    triton_ops.usable = lambda p, mask_fn=None: (p.dtype in triton_ops._FLOATS and p.is_contiguous()
                                                 and mask_fn is None and p.numel() < triton_ops.MAX_NUMEL)
    triton_ops.ADDR_MIN_NUMEL = 0  # every matrix takes the rank-one kernel, as the large ones do on a GPU


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--paths", default="inference,qft-mezo-rank1-paired,qft-mezo-rank1-paired-defer8")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=16)
    ap.add_argument("--steps", type=int, default=20, help="steps a round")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--label", default="", help="what code this measures (a commit, say), kept in the JSON")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()

    from transformers import LlamaConfig, LlamaForCausalLM

    from qft.bench.zo_worker import build_step
    from qft.io import write_json_atomic

    stub_kernels()
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=a.width, intermediate_size=2 * a.width, num_hidden_layers=a.layers,
                      num_attention_heads=4, num_key_value_heads=2, vocab_size=512)
    rows = {}
    for path in a.paths.split(","):
        step, _ = build_step(path, LlamaForCausalLM(cfg), a.batch, a.seq)
        for _ in range(3):
            step()
        times = []
        for _ in range(a.rounds):
            t0 = time.perf_counter()
            for _ in range(a.steps):
                step()
            times.append(1000 * (time.perf_counter() - t0) / a.steps)
        rows[path] = {"step_ms": round(min(times), 3), "rounds_ms": [round(t, 3) for t in times]}
        print(f"{path}: {min(times):.2f} ms a step (best of {a.rounds})", flush=True)
    if "inference" in rows:
        for path, row in rows.items():
            row["over_inference_ms"] = round(row["step_ms"] - rows["inference"]["step_ms"], 3)
    result = {"label": a.label, "layers": a.layers, "width": a.width, "batch": a.batch, "seq": a.seq, "steps": a.steps,
              "torch": torch.__version__, "paths": rows}
    write_json_atomic(a.out, result)


if __name__ == "__main__":
    main()
