"""The shared checks (tests/common.py) over the table of methods x tiny models.

Tolerances for NF4 merge: merging dequantizes W, adds the LoRA delta and requantizes to NF4, so the merged
forward differs from the unmerged one by one NF4 rounding of W + delta. Measured on these tiny models
(adapter perturbed by N(0, 0.05), seeds 0-2): max |logit error| 0.065-0.129 over the three families, against
0.07 for the NF4 base itself vs its float weights; the tolerance is 0.25, about 2x the worst measured.
"""

import pytest
import torch
from peft import LoraConfig

import qft  # noqa: F401
from qft.models import QuantSettings
from tests.common import ALL_CHECKS, MethodCase
from tests.tiny import FAMILIES, save_tiny


def _float_base(family):
    from tests.tiny import tiny_model

    return tiny_model(family)


_SAVED = {}


def _nf4_base(family):
    """The same tiny model, saved once and loaded back in 4-bit NF4 through bitsandbytes (CPU backend)."""
    import tempfile

    from qft.models import load_base

    if family not in _SAVED:
        _SAVED[family] = save_tiny(family, tempfile.mkdtemp(prefix=f"qft-tiny-{family}-"))
    return load_base(str(_SAVED[family]), QuantSettings(compute_dtype="float32")).eval()


def _lora():
    return LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM")


CASES = [
    *(MethodCase("lora", f, _float_base, _lora, "lora_", merge_atol=1e-4) for f in FAMILIES),
    *(MethodCase("qlora", f, _nf4_base, _lora, "lora_", merge_atol=0.25) for f in FAMILIES),
]


@pytest.mark.parametrize("check", list(ALL_CHECKS))
@pytest.mark.parametrize("case", CASES, ids=str)
def test_method(case, check, tmp_path):
    fn = ALL_CHECKS[check]
    if check == "save_load":
        fn(case, tmp_path)
    else:
        fn(case)
