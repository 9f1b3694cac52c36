"""Low-bit experts (layers/moe/lowbit.py): exact bit accounting, dequantized weights are codebook
entries, and a codebook holding every distinct weight group leaves the MoE's output unchanged."""

from __future__ import annotations

import math

import pytest
import torch

from layers.moe import MoE
from layers.moe.lowbit import LowBitSpec, bits_per_weight, quantize_experts_, quantize_linear_, quantize_matrix

D, H, E = 8, 16, 4


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def test_vq_bits_per_weight_and_codebook_entries():
    w = torch.randn(3, 12, 8)  # (E, out, in): 288 weights, 72 groups of 4
    q = quantize_matrix(w, LowBitSpec("vq", group=4, codebook_size=16, kmeans_iters=5))
    assert q.codebook.shape == (16, 4) and q.codes.shape == (72,)
    assert q.code_bits == 72 * 4 and q.overhead_bits == 16 * 4 * 16
    assert q.bits_per_weight == pytest.approx((72 * 4 + 16 * 4 * 16) / 288)
    groups = q.values.reshape(-1, 4)
    assert torch.equal(groups, q.codebook[q.codes])  # every group is exactly the entry its code names
    # nearest entry: no other entry is closer to the original group
    d = torch.cdist(w.reshape(-1, 4), q.codebook)
    assert torch.allclose(d.gather(1, q.codes[:, None]).squeeze(1), d.min(1).values)


def test_fsq_bits_per_weight_and_grid_values():
    w = torch.randn(2, 6, 10)
    spec = LowBitSpec("fsq", group=2, levels=5)
    q = quantize_matrix(w, spec)
    assert q.codebook.shape == (25, 2) and q.codes.shape == (60,)
    assert q.code_bits == 60 * math.ceil(math.log2(25))  # 5 bits per pair of weights
    assert q.overhead_bits == 12 * 16  # one fp16 scale per row
    assert q.bits_per_weight == pytest.approx((60 * 5 + 12 * 16) / 120)
    unit = q.values / q.scales
    assert torch.allclose(unit.reshape(-1, 2), q.codebook[q.codes])
    assert torch.allclose(torch.round(unit * 2), unit * 2, atol=1e-6)  # grid {-1, -.5, 0, .5, 1}
    assert (q.values - w).abs().max() <= 0.25 * q.scales.max() + 1e-6  # half a step at most
    with pytest.raises(ValueError, match="odd"):
        LowBitSpec("fsq", levels=4)


def test_full_codebook_leaves_the_moe_output_unchanged():
    moe = MoE(D, num_experts=E, top_k=2, hidden_dim=H).eval()
    with torch.no_grad():  # weights whose groups of 4 take only 6 distinct values per tensor
        for p in (moe.experts.w_in, moe.experts.w_out):
            table = torch.randn(6, 4)
            t = p.transpose(1, 2)
            p.copy_(table[torch.randint(0, 6, (t.numel() // 4,))].reshape(t.shape).transpose(1, 2))
    x = torch.randn(2, 5, D)
    before = moe(x)[0]
    quantized = quantize_experts_(moe.experts, LowBitSpec("vq", group=4, codebook_size=6))
    assert torch.equal(moe(x)[0], before)
    n = E * D * 2 * H + E * H * D
    assert bits_per_weight(quantized) == pytest.approx((n // 4 * 3 + 2 * 6 * 4 * 16) / n)


def test_coarse_quantization_changes_the_output_and_linear_is_quantized_in_place():
    moe = MoE(D, num_experts=E, top_k=2, hidden_dim=H).eval()
    x = torch.randn(2, 5, D)
    before = moe(x)[0]
    quantize_experts_(moe.experts, LowBitSpec("fsq", group=1, levels=3))
    assert not torch.allclose(moe(x)[0], before)
    lin = torch.nn.Linear(D, H, bias=False)
    q = quantize_linear_(lin, LowBitSpec("fsq", group=1, levels=3))
    assert torch.equal(lin.weight, q.values) and q.bits_per_weight == pytest.approx(2 + 16 / D)
