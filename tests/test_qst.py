"""QST (qft.adapters.qst): the shared method checks plus what a side network must guarantee.

- the backbone never gets a gradient and saves no tensor for backward (saved_tensors_hooks);
- the output equals the base exactly at init (the paper's output gate starts at 1), also on families beyond
  the shared table (Mistral, Qwen3, Gemma, Gemma 2 with logit soft-capping, GPT-2);
- save -> load gives identical outputs and the adapter holds only the side network;
- generate() runs and equals greedy decoding by full forwards;
- `qft finetune --method qst` end to end; unsupported architectures and bad options give one-line errors.
"""

import copy
import json

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import (AutoModelForCausalLM, AutoModelForSeq2SeqLM, GemmaConfig, Gemma2Config, GPT2Config,
                          MistralConfig, Qwen3Config, T5Config)

from qft.adapters.qst import QstConfig
from qft.adapters.qst.functional import (pool_hidden, pool_hidden_reference, side_attention,
                                         side_attention_mask, side_attention_reference)
from qft.errors import QftError
from tests.common import ALL_CHECKS, MethodCase, logits, perturb_adapter
from tests.test_methods import _float_base, _nf4_base
from tests.tiny import FAMILIES, VOCAB, tiny_inputs, tiny_model


def _qst(**kw):
    return lambda: QstConfig(r=4, **kw)


CASES = [
    *(MethodCase("qst", f, _float_base, _qst(), "qst_") for f in FAMILIES),
    *(MethodCase("qst-nf4", f, _nf4_base, _qst(), "qst_") for f in FAMILIES),
    *(MethodCase(f"qst-{d}", "llama", _float_base, _qst(downsample=d), "qst_") for d in ("pool", "maxpool", "linear")),
    MethodCase("qst-input-norm", "llama", _float_base, _qst(input_norm=True), "qst_"),
    MethodCase("qst-uniform-attention", "llama", _float_base, _qst(uniform_attention=True), "qst_"),
    MethodCase("qst-standardize", "llama", _float_base, _qst(standardize=True, input_norm=True), "qst_"),
    *(MethodCase(f"qst-readout-{r}", "llama", _float_base, _qst(readout=r, gate_init=2.0, gate_scale=10.0), "qst_")
      for r in ("mean", "token+mean")),
]


@pytest.mark.parametrize("check", list(ALL_CHECKS))
@pytest.mark.parametrize("case", CASES, ids=str)
def test_method(case, check, tmp_path):
    if check == "merge":
        # A side network has no weight delta to fold into the LLM: merging is refused with a one-line error.
        model = get_peft_model(case.make_base(case.family), case.make_config())
        with pytest.raises(QftError, match="cannot be merged"):
            model.merge_and_unload()
        return
    fn = ALL_CHECKS[check]
    fn(case, tmp_path) if check == "save_load" else fn(case)


def _perturbed(family="llama", **kw):
    model = get_peft_model(tiny_model(family), QstConfig(r=4, **kw))
    perturb_adapter(model, "qst_", scale=0.2)
    return model


def test_backbone_gets_no_gradient_and_saves_nothing_for_backward():
    model = _perturbed()
    decoder = model.get_base_model().get_decoder()
    x = tiny_inputs(model)
    saved = {"backbone": 0, "side": 0}
    phase = ["side"]

    def enter(*_):
        phase[0] = "backbone"

    def leave(*_):
        phase[0] = "side"

    # layer-level hooks: they fire inside the decoder's own forward, i.e. exactly the backbone part
    hooks = [m.register_forward_pre_hook(enter) for m in decoder.layers if hasattr(decoder, "layers")]
    hooks += [m.register_forward_hook(leave) for m in decoder.layers]

    def pack(t):
        saved[phase[0]] += 1
        return t

    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(**x, labels=x["input_ids"]).loss
    for h in hooks:
        h.remove()
    loss.backward()
    assert saved["backbone"] == 0, f"{saved['backbone']} tensors saved for backward inside the backbone"
    assert saved["side"] > 0  # the hook does see the side network's saved tensors
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad and all(".qst_side.qst_net." in n for n in with_grad)
    assert all(p.grad is None for n, p in model.named_parameters() if "qst_" not in n)
    # the hidden states the side network reads carry no autograd history
    out = model(**x, output_hidden_states=True)
    assert all(h.grad_fn is None for h in out.hidden_states) and out.logits.grad_fn is not None


# Families beyond the shared table. Gemma 2 soft-caps its logits after the head: the model's own head code runs
# on the side network's output, so init equality covers that path too.
EXTRA = {
    "mistral": lambda: MistralConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2),
    "qwen3": lambda: Qwen3Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, head_dim=16),
    "gemma": lambda: GemmaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, head_dim=16),
    "gemma2": lambda: Gemma2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                   final_logit_softcapping=3.0),
    "gpt2": lambda: GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=64,
                               bos_token_id=1, eos_token_id=2),
}


