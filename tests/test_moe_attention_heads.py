"""Mixture of Attention Heads (layers/moe/attention_heads.py) against the MoA formula per token,
gradients included, and the causal mask."""

from __future__ import annotations

import math

import pytest
import torch

from layers.moe import MixtureOfAttentionHeads

D, E, H = 8, 4, 6


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def direct(moa: MixtureOfAttentionHeads, x: torch.Tensor) -> torch.Tensor:
    """y_t = sum_{i in top-k} softmax(top-k logits)_i softmax(x_t Wq^i (X Wk)^T / sqrt(d)) (X Wv) Wo^i,
    keys restricted to s <= t when causal."""
    b, t, _ = x.shape
    wk, wv = moa.w_kv.weight[:H], moa.w_kv.weight[H:]
    out = torch.zeros_like(x)
    for bi in range(b):
        keys, values = x[bi] @ wk.t(), x[bi] @ wv.t()
        for ti in range(t):
            logits = (x[bi, ti].float() @ moa.router.weight.float().t()).to(x.dtype)
            top = logits.topk(moa.top_k)
            w = top.values.softmax(-1)
            last = ti + 1 if moa.causal else t
            for wi, i in zip(w, top.indices.tolist()):
                q = x[bi, ti] @ moa.w_q[i]
                a = (q @ keys[:last].t() / math.sqrt(H)).softmax(-1)
                out[bi, ti] = out[bi, ti] + wi * (a @ values[:last]) @ moa.w_o[i]
    return out


@pytest.mark.parametrize("causal", [True, False])
def test_output_and_gradients_match_the_formula(causal):
    moa = MixtureOfAttentionHeads(D, num_experts=E, top_k=2, head_dim=H, causal=causal).double()
    x = torch.randn(2, 5, D, dtype=torch.double, requires_grad=True)
    y, aux = moa(x)
    want = direct(moa, x)
    assert torch.allclose(y, want, atol=1e-6)
    params = [x, *moa.parameters()]
    for a, b in zip(torch.autograd.grad(y.square().sum(), params), torch.autograd.grad(want.square().sum(), params)):
        assert torch.allclose(a, b, atol=1e-6)
    assert aux["load"].sum().item() == pytest.approx(1.0) and aux["loss"].item() > 0
    assert moa.causal_safe == causal


def test_causal_output_ignores_the_future():
    moa = MixtureOfAttentionHeads(D, num_experts=E, top_k=2, head_dim=H, causal=True)
    x = torch.randn(1, 6, D)
    y = moa(x)[0]
    x2 = x.clone()
    x2[:, 4:] = torch.randn(1, 2, D)
    assert torch.allclose(moa(x2)[0][:, :4], y[:, :4], atol=1e-6)
