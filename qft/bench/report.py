"""Render a benchmark result as a table."""

from __future__ import annotations

from rich.table import Table


def render(result: dict, console) -> None:
    table = Table(title=f"{result['suite']} @ {result['shape']}, batch {result['batch']} x {result['seq']}, "
                        f"checkpointing {'on' if result['gradient_checkpointing'] else 'off'}")
    for col in ("path", "peak GiB", "tokens/s", "note"):
        table.add_column(col)
    for path, row in result["results"].items():
        if "optimizers" in row:  # the optimizer-state suite: one row per optimizer
            for name, r in row["optimizers"].items():
                table.add_row(name, f"{r.get('step_peak_gib', float('nan')):.2f}", "-",
                              r.get("error") or f"state {r['state_gib']:.3f} GiB, {r['bytes_per_param']:.2f} B/param")
            continue
        if "error" in row:
            table.add_row(path, "-", "-", "[red]failed[/]")
        else:
            table.add_row(path, f"{row['peak_gib']:.2f}", f"{row['tokens_per_s']:.0f}", result["paths"][path])
    console.print(table)
    for name, r in result["ratios"].items():
        console.print(f"{name}: memory {r['memory']:.3f}x, speed {r['speed']:.3f}x", highlight=False)