@pytest.mark.parametrize("family", list(EXTRA))
def test_more_families_init_and_train(family):
    def make():
        torch.manual_seed(0)
        return AutoModelForCausalLM.from_config(EXTRA[family]()).eval()

    x = tiny_inputs(make())
    model = get_peft_model(make(), QstConfig(r=4))
    torch.testing.assert_close(logits(model, x), logits(make(), x), atol=0, rtol=0)
    perturb_adapter(model, "qst_", scale=0.2)
    model.train()
    model(**x, labels=x["input_ids"]).loss.backward()
    assert all(p.grad is None for n, p in model.named_parameters() if "qst_" not in n)
    assert model.base_model.model.qst_side.qst_net["default"].beta.grad is not None


def test_adapter_file_holds_only_the_side_network(tmp_path):
    model = _perturbed()
    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    side = {n: p for n, p in model.named_parameters() if "qst_" in n}
    assert len(saved) == len(side) and all(".qst_side.qst_net." in k for k in saved)
    assert sum(t.numel() for t in saved.values()) == sum(p.numel() for p in side.values())
    assert json.loads((tmp_path / "adapter_config.json").read_text())["peft_type"] == "QST"


@pytest.mark.parametrize("readout", ["token", "mean"])
def test_generate_matches_greedy_full_forwards(readout):
    model = _perturbed(readout=readout).eval()
    x = tiny_inputs(model, batch=2, seq=6)
    out = model.generate(**x, max_new_tokens=5, min_new_tokens=5, do_sample=False, pad_token_id=0)  # no early EOS
    assert out.shape == (2, 11)
    with torch.no_grad():  # each new token is the argmax of a full forward over everything before it
        full = model(input_ids=out, attention_mask=torch.ones_like(out)).logits
    full[..., model.generation_config.eos_token_id] = float("-inf")  # what min_new_tokens does
    torch.testing.assert_close(full[:, 5:-1].argmax(-1), out[:, 6:], atol=0, rtol=0)
    with pytest.raises(QftError, match="KV cache"):
        model.generate(**x, max_new_tokens=3, do_sample=False, pad_token_id=0, use_cache=True)


@pytest.mark.parametrize("readout", ["token", "mean", "token+mean"])
def test_padding_does_not_change_real_positions(readout):
    model = _perturbed(readout=readout).eval()
    x = tiny_inputs(model, batch=1, seq=8)
    padded = {"input_ids": torch.cat([x["input_ids"], torch.zeros(1, 3, dtype=torch.long)], 1),
              "attention_mask": torch.cat([x["attention_mask"], torch.zeros(1, 3, dtype=torch.long)], 1)}
    # right padding: the real positions see the same keys (measured max diff 0.0; 1e-5 leaves room for kernels)
    torch.testing.assert_close(logits(model, padded)[:, :8], logits(model, x), atol=1e-5, rtol=0)
    left = {k: torch.cat([torch.zeros(1, 3, dtype=torch.long), v], 1) for k, v in x.items()}
    left["input_ids"][:, :3] = 5  # left padding, as in batched evaluation: the real positions' outputs stay
    torch.testing.assert_close(logits(model, left)[:, 3:], logits(model, x), atol=1e-4, rtol=1e-4)


def test_standardize_keeps_running_statistics_of_the_real_tokens_but_the_first(tmp_path):
    """The first training batch sets each layer's running mean and variance from its real tokens other than each
    sequence's first (a massive activation there changes nothing); later batches move them by the momentum; eval
    standardises by them; and they are saved with the adapter, so a reloaded model gives the same outputs."""
    from qft.adapters.qst.layer import STANDARD_MOMENTUM

    torch.manual_seed(0)
    model = get_peft_model(tiny_model("llama"), QstConfig(r=4, standardize=True))
    net = model.base_model.model.qst_side.qst_net["default"]
    states = [torch.randn(2, 5, 64) for _ in range(len(net.down))]
    mask = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]])
    states[2][0, 0] *= 1000.0  # a massive activation on a first token
    states[2][1, 2] *= 1000.0
    final = torch.randn(2, 5, 64)
    net.train()
    net(states, final, mask)
    keep = torch.tensor([[0, 1, 1, 1, 1], [0, 0, 0, 1, 1]]).bool()
    for i, h in enumerate(states):
        torch.testing.assert_close(net.state_mean[i], h[keep].mean(0))
        torch.testing.assert_close(net.state_var[i], h[keep].var(0))
    again = [torch.randn(2, 5, 64) for _ in states]
    net(again, final, None)  # no mask: every position is real, each row's first left out
    rows = again[1][:, 1:].reshape(-1, 64)
    expect = states[1][keep].mean(0).lerp(rows.mean(0), STANDARD_MOMENTUM)
    torch.testing.assert_close(net.state_mean[1], expect)
    assert int(net.state_batches) == 2
    net.eval()
    with torch.no_grad():
        net.beta.fill_(0.5 / net.output_gate_scale)
    x = tiny_inputs(model)
    before = logits(model, x)
    assert net.state_mean.abs().sum() > 0 and torch.isfinite(before).all()
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_model("llama"), tmp_path).eval()
    torch.testing.assert_close(logits(loaded, x), before, atol=0, rtol=0)


