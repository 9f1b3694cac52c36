"""DynMoE's top-any router (layers/moe/top_any.py) against the paper's gating formula and the
authors' expert add/remove procedure, on tiny cases."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from layers.moe import MoE, TopAnyRouter

D, E = 8, 4


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def make(**params) -> MoE:
    return MoE(D, E, 1, 12, router={"target": "layers.moe.TopAnyRouter", "params": params})


def direct(moe: MoE, x: torch.Tensor, training: bool) -> torch.Tensor:
    """y = (1/K) sum_{e: s_e > sigmoid(G_e)} FFN_e(x), s_e = sigmoid(cos(x, w_e)) on active slots,
    gate = sign(relu(s - sigmoid(G))) with identity backward through the sign; an idle token gets
    nothing in training and its best expert (weight 1) in evaluation. One token at a time."""
    r = moe.router
    rows = []
    for xt in x.reshape(-1, D):
        cos = (xt / xt.norm()) @ (r.keys / r.keys.norm(dim=-1, keepdim=True)).t()
        s = torch.sigmoid(cos) * r.active
        m = torch.relu(s - torch.sigmoid(r.threshold))
        on = [e for e in range(E) if m[e] > 0]
        y = torch.zeros(D)
        for e in on:
            y = y + (1 + m[e] - m[e].detach()) / len(on) * moe.experts.expert(e, xt[None])[0]
        if not on and not training:
            best = int(s.masked_fill(~r.active, -1).argmax())
            y = moe.experts.expert(best, xt[None])[0]
        rows.append(y)
    return torch.stack(rows).reshape(x.shape)


@pytest.mark.parametrize("training", [True, False])
def test_top_any_output_and_gradients_match_the_formula(training):
    moe = make(adaptive=False, threshold_init=0.12).train(training)
    moe.router.active[3] = False  # an inactive slot is never used, whatever its score
    moe.router.keys.data[3] = 1.0
    x = torch.randn(3, 7, D, requires_grad=True)
    r = moe.router(x)
    k = torch.bincount(r.token_idx, minlength=21)
    assert 3 not in r.expert_idx.tolist()
    assert {0, 1, 2} <= set(k.tolist()) if training else (k.min() >= 1 and k.max() >= 2)
    got, want = moe(x)[0], direct(moe, x, training)
    assert torch.allclose(got, want, atol=1e-6)
    params = [x, moe.router.keys, moe.router.threshold, *moe.experts.parameters()]
    g_got = torch.autograd.grad(got.square().sum(), params, allow_unused=True)
    g_want = torch.autograd.grad(want.square().sum(), params, allow_unused=True)
    for a, b in zip(g_got, g_want):
        assert torch.allclose(a, b, atol=1e-6)
    assert g_got[2].abs().sum() > 0  # thresholds learn from the task loss


def test_aux_loss_is_the_official_sum_of_four_terms():
    moe = make(adaptive=False, balance_weight=0.5, efficiency_weight=0.25, diversity_weight=2.0,
               simplicity_weight=0.125, threshold_init=0.05, initial_experts=3).train()
    router = moe.router
    x = torch.randn(2, 9, D)
    r = router(x)
    # Direct: gate g = sign(relu(s - sigmoid(G))) (identity backward); m = active mask.
    s = torch.sigmoid(F.normalize(x.reshape(-1, D), dim=-1) @ F.normalize(router.keys, dim=-1).t()) * router.active
    m = torch.relu(s - torch.sigmoid(router.threshold))
    g = (m > 0).float() + m - m.detach()
    keys = F.normalize(router.keys, dim=-1)
    act = router.active.float()
    div = ((keys @ keys.t() - torch.eye(E)) * act[:, None] * act[None]).square().sum().sqrt()
    simple = router.keys.norm(dim=-1).mean()
    routed = (m > 0).any(-1)
    share = g[routed] / g[routed].sum(-1, keepdim=True)
    bal = E * (share.mean(0) * (m[routed] > 0).float().mean(0)).sum()
    eff = g.mean()
    want = 2.0 * div + 0.125 * simple + 0.5 * bal + 0.25 * eff
    for name, value in (("diversity_loss", div), ("simplicity_loss", simple), ("balance_loss", bal),
                        ("efficiency_loss", eff)):
        assert r.stats[name].item() == pytest.approx(value.item(), rel=1e-5), name
    assert r.loss.item() == pytest.approx(want.item(), rel=1e-5)
    params = [router.keys, router.threshold]
    for a, b in zip(torch.autograd.grad(r.loss, params), torch.autograd.grad(want, params)):
        assert torch.allclose(a, b, atol=1e-6)


def test_unused_experts_are_removed_and_one_is_added_for_unrouted_tokens():
    router = TopAnyRouter(D, E, initial_experts=3, adapt_every=2).train()
    keys = torch.eye(E, D)  # experts 0..2 look at dims 0..2; slot 3 is free
    router.keys.data.copy_(keys)
    router.threshold.data.copy_(torch.tensor([0.0, 20.0, 0.0, 0.0]))  # expert 1 can never fire
    seen = torch.rand(4, D) * torch.tensor([1.0, 1, 1, 0, 0, 0, 0, 0]) + 0.1 * torch.eye(1, D)
    unseen = -torch.rand(3, D).abs() * torch.tensor([1.0, 1, 1, 0, 0, 0, 0, 0]) \
        + torch.tensor([0, 0, 0, 0, 0, 1.0, 0.5, 0])
    x = torch.cat([seen, unseen])[None]  # unseen tokens: cos <= 0 with every key -> turn on nothing
    r = router(x)
    assert set(r.token_idx.tolist()) == set(range(4)) and 1 not in r.expert_idx.tolist()
    router(x)
    assert router.recorded_forwards.item() == 2
    assert router.activation_counts[1] == 0 and router.activation_counts[[0, 2]].min() > 0
    assert torch.allclose(router.unrouted_sum, 2 * unseen.sum(0))
    router.threshold.data[1] = 0.3  # set when the expert is re-added, to check the reset
    r = router(x)  # first forward after a full window: adapt, then route
    assert router.active.tolist() == [True, True, True, False]  # 1 removed, slot 1 re-used for the new one
    assert torch.allclose(router.keys[1], F.normalize(unseen.sum(0), dim=0), atol=1e-6)
    assert router.threshold[1].item() == 0.0
    assert set(r.token_idx.tolist()) == set(range(7))  # the unrouted tokens now use the new expert
    assert set(r.expert_idx[r.token_idx >= 4].tolist()) == {1}
    assert router.recorded_forwards.item() == 1  # a fresh window started
    # A window where expert 2 is not used and every token is routed: 2 is removed, nothing added.
    router.adapt()
    router(x[:, [0, 1, 4]] * torch.tensor([1.0, 1, 0, 1, 1, 1, 1, 1]))
    before = router.keys.detach().clone()
    change = router.adapt()
    assert change == {"removed": [2], "added": []} and torch.equal(router.keys, before)
    assert router.active.tolist() == [True, True, False, False]
    router.eval()  # even as an evaluation fallback a removed expert is never chosen
    assert not set(router(torch.randn(2, 16, D)).expert_idx.tolist()) & {2, 3}


def test_expert_set_survives_a_checkpoint_and_is_fixed_when_not_adaptive():
    router = TopAnyRouter(D, E, initial_experts=2)
    router.active[3] = True
    fresh = TopAnyRouter(D, E)
    fresh.load_state_dict(router.state_dict())
    assert fresh.active.tolist() == [True, True, False, True]
    fixed = TopAnyRouter(D, E, adaptive=False, adapt_every=1).train()
    for _ in range(3):
        fixed(torch.randn(1, 5, D))
    assert fixed.active.all() and fixed.recorded_forwards.item() == 0


def test_idle_tokens_get_no_output_in_training_and_their_best_expert_in_evaluation():
    moe = make(adaptive=False, threshold_init=30.0)  # nothing clears sigmoid(30) ~ 1
    x = torch.randn(2, 3, D)
    y, aux = moe.train()(x)
    assert torch.equal(y, torch.zeros_like(y)) and aux["idle_fraction"].item() == 1.0
    y, aux = moe.eval()(x)
    s = moe.router.scores(x)
    want = torch.stack([moe.experts.expert(int(e), xt[None])[0] for e, xt in zip(s.argmax(-1), x.reshape(-1, D))])
    assert torch.allclose(y.reshape(-1, D), want, atol=1e-6)
