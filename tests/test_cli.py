"""`qft finetune` end to end on a tiny model through typer's CliRunner, and its bad-input table."""

import json

import pytest
from peft import PeftModel
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from qft.cli.main import app

runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_help_is_useful():
    top = run("--help")
    assert top.exit_code == 0 and "finetune" in top.output and "methods" in top.output and "bench" in top.output
    sub = run("finetune", "--help")
    for opt in ("--model", "--data", "--method", "--output", "--max-steps", "--config", "--overwrite"):
        assert opt in sub.output
    assert run("bench", "--help").exit_code == 0


def test_methods_lists_every_method():
    res = run("methods")
    assert res.exit_code == 0
    for name in ("qlora", "peqa", "qst", "spiel", "mezo", "sparse-mezo"):
        assert name in res.output
    assert "working" in res.output


@pytest.mark.parametrize("fmt", ["prompt_completion", "text", "alpaca"])
def test_finetune_end_to_end(tiny_model_dir, jsonl, tmp_path, fmt):
    out = tmp_path / "adapter"
    res = run("finetune", "--model", tiny_model_dir, "--data", jsonl(fmt), "--method", "qlora",
              "--output", out, "--max-steps", 3, "--batch-size", 4, "--logging-steps", 1)
    assert res.exit_code == 0, res.output
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 8
    quant = json.loads((out / "qft_quantization.json").read_text())
    assert quant["quant_type"] == "nf4" and quant["double_quant"] is True
    run_info = json.loads((out / "qft_run.json").read_text())
    assert run_info["stats"]["steps"] == 3 and run_info["stats"]["peak_mem_gib"] > 0
    assert "eval_loss" in res.output and "PeftModel.from_pretrained" in res.output
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no staging folder left behind
    # a stock peft user loads it onto the float base
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), out)
    assert any("lora_A" in n for n, _ in model.named_parameters())


def test_yaml_config_and_flag_override(tiny_model_dir, jsonl, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"model: {tiny_model_dir}\ndata: {jsonl('text')}\nlora_r: 4\nmax-steps: 7\n")
    res = run("finetune", "--config", cfg, "--max-steps", 2, "--print-config")
    assert res.exit_code == 0, res.output
    assert "lora_r: 4" in res.output and "max_steps: 2" in res.output


def _assert_one_line_error(res, *needles):
    assert res.exit_code != 0
    assert "Traceback" not in res.output
    lines = [ln for ln in res.output.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), res.output
    assert "Fix:" in lines[0]
    for n in needles:
        assert n in lines[0], lines[0]


def test_bad_inputs(tiny_model_dir, jsonl, tmp_path):
    good = ["--model", tiny_model_dir, "--data", jsonl("text"), "--max-steps", 1]
    _assert_one_line_error(run("finetune", "--model", tmp_path / "missing", "--data", jsonl("text")),
                           "does not exist")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "x"}\n')
    _assert_one_line_error(run("finetune", "--model", tiny_model_dir, "--data", bad, "--output", tmp_path / "o1"),
                           "none of the known formats")
    _assert_one_line_error(run("finetune", *good, "--target-modules", "nonexistent_proj", "--output",
                               tmp_path / "o2"), "match no layer")
    _assert_one_line_error(run("finetune", *good[:-2], "--max-steps", 0), "--max-steps")
    _assert_one_line_error(run("finetune", *good[:-2], "--max-steps", -3), "--max-steps")
    _assert_one_line_error(run("finetune", *good, "--method", "qlroa"), "did you mean 'qlora'")
    yaml_bad = tmp_path / "bad.yaml"
    yaml_bad.write_text("lora_rank: 4\n")
    _assert_one_line_error(run("finetune", "--config", yaml_bad), "lora_rank", "lora_r")


def test_existing_adapter_is_never_overwritten(tiny_model_dir, jsonl, tmp_path):
    out = tmp_path / "adapter"
    args = ["finetune", "--model", tiny_model_dir, "--data", jsonl("text"), "--output", out, "--max-steps", 1]
    assert run(*args).exit_code == 0
    before = (out / "adapter_model.safetensors").read_bytes()
    _assert_one_line_error(run(*args), "already holds an adapter", "--overwrite")
    assert (out / "adapter_model.safetensors").read_bytes() == before
    res = run(*args, "--overwrite", "--seed", 7)
    assert res.exit_code == 0, res.output
    assert (out / "adapter_model.safetensors").read_bytes() != before


def test_yaml_value_of_the_wrong_type(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("lora_r: abc\n")
    _assert_one_line_error(run("finetune", "--config", cfg), "lora_r", "must be an int")
    cfg.write_text("density: 0.05\nlearning_rate: 1\n")  # numbers where strings/floats are expected are fine
    res = run("finetune", "--config", cfg, "--print-config")
    assert res.exit_code == 0 and "density: '0.05'" in res.output and "learning_rate: 1" in res.output


def test_config_for_bench_and_quantize(tiny_model_dir, tmp_path):
    cfg = tmp_path / "q.yaml"
    cfg.write_text("bits: 3\ngroup_size: 64\n")
    out = tmp_path / "q3"
    res = run("quantize", tiny_model_dir, out, "--config", cfg)
    assert res.exit_code == 0, res.output
    import json

    assert json.loads((out / "qft_quantization.json").read_text())["bits"] == 3
    res = run("quantize", tiny_model_dir, tmp_path / "q4", "--config", cfg, "--bits", "4")  # the flag wins
    assert res.exit_code == 0 and json.loads((tmp_path / "q4" / "qft_quantization.json").read_text())["bits"] == 4
    cfg.write_text("bitz: 3\n")
    _assert_one_line_error(run("quantize", tiny_model_dir, tmp_path / "q5", "--config", cfg), "bitz", "'bits'")
    bad = tmp_path / "b.yaml"
    bad.write_text("shapes: tiny\n")
    _assert_one_line_error(run("bench", "qlora", "--config", bad), "shapes", "'shape'")
