"""The catalog of qft's methods: what each is, where it comes from, and whether it works in this version."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MethodInfo:
    name: str
    summary: str
    paper: str
    working: bool
    note: str = ""

    @property
    def module(self) -> str:
        return "qft.adapters." + self.name.replace("-", "_")


def plan_for(cfg):
    """The MethodPlan of ``cfg.method`` (imports, and so registers, the method's package)."""
    import importlib

    return importlib.import_module(BY_NAME[cfg.method].module).plan(cfg)


METHODS = (
    MethodInfo("qlora", "LoRA on all linear layers over a 4-bit NF4 base (double quant, paged 8-bit AdamW on GPU)",
               "Dettmers et al., 2023, arXiv:2305.14314", True, "saves a standard peft LoRA adapter"),
    MethodInfo("peqa", "quantize the base to 2/3/4-bit integers and train only the quantization scales",
               "Kim et al., 2023, arXiv:2305.14152", True,
               "RTN 2/3/4-bit integer base (or `qft quantize` folder); the adapter is the scales"),
    MethodInfo("qst", "frozen 4-bit LLM + small side network fed by its hidden states; no backprop through the LLM",
               "Zhang et al., 2024, arXiv:2401.07159", True,
               "saves only the side network; no KV cache in generate; SST-2 83.9 at best, under the 86 goal"),
    MethodInfo("spiel", "sparse weight deltas with periodic drop and regrow, over float or NF4 bases",
               "Ansell et al., 2024, arXiv:2401.16405", True,
               "float or NF4 base (--quantize-base); SST-2 87.8 on the H200, 90.1 on the CPU (LoRA r8's count)"),
    MethodInfo("mezo", "zeroth-order SGD from forward passes only, at inference memory",
               "Malladi et al., 2023, arXiv:2305.17333", True,
               "all weights in float32, or an adapter: --zo-adapter lora|qlora|peqa|spiel; "
               "SST-2 85.1 over LoRA (5,000 steps); all weights 84.4 at best; "
               "8B-shape step 1.12-1.13x two forwards (--zo-paired, rank1)"),
    MethodInfo("sparse-mezo", "MeZO restricted to small-magnitude weights chosen per layer",
               "Liu et al., 2024, arXiv:2402.15751", True,
               "a PEFT method; saves a sparse adapter; SST-2 85.4 at best, 84.9 at 8,000 steps (density 0.1); "
               "+3.2 over MeZO at 2,000 steps, mean of four seeds (density 0.2)"),
)

BY_NAME = {m.name: m for m in METHODS}
