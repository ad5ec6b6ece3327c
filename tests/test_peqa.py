"""PEQA (qft/adapters/peqa): the scale gradient, the shared method checks, the adapter's contents, quantized
model folders (`qft quantize`), merging, `qft finetune --method peqa`, and bad input.

The shared "init" check compares the PEQA model at init with the base it was given. Two kinds of rows:
- "peqa" rows get a float base, which PEQA quantizes; at init the model equals the RTN-quantized base, not
  the float one, so the tolerance is the quantization error itself: measured max |logit error| of the 4-bit,
  group-64 tiny models against their float weights 0.068-0.075 (llama, qwen2, opt; seed 0); tolerance 0.15.
- "peqa-int" rows get an already-quantized base (IntLinear layers); there PEQA's init must be exact (atol 0).
Merging copies the trained scales into the integer layer, the same computation: merge tolerance 0 for both.
"""

import json

import pytest
import torch
import typer
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file
from typer.testing import CliRunner

from qft.adapters.peqa import IntLinear, PeqaConfig, PeqaLinear, load_quantized, quantize_model, save_quantized
from qft.adapters.peqa.layer import ScaleOnlyLinear, scale_only_linear_reference
from qft.adapters.peqa.storage import WEIGHTS_FILE
from qft.cli.quantize import quantize_command
from qft.errors import QftError
from qft.quant.intq import pack_bits, quantize_rtn
from tests.common import ALL_CHECKS, MethodCase, logits, perturb_adapter
from tests.tiny import FAMILIES, tiny_inputs, tiny_model

MARKER = "peqa_scales"
INIT_ATOL_FLOAT_BASE = 0.15  # 2x the measured 4-bit RTN logit error (module docstring)


def _config(bits=4, group_size=64, **kw):
    return PeqaConfig(bits=bits, group_size=group_size, task_type="CAUSAL_LM", **kw)


def _int_base(family, bits=4, group_size=64):
    model = tiny_model(family)
    quantize_model(model, bits, group_size)
    return model


CASES = [
    *(MethodCase("peqa", f, tiny_model, _config, MARKER, init_atol=INIT_ATOL_FLOAT_BASE, merge_atol=0.0)
      for f in FAMILIES),
    *(MethodCase("peqa-int", f, _int_base, _config, MARKER, init_atol=0.0, merge_atol=0.0) for f in FAMILIES),
]


@pytest.mark.parametrize("check", list(ALL_CHECKS))
@pytest.mark.parametrize("case", CASES, ids=str)
def test_shared_checks(case, check, tmp_path):
    fn = ALL_CHECKS[check]
    fn(case, tmp_path) if check == "save_load" else fn(case)


