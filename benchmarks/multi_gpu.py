"""Data parallelism of every qft method: 1 GPU against N GPUs (issue 9), through `qft finetune --num-gpus`.

For each method, two pairs of `qft finetune` runs at the same global batch (N x per-GPU batch = 1 x batch):
- speed: a random-weight checkpoint of --shape (Llama-3-8B by default, qft.bench.shapes), random words of
  --seq tokens; tokens/s of the second half of the run (rank 0's tokens/s counts the tokens of all ranks),
  and the N-GPU / 1-GPU ratio (issue 9's goal: >= 1.8 on 2 GPUs);
- loss: a small real model (--loss-model; default: qft's default SmolLM2-135M-Instruct) on qft's default
  sentiment task (or --loss-data), loss logged every step; the largest gap between the two curves.

Writes --out (default benchmarks/results/multi_gpu.json) with the GPU and library versions, the per-run logs
under <out stem>-logs/, and <out stem>_loss.png when matplotlib is installed.

    python benchmarks/multi_gpu.py                                   # on the 2-GPU machine: everything
    python benchmarks/multi_gpu.py --methods qlora,mezo --steps 20   # a subset
    python benchmarks/multi_gpu.py --loss-model /tmp/smollm2         # offline: a converted model folder
    python benchmarks/multi_gpu.py --cpu --shape tiny --steps 4 --loss-steps 4 --methods mezo,qlora \
        --out /tmp/mg.json                                           # dry run of the harness: 2 CPU ranks, gloo
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _word_tokenizer(folder: Path, vocab: int) -> None:
    """A word-level tokenizer "w0".."wK" for a random checkpoint, so that N words are exactly N tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    if (folder / "tokenizer.json").exists():
        return
    words = ["<pad>", "<unk>", "<eos>"] + [f"w{i}" for i in range(min(vocab, 8192) - 3)]
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", pad_token="<pad>", eos_token="<eos>") \
        .save_pretrained(folder)


def _random_words(path: Path, rows: int, seq: int, seed: int = 0) -> Path:
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(rows):
            f.write(json.dumps({"text": " ".join(f"w{rng.randrange(8000)}" for _ in range(seq - 1))}) + "\n")
    return path


def _finetune(nproc: int, method: str, model: str, data: str | None, out: Path, log: Path, *, batch: int, steps: int,
              logging_steps: int, seq: int, cpu: bool, extra: list[str]) -> dict:
    """One `qft finetune --num-gpus nproc` run; its logged losses, tokens/s and peak memory (rank 0)."""
    cmd = [sys.executable, "-m", "qft.cli", "finetune", "--num-gpus", str(nproc), "--method", method, "--model", model,
           "--output", str(out), "--overwrite", "--max-steps", str(steps), "--batch-size", str(batch),
           "--logging-steps", str(logging_steps), "--max-length", str(seq), "--seed", "0", *extra]
    if data is not None:
        cmd += ["--data", data]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": os.pathsep.join(
        filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    if cpu:
        env["CUDA_VISIBLE_DEVICES"] = ""
    start = time.time()
    with open(log, "w") as f:  # to a file, not a pipe: a run stopped at a time limit keeps its log
        f.write(" ".join(cmd) + "\n")
        f.flush()
        code = subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT).returncode
    text = log.read_text(errors="replace")
    rec = {"processes": nproc, "per_device_batch": batch, "seconds": round(time.time() - start, 1), "exit_code": code,
           "log": str(log)}
    if code != 0 or not (out / "qft_run.json").exists():
        rec["error"] = "\n".join(text.splitlines()[-15:])
        return rec
    losses = []
    for line in text.splitlines():  # the Trainer's log lines, printed by rank 0 only
        if line.startswith("{'loss'"):
            losses.append(float(ast.literal_eval(line)["loss"]))
    stats = json.loads((out / "qft_run.json").read_text())["stats"]
    rec.update(losses=losses, tokens_per_s=stats.get("tokens_per_s"), peak_mem_gib=stats.get("peak_mem_gib"),
               world_size=stats.get("world_size"), steps=stats.get("steps"))
    shutil.rmtree(out, ignore_errors=True)  # MeZO saves a whole model (32 GB at the 8B shape): keep the disk free
    return rec


def _plot(result: dict, path: Path) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    methods = [m for m, r in result["methods"].items() if "loss" in r]
    if not methods:
        return None
    fig, axes = plt.subplots(1, len(methods), figsize=(4 * len(methods), 3.2), squeeze=False)
    for ax, m in zip(axes[0], methods):
        for key, run in result["methods"][m]["loss"].items():
            if isinstance(run, dict) and run.get("losses"):
                ax.plot(range(1, len(run["losses"]) + 1), run["losses"], label=f"{key} GPU", lw=1.2,
                        ls="-" if key == "1" else "--")
        ax.set_title(m)
        ax.set_xlabel("step")
        ax.legend()
    axes[0][0].set_ylabel("training loss")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return str(path)


