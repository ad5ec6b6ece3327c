"""QST side networks fitted on cached frozen states: SST-2 design search on the CPU (issue 4).

QST's LLM is frozen and runs without autograd, so its hidden states for a fixed set of prompts never change
during training. This script computes them once (the NF4 model, as ``qft finetune --method qst`` loads it) for
the ../shared/DATA.md split (1,000 training sentences, of which ``qft finetune`` holds 50 out, and the 872 dev
sentences), then trains qft's own ``SideNetwork`` on them: the label word's cross-entropy over the whole
vocabulary at the last prompt position, through the LLM's frozen LM head, AdamW, cosine schedule with 5%
warm-up, batch 16, as ``qft finetune`` trains. A 300-step run takes seconds instead of minutes, so designs
can be compared over several seeds (one dev run has a noise of about +-1.3 points). The real pipeline
(``python -m qft.bench.sst2 --methods qst``) confirms the winners.

Not the same as the real pipeline in two ways: the loss leaves out the end-of-sequence token that follows the
label word, and the states come from the CPU's float32 compute rather than the GPU's bf16.

    python benchmarks/qst_explore.py --runs "lr=1e-3 lr=3e-3,input_norm=true" --seeds 3 --out OUT.json
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import qft  # noqa: F401  (registers QST with peft)
from qft.adapters.qst import QstConfig, SideNetwork
from qft.bench.sst2 import LABEL_WORDS, _read, sst2_task
from qft.data import PROMPT


def split(data_dir: Path, seed: int = 42) -> tuple[list, list, list]:
    """The sentences ``python -m qft.bench.sst2`` trains on (its 1,000, less the ones ``qft finetune`` holds out
    at ``seed``), the 872 dev sentences and the 1,821 test sentences, as (prompt, label). Designs are picked on dev
    (as every SST-2 figure here is reported); test says how much of a pick's lead is the pick."""
    from qft.data import load_records
    from qft.train import _split_eval

    train_file, task = sst2_task(data_dir)
    kept, _ = _split_eval(load_records(str(train_file)), seed)
    train = [(r["prompt"], LABEL_WORDS.index(r["completion"])) for r in kept]
    test = [(PROMPT.format(sentence=r["sentence"]), int(r["label"])) for r in _read(data_dir / "test.jsonl")]
    return train, list(task.examples), test


