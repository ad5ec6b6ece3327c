"""PEQA over a GPTQ base (gptqmodel, optional): take a GPTQ layer's integers and scales as PEQA's.

GPTQ (Frantar et al., 2022) chooses the integers better than round-to-nearest; PEQA then trains the scales.
A gptqmodel ``TorchQuantLinear`` (load with ``backend=BACKEND.TORCH``) is converted to qft's
:class:`IntLinear` from its own ``dequantize_weight()`` and ``scales``: ``k = W / s`` is integer, and
``q = k + z`` with a zero point per group (exact; see ``qft.quant.intq.codes_from_dequantized``). Act-order
checkpoints (``desc_act=True``, non-contiguous groups) are refused.

gptqmodel is heavy and not a dependency: without it a GPTQ checkpoint is refused with a QftError. Tested with
gptqmodel 7.6.0 on the CPU (tests/test_peqa_gptq.py, skipped where gptqmodel is absent): GPTQ-quantizing a
model on calibration data, loading it with the torch kernel, converting exactly, training the scales.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from qft.errors import QftError
from qft.quant.intq import codes_from_dequantized, pack_bits


def require_gptqmodel():
    try:
        import gptqmodel  # noqa: F401
    except ImportError as exc:
        raise QftError("this model is GPTQ-quantized, and loading it needs the optional package gptqmodel",
                       "pip install gptqmodel, or pass a float model (PEQA quantizes it with RTN)") from exc


def gptq_settings(model_id: str) -> tuple[int, int] | None:
    """(bits, group_size in qft's convention) of a local GPTQ checkpoint, or None for other models."""
    path = Path(model_id) / "config.json"
    if not path.exists():
        return None
    qc = json.loads(path.read_text()).get("quantization_config") or {}
    if qc.get("quant_method") != "gptq":
        return None
    if qc.get("desc_act"):
        raise QftError(f"{model_id} is a GPTQ checkpoint with act-order (desc_act=True), whose groups are not "
                       "contiguous", "use a GPTQ checkpoint quantized with desc_act=False")
    gs = int(qc.get("group_size", -1))
    return int(qc["bits"]), 0 if gs == -1 else gs


def load_gptq(model_id: str, device: str | None = None):
    """A GPTQ checkpoint (gptqmodel's format) as a transformers model whose linear layers are gptqmodel's torch
    kernel (the one that can dequantize). transformers 5 itself loads GPTQ only through optimum, which
    qft does not use."""
    require_gptqmodel()
    from gptqmodel import BACKEND, GPTQModel

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return GPTQModel.load(model_id, backend=BACKEND.TORCH, device=device).model


MIN_CALIBRATION_TOKENS = 10  # gptqmodel's own default: shorter examples are dropped


def quantize_gptq(model_id: str, out: str, bits: int, group_size: int, texts: list[str],
                  batch_size: int = 4) -> None:
    """GPTQ-quantize ``model_id`` with gptqmodel on ``texts`` (the calibration data) and save it to ``out``:
    the better-than-round-to-nearest integers for PEQA (no act-order, so groups stay contiguous)."""
    require_gptqmodel()
    from gptqmodel import GPTQModel, QuantizeConfig

    from qft.io import publishing

    if not texts:
        raise QftError("GPTQ needs calibration data, and the file gave no texts",
                       "pass --gptq-calibration a JSONL/CSV/Parquet file with a few hundred training examples")
    cfg = QuantizeConfig(bits=bits, group_size=group_size or -1, desc_act=False)
    model = GPTQModel.load(model_id, cfg, device="cuda" if torch.cuda.is_available() else "cpu")
    long_enough = [t for t in texts if len(model.tokenizer(t)["input_ids"]) >= MIN_CALIBRATION_TOKENS]
    if not long_enough:
        raise QftError(f"every calibration example is shorter than {MIN_CALIBRATION_TOKENS} tokens, which GPTQ skips",
                       "pass --gptq-calibration data with longer examples")
    model.quantize(long_enough, batch_size=batch_size, calibration_data_min_length=MIN_CALIBRATION_TOKENS)
    with publishing(Path(out), "GPTQ model") as staging:  # written beside OUT, then moved in file by file
        model.save(str(staging))


def is_gptq_layer(module) -> bool:
    return type(module).__module__.startswith("gptqmodel.") and all(
        hasattr(module, a) for a in ("qweight", "qzeros", "scales", "g_idx", "bits", "group_size"))


def int_linear_from_gptq(layer):
    """A gptqmodel quantized linear layer as an :class:`IntLinear` with the same integers and scales."""
    from qft.adapters.peqa.layer import IntLinear

    if not hasattr(layer, "dequantize_weight"):
        raise QftError(f"{type(layer).__name__} cannot give back its weights",
                       "load the GPTQ model with gptqmodel's torch backend (backend=BACKEND.TORCH)")
    in_f, out_f, bits = layer.in_features, layer.out_features, int(layer.bits)
    group_size = 0 if int(layer.group_size) in (-1, in_f) else int(layer.group_size)
    expected_groups = torch.arange(in_f, device=layer.g_idx.device) // (group_size or in_f)
    if not torch.equal(layer.g_idx[:in_f].long(), expected_groups):
        raise QftError("the GPTQ layer uses act-order (non-contiguous groups)",
                       "use a GPTQ checkpoint quantized with desc_act=False")
    with torch.no_grad():
        w = layer.dequantize_weight().T[:out_f, :in_f]  # gptqmodel returns (in, out)
        scales = layer.scales.T[:out_f].contiguous()  # (out, n_groups)
        q, zeros = codes_from_dequantized(w, scales, group_size, bits)
    out = IntLinear(in_f, out_f, bits, group_size, layer.bias is not None, dtype=scales.dtype, device=w.device)
    out.packed.copy_(pack_bits(q, bits))
    out.zeros.copy_(zeros)
    out.scales.copy_(scales)
    if layer.bias is not None:
        out.bias.copy_(layer.bias)
    return out
