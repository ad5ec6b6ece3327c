"""Memory-efficient optimizers: name checks, state bytes after one step, and `qft finetune --optim` end to end."""

import importlib.util
import json

import pytest
from typer.testing import CliRunner

from qft.cli.main import app
from qft.errors import QftError
from qft.optim import OPTIMIZERS, check_optimizer_name, optimizer_state_bytes, resolve_optimizer
from tests.tiny import tiny_inputs, tiny_model

runner = CliRunner()


def needs(package):
    return pytest.mark.skipif(importlib.util.find_spec(package) is None, reason=f"{package} not installed")


def _state_bytes(name):
    model = tiny_model("llama")
    batch = tiny_inputs(model)
    batch["labels"] = batch["input_ids"]
    n = sum(p.numel() for p in model.parameters())
    return optimizer_state_bytes(model, name, batch), n, len(list(model.parameters()))


def test_unknown_optimizer_names_the_closest():
    with pytest.raises(QftError, match="did you mean 'adamw_8bit'"):
        check_optimizer_name("adamw8bit")
    with pytest.raises(QftError, match="unknown optimizer 'nonsense'"):
        check_optimizer_name("nonsense")
    check_optimizer_name("schedule_free_adamw")  # any transformers name passes through


def test_adamw_state_is_two_float32_moments():
    got, n, tensors = _state_bytes("adamw_torch")
    assert got == 8 * n + 4 * tensors  # exp_avg + exp_avg_sq in float32, plus a float32 step per tensor


@needs("bitsandbytes")
def test_8bit_states_are_smaller():
    adamw, n, _ = _state_bytes("adamw_torch")
    adam8, _, _ = _state_bytes("adamw_8bit")
    lion32, _, _ = _state_bytes("lion_32bit")
    lion8, _, _ = _state_bytes("lion_8bit")
    # bitsandbytes keeps tensors under 4096 elements in 32 bit, so the tiny model's norms stay 32-bit:
    # measured 236544 bytes vs 723540 for adamw_torch on the 90,432-parameter tiny llama.
    assert adam8 < adamw / 3
    assert 4 * n <= lion32 < 4 * n + 8 * 4096  # one float32 momentum (+ bitsandbytes' small buffers)
    assert lion8 < lion32 / 3


@needs("apollo_torch")
def test_apollo_mini_state_is_tiny():
    adamw, _, _ = _state_bytes("adamw_torch")
    mini, _, _ = _state_bytes("apollo_mini")
    assert 0 < mini < adamw / 8  # measured 82748 vs 723540: rank-1 moments for every linear weight


@needs("galore_torch")
def test_galore_builds_through_transformers():
    got, _, _ = _state_bytes("galore_adamw")
    assert got > 0


@needs("pytorch_optimizer")
def test_spam_from_pytorch_optimizer():
    got, n, _ = _state_bytes("spam")
    assert got >= 8 * n  # two moments per parameter (plus its spike-mask bookkeeping)
    choice = resolve_optimizer("spam", 1e-3)
    assert choice.optimizer_cls_and_kwargs[0].__name__ == "SPAM" and choice.optimizer_cls_and_kwargs[1]["lr"] == 1e-3


def test_paged_optimizers_need_a_gpu():
    with pytest.raises(QftError, match="needs a GPU"):
        resolve_optimizer("paged_adamw_8bit", 1e-3, cuda=False)
    assert resolve_optimizer("auto", 1e-3, cuda=False).training_args == {"optim": "adamw_torch"}


def test_every_listed_optimizer_is_known_to_transformers_or_external():
    from qft.optim import transformers_names

    for info in OPTIMIZERS.values():
        assert info.external or info.trainer_optim in transformers_names(), info.name


def _finetune(tiny_model_dir, data, out, *extra):
    return runner.invoke(app, [str(a) for a in ("finetune", "--model", tiny_model_dir, "--data", data, "--output",
                                                out, "--batch-size", 4, "--logging-steps", 1, *extra)])


@needs("bitsandbytes")
def test_finetune_with_8bit_adamw(tiny_model_dir, jsonl, tmp_path):
    res = _finetune(tiny_model_dir, jsonl("text"), tmp_path / "o", "--max-steps", 2, "--optim", "adamw_8bit")
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "o" / "qft_run.json").read_text())["config"]["optim"] == "adamw_8bit"


def test_finetune_bad_optimizer_is_one_line(tiny_model_dir, jsonl, tmp_path):
    res = _finetune(tiny_model_dir, jsonl("text"), tmp_path / "o", "--optim", "adamw_8bitt")
    assert res.exit_code != 0 and "Traceback" not in res.output
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and "did you mean 'adamw_8bit'" in lines[0], res.output


def test_eval_steps_and_early_stopping(tiny_model_dir, jsonl, tmp_path):
    """Evaluation every step with patience 1 on a learning rate that makes held-out loss rise stops early."""
    res = _finetune(tiny_model_dir, jsonl("text", 60), tmp_path / "o", "--max-steps", 12, "--eval-steps", 1,
                    "--early-stopping-patience", 1, "--early-stopping-threshold", 10.0)
    assert res.exit_code == 0, res.output
    stats = json.loads((tmp_path / "o" / "qft_run.json").read_text())["stats"]
    # a threshold of 10 nats means no evaluation counts as better: stop after the second evaluation
    assert stats["steps"] == 2


def test_early_stopping_needs_eval_steps(tiny_model_dir, jsonl, tmp_path):
    res = _finetune(tiny_model_dir, jsonl("text"), tmp_path / "o", "--early-stopping-patience", 2)
    assert res.exit_code != 0 and "pass --eval-steps" in res.output


@needs("q_galore_torch")
def test_q_galore_steps_are_low_rank_with_int4_projections(monkeypatch):
    """q-galore-torch's optimizer through qft's bitsandbytes-0.50 shim, on CPU (its step syncs CUDA: no-op here)."""
    import torch

    from qft.optim import QGaLoreFactory

    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: None)
    model = tiny_model("llama")
    batch = tiny_inputs(model)
    batch["labels"] = batch["input_ids"]
    rank = 4
    opt = QGaLoreFactory()(model, lr=1e-2, rank=rank, quant_group_size=32)
    galore = [p for g in opt.param_groups if "rank" in g for p in g["params"]]
    assert galore and len(galore) == 14  # 7 linear weights x 2 layers; norms, embeddings and head stay plain
    before = {id(p): p.detach().clone() for p in galore}
    losses = []
    for _ in range(6):
        loss = model(**batch).loss
        losses.append(loss.item())
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert losses[-1] < losses[0]
    for p in galore:
        delta = p.detach() - before[id(p)]
        assert 0 < torch.linalg.matrix_rank(delta.float()) <= rank  # updates stay in the projected subspace
        proj = opt.state[p]["projector"]
        assert proj.ortho_matrix.dtype == torch.uint8 and int(proj.ortho_matrix.max()) <= 15  # 4-bit codes
        assert opt.state[p]["state1"].numel() == rank * max(p.shape)  # Adam moments of the low-rank gradient


def test_q_galore_needs_a_gpu():
    with pytest.raises(QftError, match="needs a GPU"):
        resolve_optimizer("q_galore_adamw_8bit", 1e-3, cuda=False)
