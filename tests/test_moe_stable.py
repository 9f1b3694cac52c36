"""StableMoE (layers/moe/stable.py): stage-1 routing, balance and distillation losses against the
paper's formulas (gradients included), distillation learning the assignment, stage 2 frozen."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from layers.moe import MoE, StableMoERouter

D, E = 8, 4


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def make(**params) -> MoE:
    return MoE(D, E, 1, 12, router={"target": "layers.moe.StableMoERouter", "params": params})


def direct_stage1(moe: MoE, x: torch.Tensor, wb: float, wd: float) -> tuple[torch.Tensor, torch.Tensor]:
    """y_t = sigmoid(s_{t,a}) FFN_a(x_t), a = argmax_e x_t . c_e; loss = wb/n sum_e (|A_e| - n/E)/(n/E)
    sum_{t in A_e} sigmoid(s_te) + wd * mean_t CE(distilled_t, a_t)."""
    r = moe.router
    xf = x.reshape(-1, D)
    s = xf.float() @ r.centroids.t()
    a = s.argmax(-1)
    n = xf.shape[0]
    ys, bal = [], 0.0
    for t in range(n):
        ys.append(torch.sigmoid(s[t, a[t]]).to(x.dtype) * moe.experts.expert(int(a[t]), xf[t:t + 1])[0])
    for e in range(E):
        members = (a == e).nonzero().flatten()
        bal = bal + (len(members) - n / E) / (n / E) * torch.sigmoid(s[members, e]).sum()
    distilled = (xf.detach().float() @ r.distill_in.weight.t()) @ r.distill_centroids.t()
    dis = -distilled.log_softmax(-1)[torch.arange(n), a].mean()
    return torch.stack(ys).reshape(x.shape), wb * bal / n + wd * dis


def test_stage1_output_losses_and_gradients_match_the_paper():
    moe = make(balance_weight=0.7, distill_weight=0.3).train()
    moe.router.centroids.data.normal_()  # spread tokens over experts
    x = torch.randn(2, 9, D, requires_grad=True)
    y, aux = moe(x)
    want_y, want_loss = direct_stage1(moe, x, 0.7, 0.3)
    assert torch.allclose(y, want_y, atol=1e-6)
    assert aux["loss"].item() == pytest.approx(want_loss.item(), rel=1e-5)
    params = [x, *moe.parameters()]
    got = torch.autograd.grad(y.square().sum() + aux["loss"], params, allow_unused=True)
    want = torch.autograd.grad(want_y.square().sum() + want_loss, params, allow_unused=True)
    for g, w in zip(got, want):
        assert (g is None and w is None) or torch.allclose(g, w, atol=1e-6)
    # Distillation never reaches the backbone: its input gradient is that of the task + balance only.
    gx_dis = torch.autograd.grad(F.cross_entropy(moe.router.distilled_logits(x.reshape(-1, D)),
                                                 torch.zeros(18, dtype=torch.long)), moe.router.distill_in.weight)
    assert gx_dis[0].abs().sum() > 0 and moe.router.stage == 1


def test_balance_loss_pushes_overloaded_expert_scores_down():
    router = StableMoERouter(D, E, balance_weight=1.0, distill_weight=0.0).train()
    router.centroids.data.zero_()
    router.centroids.data[0] = 0.5  # expert 0 takes every (positive) token
    x = torch.rand(1, 16, D)
    r = router(x)
    assert r.load[0].item() == 1.0
    g = torch.autograd.grad(r.loss, router.centroids)[0]
    assert (g[0] @ x.reshape(-1, D).mean(0)) > 0  # descending the loss lowers expert 0's scores


def test_distilled_router_learns_the_assignment_then_freezes_routing():
    moe = make(stage1_steps=60, distill_dim=16, balance_weight=0.0)
    moe.router.centroids.data.normal_()
    x = torch.randn(4, 16, D)
    opt = torch.optim.Adam(moe.router.parameters(), lr=0.1)
    moe.train()
    for _ in range(60):  # stage 1: only the router's losses, to learn the distilled router
        r = moe.router(x)
        opt.zero_grad()
        r.loss.backward()
        opt.step()
    assert r.stats["distill_agreement"].item() > 0.9 and moe.router.stage == 1
    backbone = (x.reshape(-1, D) @ moe.router.centroids.t()).argmax(-1)
    eval_route = moe.eval().router(x).expert_idx  # evaluation routes with the distilled router
    assert (eval_route == backbone).float().mean() > 0.9
    r2 = moe.train().router(x)  # the 61st training forward enters stage 2
    assert moe.router.stage == 2 and r2.loss.item() == 0.0
    assert not moe.router.distill_centroids.requires_grad
    fixed = r2.expert_idx.clone()
    moe.router.centroids.data.normal_()  # the backbone's centroids move: routing does not
    r3 = moe.router(x)
    assert torch.equal(r3.expert_idx, fixed) and r3.gate.requires_grad
    state = moe.state_dict()
    fresh = make(distill_dim=16)
    fresh.load_state_dict(state)
    assert fresh.router.stage == 2
