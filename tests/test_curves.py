"""qft.bench.curves: two accuracy curves compared at their common steps, from results JSONs."""

import json

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
