"""SST-2 quality, the protocol of ../shared/DATA.md (MeZO / LM-BFF style), for any qft method.

Prompt "Review: {sentence}\\nSentiment (great or terrible):", label words " terrible" / " great", scored
by the two label-word logits at the last position; 1,000 random training examples, batch 16; dev accuracy
on all 872 sentences.

    python -m qft.bench.sst2 --model SMOLLM2_DIR --data ../shared/data/sst2 --methods qlora,peqa --steps 300 \\
        --option peqa:bits=3 --out benchmarks/results/sst2.json

MeZO's accuracy-versus-steps curves (issue 6), JSON plus a PNG beside it:

    python -m qft.bench.sst2 --model SMOLLM2_DIR --data ../shared/data/sst2 --methods mezo,sparse-mezo \\
        --steps 20000 --curve-every 1000 --zo-objective label-words --out benchmarks/results/sst2-zo.json
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

from transformers import TrainerCallback

from qft.data import PROMPT, LabelWordTask

LABEL_WORDS = (" terrible", " great")


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def sst2_task(data_dir: Path, n_train: int = 1000, seed: int = 0) -> tuple[Path, LabelWordTask]:
    train = _read(data_dir / "train.jsonl")
    random.Random(seed).shuffle(train)
    folder = Path(tempfile.mkdtemp(prefix="qft-sst2-"))
    with open(folder / "train.jsonl", "w") as f:
        for r in train[:n_train]:
            f.write(json.dumps({"prompt": PROMPT.format(sentence=r["sentence"]),
                                "completion": LABEL_WORDS[int(r["label"])]}) + "\n")
    dev = _read(data_dir / "dev.jsonl")
    task = LabelWordTask(PROMPT, LABEL_WORDS, tuple((PROMPT.format(sentence=r["sentence"]), int(r["label"]))
                                                    for r in dev))
    return folder / "train.jsonl", task


class AccuracyCurve(TrainerCallback):
    """Records label-word accuracy every ``every`` optimizer steps in ``points``: [(step, accuracy %)]."""

    def __init__(self, task: LabelWordTask, every: int, limit: int | None = None, on_point=None):
        self.task = LabelWordTask(task.template, task.label_words, task.examples[:limit] if limit else task.examples)
        self.every = every
        self.points: list[tuple[int, float]] = []
        self.on_point = on_point  # called after each point (the runner saves the partial curve)

    def on_step_end(self, args, state, control, model=None, processing_class=None, **kwargs):
        if self.every and state.global_step % self.every == 0 and state.is_world_process_zero:
            from qft.evaluate import label_word_accuracy

            self.points.append((state.global_step, round(100 * label_word_accuracy(model, processing_class,
                                                                                  self.task), 2)))
            if self.on_point is not None:
                self.on_point(self.points)


def plot_curves(results: dict, png: Path) -> bool:
    """Accuracy-versus-steps curves of every method that has one; False when matplotlib is absent."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(8, 5))
    for method, r in results["methods"].items():
        if r.get("curve"):
            steps, accs = zip(*r["curve"])
            ax.plot(steps, accs, marker=".", label=method)
    ax.set_xlabel("step")
    ax.set_ylabel("SST-2 dev accuracy (%)")
    ax.legend(fontsize="small", loc="lower right")  # the curves rise to the top left: that corner stays clear
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    return True


ZO_METHODS = ("mezo", "sparse-mezo")


