from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Union

from peft.config import PeftConfig
from peft.utils.peft_types import PeftType

from qft.errors import QftError


@dataclass
class SparseMezoConfig(PeftConfig):
    """Sparse-MeZO: zeroth-order updates restricted to each layer's smallest-magnitude weights."""

    density: float = field(default=0.2, metadata={
        "help": "Fraction of each targeted weight matrix that is tuned (its smallest-magnitude entries)."})
    target_modules: Optional[Union[list[str], str]] = field(default="all-linear", metadata={
        "help": "Linear layers to tune: names, a regex, or 'all-linear' (every linear layer but the LM head)."})
    delta_dtype: str = field(default="float32", metadata={
        "help": "dtype of the tuned values (float32 keeps tiny ZO steps from vanishing)."})

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = PeftType.SPARSE_MEZO
        if not 0 < self.density < 1:
            raise QftError(f"Sparse-MeZO density must be in (0, 1), got {self.density}", "pass e.g. --density 0.2")
        if self.delta_dtype not in ("float32", "bfloat16", "float16", "float64"):
            raise QftError(f"unknown delta_dtype {self.delta_dtype!r}", "use float32")
