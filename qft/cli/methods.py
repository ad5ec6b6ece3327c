"""List qft's methods, one line each, and whether each works in this version."""

from __future__ import annotations

from rich.table import Table

from qft.cli.common import console
from qft.methods import METHODS


def methods_command() -> None:
    table = Table(title="qft methods", show_lines=False)
    for col in ("method", "status", "what it does", "paper"):
        table.add_column(col, overflow="fold")
    for m in METHODS:
        status = "[green]working[/]" if m.working else f"[yellow]{m.note}[/]"
        table.add_row(m.name, status, m.summary, m.paper)
    console.print(table)
