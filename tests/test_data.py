"""Data loading: file types, format detection, conversion to TRL's formats, the default task."""

import pandas as pd
import pytest

from qft.data import default_task, detect_format, load_records, to_sft
from qft.errors import QftError


@pytest.mark.parametrize("fmt", ["text", "prompt_completion", "alpaca", "messages"])
def test_formats_are_detected_and_converted(jsonl, fmt):
    ds = load_records(str(jsonl(fmt)))
    assert detect_format(ds.column_names) == fmt
    out, kind = to_sft(ds)
    expected = {"text": ["text"], "prompt_completion": ["prompt", "completion"], "alpaca": ["prompt", "completion"],
                "messages": ["messages"]}[fmt]
    assert sorted(out.column_names) == sorted(expected) and len(out) == len(ds)
    if fmt == "alpaca":
        assert "### Instruction:" in out[0]["prompt"] and out[0]["completion"]


@pytest.mark.parametrize("ext", ["csv", "parquet", "json"])
def test_other_file_types(tmp_path, ext):
    df = pd.DataFrame({"prompt": ["a b", "c d"], "completion": [" e", " f"]})
    path = tmp_path / f"d.{ext}"
    {"csv": lambda: df.to_csv(path, index=False), "parquet": lambda: df.to_parquet(path),
     "json": lambda: df.to_json(path, orient="records")}[ext]()
    assert load_records(str(path)).column_names == ["prompt", "completion"]


def test_unknown_columns_get_a_fix(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"question": "x", "answer": "y"}\n')
    with pytest.raises(QftError, match=r"columns \['answer', 'question'\].*Fix: rename"):
        to_sft(load_records(str(p)))


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(QftError, match="does not exist"):
        load_records(str(tmp_path / "nope.jsonl"))
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(QftError):
        load_records(str(tmp_path / "empty.jsonl"))


def test_default_task_is_balanced_and_held_out():
    train, task = default_task(n_train=200, n_eval=50)
    assert len(train) == 200 and len(task.examples) == 50
    train_prompts = set(train["prompt"])
    assert not any(p in train_prompts for p, _ in task.examples)
    labels = [y for _, y in task.examples]
    assert 0.3 < sum(labels) / len(labels) < 0.7
    assert set(train["completion"]) == set(task.label_words)
    again, task2 = default_task(n_train=200, n_eval=50)
    assert again["prompt"] == train["prompt"] and task2 == task  # generated deterministically
