"""Where a MeZO step's time goes: torch.profiler over the `qft bench mezo` paths, in one process.

For each path it times steps (wall clock, synchronized), then profiles a few and records the GPU's busy time
(the union of its kernels' intervals: the rest of the wall time the GPU waits for the CPU or a sync), the
longest idle gaps with the kernels around them, the kernel launches a step, and the ops that take the most GPU
and CPU time. The model is a random-weight Llama of one of qft's benchmark shapes, built in memory (bf16 on a GPU,
float32 on a CPU).

    python benchmarks/profile_zo.py --shape llama3-8b --paths inference,qft-mezo-rank1 --out prof.json
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def _device_us(evt) -> float:
    return getattr(evt, "self_device_time_total", None) or getattr(evt, "self_cuda_time_total", 0.0)


def _kernels(prof) -> list:
    """The profile's GPU kernels and copies, by start time: device events less user annotations (an optimizer's
    ``Optimizer.step#...`` range is recorded on the GPU's timeline too, and is no kernel)."""
    cpu = torch.autograd.DeviceType.CPU
    return sorted((e for e in prof.events() if e.device_type != cpu and not getattr(e, "is_user_annotation", False)),
                  key=lambda e: e.time_range.start)


def _idle(kernels, n: int, top: int) -> tuple[float, list]:
    """The GPU's busy time a step (the union of its kernels' intervals) and its ``top`` longest idle gaps between
    kernels, each with the kernels before and after it: what the GPU waited on."""
    busy, gaps, end, last = 0.0, [], None, None
    for e in kernels:
        a, b = e.time_range.start, e.time_range.end
        if end is not None and a > end:
            gaps.append((a - end, last.name[:60], e.name[:60]))
        if end is None or b > end:
            busy += b - max(a, end if end is not None else a)
            end, last = b, e
    gaps.sort(key=lambda g: -g[0])
    return busy / 1000 / n, [{"ms": round(g / 1000, 3), "after": x, "before": y} for g, x, y in gaps[:top]]


def profile_path(path: str, model, batch: int, seq: int, warmup: int, steps: int, top: int) -> dict:
    from torch.profiler import ProfilerActivity, profile

    from qft.bench.zo_worker import build_step

    step, model = build_step(path, model, batch, seq)
    cuda = torch.cuda.is_available()
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    for _ in range(warmup):
        step()
    sync()
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(steps):
        step()
    sync()
    wall = 1000 * (time.perf_counter() - t0) / steps
    cpu = 1000 * (time.process_time() - c0) / steps
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    n = max(2, steps // 3)
    with profile(activities=activities) as prof:
        for _ in range(n):
            step()
        sync()
    events = prof.key_averages()
    ops = [e for e in events if e.device_type == torch.autograd.DeviceType.CPU]
    timeline = _kernels(prof)
    names = {e.name for e in timeline}
    kernels = [e for e in events if e.device_type != torch.autograd.DeviceType.CPU and e.key in names]
    busy, gaps = _idle(timeline, n, top) if cuda else (None, [])
    row = lambda e, ms: {"name": e.key[:120], "ms_per_step": round(ms / n, 3), "calls_per_step": e.count / n}  # noqa
    return {
        "wall_ms": round(wall, 2), "process_cpu_ms": round(cpu, 2),
        "gpu_busy_ms": round(busy, 2) if cuda else None,
        "gpu_idle_gaps": gaps,  # the longest stretches with no kernel running, over the n profiled steps
        "kernel_launches_per_step": sum(e.count for e in kernels) / n if cuda else None,
        "top_gpu": [row(e, _device_us(e) / 1000) for e in sorted(kernels, key=lambda e: -_device_us(e))[:top]],
        "top_gpu_ops": [row(e, _device_us(e) / 1000) for e in sorted(ops, key=lambda e: -_device_us(e))[:top]],
        "top_cpu_ops": [row(e, e.self_cpu_time_total / 1000)
                        for e in sorted(ops, key=lambda e: -e.self_cpu_time_total)[:top]],
    }


def main() -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    from qft.bench.shapes import SHAPES, environment
    from qft.io import write_json_atomic

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="llama3-8b", choices=list(SHAPES))
    ap.add_argument("--paths", default="inference,qft-mezo-rank1,qft-mezo-rademacher,qft-mezo")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=9)
    ap.add_argument("--top", type=int, default=15)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    cuda = torch.cuda.is_available()
    cfg = LlamaConfig(**SHAPES[a.shape], tie_word_embeddings=a.shape == "smollm2-135m")
    torch.manual_seed(0)
    with torch.device("cuda" if cuda else "cpu"):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16 if cuda else torch.float32)
    result = {"shape": a.shape, "batch": a.batch, "seq": a.seq, "steps": a.steps, "environment": environment(),
              "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "paths": {}}
    for path in a.paths.split(","):
        r = profile_path(path, model, a.batch, a.seq, a.warmup, a.steps, a.top)
        result["paths"][path] = r
        print(f"{path}: {r['wall_ms']} ms/step wall, GPU busy {r['gpu_busy_ms']} ms, "
              f"{r['kernel_launches_per_step']} launches, process CPU {r['process_cpu_ms']} ms", flush=True)
        for e in r["top_gpu"][:8]:
            print(f"   gpu {e['ms_per_step']:8.3f} ms x{e['calls_per_step']:6.0f}  {e['name'][:80]}", flush=True)
        for g in r["gpu_idle_gaps"][:8]:
            print(f"   idle {g['ms']:7.3f} ms after {g['after'][:40]} before {g['before'][:40]}", flush=True)
        for e in r["top_cpu_ops"][:8]:
            print(f"   cpu {e['ms_per_step']:8.3f} ms x{e['calls_per_step']:6.0f}  {e['name'][:80]}", flush=True)
        write_json_atomic(a.out, result)


if __name__ == "__main__":
    main()
