"""The checks every qft method must pass, shared by all methods' test tables.

A case is a method x tiny model; the method's ``build`` turns a fresh tiny base into a peft model.
Adding a method means adding rows (see tests/test_methods.py), not new checks.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable

import torch
from peft import PeftModel

from tests.tiny import tiny_inputs


@dataclass
class MethodCase:
    name: str
    family: str
    make_base: Callable[[str], torch.nn.Module]  # family -> fresh base model (same weights every call)
    make_config: Callable[[], object]  # -> a peft config
    adapter_marker: str  # substring of adapter parameter names
    init_atol: float = 0.0  # forward at init vs the base
    merge_atol: float = 1e-5  # merged vs unmerged forward (measured; quantized bases need more)
    lr: float = 1e-2

    def __str__(self):
        return f"{self.name}-{self.family}"


def logits(model, x):
    model.eval()
    with torch.no_grad():
        return model(**x).logits.float()


def perturb_adapter(model, marker: str, scale: float = 0.05):
    """Give the adapter non-trivial values (LoRA's B starts at zero, which would hide save/load bugs)."""
    g = torch.Generator().manual_seed(123)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if marker in n and p.dtype.is_floating_point:
                p.add_(torch.randn(p.shape, generator=g).to(p.dtype) * scale)


def check_forward_matches_base_at_init(case: MethodCase):
    from peft import get_peft_model

    base = case.make_base(case.family)
    x = tiny_inputs(base)
    expected = logits(base, x)
    model = get_peft_model(case.make_base(case.family), case.make_config())
    torch.testing.assert_close(logits(model, x), expected, atol=case.init_atol, rtol=0)


def check_training_step_changes_only_adapter(case: MethodCase):
    from peft import get_peft_model

    model = get_peft_model(case.make_base(case.family), case.make_config())
    perturb_adapter(model, case.adapter_marker)  # so that every adapter tensor gets a gradient
    before = {n: t.detach().clone() for n, t in model.state_dict().items()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable, "the method left nothing trainable"
    assert all(case.adapter_marker in n for n, p in model.named_parameters() if p.requires_grad)
    opt = torch.optim.SGD(trainable, lr=case.lr)
    x = tiny_inputs(model)
    model.train()
    model(**x, labels=x["input_ids"]).loss.backward()
    opt.step()
    after = model.state_dict()
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed, "a training step changed nothing"
    assert all(case.adapter_marker in n for n in changed), f"non-adapter state changed: {sorted(changed)[:5]}"


def check_save_load_identical(case: MethodCase, tmp_path):
    from peft import get_peft_model

    model = get_peft_model(case.make_base(case.family), case.make_config())
    perturb_adapter(model, case.adapter_marker)
    x = tiny_inputs(model)
    expected = logits(model, x)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(case.make_base(case.family), tmp_path)
    torch.testing.assert_close(logits(loaded, x), expected, atol=0, rtol=0)


def check_merge_close_to_unmerged(case: MethodCase):
    from peft import get_peft_model

    model = get_peft_model(case.make_base(case.family), case.make_config())
    perturb_adapter(model, case.adapter_marker)
    x = tiny_inputs(model)
    expected = logits(model, x)
    merged = copy.deepcopy(model).merge_and_unload() if case.family != "__never__" else None
    err = (logits(merged, x) - expected).abs().max().item()
    assert err <= case.merge_atol, f"merge error {err:.2e} > tolerance {case.merge_atol:.2e}"
    return err


ALL_CHECKS = {
    "init": check_forward_matches_base_at_init,
    "train_step": check_training_step_changes_only_adapter,
    "save_load": check_save_load_identical,
    "merge": check_merge_close_to_unmerged,
}
