"""DeepSeekMoE (layers/moe/deepseek.py): fine-grained segmentation with shared experts, against
the paper's formula written out, including gradients and the expert-level balance loss."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from layers.instantiate import instantiate
from layers.moe import DeepSeekMoE, MoE

D = 8


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def swiglu(x, w_in, w_out):
    g, u = (x @ w_in).chunk(2, dim=-1)
    return (F.silu(g) * u) @ w_out


def direct(moe: DeepSeekMoE, x: torch.Tensor) -> torch.Tensor:
    """y = sum_{i in top(mK-Ks)} softmax(xW)_i FFN_i(x) + sum_{j<Ks} FFN^shared_j(x), token by token."""
    xf = x.reshape(-1, D)
    s = (xf.float() @ moe.router.proj.weight.float().t()).softmax(-1).to(x.dtype)
    h = moe.fine_hidden
    w_in, w_out = moe.shared.w_in.weight.t(), moe.shared.w_out.weight.t()  # (D, 2*Ks*h), (Ks*h, D)
    half = w_in.shape[1] // 2
    rows = []
    for t in range(xf.shape[0]):
        y = torch.zeros(D, dtype=x.dtype)
        for i in s[t].topk(moe.top_k).indices.tolist():
            y = y + s[t, i] * moe.experts.expert(i, xf[t:t + 1])[0]
        for j in range(moe.num_shared_experts):  # shared expert j: its own h hidden units
            cols = list(range(j * h, (j + 1) * h))
            wj_in = torch.cat([w_in[:, cols], w_in[:, [half + c for c in cols]]], dim=1)
            y = y + swiglu(xf[t:t + 1], wj_in, w_out[cols])[0]
        rows.append(y)
    return torch.stack(rows).reshape(x.shape)


def test_segmentation_keeps_total_and_active_parameters_of_the_coarse_layer():
    coarse = MoE(D, num_experts=4, top_k=2, hidden_dim=32)
    fine = DeepSeekMoE(D, num_experts=4, top_k=2, hidden_dim=32, granularity=4, num_shared=2)
    assert (fine.num_experts, fine.top_k, fine.fine_hidden) == (14, 6, 8)  # mN-Ks, mK-Ks, H/m
    n_coarse = coarse.experts.w_in.numel() + coarse.experts.w_out.numel()
    n_fine = sum(p.numel() for p in fine.experts.parameters()) + sum(p.numel() for p in fine.shared.parameters())
    assert n_fine == n_coarse
    per_fine_expert = n_fine // 16
    assert (fine.top_k + 2) * per_fine_expert == 2 * (n_coarse // 4)  # active: K coarse experts' worth


def test_output_gradients_and_balance_loss_match_the_formula():
    moe = DeepSeekMoE(D, num_experts=3, top_k=2, hidden_dim=12, granularity=2, num_shared=1,
                      balance_weight=0.3).double()
    x = torch.randn(2, 5, D, dtype=torch.double, requires_grad=True)
    y, aux = moe(x)
    want = direct(moe, x)
    assert torch.allclose(y, want, atol=1e-6)
    params = [x, moe.router.proj.weight, *moe.experts.parameters(), *moe.shared.parameters()]
    for a, b in zip(torch.autograd.grad(y.square().sum(), params), torch.autograd.grad(want.square().sum(), params)):
        assert torch.allclose(a, b, atol=1e-6)
    # Expert-level balance: alpha * sum_i f_i P_i, f_i = N'/(K'T) * #tokens choosing i.
    s = (x.detach().reshape(-1, D).float() @ moe.router.proj.weight.float().t()).softmax(-1)
    n_routed, k, t = moe.num_experts, moe.top_k, 10
    chosen = torch.zeros(t, n_routed).scatter_(1, s.topk(k).indices, 1.0)
    f = n_routed / (k * t) * chosen.sum(0)
    assert aux["loss"].item() == pytest.approx(0.3 * (f * s.mean(0)).sum().item(), rel=1e-5)


def test_built_from_yaml_spec():
    spec = {"target": "layers.moe.DeepSeekMoE",
            "params": {"num_experts": 4, "top_k": 1, "hidden_dim": 16, "granularity": 2, "num_shared": 1}}
    moe = instantiate(spec, dim=D)
    assert isinstance(moe, DeepSeekMoE) and moe.num_experts == 7 and moe.top_k == 1
    assert moe(torch.randn(2, 3, D))[0].shape == (2, 3, D)
    with pytest.raises(ValueError, match="num_shared"):
        DeepSeekMoE(D, num_experts=4, top_k=1, hidden_dim=16, granularity=2, num_shared=2)
