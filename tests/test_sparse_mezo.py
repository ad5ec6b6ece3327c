"""Sparse-MeZO: the shared checks, the selection, untouched unselected weights, the sparse adapter, the CLI."""

import json

import pytest
import torch
from peft import PeftModel, get_peft_model
from transformers import TrainingArguments
from typer.testing import CliRunner

import qft  # noqa: F401
from qft.adapters.sparse_mezo import SparseMezoConfig, SparseMezoLinear
from qft.errors import QftError
from qft.zo.mask import magnitude_threshold, small_magnitude_mask
from qft.zo.trainer import ZoArguments, ZoTrainer
from tests.common import ALL_CHECKS, MethodCase
from tests.test_zo import _Repeat
from tests.tiny import FAMILIES, tiny_model

CASES = [MethodCase("sparse_mezo", f, lambda fam: tiny_model(fam), lambda: SparseMezoConfig(density=0.3),
                    "sparse_mezo_delta", merge_atol=1e-5) for f in FAMILIES]


@pytest.mark.parametrize("check", list(ALL_CHECKS))
@pytest.mark.parametrize("case", CASES, ids=str)
def test_shared_checks(case, check, tmp_path):
    ALL_CHECKS[check](case, tmp_path) if check == "save_load" else ALL_CHECKS[check](case)


def test_selection_is_the_smallest_magnitudes():
    w = torch.randn(64, 48)
    thr = magnitude_threshold(w, 0.25)
    mask = small_magnitude_mask(w, thr)
    assert mask.sum() == round(0.25 * w.numel())  # no ties in random floats
    assert w[mask].abs().max() < w[~mask].abs().min()


def test_zo_training_never_touches_unselected_weights(tmp_path):
    model = get_peft_model(tiny_model("llama"), SparseMezoConfig(density=0.2))
    layers = [m for m in model.modules() if isinstance(m, SparseMezoLinear)]
    frozen = {id(m): m.get_base_layer().weight.detach().clone() for m in layers}
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=20, per_device_train_batch_size=4,
                             learning_rate=1e-3, report_to="none", use_cpu=True, disable_tqdm=True,
                             save_strategy="no", seed=0)
    ZoTrainer(model=model, args=args, train_dataset=_Repeat(), zo=ZoArguments(eps=1e-3)).train()
    for m in layers:
        w0 = frozen[id(m)]
        assert torch.equal(m.get_base_layer().weight, w0)  # the base stays frozen
        with torch.no_grad():
            changed = m.effective_weight() != w0
        mask = small_magnitude_mask(w0, m.sparse_mezo_threshold["default"])
        assert changed.any() and not (changed & ~mask).any()


def test_adapter_is_sparse_and_round_trips(tmp_path):
    from safetensors.torch import load_file

    base_numel = sum(m.weight.numel() for m in tiny_model("llama").modules()
                     if isinstance(m, torch.nn.Linear)) - 128 * 64  # all linear layers but the LM head
    model = get_peft_model(tiny_model("llama"), SparseMezoConfig(density=0.1))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "sparse_mezo_delta" in n:
                p.normal_(0, 0.01)
    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    values = sum(t.numel() for k, t in saved.items() if "delta" in k)
    assert abs(values - 0.1 * base_numel) <= len(saved)  # rounding per layer
    assert all("delta" in k or "threshold" in k for k in saved)
    x = {"input_ids": torch.tensor([[3, 4, 5, 6]])}
    loaded = PeftModel.from_pretrained(tiny_model("llama"), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**x).logits, model(**x).logits, atol=0, rtol=0)


def test_bad_density():
    with pytest.raises(QftError, match="density"):
        SparseMezoConfig(density=1.5)


@pytest.mark.parametrize("method", ["sparse-mezo", "mezo"])
def test_cli_end_to_end(tiny_model_dir, jsonl, tmp_path, method):
    from qft.cli.main import app

    out = tmp_path / "out"
    res = CliRunner().invoke(app, ["finetune", "--model", str(tiny_model_dir), "--data", str(jsonl("text")),
                                   "--method", method, "--output", str(out), "--max-steps", "4",
                                   "--batch-size", "4", "--logging-steps", "2", "--density", "0.2"])
    assert res.exit_code == 0, res.output
    run = json.loads((out / "qft_run.json").read_text())
    assert run["stats"]["steps"] == 4
    if method == "sparse-mezo":
        assert json.loads((out / "adapter_config.json").read_text())["peft_type"] == "SPARSE_MEZO"
    else:
        assert (out / "model.safetensors").exists() and (out / "tokenizer.json").exists()


def test_effective_weight_matches_boolean_indexing_reference_and_grads():
    model = get_peft_model(tiny_model("llama"), SparseMezoConfig(density=0.3))
    layers = [m for m in model.modules() if isinstance(m, SparseMezoLinear)]
    with torch.no_grad():
        for m in layers:
            m.sparse_mezo_delta["default"].normal_(0, 0.01)
    for m in layers:
        assert torch.equal(m.effective_weight(), m.effective_weight_reference())
    # the same gradient for the delta (first-order use of the adapter)
    m = layers[0]
    x = torch.randn(3, m.get_base_layer().in_features)
    grads = []
    for fn in (m.effective_weight, m.effective_weight_reference):
        m.sparse_mezo_delta["default"].grad = None
        (x @ fn().T).pow(2).sum().backward()
        grads.append(m.sparse_mezo_delta["default"].grad.clone())
    torch.testing.assert_close(grads[0], grads[1])


