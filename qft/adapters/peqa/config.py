"""``PeqaConfig``: which layers to quantize, to how many bits, in which groups."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Union

from peft.config import PeftConfig

from qft.quant.intq import check_bits, check_group_size

QUANT_METHOD = "peqa-intq"  # the "method" of qft_quantization.json for PEQA's integer bases


@dataclass
class PeqaConfig(PeftConfig):
    """PEQA (Kim et al., 2023, arXiv:2305.14152): a b-bit integer base; the adapter is its scales.

    ``bits`` and ``group_size`` are recorded in adapter_config.json; loading the adapter onto a base
    quantized with other settings is refused.
    """

    bits: int = field(default=4, metadata={"help": "Integer bits of the quantized base weights: 2, 3 or 4."})
    group_size: int = field(default=128, metadata={
        "help": "Input weights per quantization group (e.g. 64, 128); 0 = one group per output channel. "
                "A size that doesn't divide a layer's inputs leaves a shorter last group."})
    target_modules: Optional[Union[list[str], str]] = field(default="all-linear", metadata={
        "help": "Linear layers to quantize and adapt: names, a regex, or 'all-linear' (every linear layer "
                "except the output head)."})
    exclude_modules: Optional[Union[list[str], str]] = field(default=None, metadata={
        "help": "Names or a regex of modules never to quantize."})

    def __post_init__(self):
        super().__post_init__()
        from qft.registry import add_peft_type

        self.peft_type = add_peft_type("peqa")
        check_bits(self.bits)
        check_group_size(self.group_size)
        if self.target_modules is None:
            self.target_modules = "all-linear"
        if isinstance(self.target_modules, list):
            self.target_modules = set(self.target_modules)

    def quant_record(self) -> dict:
        """How the base is quantized, as saved in qft_quantization.json."""
        return {"method": QUANT_METHOD, "bits": self.bits, "group_size": self.group_size, "rounding": "rtn",
                "asymmetric": True, "zero_points": "uint8, frozen",
                "scales": "fp16 (bf16 for bf16 models), trained by PEQA"}
