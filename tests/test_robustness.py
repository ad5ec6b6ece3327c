"""Bad input, through the CLI and the Python API: one line naming the problem and the fix, a non-zero exit, no
traceback, and nothing already saved lost or changed. Also the NaN guard, disk-full saves, pickles, truncation."""

import errno
import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from peft import get_peft_model_state_dict
from transformers import AutoModelForCausalLM, GPTNeoXConfig, LlamaConfig, T5Config, T5ForConditionalGeneration
from typer.testing import CliRunner

from qft.cli.main import app
from qft.errors import QftError
from qft.models import load_adapter
from qft.train import FinetuneConfig, finetune
from tests.conftest import write_jsonl

# transformers warns (FutureWarning) about SFTConfig's gradient_checkpointing argument on every run; that line is
# not qft's to print and would sit beside the one error line.
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")

runner = CliRunner()
QUIET = dict(log=lambda m: None, progress=False)


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def assert_one_line(text: str, prefix: str, *needles, after_progress=None):
    """``text`` is one error line. ``after_progress``: a CliRunner result whose stdout had progress before the
    error (found after loading); then its stderr must be that one line."""
    if after_progress is not None:
        assert "Traceback" not in after_progress.output
        text = after_progress.stderr
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith(prefix), text
    assert "Traceback" not in text and "Fix:" in lines[0], text
    for n in needles:
        assert n in lines[0], lines[0]


def _with_tokenizer(folder: Path, model, tokenizer_from: Path) -> Path:
    model.save_pretrained(folder)
    for f in tokenizer_from.iterdir():
        if "token" in f.name:
            shutil.copy(f, folder / f.name)
    return folder


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_model_dir):
    """A trained adapter (with a checkpoint) that every bad input below must leave untouched, and bad inputs."""
    root = tmp_path_factory.mktemp("robust")
    data = write_jsonl(root / "text.jsonl", "text")
    saved = root / "saved"
    finetune(FinetuneConfig(model=str(tiny_model_dir), data=str(data), output=str(saved), max_steps=1,
                            save_steps=1, batch_size=4), **QUIET)
    w = {"root": root, "tiny": Path(tiny_model_dir), "data": data, "saved": saved,
         "ckpt": saved / "checkpoints" / "checkpoint-1"}

    (root / "empty.jsonl").write_text("")
    (root / "columns.jsonl").write_text('{"question": "a b", "answer": "c"}\n' * 4)
    (root / "weights.txt").write_text("not a model")
    (root / "bad.yaml").write_text("model: [unclosed\nlora_r: 4\n")
    (root / "typo.yaml").write_text("lora_rank: 4\n")
    junk = root / "junk-config"
    junk.mkdir()
    (junk / "config.json").write_text("{not json")
    torn = root / "torn-weights"
    shutil.copytree(tiny_model_dir, torn)
    (torn / "model.safetensors").write_bytes((torn / "model.safetensors").read_bytes()[:1000])
    pickled = root / "pickled-model"
    shutil.copytree(tiny_model_dir, pickled)
    (pickled / "model.safetensors").unlink()
    torch.save(AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict(), pickled / "pytorch_model.bin")
    _with_tokenizer(root / "neox", AutoModelForCausalLM.from_config(GPTNeoXConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)),
        w["tiny"])
    _with_tokenizer(root / "t5", T5ForConditionalGeneration(T5Config(
        vocab_size=128, d_model=64, d_ff=128, num_layers=1, num_heads=4, d_kv=16)), w["tiny"])
    _with_tokenizer(root / "wider", AutoModelForCausalLM.from_config(LlamaConfig(
        vocab_size=128, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128)), w["tiny"])
    torn_ckpt = root / "torn-ckpt"
    shutil.copytree(w["ckpt"], torn_ckpt)
    damage_header(torn_ckpt / "adapter_model.safetensors")
    (root / "a-file").write_text("x")
    return w


def damage_header(path: Path):
    raw = bytearray(path.read_bytes())
    raw[8:16] = b"\x00garbage"  # inside the JSON header that follows the 8-byte length
    path.write_bytes(bytes(raw))


