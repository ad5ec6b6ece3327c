"""Benchmark qft against the stock stack, side by side in one run (peak memory, tokens/s, ratios).

Run it on a GPU: `qft bench qlora --shape llama3-8b --out benchmarks/results/qlora-8b.json`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from qft.cli.common import console, user_errors, with_yaml_defaults


@user_errors
def bench_command(
    ctx: typer.Context,
    suite: str = typer.Argument("qlora", help=(
        "What to benchmark: qlora, peqa, qst (vs stock peft/TRL QLoRA), spiel (vs LoRA of the same parameter "
        "count), mezo (vs inference and MeZO's loop) or optim (optimizer state).")),
    shape: str = typer.Option("tinyllama-1.1b", "--shape", help="Model shape: llama3-8b, tinyllama-1.1b, smollm2-135m, cpu-small or tiny."),
    batch: int = typer.Option(4, "--batch", help="Sequences per step."),
    seq: int = typer.Option(512, "--seq", help="Tokens per sequence."),
    steps: int = typer.Option(10, "--steps", help="Timed steps (after warm-up steps)."),
    warmup: int = typer.Option(3, "--warmup", help="Untimed warm-up steps."),
    rank: int = typer.Option(16, "--lora-r", help="LoRA rank (spiel: its entries match this rank's count)."),
    reselect_every: int = typer.Option(20, "--reselect-every", help="spiel: steps between drop-and-regrow."),
    gradient_checkpointing: bool = typer.Option(False, "--gradient-checkpointing", help="Checkpoint on both paths."),
    paths: Optional[str] = typer.Option(None, "--paths", help="Run only these paths of the suite (comma-separated)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Write the JSON results here."),
    config: Optional[Path] = typer.Option(None, "--config", help="YAML file of these options; flags override it."),
) -> None:
    from qft.bench import run_suite

    o = with_yaml_defaults(ctx, config, locals())
    result = run_suite(o["suite"], shape=o["shape"], batch=o["batch"], seq=o["seq"], steps=o["steps"],
                       warmup=o["warmup"], rank=o["rank"], reselect_every=o["reselect_every"],
                       paths=o["paths"].split(",") if o["paths"] else None, gradient_checkpointing=o["gradient_checkpointing"],
                       out=Path(o["out"]) if o["out"] else None, log=lambda m: console.print(m, highlight=False))
    from qft.bench.report import render

    render(result, console)
