"""``qft bench``: qft's training paths against the stock stack, side by side, in one run.

Each path runs in its own process (so one path's allocator state never leaks into another's peak),
at the same model shape, batch, sequence length, LoRA rank, optimizer and checkpointing setting, on
random-weight models of real shapes (memory and speed do not depend on the weights' values).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from qft.bench.shapes import SHAPES, environment, make_random_checkpoint
from qft.errors import QftError

SUITES = {
    # path name -> what it is; the first entries are the stock baselines the ratios are taken against
    "qlora": {
        "stock-peft": "peft docs: bnb NF4 + prepare_model_for_kbit_training + get_peft_model, TRL SFTTrainer",
        "stock-trl": "TRL docs: bnb NF4 model + SFTTrainer(peft_config=LoraConfig)",
        "qft": "qft finetune --method qlora: bnb NF4 + lean RMSNorm/SwiGLU + SFTTrainer(peft_config)",
    },
    "peqa": {
        "stock-peft": "peft docs QLoRA: bnb NF4 + prepare_model_for_kbit_training + get_peft_model, TRL SFTTrainer",
        "stock-trl": "TRL docs QLoRA: bnb NF4 model + SFTTrainer(peft_config=LoraConfig)",
        "qft-peqa": "qft PEQA: 4-bit integers in groups of 128, only the scales train, SFTTrainer(peft_config)",
        "qft-peqa-channel": "qft PEQA, one scale per output channel (the paper's default): no weight-gradient matmul",
    },
    "qst": {
        "stock-peft": "peft docs QLoRA: bnb NF4 + prepare_model_for_kbit_training + get_peft_model, TRL SFTTrainer",
        "stock-trl": "TRL docs QLoRA: bnb NF4 model + SFTTrainer(peft_config=LoraConfig)",
        "qft-qst": "qft QST: bnb NF4 LLM under no_grad + side network (r=16, lora downsample), SFTTrainer(peft_config)",
    },
    "spiel": {
        "stock-trl": "TRL docs QLoRA: bnb NF4 model + SFTTrainer(peft_config=LoraConfig)",
        "qft-spiel-nf4": "qft SpIEL over the NF4 base, as many entries as LoRA (density lora:R), RigL regrowth",
        "stock-lora-bf16": "peft LoRA over the bf16 base: SFTTrainer(peft_config=LoraConfig)",
        "qft-spiel-bf16": "qft SpIEL over the bf16 base, density lora:R, RigL regrowth",
    },
    "optim": {
        "state": "optimizer-state bytes after one full-parameter step, for each --optim name",
    },
    "mezo": {
        "inference": "two bf16 forward passes (the floor a ZO step is measured against)",
        "mezo-plain": "MeZO's reference loop: in-place per-tensor +eps, fwd, -2eps, fwd, +eps, update",
        "qft-mezo": "qft: perturbation inside each decoder layer's forward, fused Triton kernels (one launch per layer, one for the update)",
        "qft-mezo-rademacher": "qft MeZO with ±1 directions (--zo-distribution rademacher): 128 signs per Philox draw",
        "qft-mezo-rank1": "qft MeZO with rank-one directions u·vᵀ per matrix (--zo-distribution rank1): forward hooks add the perturbation to each output, no weight copies",
        "qft-mezo-rank1-paired": "qft MeZO rank1 with --zo-paired: both perturbed forwards as one forward of the batch twice (a sign per row)",
        "qft-mezo-rank1-paired-q4": "qft MeZO rank1 with --zo-paired --zo-samples 4: four directions a step, one forward of the batch eight times",
        "qft-mezo-rank1-paired-defer4": "qft MeZO rank1 --zo-paired --zo-defer 4: the weights' rank-one updates written every 4 steps, pending ones taken in the forward hooks",
        "qft-mezo-rank1-paired-defer8": "qft MeZO rank1 --zo-paired --zo-defer 8: the weights' rank-one updates written every 8 steps",
        "qft-sparse-mezo": "qft Sparse-MeZO, density 0.2 of every linear layer (deltas of the smallest weights)",
        "qft-sparse-mezo-inplace": "qft Sparse-MeZO on the weights themselves (qft.zo.mask.MagnitudeMask, density 0.2 of every linear layer): no delta tensor",
        "qft-sparse-mezo-inplace-rademacher": "qft Sparse-MeZO in place with ±1 directions (--zo-distribution rademacher)",
        "qft-sparse-mezo-inplace-paired": "qft Sparse-MeZO in place with --zo-paired: both perturbed forwards as one forward of the batch twice",
        "inference-nf4": "two forward passes of the NF4 model (double quant, bf16 compute): 4-bit inference",
        "qft-mezo-qlora": "qft MeZO over LoRA (r = --lora-r, every linear layer) on the NF4 base (--zo-adapter qlora)",
    },
}
# which stock path each qft path is compared with (default: every path that does not start with "qft")
BASELINES = {"qft-spiel-nf4": ("stock-trl",), "qft-spiel-bf16": ("stock-lora-bf16",),
             "qft-sparse-mezo": ("inference", "qft-mezo"), "qft-sparse-mezo-inplace": ("inference", "qft-sparse-mezo"),
             **{p: ("inference", "qft-sparse-mezo-inplace") for p in ("qft-sparse-mezo-inplace-rademacher",
                                                                      "qft-sparse-mezo-inplace-paired")},
             "qft-mezo-qlora": ("inference-nf4",),
             **{p: ("inference", "qft-mezo-rank1-paired") for p in ("qft-mezo-rank1-paired-q4",
                                                                    "qft-mezo-rank1-paired-defer4",
                                                                    "qft-mezo-rank1-paired-defer8")},
             **{p: ("inference", "mezo-plain") for p in ("qft-mezo", "qft-mezo-rademacher", "qft-mezo-rank1",
                                                       "qft-mezo-rank1-paired")}}
WORKERS = {"qlora": "qft.bench.worker", "peqa": "qft.bench.worker", "qst": "qft.bench.worker",
           "spiel": "qft.bench.worker", "mezo": "qft.bench.zo_worker",
           "optim": "qft.bench.optim_worker"}
OPTIMIZERS = ("adamw_torch,adamw_8bit,paged_adamw_8bit,lion_32bit,lion_8bit,galore_adamw,galore_adamw_8bit,"
              "q_galore_adamw_8bit,apollo_adamw,apollo_mini,spam,stable_spam,adafactor")


def torch_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def run_suite(suite: str, *, shape: str, batch: int, seq: int, steps: int, warmup: int, rank: int,
              gradient_checkpointing: bool, out: Path | None, log=print, optim: str = "adamw_torch",
              reselect_every: int = 20, paths: list[str] | None = None) -> dict:
    if suite not in SUITES:
        raise QftError(f"unknown benchmark suite {suite!r}", f"choose one of {', '.join(SUITES)}")
    if shape not in SHAPES:
        raise QftError(f"unknown shape {shape!r}", f"choose one of {', '.join(SHAPES)}")
    if min(batch, seq, steps, rank) <= 0 or warmup < 0:
        raise QftError("--batch, --seq, --steps and --lora-r must be positive", "pass positive numbers")
    unknown = [p for p in paths or [] if p not in SUITES[suite]]
    if unknown:
        raise QftError(f"unknown path(s) {', '.join(unknown)} for suite {suite}",
                       f"choose from {', '.join(SUITES[suite])}")
    selected = {p: w for p, w in SUITES[suite].items() if not paths or p in paths}
    root = Path(os.environ.get("QFT_BENCH_DIR", tempfile.gettempdir())) / "qft-bench"
    ckpt = make_random_checkpoint(shape, root / shape, log=log)
    rows = {}
    for path, what in selected.items():
        log(f"[{suite}] {path}: {what}")
        with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
            result_file = f.name
        cmd = [sys.executable, "-m", WORKERS[suite], "--path", path, "--model", str(ckpt), "--batch", str(batch),
               "--seq", str(seq), "--steps", str(steps), "--warmup", str(warmup), "--result", result_file]
        if suite == "optim":
            from qft.optim import OPTIMIZERS as INFO

            cuda = torch_cuda()
            optimizers = ",".join(n for n in OPTIMIZERS.split(",") if cuda or not INFO[n].needs_cuda)
            cmd = [sys.executable, "-m", WORKERS[suite], "--model", str(ckpt), "--batch", str(batch),
                   "--seq", str(seq), "--optimizers", optimizers, "--result", result_file]
        if suite != "optim":  # LoRA's rank: the stock paths, SpIEL's count, MeZO over LoRA
            cmd += ["--rank", str(rank)]
        if WORKERS[suite] == "qft.bench.worker":
            cmd += ["--suite", suite, "--optim", optim, "--reselect-every", str(reselect_every)]
            if gradient_checkpointing:
                cmd.append("--gradient-checkpointing")
        t0 = time.time()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-15:]
            rows[path] = {"error": "\n".join(tail)}
            log(f"  failed:\n" + "\n".join(tail))
            continue
        rows[path] = json.loads(Path(result_file).read_text())
        os.unlink(result_file)
        if "peak_gib" in rows[path]:
            log(f"  peak {rows[path]['peak_gib']:.2f} GiB, {rows[path]['tokens_per_s']:.0f} tokens/s "
                f"({time.time() - t0:.0f} s)")
    ratios = {}
    for ours in (p for p in selected if p.startswith("qft")):
        for base in BASELINES.get(ours, [p for p in selected if not p.startswith("qft")]):
            b, q = rows.get(base, {}), rows.get(ours, {})
            if "peak_gib" in b and "peak_gib" in q:
                ratios[f"{ours}/{base}"] = {
                    "memory": round(q["peak_gib"] / b["peak_gib"], 3),
                    "speed": round(q["tokens_per_s"] / b["tokens_per_s"], 3),
                }
    result = {
        "suite": suite, "shape": shape, "shape_config": SHAPES[shape], "batch": batch, "seq": seq,
        "steps": steps, "warmup": warmup, "lora_r": rank, "optim": optim, "reselect_every": reselect_every,
        "gradient_checkpointing": gradient_checkpointing, "paths": selected, "results": rows,
        "ratios": ratios, "environment": environment(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
    if out is not None:
        from qft.io import write_json_atomic

        write_json_atomic(out, result)
    return result