# (case id, FinetuneConfig fields (paths as world keys via "@key"), words the error line must contain).
# Every case also passes --output <the saved adapter> --overwrite: failing must leave it byte for byte as it was.
CASES = [
    ("missing-model", {"model": "@root/missing"}, ["does not exist"]),
    ("model-is-a-file", {"model": "@root/weights.txt"}, ["is a file"]),
    ("config-not-json", {"model": "@root/junk-config"}, ["not valid JSON"]),
    ("weights-torn", {"model": "@root/torn-weights"}, ["damaged"]),
    ("weights-pickled", {"model": "@root/pickled-model"}, ["pickle", "--allow-pickle"]),
    ("not-causal-lm", {"model": "@root/t5"}, ["not a causal language model"]),
    ("qst-unsupported-arch", {"model": "@root/neox", "method": "qst"}, ["QST does not support", "gpt_neox"]),
    ("empty-dataset", {"data": "@root/empty.jsonl"}, ["is empty"]),
    ("wrong-columns", {"data": "@root/columns.jsonl"}, ["none of the known formats"]),
    ("missing-data", {"data": "@root/nothing.jsonl"}, ["does not exist"]),
    ("rank-zero", {"lora_r": 0}, ["--lora-r"]),
    ("qst-rank-zero", {"method": "qst", "side_reduction": 0}, ["side reduction"]),
    ("density-above-one", {"method": "spiel", "density": "1.5"}, ["density"]),
    ("density-unreadable", {"method": "spiel", "density": "abc"}, ["density"]),
    ("bits", {"method": "peqa", "bits": 5}, ["bits=5"]),
    ("sparsity", {"method": "sparse-mezo", "density": "1.5"}, ["--density"]),
    ("zo-eps", {"method": "mezo", "zo_eps": 0.0}, ["eps"]),
    ("weight-decay", {"weight_decay": 1.5}, ["--weight-decay"]),
    ("unknown-method", {"method": "qlroa"}, ["did you mean 'qlora'"]),
    ("output-unwritable", {"output": "/sys/qft-robustness-out"}, ["not writable"]),
    ("output-under-a-file", {"output": "@root/a-file/out"}, ["is a file"]),
    ("resume-nothing", {"output": "@root/fresh", "resume": "auto"}, ["no checkpoint"]),
    ("resume-torn-adapter", {"resume": "@root/torn-ckpt"}, ["damaged"]),
    ("resume-wrong-base", {"model": "@root/wider", "resume": "@ckpt"}, ["does not fit", "size mismatch"]),
]


def resolve(world, fields: dict) -> dict:
    out = {"model": str(world["tiny"]), "data": str(world["data"]), "output": str(world["saved"]),
           "max_steps": 1, "batch_size": 4, "overwrite": True}
    for k, v in fields.items():
        if isinstance(v, str) and v.startswith("@"):
            key, _, rest = v[1:].partition("/")
            v = str(world[key] / rest) if rest else str(world[key])
        out[k] = v
    return out


def cli_args(fields: dict) -> list[str]:
    args = ["finetune"]
    for k, v in fields.items():
        flag = "--" + k.replace("_", "-")
        if v is True:
            args.append(flag)
        else:
            args += [flag, str(v)]
    return args


@pytest.mark.parametrize("name,fields,needles", CASES, ids=[c[0] for c in CASES])
def test_bad_input(world, name, fields, needles):
    before = snapshot(world["saved"])
    fields = resolve(world, fields)
    res = runner.invoke(app, cli_args(fields))
    assert res.exit_code == 2, res.output
    # a checkpoint is checked against the model when the Trainer loads it, after the evaluation before training
    assert_one_line(res.output, "error:", *needles, after_progress=res if name == "resume-wrong-base" else None)
    with pytest.raises(QftError) as err:
        finetune(FinetuneConfig(**fields), **QUIET)
    assert_one_line(str(err.value), "", *needles)
    assert snapshot(world["saved"]) == before
    assert not [p.name for p in world["root"].iterdir() if p.name.startswith(".")]  # no staging left behind


def test_bad_yaml(world):
    res = runner.invoke(app, ["finetune", "--config", str(world["root"] / "bad.yaml")])
    assert res.exit_code == 2
    assert_one_line(res.output, "error:", "not valid YAML", "line 2")  # where the parser gives up
    res = runner.invoke(app, ["finetune", "--config", str(world["root"] / "typo.yaml")])
    assert_one_line(res.output, "error:", "lora_rank", "lora_r")
    with pytest.raises(QftError, match="did you mean 'lora_r'"):
        FinetuneConfig.from_dict({"lora_rank": 4})


def test_adapter_loading_checks(world, tmp_path):
    """qft.models.load_adapter: wrong base, damaged header, pickles refused unless allowed."""
    saved = world["saved"]
    wider = AutoModelForCausalLM.from_pretrained(world["root"] / "wider")
    with pytest.raises(QftError, match="does not fit") as err:
        load_adapter(wider, saved)
    assert "\n" not in str(err.value)

    torn = tmp_path / "torn"
    shutil.copytree(saved, torn, ignore=shutil.ignore_patterns("checkpoints"))
    damage_header(torn / "adapter_model.safetensors")
    with pytest.raises(QftError, match="damaged"):
        load_adapter(AutoModelForCausalLM.from_pretrained(world["tiny"]), torn)

    good = load_adapter(AutoModelForCausalLM.from_pretrained(world["tiny"]), saved)
    state = get_peft_model_state_dict(good)
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(saved / "adapter_config.json", pickled)
    torch.save(state, pickled / "adapter_model.bin")
    with pytest.raises(QftError, match="pickle"):
        load_adapter(AutoModelForCausalLM.from_pretrained(world["tiny"]), pickled)
    allowed = load_adapter(AutoModelForCausalLM.from_pretrained(world["tiny"]), pickled, allow_pickle=True)
    for k, v in get_peft_model_state_dict(allowed).items():
        assert torch.equal(v, state[k]), k

    # the CLI's model loading refuses a pickled base unless --allow-pickle
    res = runner.invoke(app, cli_args(resolve(world, {"model": "@root/pickled-model", "output": str(tmp_path / "o"),
                                                      "allow_pickle": True})))
    assert res.exit_code == 0, res.output
    assert (tmp_path / "o" / "adapter_model.safetensors").exists() and not list((tmp_path / "o").glob("*.bin"))


