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


def test_unknown_path_is_a_one_line_error(tmp_path, monkeypatch):
    from qft.errors import QftError

    monkeypatch.setenv("QFT_BENCH_DIR", str(tmp_path))
    with pytest.raises(QftError, match="unknown path.*choose from stock-trl"):
        run_suite("spiel", shape="tiny", batch=2, seq=32, steps=1, warmup=0, rank=4, gradient_checkpointing=False,
                  out=None, paths=["stock-trl", "nope"])
