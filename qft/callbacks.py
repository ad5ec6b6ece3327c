"""``QftMetricsCallback``: peak memory, tokens/s and parameter counts in the Trainer's logs.

Works with any ``transformers.Trainer`` (TRL's trainers included)::

    trainer = SFTTrainer(..., callbacks=[qft.QftMetricsCallback()])

Adds to every log (and to ``trainer.state.log_history``; reporters such as wandb see the values when
this callback comes before them, e.g. ``trainer.callback_handler.callbacks.insert(0, cb)``): ``peak_mem_gib`` (GPU allocator peak, or the process's peak RSS on CPU),
``tokens_per_s`` (input tokens since the previous log over wall time), ``trainable_params`` and
``total_params`` (4-bit weights counted as unpacked parameters).
"""

from __future__ import annotations

import resource
import sys
import time

import torch
from transformers import TrainerCallback


def peak_memory_gib() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return peak / (2**30 if sys.platform == "darwin" else 2**20)


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total); bitsandbytes 4-bit weights hold two parameters per stored byte, and PEQA's packed
    integer layers (buffers, not parameters) count the weights they represent."""
    trainable = total = 0
    for p in model.parameters():
        n = p.numel()
        if p.__class__.__name__ == "Params4bit":
            n *= 2
        total += n
        trainable += n if p.requires_grad else 0
    for m in model.modules():
        if m.__class__.__name__ == "IntLinear":  # qft.adapters.peqa.layer.IntLinear: packed integers
            total += m.in_features * m.out_features
    return trainable, total


_OUR_KEYS = ("tokens_per_s", "peak_mem_gib", "trainable_params", "total_params")


class QftMetricsCallback(TrainerCallback):
    def __init__(self):
        self.summary: dict[str, float] = {}
        self._last_time = None
        self._last_tokens = 0
        self._tokens_counted_by_us = False

    def on_init_end(self, args, state, control, **kwargs):
        # The Trainer counts input tokens only when asked; ask, so that tokens/s is exact.
        if args.include_num_input_tokens_seen in ("no", False, None):
            args.include_num_input_tokens_seen = "all"
            self._tokens_counted_by_us = True

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        if model is not None:
            trainable, total = count_parameters(model)
            self.summary.update(trainable_params=trainable, total_params=total)
        self._last_time, self._last_tokens = time.perf_counter(), state.num_input_tokens_seen

    def _throughput(self, state) -> float | None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        now, tokens = time.perf_counter(), state.num_input_tokens_seen
        if self._last_time is None or tokens <= self._last_tokens:
            return None
        rate = (tokens - self._last_tokens) / max(now - self._last_time, 1e-9)
        self._last_time, self._last_tokens = now, tokens
        return rate

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None:
            return
        rate = self._throughput(state)
        if rate is not None:
            logs["tokens_per_s"] = round(rate, 1)
            self.summary["tokens_per_s"] = logs["tokens_per_s"]
        logs["peak_mem_gib"] = round(peak_memory_gib(), 3)
        self.summary["peak_mem_gib"] = logs["peak_mem_gib"]
        for key in ("trainable_params", "total_params"):
            if key in self.summary:
                logs[key] = self.summary[key]
        # The Trainer appended a copy of ``logs`` to the history just before calling us; keep the two in step.
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update({k: logs[k] for k in _OUR_KEYS if k in logs})


def rich_progress_callback():
    """TRL's rich progress bar, tolerant of an evaluation before training (it assumes training started)."""
    from trl.trainer.callbacks import RichProgressCallback

    class _Progress(RichProgressCallback):
        def _started(self):
            return self.training_bar is not None

        def on_prediction_step(self, *a, **k):
            return super().on_prediction_step(*a, **k) if self._started() else None

        def on_evaluate(self, *a, **k):
            return super().on_evaluate(*a, **k) if self._started() else None

        def on_predict(self, *a, **k):
            return super().on_predict(*a, **k) if self._started() else None

        def on_log(self, *a, **k):
            return super().on_log(*a, **k) if self._started() else None

    return _Progress()
