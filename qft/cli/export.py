"""Write a standalone model folder: merged, float, safetensors, tokenizer included. It loads with
``AutoModelForCausalLM.from_pretrained`` without qft.

Example:

  qft export qft-out standalone --dtype bfloat16
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from qft.cli.common import console, help_of, resolve_config, user_errors
from qft.merge import ExportConfig

H = help_of(ExportConfig)


@user_errors
def export_command(
    source: Optional[str] = typer.Argument(None, help=H("source")),
    output: Optional[str] = typer.Argument(None, help=H("output")),
    base: Optional[str] = typer.Option(None, "--base", help=H("base")),
    dtype: Optional[str] = typer.Option(None, "--dtype", help=H("dtype")),
    overwrite: Optional[bool] = typer.Option(None, "--overwrite", help=H("overwrite")),
    config: Optional[Path] = typer.Option(None, "--config", help="YAML file of options; flags override it."),
) -> None:
    from qft.merge import export_model

    cfg = resolve_config(ExportConfig, config, locals())
    out = export_model(cfg.source, cfg.output, base=cfg.base, dtype=cfg.dtype, overwrite=cfg.overwrite,
                       log=lambda m: console.print(m, highlight=False))
    console.print(f"saved a standalone {cfg.dtype} model to [bold]{out}[/]\nload it with:\n"
                  f"  AutoModelForCausalLM.from_pretrained({str(out)!r})", highlight=False)
