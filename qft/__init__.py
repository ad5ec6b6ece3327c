"""qft: memory-efficient fine-tuning methods for Hugging Face LLMs, as PEFT methods.

``import qft`` registers qft's methods with peft (PEQA, QST, SpIEL, Sparse-MeZO); the rest loads on first use.
"""

from __future__ import annotations

import importlib
import logging

# bitsandbytes warns at import that an optional AVX512-BF16 CPU kernel ("kernels" package) is missing. qft never
# uses that path (qft.quant.keep_bnb_layout turns bitsandbytes' CPU repacking off), so the warning is noise.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

from qft.errors import QftError  # noqa: E402
from qft.registry import register_method, registered_methods  # noqa: E402

__version__ = "0.1.0"

_LAZY = {
    "PeqaConfig": "qft.adapters.peqa",
    "QstConfig": "qft.adapters.qst",
    "SpielConfig": "qft.adapters.spiel",
    "SpielCallback": "qft.adapters.spiel",
    "SparseMezoConfig": "qft.adapters.sparse_mezo",
    "ZoArguments": "qft.zo.trainer",
    "ZoTrainer": "qft.zo.trainer",
    "zo_sft_trainer_cls": "qft.zo.trainer",
    "QftMetricsCallback": "qft.callbacks",
    "FinetuneConfig": "qft.train",
    "FinetuneResult": "qft.train",
    "finetune": "qft.train",
    "apply_fused_layers": "qft.kernels",
    "keep_bnb_layout": "qft.quant",
    "dequantize_nf4": "qft.quant",
}

# Register every qft method with peft now, so that PeftModel.from_pretrained reads qft adapters after
# `import qft` (the packages are light; the heavy imports inside them are peft's and torch's own).
for _method in ("peqa", "qst", "spiel", "sparse_mezo"):
    importlib.import_module(f"qft.adapters.{_method}")
del _method

__all__ = ["QftError", "register_method", "registered_methods", "__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'qft' has no attribute {name!r}")
