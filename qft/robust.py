"""Runs that survive what goes wrong: a clean stop on SIGINT/SIGTERM, a NaN/inf guard, atomic checkpoints, resume.

All of it hooks into transformers' ``Trainer`` where it expects to be extended (callbacks, ``_save_checkpoint``),
so it works for TRL's SFTTrainer, qft's ZO trainers and any other Trainer subclass::

    stopper = StopOnSignal()
    trainer = atomic_checkpoints(SFTTrainer)(..., callbacks=[stopper, NanGuard()])
    train_guarded(trainer, stopper, resume=resolve_resume("auto", Path(out) / "checkpoints"))

A stopped run leaves ``checkpoint-N`` (weights, optimizer, scheduler, RNG states, data position); resuming from
it continues the same run: bit-exactly for the ZO methods (their perturbations come from seeds), with the
same data order and optimizer state for the first-order methods.
"""

from __future__ import annotations

import functools
import math
import os
import shutil
import signal
import tempfile
import threading
import time
from pathlib import Path

import torch
from transformers import TrainerCallback, TrainerState
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, TrainOutput, get_last_checkpoint, rotate_checkpoints

from qft.errors import QftError, QftInterrupted
from qft.io import check_weight_files

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopOnSignal(TrainerCallback):
    """On SIGINT/SIGTERM, finish the current step, save a checkpoint and stop training.

    A second signal stops at once (``KeyboardInterrupt``); checkpoints are written atomically, so even then
    the last complete one stays loadable. A repeat of the same signal within ``DUPLICATE_S`` seconds is one
    request, not two: GNU ``timeout`` (and a kill of the process group) delivers SIGTERM twice at once. Use as
    a context manager around ``trainer.train()`` (or let the Trainer install it at ``on_train_begin``);
    handlers are installed only from the main thread.
    """

    DUPLICATE_S = 2.0

    def __init__(self):
        self.received: int | None = None
        self._received_at = 0.0
        self._previous: dict[int, object] = {}

    def _handle(self, signum, frame):
        now = time.monotonic()
        if self.received is not None:
            if signum == self.received and now - self._received_at < self.DUPLICATE_S:
                return
            self.restore()
            raise KeyboardInterrupt
        self.received, self._received_at = signum, now
        try:  # straight to the file descriptor: print() here could re-enter a write the signal interrupted
            os.write(2, f"qft: {signal.Signals(signum).name} received: finishing this step, then saving a "
                        "checkpoint\n".encode())
        except OSError:
            pass

    def install(self) -> None:
        if self._previous or threading.current_thread() is not threading.main_thread():
            return
        for s in SIGNALS:
            self._previous[s] = signal.signal(s, self._handle)

    def restore(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)
        self._previous = {}

    def __enter__(self):
        self.install()
        return self

    def __exit__(self, *exc):
        self.restore()

    def on_train_begin(self, args, state, control, **kwargs):
        self.install()

    def on_step_end(self, args, state, control, **kwargs):
        if self.received is not None:
            control.should_save = True
            control.should_training_stop = True

    def on_train_end(self, args, state, control, **kwargs):
        self.restore()

    def interrupted(self, trainer) -> QftInterrupted:
        """The one-line error saying where the checkpoint is and how to resume."""
        step, name = trainer.state.global_step, signal.Signals(self.received).name
        ckpt = Path(trainer.args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{step}"
        if not ckpt.is_dir():  # stopped before the first step ended: nothing to resume from
            return QftInterrupted(f"{name} received before the first step ended; nothing was saved",
                                  "run the command again", self.received)
        return QftInterrupted(f"{name} received; stopped at step {step} of {trainer.state.max_steps} and saved {ckpt}",
                              "continue this run with the same command plus --resume auto", self.received)


class NanGuard(TrainerCallback):
    """Stop training when the loss or the gradients become NaN/inf, before the bad step changes any weight.

    Checked at every optimizer step (the gradients, before ``optimizer.step()``) and at every log (the loss).
    Raises a one-line QftError; the checkpoints saved so far are all from good steps and stay as they are.
    ZO methods check their projected gradient themselves (qft.zo) and have no gradients here.
    """

    def __init__(self, gradients: bool = True):
        self.gradients = gradients  # False under ZO (the ZO trainer sets it): no gradients, no per-step scan

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if not self.gradients:
            return
        grads = [p.grad for p in model.parameters() if p.grad is not None] if model is not None else []
        if grads:
            total = torch.stack([g.detach().float().norm() for g in grads]).sum()
            if not torch.isfinite(total):
                self._stop(args, state, "gradients", total.item(), state.global_step + 1)

    def on_log(self, args, state, control, logs=None, **kwargs):
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(loss):
            self._stop(args, state, "training loss", loss, state.global_step)

    @staticmethod
    def _stop(args, state, what: str, value: float, step: int):
        folder = Path(args.output_dir)
        last = get_last_checkpoint(str(folder)) if folder.is_dir() else None
        kept = f"the last good checkpoint is {last}" if last else "no checkpoint was saved (see --save-steps)"
        resume = "; then --resume auto continues from it" if last else ""
        raise QftError(
            f"the {what} became {value} at step {step}, so training stopped; {kept}",
            f"lower --learning-rate (now {args.learning_rate:g}), train in float32 or bf16 rather than fp16, "
            f"or for MeZO lower --zo-eps{resume}",
        )


def atomic_checkpoints(trainer_cls):
    """``trainer_cls`` whose checkpoints appear whole or not at all, and resume into the same dtypes.

    Each ``checkpoint-N`` is written into a hidden staging folder beside it and renamed into place, so a
    crash mid-save leaves the earlier checkpoints (and ``get_last_checkpoint``) pointing at complete ones.
    """
    if isinstance(trainer_cls, functools.partial):  # a plan may bind constructor arguments (the ZO trainers do)
        return functools.partial(atomic_checkpoints(trainer_cls.func), *trainer_cls.args, **trainer_cls.keywords)
    if getattr(trainer_cls, "_qft_atomic_checkpoints", False):
        return trainer_cls
    return type(trainer_cls.__name__, (_CheckpointMixin, trainer_cls), {"_qft_atomic_checkpoints": True})


class _CheckpointMixin:
    _qft_staging: Path | None = None

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        # peft's load_adapter upcasts the loaded adapter to float32, but TRL trains QLoRA adapters in bf16: keep
        # the dtypes the run had, or the resumed run would not be the same run.
        target = model if model is not None else self.model
        dtypes = {n: p.dtype for n, p in target.named_parameters() if p.requires_grad}
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        for n, p in target.named_parameters():
            if n in dtypes and p.dtype != dtypes[n]:
                p.data = p.data.to(dtypes[n])

    def _get_output_dir(self, trial):
        if self._qft_staging is not None:  # the Trainer joins checkpoint-N to this
            return str(self._qft_staging)
        return super()._get_output_dir(trial)

    def _save_checkpoint(self, model, trial):
        run_dir = Path(super()._get_output_dir(trial))
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        run_dir.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=run_dir, prefix=f".{name}.partial-"))
        self._qft_staging = staging
        try:
            super()._save_checkpoint(model, trial)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        finally:
            self._qft_staging = None
        final = run_dir / name
        if final.exists():  # saved at this step before (e.g. a re-run): swap the old one out first
            old = Path(tempfile.mkdtemp(dir=run_dir, prefix=f".{name}.old-"))
            os.replace(final, old / name)
            shutil.rmtree(old, ignore_errors=True)
        os.replace(staging / name, final)
        shutil.rmtree(staging, ignore_errors=True)
        best = self.state.best_model_checkpoint
        if best and best.startswith(str(staging)):
            self.state.best_model_checkpoint = str(final)
        if self.args.should_save:
            rotate_checkpoints(output_dir=str(run_dir), save_total_limit=self.args.save_total_limit,
                               best_model_checkpoint=self.state.best_model_checkpoint, use_mtime=True)


