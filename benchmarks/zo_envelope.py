"""Sparse-MeZO against all-weight MeZO at each step, over every SST-2 curve of every session (issue 6's "Sparse-MeZO
>= MeZO + 2 at the same step count", read against the best run of each at that step, whatever its rate, schedule
or directions). MeZO over an adapter (LoRA) is left out: it tunes other weights.

``--schedule N`` keeps only runs of one shared N-step schedule (``max_steps`` N): each method's best rate among them
at each step, the comparison at the same step count and the same schedule (session 12's 2,000-step study).

``--mean-over-seeds`` first averages the runs of one setting (the same options but their seed; a run that names no
seed ran with the Trainer's default, 42) at each step, then takes each method's best setting by that mean, among the
settings run with ``--min-seeds`` seeds or more (default 2): the best of single runs picks the luckiest seed
(session 13: seed 42's +2.9 at 2,000 steps was +0.6 over four seeds). A run that several files hold (one session's
run finished in a later one) counts once, as its longest curve.

    python benchmarks/zo_envelope.py [--margin 2] [--schedule N] [--mean-over-seeds] [FILES...]
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


# options that name where a run wrote or read, not what it did: left out of a setting's identity
NOT_SETTING = ("seed", "output", "data", "model", "overwrite", "logging_steps", "save_steps")
DEFAULT_SEED = 42  # qft.train.TrainConfig.seed


def runs(files, schedule: int | None = None):
    """(kind, 'file: entry', options, curve) of every MeZO / Sparse-MeZO run with a curve (of one ``schedule``)."""
    for f in files:
        for name, entry in json.loads(Path(f).read_text())["methods"].items():
            k = kind(name, entry, schedule) if isinstance(entry, dict) else None
            if k:
                yield k, f"{Path(f).name}: {name}", entry.get("options") or {}, entry["curve"]


def seed_means(found, min_seeds: int = 2) -> list:
    """:func:`runs`' runs grouped by setting (their options less :data:`NOT_SETTING`), each as one run whose curve
    is the mean over its seeds at each step (steps that every seed reached) and whose name says which seeds;
    settings with fewer than ``min_seeds`` seeds are left out (one lucky seed would win again). One seed's run held
    by several files (a run continued in a later session) counts once: its longest curve."""
    groups: dict = {}
    for k, name, options, curve in found:
        key = (k, json.dumps({o: v for o, v in options.items() if o not in NOT_SETTING}, sort_keys=True))
        seed, curve = options.get("seed", DEFAULT_SEED), {int(s): float(a) for s, a in curve}
        by_seed = groups.setdefault(key, {})  # {seed: (name, {step: accuracy})}
        if seed not in by_seed or len(curve) > len(by_seed[seed][1]):
            by_seed[seed] = (name, curve)
    out = []
    for (k, _), by_seed in groups.items():
        if len(by_seed) < min_seeds:
            continue
        curves = [c for _, c in by_seed.values()]
        steps = sorted(set.intersection(*map(set, curves)))
        mean = [(s, round(sum(c[s] for c in curves) / len(curves), 2)) for s in steps]
        first = next(iter(by_seed.values()))[0]
        out.append((k, f"mean of seeds {', '.join(map(str, sorted(by_seed)))}: {first}", {}, mean))
    return out


def envelopes(files, schedule: int | None = None, min_seeds: int = 0) -> dict[str, dict[int, tuple[float, str]]]:
    """{'sparse' | 'mezo': {step: (best accuracy, 'file: entry')}}, over the runs of one ``schedule`` if given; with
    ``min_seeds``, over the mean of seeds of each setting run with that many seeds or more (:func:`seed_means`)."""
    best: dict[str, dict[int, tuple[float, str]]] = {"sparse": {}, "mezo": {}}
    found = list(runs(files, schedule))
    for k, name, _, curve in seed_means(found, min_seeds) if min_seeds else found:
        for step, acc in curve:
            if acc > best[k].get(int(step), (-1.0, ""))[0]:
                best[k][int(step)] = (float(acc), name)
    return best


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("files", nargs="*", default=sorted(str(p) for p in RESULTS.glob("sst2-zo-curves*.json")))
    ap.add_argument("--margin", type=float, default=2.0)
    ap.add_argument("--max-step", type=int, default=8000)
    ap.add_argument("--schedule", type=int, default=None, help="only runs of this many steps' schedule")
    ap.add_argument("--mean-over-seeds", action="store_true", help="compare settings by their mean over seeds")
    ap.add_argument("--min-seeds", type=int, default=2, help="with --mean-over-seeds: settings run with this many "
                    "seeds or more")
    a = ap.parse_args(argv)
    if a.mean_over_seeds and a.min_seeds < 1:
        ap.exit(2, f"zo_envelope: --min-seeds {a.min_seeds} is under 1 (a mean needs a run); fix: pass --min-seeds 1 "
                "or more\n")
    best = envelopes(a.files, a.schedule, a.min_seeds if a.mean_over_seeds else 0)
    if not best["sparse"] or not best["mezo"]:
        which, fix = ((f" of a {a.schedule}-step schedule", "pass --schedule with a max_steps the runs share, or leave "
                       "it out") if a.schedule else ("", "pass curves files that hold both methods' runs"))
        if a.mean_over_seeds:
            which, fix = f"{which} run with {a.min_seeds} seeds or more", f"{fix}, or lower --min-seeds"
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
