"""qft keeps bitsandbytes' standard 4-bit layout on CPU, so eval -> train -> merge interleave safely."""

import torch

from qft.quant import dequantize_nf4, keep_bnb_layout
from tests.test_methods import _nf4_base
from tests.tiny import tiny_inputs


def _q_proj(model):
    return model.model.layers[0].self_attn.q_proj


def test_eval_forward_does_not_repack_weights():
    model = _nf4_base("llama")
    before = dequantize_nf4(_q_proj(model).weight).clone()
    with torch.no_grad():
        model(**tiny_inputs(model))
    layer = _q_proj(model)
    assert not getattr(layer.weight.quant_state, "packing_format_for_cpu", False)
    import bitsandbytes as bnb

    torch.testing.assert_close(bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state), before)


def test_keep_layout_undoes_an_existing_repack():
    model = _nf4_base("llama")
    layer = _q_proj(model)
    before = dequantize_nf4(layer.weight).clone()
    layer.support_avx512bf16_for_cpu = True  # let bitsandbytes repack, as stock loading does
    with torch.no_grad():
        model(**tiny_inputs(model))
    # bitsandbytes' CPU layout rounds the block scales (to bf16), so a repack round trip costs a little:
    # measured at most 0.51% relative on this model; the tolerance is 1%
    bf16_scales = dict(rtol=1e-2, atol=1e-6)
    if getattr(layer.weight.quant_state, "packing_format_for_cpu", False):  # CPUs without AVX512-BF16 don't
        torch.testing.assert_close(dequantize_nf4(layer.weight), before, **bf16_scales)
    assert keep_bnb_layout(model) > 0
    assert not getattr(layer.weight.quant_state, "packing_format_for_cpu", False)
    torch.testing.assert_close(dequantize_nf4(layer.weight), before, **bf16_scales)
