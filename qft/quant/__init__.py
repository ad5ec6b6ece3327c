"""Quantized-base plumbing shared by every method (bitsandbytes NF4 today; PEQA's integers later)."""

from qft.quant.bnb import dequantize_nf4, keep_bnb_layout

__all__ = ["dequantize_nf4", "keep_bnb_layout"]
