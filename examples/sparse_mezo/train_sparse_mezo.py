"""Sparse-MeZO (MeZO on each layer's smallest weights) on a real tiny model: stories260K (a 260K-parameter TinyStories Llama) on qft's generated
sentiment task, scored by label-word accuracy before and after. Runs on a laptop CPU in a few minutes.

    python examples/sparse_mezo/train_sparse_mezo.py [MODEL_DIR] [OUTPUT_DIR]
"""

import sys
from pathlib import Path

from qft import FinetuneConfig, finetune

model = sys.argv[1] if len(sys.argv) > 1 else "/work/shared/models/stories260K"
output = sys.argv[2] if len(sys.argv) > 2 else "out-sparse_mezo"
if not Path(model).exists():
    sys.exit(f"model folder {model} not found; pass a local model folder as the first argument")

cfg = FinetuneConfig(model=model, method="sparse-mezo", output=output, overwrite=True, batch_size=16, max_length=64,
                     logging_steps=50, density="0.2", learning_rate=1e-4, zo_eps=1e-3, max_steps=300)
result = finetune(cfg, progress=False)
print(f"{result.metric_name}: {result.metric_before:.4f} -> {result.metric_after:.4f} in {result.stats['steps']} "
      f"steps, {result.seconds:.0f} s; saved {result.adapter_bytes / 1024:.1f} KiB to {result.output}")