@pytest.mark.parametrize("via", ["peft", "json"])
def test_disk_full_during_save_keeps_the_previous_adapter(world, tmp_path, monkeypatch, via):
    out = tmp_path / "adapter"
    shutil.copytree(world["saved"], out, ignore=shutil.ignore_patterns("checkpoints"))
    before = snapshot(out)

    def no_space(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    if via == "peft":  # half a file, then ENOSPC (safetensors writes from Rust, so patch its Python entry)
        import peft.peft_model

        def half_then_full(tensors, filename, metadata=None):
            Path(filename).write_bytes(b"\0" * 100)
            no_space()

        monkeypatch.setattr(peft.peft_model, "safe_save_file", half_then_full)
    else:  # the JSON records are written by qft itself through a Python file object
        import qft.io

        real_fdopen = qft.io.os.fdopen

        class FullFile:
            def __init__(self, f):
                self.f = f

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                self.f.close()

            def write(self, data):
                no_space()

        monkeypatch.setattr(qft.io.os, "fdopen",
                            lambda fd, mode, *a, **k: FullFile(real_fdopen(fd, mode)) if mode == "wb"
                            else real_fdopen(fd, mode, *a, **k))
    fields = resolve(world, {"output": str(out)})
    res = runner.invoke(app, cli_args(fields))
    assert res.exit_code == 2, res.output
    assert_one_line(res.output, "error:", "no space left on device", "unchanged", after_progress=res)
    with pytest.raises(QftError, match="no space left"):
        finetune(FinetuneConfig(**fields), **QUIET)
    assert snapshot(out) == before
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]  # the staging folder was removed
    load_adapter(AutoModelForCausalLM.from_pretrained(world["tiny"]), out)  # and it still loads


def _poison_after(n_forwards: int):
    """A plan wrapper whose model turns NaN from the (n+1)-th training forward on."""
    import qft.adapters.qlora as qlora

    real_plan = qlora.plan

    def plan(cfg):
        p = real_plan(cfg)
        after = p.after_load

        def poison(model):
            if after is not None:
                after(model)
            calls = [0]

            def hook(module, args, output):  # NaN embeddings: NaN logits, loss and gradients, as in a real blow-up
                if module.training:
                    calls[0] += 1
                    if calls[0] > n_forwards:
                        return output * float("nan")
                return output

            model.get_input_embeddings().register_forward_hook(hook)

        p.after_load = poison
        return p

    return plan


def test_nan_loss_stops_training_and_keeps_the_last_good_checkpoint(world, tmp_path, monkeypatch):
    import qft.adapters.qlora as qlora

    monkeypatch.setattr(qlora, "plan", _poison_after(3))
    out = tmp_path / "run"
    fields = resolve(world, {"output": str(out), "max_steps": 6, "save_steps": 1, "logging_steps": 1})
    res = runner.invoke(app, cli_args(fields))
    assert res.exit_code == 2, res.output
    assert_one_line(res.output, "error:", "became nan at step 4", "checkpoint-3", "--learning-rate", "--resume auto",
                    after_progress=res)
    ckpts = sorted(p.name for p in (out / "checkpoints").iterdir() if p.name.startswith(("checkpoint", ".")))
    assert ckpts == ["checkpoint-1", "checkpoint-2", "checkpoint-3"]  # no checkpoint of a NaN step, no partial
    from safetensors.torch import load_file

    assert all(torch.isfinite(t).all() for t in load_file(out / "checkpoints/checkpoint-3/adapter_model.safetensors")
               .values())
    assert not (out / "adapter_model.safetensors").exists()  # no adapter published from a diverged run
    with pytest.raises(QftError, match="became nan"):
        finetune(FinetuneConfig(**{**fields, "output": str(tmp_path / "py")}), **QUIET)


def test_long_samples_are_truncated_and_reported(world, tmp_path):
    data = tmp_path / "long.jsonl"
    data.write_text("".join(json.dumps({"text": " ".join(["a b c d"] * (4 + i))}) + "\n" for i in range(8)))
    lines = []
    finetune(FinetuneConfig(model=str(world["tiny"]), data=str(data), output=str(tmp_path / "o"), max_steps=1,
                            batch_size=4, max_length=20), log=lines.append, progress=False)
    note = [ln for ln in lines if "truncated" in ln]
    # example i is 16 + 4i tokens (the tiny word-level tokenizer adds no special tokens): i >= 2 exceed 20
    assert len(note) == 1 and "6 of 8 examples" in note[0] and "(longest 44)" in note[0], lines
