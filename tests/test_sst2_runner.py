"""The SST-2 quality runner end to end on a tiny model with generated SST-2-format data (no ../shared)."""

import json
import random

import pytest

from qft.bench.sst2 import run
from tests.tiny import save_tiny


def _sst2_like(tmp_path):
    """SST-2-format train/dev files in ``tmp_path`` and a tiny model that knows the label words."""
    rng = random.Random(0)
    for split, n in (("train", 64), ("dev", 24)):
        with open(tmp_path / f"{split}.jsonl", "w") as f:
            for _ in range(n):
                f.write(json.dumps({"sentence": " ".join(rng.choice("abcdef") for _ in range(5)),
                                    "label": rng.randint(0, 1)}) + "\n")
    return save_tiny("llama", tmp_path / "model", extra_words=("terrible", "great"))


@pytest.mark.parametrize("objective", ["loss", "label-words"])
def test_runner_records_accuracy_curves(tmp_path, objective, monkeypatch):
    model = _sst2_like(tmp_path)
    out = tmp_path / "r.json"
    seen = []
    monkeypatch.setattr("qft.bench.sst2.plot_curves",
                        lambda results, png: seen.append(json.loads(json.dumps(results["methods"]["mezo"]))))
    res = run(str(model), tmp_path, ["mezo"], steps=4, out=out, curve_every=2, curve_limit=8, zo_objective=objective)
    # the partial curve is saved at every point, so a run stopped at a time limit keeps it
    assert [len(p["curve"]) for p in seen[:2]] == [1, 2] and seen[0]["partial"]
    r = res["methods"]["mezo"]
    assert "error" not in r, r
    assert [s for s, _ in r["curve"]] == [2, 4] and all(0 <= a <= 100 for _, a in r["curve"])
    assert r["curve_examples"] == 8 and r["options"]["zo_objective"] == objective
    assert json.loads(out.read_text())["methods"]["mezo"]["curve"] == [list(p) for p in r["curve"]]


@pytest.mark.parametrize("light", [False, True])
def test_runner_continues_a_stopped_run_from_its_work_folder(tmp_path, light, capsys):
    """light: the checkpoint kept without its weights, as benchmarks/sst2_gpu_runs.sh keeps it when the machine goes
    (RESTORE puts it back): the weights are rebuilt by replay; with --zo-paired rank1 steps."""
    model = _sst2_like(tmp_path)
    out, work = tmp_path / "r.json", tmp_path / "work"
    options = {"save_steps": 2, **({"zo_paired": True, "zo_distribution": "rank1"} if light else {})}
    common = dict(out=out, curve_every=2, curve_limit=8, work=work, extra={"mezo": options},
                  zo_objective="label-words" if light else "loss")
    first = run(str(model), tmp_path, ["mezo"], steps=2, **common)["methods"]["mezo"]
    assert "error" not in first and [s for s, _ in first["curve"]] == [2]
    ckpt = work / "mezo" / "checkpoints" / "checkpoint-2"
    assert ckpt.is_dir()
    if light:
        for f in ckpt.iterdir():
            if f.name not in ("optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json"):
                f.unlink()
    second = run(str(model), tmp_path, ["mezo"], steps=4, **common)["methods"]["mezo"]
    assert "error" not in second, second
    assert second["options"]["resume"] == "auto" and [s for s, _ in second["curve"]] == [2, 4]
    assert second["curve"][0] == first["curve"][0]  # the earlier point, read back from the JSON
    assert (ckpt / "model.safetensors").exists()  # rebuilt (light), or kept
    assert ("rebuilding the weights of checkpoint-2 from its 2 zeroth-order steps" in capsys.readouterr().out) == light


def test_runner_turns_a_sigterm_outside_training_into_one_line(tmp_path, monkeypatch, capsys):
    """A time limit's SIGTERM during the zero-shot evaluation (outside the Trainer, whose callback saves and stops)
    ends the runner with exit 143 and one line, as `qft finetune` does, not a silent kill."""
    import os
    import signal
    import sys
    import time

    from qft.bench import sst2

    def terminated(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)

    monkeypatch.setattr(sst2, "run", terminated)
    monkeypatch.setattr(sys, "argv", ["sst2", "--model", "m", "--data", str(tmp_path)])
    with pytest.raises(SystemExit) as exc:
        sst2.main()
    assert exc.value.code == 143
    err = capsys.readouterr().err.strip()
    assert "terminated" in err and "\n" not in err and "Traceback" not in err


def test_a_method_option_overrides_the_runner_defaults(tmp_path):
    """--option mezo:max_steps=N gives one run its own schedule (a continued 8,000-step run beside new shorter ones)."""
    model = _sst2_like(tmp_path)
    r = run(str(model), tmp_path, ["mezo"], steps=4, out=None, curve_every=2, curve_limit=8,
            extra={"mezo": {"max_steps": 2, "batch_size": 4}})["methods"]["mezo"]
    assert "error" not in r, r
    assert r["options"]["max_steps"] == 2 and r["options"]["batch_size"] == 4
    assert [s for s, _ in r["curve"]] == [2]
