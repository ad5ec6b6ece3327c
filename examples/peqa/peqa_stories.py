"""PEQA end to end on a small real model: quantize to 3-bit integers, fine-tune only the scales, merge, reload.

    python examples/peqa/peqa_stories.py [MODEL] [--bits 3] [--group-size 64] [--steps 80]

MODEL defaults to ../shared/models/stories260K (a 260K-parameter TinyStories Llama). Data: qft's generated
sentiment task (offline). Prints the numbers listed in examples/peqa/README.md.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch

DEFAULT = Path(os.environ.get("QFT_SHARED", Path(__file__).resolve().parents[3] / "shared")) / "models" / "stories260K"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", nargs="?", default=str(DEFAULT))
    ap.add_argument("--bits", type=int, default=3)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--steps", type=int, default=80)
    ap.add_argument("--lr", type=float, default=2e-3)
    args = ap.parse_args()

    from peft import PeftModel

    from qft.adapters.peqa import load_quantized, quantize_to_folder, save_quantized
    from qft.adapters.peqa.storage import folder_size
    from qft.train import FinetuneConfig, finetune

    work = Path(tempfile.mkdtemp(prefix="peqa-example-"))
    float_bytes = sum(p.stat().st_size for p in Path(args.model).glob("*.safetensors"))
    t = time.time()
    record = quantize_to_folder(args.model, work / "quantized", args.bits, args.group_size)
    print(f"quantized {len(record['layers'])} layers in {time.time() - t:.1f} s: float weights {float_bytes / 1024:.0f} KiB"
          f" -> quantized folder {folder_size(work / 'quantized') / 1024:.0f} KiB")

    result = finetune(FinetuneConfig(model=str(work / "quantized"), method="peqa", bits=args.bits,
                                     group_size=args.group_size, max_steps=args.steps, learning_rate=args.lr,
                                     output=str(work / "adapter"), logging_steps=20), progress=False)
    print(f"{result.metric_name}: {result.metric_before:.3f} -> {result.metric_after:.3f} in {result.seconds:.0f} s "
          f"({args.steps} steps); adapter {result.adapter_bytes / 1024:.1f} KiB (scales only)")

    model = PeftModel.from_pretrained(load_quantized(work / "quantized"), work / "adapter").eval()
    ids = torch.randint(3, model.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        merged = model.merge_and_unload()
        save_quantized(merged, work / "merged")
        again = load_quantized(work / "merged")(input_ids=ids).logits
    print(f"merged model saved to {work / 'merged'}; reloaded logits max |diff| = {(again - expected).abs().max():.1e}")


if __name__ == "__main__":
    main()