def test_cli_in_place_trains_the_weights_and_saves_the_sparse_adapter(tiny_model_dir, jsonl, tmp_path, monkeypatch):
    """`--sparse-mezo-inplace`: MeZO on the targeted weights themselves under MagnitudeMask. Only entries of targeted
    matrices that started under their layer's threshold move, and the saved PEFT Sparse-MeZO adapter, loaded on the
    base, gives the trained weights."""
    import dataclasses

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from qft.adapters import sparse_mezo
    from qft.cli.main import app

    trained = {}
    plan = sparse_mezo.inplace_plan

    def keeping_the_trained_weights(zo, config):  # what the run trained, before the export turns it into an adapter
        p = plan(zo, config)

        def export(model, folder):
            trained.update({n: t.detach().clone() for n, t in model.state_dict().items()})
            p.export(model, folder)
        return dataclasses.replace(p, export=export)

    monkeypatch.setattr(sparse_mezo, "inplace_plan", keeping_the_trained_weights)
    out = tmp_path / "out"
    res = CliRunner().invoke(app, ["finetune", "--model", str(tiny_model_dir), "--data", str(jsonl("text")),
                                   "--method", "sparse-mezo", "--sparse-mezo-inplace", "--output", str(out),
                                   "--max-steps", "6", "--batch-size", "4", "--learning-rate", "1e-2",
                                   "--target-modules", "q_proj,down_proj", "--density", "0.3"])
    assert res.exit_code == 0, res.output
    assert json.loads((out / "qft_run.json").read_text())["config"]["sparse_mezo_inplace"] is True
    assert json.loads((out / "adapter_config.json").read_text())["peft_type"] == "SPARSE_MEZO"
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    start = {n: t.clone() for n, t in base.state_dict().items()}
    changed = [n for n, t in trained.items() if not torch.equal(t, start[n])]
    assert changed and all(n.endswith(("q_proj.weight", "down_proj.weight")) for n in changed), changed
    for n in changed:
        moved = trained[n] != start[n]
        assert not (moved & (start[n].abs() > magnitude_threshold(start[n], 0.3))).any(), n
    loaded = PeftModel.from_pretrained(base, out)
    layers = {n: m for n, m in loaded.base_model.model.named_modules() if isinstance(m, SparseMezoLinear)}
    assert sorted(layers) == sorted(n.rsplit(".", 1)[0] for n in trained if n.endswith(("q_proj.weight",
                                                                                          "down_proj.weight")))
    for name, layer in layers.items():
        torch.testing.assert_close(layer.effective_weight(), trained[name + ".weight"], rtol=0, atol=1e-7)


def test_cli_in_place_refuses_what_the_mask_cannot_take(tiny_model_dir, jsonl, tmp_path):
    from qft.cli.main import app

    bad = [("--method", "mezo"), ("--weight-decay", "0.1"), ("--zo-samples", "2"), ("--target-modules", "nothing")]
    for flag, value in bad:
        args = ["finetune", "--model", str(tiny_model_dir), "--data", str(jsonl("text")), "--method", "sparse-mezo",
                "--sparse-mezo-inplace", "--output", str(tmp_path / flag), "--max-steps", "2", flag, value]
        res = CliRunner().invoke(app, args)
        assert res.exit_code != 0 and "Traceback" not in res.output, (flag, res.output)
        assert len([ln for ln in res.output.splitlines() if ln.startswith("error:")]) == 1, res.output


def test_in_place_needs_the_bases_safetensors_files_before_training(tmp_path):
    """The adapter is saved against W_0 read back from the base's files: a base without them fails at load, in one
    line, not after training."""
    from qft.adapters.mezo import zo_plan
    from qft.adapters.sparse_mezo import inplace_plan
    from qft.train import FinetuneConfig

    model = tiny_model("llama")
    model.name_or_path = str(tmp_path)  # a folder without a checkpoint
    plan = inplace_plan(zo_plan(FinetuneConfig(method="sparse-mezo", sparse_mezo_inplace=True), None),
                        SparseMezoConfig(density=0.2, target_modules="all-linear"))
    with pytest.raises(QftError, match="safetensors files"):
        plan.after_load(model)


@pytest.mark.parametrize("weightless", [False, True])
def test_cli_in_place_resumes_bit_exactly(tiny_model_dir, jsonl, tmp_path, weightless):
    """A run continued from its checkpoint-2 (with its weights, or rebuilt from the optimizer state by replay) saves
    the same adapter as the run that went straight to step 4: the thresholds come from the base, not the checkpoint."""
    import shutil

    from safetensors.torch import load_file

    from qft.cli.main import app

    def run(out, *extra):
        res = CliRunner().invoke(app, ["finetune", "--model", str(tiny_model_dir), "--data", str(jsonl("text")),
                                       "--method", "sparse-mezo", "--sparse-mezo-inplace", "--output", str(out),
                                       "--max-steps", "4", "--save-steps", "2", "--batch-size", "4",
                                       "--learning-rate", "1e-2", *extra])
        assert res.exit_code == 0, res.output

    run(tmp_path / "full")
    part = tmp_path / "part" / "checkpoints"
    shutil.copytree(tmp_path / "full" / "checkpoints" / "checkpoint-2", part / "checkpoint-2")
    if weightless:
        (part / "checkpoint-2" / "model.safetensors").unlink()
    run(tmp_path / "part", "--resume", "auto")
    a = load_file(tmp_path / "full" / "adapter_model.safetensors")
    b = load_file(tmp_path / "part" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(bool(v.any()) for k, v in a.items() if "delta" in k)
