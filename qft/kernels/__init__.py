"""Memory-saving layer replacements used by qft's training paths (pure torch, with eager references)."""

from qft.kernels.fused import apply_fused_layers, rms_norm, swiglu

__all__ = ["apply_fused_layers", "rms_norm", "swiglu"]
