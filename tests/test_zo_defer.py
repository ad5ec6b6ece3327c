"""Deferred rank-one updates (``ZoSGD(defer=K)``, ``--zo-defer``): the same training as writing every step, up to
rounding; written before anything else reads the weights; replay and resume bit-exact."""

import copy

import pytest
import torch
from transformers import TrainingArguments

from qft.errors import QftError
from qft.zo.optimizer import ZoSGD
from qft.zo.trainer import ZoArguments, ZoTrainer, lm_loss_halves, zo_projected_grad, zo_projected_grad_paired
from tests.test_zo import _gpt2, _params, _Repeat, _tied_llama
from tests.tiny import tiny_inputs, tiny_model


def _run(model, defer: int, paired: bool, steps: int = 7, samples: int = 1):
    """ZO steps on one batch (on the model's device); the projected gradients of each step."""
    params = _params(model)
    x = {k: v.to(params[0].device) for k, v in tiny_inputs(model).items()}
    x["labels"] = x["input_ids"].clone()
    opt = ZoSGD(params, lr=2e-3, seed=1, dist="rank1", defer=defer)
    gs = []
    for _ in range(steps):
        seeds = [opt.step_seed(j) for j in range(samples)]
        if paired:
            g, _ = zo_projected_grad_paired(model, params, seeds, 1e-2, x, lm_loss_halves, dist="rank1",
                                            pending=opt.deferred)
            g = torch.as_tensor(g).reshape(-1).tolist()
        else:
            g = [zo_projected_grad(model, params, s, 1e-2, lambda: model(**x).loss, dist="rank1",
                                   pending=opt.deferred)[0].item() for s in seeds]
        for s, gj in zip(seeds, g):
            opt.record(s, gj / samples)
        gs.append(g)
        opt.step()
    return opt, gs


def _lora_llama():
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    return get_peft_model(tiny_model("llama"), LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))


@pytest.mark.parametrize("paired,samples", [(False, 1), (True, 1), (True, 2)], ids=["two-forwards", "paired", "q2"])
@pytest.mark.parametrize("make", [_tied_llama, lambda: tiny_model("opt"), _gpt2, _lora_llama],
                         ids=["llama-tied", "opt", "gpt2", "lora"])
def test_deferred_updates_train_as_written_ones(make, paired, samples):
    """Linear, tied embedding, GPT-2 Conv1D, LoRA's factors (hooks) and OPT's position embedding (a copy) see the
    pending updates:
    every step's projected gradient and the final weights match writing each update at once; the writes happen every
    K steps and are marked in the history."""
    check_deferred_against_written(make, paired, samples)


def check_deferred_against_written(make, paired, samples, device="cpu", g_tol=2e-4, w_tol=1e-5):
    """(Shared with the GPU test.)"""
    make_on = lambda: make().to(device)  # noqa: E731
    eager, deferred, start = make_on(), make_on(), make_on()
    deferred.load_state_dict(eager.state_dict())
    start.load_state_dict(eager.state_dict())
    _, g_eager = _run(eager, 1, paired, samples=samples)
    opt, g_deferred = _run(deferred, 3, paired, samples=samples)
    # float32 loss differences over 2·eps: about 1e-4 of noise; the gradients themselves are 0.1-3
    torch.testing.assert_close(torch.tensor(g_deferred), torch.tensor(g_eager), rtol=1e-4, atol=g_tol)
    assert [e["t"] for e in opt.zo_state["history"] if e.get("flush")] == [2, 5]
    assert opt.deferred.steps == 1 and len(opt.deferred.rows) == samples  # step 6's, not yet written
    assert any(not torch.equal(a, b) for a, b in zip(_params(eager), _params(deferred)))
    opt.flush()
    assert not opt.deferred and opt.zo_state["history"][-1].get("flush")
    moved = max((a - b).abs().max().item() for a, b in zip(_params(eager), _params(start)))
    assert moved > 0.01  # measured 0.025 (LoRA) to 0.08; the two ways of writing differ by 2e-6 at most
    for a, b in zip(_params(eager), _params(deferred)):
        torch.testing.assert_close(a, b, rtol=0, atol=w_tol)


def test_state_dict_rebuilds_the_pending_updates_and_replay_writes_where_the_run_did():
    model = tiny_model("llama")
    start = copy.deepcopy(model)
    opt, _ = _run(model, 4, True, steps=6)  # written after step 3; steps 4 and 5 pending
    saved = copy.deepcopy(model)  # weights without the pending updates, as a state saved mid-way would hold them
    state = opt.state_dict()
    again = ZoSGD(_params(saved), lr=2e-3, seed=1, dist="rank1", defer=4)
    again.load_state_dict(state)
    assert again.deferred.steps == 2 and len(again.deferred.rows) == 2
    opt.flush()
    again.flush()
    assert all(torch.equal(a, b) for a, b in zip(_params(model), _params(saved)))
    replayed = ZoSGD(_params(start), lr=0.0, seed=1, dist="rank1")  # defer 1: the history says where to write
    replayed.replay(opt.state_dict()["zo"]["history"])
    assert all(torch.equal(a, b) for a, b in zip(_params(model), _params(start)))


