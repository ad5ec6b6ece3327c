"""Merge a qft adapter into its base (``qft merge``), write a standalone float model (``qft export``), and load
any model folder qft makes (base, adapter, merged, PEQA integer, NF4) for ``qft eval``.

Merging works the same for every method whose layers implement peft's ``merge``: the base is loaded as the
adapter was trained on it, 4-bit NF4 layers are first dequantized to float ``nn.Linear`` (exactly the values
training saw), peft's ``merge_and_unload`` adds the delta in float32, and an NF4 base is then requantized
(dequantize → add → requantize) with the relative error reported. PEQA merges into its integer layers exactly
(the merged scales replace the old ones) and saves with ``qft.adapters.peqa.save_quantized``.

    report = merge_adapter("qft-out", "merged")       # MergeReport(kind="nf4", max_rel_error=...)
    export_model("qft-out", "standalone")             # AutoModelForCausalLM.from_pretrained("standalone")
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from qft.errors import QftError

# The config fields that decide whether an adapter's tensors fit a base.
_SHAPE_KEYS = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
               "num_key_value_heads", "vocab_size")


@dataclass
class Source:
    """What a folder holds, as read from its files."""

    path: Path
    adapter: dict | None  # adapter_config.json
    quant: dict | None  # qft_quantization.json
    run: dict | None  # qft_run.json

    @property
    def kind(self) -> str:
        if self.adapter is not None:
            return "adapter"
        if self.quant and self.quant.get("method") == "peqa-intq":
            return "peqa-quantized"
        return "model"


def _read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def read_source(path) -> Source:
    p = Path(path)
    if not p.is_dir():
        raise QftError(f"{path} is not a folder", "pass an adapter folder (from `qft finetune`) or a model folder")
    from qft.models import QUANT_FILE

    src = Source(p, _read_json(p / "adapter_config.json"), _read_json(p / QUANT_FILE), _read_json(p / "qft_run.json"))
    if src.adapter is None and not (p / "config.json").exists():
        raise QftError(f"{path} holds neither an adapter (adapter_config.json) nor a model (config.json)",
                       "pass the folder `qft finetune` wrote")
    return src


def _shape_config(model_id: str) -> dict | None:
    from transformers import AutoConfig

    try:
        cfg = AutoConfig.from_pretrained(model_id).to_dict()
    except (OSError, ValueError):
        return None
    return {k: cfg.get(k) for k in _SHAPE_KEYS}


def base_of(src: Source, base: str | None, log=print) -> str:
    """The base model id/path of an adapter: ``--base`` or the one recorded, checked against each other."""
    from qft.models import resolve_model

    recorded = (src.adapter or {}).get("base_model_name_or_path")
    if base is None and not recorded:
        raise QftError(f"{src.path} records no base model", "pass --base MODEL")
    model_id = resolve_model(base or recorded, log)
    if base is not None and recorded and Path(recorded).exists():
        want, got = _shape_config(recorded), _shape_config(model_id)
        if want and got and want != got:
            diff = ", ".join(f"{k} {want[k]} vs {got[k]}" for k in _SHAPE_KEYS if want[k] != got[k])
            raise QftError(f"the adapter in {src.path} was trained on {recorded}, which differs from --base "
                           f"{base} ({diff})", "pass the base the adapter was trained on")
    return model_id


def dequantize_linears(model: nn.Module, dtype: torch.dtype = torch.float32) -> list[str]:
    """Replace every bitsandbytes ``Linear4bit`` by a float ``nn.Linear`` holding its dequantized weight."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        return []
    from qft.quant import dequantize_nf4

    names = [n for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)]
    for name in names:
        old = model.get_submodule(name)
        new = nn.Linear(old.in_features, old.out_features, bias=old.bias is not None, dtype=dtype,
                        device=old.weight.device)
        with torch.no_grad():
            new.weight.copy_(dequantize_nf4(old.weight).to(dtype))
            if old.bias is not None:
                new.bias.copy_(old.bias.to(dtype))
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, new)
    if names:
        model.is_loaded_in_4bit = False
        model.hf_quantizer = None
        model.__dict__.pop("quantization_method", None)  # set by transformers' loader; forbids casting
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
    return names


def dequantize_int_linears(model: nn.Module) -> list[str]:
    """Replace every PEQA ``IntLinear`` by a float ``nn.Linear`` holding ``s · (q − z)``."""
    from qft.adapters.peqa import IntLinear

    names = [n for n, m in model.named_modules() if isinstance(m, IntLinear)]
    for name in names:
        old = model.get_submodule(name)
        dtype = old.scales.dtype
        new = nn.Linear(old.in_features, old.out_features, bias=old.bias is not None, dtype=dtype,
                        device=old.scales.device)
        with torch.no_grad():
            new.weight.copy_(old.dequantize_weight())
            if old.bias is not None:
                new.bias.copy_(old.bias)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, new)
    return names


