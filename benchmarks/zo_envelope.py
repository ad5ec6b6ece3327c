"""Sparse-MeZO against all-weight MeZO at each step, over every SST-2 curve of every session (issue 6's "Sparse-MeZO
>= MeZO + 2 at the same step count", read against the best run of each at that step, whatever its rate, schedule
or directions). MeZO over an adapter (LoRA) is left out: it tunes other weights.

    python benchmarks/zo_envelope.py [--margin 2] [FILES...]   (default: benchmarks/results/sst2-zo-curves*.json)
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from qft.bench.curves import compare

RESULTS = Path(__file__).resolve().parent / "results"


def kind(name: str, entry: dict) -> str | None:
    """'sparse', 'mezo' (all weights) or None (an adapter's MeZO, or no curve)."""
    options = entry.get("options") or {}
    if not entry.get("curve") or "lora" in name.lower() or options.get("zo_adapter"):
        return None
    return "sparse" if "sparse" in name.lower() or options.get("method") == "sparse-mezo" else "mezo"


def envelopes(files) -> dict[str, dict[int, tuple[float, str]]]:
    """{'sparse' | 'mezo': {step: (best accuracy, 'file: entry')}}."""
    best: dict[str, dict[int, tuple[float, str]]] = {"sparse": {}, "mezo": {}}
    for f in files:
        for name, entry in json.loads(Path(f).read_text())["methods"].items():
            k = kind(name, entry) if isinstance(entry, dict) else None
            for step, acc in entry["curve"] if k else ():
                if acc > best[k].get(int(step), (-1.0, ""))[0]:
                    best[k][int(step)] = (float(acc), f"{Path(f).name}: {name}")
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("files", nargs="*", default=sorted(str(p) for p in RESULTS.glob("sst2-zo-curves*.json")))
    ap.add_argument("--margin", type=float, default=2.0)
    ap.add_argument("--max-step", type=int, default=8000)
    a = ap.parse_args()
    best = envelopes(a.files)
    as_curve = {k: [(s, acc) for s, (acc, _) in v.items() if s <= a.max_step] for k, v in best.items()}
    rows = compare(as_curve["sparse"], as_curve["mezo"])
    for s, x, y, d in rows:
        print(f"{s:>7,}  sparse {x:6.2f}  mezo {y:6.2f}  {d:+6.2f}{'  *' if d >= a.margin else ''}   "
              f"({best['sparse'][s][1]} | {best['mezo'][s][1]})")
    hits = sum(d >= a.margin for *_, d in rows)
    print(f"sparse >= mezo + {a.margin:g} at {hits} of {len(rows)} common steps")


if __name__ == "__main__":
    main()
