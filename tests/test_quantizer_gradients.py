"""Quantizer gradients and codebook updates against the papers' formulas, computed directly on tiny cases.

Each reference below is the method written the plain way (one-hot matrices, explicit loops over levels,
hand-written EMA arithmetic), so the fast implementations are pinned to the formula, not to themselves.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from stage1.quantizers.base import to_rows
from stage1.quantizers.gumbel import GumbelQuantizer
from stage1.quantizers.ibq import IndexBackpropQuantizer
from stage1.quantizers.residual import ResidualQuantizer
from stage1.quantizers.vq import VectorQuantizer


def _latent(rows: torch.Tensor) -> torch.Tensor:
    """Rows ``(N, C)`` -> channel-first 1-D latent ``(1, C, N)``."""
    return rows.t().unsqueeze(0).contiguous()


# ------------------------------------------------------------------ IBQ and Gumbel: index straight-through
def test_ibq_gradients_match_the_index_straight_through_formula() -> None:
    """IBQ (official IndexPropagationQuantize): q = onehot - sg(softmax) + softmax, z_q = q E, and the
    double quantization loss ||z_q - z||^2 + ||sg(onehot E) - z||^2 + beta ||onehot E - sg(z)||^2."""
    torch.manual_seed(0)
    n, d, k, beta = 6, 3, 5, 0.25
    rows = torch.randn(n, d)
    upstream = torch.randn(n, d)
    q = IndexBackpropQuantizer(d, k, beta=beta)

    z = _latent(rows).requires_grad_(True)
    out = q(z)
    ((out.z_q * _latent(upstream)).sum() + out.loss).backward()

    codebook = q.embed.detach().clone().requires_grad_(True)
    z_ref = rows.clone().requires_grad_(True)
    logits = z_ref @ codebook.t()
    soft = logits.softmax(dim=1)
    hard = F.one_hot(logits.argmax(dim=1), k).float()
    one_hot = hard - soft.detach() + soft
    z_q = one_hot @ codebook
    z_q_hard = hard @ codebook
    loss = (
        F.mse_loss(z_q, z_ref)
        + F.mse_loss(z_q_hard.detach(), z_ref)
        + beta * F.mse_loss(z_q_hard, z_ref.detach())
    )
    ((z_q * upstream).sum() + loss).backward()

    torch.testing.assert_close(out.z_q, _latent(z_q.detach()))
    torch.testing.assert_close(out.loss, loss.detach())
    torch.testing.assert_close(q.embed.grad, codebook.grad)
    torch.testing.assert_close(z.grad, _latent(z_ref.grad))
    # The point of IBQ: every code gets a gradient (through the softmax over all of them).
    assert (q.embed.grad.norm(dim=1) > 0).all()


def test_ibq_codebook_direct_gradient_is_onehot_only() -> None:
    """With the logits path removed (a detached input), only the selected codes receive dL/dz_q."""
    torch.manual_seed(1)
    q = IndexBackpropQuantizer(4, 8)
    q.embed.data.mul_(5.0)  # peaked softmax is irrelevant here: we look at the direct path only
    rows = torch.randn(3, 4)
    out = q(_latent(rows))
    upstream = torch.randn_like(out.z_q)
    # Gradient of <z_q, g> w.r.t. the codebook, with the input fixed and the loss left out.
    (grad,) = torch.autograd.grad((out.z_q * upstream).sum(), q.embed)
    logits = rows @ q.embed.detach().t()
    soft = logits.softmax(1)
    g_rows = to_rows(upstream)[0]
    hard = F.one_hot(logits.argmax(1), 8).float()
    # d/dE of <(onehot - sg(s) + s) E, g> = onehot^T g + (dL/dlogits)^T z with dL/dlogits = s*(gE^T - <s, gE^T>).
    g_soft = g_rows @ q.embed.detach().t()
    d_logits = soft * (g_soft - (soft * g_soft).sum(1, keepdim=True))
    torch.testing.assert_close(grad, hard.t() @ g_rows + d_logits.t() @ rows)


def test_gumbel_hard_gradients_match_straight_through_one_hot() -> None:
    """Hard Gumbel-softmax (taming GumbelQuantize): z_q = (onehot - sg(y) + y) E with y the soft sample."""
    torch.manual_seed(0)
    n, d, k, kl_weight = 7, 3, 5, 5e-4
    rows = torch.randn(n, d)
    upstream = torch.randn(n, d)
    q = GumbelQuantizer(d, k, kl_weight=kl_weight).train()

    z = _latent(rows).requires_grad_(True)
    torch.manual_seed(42)
    out = q(z)
    ((out.z_q * _latent(upstream)).sum() + out.loss).backward()

    codebook = q.embed.detach().clone().requires_grad_(True)
    weight = q.proj.weight.detach().clone().requires_grad_(True)
    bias = q.proj.bias.detach().clone().requires_grad_(True)
    z_ref = rows.clone().requires_grad_(True)
    logits = z_ref @ weight.t() + bias
    torch.manual_seed(42)  # the same Gumbel noise
    sample = F.gumbel_softmax(logits, tau=q.temperature, hard=True, dim=1)  # onehot - sg(y) + y
    z_q = sample @ codebook
    probs = logits.softmax(1)
    kl = (probs * torch.log(probs * k)).sum(1).mean()
    ((z_q * upstream).sum() + kl_weight * kl).backward()

    torch.testing.assert_close(out.z_q, _latent(z_q.detach()))
    torch.testing.assert_close(q.embed.grad, codebook.grad)
    torch.testing.assert_close(q.proj.weight.grad, weight.grad)
    torch.testing.assert_close(q.proj.bias.grad, bias.grad)
    torch.testing.assert_close(z.grad, _latent(z_ref.grad))
    # The codebook's gradient reaches only the sampled codes.
    sampled = sample.detach().argmax(1).unique()
    assert torch.equal((q.embed.grad.norm(dim=1) > 0).nonzero().squeeze(1), sampled)


# ------------------------------------------------------------------ residual: one estimator on the sum
def _vq_spec(**params) -> dict:
    return {"target": "stage1.quantizers.vq.VectorQuantizer", "params": {"codebook_size": 8, **params}}


@pytest.mark.parametrize("shared", [False, True], ids=["separate", "shared"])
@pytest.mark.parametrize("depth", [1, 2, 4, 8])
def test_residual_encoder_gradient_is_dl_dzq_at_every_depth(depth: int, shared: bool) -> None:
    torch.manual_seed(depth)
    rq = ResidualQuantizer(4, depth=depth, quantizer=_vq_spec(codebook="gradient", init="normal"),
                           shared_codebook=shared).train()
    z = torch.randn(2, 4, 5, requires_grad=True)
    upstream = torch.randn(2, 4, 5)
    out = rq(z)
    (grad_from_zq,) = torch.autograd.grad((out.z_q * upstream).sum(), z, retain_graph=True)
    torch.testing.assert_close(grad_from_zq, upstream)  # exactly dL/dz_q, not depth x it

    # Each level's commitment reaches the encoder through its own residual r_l = z - sg(sum_{j<l} q_j):
    # d/dz sum_l beta * mean((r_l - sg(q_l))^2) = sum_l 2 beta (r_l - q_l) / numel.
    (grad_from_loss,) = torch.autograd.grad(out.loss, z)
    expected = torch.zeros_like(z)
    for level in range(1, depth + 1):
        expected += 2 * 0.25 * (z.detach() - rq.decode(out.codes, levels=level)) / z.numel()
    torch.testing.assert_close(grad_from_loss, expected)


def test_residual_keeps_gradients_of_parameters_trained_through_the_output() -> None:
    """Projections inside a level (here VQ with a low-dim lookup) still learn from dL/dz_q."""
    torch.manual_seed(0)
    rq = ResidualQuantizer(6, depth=3, quantizer=_vq_spec(codebook="gradient", codebook_dim=3))
    out = rq(torch.randn(2, 6, 5))
    out.z_q.square().sum().backward()
    for level in rq.quantizers:
        assert level.proj_out.weight.grad.abs().sum() > 0 and level.proj_in.weight.grad.abs().sum() > 0


# ------------------------------------------------------------------ EMA codebook: hand computations
def _ema_reference(cluster_size, embed_avg, rows, idx, decay, eps):
    """One EMA step (VQ-VAE appendix / Sonnet): N <- d N + (1-d) n, m <- d m + (1-d) sum z,
    e = m / (Laplace-smoothed N)."""
    k = cluster_size.shape[0]
    onehot = F.one_hot(idx, k).double()
    counts = onehot.sum(0)
    sums = onehot.t() @ rows.double()
    new_size = decay * cluster_size.double() + (1 - decay) * counts
    new_avg = decay * embed_avg.double() + (1 - decay) * sums
    total = new_size.sum()
    smoothed = (new_size + eps) / (total + k * eps) * total
    return new_size, new_avg, new_avg / smoothed.unsqueeze(1)


def test_ema_update_matches_hand_computation() -> None:
    torch.manual_seed(0)
    decay, eps = 0.9, 1e-2  # a large eps so the Laplace smoothing visibly matters
    q = VectorQuantizer(3, 6, decay=decay, eps=eps, init="normal").train()
    q.cluster_size.copy_(torch.tensor([3.0, 0.5, 2.0, 0.0, 1.0, 4.0]))
    q.embed_avg.copy_(torch.randn(6, 3))
    q.embed.copy_(q.embed_avg / q.cluster_size.clamp_min(0.1).unsqueeze(1))
    rows = torch.randn(20, 3)
    before = (q.cluster_size.clone(), q.embed_avg.clone())
    idx = torch.cdist(rows, q.embed).argmin(1)
    q(_latent(rows))
    size, avg, embed = _ema_reference(*before, rows, idx, decay, eps)
    torch.testing.assert_close(q.cluster_size.double(), size)
    torch.testing.assert_close(q.embed_avg.double(), avg)
    torch.testing.assert_close(q.embed.double(), embed)
    # Unused codes decay towards zero usage and keep their direction (their sums only decay).
    unused = torch.ones(6, dtype=torch.bool)
    unused[idx] = False
    assert unused.any()
    torch.testing.assert_close(q.cluster_size[unused], decay * before[0][unused])


def test_dead_code_restart_matches_hand_computation() -> None:
    torch.manual_seed(0)
    decay, threshold = 0.5, 1.0
    q = VectorQuantizer(2, 4, decay=decay, restart_dead=True, dead_threshold=threshold,
                        restart_buffer_size=64, init="normal").train()
    q.embed.copy_(torch.tensor([[0.2, 0.0], [10.0, 10.0], [-10.0, 10.0], [20.0, -20.0]]))
    q.embed_avg.copy_(q.embed)  # cluster_size starts at ones, so embed = embed_avg
    rows = torch.tensor([[0.0, 0.1], [0.0, -0.1], [0.05, 0.0], [-0.05, 0.0]])  # all nearest to code 0
    q(_latent(rows))
    # Code 0 used 4 times: 0.5 * 1 + 0.5 * 4 = 2.5, alive. Codes 1-3 unused: 0.5 < 1, dead -> revived
    # at 2 x threshold with a recent encoder row as the new code, and embed_avg = code * usage.
    assert q.cluster_size[0].item() == pytest.approx(2.5)
    torch.testing.assert_close(q.cluster_size[1:], torch.full((3,), 2.0 * threshold))
    for code in range(1, 4):
        assert (q.embed[code] - rows).norm(dim=1).min() == 0  # re-seeded from the batch
        torch.testing.assert_close(q.embed_avg[code], q.embed[code] * 2.0 * threshold)
    # The alive code follows the EMA formula (its rows sum to 0, so embed_avg halves), smoothed with the
    # usage of every code before the restart.
    torch.testing.assert_close(q.embed_avg[0], torch.tensor([0.1, 0.0]))
    total = 2.5 + 3 * 0.5
    smoothed = (2.5 + q.eps) / (total + 4 * q.eps) * total
    torch.testing.assert_close(q.embed[0], torch.tensor([0.1, 0.0]) / smoothed)


def test_shared_ema_codebook_moves_once_per_step_with_pooled_statistics() -> None:
    """RQ-VAE: a depth-4 stack sharing one EMA codebook; one training step is one EMA update whose
    counts and sums are pooled over the levels, and all levels look up the same (pre-step) codebook."""
    torch.manual_seed(0)
    decay, eps, depth = 0.8, 1e-5, 4
    rq = ResidualQuantizer(3, depth=depth, quantizer=_vq_spec(decay=decay, eps=eps, init="normal"),
                           shared_codebook=True).train()
    shared = rq.quantizers[0]
    z = torch.randn(2, 3, 10)
    before = (shared.cluster_size.clone(), shared.embed_avg.clone())
    codebook = shared.embed.clone()

    # Plain reference: greedy residual quantization with the fixed pre-step codebook.
    residual = to_rows(z)[0]
    pooled_rows, pooled_idx = [], []
    for _ in range(depth):
        idx = torch.cdist(residual, codebook).argmin(1)
        pooled_rows.append(residual.clone())
        pooled_idx.append(idx)
        residual = residual - codebook[idx]
    size, avg, embed = _ema_reference(*before, torch.cat(pooled_rows), torch.cat(pooled_idx), decay, eps)

    out = rq(z)
    assert torch.equal(out.codes.reshape(-1, depth), torch.stack(pooled_idx, dim=1))
    torch.testing.assert_close(shared.cluster_size.double(), size)
    torch.testing.assert_close(shared.embed_avg.double(), avg)
    torch.testing.assert_close(shared.embed.double(), embed)


def test_pooled_updates_cannot_nest_and_eval_does_not_update() -> None:
    q = VectorQuantizer(3, 4).eval()
    before = q.embed.clone()
    with q.pooled_updates():
        q(torch.randn(1, 3, 5))
        with pytest.raises(RuntimeError, match="nested"):
            with q.pooled_updates():
                pass
    assert torch.equal(q.embed, before)
    assert math.isclose(float(q.cluster_size.sum()), 4.0)
