"""PEQA over real gptqmodel checkpoints (the optional `gptq` extra; skipped where gptqmodel is absent).

gptqmodel quantizes the tiny model with GPTQ on calibration data (on the CPU), qft loads the checkpoint with
gptqmodel's torch kernel, converts each layer to its packed integers exactly, and trains only the scales.
"""

import json

import pytest
import torch
from typer.testing import CliRunner

gptqmodel = pytest.importorskip("gptqmodel")


@pytest.fixture(scope="module")
def gptq_dir(tmp_path_factory):
    import os

    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")  # its CPU thread pool refuses fewer on 2 cores
    root = tmp_path_factory.mktemp("gptq")
    here = os.getcwd()
    os.chdir(root)  # gptqmodel writes a logs/ folder into the working directory
    try:
        yield _quantize(root)
    finally:
        os.chdir(here)


def _quantize(root):
    from qft.cli.main import app
    from tests.tiny import save_tiny

    src = save_tiny("llama", root / "float")
    data = root / "calib.jsonl"
    data.write_text("".join(json.dumps({"text": " ".join("abcdefghij"[(i + k) % 10] for k in range(20))}) + "\n"
                            for i in range(32)))

    r = CliRunner().invoke(app, ["quantize", "--bits", "4", "--group-size", "32", "--gptq-calibration", str(data),
                                 str(src), str(root / "gptq")])
    assert r.exit_code == 0, r.output
    assert "GPTQ, 4-bit" in r.output
    short = root / "short.jsonl"
    short.write_text('{"text": "a b"}\n')
    r = CliRunner().invoke(app, ["quantize", "--gptq-calibration", str(short), str(src), str(root / "x")])
    assert r.exit_code != 0 and "shorter than 10 tokens" in r.output and not (root / "x").exists()
    return root


def test_gptq_checkpoint_converts_exactly_and_trains_only_the_scales(gptq_dir):
    from peft import get_peft_model

    from qft.adapters.peqa import PeqaLinear, plan
    from qft.adapters.peqa.gptq import load_gptq
    from qft.train import FinetuneConfig

    qc = json.loads((gptq_dir / "gptq" / "config.json").read_text())["quantization_config"]
    assert (qc["quant_method"], qc["bits"], qc["group_size"], qc["desc_act"]) == ("gptq", 4, 32, False)
    reference = load_gptq(str(gptq_dir / "gptq"))
    gptq_q = reference.model.layers[0].self_attn.q_proj
    p = plan(FinetuneConfig(method="peqa", bits=4, group_size=32))
    model = get_peft_model(p.load_base(str(gptq_dir / "gptq")), p.peft_config)
    peqa_q = model.base_model.model.model.layers[0].self_attn.q_proj
    assert isinstance(peqa_q, PeqaLinear)
    # the integers and scales are GPTQ's own: the same dequantized weight
    torch.testing.assert_close(peqa_q.get_base_layer().dequantize_weight(dtype=torch.float32),
                               gptq_q.dequantize_weight().T.float(), rtol=0, atol=1e-3)
    ids = torch.randint(3, 100, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits.float(), reference(input_ids=ids).logits.float(),
                                   rtol=2e-2, atol=2e-2)
    trainable = [n for n, p_ in model.named_parameters() if p_.requires_grad]
    assert trainable and all("peqa_scales" in n for n in trainable)
    before = {n: p_.detach().clone() for n, p_ in model.named_parameters()}
    opt = torch.optim.AdamW([p_ for p_ in model.parameters() if p_.requires_grad], lr=1e-2)
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    changed = {n for n, p_ in model.named_parameters() if not torch.equal(p_, before[n])}
    assert changed and all("peqa_scales" in n for n in changed)


def test_finetune_cli_on_a_gptq_checkpoint(gptq_dir, tmp_path):
    from qft.cli.main import app
    from tests.conftest import write_jsonl

    data = write_jsonl(tmp_path / "d.jsonl", "prompt_completion", n=16)
    out = tmp_path / "adapter"
    r = CliRunner().invoke(app, ["finetune", "--method", "peqa", "--bits", "4", "--group-size", "32", "--model",
                                 str(gptq_dir / "gptq"), "--data", str(data), "--max-steps", "2", "--output", str(out)])
    assert r.exit_code == 0, r.output
    assert (out / "adapter_model.safetensors").exists()
    r = CliRunner().invoke(app, ["finetune", "--method", "peqa", "--bits", "3", "--group-size", "32", "--model",
                                 str(gptq_dir / "gptq"), "--data", str(data), "--max-steps", "2", "--output",
                                 str(tmp_path / "x")])
    assert r.exit_code != 0 and "pass --bits 4 --group-size 32" in r.output
