"""MeZO over an adapter instead of every weight: LoRA (float or NF4 base), PEQA scales, SpIEL deltas.

Through the Python API (a method's peft config under the ZO trainer) and ``qft finetune --method mezo
--zo-adapter ...``: the base never changes, only the adapter learns, and the saved adapter reloads.
"""

import json

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import TrainingArguments
from typer.testing import CliRunner

import qft
from qft.cli.main import app
from qft.zo.trainer import ZoArguments, ZoTrainer
from tests.common import logits
from tests.test_methods import _nf4_base
from tests.test_zo import _loss, _Repeat
from tests.tiny import tiny_inputs, tiny_model

CONFIGS = {
    "lora": lambda: LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"),
    "qlora": lambda: LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"),
    "peqa": lambda: qft.PeqaConfig(bits=4, group_size=32, target_modules="all-linear", task_type="CAUSAL_LM"),
    "spiel": lambda: qft.SpielConfig(density="0.05", target_modules="all-linear", task_type="CAUSAL_LM"),
}


def _base(name):
    return _nf4_base("llama") if name == "qlora" else tiny_model("llama")


@pytest.mark.parametrize("name", list(CONFIGS))
def test_zo_trains_only_the_adapter_and_it_reloads(name, tmp_path):
    model = get_peft_model(_base(name), CONFIGS[name]())
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    tuned = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert frozen and tuned and sum(p.numel() for p in tuned.values()) < sum(p.numel() for p in frozen.values())
    # PEQA at 1e-2 was too close to the bar: on session 13's machine (AMD EPYC, AVX2) seed 0 took the loss only
    # 4.89 -> 4.82 in 150 steps (seeds 0-4: down 0.07 to 0.28), where an earlier machine had measured 4.69.
    # At 2e-2 seeds 0-4 fell 0.18 to 0.34 there; lora and qlora at 1e-2 fell 0.18 or more (seeds 0-4 / 0-2)
    lr = 2e-2 if name == "peqa" else 1e-2
    args = TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=150, per_device_train_batch_size=4,
                             learning_rate=lr, lr_scheduler_type="constant", report_to="none", use_cpu=True,
                             disable_tqdm=True, save_strategy="no", seed=0)
    before = _loss(model)
    ZoTrainer(model=model, args=args, train_dataset=_Repeat(), zo=ZoArguments(eps=1e-3)).train()
    # measured at 150 steps, seed 0: lora 4.89 -> 4.66 (earlier machine) / 4.71 (session 13's), qlora 4.90 -> 4.68 /
    # 4.72, peqa (2e-2) 4.89 -> 4.69 (session 13's), spiel 4.89 -> 4.34
    assert _loss(model) < before - 0.1
    params = dict(model.named_parameters())
    assert all(torch.equal(params[n], p) for n, p in frozen.items())  # the base (NF4 bytes included) is untouched
    assert all(not torch.equal(params[n], p) for n, p in tuned.items())  # every adapter tensor moved

    model.save_pretrained(tmp_path / "adapter")
    x = tiny_inputs(model)
    again = PeftModel.from_pretrained(_base(name), tmp_path / "adapter")
    torch.testing.assert_close(logits(again, x), logits(model, x), rtol=0, atol=0)


@pytest.mark.parametrize("adapter,extra", [("qlora", []), ("lora", ["--zo-distribution", "rank1", "--zo-paired"]),
                                           ("peqa", [])])
def test_cli_mezo_over_an_adapter(tiny_model_dir, jsonl, tmp_path, adapter, extra):
    out = tmp_path / "out"
    res = CliRunner().invoke(app, ["finetune", "--model", str(tiny_model_dir), "--data", str(jsonl("text")),
                                   "--output", str(out), "--method", "mezo", "--zo-adapter", adapter,
                                   "--max-steps", "4", "--batch-size", "4", *extra])
    assert res.exit_code == 0, res.output
    assert not (out / "model.safetensors").exists()  # an adapter, not the whole model
    weights = load_file(out / "adapter_model.safetensors")
    marker = {"peqa": "peqa"}.get(adapter, "lora_")
    assert weights and all(marker in k for k in weights), list(weights)
    run = json.loads((out / "qft_run.json").read_text())
    assert run["config"]["zo_adapter"] == adapter and run["config"]["learning_rate"] is None
    assert (out / "qft_quantization.json").exists() == (adapter in ("qlora", "peqa"))  # the base's record


@pytest.mark.parametrize("args,problem", [
    (["--method", "mezo", "--zo-adapter", "prefix"], "unknown --zo-adapter 'prefix'"),
    (["--method", "qlora", "--zo-adapter", "lora"], "--zo-adapter applies to mezo, not qlora"),
    (["--method", "sparse-mezo", "--zo-adapter", "lora"], "--zo-adapter applies to mezo, not sparse-mezo"),
])
def test_cli_zo_adapter_errors_are_one_line(tmp_path, args, problem):
    res = CliRunner().invoke(app, ["finetune", "--output", str(tmp_path / "o"), *args])
    assert res.exit_code == 2, res.output
    assert problem in res.output and "Traceback" not in res.output
