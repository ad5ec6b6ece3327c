import json
import os

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    from tests.tiny import save_tiny

    return save_tiny("llama", tmp_path_factory.mktemp("tiny-llama"))


def _words(i):
    letters = "abcdefghijklmnopqrstuvwxyz"
    return " ".join(letters[(i + k) % 26] for k in range(5))


ROWS = {
    "text": lambda i: {"text": _words(i)},
    "prompt_completion": lambda i: {"prompt": _words(i), "completion": " " + _words(i + 1)},
    "alpaca": lambda i: {"instruction": _words(i), "input": _words(i + 2) if i % 2 else "", "output": _words(i + 1)},
    "messages": lambda i: {"messages": [{"role": "user", "content": _words(i)},
                                        {"role": "assistant", "content": _words(i + 1)}]},
}


def write_jsonl(path, fmt, n=24):
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps(ROWS[fmt](i)) + "\n")
    return path


@pytest.fixture
def jsonl(tmp_path):
    return lambda fmt, n=24: write_jsonl(tmp_path / f"{fmt}.jsonl", fmt, n)