# --- the layer -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits,group_size,in_f", [(2, 0, 64), (4, 0, 40), (3, 16, 64), (4, 32, 64), (3, 24, 40)])
def test_scale_gradient_matches_autograd_in_float64(bits, group_size, in_f):
    g = torch.Generator().manual_seed(bits * 100 + group_size)
    w = torch.randn(24, in_f, generator=g, dtype=torch.float64)
    q, s, z = quantize_rtn(w, bits, group_size)
    s = s.double()
    x = torch.randn(3, 5, in_f, generator=g, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(24, generator=g, dtype=torch.float64)
    grad_out = torch.randn(3, 5, 24, generator=g, dtype=torch.float64)

    s_ref = s.clone().requires_grad_(True)
    y_ref = scale_only_linear_reference(x, s_ref, q, z, group_size, bias)
    gx_ref, gs_ref = torch.autograd.grad(y_ref, (x, s_ref), grad_out)

    s_fast = s.clone().requires_grad_(True)
    y = ScaleOnlyLinear.apply(x, s_fast, pack_bits(q, bits), z, bias, (bits, group_size, 24, in_f))
    gx, gs = torch.autograd.grad(y, (x, s_fast), grad_out)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=1e-12)  # measured: 0 to 4e-15
    torch.testing.assert_close(gx, gx_ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(gs, gs_ref, rtol=1e-12, atol=1e-12)


def test_backward_keeps_no_dense_weight():
    """Between forward and backward the graph holds x, the scales and the packed integers, nothing (out, in)."""
    layer = IntLinear.from_linear(torch.nn.Linear(128, 96), bits=3, group_size=64)
    peqa = PeqaLinear(layer, "default")
    x = torch.randn(4, 128, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        peqa(x).sum().backward()
    assert all(tuple(t.shape) != (96, 128) for t in saved)
    assert any(t.dtype == torch.uint8 and t.numel() == 96 * 128 * 3 // 8 for t in saved)  # 3 bits per weight
    assert peqa.peqa_scales["default"].grad is not None


def test_per_channel_backward_keeps_the_output_not_the_input():
    """One scale per row: the scale gradient is reduced from the saved output, so the input is not kept."""
    layer = IntLinear.from_linear(torch.nn.Linear(128, 96), bits=4, group_size=0)
    x = torch.randn(4, 128, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        PeqaLinear(layer, "default")(x).sum().backward()
    shapes = [tuple(t.shape) for t in saved]
    assert (4, 96) in shapes and (4, 128) not in shapes and (96, 128) not in shapes


def test_training_changes_only_the_scales_and_the_adapter_holds_only_scales(tmp_path):
    model = get_peft_model(tiny_model("llama"), _config(bits=3, group_size=64))
    ints = {n: b.clone() for n, b in model.named_buffers() if n.endswith((".packed", ".zeros", ".scales"))}
    frozen = {n: p.clone() for n, p in model.named_parameters() if not p.requires_grad}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    x = tiny_inputs(model)
    model.train()
    for _ in range(2):
        model(**x, labels=x["input_ids"]).loss.backward()
        opt.step()
        opt.zero_grad()
    assert all(torch.equal(b, dict(model.named_buffers())[n]) for n, b in ints.items())
    assert all(torch.equal(p, dict(model.named_parameters())[n]) for n, p in frozen.items())
    assert all(MARKER in n for n, p in model.named_parameters() if p.requires_grad)

    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert saved and all(k.endswith(".peqa_scales") for k in saved)  # no integers, zero points or biases
    n_linear = 2 * 7  # 2 layers x (q, k, v, o, gate, up, down)
    assert len(saved) == n_linear
    scales = sum(t.numel() for t in saved.values())
    float_weights = sum(m.weight.numel() for n, m in tiny_model("llama").named_modules()
                        if isinstance(m, torch.nn.Linear) and n != "lm_head")
    assert scales * 64 == float_weights  # one scale per 64 weights
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "PEQA" and cfg["bits"] == 3 and cfg["group_size"] == 64


def test_adapter_onto_a_base_with_other_settings_is_refused(tmp_path):
    model = get_peft_model(tiny_model("llama"), _config(bits=3, group_size=64))
    model.save_pretrained(tmp_path)
    with pytest.raises(QftError, match="quantized to 4 bits in groups of 64.*expects 3 bits"):
        PeftModel.from_pretrained(_int_base("llama", bits=4, group_size=64), tmp_path)
    with pytest.raises(QftError, match="in groups of 32.*groups of 64"):
        PeftModel.from_pretrained(_int_base("llama", bits=3, group_size=32), tmp_path)


@pytest.mark.parametrize("kwargs,needle", [
    ({"bits": 5}, "--bits 2, 3 or 4"),
    ({"bits": 8}, "--bits 2, 3 or 4"),
    ({"group_size": -64}, "--group-size"),
])
def test_bad_settings_are_refused(kwargs, needle):
    with pytest.raises(QftError, match=needle):
        _config(**{"bits": 4, "group_size": 64, **kwargs})


def test_non_linear_targets_are_refused():
    with pytest.raises(QftError, match="'model.embed_tokens' is of type Embedding"):
        get_peft_model(tiny_model("llama"), _config(target_modules=["embed_tokens"]))


def test_float_weights_are_freed_once_quantized():
    import gc
    import weakref

    base = tiny_model("llama")
    refs = [weakref.ref(m.weight) for n, m in base.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    model = get_peft_model(base, _config())
    gc.collect()
    assert refs and all(r() is None for r in refs)  # only the integers, zero points and scales remain
    assert isinstance(model.base_model.model.lm_head, torch.nn.Linear)  # the head stays float


def test_group_size_that_does_not_divide_pads_the_last_group():
    model = get_peft_model(tiny_model("llama"), _config(bits=4, group_size=48))  # 64 inputs: 48 + 16
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.peqa_scales["default"].shape == (64, 2)
    assert torch.isfinite(logits(model, tiny_inputs(model))).all()


# --- quantized model folders, merge, CLI -----------------------------------------------------------------


def _quantize_cli():
    app = typer.Typer()
    app.callback()(lambda: None)  # keep `quantize` a sub-command, as in qft's app
    app.command("quantize")(quantize_command)
    return app


def test_quantize_cli_peqa_on_top_and_merged_model_round_trip(tiny_model_dir, tmp_path):
    out = tmp_path / "llama-3bit"
    runner = CliRunner()
    res = runner.invoke(_quantize_cli(), ["quantize", "--bits", "3", "--group-size", "32", str(tiny_model_dir),
                                          str(out)])
    assert res.exit_code == 0, res.output
    assert "14 integer layers" in res.output
    record = json.loads((out / "qft_quantization.json").read_text())
    assert record["method"] == "peqa-intq" and record["bits"] == 3 and record["group_size"] == 32
    assert (out / "tokenizer.json").exists() and not (out / "model.safetensors").exists()
    tensors = load_file(out / WEIGHTS_FILE)
    packed = tensors["model.layers.0.self_attn.q_proj.packed"]
    assert packed.dtype == torch.uint8 and packed.numel() == 64 * 64 * 3 // 8
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # staging folder gone

    # the folder loads back to exactly what quantizing in memory gives
    from transformers import AutoModelForCausalLM

    in_memory = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    quantize_model(in_memory, 3, 32)
    base = load_quantized(out)
    x = tiny_inputs(base)
    torch.testing.assert_close(logits(base, x), logits(in_memory, x), rtol=0, atol=0)

    # PEQA on top; merge gives a self-contained integer model that saves and reloads identically
    model = get_peft_model(base, _config(bits=3, group_size=32))
    perturb_adapter(model, MARKER)
    expected = logits(model, x)
    merged = model.merge_and_unload()
    assert not any(isinstance(m, PeqaLinear) for m in merged.modules())
    torch.testing.assert_close(logits(merged, x), expected, rtol=0, atol=0)
    save_quantized(merged, tmp_path / "merged")
    torch.testing.assert_close(logits(load_quantized(tmp_path / "merged"), x), expected, rtol=0, atol=0)

    # refusals: an existing folder, other settings than asked
    again = runner.invoke(_quantize_cli(), ["quantize", "--bits", "3", str(tiny_model_dir), str(out)])
    assert again.exit_code != 0 and "already holds a quantized model" in again.output
    assert "Traceback" not in again.output
    with pytest.raises(QftError, match="pass --bits 3 --group-size 32"):
        load_quantized(out, expect=(4, 64))
    bad = runner.invoke(_quantize_cli(), ["quantize", "--bits", "5", str(tiny_model_dir), str(tmp_path / "b")])
    assert bad.exit_code != 0 and "--bits 2, 3 or 4" in bad.output


def test_tied_embeddings_survive_save_and_load(tmp_path):
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    quantize_model(model, 2, 0)
    record = save_quantized(model, tmp_path / "q")
    assert record["aliases"] == {"lm_head.weight": "model.embed_tokens.weight"}
    loaded = load_quantized(tmp_path / "q")
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    x = tiny_inputs(model)
    torch.testing.assert_close(logits(loaded, x), logits(model, x), rtol=0, atol=0)


def test_finetune_cli_peqa_end_to_end(tiny_model_dir, jsonl, tmp_path):
    from transformers import AutoModelForCausalLM

    import qft.adapters.peqa  # noqa: F401  (registers PEQA with peft, for loading below)
    from qft.cli.main import app

    out = tmp_path / "adapter"
    res = CliRunner().invoke(app, ["finetune", "--model", str(tiny_model_dir), "--data", str(jsonl("text")),
                                   "--method", "peqa", "--bits", "4", "--group-size", "64", "--output", str(out),
                                   "--max-steps", "3", "--batch-size", "4", "--logging-steps", "1"])
    assert res.exit_code == 0, res.output
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "PEQA" and cfg["bits"] == 4 and cfg["group_size"] == 64
    quant = json.loads((out / "qft_quantization.json").read_text())
    assert quant["method"] == "peqa-intq" and quant["bits"] == 4 and quant["group_size"] == 64
    run = json.loads((out / "qft_run.json").read_text())
    assert run["stats"]["steps"] == 3
    saved = load_file(out / "adapter_model.safetensors")
    assert all(k.endswith(".peqa_scales") for k in saved)
    # the trained scales differ from the RTN ones: loading onto the float base re-quantizes, then applies them
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), out)
    layer = loaded.base_model.model.model.layers[0].self_attn.q_proj
    assert not torch.equal(layer.peqa_scales["default"], layer.base_layer.scales)


def test_plan_validates_and_describes_the_base(tiny_model_dir):
    from qft.adapters.peqa import plan
    from qft.train import FinetuneConfig

    p = plan(FinetuneConfig(method="peqa", bits=3, group_size=128))
    assert p.peft_config.bits == 3 and p.peft_config.group_size == 128
    assert p.describe_base()["bits"] == 3
    with pytest.raises(QftError, match="--bits 2, 3 or 4"):
        plan(FinetuneConfig(method="peqa", bits=6))
    model = p.load_base(str(tiny_model_dir))
    assert any(isinstance(m, torch.nn.Linear) for m in model.modules())  # float; PEQA quantizes it


# --- GPTQ bases (gptqmodel is optional and not installed here) ---------------------------------------------


class _GptqStandIn(torch.nn.Module):
    """Exposes what qft reads from a gptqmodel torch-kernel layer: in/out features, bits, group_size, g_idx,
    scales (n_groups, out), bias, dequantize_weight() -> (in, out). gptqmodel's own packing is not exercised."""

    def __init__(self, w, bits, group_size):
        super().__init__()
        q, s, z = quantize_rtn(w, bits, group_size)
        self.out_features, self.in_features = w.shape
        self.bits, self.group_size = bits, group_size
        self.qweight = self.qzeros = torch.zeros(1, dtype=torch.int32)
        self.g_idx = torch.arange(self.in_features, dtype=torch.int32) // group_size
        self.scales = s.T.contiguous()
        self.bias = None
        self._w = (s.float().repeat_interleave(group_size, 1) * (q.float() - z.float().repeat_interleave(
            group_size, 1))).half()

    def dequantize_weight(self):
        return self._w.T


_GptqStandIn.__module__ = "gptqmodel.nn_modules.qlinear.torch"


def test_gptq_layer_converts_exactly_and_trains_scales():
    from qft.adapters.peqa.gptq import int_linear_from_gptq

    w = torch.randn(48, 64, generator=torch.Generator().manual_seed(0))
    gptq = _GptqStandIn(w, bits=3, group_size=32)
    layer = int_linear_from_gptq(gptq)
    assert (layer.bits, layer.group_size) == (3, 32)
    torch.testing.assert_close(layer.dequantize_weight(dtype=torch.float32), gptq._w.float(), rtol=0, atol=1e-3)
    wrapped = torch.nn.Sequential(gptq)
    model = get_peft_model(wrapped, PeqaConfig(bits=3, group_size=32, target_modules=["0"]))
    assert isinstance(model.base_model.model[0], PeqaLinear)
    with pytest.raises(QftError, match="expects 4 bits"):
        get_peft_model(torch.nn.Sequential(_GptqStandIn(w, 3, 32)), PeqaConfig(bits=4, group_size=32,
                                                                                  target_modules=["0"]))
    gptq.g_idx = gptq.g_idx.flip(0)  # act-order: groups no longer contiguous
    with pytest.raises(QftError, match="desc_act=False"):
        int_linear_from_gptq(gptq)


def test_gptq_checkpoint_without_gptqmodel_is_a_clear_error(tmp_path):
    pytest.importorskip("transformers")
    try:
        import gptqmodel  # noqa: F401
        pytest.skip("gptqmodel is installed")
    except ImportError:
        pass
    from qft.adapters.peqa import plan
    from qft.train import FinetuneConfig

    (tmp_path / "config.json").write_text(json.dumps(
        {"model_type": "llama", "quantization_config": {"quant_method": "gptq", "bits": 4, "group_size": 128}}))
    with pytest.raises(QftError, match="pip install gptqmodel"):
        plan(FinetuneConfig(method="peqa", bits=4, group_size=128)).load_base(str(tmp_path))


def test_finetune_cli_on_a_quantized_folder(tiny_model_dir, jsonl, tmp_path):
    from qft.cli.main import app

    qdir = tmp_path / "q"
    assert CliRunner().invoke(_quantize_cli(), ["quantize", "--bits", "2", "--group-size", "0", str(tiny_model_dir),
                                                str(qdir)]).exit_code == 0
    args = ["finetune", "--model", str(qdir), "--data", str(jsonl("text")), "--method", "peqa", "--max-steps", "2",
            "--batch-size", "4"]
    wrong = CliRunner().invoke(app, [*args, "--output", str(tmp_path / "a0")])  # default --bits 4 --group-size 128
    assert wrong.exit_code != 0 and "pass --bits 2 --group-size 0" in wrong.output
    not_linear = CliRunner().invoke(app, [*args, "--bits", "2", "--group-size", "0", "--target-modules", "embed_tokens",
                                          "--output", str(tmp_path / "a1")])
    assert not_linear.exit_code != 0 and "is of type Embedding" in not_linear.output
    assert "Traceback" not in not_linear.output
    res = CliRunner().invoke(app, [*args, "--bits", "2", "--group-size", "0", "--output", str(tmp_path / "a")])
    assert res.exit_code == 0, res.output
    quant = json.loads((tmp_path / "a" / "qft_quantization.json").read_text())
    assert quant["quantized_base"] == str(qdir) and quant["bits"] == 2 and quant["group_size"] == 0
    loaded = PeftModel.from_pretrained(load_quantized(qdir), tmp_path / "a")
    assert any(isinstance(m, PeqaLinear) for m in loaded.modules())


def test_disabled_adapter_is_the_quantized_base_and_adapters_switch():
    base = _int_base("llama")
    x = tiny_inputs(base)
    expected_base = logits(base, x)
    model = get_peft_model(base, _config())
    perturb_adapter(model, MARKER)
    tuned = logits(model, x)
    assert not torch.equal(tuned, expected_base)
    with model.disable_adapter():
        torch.testing.assert_close(logits(model, x), expected_base, rtol=0, atol=0)
    model.add_adapter("other", _config())  # a second set of scales, starting from the base's
    model.set_adapter("other")
    torch.testing.assert_close(logits(model, x), expected_base, rtol=0, atol=0)
    model.set_adapter("default")
    torch.testing.assert_close(logits(model, x), tuned, rtol=0, atol=0)


def test_gptq_quantize_without_gptqmodel_is_a_clear_error(tiny_model_dir, tmp_path):
    try:
        import gptqmodel  # noqa: F401
        pytest.skip("gptqmodel is installed")
    except ImportError:
        pass
    from qft.cli.main import app

    data = tmp_path / "calib.jsonl"
    data.write_text(json.dumps({"text": " ".join("abcdefghij" * 2)}) + "\n")
    r = CliRunner().invoke(app, ["quantize", "--gptq-calibration", str(data), str(tiny_model_dir), str(tmp_path / "q")])
    assert r.exit_code != 0 and "pip install gptqmodel" in r.output and not (tmp_path / "q").exists()


def test_parameter_count_includes_the_packed_integer_weights():
    from qft.callbacks import count_parameters

    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.Linear(32, 8))
    _, float_total = count_parameters(model)
    peft_model = get_peft_model(model, PeqaConfig(bits=3, group_size=16, target_modules=["0", "1"]))
    trainable, total = count_parameters(peft_model)
    assert trainable == 32 * 4 + 8 * 2  # the scales: one per row and group
    assert total == float_total - 32 - 8 + trainable  # integers counted as weights; biases are buffers now
