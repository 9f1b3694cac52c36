"""Multi-Head MoE (layers/moe/multi_head.py) against its formula, gradients included."""

from __future__ import annotations

import pytest
import torch

from layers.instantiate import instantiate
from layers.moe import MultiHeadMoE

D, H, E = 12, 3, 4


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def direct(layer: MultiHeadMoE, x: torch.Tensor) -> torch.Tensor:
    """y = concat_j(sum_{e in top-k} renorm softmax_e FFN_e(sub_j)) W_merge, sub_j the j-th slice of
    x W_head: every sub-token routed on its own."""
    moe, sub = layer.moe, layer.sub_dim
    rows = []
    for xt in x.reshape(-1, D):
        proj = layer.head_proj.weight @ xt
        outs = []
        for j in range(H):
            s = proj[j * sub:(j + 1) * sub]
            p = (s.float() @ moe.router.proj.weight.float().t()).softmax(-1).to(x.dtype)
            top = p.topk(moe.top_k)
            g = top.values / top.values.sum()
            outs.append(sum(gi * moe.experts.expert(int(e), s[None])[0] for gi, e in zip(g, top.indices)))
        rows.append(layer.merge_proj.weight @ torch.cat(outs))
    return torch.stack(rows).reshape(x.shape)


def test_sub_tokens_are_routed_separately_and_merged():
    layer = MultiHeadMoE(D, heads=H, num_experts=E, top_k=2, hidden_dim=8).double()
    x = torch.randn(2, 5, D, dtype=torch.double, requires_grad=True)
    y, aux = layer(x)
    want = direct(layer, x)
    assert torch.allclose(y, want, atol=1e-6)
    params = [x, *layer.parameters()]
    for a, b in zip(torch.autograd.grad(y.square().sum(), params), torch.autograd.grad(want.square().sum(), params)):
        assert torch.allclose(a, b, atol=1e-6)
    assert aux["load"].shape == (E,) and aux["load"].sum().item() == pytest.approx(1.0)
    # The 3 sub-tokens of one token reach different experts: up to heads * top_k experts per token.
    r = layer.moe.route(layer.head_proj(x).reshape(2, 5 * H, D // H))
    per_token = [set(r.expert_idx[(r.token_idx // H) == t].tolist()) for t in range(10)]
    assert max(len(s) for s in per_token) > 2


def test_single_token_decoding_and_yaml():
    spec = {"target": "layers.moe.MultiHeadMoE", "params": {"heads": 4, "num_experts": 4, "top_k": 1}}
    layer = instantiate(spec, dim=16).eval()
    x = torch.randn(3, 1, 16)
    y, _ = layer(x)
    assert y.shape == x.shape and torch.allclose(y, layer(x.repeat(1, 2, 1))[0][:, :1], atol=1e-6)
    assert layer.causal_safe
    with pytest.raises(ValueError, match="divide"):
        MultiHeadMoE(10, heads=4)
