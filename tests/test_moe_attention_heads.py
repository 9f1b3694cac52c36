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


# --- MoA in the transformer's attention slot -------------------------------------------------------
MOA_SPEC = {"target": "layers.moe.MixtureOfAttentionHeads", "params": {"num_experts": 4, "top_k": 2}}


def test_moa_fills_the_attention_slot_with_rotary_and_matches_the_formula_without_positions():
    from layers.transformer import Transformer

    net = Transformer(16, depth=2, heads=2, causal=True, positions="none", max_len=6, attention=MOA_SPEC,
                      attention_every=2).double()
    moa = net.blocks[1].attn
    assert isinstance(moa, MixtureOfAttentionHeads) and moa.head_dim == 8 and moa.causal
    assert not isinstance(net.blocks[0].attn, MixtureOfAttentionHeads)  # every 2nd block only
    x = torch.randn(2, 6, 16, dtype=torch.double)
    y, aux = moa(x)
    torch.testing.assert_close(y, direct_with(moa, x))
    out, aux = net(x)
    assert "layer1/attn/load" in aux and aux["aux_loss"] > 0  # the slot's balance loss reaches the total


def direct_with(moa: MixtureOfAttentionHeads, x: torch.Tensor) -> torch.Tensor:
    global H
    saved, H = H, moa.head_dim  # the formula above reads the module-level head size
    try:
        return direct(moa, x)
    finally:
        H = saved


def test_ar_prior_with_moa_attention_caches_exactly_what_teacher_forcing_computes(monkeypatch):
    """KV-cached sampling through MoA (rotary queries and the one shared, cached key/value head) sees the
    teacher-forced logits at every step, and cached and uncached sampling draw the same codes."""
    import stage2.ar as ar
    from helpers import SYNTHETIC_SPEC
    from stage2.ar import ARPrior

    torch.manual_seed(0)
    spec = {**SYNTHETIC_SPEC, "grid": [2, 3]}
    model = ARPrior(code_spec=spec, num_classes=3, dim=32, depth=2, heads=4, positions="rope1d",
                    attention=MOA_SPEC).eval()
    assert all(isinstance(b.attn, MixtureOfAttentionHeads) for b in model.transformer.blocks)
    seen: list[torch.Tensor] = []
    real = ar.sample_from_logits
    monkeypatch.setattr(ar, "sample_from_logits", lambda logits, *a, **k: seen.append(logits) or real(logits, *a, **k))
    cond = torch.tensor([0, 1, 2, 1])
    codes = model.sample(4, cond=cond, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        forced, _ = model(codes, cond)
    torch.testing.assert_close(torch.stack(seen, dim=1), forced, rtol=1e-5, atol=1e-5)
    g = torch.Generator()
    assert torch.equal(model.sample(4, cond=cond, use_cache=False, generator=g.manual_seed(1)),
                       model.sample(4, cond=cond, generator=g.manual_seed(1)))
    assert model.hparams["attention"] == MOA_SPEC  # stored, so the checkpoint rebuilds the same network


def test_maskgit_with_bidirectional_moa_trains():
    from helpers import SYNTHETIC_SPEC
    from stage2.maskgit import MaskGITPrior

    torch.manual_seed(0)
    model = MaskGITPrior(code_spec={**SYNTHETIC_SPEC, "grid": [2, 3]}, num_classes=3, dim=32, depth=1, heads=4,
                         attention=MOA_SPEC)
    assert model.transformer.blocks[0].attn.causal is False
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    codes, labels = torch.randint(0, 12, (8, 2, 3)), torch.randint(0, 3, (8,))

    def held_out_loss() -> float:  # the same masks each time: the random masking is not what moves it
        torch.manual_seed(123)
        with torch.no_grad():
            return sum(model.loss(codes, labels).loss.item() for _ in range(4)) / 4

    before = held_out_loss()
    for _ in range(60):
        out = model.loss(codes, labels)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    assert held_out_loss() < 0.7 * before
