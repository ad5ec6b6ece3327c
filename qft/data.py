"""Training data: load local files or Hub datasets, detect their format, and turn them into TRL's formats.

Formats (detected from the columns):
- ``text``                               plain language modelling
- ``prompt`` + ``completion``            loss on the completion only
- ``messages``                           chat, rendered with the tokenizer's chat template by TRL
- ``instruction`` + ``output`` (+``input``)  alpaca, converted to prompt/completion

Also the built-in default task (:func:`default_task`), generated here so that no dataset ships in the repo.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from qft.errors import QftError

FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
FORMATS = {
    "messages": ("messages",),
    "prompt_completion": ("prompt", "completion"),
    "alpaca": ("instruction", "output"),
    "text": ("text",),
}
KNOWN_COLUMNS = "text | prompt+completion | messages | instruction+output(+input)"


def _looks_like_path(spec: str) -> bool:
    return spec.startswith((".", "/", "~")) or Path(spec).suffix.lower() in FILE_BUILDERS or Path(spec).exists()


def load_records(spec: str, split: str = "train"):
    """Load a local .jsonl/.json/.csv/.parquet file (or a folder of them) or a Hub dataset name."""
    import datasets

    datasets.disable_progress_bars()
    path = Path(spec).expanduser()
    if _looks_like_path(spec):
        if not path.exists():
            raise QftError(f"data file {spec} does not exist", "check the --data path")
        files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.suffix.lower() in FILE_BUILDERS)
        if not files:
            raise QftError(f"no .jsonl/.json/.csv/.parquet files in {spec}", "point --data at a data file")
        kinds = {FILE_BUILDERS.get(p.suffix.lower()) for p in files}
        if None in kinds or len(kinds) != 1:
            raise QftError(
                f"cannot read {spec}: qft reads one kind of .jsonl, .json, .csv or .parquet files",
                "convert the data to JSON Lines (one object per line)",
            )
        if all(_is_blank(p) for p in files):  # datasets fails on these with an unhelpful StopIteration
            raise QftError(f"dataset {spec} is empty", "pass a dataset with at least one example")
        try:
            ds = datasets.load_dataset(kinds.pop(), data_files=[str(p) for p in files], split="train")
        except Exception as exc:  # datasets raises many types for malformed files
            raise QftError(f"cannot parse {spec} ({type(exc).__name__})", "check that the file is valid") from exc
    else:
        try:
            ds = datasets.load_dataset(spec, split=split)
        except Exception as exc:
            raise QftError(
                f"cannot load dataset {spec!r} from the Hugging Face Hub ({type(exc).__name__})",
                "check the name and your network, or pass a local .jsonl file",
            ) from exc
    if len(ds) == 0:
        raise QftError(f"dataset {spec} is empty", "pass a dataset with at least one example")
    return ds


def _is_blank(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(4096)
    return not head.strip() and path.stat().st_size <= 4096


def detect_format(columns) -> str:
    cols = set(columns)
    for name, needed in FORMATS.items():
        if set(needed) <= cols:
            return name
    raise QftError(
        f"the data has columns {sorted(cols)}, none of the known formats ({KNOWN_COLUMNS})",
        "rename the columns to one of those formats",
    )


def alpaca_prompt(instruction: str, input_: str | None) -> str:
    # The Stanford Alpaca template (Taori et al., 2023), so that alpaca data trains as its users expect.
    if input_:
        return (
            "Below is an instruction that describes a task, paired with an input that provides further context. "
            "Write a response that appropriately completes the request.\n\n"
            f"### Instruction:\n{instruction}\n\n### Input:\n{input_}\n\n### Response:\n"
        )
    return (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request."
        f"\n\n### Instruction:\n{instruction}\n\n### Response:\n"
    )


def to_sft(ds, tokenizer=None):
    """Convert a dataset to one of TRL SFTTrainer's formats; returns (dataset, format name)."""
    fmt = detect_format(ds.column_names)
    if fmt == "messages" and tokenizer is not None and getattr(tokenizer, "chat_template", None) is None:
        raise QftError(
            "the data is chat `messages` but the tokenizer has no chat template",
            "use an instruct/chat model, or convert the data to prompt/completion",
        )
    if fmt == "alpaca":
        ds = ds.map(
            lambda r: {"prompt": alpaca_prompt(r["instruction"], r.get("input")), "completion": str(r["output"])},
            remove_columns=ds.column_names,
        )
        fmt = "prompt_completion"
    keep = {"text": ["text"], "prompt_completion": ["prompt", "completion"], "messages": ["messages"]}[fmt]
    ds = ds.remove_columns([c for c in ds.column_names if c not in keep])
    return ds, fmt


