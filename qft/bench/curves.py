"""Compare two accuracy-versus-steps curves at the steps both recorded (issue 6: "Sparse-MeZO >= MeZO + 2 at the
same step count").

    python -m qft.bench.curves benchmarks/results/sst2-zo-curves-session11.json:"3,000-step schedule (stopped" \\
        benchmarks/results/sst2-zo-curves-session11.json:"(all weights), 3,000-step" --margin 2

A curve is FILE (a results JSON holding one curve) or FILE:TEXT, the entry of ``methods`` named TEXT, or else the
one whose name contains TEXT. Prints each common step's two accuracies and their difference, then how many reach
the margin.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from qft.errors import QftError


def load_curve(spec: str) -> tuple[str, list[tuple[int, float]]]:
    """(entry name, [(step, accuracy %)]) for FILE or FILE:TEXT (see the module's docstring)."""
    path, _, text = spec.partition(":") if not Path(spec).exists() else (spec, "", "")
    if not Path(path).is_file():
        raise QftError(f"no results file {path!r}", "pass FILE or FILE:TEXT, FILE a results JSON")
    try:
        methods = json.loads(Path(path).read_text())["methods"]
    except (ValueError, KeyError, TypeError):
        raise QftError(f"{path} is not a results JSON with a 'methods' entry",
                       "pass a file written by qft.bench.sst2 (or a curves file)") from None
    names = [k for k, v in methods.items() if isinstance(v, dict) and v.get("curve") and text in k]
    names = [text] if text in names else names  # a whole name picks its entry, even inside a longer one
    if len(names) != 1:
        what = "no entry" if not names else f"{len(names)} entries ({'; '.join(names)})"
        raise QftError(f"{what} with a curve in {path} match {text!r}",
                       "pass FILE:TEXT with TEXT a piece of one entry's name")
    return names[0], [(int(s), float(a)) for s, a in methods[names[0]]["curve"]]


def compare(a: list[tuple[int, float]], b: list[tuple[int, float]]) -> list[tuple[int, float, float, float]]:
    """(step, a's accuracy, b's, a − b) at each step both curves recorded, in step order."""
    bs = dict(b)
    return [(s, x, bs[s], round(x - bs[s], 2)) for s, x in sorted(a) if s in bs]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("a", help="FILE or FILE:TEXT: the curve measured (e.g. Sparse-MeZO)")
    ap.add_argument("b", help="FILE or FILE:TEXT: the curve it is measured against (e.g. MeZO)")
    ap.add_argument("--margin", type=float, default=2.0, help="points a must lead b by")
    args = ap.parse_args(argv)
    import typer

    from qft.cli.common import user_errors

    try:
        user_errors(_report)(args.a, args.b, args.margin)
    except typer.Exit as exc:
        raise SystemExit(exc.exit_code) from None


def _report(a_spec: str, b_spec: str, margin: float) -> list[tuple[int, float, float, float]]:
    (a_name, a), (b_name, b) = load_curve(a_spec), load_curve(b_spec)
    rows = compare(a, b)
    if not rows:
        raise QftError("the two curves share no step", "compare curves recorded at the same steps (--curve-every)")
    print(f"a: {a_name}\nb: {b_name}")
    for s, x, y, d in rows:
        print(f"{s:>7,}  {x:6.2f}  {y:6.2f}  {d:+6.2f}{'  *' if d >= margin else ''}")
    hits = sum(d >= margin for *_, d in rows)
    last = rows[-1]
    print(f"a >= b + {margin:g} at {hits} of {len(rows)} common steps; at the last, step {last[0]:,}: {last[3]:+.2f}")
    return rows


if __name__ == "__main__":
    main()
