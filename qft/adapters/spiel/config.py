"""``SpielConfig``: where the sparse deltas go, how many entries they train, and how they are reselected."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Union

from peft.config import PeftConfig

from qft.errors import QftError
from qft.sparse import parse_density


@dataclass
class SpielConfig(PeftConfig):
    """SpIEL (Ansell et al., 2024, arXiv:2401.16405): sparse weight deltas with periodic drop and regrow."""

    target_modules: Optional[Union[list[str], str]] = field(default="all-linear", metadata={
        "help": "Linear modules that get a sparse delta: names, a regex, or 'all-linear' (output head excluded)."})
    density: Union[str, float, int] = field(default="0.01", metadata={
        "help": "Trainable entries: a fraction of each adapted weight (0.01), a total count shared out in "
                "proportion to the weights' sizes (250000), or lora:R for as many as LoRA of rank R."})
    regrow: str = field(default="rigl", metadata={
        "help": "Regrowth criterion: 'rigl' (SpIEL-AG: largest accumulated gradient of inactive entries) or "
                "'sm3' (SpIEL-MA: largest SM3 row x column second-moment estimate)."})
    reselect_every: int = field(default=20, metadata={"help": "Optimizer steps between drop-and-regrow."})
    accumulation_steps: int = field(default=5, metadata={
        "help": "rigl: optimizer steps, ending at each reselection, whose dense gradients score the candidates."})
    reselect_fraction: float = field(default=0.2, metadata={
        "help": "Fraction of the active entries replaced at the first reselection; it decays to 0 over training."})
    reselect_decay: str = field(default="linear", metadata={"help": "Decay of the fraction: 'linear' or 'cosine'."})
    seed: int = field(default=0, metadata={"help": "Seed of the initial random choice of entries."})
    delta_dtype: str = field(default="float32", metadata={"help": "dtype of the delta values (float32/bfloat16)."})

    def __post_init__(self):
        super().__post_init__()
        from peft.utils.peft_types import PeftType

        self.peft_type = PeftType.SPIEL
        parse_density(self.density)  # raises QftError on a bad value
        if self.regrow not in ("rigl", "sm3"):
            raise QftError(f"unknown regrowth criterion {self.regrow!r}", "pass regrow='rigl' or regrow='sm3'")
        if self.reselect_every <= 0:
            raise QftError(f"reselect_every must be positive, got {self.reselect_every}", "pass e.g. 20")
        if not 0 < self.accumulation_steps <= self.reselect_every:
            raise QftError(f"accumulation_steps must be in [1, reselect_every={self.reselect_every}], got "
                           f"{self.accumulation_steps}", "pass e.g. 5, at most reselect_every")
        if not 0 <= self.reselect_fraction <= 1:
            raise QftError(f"reselect_fraction must be in [0, 1], got {self.reselect_fraction}", "pass e.g. 0.2")
        if self.reselect_decay not in ("linear", "cosine"):
            raise QftError(f"unknown reselect_decay {self.reselect_decay!r}", "pass 'linear' or 'cosine'")
        if self.delta_dtype not in ("float32", "bfloat16", "float16"):
            raise QftError(f"unknown delta_dtype {self.delta_dtype!r}", "pass 'float32' or 'bfloat16'")
        if isinstance(self.target_modules, list):
            self.target_modules = list(self.target_modules)
