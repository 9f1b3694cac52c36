"""PEER (layers/moe/peer.py): product-key retrieval finds the exact top-k of all N experts, and
the layer matches its formula computed over the full score table, gradients included."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from layers.instantiate import instantiate
from layers.moe import PEER

D = 8


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def full_scores(layer: PEER, x: torch.Tensor) -> torch.Tensor:
    """q . k_i for every expert i = a*n + b, k_i = [c_a; c'_b]: (N_tok, H, N)."""
    q = layer.query(x.reshape(-1, D)).view(-1, layer.heads, 2, layer.key_dim // 2)
    c1, c2 = layer.sub_keys[0], layer.sub_keys[1]
    keys = torch.cat([c1.repeat_interleave(layer.n, 0), c2.repeat(layer.n, 1)], dim=-1)  # (N, key_dim)
    return torch.einsum("nhd,ed->nhe", q.flatten(-2), keys)


def direct(layer: PEER, x: torch.Tensor) -> torch.Tensor:
    """f(x) = sum_h sum_{i in top-k over all N} softmax(s)_i gelu(u_i . x) v_i."""
    xf = x.reshape(-1, D)
    s, idx = full_scores(layer, x).topk(layer.top_k, dim=-1)
    g = s.softmax(-1)
    out = torch.zeros_like(xf)
    for t in range(xf.shape[0]):
        for h in range(layer.heads):
            for j in range(layer.top_k):
                i = idx[t, h, j]
                out[t] = out[t] + g[t, h, j] * F.gelu(layer.down.weight[i] @ xf[t]) * layer.up.weight[i]
    return out.reshape(x.shape)


def test_product_keys_retrieve_the_exact_top_k_of_all_experts():
    layer = PEER(D, num_experts=49, top_k=5, heads=3, key_dim=6)
    x = torch.randn(40, D)
    idx, scores = layer.retrieve(x)
    want_s, want_i = full_scores(layer, x).topk(5, dim=-1)
    assert torch.allclose(scores, want_s, atol=1e-5)
    assert torch.equal(idx.sort(-1).values, want_i.sort(-1).values)


def test_output_and_gradients_match_the_formula():
    layer = PEER(D, num_experts=16, top_k=3, heads=2, key_dim=4).double()
    x = torch.randn(2, 3, D, dtype=torch.double, requires_grad=True)
    y, aux = layer(x)
    want = direct(layer, x)
    assert torch.allclose(y, want, atol=1e-10)
    params = [x, *layer.parameters()]
    for a, b in zip(torch.autograd.grad(y.square().sum(), params), torch.autograd.grad(want.square().sum(), params)):
        assert torch.allclose(a, b, atol=1e-10)
    assert 0 < aux["experts_used_fraction"].item() <= 1


def test_yaml_and_validation():
    layer = instantiate({"target": "layers.moe.PEER", "params": {"num_experts": 64, "top_k": 4, "heads": 2,
                                                                 "query_norm": True}}, dim=D)
    assert layer(torch.randn(2, 5, D))[0].shape == (2, 5, D)
    with pytest.raises(ValueError, match="square"):
        PEER(D, num_experts=50)
