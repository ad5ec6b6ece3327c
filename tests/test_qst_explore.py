"""benchmarks/qst_explore.py, the QST design search on cached frozen states: it trains qft's own side network on
them (the same network `qft finetune --method qst` trains), learns a separable toy task, and turns its best designs
into `qft finetune` options for the real pipeline."""

import importlib.util
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "qst_explore.py"


@pytest.fixture(scope="module")
def qe():
    spec = importlib.util.spec_from_file_location("qst_explore", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _toy_cache(n: int, layers: int = 3, hidden: int = 32, seed: int = 0):
    """Cached examples of varying length whose label is the sign of one hidden direction at a middle layer."""
    g = torch.Generator().manual_seed(seed)
    items, labels = [], []
    for _ in range(n):
        t = int(torch.randint(3, 7, (1,), generator=g))
        states = torch.randn(layers + 1, t, hidden, generator=g)
        y = int(torch.rand(1, generator=g) < 0.5)
        states[1, :, 0] += 3.0 if y else -3.0
        items.append((states.to(torch.bfloat16), torch.randn(hidden, generator=g)))
        labels.append(y)
    return items, labels


def test_side_network_learns_a_separable_task_from_cached_states(qe):
    train, y_train = _toy_cache(96)
    dev, y_dev = _toy_cache(64, seed=1)
    head = torch.randn(10, 32)
    label_ids = torch.tensor([3, 7])
    r = qe.train_side(train, y_train, dev, y_dev, head, label_ids, {"lr": 3e-3, "r": 4, "readout": "mean",
                                                                      "gate_init": 1.0}, seed=0, steps=60,
                      test=(dev, y_dev))
    assert r["accuracy"] >= 90 and r["test_accuracy"] == r["accuracy"]
    assert r["beta"] != 0 and r["curve"][-1] == (60, r["accuracy"])


def test_batches_are_left_padded_with_their_mask(qe):
    items, _ = _toy_cache(3)
    states, final, mask = qe.batch_of(items)
    t = max(s.shape[1] for s, _ in items)
    assert len(states) == 4 and states[0].shape == (3, t, 32) and final.shape == (3, t, 32)
    for j, (s, f) in enumerate(items):
        n = s.shape[1]
        assert mask[j].tolist() == [0] * (t - n) + [1] * n
        torch.testing.assert_close(states[1][j, t - n:], s[1].float())
        torch.testing.assert_close(final[j, -1], f)


def test_the_best_designs_become_finetune_runs(qe):
    results = {"runs": {"lr=1e-3": {"seeds": [{"accuracy": 80.0}, {"accuracy": 82.0}]},
                        "lr=1e-3,gate_init=2,readout=mean": {"seeds": [{"accuracy": 84.0}]}}}
    other = {"runs": {"lr=5e-4,input_norm=true,r=8": {"seeds": [{"accuracy": 83.0}, {"accuracy": 82.0}]}}}
    assert qe.pick([results, other], 2) == ["lr=1e-3,gate_init=2,readout=mean", "lr=5e-4,input_norm=true,r=8"]
    runs = qe.as_gpu_runs(["lr=5e-4,input_norm=true,r=8"], [42, 1]).split()
    assert runs == ["qst:0.0005:side_input_norm=true,side_reduction=8,seed=42",
                    "qst:0.0005:side_input_norm=true,side_reduction=8,seed=1"]
    with pytest.raises(SystemExit, match="lora_rank"):
        qe.as_gpu_runs(["lr=1e-3,lora_rank=64"], [1])
