"""qft.bench.curves: two accuracy curves compared at their common steps, from results JSONs; and
benchmarks/zo_envelope.py, the best run of each ZO method at each step."""

import importlib.util
import json
from pathlib import Path

import pytest

from qft.bench.curves import compare, load_curve, main


def _results(path, methods):
    path.write_text(json.dumps({"methods": {k: {"curve": v} for k, v in methods.items()}}))
    return path


def test_compare_keeps_the_common_steps_in_order():
    a = [(1000, 80.0), (500, 70.0), (1500, 85.5)]
    b = [(500, 71.0), (1500, 83.0), (2000, 84.0)]
    assert compare(a, b) == [(500, 70.0, 71.0, -1.0), (1500, 85.5, 83.0, 2.5)]


def test_cli_reports_each_step_and_the_margin(tmp_path, capsys):
    f = _results(tmp_path / "c.json", {"Sparse-MeZO 3k": [[500, 63.65], [1000, 77.75], [2000, 83.6]],
                                       "MeZO 3k": [[500, 67.2], [1000, 74.77], [2000, 79.47]],
                                       "no curve": None})
    main([f"{f}:Sparse", f"{f}:MeZO 3k", "--margin", "2"])
    out = capsys.readouterr().out
    assert "a: Sparse-MeZO 3k" in out and "b: MeZO 3k" in out
    assert " -3.55" in out and "+2.98  *" in out and "+4.13  *" in out
    assert out.strip().endswith("a >= b + 2 at 2 of 3 common steps; at the last, step 2,000: +4.13")
    assert load_curve(str(_results(tmp_path / "one.json", {"x": [[1, 2.0]]})))[0] == "x"  # FILE alone: its one curve


@pytest.mark.parametrize("spec,problem", [("missing.json", "no results file"), ("{f}:eZO", "2 entries"),
                                          ("{f}:nothing", "no entry"), ("{bad}", "not a results JSON")])
def test_bad_curve_specs_end_with_one_line(tmp_path, capsys, spec, problem):
    f = _results(tmp_path / "c.json", {"Sparse-MeZO": [[1, 2.0]], "MeZO": [[1, 1.0]]})
    (tmp_path / "bad.json").write_text("[1, 2]")
    spec = spec.format(f=f, bad=tmp_path / "bad.json")
    with pytest.raises(SystemExit) as exc:
        main([spec if spec != "missing.json" else str(tmp_path / spec), f"{f}:Sparse"])
    assert exc.value.code != 0
    err = capsys.readouterr().err.strip()
    assert problem in err and "Fix:" in err and "Traceback" not in err and "\n" not in err


def _script(name: str):
    path = Path(__file__).resolve().parent.parent / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_collect_curves_labels_each_run_once_by_its_longest_curve(tmp_path):
    """benchmarks/collect_curves.py: a curves file from runs' JSONs in several calls' folders; a run continued in a
    later call counts once, as its longer curve, with its final evaluation; one it did not finish, its last point."""
    collect = _script("collect_curves")
    env = {"gpu": "H200"}

    def run(folder, name, method, curve, accuracy=None, **options):
        folder.mkdir(exist_ok=True)
        options = {"method": method, "max_steps": 2000, "zo_distribution": "rank1", "zo_paired": True, **options}
        (folder / f"{name}.json").write_text(json.dumps({"batch": 16, "environment": env, "methods": {
            method: {"curve": curve, "accuracy": accuracy, "options": options}}}))

    a, b = tmp_path / "call3", tmp_path / "call8"
    run(a, "s1", "sparse-mezo", [[1000, 70.0], [1500, 75.0]], learning_rate=5e-5, density=0.3, seed=1)
    run(b, "s1", "sparse-mezo", [[1000, 70.0], [1500, 75.0], [2000, 76.02]], 76.0, learning_rate=5e-5, density=0.3,
        seed=1)
    run(a, "m", "mezo", [[1000, 60.0], [2000, 61.0]], 61.0, learning_rate=1.4e-5)
    run(b, "cut", "sparse-mezo", [[1000, 65.0]], learning_rate=8e-5, density=0.2, seed=42)
    (b / "main.json").write_text("{}")  # not a run
    out = tmp_path / "curves.json"
    collect.main([str(a), str(b), "--out", str(out), "--note", "test"])
    got = json.loads(out.read_text())
    assert got["environment"] == env and got["note"] == "test" and got["batch"] == 16
    assert got["methods"] == {
        "MeZO lr 1.4e-5 rank1 paired (all weights), 2,000-step schedule": {
            "last_step": 2000, "final_accuracy": 61.0, "options": dict(sorted({
                "method": "mezo", "max_steps": 2000, "zo_distribution": "rank1", "zo_paired": True,
                "learning_rate": 1.4e-5}.items())), "curve": [[1000, 60.0], [2000, 61.0]]},
        **{k: got["methods"][k] for k in got["methods"] if k.startswith("Sparse")}}
    s1 = got["methods"]["Sparse-MeZO lr 5e-5 rank1 paired density 0.3, 2,000-step schedule, seed 1"]
    assert s1["last_step"] == 2000 and s1["final_accuracy"] == 76.0 and len(s1["curve"]) == 3
    cut = got["methods"]["Sparse-MeZO lr 8e-5 rank1 paired density 0.2, 2,000-step schedule, seed 42"]
    assert cut["last_step"] == 1000 and cut["final_accuracy"] == 65.0
    with pytest.raises(SystemExit, match="no run with a curve"):
        collect.main([str(tmp_path / "empty"), "--out", str(tmp_path / "x.json")])