def test_mean_readout_is_the_causal_mean_of_the_real_positions():
    from qft.adapters.qst.layer import read_out

    side = torch.randn(2, 5, 3)
    mask = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]])
    mean = read_out(side, mask, "mean")
    torch.testing.assert_close(mean[0, 3], side[0, :4].mean(0))
    torch.testing.assert_close(mean[1, 4], side[1, 2:].mean(0))
    assert mean[1, :2].abs().max() == 0  # left padding before the first real token
    both = read_out(side, mask, "token+mean")
    torch.testing.assert_close(both, torch.cat([side, mean], -1))
    assert read_out(side, mask, "token") is side


def test_disable_and_unload_give_the_base_back():
    base = tiny_model("llama")
    x = tiny_inputs(base)
    expected = logits(base, x)
    model = _perturbed()
    assert not torch.equal(logits(model, x), expected)
    with model.disable_adapter():
        torch.testing.assert_close(logits(model, x), expected, atol=0, rtol=0)
    plain = copy.deepcopy(model).unload()
    assert not hasattr(plain, "qst_side") and "forward" not in plain.get_decoder().__dict__
    torch.testing.assert_close(logits(plain, x), expected, atol=0, rtol=0)
    assert plain.generation_config.use_cache is True


def test_unsupported_architectures_get_a_one_line_error():
    t5 = AutoModelForSeq2SeqLM.from_config(T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=1,
                                                    num_heads=4, decoder_start_token_id=0))
    with pytest.raises(QftError, match="encoder-decoder") as err:
        get_peft_model(t5, QstConfig(r=4))
    assert "llama" in str(err.value) and "gpt2" in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("kw, needle", [
    ({"r": 0}, "at least 1"), ({"downsample": "conv"}, "unknown QST downsample"), ({"dropout": 1.5}, "dropout"),
    ({"activation": "nope"}, "unknown activation"), ({"task_type": "SEQ_CLS"}, "CAUSAL_LM"),
    ({"num_heads": 3}, "not divisible"), ({"r": 128}, "is 0"), ({"output_gate_scale": 0}, "output_gate_scale"),
    ({"gate_scale": -1}, "gate_scale"), ({"readout": "max"}, "unknown QST readout"),
])
def test_bad_options(kw, needle):
    with pytest.raises(QftError, match=needle):
        get_peft_model(tiny_model("llama"), QstConfig(**{"r": 4, **kw}))


def test_output_gate_is_stored_scaled_down():
    """out = (1 - beta) h_L + beta up(side), beta = output_gate_scale x the stored parameter."""
    model = get_peft_model(tiny_model("llama"), QstConfig(r=4, output_gate_scale=10.0))
    net = model.base_model.model.qst_side.qst_net["default"]
    x = tiny_inputs(model)
    base = logits(model, x)
    with torch.no_grad():
        net.beta.fill_(0.1)  # beta = 1: the head reads the side network alone
        side_only = logits(model, x)
        net.output_gate_scale = 1.0  # the same parameter, unscaled: beta = 0.1
        mixed = logits(model, x)
    # the head is linear, so the logits mix like the states: 0.9 base + 0.1 side
    torch.testing.assert_close(mixed, 0.9 * base + 0.1 * side_only, atol=1e-4, rtol=1e-4)


