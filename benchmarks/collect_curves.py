"""One session's SST-2 ZO curves file from its runs' results (each run's JSON as benchmarks/sst2_gpu_runs.sh leaves
it in an extracted sst2-runs.tgz), and its PNG: what sessions 12 and 13 built by hand.

Each run becomes a method labelled by what it did ("Sparse-MeZO lr 8e-5 rank1 paired density 0.2, 2,000-step
schedule, seed 1"), with its last step, final accuracy, options and curve. A run found in several folders (continued
in a later call) counts once, as its longest curve. The environment is the runs' own (they must agree).

    python benchmarks/collect_curves.py --out benchmarks/results/sst2-zo-curves-session14.json \
        --note "Session 14: ..." benchmarks/results/session14/sst2/call3 benchmarks/results/session14/sst2/call8
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

NAMES = {"mezo": "MeZO", "sparse-mezo": "Sparse-MeZO"}


def rate(x: float) -> str:
    """3e-05 as "3e-5", 1.4e-05 as "1.4e-5"."""
    return f"{x:.1e}".replace(".0e", "e").replace("e-0", "e-")


def label(method: str, options: dict) -> str:
    """What the run did, in the curves files' words."""
    parts = [NAMES.get(method, method), f"lr {rate(options['learning_rate'])}"]
    if options.get("zo_distribution", "gaussian") != "gaussian":
        parts.append(options["zo_distribution"])
    if options.get("zo_paired"):
        parts.append("paired")
    if options.get("zo_defer", 1) != 1:
        parts.append(f"defer {options['zo_defer']}")
    if method == "sparse-mezo":
        parts.append(f"density {options.get('density')}")
    elif options.get("zo_adapter"):
        parts.append(f"(over {options['zo_adapter']})")
    else:
        parts[-1] += " (all weights)"
    text = " ".join(parts)
    if options.get("max_steps"):
        text += f", {options['max_steps']:,}-step schedule"
    return text + (f", seed {options['seed']}" if "seed" in options else "")


def collect(folders, note: str) -> dict:
    """The curves file's content from every run JSON in ``folders``."""
    out: dict = {"methods": {}}
    for folder in folders:
        for path in sorted(Path(folder).glob("*.json")):
            run = json.loads(path.read_text())
            if "methods" not in run:
                continue
            for key in ("batch", "steps", "model", "protocol", "environment"):
                if key in out and out[key] != run.get(key) and key != "steps":
                    raise SystemExit(f"collect_curves: {path.name} ran with another {key} than the runs before it; "
                                     "fix: collect each setup into a file of its own")
                out.setdefault(key, run.get(key))
            for method, r in run["methods"].items():
                if not r.get("curve"):
                    continue
                options = dict(sorted(r.get("options", {}).items()))
                name = label(method, options)
                last, acc = r["curve"][-1]
                finished = last == options.get("max_steps") and r.get("accuracy") is not None
                if len(r["curve"]) > len(out["methods"].get(name, {}).get("curve", [])):
                    out["methods"][name] = {"last_step": last, "final_accuracy": r["accuracy"] if finished else acc,
                                            "options": options, "curve": r["curve"]}
    if not out["methods"]:
        raise SystemExit("collect_curves: no run with a curve in " + ", ".join(map(str, folders)) +
                         "; fix: pass the folders an extracted sst2-runs.tgz left")
    out["methods"] = dict(sorted(out["methods"].items()))
    out["note"] = note
    return {k: out[k] for k in ("batch", "steps", "model", "protocol", "environment", "note", "methods") if k in out}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folders", nargs="+", type=Path)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--note", default="")
    a = ap.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from qft.bench.sst2 import plot_curves
    from qft.io import write_json_atomic

    result = collect(a.folders, a.note)
    write_json_atomic(a.out, result)
    drew = plot_curves(result, a.out.with_suffix(".png"))
    print(f"{len(result['methods'])} runs -> {a.out}" + ("" if drew else " (no PNG: matplotlib is absent)"))


if __name__ == "__main__":
    main()
