"""PEQA's integer models on disk: ``qft quantize`` writes one, ``load_quantized`` reads it, PEQA trains on it.

A quantized model folder holds::

    config.json                the transformers config (the architecture)
    qft_intq.safetensors       every tensor: packed integers, zero points, scales and biases of the quantized
                               linear layers, and the float embeddings, norms and head
    qft_quantization.json      the record: bits, group size, which layers are integer, tied tensors
    tokenizer files            when the source had a tokenizer

The weights file is deliberately not named model.safetensors: transformers cannot read it, and says so,
instead of loading a model with random linear layers. Every file is published atomically (staging folder +
renames). Loading builds the model on the meta device and assigns the stored tensors, so no float copy of
the quantized layers ever exists.

    quantize_to_folder("path/to/model", "model-3bit", bits=3, group_size=128)
    model = load_quantized("model-3bit")
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from qft.adapters.peqa.config import QUANT_METHOD, PeqaConfig
from qft.adapters.peqa.layer import IntLinear, PeqaLinear
from qft.errors import QftError

WEIGHTS_FILE = "qft_intq.safetensors"
FORMAT_VERSION = 1


def quantize_model(model: nn.Module, bits: int, group_size: int, target_modules="all-linear",
                   exclude_modules=None) -> list[str]:
    """RTN-quantize the targeted linear layers of ``model`` in place (float ``nn.Linear`` → :class:`IntLinear`).

    Uses PEQA's own injection (the same target matching and checks as ``get_peft_model``), then unloads the
    tuner layers, keeping their integer base layers. Returns the names of the quantized layers.
    """
    from peft import get_peft_model

    cfg = PeqaConfig(bits=bits, group_size=group_size, target_modules=target_modules,
                     exclude_modules=exclude_modules)
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    model = get_peft_model(model, cfg).unload()
    for n, p in model.named_parameters():  # peft froze the base; a plain quantized model keeps its flags
        p.requires_grad_(grads.get(n, p.requires_grad))
    return sorted(n for n, m in model.named_modules() if isinstance(m, IntLinear))


def _tensors_and_aliases(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Every parameter and buffer (non-persistent ones too, e.g. rotary frequencies) by name; a tensor
    reachable under two names (tied embeddings) is stored once and the second name recorded as an alias."""
    tensors, aliases, seen = {}, {}, {}
    named = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    for name, t in named:
        if t is None:
            continue
        if t.is_meta:
            raise QftError(f"tensor {name} has no data (meta device)", "load the model fully before saving it")
        key = (t.data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)
        if t.numel() and key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        tensors[name] = t.detach().to("cpu").contiguous()
    return tensors, aliases


def save_quantized(model: nn.Module, out, tokenizer=None, base_model: str | None = None,
                   overwrite: bool = False) -> dict:
    """Write a self-contained quantized model folder (atomically). ``model`` holds :class:`IntLinear` layers,
    e.g. after ``quantize_model`` or a PEQA model's ``merge_and_unload()``. Returns the record."""
    from safetensors.torch import save

    from qft.io import publish_dir_atomic, staging_dir, write_bytes_atomic, write_json_atomic
    from qft.models import QUANT_FILE

    out = Path(out)
    if any(isinstance(m, PeqaLinear) for m in model.modules()):
        raise QftError("the model still has PEQA adapter layers", "call model.merge_and_unload() and save its result")
    layers = {n: m for n, m in model.named_modules() if isinstance(m, IntLinear)}
    if not layers:
        raise QftError("the model has no integer-quantized layers", "quantize it first with quantize_model(...)")
    if (out / WEIGHTS_FILE).exists() and not overwrite:
        raise QftError(f"{out} already holds a quantized model", "pass --overwrite to replace it, or another folder")
    settings = {(m.bits, m.group_size) for m in layers.values()}
    if len(settings) > 1:
        raise QftError(f"the layers mix quantization settings {sorted(settings)}", "quantize all with one setting")
    (bits, group_size), = settings
    tensors, aliases = _tensors_and_aliases(model)
    float_dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    record = {
        **PeqaConfig(bits=bits, group_size=group_size).quant_record(),
        "format_version": FORMAT_VERSION, "weights_file": WEIGHTS_FILE, "dtype": str(float_dtype).removeprefix("torch."),
        "base_model": base_model or getattr(model.config, "_name_or_path", "") or None,
        "layers": {n: {"in_features": m.in_features, "out_features": m.out_features, "bias": m.bias is not None}
                   for n, m in sorted(layers.items())},
        "aliases": aliases,
    }
    staging = staging_dir(out)
    try:
        model.config.save_pretrained(staging)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        write_bytes_atomic(staging / WEIGHTS_FILE, save(tensors, metadata={"format": "pt", "qft": QUANT_METHOD}))
        write_json_atomic(staging / QUANT_FILE, record)
    except BaseException:
        import shutil

        shutil.rmtree(staging, ignore_errors=True)
        raise
    publish_dir_atomic(staging, out)
    return record


