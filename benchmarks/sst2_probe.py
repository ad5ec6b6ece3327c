"""Linear probes on a frozen LLM's hidden states for SST-2 (the ../shared/DATA.md prompt and 1,000-sentence split).

They bound what any classifier reading the frozen LLM can do, and QST's side network is one. Each row is the
dev accuracy of a logistic regression on standardised features, the best of four L2 weights (picked on dev, so
an upper estimate). Features: the last token's state per layer, several layers' last-token states concatenated,
and states mean-pooled over the tokens (without each sentence's first token, whose state carries the massive
activations).

    python benchmarks/sst2_probe.py [MODEL_DIR] [SST2_DIR] [OUT.json]      # CPU, a few minutes
"""

from __future__ import annotations

import json
import os
import random
import sys

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

from qft.data import PROMPT

WEIGHT_DECAYS = (1e-3, 1e-2, 1e-1, 1.0)


def read(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


@torch.no_grad()
def features(model, tok, rows: list[dict], batch: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """(last-token states, mean-pooled states), each (sentences, layers + 1, hidden)."""
    last, mean = [], []
    for i in range(0, len(rows), batch):
        x = tok([PROMPT.format(sentence=r["sentence"]) for r in rows[i:i + batch]], return_tensors="pt",
                padding=True)
        states = torch.stack(model(**x, output_hidden_states=True).hidden_states, 1)  # (b, layers, t, hidden)
        last.append(states[:, :, -1])
        keep = x["attention_mask"].clone()
        keep[torch.arange(len(keep)), keep.argmax(1)] = 0  # each row's first real token (left padding)
        w = keep[:, None, :, None].float()
        mean.append((states * w).sum(2) / w.sum(2))
    return torch.cat(last), torch.cat(mean)


def probe(train_x: torch.Tensor, train_y: torch.Tensor, dev_x: torch.Tensor, dev_y: torch.Tensor) -> dict:
    """Dev accuracy (%) of an L2-regularised logistic regression, per weight decay."""
    mu, sd = train_x.mean(0), train_x.std(0) + 1e-6
    a, b = (train_x - mu) / sd, (dev_x - mu) / sd
    out = {}
    for wd in WEIGHT_DECAYS:
        w = torch.zeros(a.shape[1], requires_grad=True)
        bias = torch.zeros(1, requires_grad=True)
        opt = torch.optim.LBFGS([w, bias], max_iter=300)

        def closure():
            opt.zero_grad()
            loss = F.binary_cross_entropy_with_logits(a @ w + bias, train_y.float()) + wd * w.pow(2).sum()
            loss.backward()
            return loss

        opt.step(closure)
        with torch.no_grad():
            out[str(wd)] = round(100 * ((b @ w + bias > 0).long() == dev_y).float().mean().item(), 1)
    return out


def main() -> None:
    model_dir = sys.argv[1] if len(sys.argv) > 1 else os.path.expanduser("~/.cache/qft/models/SmolLM2-135M-Instruct")
    data = sys.argv[2] if len(sys.argv) > 2 else "../shared/data/sst2"
    out_file = sys.argv[3] if len(sys.argv) > 3 else "benchmarks/results/sst2-frozen-probes-cpu.json"
    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    train = read(f"{data}/train.jsonl")
    random.Random(0).shuffle(train)  # the same 1,000 sentences as qft.bench.sst2
    train, dev = train[:1000], read(f"{data}/dev.jsonl")
    (last_tr, mean_tr), (last_dv, mean_dv) = features(model, tok, train), features(model, tok, dev)
    y_tr = torch.tensor([int(r["label"]) for r in train])
    y_dv = torch.tensor([int(r["label"]) for r in dev])

    def run(tr, dv):
        return probe(tr.flatten(1), y_tr, dv.flatten(1), y_dv)

    res = {
        "last_token_per_layer_best_wd": {str(layer): max(run(last_tr[:, layer], last_dv[:, layer]).values())
                                         for layer in range(last_tr.shape[1])},
        "last_token_layers_12_to_22": run(last_tr[:, 12:23], last_dv[:, 12:23]),
        "mean_pooled_layer_16": run(mean_tr[:, 16], mean_dv[:, 16]),
        "mean_pooled_layers_12_to_22": run(mean_tr[:, 12:23], mean_dv[:, 12:23]),
        "last_and_mean_layers_14_to_20": run(torch.cat([last_tr[:, 14:21], mean_tr[:, 14:21]], 1),
                                             torch.cat([last_dv[:, 14:21], mean_dv[:, 14:21]], 1)),
        "note": __doc__.split("\n\n")[1].replace("\n", " "),
        "model": model_dir,
    }
    print(json.dumps(res))
    with open(out_file, "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