def calibration_texts(spec: str, n: int = 256) -> list[str]:
    """The first ``n`` examples of a dataset as plain strings (prompt + completion, chat turns joined), for
    calibrating a quantizer such as GPTQ."""
    ds, fmt = to_sft(load_records(spec))
    rows = ds.select(range(min(n, len(ds))))
    if fmt == "text":
        return [str(r["text"]) for r in rows]
    if fmt == "prompt_completion":
        return [str(r["prompt"]) + str(r["completion"]) for r in rows]
    return ["\n".join(str(m.get("content", "")) for m in r["messages"]) for r in rows]


def token_lengths(ds, fmt: str, tokenizer) -> list[int]:
    """Tokens per example as TRL will see them (prompt and completion together; chats through the template)."""
    if fmt == "messages":
        return [len(tokenizer.apply_chat_template(m, tokenize=True, return_dict=False)) for m in ds["messages"]]
    texts = list(ds["text"]) if fmt == "text" else [p + c for p, c in zip(ds["prompt"], ds["completion"])]
    return [len(ids) for ids in tokenizer(texts, add_special_tokens=True)["input_ids"]]


def report_truncation(ds, fmt: str, tokenizer, max_length: int, log=print) -> int:
    """Say how many examples are longer than ``max_length``; TRL truncates them (qft's policy: truncate, say so).

    Returns the number of examples that will be truncated.
    """
    lengths = token_lengths(ds, fmt, tokenizer)
    over = sum(n > max_length for n in lengths)
    if over:
        log(f"note: {over} of {len(lengths)} examples are longer than --max-length {max_length} tokens "
            f"(longest {max(lengths)}) and will be truncated to it; raise --max-length to keep them whole")
    return over


# ---------------------------------------------------------------------------------------------------------------
# The default task: sentiment of short generated reviews, with negation and contrast so that it is not trivial.
# Scored like SST-2 in MeZO/LM-BFF: the logits of one label word per class at the end of the prompt.

POSITIVE = ["wonderful", "brilliant", "delightful", "superb", "moving", "charming", "gripping", "excellent",
            "clever", "beautiful", "funny", "memorable"]
NEGATIVE = ["dull", "awful", "boring", "clumsy", "tedious", "dreadful", "bland", "painful", "silly", "forgettable",
            "messy", "lifeless"]
SUBJECTS = ["the movie", "this film", "the acting", "the plot", "the soundtrack", "the ending", "the cast",
            "the script", "the direction", "the story", "the dialogue", "the pacing"]
ADVERBS = ["really", "truly", "rather", "quite", "simply", "utterly"]
PROMPT = "Review: {sentence}\nSentiment (great or terrible):"
LABEL_WORDS = (" terrible", " great")


@dataclass(frozen=True)
class LabelWordTask:
    """A classification task scored by label-word logits (the MeZO / LM-BFF protocol)."""

    template: str
    label_words: tuple[str, ...]
    examples: tuple[tuple[str, int], ...]  # (prompt, label)


def _review(rng: random.Random) -> tuple[str, int]:
    label = rng.randint(0, 1)
    good, bad = rng.choice(POSITIVE), rng.choice(NEGATIVE)
    s1, s2 = rng.sample(SUBJECTS, 2)
    kind = rng.randrange(4)
    if kind == 0:
        sentence = f"{s1} was {rng.choice(ADVERBS)} {good if label else bad}."
    elif kind == 1:  # negation flips the adjective
        sentence = f"{s1} was not {bad if label else good}."
    elif kind == 2:  # contrast: the clause after "but" decides
        first, second = (bad, good) if label else (good, bad)
        sentence = f"{s1} was {first}, but {s2} was {second} and that is what stays with you."
    else:
        sentence = f"I found {s1} {good if label else bad} and {s2} {rng.choice(POSITIVE if label else NEGATIVE)}."
    return sentence[0].upper() + sentence[1:], label


def default_task(n_train: int = 512, n_eval: int = 96, seed: int = 0):
    """Return (train dataset as prompt/completion, held-out LabelWordTask). Eval sentences never occur in train."""
    import datasets

    rng = random.Random(seed)
    seen, train, evals = set(), [], []
    while len(evals) < n_eval:
        s, y = _review(rng)
        if s not in seen:
            seen.add(s)
            evals.append((PROMPT.format(sentence=s), y))
    while len(train) < n_train:
        s, y = _review(rng)
        if s not in seen:
            seen.add(s)
            train.append({"prompt": PROMPT.format(sentence=s), "completion": LABEL_WORDS[y]})
    return datasets.Dataset.from_list(train), LabelWordTask(PROMPT, LABEL_WORDS, tuple(evals))
