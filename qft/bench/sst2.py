"""SST-2 quality, the protocol of ../shared/DATA.md (MeZO / LM-BFF style), for any qft method.

Prompt "Review: {sentence}\\nSentiment (great or terrible):", label words " terrible" / " great", scored
by the two label-word logits at the last position; 1,000 random training examples, batch 16; dev accuracy
on all 872 sentences.

    python -m qft.bench.sst2 --model SMOLLM2_DIR --data ../shared/data/sst2 --methods qlora,peqa --steps 300 \\
        --out benchmarks/results/sst2.json
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

from qft.data import PROMPT, LabelWordTask

LABEL_WORDS = (" terrible", " great")


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def sst2_task(data_dir: Path, n_train: int = 1000, seed: int = 0) -> tuple[Path, LabelWordTask]:
    train = _read(data_dir / "train.jsonl")
    random.Random(seed).shuffle(train)
    folder = Path(tempfile.mkdtemp(prefix="qft-sst2-"))
    with open(folder / "train.jsonl", "w") as f:
        for r in train[:n_train]:
            f.write(json.dumps({"prompt": PROMPT.format(sentence=r["sentence"]),
                                "completion": LABEL_WORDS[int(r["label"])]}) + "\n")
    dev = _read(data_dir / "dev.jsonl")
    task = LabelWordTask(PROMPT, LABEL_WORDS, tuple((PROMPT.format(sentence=r["sentence"]), int(r["label"]))
                                                    for r in dev))
    return folder / "train.jsonl", task


def run(model: str, data_dir: Path, methods: list[str], steps: int, out: Path | None, lr: dict | None = None,
        extra: dict | None = None) -> dict:
    from qft.bench.shapes import environment
    from qft.io import write_json_atomic
    from qft.train import FinetuneConfig, finetune

    train_file, task = sst2_task(data_dir)
    results = {"protocol": __doc__.split("\n\n")[1], "model": model, "steps": steps, "batch": 16,
               "environment": environment(), "methods": {}}
    for method in methods:
        t0 = time.time()
        options = dict(model=model, data=str(train_file), method=method, max_steps=steps, batch_size=16,
                       output=tempfile.mkdtemp(prefix=f"qft-sst2-{method}-"), overwrite=True, logging_steps=50,
                       lora_r=8, **(extra or {}).get(method, {}))
        if lr and method in lr:
            options["learning_rate"] = lr[method]
        try:
            r = finetune(FinetuneConfig(**options), log=print, progress=False, eval_task=task)
            results["methods"][method] = {
                "zero_shot": round(100 * r.metric_before, 1), "accuracy": round(100 * r.metric_after, 1),
                "seconds": round(time.time() - t0, 1), "options": options, "stats": r.stats,
                "trainable_params": r.stats.get("trainable_params")}
        except Exception as exc:  # one method's failure must not lose the others' numbers
            results["methods"][method] = {"error": f"{type(exc).__name__}: {exc}"}
        print(method, results["methods"][method], flush=True)
        if out is not None:
            write_json_atomic(out, results)
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True, type=Path)
    ap.add_argument("--methods", default="qlora")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--lr", default="", help="method=lr,method=lr")
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    lr = {k: float(v) for k, v in (kv.split("=") for kv in a.lr.split(",") if kv)}
    run(a.model, a.data, a.methods.split(","), a.steps, a.out, lr)


if __name__ == "__main__":
    main()
