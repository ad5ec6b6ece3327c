"""``qft bench``'s harness end to end on the tiny shape (CPU): every path of a suite runs in its own process
and the ratios pair each qft path with its stock baseline. The numbers themselves mean something only on a
GPU (benchmarks/results); here the test checks that they exist and are sane."""

import pytest

from qft.bench import run_suite


@pytest.mark.parametrize("suite,pairs", [
    ("qst", {"qft-qst/stock-peft", "qft-qst/stock-trl"}),
    ("spiel", {"qft-spiel-nf4/stock-trl", "qft-spiel-bf16/stock-lora-bf16"}),
])
def test_suite_runs_every_path_and_pairs_ratios(suite, pairs, tmp_path, monkeypatch):
    monkeypatch.setenv("QFT_BENCH_DIR", str(tmp_path))
    r = run_suite(suite, shape="tiny", batch=2, seq=32, steps=4, warmup=1, rank=4, gradient_checkpointing=False,
                  out=tmp_path / "r.json", log=lambda m: None, reselect_every=2)
    assert (tmp_path / "r.json").exists()
    for path, row in r["results"].items():
        assert "error" not in row, (path, row)
        assert row["peak_gib"] > 0 and row["tokens_per_s"] > 0 and 0 < row["trainable_params"] < row["total_params"]
        assert all(loss == loss for loss in row["losses"])  # finite (NaN != NaN)
    assert set(r["ratios"]) == pairs
    if suite == "spiel":  # as many trainable entries as LoRA of the same rank, over the same linear layers
        res = r["results"]
        assert res["qft-spiel-nf4"]["trainable_params"] == res["stock-trl"]["trainable_params"]
        assert res["qft-spiel-bf16"]["trainable_params"] == res["stock-lora-bf16"]["trainable_params"]


def test_mezo_over_qlora_runs_on_the_nf4_base(tmp_path, monkeypatch):
    """The 4-bit ZO paths: two forwards of the NF4 model, and MeZO over LoRA on it, measured against the former."""
    monkeypatch.setenv("QFT_BENCH_DIR", str(tmp_path))
    r = run_suite("mezo", shape="tiny", batch=2, seq=32, steps=2, warmup=1, rank=4, gradient_checkpointing=False,
                  out=None, log=lambda m: None, paths=["inference-nf4", "qft-mezo-qlora"])
    for path, row in r["results"].items():
        assert "error" not in row, (path, row)
        assert row["peak_gib"] > 0 and row["step_ms"] > 0
    c = r["shape_config"]
    for row in r["results"].values():  # every linear layer of every decoder layer in NF4, counted once
        assert row["weights_4bit"] == 7 * c["num_hidden_layers"]  # LoRA r4's factors only: r·(in + out) for q, k, v, o, gate, up, down of each layer
    h, i, kv = c["hidden_size"], c["intermediate_size"], c["hidden_size"] // c["num_attention_heads"] * c[
        "num_key_value_heads"]
    per_layer = 4 * ((h + h) * 2 + (h + kv) * 2 + (h + i) * 3)
    assert r["results"]["qft-mezo-qlora"]["tuned_params"] == c["num_hidden_layers"] * per_layer
    assert set(r["ratios"]) == {"qft-mezo-qlora/inference-nf4"}


def test_in_place_sparse_mezo_path_tunes_the_decoder_matrices_against_both_baselines(tmp_path, monkeypatch):
    """qft-sparse-mezo-inplace: MeZO on the decoder's weight matrices under a magnitude mask, no delta tensors;
    compared with two forwards and with the PEFT Sparse-MeZO's step; its ±1 and paired variants against it."""
    monkeypatch.setenv("QFT_BENCH_DIR", str(tmp_path))
    inplace = ["qft-sparse-mezo-inplace", "qft-sparse-mezo-inplace-rademacher", "qft-sparse-mezo-inplace-paired"]
    r = run_suite("mezo", shape="tiny", batch=2, seq=32, steps=2, warmup=1, rank=4, gradient_checkpointing=False,
                  out=None, log=lambda m: None, paths=["inference", "qft-sparse-mezo", *inplace])
    for path, row in r["results"].items():
        assert "error" not in row, (path, row)
        assert row["peak_gib"] > 0 and row["step_ms"] > 0
    c = r["shape_config"]
    h, i, kv = c["hidden_size"], c["intermediate_size"], c["hidden_size"] // c["num_attention_heads"] * c[
        "num_key_value_heads"]
    per_layer = h * h * 2 + h * kv * 2 + h * i * 3
    assert all(r["results"][p]["tuned_params"] == c["num_hidden_layers"] * per_layer for p in inplace)
    assert {"qft-sparse-mezo-inplace/inference", "qft-sparse-mezo-inplace/qft-sparse-mezo"} <= set(r["ratios"])
    assert {f"{p}/qft-sparse-mezo-inplace" for p in inplace[1:]} <= set(r["ratios"])


