"""SpIEL on SmolLM2-135M-Instruct with qft's default sentiment task, float or NF4 base, from Python.

    python examples/spiel/train_spiel.py                 # float base, density 0.01
    python examples/spiel/train_spiel.py --nf4 --steps 40 --density lora:8
"""

from __future__ import annotations

import argparse
import time

from peft import get_peft_model
from trl import SFTConfig, SFTTrainer

import qft
from qft.adapters.spiel import SpielCallback, SpielConfig
from qft.data import default_task
from qft.evaluate import label_word_accuracy
from qft.models import QuantSettings, default_model_path, load_base, load_tokenizer


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--density", default="0.01")
    ap.add_argument("--regrow", default="rigl", choices=["rigl", "sm3"])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--reselect-every", type=int, default=10)
    ap.add_argument("--nf4", action="store_true", help="sparse QLoRA: the base in bitsandbytes NF4")
    ap.add_argument("--output", default="spiel-out")
    a = ap.parse_args()

    path = str(default_model_path())
    tok = load_tokenizer(path)
    model = load_base(path, QuantSettings(compute_dtype="float32") if a.nf4 else None)  # keeps bnb's layout
    model = get_peft_model(model, SpielConfig(density=a.density, regrow=a.regrow, reselect_every=a.reselect_every,
                                              task_type="CAUSAL_LM"))
    model.print_trainable_parameters()
    train, task = default_task(seed=0)
    spiel = SpielCallback()
    trainer = SFTTrainer(model=model, train_dataset=train, processing_class=tok,
                         callbacks=[qft.QftMetricsCallback(), spiel],
                         args=SFTConfig(output_dir=a.output, max_steps=a.steps, per_device_train_batch_size=8,
                                        learning_rate=5e-4, lr_scheduler_type="cosine", logging_steps=10,
                                        report_to="none", save_strategy="no", use_cpu=True, bf16=False))
    before = label_word_accuracy(trainer.model, tok, task)
    start = time.time()
    trainer.train()
    seconds = time.time() - start
    after = label_word_accuracy(trainer.model, tok, task)
    replaced = sum(h["replaced"] for h in spiel.history)
    print(f"accuracy: {before:.4f} before -> {after:.4f} after ({a.steps} steps, {seconds:.0f} s, "
          f"{len({h['step'] for h in spiel.history})} reselections, {replaced} entries replaced)")
    trainer.model.save_pretrained(a.output)


if __name__ == "__main__":
    main()
