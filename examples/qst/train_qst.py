"""QST on SmolLM2-135M-Instruct (4-bit NF4) with qft's default sentiment task, from Python with TRL.

    python examples/qst/train_qst.py                          # r=8, LoRA downsample, 150 steps, lr 3e-3
    python examples/qst/train_qst.py --downsample pool --steps 40

The same from the command line:
    qft finetune --method qst --side-reduction 8 --downsample lora --learning-rate 3e-3 --max-steps 150
"""

from __future__ import annotations

import argparse
import os
import time

from peft import get_peft_model
from trl import SFTConfig, SFTTrainer

import qft
from qft.adapters.qst import DOWNSAMPLE_KINDS, QstConfig, QstFloat32Callback
from qft.data import default_task
from qft.evaluate import label_word_accuracy
from qft.models import QuantSettings, default_model_path, load_base, load_tokenizer


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--r", type=int, default=8, help="side reduction: side width = hidden / r")
    ap.add_argument("--downsample", default="lora", choices=DOWNSAMPLE_KINDS)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--output-gate-scale", type=float, default=10.0,
                    help="the output gate is stored divided by this (Adam moves it this much faster)")
    ap.add_argument("--output", default="qst-out")
    a = ap.parse_args()

    path = str(default_model_path())
    tok = load_tokenizer(path)
    model = load_base(path, QuantSettings())  # NF4, double quantization; keeps bnb's layout on CPU
    model = get_peft_model(model, QstConfig(r=a.r, downsample=a.downsample, output_gate_scale=a.output_gate_scale))
    model.print_trainable_parameters()
    train, task = default_task(seed=0)
    trainer = SFTTrainer(model=model, train_dataset=train, processing_class=tok,
                         callbacks=[qft.QftMetricsCallback(), QstFloat32Callback()],  # side network in float32
                         args=SFTConfig(output_dir=a.output, max_steps=a.steps, per_device_train_batch_size=8,
                                        learning_rate=a.lr, lr_scheduler_type="cosine", logging_steps=10,
                                        report_to="none", save_strategy="no", use_cpu=True))
    before = label_word_accuracy(trainer.model, tok, task)
    start = time.time()
    trainer.train()
    seconds = time.time() - start
    after = label_word_accuracy(trainer.model, tok, task)
    peak = max(h.get("peak_mem_gib", 0) for h in trainer.state.log_history)
    print(f"accuracy: {before:.4f} before -> {after:.4f} after ({a.steps} steps, {seconds:.0f} s, "
          f"peak memory {peak:.2f} GiB)")
    trainer.model.save_pretrained(a.output)
    size = os.path.getsize(os.path.join(a.output, "adapter_model.safetensors"))
    print(f"adapter saved to {a.output} ({size / 2**20:.2f} MiB)")
    prompt = tok(task.examples[0][0], return_tensors="pt")
    out = trainer.model.generate(**prompt, max_new_tokens=3, do_sample=False)
    print("generated:", repr(tok.decode(out[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True)))


if __name__ == "__main__":
    main()
