"""Weight bytes of a Llama-3-8B-shaped model: PEQA's packed 2/3/4-bit integers against bitsandbytes NF4.

Measured, not computed: one random layer of each distinct linear shape is really quantized by each format
(qft's IntLinear: packed integers + uint8 zero points + fp16/bf16 scales; bitsandbytes' quantize_4bit with
double quantization), its stored bytes counted, and multiplied by the layer count. Embeddings, norms and the
LM head stay bf16 in both (neither format quantizes them). Byte counts do not depend on the machine.

    python benchmarks/model_bytes.py --out benchmarks/results/model-bytes-llama3-8b.json
"""

from __future__ import annotations

import argparse
import json

import torch

from qft.bench.shapes import SHAPES, environment


def linear_shapes(cfg: dict) -> list[tuple[int, int]]:
    h, i = cfg["hidden_size"], cfg["intermediate_size"]
    kv = h // cfg["num_attention_heads"] * cfg["num_key_value_heads"]
    return [(h, h), (kv, h), (kv, h), (h, h), (i, h), (i, h), (h, i)]  # (out, in): q k v o gate up down


def stored_bytes(module: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in list(module.parameters()) + list(module.buffers()))


def peqa_layer_bytes(out_f: int, in_f: int, bits: int, group_size: int) -> int:
    from qft.adapters.peqa.layer import IntLinear

    lin = torch.nn.Linear(in_f, out_f, bias=False, dtype=torch.bfloat16)
    return stored_bytes(IntLinear.from_linear(lin, bits, group_size))


def nf4_layer_bytes(out_f: int, in_f: int) -> int:
    import bitsandbytes as bnb

    w = torch.randn(out_f, in_f, dtype=torch.bfloat16)
    packed, state = bnb.functional.quantize_4bit(w, quant_type="nf4", compress_statistics=True)
    total = packed.numel() * packed.element_size() + state.absmax.numel() * state.absmax.element_size()
    s2 = state.state2
    return total + s2.absmax.numel() * s2.absmax.element_size() + s2.code.numel() * s2.code.element_size()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="llama3-8b")
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--out")
    a = ap.parse_args()
    cfg = SHAPES[a.shape]
    layers = cfg["num_hidden_layers"]
    shapes = linear_shapes(cfg)
    h, v = cfg["hidden_size"], cfg["vocab_size"]
    float_rest = 2 * (2 * v * h + (2 * layers + 1) * h)  # embeddings + LM head + norms in bf16
    linear_params = layers * sum(o * i for o, i in shapes)
    formats = {"bf16": layers * sum(2 * o * i for o, i in shapes),
               "nf4-double-quant": layers * sum(nf4_layer_bytes(o, i) for o, i in shapes)}
    for bits in (4, 3, 2):
        formats[f"peqa-int{bits}-g{a.group_size}"] = layers * sum(peqa_layer_bytes(o, i, bits, a.group_size)
                                                                  for o, i in shapes)
    rows = {name: {"linear_bytes": b, "bits_per_linear_weight": round(8 * b / linear_params, 3),
                   "model_gib": round((b + float_rest) / 2**30, 3),
                   "vs_nf4": round((b + float_rest) / (formats["nf4-double-quant"] + float_rest), 3)}
            for name, b in formats.items()}
    result = {"shape": a.shape, "group_size": a.group_size, "linear_params": linear_params,
              "float_rest_bytes": float_rest, "formats": rows, "environment": environment()}
    print(json.dumps(rows, indent=1))
    if a.out:
        from qft.io import write_json_atomic

        write_json_atomic(a.out, result)


if __name__ == "__main__":
    main()
