"""Metrics qft prints around training: label-word accuracy (MeZO / LM-BFF protocol) and held-out loss."""

from __future__ import annotations

import difflib
import math
import re
import time
from dataclasses import dataclass, field

import torch

from qft.data import LabelWordTask
from qft.errors import QftError


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


# ---------------------------------------------------------------------------------------------------------------
# `qft eval`: the three tasks on local files, and the config that drives them.

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def final_answer(text: str) -> str:
    """GSM8K's answer convention: what follows ``####``; else the last number in the text. Commas dropped."""
    if "####" in text:
        after = text.split("####", 1)[1].strip()
        return (after.splitlines()[0] if after else "").replace(",", "").strip().rstrip(".")
    numbers = _NUMBER.findall(text)
    return numbers[-1].replace(",", "").rstrip(".") if numbers else text.strip()


@torch.no_grad()
def generation_exact_match(model, tokenizer, examples, max_new_tokens: int = 256, batch_size: int = 8) -> dict:
    """Greedy generation per prompt; exact match of :func:`final_answer` of output and reference."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    correct, rows = 0, []
    try:
        for i in range(0, len(examples), batch_size):
            chunk = examples[i : i + batch_size]
            enc = tokenizer([p for p, _ in chunk], return_tensors="pt", padding=True).to(device)
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)
            texts = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
            for (prompt, ref), text in zip(chunk, texts):
                ok = final_answer(text) == final_answer(ref)
                correct += ok
                rows.append({"prediction": final_answer(text), "reference": final_answer(ref), "correct": ok})
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return {"exact_match": correct / max(len(examples), 1), "examples": len(examples), "rows": rows}


@torch.no_grad()
def text_perplexity(model, tokenizer, texts, max_length: int = 512, batch_size: int = 8) -> dict:
    """Token-weighted mean loss and perplexity; each text is cut into windows of ``max_length`` tokens."""
    ids = []
    for t in texts:
        toks = tokenizer(t, add_special_tokens=True)["input_ids"]
        ids += [toks[j : j + max_length] for j in range(0, len(toks), max_length) if len(toks[j : j + max_length]) > 1]
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    def batches():
        for i in range(0, len(ids), batch_size):
            chunk = ids[i : i + batch_size]
            width = max(len(c) for c in chunk)
            input_ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            mask = torch.zeros_like(input_ids)
            for r, c in enumerate(chunk):
                input_ids[r, : len(c)] = torch.tensor(c)
                mask[r, : len(c)] = 1
            labels = input_ids.masked_fill(mask == 0, -100)
            yield {"input_ids": input_ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device)}

    loss = mean_loss(model, batches())
    return {"loss": loss, "perplexity": perplexity(loss), "tokens": sum(len(c) - 1 for c in ids),
            "windows": len(ids)}


TASKS = ("classify", "generate", "perplexity")


@dataclass
class EvalConfig:
    """Everything ``qft eval`` takes; CLI options and YAML keys are these field names."""

    model: str = field(default="", metadata={"help": "Base model, adapter folder, or merged/quantized model folder."})
    task: str = field(default="classify", metadata={
        "help": "classify (label-word logits), generate (exact match of the final answer) or perplexity."})
    data: str | None = field(default=None, metadata={
        "help": ".jsonl rows (or a .txt file for perplexity); default for classify: qft's generated sentiment task."})
    template: str | None = field(default=None, metadata={
        "help": "Prompt with {field} slots, e.g. 'Review: {sentence}\\nSentiment (great or terrible):'."})
    label_words: str | None = field(default=None, metadata={
        "help": "classify: comma-separated label words in label order (a space is put before each), e.g. "
                "'terrible,great'."})
    label_field: str = field(default="label", metadata={"help": "classify: column with the label (index or word)."})
    answer_field: str = field(default="answer", metadata={"help": "generate: column with the reference answer."})
    text_field: str = field(default="text", metadata={"help": "perplexity: column with the text."})
    base: str | None = field(default=None, metadata={"help": "Base model for an adapter (default: the recorded one)."})
    limit: int | None = field(default=None, metadata={"help": "Evaluate only the first N examples."})
    max_new_tokens: int = field(default=256, metadata={"help": "generate: tokens to generate per prompt."})
    max_length: int = field(default=512, metadata={"help": "perplexity: tokens per window."})
    batch_size: int = field(default=8, metadata={"help": "Examples per forward pass."})
    output: str | None = field(default=None, metadata={"help": "Write the results as JSON here."})

    def __post_init__(self):
        if self.task not in TASKS:
            close = difflib.get_close_matches(self.task, TASKS, n=1)
            raise QftError(f"unknown eval task {self.task!r}",
                           f"did you mean {close[0]!r}?" if close else f"choose one of {', '.join(TASKS)}")
        if not self.model:
            raise QftError("no model to evaluate", "pass MODEL (a model, adapter or merged folder)")
        for name in ("batch_size", "max_new_tokens", "max_length"):
            if getattr(self, name) <= 0:
                raise QftError(f"--{name.replace('_', '-')} must be positive", f"pass a positive --{name.replace('_', '-')}")
        if self.limit is not None and self.limit <= 0:
            raise QftError("--limit must be positive", "pass --limit 1 or more, or leave it out")
        if self.task == "classify" and self.data is not None and (self.template is None) != (self.label_words is None):
            raise QftError("classify needs both --template and --label-words (or neither, for SST-2-style "
                           "{sentence, label} rows)", "pass both")


def _rows(cfg: EvalConfig) -> list[dict]:
    from qft.data import load_records

    if cfg.data is not None and cfg.data.endswith(".txt"):
        from pathlib import Path

        if not Path(cfg.data).exists():
            raise QftError(f"data file {cfg.data} does not exist", "check the --data path")
        return [{cfg.text_field: Path(cfg.data).read_text()}]
    rows = list(load_records(cfg.data))
    return rows[: cfg.limit] if cfg.limit else rows


def _fill(template: str, row: dict) -> str:
    try:
        return template.format(**row)
    except KeyError as exc:
        raise QftError(f"the template names {{{exc.args[0]}}}, which the data has no column for "
                       f"(columns: {', '.join(row)})", "use the data's column names in --template") from None


def label_word_task(cfg: EvalConfig) -> LabelWordTask:
    """A :class:`LabelWordTask` from rows; SST-2-style ``{sentence, label}`` rows get qft's sentiment prompt."""
    from qft.data import LABEL_WORDS, PROMPT, default_task

    if cfg.data is None:
        task = default_task()[1]
        return LabelWordTask(task.template, task.label_words, task.examples[: cfg.limit] if cfg.limit else task.examples)
    rows = _rows(cfg)
    template = cfg.template or PROMPT
    words = (tuple(" " + w.strip() for w in cfg.label_words.split(",")) if cfg.label_words else LABEL_WORDS)
    examples = []
    for row in rows:
        if cfg.label_field not in row:
            raise QftError(f"the data has no {cfg.label_field!r} column", "pass --label-field with the label column")
        label = row[cfg.label_field]
        if isinstance(label, str) and not label.lstrip("-").isdigit():
            stripped = [w.strip() for w in words]
            if label.strip() not in stripped:
                raise QftError(f"label {label!r} is not one of the label words {stripped}", "fix --label-words")
            label = stripped.index(label.strip())
        label = int(label)
        if not 0 <= label < len(words):
            raise QftError(f"label {label} is out of range for {len(words)} label words", "fix --label-words")
        examples.append((_fill(template, row), label))
    return LabelWordTask(template, words, tuple(examples))


