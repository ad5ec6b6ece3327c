"""Merge a qft adapter into its base and save the result. A float base merges exactly; an NF4 base is
dequantized, merged and requantized, and the requantization error is reported; PEQA saves its integer model.

Example:

  qft merge qft-out merged
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from qft.cli.common import console, help_of, resolve_config, user_errors
from qft.merge import MergeConfig

H = help_of(MergeConfig)


@user_errors
def merge_command(
    adapter: Optional[str] = typer.Argument(None, help=H("adapter")),
    output: Optional[str] = typer.Argument(None, help=H("output")),
    base: Optional[str] = typer.Option(None, "--base", help=H("base")),
    overwrite: Optional[bool] = typer.Option(None, "--overwrite", help=H("overwrite")),
    config: Optional[Path] = typer.Option(None, "--config", help="YAML file of options; flags override it."),
) -> None:
    from qft.merge import merge_adapter

    cfg = resolve_config(MergeConfig, config, locals())
    report = merge_adapter(cfg.adapter, cfg.output, base=cfg.base, overwrite=cfg.overwrite,
                           log=lambda m: console.print(m, highlight=False))
    what = {"float": "float model (exact merge)", "nf4": "NF4 model (requantized)",
            "peqa": "PEQA integer model (merged scales)"}[report.kind]
    console.print(f"merged {report.layers} layers; saved a {what} to [bold]{report.output}[/]", highlight=False)
    if report.kind == "nf4":
        console.print(f"requantization error (relative, per weight): mean {report.mean_rel_error:.4g}, "
                      f"max {report.max_rel_error:.4g}; `qft export` writes the exact float merge", highlight=False)
