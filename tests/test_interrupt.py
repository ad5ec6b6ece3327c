"""SIGINT/SIGTERM during `qft finetune`: a checkpoint, one line, exit 130/143; `--resume auto` finishes the same run.

The interrupted run is a real `qft` process (``python -c`` running qft.cli.main, with steps slowed down by a
patched callback hook so that the signal lands mid-training); the resumed and uninterrupted runs go through
typer's CliRunner.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from qft.cli.main import app

REPO = Path(__file__).resolve().parents[1]
MARKER = "qft-test: step {} begins"


def slow_cli():
    """`qft` with a printed marker and a 0.3 s pause at the start of every training step."""
    from transformers.trainer_callback import CallbackHandler

    real = CallbackHandler.on_step_begin

    def on_step_begin(self, args, state, control):
        print(MARKER.format(state.global_step + 1), flush=True)
        time.sleep(0.3)
        return real(self, args, state, control)

    CallbackHandler.on_step_begin = on_step_begin
    from qft.cli.main import main

    sys.argv = ["qft", *sys.argv[1:]]
    main()


def run_and_signal(args: list[str], signum: int, at_step: int, timeout: float = 120) -> tuple[int, str, str]:
    """Run slow `qft` ARGS, send ``signum`` when step ``at_step`` begins; (exit code, stdout, stderr)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "COLUMNS": "200"}
    proc = subprocess.Popen([sys.executable, "-c", "import tests.test_interrupt as t; t.slow_cli()", *args],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines, deadline = [], time.time() + timeout
    try:
        for line in proc.stdout:
            lines.append(line)
            if MARKER.format(at_step) in line:
                proc.send_signal(signum)
                break
            assert time.time() < deadline, "".join(lines)
        rest, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, "".join(lines) + rest, err


def finetune_args(model, data, out, method, steps=6):
    return ["finetune", "--model", str(model), "--data", str(data), "--output", str(out), "--method", method,
            "--max-steps", str(steps), "--batch-size", "4", "--learning-rate", "1e-3", "--logging-steps", "1"]


@pytest.mark.parametrize("method,signum,weights", [
    ("mezo", signal.SIGINT, "model.safetensors"),
    ("qlora", signal.SIGTERM, "adapter_model.safetensors"),
])
def test_signal_saves_a_checkpoint_and_resume_finishes_the_same_run(tiny_model_dir, jsonl, tmp_path, method,
                                                                     signum, weights):
    data = jsonl("text")
    part = tmp_path / "part"
    code, output, err = run_and_signal(finetune_args(tiny_model_dir, data, part, method), signum, at_step=3)
    assert code == 128 + signum, output + err
    assert "Traceback" not in output + err
    # stderr also holds the libraries' import-time notices (bitsandbytes, transformers); qft's own line is last
    ours = [ln for ln in err.splitlines() if ln.startswith(("interrupted:", "error:"))]
    last = err.strip().splitlines()[-1]
    assert ours == [last], err
    name = signal.Signals(signum).name
    assert f"{name} received" in last and "step 3 of 6" in last and "--resume auto" in last, err
    # said when the signal came, not only at the end (a process that then dies still leaves that much in its log)
    assert f"qft: {name} received: finishing this step" in err, err
    ckpt = part / "checkpoints" / "checkpoint-3"  # the signal came during step 3, which finished and was saved
    assert (ckpt / "trainer_state.json").exists(), output
    assert not (part / weights).exists()  # no final adapter from a stopped run

    runner = CliRunner()
    res = runner.invoke(app, finetune_args(tiny_model_dir, data, part, method) + ["--resume", "auto"])
    assert res.exit_code == 0, res.output
    assert json.loads((part / "qft_run.json").read_text())["stats"]["steps"] == 6
    state = json.loads((part / "checkpoints" / "checkpoint-6" / "trainer_state.json").read_text()) \
        if (part / "checkpoints" / "checkpoint-6").exists() else None
    assert state is None or state["global_step"] == 6

    full = tmp_path / "full"
    res = runner.invoke(app, finetune_args(tiny_model_dir, data, full, method))
    assert res.exit_code == 0, res.output
    a, b = load_file(full / weights), load_file(part / weights)
    assert a.keys() == b.keys()
    # MeZO: bit-exact (perturbations regenerated from seeds, RNG states in the checkpoint). QLoRA on CPU: also
    # bit-exact here (same batches in the same order, AdamW moments and the scheduler restored).
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_python_api_reports_the_checkpoint(tiny_model_dir, jsonl, tmp_path, monkeypatch):
    """finetune() raises QftInterrupted (exit code 130) after saving, when SIGINT arrives during step 2."""
    from transformers.trainer_callback import CallbackHandler

    from qft.errors import QftInterrupted
    from qft.train import FinetuneConfig, finetune

    real = CallbackHandler.on_step_begin

    def on_step_begin(self, args, state, control):
        if state.global_step == 1:
            signal.raise_signal(signal.SIGINT)
        return real(self, args, state, control)

    monkeypatch.setattr(CallbackHandler, "on_step_begin", on_step_begin)
    before = signal.getsignal(signal.SIGINT)  # what to restore (a background job starts with SIGINT ignored)
    out = tmp_path / "run"
    with pytest.raises(QftInterrupted) as err:
        finetune(FinetuneConfig(model=str(tiny_model_dir), data=str(jsonl("text")), output=str(out), max_steps=5,
                                batch_size=4), log=lambda m: None, progress=False)
    assert err.value.exit_code == 130 and "checkpoint-2" in str(err.value) and "\n" not in str(err.value)
    assert (out / "checkpoints" / "checkpoint-2" / "adapter_model.safetensors").exists()
    assert signal.getsignal(signal.SIGINT) is before  # handlers restored


def test_a_doubled_sigterm_is_one_request_a_later_signal_stops_at_once(monkeypatch):
    """GNU timeout sends SIGTERM to the process and then to its group: that must still save a checkpoint."""
    from qft import robust

    clock = [100.0]
    monkeypatch.setattr(robust.time, "monotonic", lambda: clock[0])
    stop = robust.StopOnSignal()
    stop._handle(signal.SIGTERM, None)
    stop._handle(signal.SIGTERM, None)  # the same signal, a moment later: a duplicate
    assert stop.received == signal.SIGTERM
    with pytest.raises(KeyboardInterrupt):
        stop._handle(signal.SIGINT, None)  # a different signal: the user insists
    stop = robust.StopOnSignal()
    stop._handle(signal.SIGTERM, None)
    clock[0] += 5
    with pytest.raises(KeyboardInterrupt):
        stop._handle(signal.SIGTERM, None)  # the same signal seconds later: a second request


@pytest.mark.parametrize("method,weightless", [("mezo", True), ("spiel", False)])
def test_resuming_a_finished_run_trains_nothing(tiny_model_dir, jsonl, tmp_path, method, weightless):
    """`--resume auto` on a run whose newest checkpoint holds every step (asked again, as the GPU runner does) takes
    no step past --max-steps (the Trainer alone would take one and save checkpoint-5), and its result is the run's
    own: also from a ZO checkpoint kept without weights, rebuilt by replay first."""
    import shutil

    from qft.train import FinetuneConfig, finetune

    cfg = dict(model=str(tiny_model_dir), data=str(jsonl("text")), method=method, max_steps=4, save_steps=2,
               batch_size=4, learning_rate=1e-3, output=str(tmp_path / "run"))
    first = finetune(FinetuneConfig(**cfg), log=lambda m: None, progress=False)
    weights = "model.safetensors" if method == "mezo" else "adapter_model.safetensors"
    final = load_file(first.output / weights)
    last = first.output / "checkpoints" / "checkpoint-4"
    if weightless:
        for f in last.iterdir():
            if f.name not in ("optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json"):
                f.unlink() if f.is_file() else shutil.rmtree(f)
    logs = []
    again = finetune(FinetuneConfig(resume="auto", overwrite=True, **cfg), log=logs.append, progress=False)
    assert any("checkpoint-4 already holds all 4 steps of this run: nothing left to train" in m for m in logs), logs
    assert sorted(p.name for p in (first.output / "checkpoints").glob("checkpoint-*")) == ["checkpoint-2",
                                                                                           "checkpoint-4"]
    assert again.stats["steps"] == 4 and again.metric_after == pytest.approx(first.metric_after)
    b = load_file(again.output / weights)
    assert final.keys() == b.keys() and all(torch.equal(final[k], b[k]) for k in final)