def run_eval(cfg: EvalConfig, log=print) -> dict:
    """``qft eval`` as a library call: load the model (any kind), score the task, return the results."""
    from qft.merge import load_any

    model, tok, kind = load_any(cfg.model, cfg.base, log=log)
    start = time.time()
    if cfg.task == "classify":
        task = label_word_task(cfg)
        metrics = {"accuracy": label_word_accuracy(model, tok, task, batch_size=cfg.batch_size),
                   "examples": len(task.examples)}
    elif cfg.task == "generate":
        template = cfg.template or "Question: {question}\nAnswer:"
        rows = _rows(cfg)
        if rows and cfg.answer_field not in rows[0]:
            raise QftError(f"the data has no {cfg.answer_field!r} column", "pass --answer-field")
        examples = [(_fill(template, r), str(r[cfg.answer_field])) for r in rows]
        metrics = generation_exact_match(model, tok, examples, cfg.max_new_tokens, cfg.batch_size)
    else:
        rows = _rows(cfg)
        if rows and cfg.text_field not in rows[0]:
            raise QftError(f"the data has no {cfg.text_field!r} column", "pass --text-field")
        metrics = text_perplexity(model, tok, [r[cfg.text_field] for r in rows], cfg.max_length, cfg.batch_size)
    result = {"model": cfg.model, "kind": kind, "task": cfg.task, "data": cfg.data or "qft default task",
              **metrics, "seconds": round(time.time() - start, 3)}
    if cfg.output:
        from qft.io import write_json_atomic

        write_json_atomic(cfg.output, result)
    return result
