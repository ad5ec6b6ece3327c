"""qft: memory-efficient fine-tuning methods for Hugging Face LLMs, as PEFT methods.

``import qft`` registers qft's methods with peft; the rest loads on first use.
"""

from __future__ import annotations

import importlib

from qft.errors import QftError
from qft.registry import register_method, registered_methods

__version__ = "0.1.0"

_LAZY = {
    "QftMetricsCallback": "qft.callbacks",
    "FinetuneConfig": "qft.train",
    "FinetuneResult": "qft.train",
    "finetune": "qft.train",
    "apply_fused_layers": "qft.kernels",
    "keep_bnb_layout": "qft.quant",
    "dequantize_nf4": "qft.quant",
}

__all__ = ["QftError", "register_method", "registered_methods", "__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'qft' has no attribute {name!r}")
