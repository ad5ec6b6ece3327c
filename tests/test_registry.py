"""qft's registry makes an out-of-tree method a first-class peft method (peft 0.21's PeftType check)."""

import json

import pytest
import torch
from peft import PeftConfig, PeftModel, get_peft_model
from peft.utils.peft_types import PeftType

import qft  # noqa: F401  (import registers qft's methods)
from qft.registry import add_peft_type, register_method
from tests.tiny import tiny_model, tiny_inputs
from tests.toy_method import RowScaleConfig, RowScaleModel


def test_peft_type_member_behaves_like_builtin():
    member = add_peft_type("rowscale")
    assert PeftType.ROWSCALE is member is PeftType("ROWSCALE") is PeftType["ROWSCALE"]
    assert member in list(PeftType) and member == "ROWSCALE"
    assert add_peft_type("rowscale") is member  # idempotent
    assert PeftType.LORA in list(PeftType)  # built-ins untouched


def test_registering_twice_is_harmless_but_conflicts_are_refused():
    register_method(name="rowscale", config_cls=RowScaleConfig, model_cls=RowScaleModel)
    with pytest.raises(ValueError, match="already registered"):
        register_method(name="rowscale", config_cls=PeftConfig, model_cls=RowScaleModel)


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_toy_method_round_trips_through_stock_peft(tmp_path, family):
    torch.manual_seed(0)
    base = tiny_model(family)
    x = tiny_inputs(base)
    targets = ["q_proj", "v_proj"] if family == "llama" else ["fc1"]
    cfg = RowScaleConfig(target_modules=targets, task_type="CAUSAL_LM")
    model = get_peft_model(base, cfg)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "rowscale_g" in n:
                p.uniform_(0.5, 1.5)
    model.eval()
    expected = model(**x).logits

    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "ROWSCALE"
    assert (tmp_path / "adapter_model.safetensors").exists()

    torch.manual_seed(0)
    loaded = PeftModel.from_pretrained(tiny_model(family), tmp_path).eval()
    assert isinstance(loaded.peft_config["default"], RowScaleConfig)
    torch.testing.assert_close(loaded(**x).logits, expected, rtol=0, atol=0)


def test_push_to_hub_uploads_the_adapter(monkeypatch):
    """push_to_hub goes through huggingface_hub; capture the commit it would make (no network)."""
    import huggingface_hub
    import transformers.utils.hub as tf_hub

    uploaded = {}

    def fake_create_repo(self, repo_id, **kw):
        return huggingface_hub.RepoUrl(f"https://huggingface.co/{repo_id}")

    def fake_create_commit(self, repo_id, operations, **kw):
        uploaded["repo"] = repo_id
        uploaded["files"] = sorted(op.path_in_repo for op in operations)

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", fake_create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "create_commit", fake_create_commit)
    monkeypatch.setattr(tf_hub, "create_and_tag_model_card", lambda *a, **k: huggingface_hub.ModelCard("---\n---\n"))
    model = get_peft_model(tiny_model("llama"), RowScaleConfig(target_modules=["q_proj"]))
    model.push_to_hub("someone/rowscale-test", token="hf_fake")
    assert uploaded["repo"] == "someone/rowscale-test"
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(uploaded["files"])
