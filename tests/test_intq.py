"""PEQA's integer quantizer (qft/quant/intq.py): bit packing at 2/3/4 bits, RTN error bounds, bad settings."""

import os
from pathlib import Path

import pytest
import torch

from qft.errors import QftError
from qft.quant.intq import (SUPPORTED_BITS, dequantize, expand_groups, pack_bits, pack_bits_reference,
                            packed_nbytes, quantize_rtn, reduce_groups, unpack_bits)

SHARED = Path(os.environ.get("QFT_SHARED", Path(__file__).resolve().parents[2] / "shared"))
STORIES = SHARED / "models" / "stories260K"


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
@pytest.mark.parametrize("numel", [1, 7, 8, 64, 1000, 4099])
def test_pack_round_trip_and_matches_bitstring_reference(bits, numel):
    g = torch.Generator().manual_seed(numel * 10 + bits)
    q = torch.randint(0, 2**bits, (numel,), generator=g, dtype=torch.uint8)
    packed = pack_bits(q, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == packed_nbytes(numel, bits)
    assert bytes(packed.tolist()) == pack_bits_reference(q, bits)
    assert torch.equal(unpack_bits(packed, bits, numel), q)


@pytest.mark.parametrize("bits,values,nbytes", [(4, 2, 1), (2, 4, 1), (3, 8, 3)])
def test_packing_uses_exactly_bits_per_value(bits, values, nbytes):
    assert packed_nbytes(values * 1000, bits) == nbytes * 1000  # 3-bit: 3 bytes per 8 values, no waste
    # every code in the first chunk set to its maximum fills every bit of the chunk
    assert pack_bits(torch.full((values,), 2**bits - 1, dtype=torch.uint8), bits).tolist() == [255] * nbytes


def test_pack_refuses_codes_that_do_not_fit():
    with pytest.raises(ValueError, match="do not fit"):
        pack_bits(torch.tensor([8], dtype=torch.uint8), 3)


# Exact RTN errs by at most half a step s/2. The fp16 scale is rounded (relative error <= 2^-11) before the
# integers are chosen, so the top code can saturate by up to (2^bits - 1) * 2^-11 steps: for 4 bits the bound
# is 1 + 2 * 15 / 2048 = 1.015 half steps. Measured: 1.0008 (random weights), 1.0028 (stories260K, 4-bit).
HALF_STEP_BOUND = 1.015


def _max_error_in_half_steps(w, bits, group_size):
    q, s, z = quantize_rtn(w, bits, group_size)
    err = (dequantize(q, s, z, group_size, torch.float32) - w).abs()
    return (err / (expand_groups(s.float(), group_size, w.shape[1]) / 2)).max().item(), q, s, z


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
@pytest.mark.parametrize("group_size", [0, 64, 128, 48])  # 48 doesn't divide 200: a shorter last group
def test_rtn_error_is_at_most_half_a_step(bits, group_size):
    w = torch.randn(32, 200, generator=torch.Generator().manual_seed(bits)) * 0.05
    ratio, q, s, z = _max_error_in_half_steps(w, bits, group_size)
    assert ratio <= HALF_STEP_BOUND
    assert q.dtype == z.dtype == torch.uint8 and int(q.max()) <= 2**bits - 1 and int(z.max()) <= 2**bits - 1
    assert s.dtype == torch.float16 and s.shape == (32, 1 if group_size == 0 else -(-200 // group_size))


def test_error_shrinks_with_bits_and_groups():
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(0))
    rel = {}
    for bits in SUPPORTED_BITS:
        for gs in (0, 64):
            q, s, z = quantize_rtn(w, bits, gs)
            rel[bits, gs] = ((dequantize(q, s, z, gs, torch.float32) - w).norm() / w.norm()).item()
    # Measured relative Frobenius error (Gaussian weights): 2-bit 0.55/0.46, 3-bit 0.24/0.19, 4-bit 0.110/0.091
    # (per channel / groups of 64).
    assert rel[2, 0] > rel[3, 0] > rel[4, 0] and all(rel[b, 64] < rel[b, 0] for b in SUPPORTED_BITS)
    assert rel[4, 64] < 0.1 and rel[3, 64] < 0.21 and rel[2, 64] < 0.5


def test_all_zero_groups_get_a_valid_scale_and_stay_exact():
    w = torch.zeros(4, 128)
    w[1, 64:] = 0.25  # one non-zero group beside all-zero ones
    q, s, z = quantize_rtn(w, 3, 64)
    assert bool((s > 0).all()) and bool(torch.isfinite(s).all())
    w_hat = dequantize(q, s, z, 64, torch.float32)
    assert torch.equal(w_hat[:, :64], w[:, :64]) and torch.equal(w_hat[[0, 2, 3]], w[[0, 2, 3]])


def test_reduce_groups_is_the_adjoint_of_expand_groups():
    g = torch.Generator().manual_seed(0)
    for gs, n in ((0, 1), (64, 3), (48, 3)):  # 130 inputs: 64+64+2, 48+48+34
        a, b = torch.randn(5, n, generator=g, dtype=torch.float64), torch.randn(5, 130, generator=g, dtype=torch.float64)
        lhs = (expand_groups(a, gs, 130) * b).sum()
        torch.testing.assert_close(lhs, (a * reduce_groups(b, gs)).sum())


@pytest.mark.parametrize("bits", [1, 5, 8])
def test_unsupported_bits_are_refused(bits):
    with pytest.raises(QftError, match="--bits 2, 3 or 4"):
        quantize_rtn(torch.randn(4, 64), bits, 64)


@pytest.mark.parametrize("group_size", [-1, 1.5, True])
def test_bad_group_sizes_are_refused(group_size):
    with pytest.raises(QftError, match="--group-size"):
        quantize_rtn(torch.randn(4, 64), 4, group_size)


@pytest.mark.skipif(not (STORIES / "config.json").exists(), reason="../shared/models/stories260K absent")
def test_error_on_the_real_stories260k_weights():
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(STORIES, dtype=torch.float32)
    linears = {n: m.weight.detach() for n, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and n != "lm_head"}
    assert any(w.shape[1] % 64 for w in linears.values())  # down_proj has 172 inputs: padded last group
    rel = {}
    for bits in SUPPORTED_BITS:
        num = den = 0.0
        for w in linears.values():
            ratio, q, s, z = _max_error_in_half_steps(w, bits, 64)
            assert ratio <= HALF_STEP_BOUND
            num += (dequantize(q, s, z, 64, torch.float32) - w).norm().item() ** 2
            den += w.norm().item() ** 2
        rel[bits] = (num / den) ** 0.5
    # Measured relative error over all 35 linear layers, groups of 64: 2-bit 0.445, 3-bit 0.191, 4-bit 0.089
    # (per channel: 0.463, 0.199, 0.093).
    assert rel[2] < 0.5 and rel[3] < 0.21 and rel[4] < 0.1 and rel[4] < rel[3] < rel[2]


@pytest.mark.parametrize("bits,group_size", [(2, 0), (3, 32), (4, 64)])
def test_codes_recovered_from_a_dequantized_fp16_weight_are_exact(bits, group_size):
    from qft.quant.intq import codes_from_dequantized

    w = torch.randn(16, 128, generator=torch.Generator().manual_seed(bits)) * 0.1
    q, s, z = quantize_rtn(w, bits, group_size)
    w16 = dequantize(q, s, z, group_size, torch.float16)  # what another quantizer hands over
    q2, z2 = codes_from_dequantized(w16, s, group_size, bits)
    assert torch.equal(q2.int() - expand_groups(z2, group_size, 128).int(),
                       q.int() - expand_groups(z, group_size, 128).int())  # q − z is what W and ∂L/∂s use
    with pytest.raises(QftError, match="not integer multiples"):
        codes_from_dequantized(w16 + 0.3 * s.float().max(), s, group_size, bits)