def test_paired_paths_with_four_directions_a_step_or_deferred_writes(tmp_path, monkeypatch):
    """qft-mezo-rank1-paired-q4: four directions a step from one forward; -defer4: the weights' updates written every
    4 steps (5 steps here: one write); both against two forwards and against the paired step of one direction."""
    monkeypatch.setenv("QFT_BENCH_DIR", str(tmp_path))
    new = ["qft-mezo-rank1-paired-q4", "qft-mezo-rank1-paired-defer4"]
    r = run_suite("mezo", shape="tiny", batch=2, seq=32, steps=3, warmup=2, rank=4, gradient_checkpointing=False,
                  out=None, log=lambda m: None, paths=["inference", "qft-mezo-rank1-paired", *new])
    for path, row in r["results"].items():
        assert "error" not in row, (path, row)
        assert row["peak_gib"] > 0 and row["step_ms"] > 0
    assert {f"{p}/{base}" for p in new for base in ("inference", "qft-mezo-rank1-paired")} <= set(r["ratios"])


def test_unknown_path_is_a_one_line_error(tmp_path, monkeypatch):
    from qft.errors import QftError

    monkeypatch.setenv("QFT_BENCH_DIR", str(tmp_path))
    with pytest.raises(QftError, match="unknown path.*choose from stock-trl"):
        run_suite("spiel", shape="tiny", batch=2, seq=32, steps=1, warmup=0, rank=4, gradient_checkpointing=False,
                  out=None, paths=["stock-trl", "nope"])


def test_zo_profiler_reports_each_path(tmp_path):
    """benchmarks/profile_zo.py (where a MeZO step's time goes, run on the GPU) on the tiny shape: every path gets its
    timings and its busiest ops, in the JSON it writes."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "profile_zo.py"
    out = tmp_path / "prof.json"
    r = subprocess.run([sys.executable, str(script), "--shape", "tiny", "--paths", "inference,qft-mezo-rank1",
                        "--batch", "2", "--seq", "16", "--steps", "3", "--warmup", "1", "--out", str(out)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    paths = json.loads(out.read_text())["paths"]
    assert set(paths) == {"inference", "qft-mezo-rank1"}
    for row in paths.values():
        assert row["wall_ms"] > 0 and row["process_cpu_ms"] > 0 and row["top_cpu_ops"]
    # the rank-one hooks show: a matrix-vector product and an outer-product add per matrix and forward
    assert any("addr" in op["name"] for op in paths["qft-mezo-rank1"]["top_cpu_ops"])


def test_zo_profiler_idle_gaps_are_the_spans_with_no_kernel():
    """profile_zo's GPU busy time is the union of the kernels' intervals, and its gaps are what lies between them,
    longest first, each named by the kernels around it (overlapping and nested kernels counted once)."""
    from types import SimpleNamespace as NS

    from tests.test_curves import _script  # loads a benchmarks/ script as a module

    prof = _script("profile_zo")
    k = lambda name, a, b: NS(name=name, time_range=NS(start=a, end=b))  # noqa: E731 (microseconds)
    kernels = [k("mm", 0, 1000), k("add", 500, 800), k("addr", 1200, 2000), k("copy", 5000, 5500),
               k("norm", 5400, 6000)]
    busy, gaps = prof._idle(kernels, 2, top=5)
    assert busy == (1000 + 800 + 1000) / 1000 / 2  # ms a step, over 2 steps
    assert gaps == [{"ms": 3.0, "after": "addr", "before": "copy"}, {"ms": 0.2, "after": "mm", "before": "addr"}]


def test_zo_host_overhead_times_the_gpu_paths_python_on_the_cpu(tmp_path):
    """benchmarks/zo_host_overhead.py: the GPU path's Python with its kernels stubbed, on a CPU; each path's step
    time and its time over two forwards, in the JSON it writes."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "zo_host_overhead.py"
    out = tmp_path / "host.json"
    r = subprocess.run([sys.executable, str(script), "--paths", "inference,qft-mezo-rank1-paired", "--layers", "2",
                        "--steps", "2", "--rounds", "2", "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    paths = json.loads(out.read_text())["paths"]
    assert set(paths) == {"inference", "qft-mezo-rank1-paired"}
    assert all(row["step_ms"] > 0 and len(row["rounds_ms"]) == 2 for row in paths.values())
    assert paths["inference"]["over_inference_ms"] == 0