def test_envelope_takes_the_best_rate_of_each_method_on_one_schedule(tmp_path, capsys):
    env = _script("zo_envelope")
    f = tmp_path / "sst2-zo-curves-x.json"
    f.write_text(json.dumps({"methods": {
        "MeZO lr 2e-5, 2k": {"curve": [[1000, 74.0], [2000, 78.7]], "options": {"method": "mezo", "max_steps": 2000}},
        "MeZO lr 3e-5, 2k": {"curve": [[1000, 76.3], [2000, 79.2]], "options": {"method": "mezo", "max_steps": 2000}},
        "MeZO lr 1e-5, 8k": {"curve": [[1000, 79.0], [2000, 81.0]], "options": {"method": "mezo", "max_steps": 8000}},
        "Sparse-MeZO lr 8e-5, 2k": {"curve": [[1000, 79.6], [2000, 82.1]],
                                    "options": {"method": "sparse-mezo", "max_steps": 2000}},
        "MeZO over LoRA, 2k": {"curve": [[1000, 90.0], [2000, 90.0]],
                               "options": {"method": "mezo", "max_steps": 2000, "zo_adapter": "lora"}}}}))
    env.main([str(f), "--schedule", "2000"])
    out = capsys.readouterr().out
    assert "sparse  79.60  mezo  76.30   +3.30  *" in out and "sparse  82.10  mezo  79.20   +2.90  *" in out
    assert "8k" not in out and "LoRA" not in out
    assert out.strip().endswith("sparse >= mezo + 2 at 2 of 2 common steps")
    env.main([str(f)])  # every schedule: the 8,000-step MeZO run is the better one at both steps
    assert "+1.10" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:
        env.main([str(f), "--schedule", "3000"])
    assert exc.value.code == 1
    err = capsys.readouterr().err.strip()
    assert "3000-step schedule" in err and "fix:" in err and "\n" not in err
    (tmp_path / "empty.json").write_text(json.dumps({"methods": {}}))
    with pytest.raises(SystemExit):
        env.main([str(tmp_path / "empty.json")])
    err = capsys.readouterr().err.strip()
    assert "curves in the files" in err and "None" not in err and "fix:" in err


def test_envelope_mean_over_seeds_compares_settings_not_lucky_runs(tmp_path, capsys):
    env = _script("zo_envelope")
    opts = lambda method, lr, **kw: {"method": method, "max_steps": 2000, "learning_rate": lr, "output": f"/o/{kw}",  # noqa: E731
                                     **kw}
    f = tmp_path / "sst2-zo-curves-y.json"
    f.write_text(json.dumps({"methods": {  # seed 42 named by no option: the Trainer's default
        "MeZO 3e-5": {"curve": [[1000, 76.0], [2000, 79.0]], "options": opts("mezo", 3e-5)},
        "MeZO 3e-5 s1": {"curve": [[1000, 74.0], [2000, 78.0]], "options": opts("mezo", 3e-5, seed=1)},
        "Sparse 8e-5": {"curve": [[1000, 80.0], [2000, 82.0]], "options": opts("sparse-mezo", 8e-5)},
        "Sparse 8e-5 s1": {"curve": [[1000, 74.0], [2000, 77.0]], "options": opts("sparse-mezo", 8e-5, seed=1)},
        "Sparse 6e-5 s1": {"curve": [[1000, 75.0], [2000, 81.0]], "options": opts("sparse-mezo", 6e-5, seed=1)},
        "Sparse 6e-5 s2": {"curve": [[1000, 77.0]], "options": opts("sparse-mezo", 6e-5, seed=2)},
        "Sparse 1e-4 s1": {"curve": [[1000, 90.0], [2000, 90.0]], "options": opts("sparse-mezo", 1e-4, seed=1)}}}))
    env.main([str(f), "--schedule", "2000"])  # best single runs: the one-seed 1e-4 run wins
    assert "sparse  90.00  mezo  79.00  +11.00  *" in capsys.readouterr().out
    env.main([str(f), "--schedule", "2000", "--mean-over-seeds"])
    out = capsys.readouterr().out
    # 1,000: 8e-5's mean 77.0 vs 6e-5's 76.0; 2,000 only 8e-5 has every seed (6e-5's seed 2 stopped at 1,000)
    assert "1,000  sparse  77.00  mezo  75.00   +2.00  *" in out and "2,000  sparse  79.50  mezo  78.50   +1.00" in out
    assert "mean of seeds 1, 42: " in out and "1e-4" not in out
    env.main([str(f), "--schedule", "2000", "--mean-over-seeds", "--min-seeds", "1"])  # single seeds count again
    assert "sparse  90.00" in capsys.readouterr().out
    g = tmp_path / "sst2-zo-curves-z.json"  # seed 42's MeZO run again, continued in a later session: counted once
    g.write_text(json.dumps({"methods": {"MeZO 3e-5, finished": {"curve": [[1000, 76.0], [2000, 79.0], [3000, 80.0]],
                                                                 "options": opts("mezo", 3e-5)}}}))
    env.main([str(f), str(g), "--schedule", "2000", "--mean-over-seeds"])
    out = capsys.readouterr().out
    assert "mezo  78.50" in out and "42, 42" not in out and "3,000" not in out
    with pytest.raises(SystemExit) as exc:
        env.main([str(f), "--schedule", "2000", "--mean-over-seeds", "--min-seeds", "3"])
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 1 and "run with 3 seeds or more" in err and "lower --min-seeds" in err and "\n" not in err
    with pytest.raises(SystemExit) as exc:
        env.main([str(f), "--mean-over-seeds", "--min-seeds", "0"])
    assert exc.value.code == 2 and "fix:" in capsys.readouterr().err