def main() -> None:
    from qft.bench.shapes import SHAPES, environment, make_random_checkpoint
    from qft.methods import METHODS

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--methods", default=",".join(m.name for m in METHODS if m.working))
    p.add_argument("--gpus", type=int, default=2, help="processes of the data-parallel run (against 1)")
    p.add_argument("--shape", default="llama3-8b", choices=sorted(SHAPES))
    p.add_argument("--global-batch", type=int, default=8, help="examples per optimizer step, on 1 or N GPUs")
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--steps", type=int, default=20, help="speed runs: tokens/s is taken over the second half")
    p.add_argument("--loss-model", default=None, help="model of the loss curves (default: qft's default model)")
    p.add_argument("--loss-data", default=None, help="data of the loss curves (default: qft's sentiment task)")
    p.add_argument("--loss-steps", type=int, default=40)
    p.add_argument("--skip", default="", help="comma-separated parts to skip: speed, loss")
    p.add_argument("--cpu", action="store_true", help="dry run on CPU processes (gloo), e.g. with --shape tiny")
    p.add_argument("--work", type=Path, default=Path(os.environ.get("QFT_BENCH_DIR", "/tmp/qft-bench")))
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "multi_gpu.json")
    a = p.parse_args()
    if a.global_batch % a.gpus:
        p.error(f"--global-batch {a.global_batch} is not divisible by --gpus {a.gpus}")
    methods = [m.strip() for m in a.methods.split(",") if m.strip()]
    skip = set(filter(None, a.skip.split(",")))
    logs = a.out.with_name(a.out.stem + "-logs")
    logs.mkdir(parents=True, exist_ok=True)
    a.work.mkdir(parents=True, exist_ok=True)

    result = {"issue": 9, "environment": environment(), "args": {k: str(v) for k, v in vars(a).items()},
              "global_batch": a.global_batch, "methods": {}}
    if a.cpu:
        result["environment"]["note"] = "CPU dry run of the harness (gloo); the speeds mean nothing"
    ckpt = data = None
    if "speed" not in skip or a.cpu:
        ckpt = make_random_checkpoint(a.shape, a.work / a.shape)
        _word_tokenizer(ckpt, SHAPES[a.shape]["vocab_size"])
        data = _random_words(a.work / f"words-{a.seq}.jsonl", rows=a.global_batch * (a.steps + 2), seq=a.seq)
    loss_model, loss_data = a.loss_model, a.loss_data
    if loss_model is None and a.cpu:  # no real model in a dry run: the random checkpoint on random words
        loss_model, loss_data = str(ckpt), loss_data or str(data)
    if loss_model is None:
        from qft.models import resolve_model

        loss_model = resolve_model(None)

    def save() -> None:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(result, indent=2) + "\n")

    for method in methods:
        rec = result["methods"].setdefault(method, {})
        for n in (1, a.gpus):
            batch = a.global_batch // n
            if "speed" not in skip:
                print(f"[{method}] speed, {n} process(es), {a.shape}", flush=True)
                rec.setdefault("speed", {})[str(n)] = _finetune(
                    n, method, str(ckpt), str(data), a.work / f"out-{method}-speed-{n}", logs / f"{method}-speed-{n}.log",
                    batch=batch, steps=a.steps, logging_steps=max(1, a.steps // 2), seq=a.seq, cpu=a.cpu, extra=[])
                save()
            if "loss" not in skip:
                print(f"[{method}] loss curve, {n} process(es)", flush=True)
                rec.setdefault("loss", {})[str(n)] = _finetune(
                    n, method, loss_model, loss_data, a.work / f"out-{method}-loss-{n}", logs / f"{method}-loss-{n}.log",
                    batch=batch, steps=a.loss_steps, logging_steps=1, seq=min(a.seq, 256), cpu=a.cpu, extra=[])
                save()
        one, many = rec.get("speed", {}).get("1", {}), rec.get("speed", {}).get(str(a.gpus), {})
        if one.get("tokens_per_s") and many.get("tokens_per_s"):
            rec["speed"]["ratio"] = round(many["tokens_per_s"] / one["tokens_per_s"], 3)
        one, many = rec.get("loss", {}).get("1", {}), rec.get("loss", {}).get(str(a.gpus), {})
        if one.get("losses") and many.get("losses") and len(one["losses"]) == len(many["losses"]):
            gaps = [abs(x - y) for x, y in zip(one["losses"], many["losses"])]
            rec["loss"]["max_gap"] = max(gaps)
            rec["loss"]["loss_range"] = max(one["losses"]) - min(one["losses"])
        save()
        print(f"[{method}] {json.dumps({k: rec.get(k, {}).get(v) for k, v in (('speed', 'ratio'), ('loss', 'max_gap'))})}",
              flush=True)
    result["plot"] = _plot(result, a.out.with_name(a.out.stem + "_loss.png"))
    save()
    print(f"wrote {a.out}" + (f" and {result['plot']}" if result["plot"] else ""))


if __name__ == "__main__":
    main()
