"""Metrics qft prints around training: label-word accuracy (MeZO / LM-BFF protocol) and held-out loss."""

from __future__ import annotations

import math

import torch

from qft.data import LabelWordTask


def _label_token_ids(tokenizer, words) -> list[int]:
    ids = []
    for w in words:
        toks = tokenizer(w, add_special_tokens=False)["input_ids"]
        ids.append(toks[0])  # the first token of each label word decides, as in LM-BFF
    if len(set(ids)) != len(ids):
        raise ValueError(f"label words {words} share their first token; pick label words that differ")
    return ids


@torch.no_grad()
def label_word_accuracy(model, tokenizer, task: LabelWordTask, batch_size: int = 16) -> float:
    """Accuracy of argmax over the label words' logits at the last prompt position."""
    was_training = model.training
    model.eval()
    label_ids = torch.tensor(_label_token_ids(tokenizer, task.label_words))
    device = next(model.parameters()).device
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # the last position is then the prompt's last token for every row
    correct = 0
    try:
        for i in range(0, len(task.examples), batch_size):
            chunk = task.examples[i : i + batch_size]
            enc = tokenizer([p for p, _ in chunk], return_tensors="pt", padding=True).to(device)
            logits = model(**enc).logits[:, -1, :]  # (B, V)
            pred = logits[:, label_ids.to(device)].argmax(-1).cpu()
            correct += int((pred == torch.tensor([y for _, y in chunk])).sum())
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return correct / len(task.examples)


@torch.no_grad()
def mean_loss(model, batches) -> float:
    """Token-weighted mean loss over an iterable of ready batches (with ``labels``)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for batch in batches:
            n = int((batch["labels"][:, 1:] != -100).sum())
            if n:
                total += float(model(**batch).loss) * n
                count += n
    finally:
        model.train(was_training)
    return total / max(count, 1)


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 50.0))
