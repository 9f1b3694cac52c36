"""SparseMixer-v2 / GRIN (layers/moe/sparsemixer.py) against the estimator written out, with the
same random draws, and against straight top-k where they must agree."""

from __future__ import annotations

import pytest
import torch

from layers.moe import MoE, SparseMixerRouter, TopKRouter

D, E = 8, 4


def make(top_k: int = 2, **params) -> MoE:
    return MoE(D, E, top_k, 12, router={"target": "layers.moe.SparseMixerRouter", "params": params})


def direct(moe: MoE, x: torch.Tensor, training: bool) -> torch.Tensor:
    """Each round: mask logits with (max - s)/max(|s|, max) > 2 eps, sample D ~ softmax(masked)
    (argmax in eval), gate = pi_D (x 1/3 w.p. 3/4 if D is not the argmax) with the gradient of pi_D;
    then exclude D. y = sum_rounds gate * FFN_D(x). Random draws in the router's order."""
    r = moe.router
    xf = x.reshape(-1, D)
    s = xf.float() @ r.proj.weight.float().t()
    cur = s
    y = torch.zeros_like(xf)
    for _ in range(r.top_k):
        top = cur.detach().max(-1, keepdim=True).values
        far = (top - s.detach()) / torch.maximum(s.detach().abs(), top) > 2 * r.jitter_eps
        masked = cur.masked_fill(far, float("-inf"))
        if training:
            d = (masked.detach() - torch.empty_like(masked).exponential_().log()).argmax(-1, keepdim=True)
        else:
            d = masked.detach().argmax(-1, keepdim=True)
        pi = masked.softmax(-1)
        u = torch.rand_like(pi[:, :1])
        scale = torch.where((d == pi.detach().argmax(-1, keepdim=True)) | (u > 0.75), 1.0, 1 / 3)
        pi_d = pi.gather(-1, d)
        gate = (pi_d * scale).detach() + pi_d - pi_d.detach()  # value pi_D*scale, gradient of pi_D
        for t in range(xf.shape[0]):
            y[t] = y[t] + gate[t, 0].to(x.dtype) * moe.experts.expert(int(d[t]), xf[t:t + 1])[0]
        cur = cur.scatter(-1, d, float("-inf"))
    return y.reshape(x.shape)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("eps", [0.05, 0.5])
def test_matches_the_estimator_with_gradients(training, top_k, eps):
    torch.manual_seed(0)
    moe = make(top_k, jitter_eps=eps).double().train(training)
    x = torch.randn(3, 6, D, dtype=torch.double, requires_grad=True)
    torch.manual_seed(1)
    got = moe(x)[0]
    torch.manual_seed(1)
    want = direct(moe, x, training)
    assert torch.allclose(got, want, atol=1e-6)
    params = [x, moe.router.proj.weight, *moe.experts.parameters()]
    for a, b in zip(torch.autograd.grad(got.square().sum(), params), torch.autograd.grad(want.square().sum(), params)):
        assert torch.allclose(a, b, atol=1e-6)


def test_eval_top1_without_masking_is_straight_top1():
    torch.manual_seed(0)
    sm = SparseMixerRouter(D, E, top_k=1, jitter_eps=10.0).eval()  # eps so large nothing is masked
    tk = TopKRouter(D, E, top_k=1)
    tk.proj.weight.data.copy_(sm.proj.weight.data)
    x = torch.randn(2, 9, D)
    a, b = sm(x), tk(x)
    assert torch.equal(a.expert_idx, b.expert_idx) and torch.allclose(a.gate, b.gate, atol=1e-7)


def test_training_samples_from_the_masked_softmax_and_scales_non_argmax_by_a_third():
    torch.manual_seed(0)
    router = SparseMixerRouter(D, 3, top_k=1, jitter_eps=0.2).train()
    router.proj.weight.data.zero_()
    router.proj.weight.data[:, 0] = torch.tensor([1.0, 0.9, 0.2])  # logits 1, .9, .2 for x = e_0
    x = torch.zeros(20000, 1, D)
    x[..., 0] = 1.0
    r = router(x)
    logits = torch.tensor([1.0, 0.9, 0.2])
    far = (1.0 - logits) / torch.maximum(logits.abs(), torch.tensor(1.0)) > 0.4  # expert 2 masked
    pi = logits.masked_fill(far, float("-inf")).softmax(-1)
    freq = torch.bincount(r.expert_idx, minlength=3).float() / 20000
    assert freq[2] == 0 and abs(freq[0] - pi[0]) < 0.015
    not_max = r.expert_idx == 1
    third = (r.gate[not_max] - pi[1] / 3).abs() < 1e-6
    assert abs(third.float().mean().item() - 0.75) < 0.02  # Heun: 1/3 of the gate w.p. 3/4
    assert torch.allclose(r.gate[~not_max], pi[0].expand(int((~not_max).sum())), atol=1e-6)
    with pytest.raises(ValueError, match="top-1 or top-2"):
        SparseMixerRouter(D, E, top_k=3)