def run(model: str, data_dir: Path, methods: list[str], steps: int, out: Path | None, lr: dict | None = None,
        extra: dict | None = None, curve_every: int = 0, curve_limit: int | None = None,
        zo_objective: str = "loss", work: Path | None = None) -> dict:
    """Run each method; ``work``: keep each method's output (checkpoints) in ``work/METHOD`` and continue from
    its newest checkpoint when one is there (a run stopped at a time limit picks up where it stopped, its curve
    so far read back from ``out``)."""
    from transformers.trainer_utils import get_last_checkpoint

    from qft.bench.shapes import environment
    from qft.io import write_json_atomic
    from qft.train import FinetuneConfig, finetune

    train_file, task = sst2_task(data_dir)
    results = {"protocol": __doc__.split("\n\n")[1], "model": model, "steps": steps, "batch": 16,
               "environment": environment(), "methods": {}}
    earlier = json.loads(out.read_text())["methods"] if out is not None and out.exists() else {}
    for method in methods:
        t0 = time.time()
        output = work / method if work else Path(tempfile.mkdtemp(prefix=f"qft-sst2-{method}-"))
        options = dict(model=model, data=str(train_file), method=method, max_steps=steps, batch_size=16,
                       output=str(output), overwrite=True, logging_steps=50, lora_r=8)
        options.update((extra or {}).get(method, {}))  # e.g. mezo:max_steps=8000 for a run with its own schedule
        last = get_last_checkpoint(str(output / "checkpoints")) if (output / "checkpoints").is_dir() else None
        if last:
            options["resume"] = "auto"
        if lr and method in lr:
            options["learning_rate"] = lr[method]
        if method in ZO_METHODS:
            options["zo_objective"] = zo_objective

        def save_partial(points, method=method, options=options):
            # a run stopped at a time limit keeps the curve so far
            results["methods"][method] = {"curve": list(points), "partial": True, "options": options}
            if out is not None:
                write_json_atomic(out, results)
                plot_curves(results, out.with_suffix(".png"))

        curve = AccuracyCurve(task, curve_every, curve_limit, save_partial) if curve_every else None
        if curve and last:  # the points recorded before the checkpoint the run continues from
            done = int(Path(last).name.rsplit("-", 1)[1])
            curve.points = [tuple(p) for p in (earlier.get(method, {}).get("curve") or []) if p[0] <= done]
        try:
            r = finetune(FinetuneConfig(**options), log=print, progress=False, eval_task=task,
                         callbacks=[curve] if curve else None)
            results["methods"][method] = {
                "curve": list(curve.points) if curve else None,
                "curve_examples": curve_limit or len(task.examples),
                "zero_shot": round(100 * r.metric_before, 1), "accuracy": round(100 * r.metric_after, 1),
                "seconds": round(time.time() - t0, 1), "options": options, "stats": r.stats,
                "trainable_params": r.stats.get("trainable_params")}
        except Exception as exc:  # one method's failure must not lose the others' numbers (or its curve so far)
            results["methods"][method] = {"error": f"{type(exc).__name__}: {exc}", "options": options,
                                          "curve": list(curve.points) if curve else None}
        print(method, results["methods"][method], flush=True)
        if out is not None:
            write_json_atomic(out, results)
            if curve_every:
                plot_curves(results, out.with_suffix(".png"))
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True, type=Path)
    ap.add_argument("--methods", default="qlora")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--lr", default="", help="method=lr,method=lr")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--curve-every", type=int, default=0, help="record dev accuracy every N steps (0: off)")
    ap.add_argument("--curve-limit", type=int, default=None, help="dev examples per curve point (default: all)")
    ap.add_argument("--zo-objective", default="loss", choices=("loss", "label-words"),
                    help="what MeZO/Sparse-MeZO's two forwards measure")
    ap.add_argument("--work", type=Path, default=None,
                    help="keep each method's checkpoints in WORK/METHOD and continue from them when run again")
    ap.add_argument("--option", action="append", default=[], metavar="METHOD:KEY=VALUE",
                    help="a finetune option for one method, e.g. spiel:density=lora:8 or peqa:bits=3 (repeatable)")
    a = ap.parse_args()
    extra: dict = {}
    for spec in a.option:
        method, _, kv = spec.partition(":")
        key, eq, value = kv.partition("=")
        if not (method and key and eq):
            ap.error(f"--option {spec!r}: expected METHOD:KEY=VALUE")
        extra.setdefault(method, {})[key.replace("-", "_")] = _scalar(value)
    lr = {k: float(v) for k, v in (kv.split("=") for kv in a.lr.split(",") if kv)}
    import typer

    from qft.cli.common import user_errors

    try:  # as `qft finetune`: a SIGTERM or Ctrl-C outside training (during an evaluation) ends with one line
        user_errors(run)(a.model, a.data, a.methods.split(","), a.steps, a.out, lr, extra=extra,
                         curve_every=a.curve_every, curve_limit=a.curve_limit, zo_objective=a.zo_objective,
                         work=a.work)
    except typer.Exit as exc:
        raise SystemExit(exc.exit_code) from None


def _scalar(text: str):
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


if __name__ == "__main__":
    main()
