"""One MeZO benchmark path in its own process: bf16 random-weight model, one batch, timed steps.

Paths: ``inference`` (two forward passes, the floor a ZO step is measured against), ``mezo-plain`` (the
reference per-tensor in-place loop: +eps, forward, -2eps, forward, +eps, update; as MeZO's code does it),
``qft-mezo`` (qft: perturbation inside each decoder layer's forward, fused Triton kernels), ``qft-mezo-rademacher``
and ``qft-mezo-rank1`` (the same with ±1 or rank-one directions), ``qft-mezo-rank1-paired`` (rank1 with both forwards as
one forward of the batch twice, ``--zo-paired``), ``qft-mezo-rank1-paired-q4`` (four directions a step in one forward
of the batch eight times, ``--zo-paired --zo-samples 4``), ``qft-mezo-rank1-paired-defer4`` and ``-defer8`` (the
rank1 paired step with the weights' updates written every 4 or 8 steps, ``--zo-defer``; time a multiple of that
many steps), ``qft-sparse-mezo`` (qft
Sparse-MeZO at density 0.2 over every linear layer: the perturbed values are the selected entries' deltas),
``qft-sparse-mezo-inplace`` (the same selection on the weights themselves, ``qft.zo.mask.MagnitudeMask``: no deltas),
``qft-sparse-mezo-inplace-rademacher`` and ``qft-sparse-mezo-inplace-paired`` (the same with ±1 directions, or with
both forwards as one, ``--zo-paired``, as the SST-2 runs train it),
``inference-nf4`` and ``qft-mezo-qlora`` (two forwards of the NF4 model, and MeZO over LoRA on it: ZO at 4-bit
inference memory, ``--zo-adapter qlora``).
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--path", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--result", required=True)
    for name in ("batch", "seq", "steps", "warmup"):
        ap.add_argument(f"--{name}", type=int, required=True)
    ap.add_argument("--rank", type=int, default=16)
    a = ap.parse_args()

    from transformers import AutoModelForCausalLM

    from qft.callbacks import peak_memory_gib

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    if a.path in NF4_PATHS:  # as qft finetune --method qlora loads it (double quant, bf16 compute on a GPU)
        from qft.models import QuantSettings, load_base

        model = load_base(a.model, QuantSettings())
    else:
        model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.bfloat16 if cuda else torch.float32).to(device)
    step, model = build_step(a.path, model, a.batch, a.seq, a.rank)
    for _ in range(a.warmup):
        step()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(a.steps):
        step()
    if cuda:
        torch.cuda.synchronize()
    ms = 1000 * (time.perf_counter() - t0) / a.steps
    row = {"peak_gib": round(peak_memory_gib(), 3), "step_ms": round(ms, 2),
           "tokens_per_s": round(a.batch * a.seq / (ms / 1000), 1),
           # 4-bit weight tensors, not modules: peft's LoRA wrapper of a bitsandbytes layer is also a "Linear4bit"
           "weights_4bit": sum(type(p).__name__ == "Params4bit" for p in model.parameters())}
    if a.path.startswith("qft"):  # the tensors ZO tunes (all weights, Sparse-MeZO's deltas, LoRA's factors)
        row["tuned_params"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    with open(a.result, "w") as f:
        json.dump(row, f)


NF4_PATHS = ("inference-nf4", "qft-mezo-qlora")


def build_step(path: str, model, batch: int, seq: int, rank: int = 16):
    """(step function, model) for one benchmark ``path`` on ``model`` (already on its device), with one random
    batch of ``batch x seq`` tokens; Sparse-MeZO and LoRA wrap the model, so use the model returned."""
    from qft.zo.optimizer import ZoSGD
    from qft.zo.spsa import apply_update_, perturb_inplace_
    from qft.zo.trainer import lm_loss_halves, zo_projected_grad, zo_projected_grad_paired

    device = next(model.parameters()).device
    model.eval()
    ids = torch.randint(10, model.config.vocab_size, (batch, seq), device=device,
                        generator=torch.Generator(device=device).manual_seed(0))
    if path == "qft-sparse-mezo":
        from peft import get_peft_model

        from qft import SparseMezoConfig

        model = get_peft_model(model, SparseMezoConfig(density=0.2, target_modules="all-linear"))
    if path == "qft-mezo-qlora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules="all-linear",
                                                 task_type="CAUSAL_LM"))
    mask_fn = None
    if path.startswith("qft-sparse-mezo-inplace"):  # qft-sparse-mezo's weights, themselves, masked by magnitude
        from qft import SparseMezoConfig
        from qft.adapters.sparse_mezo import target_weights, tune_only
        from qft.zo.mask import MagnitudeMask

        mats = target_weights(model, SparseMezoConfig(density=0.2, target_modules="all-linear"))
        tune_only(model, mats.values())
        mask_fn = MagnitudeMask(mats.values(), density=0.2)
    params = [p for p in model.parameters() if p.requires_grad]  # all weights; Sparse-MeZO: its deltas
    loss_fn = lambda: model(input_ids=ids, labels=ids, use_cache=False).loss  # noqa: E731
    dist = {"qft-mezo-rademacher": "rademacher", "qft-mezo-rank1": "rank1",
            "qft-mezo-rank1-paired": "rank1", "qft-mezo-rank1-paired-q4": "rank1",
            "qft-mezo-rank1-paired-defer4": "rank1", "qft-mezo-rank1-paired-defer8": "rank1",
            "qft-sparse-mezo-inplace-rademacher": "rademacher"}.get(path, "gaussian")
    defer = int(path.rpartition("-defer")[2]) if "-defer" in path else 1
    opt = ZoSGD(params, lr=1e-7, seed=0, dist=dist, mask_fn=mask_fn, defer=defer)

    def step_inference():
        with torch.no_grad():
            loss_fn()
            loss_fn()

    def step_plain():
        seed = opt.step_seed()
        with torch.no_grad():
            perturb_inplace_(params, seed, 1e-3)
            lp = loss_fn()
            perturb_inplace_(params, seed, -2e-3)
            lm = loss_fn()
            perturb_inplace_(params, seed, 1e-3)
            g = ((lp - lm) / 2e-3).item()
        apply_update_(params, [(seed, g)], lr=1e-7, bucket_bytes=0)  # bucket of one tensor: the per-tensor loop
        opt.zo_state["t"] += 1

    def step_qft():
        seed = opt.step_seed()
        g, _ = zo_projected_grad(model, params, seed, 1e-3, loss_fn, mask_fn, dist=dist)
        opt.record(seed, g.item())
        opt.step()

    def step_paired(q: int = 1):
        seeds = [opt.step_seed(j) for j in range(q)]
        gs, _ = zo_projected_grad_paired(model, params, seeds, 1e-3, {"input_ids": ids, "labels": ids},
                                         lm_loss_halves, mask_fn, dist=dist, pending=opt.deferred)
        for seed, g in zip(seeds, gs.tolist()):
            opt.record(seed, g / q)
        opt.step()

    steps = {"inference": step_inference, "inference-nf4": step_inference, "mezo-plain": step_plain,
             "qft-mezo-rank1-paired": step_paired, "qft-mezo-rank1-paired-q4": lambda: step_paired(4),
             "qft-mezo-rank1-paired-defer4": step_paired, "qft-mezo-rank1-paired-defer8": step_paired,
             "qft-sparse-mezo-inplace-paired": step_paired}
    return steps.get(path, step_qft), model


if __name__ == "__main__":
    main()