def is_quantized_folder(path) -> bool:
    from qft.models import read_quant_record

    p = Path(path)
    if not p.is_dir():
        return False
    record = read_quant_record(p)
    return bool(record) and record.get("method") == QUANT_METHOD and (p / WEIGHTS_FILE).exists()


def _assign(model: nn.Module, name: str, value: torch.Tensor) -> None:
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name)
    if attr in module._parameters:
        module._parameters[attr] = value if isinstance(value, nn.Parameter) else nn.Parameter(
            value, requires_grad=value.is_floating_point())
    elif attr in module._buffers:
        module._buffers[attr] = value
    else:
        raise QftError(f"the quantized model has a tensor {name} that its architecture lacks",
                       "re-create the folder with `qft quantize` using this qft version")


def load_quantized(path, expect: tuple[int, int] | None = None, device=None) -> nn.Module:
    """Load a folder written by :func:`save_quantized`. ``expect=(bits, group_size)`` refuses other settings."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    from qft.models import read_quant_record

    path = Path(path)
    if not is_quantized_folder(path):
        raise QftError(f"{path} is not a PEQA quantized model folder (no {WEIGHTS_FILE} with its record)",
                       "create one with `qft quantize MODEL OUT`")
    record = read_quant_record(path)
    if record.get("format_version") != FORMAT_VERSION:
        raise QftError(f"{path} has quantized-model format {record.get('format_version')}, this qft reads "
                       f"{FORMAT_VERSION}", "re-create it with `qft quantize`")
    bits, group_size = record["bits"], record["group_size"]
    if expect is not None and tuple(expect) != (bits, group_size):
        raise QftError(f"{path} is quantized to {bits} bits in groups of {group_size}, but {expect[0]} bits in "
                       f"groups of {expect[1]} were asked for",
                       f"pass --bits {bits} --group-size {group_size}, or quantize the model again")
    config = AutoConfig.from_pretrained(path)
    dtype = getattr(torch, record["dtype"])
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        for name, spec in record["layers"].items():
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child,
                    IntLinear(spec["in_features"], spec["out_features"], bits, group_size, spec["bias"], dtype=dtype))
    tensors = load_file(path / WEIGHTS_FILE, device="cpu")
    for name, t in tensors.items():
        _assign(model, name, t)
    for alias, original in record["aliases"].items():
        module_name, _, attr = original.rpartition(".")
        owner = model.get_submodule(module_name)
        _assign(model, alias, owner._parameters.get(attr, owner._buffers.get(attr)))
    missing = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t is not None and t.is_meta]
    if missing:
        raise QftError(f"{path} lacks tensors {missing[:3]}", "re-create the folder with `qft quantize`")
    model.config._name_or_path = str(path)
    if device is None and torch.cuda.is_available():
        device = torch.cuda.current_device()
    return model.to(device).eval() if device is not None else model.eval()


def quantize_to_folder(model_id: str, out, bits: int, group_size: int, target_modules="all-linear",
                       dtype: str = "auto", overwrite: bool = False, log=print) -> dict:
    """``qft quantize``: load a float model, RTN-quantize its linear layers, save a quantized model folder."""
    from transformers import AutoConfig

    from qft.models import load_base, load_tokenizer, resolve_model

    PeqaConfig(bits=bits, group_size=group_size)  # refuse bad settings before any slow work
    out = Path(out)
    if (out / WEIGHTS_FILE).exists() and not overwrite:
        raise QftError(f"{out} already holds a quantized model", "pass --overwrite to replace it, or another folder")
    model_id = resolve_model(model_id, log)
    if dtype == "auto":
        torch_dtype = getattr(AutoConfig.from_pretrained(model_id), "dtype", None) or torch.float32
        torch_dtype = getattr(torch, torch_dtype) if isinstance(torch_dtype, str) else torch_dtype
    elif dtype in ("float32", "bfloat16", "float16"):
        torch_dtype = getattr(torch, dtype)
    else:
        raise QftError(f"unknown dtype {dtype!r}", "pass --dtype auto, float32, bfloat16 or float16")
    model = load_base(model_id, None, dtype=torch_dtype)
    try:
        tokenizer = load_tokenizer(model_id)
    except QftError:
        tokenizer = None  # a model without a tokenizer still quantizes; the folder then has none
    names = quantize_model(model, bits, group_size, target_modules)
    log(f"quantized {len(names)} linear layers to {bits} bits (group size {group_size or 'per channel'})")
    return save_quantized(model, out, tokenizer=tokenizer, base_model=model_id, overwrite=overwrite)


def folder_size(path) -> int:
    return sum(p.stat().st_size for p in Path(path).iterdir() if p.is_file())


__all__ = ["quantize_model", "save_quantized", "load_quantized", "is_quantized_folder", "quantize_to_folder",
           "folder_size", "WEIGHTS_FILE"]
