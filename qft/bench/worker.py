"""One benchmark path in its own process: train ``warmup + steps`` steps, time the last ``steps``."""

from __future__ import annotations

import argparse
import json
import time

import torch
from transformers import TrainerCallback


class _StepTimer(TrainerCallback):
    def __init__(self, warmup: int):
        self.warmup, self.times, self.losses = warmup, [], []

    def _now(self):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return time.perf_counter()

    def on_step_begin(self, args, state, control, **kw):
        if state.global_step == self.warmup:
            self.t0 = self._now()

    def on_step_end(self, args, state, control, **kw):
        if state.global_step > self.warmup:
            self.times.append(self._now())

    def on_log(self, args, state, control, logs=None, **kw):
        if logs and "loss" in logs:
            self.losses.append(logs["loss"])


def model_bytes(model) -> int:
    """Bytes the model's weights occupy: parameters and buffers, plus bitsandbytes' 4-bit quantization state."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) in seen:
            continue
        seen.add(id(t))
        total += t.numel() * t.element_size()
        state = getattr(t, "quant_state", None)
        if state is not None:
            total += state.absmax.numel() * state.absmax.element_size()
            if getattr(state, "state2", None) is not None:
                total += state.state2.absmax.numel() * state.state2.absmax.element_size() + 16 * 4
    return total


def _random_tokens(n: int, seq: int, vocab: int):
    import datasets

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(10, vocab, (n, seq), generator=g).tolist()
    return datasets.Dataset.from_dict({"input_ids": ids})


def main() -> None:
    ap = argparse.ArgumentParser()
    for name in ("suite", "path", "model", "optim", "result"):
        ap.add_argument(f"--{name}", required=True)
    for name in ("batch", "seq", "steps", "warmup", "rank"):
        ap.add_argument(f"--{name}", type=int, required=True)
    ap.add_argument("--gradient-checkpointing", action="store_true")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--reselect-every", type=int, default=20)
    a = ap.parse_args()

    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast
    from trl import SFTConfig, SFTTrainer

    from qft.kernels import apply_fused_layers
    from qft.models import QuantSettings, load_base

    cuda = torch.cuda.is_available()
    callbacks = []
    quant = QuantSettings(double_quant=True)
    lora = LoraConfig(r=a.rank, lora_alpha=2 * a.rank, lora_dropout=0.0, target_modules="all-linear",
                      task_type="CAUSAL_LM")
    if a.path == "stock-peft":
        model = AutoModelForCausalLM.from_pretrained(
            a.model, quantization_config=quant.bnb_config(), dtype=quant.resolved_compute_dtype(),
            device_map={"": 0} if cuda else None)
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=a.gradient_checkpointing)
        model = get_peft_model(model, lora)
        peft_config = None
    elif a.path == "stock-trl":
        model = AutoModelForCausalLM.from_pretrained(
            a.model, quantization_config=quant.bnb_config(), dtype=quant.resolved_compute_dtype(),
            device_map={"": 0} if cuda else None)
        peft_config = lora
    elif a.path.startswith("qft-peqa"):
        from qft.adapters.peqa import PeqaConfig

        model = load_base(a.model, None, dtype=torch.bfloat16 if cuda else torch.float32)
        group_size = 0 if a.path == "qft-peqa-channel" else 128
        peft_config = PeqaConfig(bits=a.bits, group_size=group_size, task_type="CAUSAL_LM")
    elif a.path == "stock-lora-bf16":
        model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.bfloat16 if cuda else torch.float32,
                                                     device_map={"": 0} if cuda else None)
        peft_config = lora
    elif a.path == "qft-qst":
        from qft.adapters.qst import QstConfig, QstFloat32Callback

        model = load_base(a.model, quant)
        peft_config = QstConfig(r=16, downsample="lora")
        callbacks.append(QstFloat32Callback())
    elif a.path.startswith("qft-spiel"):
        from qft.adapters.spiel import SpielCallback, SpielConfig

        if a.path == "qft-spiel-nf4":
            model = load_base(a.model, quant)
        else:
            model = load_base(a.model, None, dtype=torch.bfloat16 if cuda else torch.float32)
        # as many trainable entries as the LoRA paths; one whole drop-and-regrow cycle (accumulation steps
        # included) inside the timed steps when --steps >= --reselect-every
        peft_config = SpielConfig(density=f"lora:{a.rank}", target_modules="all-linear",
                                  reselect_every=a.reselect_every, accumulation_steps=min(5, a.reselect_every),
                                  task_type="CAUSAL_LM")
        callbacks.append(SpielCallback())
    elif a.path == "qft":
        model = load_base(a.model, quant)
        if not a.gradient_checkpointing:  # the same rule as qft finetune (see qft/adapters/qlora)
            apply_fused_layers(model)
        peft_config = lora
    else:
        raise SystemExit(f"unknown path {a.path}")

    from tokenizers import Tokenizer, models

    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"<pad>": 0, "<eos>": 1}, unk_token="<pad>")),
                                  pad_token="<pad>", eos_token="<eos>")
    data = _random_tokens(a.batch * (a.steps + a.warmup), a.seq, model.config.vocab_size)
    args = SFTConfig(
        output_dir="/tmp/qft-bench-run", max_steps=a.steps + a.warmup, per_device_train_batch_size=a.batch,
        learning_rate=1e-4, logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True,
        bf16=cuda, use_cpu=not cuda, max_length=a.seq, optim=a.optim, gradient_checkpointing=a.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False} if a.gradient_checkpointing else None,
        dataloader_num_workers=0, seed=0,
    )
    timer = _StepTimer(a.warmup)
    trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tok, peft_config=peft_config,
                         callbacks=[timer, *callbacks])
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    elapsed = timer.times[-1] - timer.t0
    from qft.callbacks import count_parameters, peak_memory_gib

    trainable, total = count_parameters(trainer.model)
    result = {
        "model_bytes": model_bytes(trainer.model),
        "peak_gib": round(peak_memory_gib(), 3),
        "tokens_per_s": round(a.batch * a.seq * a.steps / elapsed, 1),
        "step_ms": round(1000 * elapsed / a.steps, 1),
        "trainable_params": trainable, "total_params": total, "losses": timer.losses,
    }
    with open(a.result, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
