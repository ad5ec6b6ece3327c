"""Evaluate a base model, an adapter folder or a merged model: label-word classification, generation exact
match (GSM8K's answer after ####) or perplexity on plain text. Prints a table; --output writes JSON.

Examples:

  qft eval qft-out                                   # the adapter on qft's generated sentiment task

  qft eval merged --task generate --data gsm8k_test.jsonl --limit 100

  qft eval SmolLM2 --task perplexity --data input.txt
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from qft.cli.common import console, help_of, resolve_config, user_errors
from qft.evaluate import EvalConfig


H = help_of(EvalConfig)


def results_table(result: dict, title: str) -> Table:
    table = Table(title=title, show_header=True, header_style="bold")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in result.items():
        if isinstance(value, (list, dict)):
            continue
        table.add_row(key, f"{value:.4f}" if isinstance(value, float) else str(value))
    return table


@user_errors
def eval_command(
    model: Optional[str] = typer.Argument(None, help=H("model")),
    task: Optional[str] = typer.Option(None, "--task", help=H("task")),
    data: Optional[str] = typer.Option(None, "--data", help=H("data")),
    template: Optional[str] = typer.Option(None, "--template", help=H("template")),
    label_words: Optional[str] = typer.Option(None, "--label-words", help=H("label_words")),
    label_field: Optional[str] = typer.Option(None, "--label-field", help=H("label_field")),
    answer_field: Optional[str] = typer.Option(None, "--answer-field", help=H("answer_field")),
    text_field: Optional[str] = typer.Option(None, "--text-field", help=H("text_field")),
    base: Optional[str] = typer.Option(None, "--base", help=H("base")),
    limit: Optional[int] = typer.Option(None, "--limit", help=H("limit")),
    max_new_tokens: Optional[int] = typer.Option(None, "--max-new-tokens", help=H("max_new_tokens")),
    max_length: Optional[int] = typer.Option(None, "--max-length", help=H("max_length")),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help=H("batch_size")),
    output: Optional[str] = typer.Option(None, "--output", "-o", help=H("output")),
    config: Optional[Path] = typer.Option(None, "--config", help="YAML file of options; flags override it."),
) -> None:
    from qft.evaluate import run_eval

    cfg = resolve_config(EvalConfig, config, locals())
    result = run_eval(cfg, log=lambda m: console.print(m, highlight=False))
    console.print(results_table(result, f"qft eval: {cfg.task} on {result['data']}"))
    if cfg.output:
        console.print(f"results written to [bold]{cfg.output}[/]", highlight=False)