@torch.no_grad()
def cache_states(model, tok, examples, batch: int = 32) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per example: (hidden states (layers + 1, tokens, hidden) in bf16, the final state at the last token)."""
    out = []
    decoder = model.get_decoder()
    for i in range(0, len(examples), batch):
        chunk = [p for p, _ in examples[i:i + batch]]
        enc = tok(chunk, return_tensors="pt", padding=True).to(model.device)
        res = decoder(**enc, output_hidden_states=True, use_cache=False)
        states = torch.stack(res.hidden_states, 1)  # (b, layers + 1, t, hidden), right padded
        for j, n in enumerate(enc["attention_mask"].sum(1).tolist()):
            out.append((states[j, :, :n].to(torch.bfloat16).clone(), res.last_hidden_state[j, n - 1].float().clone()))
        print(f"  cached {len(out)}/{len(examples)}", flush=True)
    return out


def batch_of(items):
    """Left-pad cached examples (on their device): (hidden states tuple, final (b, t, hidden), mask (b, t))."""
    t = max(s.shape[1] for s, _ in items)
    layers, hidden, device = items[0][0].shape[0], items[0][0].shape[2], items[0][0].device
    states = torch.zeros(len(items), layers, t, hidden, device=device)
    mask = torch.zeros(len(items), t, dtype=torch.long, device=device)
    for j, (s, _) in enumerate(items):
        states[j, :, t - s.shape[1]:] = s.float()
        mask[j, t - s.shape[1]:] = 1
    final = torch.zeros(len(items), t, hidden, device=device)
    final[:, -1] = torch.stack([f for _, f in items])
    return tuple(states.unbind(1)), final, mask


def train_side(cache_train, y_train, cache_dev, y_dev, head: torch.Tensor, label_ids, options: dict, seed: int,
               steps: int = 300, batch: int = 16, log_every: int = 0, test=None) -> dict:
    """Train one side network on cached states; dev accuracy (%) at the end (and every ``log_every`` steps)."""
    opts = dict(options)
    lr = float(opts.pop("lr", 1e-3))
    wd = float(opts.pop("weight_decay", 0.0))
    steps = int(opts.pop("steps", steps))
    torch.manual_seed(seed)
    cfg = QstConfig(**opts)
    hidden = head.shape[1]
    net = SideNetwork(hidden, hidden, len(cache_train[0][0]) - 1, cfg).to(head.device)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=wd)
    warm = math.ceil(0.05 * steps)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: s / warm if s < warm else 0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, steps - warm))))
    rng = random.Random(seed)
    order: list[int] = []
    curve, losses = [], []
    t0 = time.time()
    for step in range(1, steps + 1):
        if len(order) < batch:
            perm = list(range(len(cache_train)))
            rng.shuffle(perm)
            order += perm
        idx, order = order[:batch], order[batch:]
        hs, final, mask = batch_of([cache_train[i] for i in idx])
        net.train()
        out = net(hs, final, mask)[:, -1]
        loss = F.cross_entropy(out @ head.T, label_ids[torch.tensor([y_train[i] for i in idx], device=head.device)])
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        if log_every and step % log_every == 0 and step < steps:
            curve.append((step, evaluate(net, cache_dev, y_dev, head, label_ids)))
    acc = evaluate(net, cache_dev, y_dev, head, label_ids)
    curve.append((steps, acc))
    extra = {"test_accuracy": evaluate(net, test[0], test[1], head, label_ids)} if test else {}
    return {"accuracy": acc, **extra, "curve": curve,
            "train_loss_last50": round(sum(losses[-50:]) / len(losses[-50:]), 4),
            "beta": round(float(net.beta.detach()) * net.output_gate_scale, 3),
            "params": sum(p.numel() for p in net.parameters()), "seconds": round(time.time() - t0, 1)}


@torch.no_grad()
def evaluate(net, cache, labels, head, label_ids, batch: int = 64) -> float:
    net.eval()
    correct = 0
    for i in range(0, len(cache), batch):
        hs, final, mask = batch_of(cache[i:i + batch])
        logits = net(hs, final, mask)[:, -1] @ head[label_ids].T
        correct += int((logits.argmax(-1).cpu() == torch.tensor(labels[i:i + batch])).sum())
    return round(100 * correct / len(cache), 1)


def parse_run(spec: str) -> dict:
    from qft.bench.sst2 import _scalar

    return {k: _scalar(v) for k, v in (kv.split("=", 1) for kv in spec.split(",") if kv)}


def load_cache(a, tok, splits, device) -> dict:
    """The frozen states of every split, computed once (by the NF4 model on ``device``) and kept in ``a.cache``."""
    cached = torch.load(a.cache) if a.cache.exists() else {}
    missing = [name for name in splits if name not in cached]
    if missing:
        from qft.models import QuantSettings, load_base

        model = load_base(a.model, QuantSettings())
        model.eval()
        tok.padding_side = "right"
        cached.update({name: cache_states(model, tok, splits[name]) for name in missing})
        cached["head"] = model.get_output_embeddings().weight.detach().float().clone()
        tmp = a.cache.with_suffix(".tmp")
        torch.save(cached, tmp)
        tmp.replace(a.cache)
        del model
    move = lambda items: [(s.to(device), f.to(device)) for s, f in items]  # noqa: E731
    return {k: (v.to(device) if k == "head" else move(v)) for k, v in cached.items()}


def pick(results: list[dict], top: int) -> list[str]:
    """The ``top`` run specs with the best mean dev accuracy over their seeds, best first."""
    runs: dict = {}
    for r in results:
        for spec, v in r["runs"].items():
            runs.setdefault(spec, []).extend(x["accuracy"] for x in v["seeds"])
    return sorted(runs, key=lambda k: -sum(runs[k]) / len(runs[k]))[:top]


# explore keys -> `qft finetune` options (lr goes into the job's LR slot)
FINETUNE_KEYS = {"r": "side_reduction", "dropout": "lora_dropout", "gate_init": "side_gate_init",
                 "gate_scale": "side_gate_scale", "input_norm": "side_input_norm", "standardize": "side_standardize",
                 "uniform_attention": "side_uniform_attention", "readout": "side_readout", "downsample": "downsample",
                 "weight_decay": "weight_decay"}


def as_gpu_runs(specs: list[str], seeds: list[int]) -> str:
    """Explore specs as ``benchmarks/sst2_gpu_runs.sh`` QST jobs (qst:LR:KEY=VALUE,...,seed=S), one per seed."""
    jobs = []
    for spec in specs:
        run = parse_run(spec)
        lr = run.pop("lr", 1e-3)
        unknown = set(run) - set(FINETUNE_KEYS)
        if unknown:
            raise SystemExit(f"{spec}: {sorted(unknown)} have no `qft finetune` option")
        opts = [f"{FINETUNE_KEYS[k]}={str(v).lower() if isinstance(v, bool) else v}" for k, v in run.items()]
        jobs += [f"qst:{lr}:{','.join(opts + [f'seed={seed}'])}" for seed in seeds]
    return " ".join(jobs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=str(Path.home() / ".cache/qft/models/SmolLM2-135M-Instruct"))
    ap.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared/data/sst2")
    ap.add_argument("--runs", default="", help="space-separated runs, each KEY=VALUE,... (QstConfig fields, lr, "
                                               "weight_decay, steps); none: only compute the cache")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--first-seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--log-every", type=int, default=0)
    ap.add_argument("--cache", type=Path, default=Path("/tmp/qft-qst-states.pt"))
    ap.add_argument("--out", type=Path)
    ap.add_argument("--pick", type=int, default=0, metavar="K",
                    help="print the K best runs of the result files given as --merge (best mean dev accuracy)")
    ap.add_argument("--merge", type=Path, nargs="*", default=[])
    ap.add_argument("--as-gpu-runs", default="", metavar="SEEDS",
                    help="print the picked runs (with --pick) or the given --runs as sst2_gpu_runs.sh QST jobs, one "
                         "per seed (e.g. '42,1')")
    a = ap.parse_args()
    if a.as_gpu_runs and not a.pick:  # the given --runs, as jobs
        print(as_gpu_runs(a.runs.split(), [int(x) for x in a.as_gpu_runs.split(",")]))
        return
    if a.pick:
        best = pick([json.loads(f.read_text()) for f in a.merge if f.exists()], a.pick)
        print(as_gpu_runs(best, [int(x) for x in a.as_gpu_runs.split(",")]) if a.as_gpu_runs else " ".join(best))
        return
    from qft.io import write_json_atomic
    from qft.models import load_tokenizer

    device = "cuda" if torch.cuda.is_available() else "cpu"
    tok = load_tokenizer(a.model)
    train, dev, test = split(a.data)
    cached = load_cache(a, tok, {"train": train, "dev": dev, "test": test}, device)
    label_ids = torch.tensor([tok(w, add_special_tokens=False)["input_ids"][0] for w in LABEL_WORDS], device=device)
    ys = {name: [y for _, y in rows] for name, rows in (("train", train), ("dev", dev), ("test", test))}
    if not a.runs:
        return
    results = json.loads(a.out.read_text()) if a.out.exists() else {"note": __doc__.split("\n\n")[0], "runs": {}}
    results["device"] = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    for spec in a.runs.split():
        for seed in range(a.first_seed, a.first_seed + a.seeds):
            r = train_side(cached["train"], ys["train"], cached["dev"], ys["dev"], cached["head"], label_ids,
                           parse_run(spec), seed, a.steps, log_every=a.log_every, test=(cached["test"], ys["test"]))
            results["runs"].setdefault(spec, {"seeds": []})["seeds"].append(r)
            print(spec, seed, r, flush=True)
        seeds = results["runs"][spec]["seeds"]
        for key in ("accuracy", "test_accuracy"):
            results["runs"][spec][f"mean_{key}"] = round(sum(x[key] for x in seeds) / len(seeds), 2)
        print(f"== {spec}: dev {results['runs'][spec]['mean_accuracy']} test "
              f"{results['runs'][spec]['mean_test_accuracy']}", flush=True)
        write_json_atomic(a.out, results)


if __name__ == "__main__":
    main()