def resolve_resume(spec: str | None, checkpoints: Path, allow_pickle: bool = False) -> str | None:
    """Turn --resume (a checkpoint folder, or ``auto`` for the newest under ``checkpoints``) into a checked path."""
    if not spec:
        return None
    if spec == "auto":
        last = get_last_checkpoint(str(checkpoints)) if checkpoints.is_dir() else None
        if last is None:
            raise QftError(f"--resume auto found no checkpoint in {checkpoints}",
                           "run without --resume, or pass --resume a checkpoint folder")
        path = Path(last)
    else:
        path = Path(spec).expanduser()
        if not path.is_dir():
            raise QftError(f"checkpoint folder {spec} does not exist", "pass a checkpoint-N folder, or --resume auto")
    if not (path / "trainer_state.json").exists():
        raise QftError(f"{path} is not a Trainer checkpoint (no trainer_state.json)",
                       "pass a checkpoint-N folder from the run's checkpoints folder, or --resume auto")
    check_weight_files(path, allow_pickle, what="checkpoint")
    return str(path)


def finished_state(trainer, checkpoint: str | None) -> TrainerState | None:
    """The trainer state of ``checkpoint`` when it already holds every step of the run ``trainer`` would train
    (its ``--max-steps``, or the count the checkpoint's run planned), else None."""
    if checkpoint is None:
        return None
    state = TrainerState.load_from_json(str(Path(checkpoint) / TRAINER_STATE_NAME))
    target = trainer.args.max_steps if trainer.args.max_steps > 0 else state.max_steps
    return state if target and state.global_step >= target else None


def train_guarded(trainer, stopper: StopOnSignal, resume: str | None = None, log=print):
    """``trainer.train()`` with signal handling; a stop by signal before the last step becomes QftInterrupted.

    Resuming from a checkpoint that already holds every step (a finished run, asked again) trains nothing: the
    Trainer would take one more step past ``max_steps`` before it looks. Its weights and state are loaded instead.
    """
    try:
        done = finished_state(trainer, resume)
        if done is not None:
            log(f"{Path(resume).name} already holds all {done.global_step} steps of this run: nothing left to "
                "train, its weights are the result")
            trainer._load_from_checkpoint(resume)
            trainer.state = done
            losses = [e["loss"] for e in done.log_history if "loss" in e]
            return TrainOutput(done.global_step, sum(losses) / len(losses) if losses else float("nan"), {})
        with stopper:
            out = trainer.train(resume_from_checkpoint=resume)
    except (RuntimeError, ValueError) as exc:
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()] or [""]
        if resume and any(s in lines[0] for s in ("size mismatch", "Error(s) in loading", "Can't find a valid")):
            detail = next((ln for ln in lines if "size mismatch" in ln), lines[0]).rstrip(".")[:160]
            raise QftError(f"checkpoint {resume} does not fit this model and method ({detail})",
                           "resume with the same --model and method options as the run that saved it") from exc
        raise
    if stopper.received is not None and trainer.state.global_step < trainer.state.max_steps:
        raise stopper.interrupted(trainer)
    return out
