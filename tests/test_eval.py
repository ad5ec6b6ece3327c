"""`qft eval`: label-word classification, generation exact match and perplexity on generated local files."""

import json
import math
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from qft.cli.main import app
from qft.evaluate import EvalConfig, final_answer, run_eval

runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_final_answer_follows_gsm8k():
    assert final_answer("so 3 + 4 = 7\n#### 1,234") == "1234"
    assert final_answer("The answer is 42.") == "42"
    assert final_answer("#### 5\nmore text") == "5"


def test_classify_cli_writes_json_and_table(tiny_model_dir, tmp_path):
    data = tmp_path / "cls.jsonl"
    rows = [{"s": f"a b c {'x' if i % 2 else 'y'}", "label": i % 2} for i in range(10)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "r.json"
    res = run("eval", tiny_model_dir, "--data", data, "--template", "{s} :", "--label-words", "d,e", "--output", out)
    assert res.exit_code == 0, res.output
    result = json.loads(out.read_text())
    assert result["task"] == "classify" and result["examples"] == 10 and result["kind"] == "model"
    assert 0 <= result["accuracy"] <= 1 and "accuracy" in res.output
    # the reference: the same model's label-word logits scored by hand
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tok = AutoModelForCausalLM.from_pretrained(tiny_model_dir), AutoTokenizer.from_pretrained(tiny_model_dir)
    ids = [tok(" d", add_special_tokens=False)["input_ids"][0], tok(" e", add_special_tokens=False)["input_ids"][0]]
    hits = 0
    with torch.no_grad():
        for r in rows:
            enc = tok(f"{r['s']} :", return_tensors="pt")
            hits += int(model(**enc).logits[0, -1, ids].argmax()) == r["label"]
    assert result["accuracy"] == hits / 10


def test_perplexity_matches_the_model_loss(tiny_model_dir, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text(" ".join("abcdefghij"[i % 10] for i in range(40)))
    result = run_eval(EvalConfig(model=str(tiny_model_dir), task="perplexity", data=str(text), max_length=16),
                      log=lambda m: None)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tok = AutoModelForCausalLM.from_pretrained(tiny_model_dir), AutoTokenizer.from_pretrained(tiny_model_dir)
    ids = tok(text.read_text())["input_ids"]
    total, n = 0.0, 0
    with torch.no_grad():
        for j in range(0, len(ids), 16):
            w = torch.tensor([ids[j : j + 16]])
            total += float(model(input_ids=w, labels=w).loss) * (w.shape[1] - 1)
            n += w.shape[1] - 1
    assert result["tokens"] == n and result["windows"] == math.ceil(len(ids) / 16)
    assert result["perplexity"] == pytest.approx(math.exp(total / n), rel=1e-5)  # measured rel diff ~1e-7


def test_generate_exact_match_on_an_adapter(tiny_model_dir, jsonl, tmp_path):
    from qft.train import FinetuneConfig, finetune

    adapter = tmp_path / "a"
    finetune(FinetuneConfig(model=str(tiny_model_dir), data=str(jsonl("text")), output=str(adapter), max_steps=1,
                            batch_size=4), log=lambda m: None, progress=False)
    data = tmp_path / "gsm.jsonl"
    data.write_text("".join(json.dumps({"question": "a b", "answer": f"c\n#### {i}"}) + "\n" for i in range(3)))
    res = run("eval", adapter, "--task", "generate", "--data", data, "--max-new-tokens", 4, "--output",
              tmp_path / "g.json")
    assert res.exit_code == 0, res.output
    result = json.loads((tmp_path / "g.json").read_text())
    assert result["kind"] == "adapter" and result["examples"] == 3
    assert [r["reference"] for r in result["rows"]] == ["0", "1", "2"]
    assert result["exact_match"] == sum(r["correct"] for r in result["rows"]) / 3


def test_eval_bad_inputs_are_one_line(tiny_model_dir, tmp_path):
    def one_line(res, needle):
        lines = [ln for ln in res.output.splitlines() if ln.strip()]
        assert res.exit_code != 0 and len(lines) == 1 and needle in lines[0], res.output

    one_line(run("eval", tiny_model_dir, "--task", "clasify"), "did you mean 'classify'")
    cfg = tmp_path / "e.yaml"
    cfg.write_text(f"model: {tiny_model_dir}\nbatch_sise: 2\n")
    one_line(run("eval", "--config", cfg), "did you mean 'batch_size'")
    data = tmp_path / "d.jsonl"
    data.write_text('{"s": "a", "label": 0}\n')
    one_line(run("eval", tiny_model_dir, "--data", data, "--template", "{sentence}", "--label-words", "d,e"),
             "no column for")


SHARED = Path("/work/shared")


@pytest.mark.skipif(not (SHARED / "models/stories260K").exists() or not (SHARED / "data/sst2").exists(),
                    reason="shared data absent")
def test_shared_sst2_and_shakespeare(tmp_path):
    model = str(SHARED / "models/stories260K")
    cls = run_eval(EvalConfig(model=model, data=str(SHARED / "data/sst2/dev.jsonl"), label_field="label",
                              limit=64), log=lambda m: None)
    assert cls["examples"] == 64 and 0.2 < cls["accuracy"] < 0.8  # a TinyStories model is near chance on SST-2
    text = tmp_path / "shakespeare.txt"
    text.write_text((SHARED / "data/tinyshakespeare/input.txt").read_text()[:20000])
    ppl = run_eval(EvalConfig(model=model, task="perplexity", data=str(text), max_length=256), log=lambda m: None)
    assert 1 < ppl["perplexity"] < 512  # below uniform over its 512-token vocabulary
