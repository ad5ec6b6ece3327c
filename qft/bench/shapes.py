"""Model shapes for benchmarks, random-weight checkpoints of those shapes, and the environment record."""

from __future__ import annotations

import os
import platform
import tempfile
from pathlib import Path

import torch

SHAPES = {
    # Llama-3-8B (Meta, 2024): config.json of meta-llama/Meta-Llama-3-8B
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0),
    # TinyLlama-1.1B (Zhang et al., 2024): config.json of TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T
    "tinyllama-1.1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                           num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048),
    # SmolLM2-135M (Allal et al., 2025): config.json of HuggingFaceTB/SmolLM2-135M-Instruct (its word embeddings are
    # tied to the head; make_random_checkpoint unties them)
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, max_position_embeddings=8192, rope_theta=100000.0),
    # a small Llama for ratio measurements on a CPU (absolute times there mean little)
    "cpu-small": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=6, num_attention_heads=16,
                      num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048),
    # for CPU smoke tests of the harness itself
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=256, max_position_embeddings=512),
}


def make_random_checkpoint(shape: str, folder: Path, log=print) -> Path:
    """Save a random-weight Llama of ``shape`` (bf16 on GPU, fp32 on CPU) once; later calls reuse it."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if (folder / "config.json").exists():
        return folder
    log(f"building a random-weight {shape} checkpoint in {folder} (once)")
    cfg = LlamaConfig(**SHAPES[shape], tie_word_embeddings=False)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(dtype)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}-"))
    model.save_pretrained(staging)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    os.replace(staging, folder)
    return folder


def environment() -> dict:
    import importlib.metadata as md

    env = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda}
    for pkg in ("transformers", "peft", "trl", "bitsandbytes", "accelerate", "qft-toolkit"):
        try:
            env[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            env[pkg] = None
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(0)
        env["gpu_count"] = torch.cuda.device_count()
    else:
        env["gpu"] = None
        env["cpu"] = platform.processor() or platform.machine()
        env["cpu_count"] = os.cpu_count()
    return env