def _trainer(tmp_path, max_steps, defer, **kw):
    model = tiny_model("llama")
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=max_steps, per_device_train_batch_size=4,
                             learning_rate=3e-4, lr_scheduler_type="linear", logging_steps=10, report_to="none",
                             use_cpu=True, disable_tqdm=True, seed=0, **{"save_strategy": "no", **kw})
    return ZoTrainer(model=model, args=args, train_dataset=_Repeat(),
                     zo=ZoArguments(eps=1e-3, distribution="rank1", paired=True, defer=defer))


def test_the_trainer_writes_before_other_reads_and_at_the_end(tmp_path):
    """A forward outside the ZO step (evaluation, generation) and a state_dict (every save) find the weights written;
    training ends with them written; the result matches training with every update written at once."""
    trainer = _trainer(tmp_path / "a", 6, 4)
    trainer.train()
    opt = trainer.optimizer.optimizer
    assert not opt.deferred and [e["t"] for e in opt.zo_state["history"] if e.get("flush")] == [3, 5]
    eager = _trainer(tmp_path / "b", 6, 1)
    eager.train()
    for a, b in zip(_params(trainer.model), _params(eager.model)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)

    trainer.args.max_steps = 8
    trainer.train()  # a second run of the same trainer, so its optimizer is new: write on a forward and on a save
    opt = trainer.optimizer.optimizer
    x = tiny_inputs(trainer.model)
    for read in (lambda: trainer.model(**x), lambda: trainer.model.state_dict()):
        opt.record(opt.step_seed(), 1.0)
        opt.step()
        assert opt.deferred
        read()
        assert not opt.deferred and opt.zo_state["history"][-1]["flush"]


def test_resume_mid_way_through_the_deferred_steps_is_bit_exact(tmp_path):
    """A checkpoint at step 3 of writes every 4 steps: it is written first (so its weights are whole), and a run
    resumed from it with the same arguments (saves included: each one writes) reproduces the run that saved it,
    bit-exactly."""
    full = _trainer(tmp_path / "full", 7, 4, save_strategy="steps", save_steps=3)
    full.train()
    history = torch.load(tmp_path / "full" / "checkpoint-3" / "optimizer.pt", weights_only=True)["zo"]["history"]
    assert history[-1]["flush"] and history[-1]["t"] == 2
    resumed = _trainer(tmp_path / "part", 7, 4, save_strategy="steps", save_steps=3)  # it writes at saves too
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-3"))
    for (n, a), (_, b) in zip(full.model.named_parameters(), resumed.model.named_parameters()):
        assert torch.equal(a, b), n


def test_defer_needs_rank1_directions_one_rate_and_no_decay():
    params = _params(tiny_model("llama"))
    with pytest.raises(QftError, match="draws gaussian directions"):
        ZoSGD(params, dist="gaussian", defer=4)
    with pytest.raises(QftError, match="no weight decay"):
        ZoSGD(params, dist="rank1", weight_decay=0.1, defer=4)
    with pytest.raises(QftError, match="at least 1"):
        ZoSGD(params, dist="rank1", defer=0)
    with pytest.raises(QftError, match="needs --zo-distribution rank1"):
        ZoArguments(distribution="gaussian", defer=4)


def test_cli_defer(tiny_model_dir, jsonl, tmp_path):
    """`qft finetune --method mezo --zo-distribution rank1 --zo-paired --zo-defer 4` trains and saves written
    weights; without rank1 directions it is one line naming the fix."""
    from typer.testing import CliRunner

    from qft.cli.main import app

    base = ["finetune", "--model", str(tiny_model_dir), "--data", str(jsonl("text")), "--method", "mezo",
            "--max-steps", "6", "--batch-size", "4", "--learning-rate", "1e-3", "--zo-defer", "4"]
    bad = CliRunner().invoke(app, base + ["--output", str(tmp_path / "bad")])
    assert bad.exit_code != 0 and "--zo-defer 4 needs" in bad.output and "add --zo-distribution rank1" in bad.output
    assert "Traceback" not in bad.output
    ok = CliRunner().invoke(app, base + ["--output", str(tmp_path / "o"), "--zo-distribution", "rank1", "--zo-paired"])
    assert ok.exit_code == 0, ok.output
    assert (tmp_path / "o" / "model.safetensors").exists()
