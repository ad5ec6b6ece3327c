"""`qft push`: the exact files and model card that would be uploaded (HfApi monkeypatched, no network)."""

import json

import huggingface_hub
import pytest
from typer.testing import CliRunner

from qft.cli.main import app
from qft.hub import model_card, reproduce_command

runner = CliRunner()


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    from qft.train import FinetuneConfig, finetune
    from tests.conftest import write_jsonl
    from tests.tiny import save_tiny

    tmp = tmp_path_factory.mktemp("push")
    base = save_tiny("llama", tmp / "base")
    data = write_jsonl(tmp / "d.jsonl", "text", 24)
    cfg = FinetuneConfig(model=str(base), data=str(data), method="qlora", output=str(tmp / "out"), max_steps=2,
                         batch_size=4, lora_r=4)
    finetune(cfg, log=lambda m: None, progress=False)
    return tmp / "out", cfg


@pytest.fixture
def hub(monkeypatch):
    sent = {}

    def create_repo(self, repo_id, **kw):
        sent["token"], sent["private"] = self.token, kw.get("private")
        return huggingface_hub.RepoUrl(f"https://huggingface.co/{repo_id}")

    def create_commit(self, repo_id, operations, **kw):
        sent["repo"] = repo_id
        sent["files"] = {}
        for op in operations:
            src = op.path_or_fileobj
            sent["files"][op.path_in_repo] = src if isinstance(src, bytes) else open(src, "rb").read()

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "create_commit", create_commit)
    return sent


def test_push_uploads_adapter_and_card(adapter, hub):
    out, cfg = adapter
    res = runner.invoke(app, ["push", str(out), "me/tiny-qlora", "--token", "hf_fake", "--private"])
    assert res.exit_code == 0, res.output
    assert hub["repo"] == "me/tiny-qlora" and hub["token"] == "hf_fake" and hub["private"] is True
    assert set(hub["files"]) == {"README.md", "adapter_config.json", "adapter_model.safetensors", "qft_run.json",
                                 "qft_quantization.json"}
    assert hub["files"]["adapter_model.safetensors"] == (out / "adapter_model.safetensors").read_bytes()
    card = hub["files"]["README.md"].decode()
    assert card == model_card(out, "me/tiny-qlora")
    run = json.loads((out / "qft_run.json").read_text())
    expected_cmd = (f"qft finetune --model {cfg.model} --data {cfg.data} --output {cfg.output} --max-steps 2 "
                    "--batch-size 4 --lora-r 4")
    for needle in ("library_name: peft", f"base_model: {cfg.model}", "- qlora", "Dettmers et al., 2023",
                   f"| data | {cfg.data} |", f"| eval_loss | {run['eval_loss_before']:.4f} | "
                   f"{run['eval_loss_after']:.4f} |", expected_cmd, "AutoPeftModelForCausalLM.from_pretrained('me/tiny-qlora')"):
        assert needle in card, needle


def test_reproduce_command_round_trips():
    cmd = reproduce_command({"method": "spiel", "quantize_base": True, "double_quant": False, "density": "0.05",
                             "overwrite": True, "output": "o u t"})
    assert cmd == "qft finetune --method spiel --output 'o u t' --no-double-quant --density 0.05 --quantize-base"


def test_push_without_token_says_how_to_log_in(adapter, hub, monkeypatch, tmp_path):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path))  # no saved token either
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    res = runner.invoke(app, ["push", str(adapter[0]), "me/x"])
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert res.exit_code != 0 and len(lines) == 1 and "hf auth login" in lines[0] and "HF_TOKEN" in lines[0]
    assert "repo" not in hub  # nothing was uploaded


def test_push_config_file_and_unknown_key(adapter, hub, tmp_path):
    good = tmp_path / "push.yaml"
    good.write_text(f"adapter: {adapter[0]}\nrepo_id: me/from-yaml\ntoken: hf_fake\n")
    res = runner.invoke(app, ["push", "--config", str(good)])
    assert res.exit_code == 0, res.output
    assert hub["repo"] == "me/from-yaml"
    bad = tmp_path / "bad.yaml"
    bad.write_text("repo_idd: me/x\n")
    res = runner.invoke(app, ["push", "--config", str(bad)])
    assert res.exit_code != 0 and "did you mean 'repo_id'" in res.output
