"""QftMetricsCallback in a plain transformers Trainer (no qft trainer involved)."""

import torch
from peft import LoraConfig, get_peft_model
from transformers import Trainer, TrainingArguments

from qft.callbacks import QftMetricsCallback, count_parameters
from tests.tiny import tiny_model


class _Tokens(torch.utils.data.Dataset):
    def __len__(self):
        return 32

    def __getitem__(self, i):
        ids = torch.arange(16) % 100 + i % 7 + 3
        return {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}


def test_callback_adds_metrics_to_logs(tmp_path):
    model = get_peft_model(tiny_model("llama"), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    cb = QftMetricsCallback()
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=4, logging_steps=2,
                             report_to="none", use_cpu=True, disable_tqdm=True, save_strategy="no")
    trainer = Trainer(model=model, args=args, train_dataset=_Tokens(), callbacks=[cb])
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 2
    for h in logs:
        assert h["peak_mem_gib"] > 0.01
        assert h["tokens_per_s"] > 0
    trainable, total = count_parameters(model)
    assert logs[-1]["trainable_params"] == trainable == 2 * 2 * (64 * 4 + 4 * 64) - 2 * (4 * 64 - 4 * 32)
    assert logs[-1]["total_params"] == total
    # 2 steps of 4 x 16 tokens between logs: the token count the rate is built on is exact
    assert trainer.state.num_input_tokens_seen == 4 * 4 * 16
