"""The label-word ZO objective (MeZO's prompt-based classification loss) and `--zo-objective` end to end."""

import json

import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset
from transformers import AutoTokenizer

from qft.errors import QftError
from qft.zo.objectives import label_word_ids, label_word_objective
from tests.tiny import tiny_model


def _tok(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


def test_label_word_ids_and_refusals(tiny_model_dir):
    tok = _tok(tiny_model_dir)
    ds = Dataset.from_dict({"prompt": ["a b", "c d", "e f"], "completion": [" x", " y", " x"]})
    ids = label_word_ids(ds, tok)
    assert ids == [tok(" x", add_special_tokens=False)["input_ids"][0], tok(" y", add_special_tokens=False)["input_ids"][0]]
    with pytest.raises(QftError, match="2 to 32 distinct"):
        label_word_ids(Dataset.from_dict({"prompt": ["a"] * 40, "completion": [f" {i}" for i in range(40)]}), tok)
    with pytest.raises(QftError, match="distinct tokens"):
        label_word_ids(Dataset.from_dict({"prompt": ["a", "b"], "completion": [" x y", " x z"]}), tok)
    with pytest.raises(QftError, match="prompt/completion"):
        label_word_ids(Dataset.from_dict({"text": ["a b"]}), tok)


def test_objective_is_cross_entropy_over_label_words_at_the_label_position():
    model = tiny_model("llama")
    ids = torch.tensor([[5, 6, 7, 20, 2, 0], [8, 9, 21, 2, 0, 0]])  # prompt, label word, eos, padding
    labels = torch.tensor([[-100, -100, -100, 20, 2, -100], [-100, -100, 21, 2, -100, -100]])
    mask = (labels != -100) | torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 0, 0, 0, 0]], dtype=torch.bool)
    inputs = {"input_ids": ids, "attention_mask": mask.long(), "labels": labels}
    got = label_word_objective([20, 21])(model, inputs)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask.long()).logits
    ref = F.cross_entropy(torch.stack([logits[0, 2, [20, 21]], logits[1, 1, [20, 21]]]), torch.tensor([0, 1]))
    torch.testing.assert_close(got, ref)
    seen = []
    handle = model.lm_head.register_forward_hook(lambda m, args, out: seen.append(tuple(args[0].shape)))
    label_word_objective([20, 21])(model, inputs)
    handle.remove()
    assert seen == [(2, 2, model.config.hidden_size)]  # the head ran on the two predicting positions only

    class NoKeep(torch.nn.Module):  # a model whose forward has no logits_to_keep: the whole batch's logits
        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, input_ids, attention_mask=None, use_cache=False):
            return self.inner(input_ids=input_ids, attention_mask=attention_mask)

    torch.testing.assert_close(label_word_objective([20, 21])(NoKeep(), inputs), ref)
    # a paired forward's two halves (the batch twice): each half's objective, from one forward
    doubled = {k: torch.cat([v, v]) for k, v in inputs.items()}
    torch.testing.assert_close(label_word_objective([20, 21]).halves(model, doubled, 2), torch.stack([ref, ref]))
    bad = dict(inputs, labels=torch.where(labels == 20, torch.tensor(22), labels))
    with pytest.raises(QftError, match="none of the data's label words"):
        label_word_objective([20, 21])(model, bad)


@pytest.mark.parametrize("method,paired", [("mezo", False), ("sparse-mezo", False), ("mezo", True),
                                           ("sparse-mezo", True)])  # sparse-mezo: logits_to_keep through peft
def test_finetune_zo_with_label_word_objective(tiny_model_dir, tmp_path, method, paired):
    from qft.train import FinetuneConfig, finetune

    data = tmp_path / "cls.jsonl"
    with open(data, "w") as f:
        for i in range(24):
            f.write(json.dumps({"prompt": f"a b c {'d' if i % 2 else 'e'} :", "completion": " f" if i % 2 else " g"})
                    + "\n")
    r = finetune(FinetuneConfig(model=str(tiny_model_dir), data=str(data), method=method, max_steps=3,
                                batch_size=4, output=str(tmp_path / "out"), zo_objective="label-words",
                                learning_rate=1e-3, zo_paired=paired, zo_distribution="rank1" if paired else "gaussian"),
                 log=lambda m: None, progress=False)
    assert r.stats["steps"] == 3 and r.train_loss == r.train_loss
    with pytest.raises(QftError, match="--zo-paired applies to mezo and sparse-mezo"):
        FinetuneConfig(method="qlora", zo_paired=True)
    with pytest.raises(QftError, match="applies to mezo and sparse-mezo"):
        FinetuneConfig(method="qlora", zo_objective="label-words")
    with pytest.raises(QftError, match="unknown --zo-objective"):
        FinetuneConfig(method="mezo", zo_objective="f1")