def test_layer_gates_start_at_gate_init_and_move_gate_scale_times_faster():
    """The per-layer gate is sigmoid(stored x gate_scale): it starts at sigmoid(gate_init) whatever the scale, and
    one Adam step (whose size is about the learning rate) moves its logit gate_scale times as far."""
    moved = {}
    for scale in (1.0, 10.0):
        torch.manual_seed(0)
        model = get_peft_model(tiny_model("llama"), QstConfig(r=4, gate_init=2.0, gate_scale=scale))
        net = model.base_model.model.qst_side.qst_net["default"]
        torch.testing.assert_close(net.gates * net.gate_scale, torch.full_like(net.gates, 2.0))
        with torch.no_grad():
            net.beta.fill_(0.5 / net.output_gate_scale)  # let the side network reach the output
        opt = torch.optim.Adam([net.gates], lr=1e-2)
        model(**tiny_inputs(model)).logits.float().pow(2).mean().backward()
        opt.step()
        moved[scale] = (net.gates.detach() * net.gate_scale - 2.0).abs()
        assert (moved[scale] > 0).all()
    torch.testing.assert_close(moved[10.0], 10 * moved[1.0], rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("downsample", ["lora", "pool"])
def test_input_norm_makes_the_side_network_blind_to_each_tokens_scale(downsample):
    """With input_norm, a token's hidden state scaled by 1000 (a massive activation) feeds the downsample the same
    input; without it, the side network's output moves."""
    torch.manual_seed(0)
    states = [torch.randn(2, 5, 64) for _ in range(3)]
    final = torch.randn(2, 5, 64)
    louder = [h.clone() for h in states]
    for h in louder:
        h[:, 0] *= 1000.0
    for norm in (True, False):
        net = get_peft_model(tiny_model("llama"), QstConfig(r=4, downsample=downsample, input_norm=norm))
        side = net.base_model.model.qst_side.qst_net["default"]
        with torch.no_grad():
            side.beta.fill_(0.1 / side.output_gate_scale)
            a, b = side(states, final, None), side(louder, final, None)
        if norm:
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
        else:
            assert (a - b).abs().max() > 1e-2


def test_uniform_attention_starts_as_a_causal_mean():
    """With uniform_attention, each side block's attention output at position t is the mean of the values at
    positions <= t (queries and keys start at zero)."""
    from qft.adapters.qst.layer import SideBlock

    torch.manual_seed(0)
    block = SideBlock(32, 4, 2, 0.0, uniform_attention=True).eval()
    s = torch.randn(2, 6, 32)
    mask = side_attention_mask(None, 2, 6, "cpu")
    q, k, v = block.qkv(block.norm1(s)).view(2, 6, 3, 4, 8).permute(2, 0, 3, 1, 4)
    assert q.abs().max() == 0 and k.abs().max() == 0
    causal_mean = v.cumsum(2) / torch.arange(1, 7).view(1, 1, 6, 1)
    torch.testing.assert_close(side_attention(q, k, v, mask), causal_mean, atol=1e-6, rtol=1e-5)
    assert SideBlock(32, 4, 2, 0.0).qkv.weight[:64].abs().max() > 0  # the default keeps PyTorch's random init


def test_pool_matches_reference():
    x = torch.randn(2, 3, 70)  # 70 is not a multiple of the widths below: uneven bins
    for width in (7, 16, 70):
        for mode in ("avg", "max"):
            torch.testing.assert_close(pool_hidden(x, width, mode), pool_hidden_reference(x, width, mode),
                                       atol=1e-6, rtol=0)  # measured max diff 1.5e-7 (summation order)


def test_side_attention_matches_reference():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 9, 8, generator=g) for _ in range(3))
    mask = side_attention_mask(torch.tensor([[1] * 9, [0] * 3 + [1] * 6]), 2, 9, "cpu")  # left padding in row 2
    fast, slow = side_attention(q, k, v, mask), side_attention_reference(q, k, v, mask)
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=0)  # measured max diff 2.4e-7
    assert torch.isfinite(fast).all()


def test_finetune_cli_end_to_end(tiny_model_dir, jsonl, tmp_path):
    from typer.testing import CliRunner

    from qft.cli.main import app

    out = tmp_path / "qst"
    res = CliRunner().invoke(app, [str(a) for a in (
        "finetune", "--model", tiny_model_dir, "--data", jsonl("prompt_completion"), "--method", "qst",
        "--side-reduction", 4, "--downsample", "pool", "--output", out, "--max-steps", 3, "--batch-size", 4,
        "--learning-rate", 5e-4, "--side-readout", "token+mean", "--side-gate-init", 2, "--side-gate-scale", 10,
        "--side-standardize")])
    assert res.exit_code == 0, res.output
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "QST" and cfg["r"] == 4 and cfg["downsample"] == "pool"
    new = ("readout", "gate_init", "gate_scale", "standardize")
    assert tuple(cfg[k] for k in new) == ("token+mean", 2.0, 10.0, True)
    assert json.loads((out / "qft_quantization.json").read_text())["quant_type"] == "nf4"
    assert json.loads((out / "qft_run.json").read_text())["stats"]["steps"] == 3
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), out)
    # training moved the output gate away from "LLM only", and the side network stayed float32 (TRL casts a
    # quantized model's trainable parameters to bf16; qft's callback casts the side network back)
    assert loaded.base_model.model.qst_side.qst_net["default"].beta.item() != 0.0
    saved = load_file(out / "adapter_model.safetensors")
    assert {t.dtype for t in saved.values()} == {torch.float32}
    x = tiny_inputs(loaded)
    assert torch.isfinite(logits(loaded, x)).all()
