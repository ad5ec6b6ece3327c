"""Optimizer-state memory of every optimizer ``qft finetune --optim`` offers, full-parameter, one process.

For each optimizer: a fresh optimizer over all weights of a random-weight model, one training step, then the
bytes of its state (exact, by walking the state tensors) and the allocator's peak during that step.
"""

from __future__ import annotations

import argparse
import json

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--result", required=True)
    ap.add_argument("--optimizers", required=True)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq", type=int, default=128)
    a = ap.parse_args()

    from transformers import AutoModelForCausalLM

    from qft.callbacks import peak_memory_gib
    from qft.optim import optimizer_state_bytes

    cuda = torch.cuda.is_available()
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.bfloat16 if cuda else torch.float32)
    model.to("cuda" if cuda else "cpu")
    device = next(model.parameters()).device
    ids = torch.randint(10, model.config.vocab_size, (a.batch, a.seq), device=device)
    batch = {"input_ids": ids, "labels": ids}
    params = sum(p.numel() for p in model.parameters())
    rows = {}
    for name in a.optimizers.split(","):
        model.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        try:
            nbytes = optimizer_state_bytes(model, name, batch, learning_rate=1e-5)
            rows[name] = {"state_bytes": nbytes, "state_gib": round(nbytes / 2**30, 3),
                          "bytes_per_param": round(nbytes / params, 3), "step_peak_gib": round(peak_memory_gib(), 3)}
        except Exception as exc:  # one optimizer's failure must not lose the others' rows
            rows[name] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
        print(name, rows[name], flush=True)
    with open(a.result, "w") as f:
        json.dump({"params": params, "optimizers": rows}, f)


if __name__ == "__main__":
    main()