def _load_base_for(src: Source, model_id: str, float_base: bool):
    """The base as the adapter was trained on it (NF4 dequantized to float when ``float_base``)."""
    from qft.models import QuantSettings, load_base

    quant = src.quant or {}
    if quant.get("method") == "bnb-nf4":
        model = load_base(model_id, QuantSettings(double_quant=quant.get("double_quant", True)))
        if float_base:
            dequantize_linears(model)
        return model
    if quant.get("quantized_base"):  # PEQA trained on a `qft quantize` folder
        from qft.adapters.peqa import load_quantized

        return load_quantized(quant["quantized_base"], device="cpu" if not torch.cuda.is_available() else None)
    return load_base(model_id, None, dtype=torch.float32)


def load_adapter_model(path, base: str | None = None, float_base: bool = False, log=print):
    """(PeftModel, tokenizer) for an adapter folder; a base its tensors do not fit is a one-line error."""
    import qft  # noqa: F401  registers qft's methods with peft
    from peft import PeftModel

    from qft.models import load_tokenizer

    src = read_source(path)
    if src.adapter is None:
        raise QftError(f"{path} is a whole model, not an adapter (no adapter_config.json)",
                       "use it directly, or `qft export` it")
    model_id = base_of(src, base, log)
    model = _load_base_for(src, model_id, float_base)
    try:
        peft_model = PeftModel.from_pretrained(model, str(src.path))
    except (RuntimeError, ValueError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
        raise QftError(f"the adapter in {src.path} does not fit the base {model_id} ({first})",
                       "pass the base the adapter was trained on with --base") from exc
    try:
        tok = load_tokenizer(str(src.path) if (src.path / "tokenizer_config.json").exists() else model_id)
    except QftError:
        tok = None
    return peft_model.eval(), tok


def load_any(path, base: str | None = None, log=print):
    """(model, tokenizer, kind) for ``qft eval``: an adapter folder, a PEQA integer folder or any model."""
    from qft.models import load_base, load_tokenizer, resolve_model

    p = Path(path)
    if p.is_dir() and (p / "adapter_config.json").exists():
        model, tok = load_adapter_model(p, base, log=log)
        return model, tok, "adapter"
    model_id = resolve_model(str(path), log)
    src = read_source(model_id) if Path(model_id).is_dir() else None
    if src is not None and src.kind == "peqa-quantized":
        from qft.adapters.peqa import load_quantized

        model = load_quantized(model_id)
    else:
        model = load_base(model_id, None)  # a merged NF4 folder carries its quantization_config
        from qft.quant import keep_bnb_layout

        keep_bnb_layout(model)
    return model.eval(), load_tokenizer(model_id), src.kind if src else "model"


@dataclass
class MergeReport:
    output: Path
    kind: str  # "float", "nf4" (requantized) or "peqa" (integer scales)
    layers: int  # merged (or requantized) linear layers
    max_rel_error: float = 0.0  # NF4: max over layers of ||requant(W + ΔW) − (W + ΔW)|| / ||W + ΔW||
    mean_rel_error: float = 0.0
    details: dict = field(default_factory=dict)


def _save_model_folder(model, tok, out: Path, extra: dict | None = None) -> None:
    """save_pretrained (safetensors) + tokenizer + a record, published atomically."""
    from qft.io import publish_dir_atomic, staging_dir, write_json_atomic

    staging = staging_dir(out)
    try:
        model.save_pretrained(staging)
        if tok is not None:
            tok.save_pretrained(staging)
        if extra is not None:
            write_json_atomic(staging / "qft_merge.json", extra)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    publish_dir_atomic(staging, out)


def _check_out(out, overwrite: bool) -> Path:
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise QftError(f"output folder {out} is not empty", "pass --overwrite to replace it, or choose another folder")
    return out


def _merged_float(adapter_dir, base: str | None, log) -> tuple:
    peft_model, tok = load_adapter_model(adapter_dir, base, float_base=True, log=log)
    merged = peft_model.merge_and_unload()
    return merged, tok


def requantize_nf4(model: nn.Module, names: list[str], folder: Path, double_quant: bool) -> tuple[nn.Module, list]:
    """Quantize ``names`` of a float model saved in ``folder`` back to NF4 (transformers' loader); the
    relative Frobenius error of each requantized weight."""
    from qft.models import QuantSettings, load_base
    from qft.quant import dequantize_nf4

    quantized = load_base(str(folder), QuantSettings(double_quant=double_quant))
    errors = []
    for name in names:
        target = model.get_submodule(name).weight.detach().float()
        got = dequantize_nf4(quantized.get_submodule(name).weight).float().to(target.device)
        errors.append(((got - target).norm() / target.norm().clamp_min(1e-12)).item())
    return quantized, errors


def merge_adapter(adapter_dir, out, base: str | None = None, overwrite: bool = False,
                  log: Callable[[str], None] = print) -> MergeReport:
    """``qft merge``: the adapter's delta added into its base, saved in the base's own format."""
    import tempfile

    out = _check_out(out, overwrite)
    src = read_source(adapter_dir)
    quant = src.quant or {}
    if src.adapter is not None and src.adapter.get("peft_type") == "PEQA":
        from qft.adapters.peqa import IntLinear, save_quantized

        peft_model, tok = load_adapter_model(adapter_dir, base, log=log)
        merged = peft_model.merge_and_unload()
        layers = sum(isinstance(m, IntLinear) for m in merged.modules())
        if out.exists() and overwrite:
            shutil.rmtree(out)
        save_quantized(merged, out, tokenizer=tok, base_model=base_of(src, base, log), overwrite=overwrite)
        return MergeReport(out, "peqa", layers)
    merged, tok = _merged_float(adapter_dir, base, log)
    nf4 = quant.get("method") == "bnb-nf4"
    if not nf4:
        if out.exists() and overwrite:
            shutil.rmtree(out)
        n = sum(isinstance(m, nn.Linear) for m in merged.modules())
        _save_model_folder(merged, tok, out, {"source": str(src.path), "kind": "float"})
        return MergeReport(out, "float", n)
    # NF4 base: which layers were 4-bit is what the base loader quantizes again (every linear but the head)
    linear_names = [n for n, m in merged.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"]
    with tempfile.TemporaryDirectory(dir=out.parent if out.parent.exists() else None) as tmp:
        merged.save_pretrained(tmp)
        quantized, errors = requantize_nf4(merged, linear_names, Path(tmp), quant.get("double_quant", True))
    report = MergeReport(out, "nf4", len(errors), max(errors, default=0.0),
                         sum(errors) / max(len(errors), 1),
                         {n: round(e, 6) for n, e in zip(linear_names, errors)})
    log(f"requantized {len(errors)} layers to NF4: relative weight error mean {report.mean_rel_error:.4f}, "
        f"max {report.max_rel_error:.4f}")
    if out.exists() and overwrite:
        shutil.rmtree(out)
    _save_model_folder(quantized, tok, out, {"source": str(src.path), "kind": "nf4",
                                             "mean_rel_error": report.mean_rel_error,
                                             "max_rel_error": report.max_rel_error, "layers": report.details})
    return report


def export_model(source, out, base: str | None = None, dtype: str = "float32", overwrite: bool = False,
                 log: Callable[[str], None] = print) -> Path:
    """``qft export``: a standalone float model folder (merged, safetensors, tokenizer) that
    ``AutoModelForCausalLM.from_pretrained`` loads with no qft installed."""
    if dtype not in ("float32", "bfloat16", "float16"):
        raise QftError(f"unknown dtype {dtype!r}", "pass --dtype float32, bfloat16 or float16")
    out = _check_out(out, overwrite)
    src = read_source(source)
    if src.adapter is not None:
        if src.adapter.get("peft_type") == "PEQA":
            peft_model, tok = load_adapter_model(source, base, log=log)
            model = peft_model.merge_and_unload()
        else:
            model, tok = _merged_float(source, base, log)
    else:
        model, tok, _ = load_any(source, log=log)
    dequantize_linears(model)
    dequantize_int_linears(model)
    model = model.to(getattr(torch, dtype))
    model.config._name_or_path = str(out)
    if out.exists() and overwrite:
        shutil.rmtree(out)
    _save_model_folder(model, tok, out)
    return out


@dataclass
class MergeConfig:
    """``qft merge`` options (CLI flags and YAML keys)."""

    adapter: str = field(default="", metadata={"help": "Adapter folder written by `qft finetune`."})
    output: str = field(default="", metadata={"help": "Folder for the merged model."})
    base: str | None = field(default=None, metadata={
        "help": "Base model (default: the adapter's base_model_name_or_path)."})
    overwrite: bool = field(default=False, metadata={"help": "Replace a non-empty output folder."})

    def __post_init__(self):
        if not self.adapter or not self.output:
            raise QftError("qft merge needs an adapter folder and an output folder", "run `qft merge ADAPTER OUT`")


@dataclass
class ExportConfig:
    """``qft export`` options (CLI flags and YAML keys)."""

    source: str = field(default="", metadata={"help": "Adapter folder, merged (NF4 or PEQA) folder or model."})
    output: str = field(default="", metadata={"help": "Folder for the standalone float model."})
    base: str | None = field(default=None, metadata={"help": "Base model of an adapter (default: the recorded one)."})
    dtype: str = field(default="float32", metadata={"help": "float32, bfloat16 or float16."})
    overwrite: bool = field(default=False, metadata={"help": "Replace a non-empty output folder."})

    def __post_init__(self):
        if not self.source or not self.output:
            raise QftError("qft export needs a source folder and an output folder", "run `qft export SOURCE OUT`")
