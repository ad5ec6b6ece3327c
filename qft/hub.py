"""``qft push``: upload an adapter folder to the Hugging Face Hub with a generated model card.

The card states the method (and its paper), the base model, the data, the metrics before and after training
and the ``qft finetune`` command line that reproduces the run, all read from the folder's ``qft_run.json``.
The upload is one commit through ``huggingface_hub.HfApi``.

    push_adapter("qft-out", "me/smollm2-sentiment-qlora")
"""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
from dataclasses import dataclass, field
from pathlib import Path

from qft.errors import QftError

# Flags whose negative form is not --no-NAME.
_NEGATIVE_FLAGS = {"quantize_base": "--float-base"}
_NOT_REPRODUCED = {"overwrite"}


@dataclass
class PushConfig:
    """``qft push`` options (CLI flags and YAML keys)."""

    adapter: str = field(default="", metadata={"help": "Adapter folder written by `qft finetune`."})
    repo_id: str = field(default="", metadata={"help": "Hub repository, e.g. your-name/model-qlora."})
    token: str | None = field(default=None, metadata={
        "help": "Hugging Face token (default: HF_TOKEN or the one `hf auth login` saved)."})
    private: bool = field(default=False, metadata={"help": "Create the repository as private."})
    commit_message: str = field(default="Upload qft adapter", metadata={"help": "Commit message on the Hub."})

    def __post_init__(self):
        if not self.adapter or not self.repo_id:
            raise QftError("qft push needs an adapter folder and a repository id", "run `qft push ADAPTER OWNER/NAME`")
        if self.repo_id.count("/") != 1 or not all(self.repo_id.split("/")):
            raise QftError(f"repository id {self.repo_id!r} is not OWNER/NAME", "pass e.g. your-name/my-adapter")


def reproduce_command(config: dict) -> str:
    """The ``qft finetune`` command line for a run's config: every option that differs from its default."""
    from qft.train import FinetuneConfig

    parts = ["qft", "finetune"]
    for f in dataclasses.fields(FinetuneConfig):
        value = config.get(f.name, f.default)
        if f.name in _NOT_REPRODUCED or value == f.default:
            continue
        flag = "--" + f.name.replace("_", "-")
        if isinstance(value, bool):
            parts.append(flag if value else _NEGATIVE_FLAGS.get(f.name, "--no-" + f.name.replace("_", "-")))
        else:
            parts += [flag, shlex.quote(str(value))]
    return " ".join(parts)


def _metrics(run: dict) -> list[tuple[str, object, object]]:
    rows = []
    for key, before in sorted(run.items()):
        if key.endswith("_before"):
            name = key.removesuffix("_before")
            rows.append((name, before, run.get(name + "_after")))
    return rows


def _fmt(v) -> str:
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def model_card(adapter_dir, repo_id: str | None = None) -> str:
    """README.md for the Hub: YAML metadata, then method, base, data, metrics and the reproducing command."""
    from qft.methods import BY_NAME

    folder = Path(adapter_dir)
    name = repo_id or str(folder)
    run_file = folder / "qft_run.json"
    if not run_file.exists():
        raise QftError(f"{folder} has no qft_run.json", "push a folder written by `qft finetune`")
    run = json.loads(run_file.read_text())
    method = run.get("method", "unknown")
    info = BY_NAME.get(method)
    base, data = run.get("base_model", "unknown"), run.get("data", "unknown")
    stats = run.get("stats", {})
    is_adapter = (folder / "adapter_config.json").exists()
    meta = ["---", "library_name: " + ("peft" if is_adapter else "transformers"), f"base_model: {base}",
            "tags:", "- qft", f"- {method}", "---", ""]
    lines = [f"# {folder.resolve().name}", "",
             f"A {'peft adapter' if is_adapter else 'model'} trained with [qft](https://github.com/) "
             f"using **{method}**" + (f": {info.summary} ({info.paper})." if info else "."), "",
             "| | |", "| --- | --- |", f"| method | {method} |", f"| base model | {base} |", f"| data | {data} |",
             f"| steps | {stats.get('steps', '?')} |", ""]
    metrics = _metrics(run)
    if metrics:
        lines += ["## Metrics", "", "| metric | before | after |", "| --- | --- | --- |"]
        lines += [f"| {n} | {_fmt(b)} | {_fmt(a)} |" for n, b, a in metrics]
        lines.append("")
    if "config" in run:
        lines += ["## Reproduce", "", "```bash", reproduce_command(run["config"]), "```", ""]
    lines += ["## Load", "", "```python"]
    if is_adapter:
        if method != "qlora":
            lines.append("import qft  # registers qft's methods with peft")
        lines += ["from peft import AutoPeftModelForCausalLM",
                  f"model = AutoPeftModelForCausalLM.from_pretrained({name!r})"]
    else:
        lines += ["from transformers import AutoModelForCausalLM",
                  f"model = AutoModelForCausalLM.from_pretrained({name!r})"]
    lines += ["```", ""]
    return "\n".join(meta + lines)


def upload_files(adapter_dir) -> list[Path]:
    """The folder's files that go to the Hub: top-level, not hidden, no training checkpoints."""
    folder = Path(adapter_dir)
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".") and p.name != "README.md")


def hub_token(token: str | None) -> str:
    import huggingface_hub

    token = token or os.environ.get("HF_TOKEN") or huggingface_hub.get_token()
    if not token:
        raise QftError("no Hugging Face token found", "run `hf auth login` or set HF_TOKEN, or pass --token")
    return token


def push_adapter(adapter_dir, repo_id: str, token: str | None = None, private: bool = False,
                 commit_message: str = "Upload qft adapter") -> dict:
    """Upload ``adapter_dir`` plus a generated README.md to ``repo_id`` in one commit; returns what was sent."""
    from huggingface_hub import CommitOperationAdd, HfApi

    folder = Path(adapter_dir)
    if not folder.is_dir():
        raise QftError(f"{folder} is not a folder", "pass the folder `qft finetune` wrote")
    card = model_card(folder, repo_id)
    files = upload_files(folder)
    api = HfApi(token=hub_token(token))
    url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    operations = [CommitOperationAdd(path_in_repo=p.name, path_or_fileobj=str(p)) for p in files]
    operations.append(CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=card.encode()))
    api.create_commit(repo_id, operations=operations, commit_message=commit_message, repo_type="model")
    return {"url": str(url), "files": [p.name for p in files] + ["README.md"], "card": card}
