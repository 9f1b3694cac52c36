"""Sparse upcycling (layers/moe/upcycle.py): a dense FFN copied into every expert gives exactly
the dense output at step 0, and training moves the copies apart."""

from __future__ import annotations

import pytest
import torch

from layers.mlp import MLP
from layers.moe import MoE, upcycle_ffn, upcycle_transformer

D = 16


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.mark.parametrize("router", [
    {"target": "layers.moe.TopKRouter", "params": {"renormalize": True}},
    {"target": "layers.moe.AuxFreeRouter", "params": {}},
    {"target": "layers.moe.TopAnyRouter", "params": {"adaptive": False, "threshold_init": -3.0}},
])
@pytest.mark.parametrize("top_k", [2, 3])
def test_upcycled_ffn_equals_the_dense_ffn_at_step_zero(router, top_k):
    mlp = MLP(D, mlp_ratio=3.0).double()
    moe = upcycle_ffn(mlp, num_experts=4, top_k=top_k, router=router).eval()
    for e in range(4):
        assert torch.equal(moe.experts.w_in[e], mlp.w_in.weight.t())
        assert torch.equal(moe.experts.w_out[e], mlp.w_out.weight.t())
    x = torch.randn(3, 7, D, dtype=torch.double)
    y, aux = moe(x)
    # Gates are computed in float32 (the routers' rule), so they sum to 1 within float32 round-off.
    assert torch.allclose(y, mlp(x), atol=1e-7, rtol=1e-6)
    assert (y - mlp(x)).abs().max() < 1e-7 * mlp(x).abs().max() * 10
    if router["target"].endswith("TopAnyRouter"):
        return  # its straight-through gate carries a gradient though its value sums to 1
    # Gates that sum to 1 identically: the input gradient is the dense one too.
    xg = x.clone().requires_grad_()
    g_moe = torch.autograd.grad(moe(xg)[0].square().sum(), xg)[0]
    g_mlp = torch.autograd.grad(mlp(xg).square().sum(), xg)[0]
    assert torch.allclose(g_moe, g_mlp, atol=1e-6, rtol=1e-6)


def test_upcycled_experts_diverge_with_training_and_gelu_is_refused():
    mlp = MLP(D)
    moe = upcycle_ffn(mlp, num_experts=4, top_k=2)
    opt = torch.optim.SGD(moe.parameters(), lr=0.1)
    x, target = torch.randn(4, 8, D), torch.randn(4, 8, D)
    for _ in range(3):
        y, aux = moe(x)
        opt.zero_grad()
        ((y - target).square().mean() + aux["loss"]).backward()
        opt.step()
    w = moe.experts.w_in.detach()
    assert (w[0] - w[1]).abs().max() > 1e-4  # the router sent them different tokens
    with pytest.raises(ValueError, match="SwiGLU"):
        upcycle_ffn(MLP(D, kind="gelu"))


def test_upcycle_a_transformer_in_place_keeps_its_output():
    transformer = pytest.importorskip("layers.transformer")
    model = transformer.Transformer(D, 3, 2, causal=True, max_len=8).double().eval()
    x = torch.randn(2, 8, D, dtype=torch.double)
    dense, _ = model(x)
    assert upcycle_transformer(model, num_experts=4, top_k=2, every=2) == 1  # block 1 only
    assert isinstance(model.blocks[1].ffn, MoE) and isinstance(model.blocks[0].ffn, MLP)
    upcycled, aux = model(x)
    assert torch.allclose(upcycled, dense, atol=1e-6) and "layer1/load" in aux
    with pytest.raises(ValueError, match="causal"):
        upcycle_transformer(model, router={"target": "layers.moe.ExpertChoiceRouter", "params": {}})
