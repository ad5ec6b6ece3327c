"""Zeroth-order objectives besides the LM loss (``ZoArguments.objective``).

``label_word_objective``: for classification data written as prompt -> label word, the cross-entropy over the
label words' logits at the position that predicts the label, the objective MeZO trains prompt-based
classification with (Malladi et al., 2023, its ``--train_as_classification``; LM-BFF's formulation). Unlike
the LM loss over the whole vocabulary (and the end-of-sequence token after the label) it measures exactly the
decision the accuracy counts, so each two-forward estimate carries less noise.

    objective = label_word_objective(label_word_ids(train_dataset, tokenizer))
    ZoArguments(objective=objective)
"""

from __future__ import annotations

import functools
import inspect
from typing import Sequence

import torch
import torch.nn.functional as F

from qft.errors import QftError

MAX_LABEL_WORDS = 32


def label_word_ids(dataset, tokenizer) -> list[int]:
    """The first token of each distinct completion of a prompt/completion dataset (its label words).

    Refuses (one line) data that is not a few label words: no ``completion`` column, more than
    ``MAX_LABEL_WORDS`` distinct completions, or two completions that start with the same token.
    """
    fix = "use --zo-objective loss, or prompt/completion data whose completions are a few label words"
    if "completion" not in getattr(dataset, "column_names", []):
        raise QftError("--zo-objective label-words needs prompt/completion data", fix)
    words = sorted(set(dataset["completion"]))
    if not 2 <= len(words) <= MAX_LABEL_WORDS:
        raise QftError(f"--zo-objective label-words needs 2 to {MAX_LABEL_WORDS} distinct completions, the data has "
                       f"{len(words)}", fix)
    ids = [tokenizer(w, add_special_tokens=False)["input_ids"][:1] for w in words]
    if any(not i for i in ids):
        raise QftError("an empty completion cannot be a label word", fix)
    first = [i[0] for i in ids]
    if len(set(first)) < len(first):
        raise QftError(f"label words {words} do not start with distinct tokens", fix)
    return first


def label_word_objective(candidate_ids: Sequence[int]):
    """objective(model, inputs) -> mean cross-entropy over the label words, for ``ZoArguments.objective``.

    ``inputs`` is the Trainer's batch: ``labels`` is -100 on the prompt, so the first other position of each
    row holds its label word, predicted by the logits one position earlier.
    """
    candidates = torch.tensor(list(candidate_ids))

    def scores_and_targets(model, inputs):
        labels = inputs["labels"]
        rows = torch.arange(labels.shape[0], device=labels.device)
        pos = (labels != -100).int().argmax(1)  # first label position of each row
        if bool((pos < 1).any()):
            raise QftError("a training example has no prompt before its label word",
                           "give every example a non-empty prompt")
        cand = candidates.to(labels.device)
        hit = labels[rows, pos][:, None] == cand[None]
        if not bool(hit.any(1).all()):
            raise QftError("a batch holds a label that is none of the data's label words",
                           "check the data's completions (each must start with one of the label words)")
        kwargs = {k: v for k, v in inputs.items() if k in ("input_ids", "attention_mask", "position_ids")}
        at = pos - 1
        if _keeps_logits(type(_base(model))):  # the head runs on the predicting positions only, not the whole batch
            kwargs["logits_to_keep"], at = torch.unique(at, return_inverse=True)
        logits = model(**kwargs, use_cache=False).logits
        return logits[rows, at][:, cand].float(), hit.int().argmax(1)

    def objective(model, inputs) -> torch.Tensor:
        return F.cross_entropy(*scores_and_targets(model, inputs))

    def halves(model, inputs, batch: int) -> torch.Tensor:
        """The objective of rows [0, batch) and of the rest, from one forward (``ZoArguments(paired=True)``); of each
        block of ``batch`` rows, when the batch is there 2q times (q directions a step)."""
        losses = F.cross_entropy(*scores_and_targets(model, inputs), reduction="none")
        return losses.view(-1, batch).mean(1)

    objective.halves = halves
    return objective


def _base(model):
    """The transformers model under a peft wrapper (the model itself otherwise)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


@functools.cache
def _keeps_logits(model_type: type) -> bool:
    """Whether the model's forward takes ``logits_to_keep`` (transformers' causal LMs: the positions whose
    logits to compute). Over SmolLM2's 49k-word vocabulary the head is a fifth of a forward's FLOPs."""
    return "logits_to_keep" in inspect.signature(model_type.forward).parameters
