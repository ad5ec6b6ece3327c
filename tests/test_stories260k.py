"""Optional: the real pretrained stories260K Llama (../shared/models, see ../shared/DATA.md).

Skips when the folder is absent, so the suite passes on a fresh clone without ../shared.
"""

import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

SHARED = Path(os.environ.get("QFT_SHARED", Path(__file__).resolve().parents[2] / "shared"))
STORIES = SHARED / "models" / "stories260K"
SHAKESPEARE = SHARED / "data" / "tinyshakespeare" / "input.txt"

pytestmark = pytest.mark.skipif(not (STORIES / "config.json").exists(), reason="../shared/models/stories260K absent")


def test_qlora_on_stories260k_lowers_held_out_loss(tmp_path):
    import json

    from qft.cli.main import app

    # plain-text data cut from TinyShakespeare when present, else from a generated story-like text
    if SHAKESPEARE.exists():
        text = SHAKESPEARE.read_text()[:40_000]
        lines = [text[i:i + 300] for i in range(0, len(text), 300)]
    else:
        lines = [f"Once upon a time there was a little cat number {i}. The cat was happy." for i in range(120)]
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"text": ln}) + "\n" for ln in lines))
    out = tmp_path / "adapter"
    res = CliRunner().invoke(app, ["finetune", "--model", str(STORIES), "--data", str(data), "--output", str(out),
                                   "--max-steps", "30", "--batch-size", "8", "--max-length", "128",
                                   "--learning-rate", "3e-3", "--lora-r", "8"])
    assert res.exit_code == 0, res.output
    run = json.loads((out / "qft_run.json").read_text())
    assert run["eval_loss_after"] < run["eval_loss_before"] - 0.05, run
