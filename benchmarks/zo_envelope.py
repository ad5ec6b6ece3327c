"""Sparse-MeZO against all-weight MeZO at each step, over every SST-2 curve of every session (issue 6's "Sparse-MeZO
>= MeZO + 2 at the same step count", read against the best run of each at that step, whatever its rate, schedule
or directions). MeZO over an adapter (LoRA) is left out: it tunes other weights.

``--schedule N`` keeps only runs of one shared N-step schedule (``max_steps`` N): each method's best rate among them
at each step, the comparison at the same step count and the same schedule (session 12's 2,000-step study).

    python benchmarks/zo_envelope.py [--margin 2] [--schedule N] [FILES...]
    (default FILES: benchmarks/results/sst2-zo-curves*.json)
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from qft.bench.curves import compare

RESULTS = Path(__file__).resolve().parent / "results"


def kind(name: str, entry: dict, schedule: int | None = None) -> str | None:
    """'sparse', 'mezo' (all weights) or None (an adapter's MeZO, no curve, or not of the ``schedule``-step
    schedule when one is given)."""
    options = entry.get("options") or {}
    if not entry.get("curve") or "lora" in name.lower() or options.get("zo_adapter"):
        return None
    if schedule is not None and options.get("max_steps") != schedule:
        return None
    return "sparse" if "sparse" in name.lower() or options.get("method") == "sparse-mezo" else "mezo"


def envelopes(files, schedule: int | None = None) -> dict[str, dict[int, tuple[float, str]]]:
    """{'sparse' | 'mezo': {step: (best accuracy, 'file: entry')}}, over the runs of one ``schedule`` if given."""
    best: dict[str, dict[int, tuple[float, str]]] = {"sparse": {}, "mezo": {}}
    for f in files:
        for name, entry in json.loads(Path(f).read_text())["methods"].items():
            k = kind(name, entry, schedule) if isinstance(entry, dict) else None
            for step, acc in entry["curve"] if k else ():
                if acc > best[k].get(int(step), (-1.0, ""))[0]:
                    best[k][int(step)] = (float(acc), f"{Path(f).name}: {name}")
    return best


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("files", nargs="*", default=sorted(str(p) for p in RESULTS.glob("sst2-zo-curves*.json")))
    ap.add_argument("--margin", type=float, default=2.0)
    ap.add_argument("--max-step", type=int, default=8000)
    ap.add_argument("--schedule", type=int, default=None, help="only runs of this many steps' schedule")
    a = ap.parse_args(argv)
    best = envelopes(a.files, a.schedule)
    if not best["sparse"] or not best["mezo"]:
        which, fix = ((f" of a {a.schedule}-step schedule", "pass --schedule with a max_steps the runs share, or leave "
                       "it out") if a.schedule else ("", "pass curves files that hold both methods' runs"))
        ap.exit(1, f"zo_envelope: no Sparse-MeZO and MeZO curves{which} in the files; fix: {fix}\n")
    as_curve = {k: [(s, acc) for s, (acc, _) in v.items() if s <= a.max_step] for k, v in best.items()}
    rows = compare(as_curve["sparse"], as_curve["mezo"])
    for s, x, y, d in rows:
        print(f"{s:>7,}  sparse {x:6.2f}  mezo {y:6.2f}  {d:+6.2f}{'  *' if d >= a.margin else ''}   "
              f"({best['sparse'][s][1]} | {best['mezo'][s][1]})")
    hits = sum(d >= a.margin for *_, d in rows)
    print(f"sparse >= mezo + {a.margin:g} at {hits} of {len(rows)} common steps")


if __name__ == "__main__":
    main()
