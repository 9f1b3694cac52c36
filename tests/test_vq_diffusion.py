"""VQ-Diffusion: the discrete-diffusion math against brute force, the loss and its gradients against the
paper's formulas on explicit matrices, and the prior end to end (train a few steps, sample valid codes)."""

from __future__ import annotations

import math

import pytest
import torch

from stage2.discrete_diffusion import (
    DiscreteDiffusion,
    ImportanceStepSampler,
    guided_log_p_x0,
    stratified_steps,
    truncate,
)

K, T = 3, 6  # tiny vocabulary (plus the mask) and a short chain: every matrix below is explicit


def schedule_matrices(diff: DiscreteDiffusion) -> list[torch.Tensor]:
    """One-step matrices Q_t[i, j] = q(x_t = j | x_{t-1} = i), t = 1..T, written from the definition
    (alpha_t + beta_t stay, beta_t per value, gamma_t mask, mask absorbing) with
    alpha_t = abar_t / abar_{t-1} and gamma_t = 1 - (1 - gbar_t) / (1 - gbar_{t-1})."""
    abar, gbar, k = diff.abar, diff.gbar, diff.num_codes
    mats = []
    for t in range(1, diff.steps + 1):
        alpha = abar[t] / abar[t - 1]
        gamma = 1 - (1 - gbar[t]) / (1 - gbar[t - 1])
        beta = (1 - alpha - gamma) / k
        q = torch.zeros(k + 1, k + 1, dtype=torch.float64)
        q[:k, :k] = beta
        q[:k, :k] += alpha * torch.eye(k, dtype=torch.float64)
        q[:k, k] = gamma
        q[k, k] = 1.0
        mats.append(q)
    return mats


def cumulative(mats: list[torch.Tensor], s: int, t: int) -> torch.Tensor:
    """Q_{s->t} = Q_{s+1} ... Q_t (identity when s = t)."""
    out = torch.eye(mats[0].shape[0], dtype=torch.float64)
    for i in range(s, t):
        out = out @ mats[i]
    return out


def brute_posterior(mats, p_x0: torch.Tensor, x_t: int, t: int, s: int) -> torch.Tensor:
    """sum_{x_0} p(x_0) q(x_s | x_t, x_0) with q(x_s | x_t, x_0) by Bayes' rule on explicit matrices."""
    q_s0, q_t0, q_ts = cumulative(mats, 0, s), cumulative(mats, 0, t), cumulative(mats, s, t)
    out = torch.zeros(K + 1, dtype=torch.float64)
    for x0 in range(K):
        joint = q_s0[x0, :] * q_ts[:, x_t]  # q(x_s | x_0) q(x_t | x_s)
        out = out + p_x0[x0] * joint / q_t0[x0, x_t]
    return out


@pytest.fixture()
def diff() -> DiscreteDiffusion:
    return DiscreteDiffusion(K, T).double()


def test_one_step_rows_sum_to_one_and_match_the_definition(diff):
    mats = schedule_matrices(diff)
    eye = torch.eye(K + 1, dtype=torch.float64)
    log_eye = torch.log(eye.clamp_min(1e-30))
    for t in range(1, T + 1):
        rows = diff.transition(log_eye, t - 1, t).exp()  # row i = q(x_t | x_{t-1} = i)
        torch.testing.assert_close(rows.sum(-1), torch.ones(K + 1, dtype=torch.float64), rtol=0, atol=1e-12)
        torch.testing.assert_close(rows, mats[t - 1], rtol=1e-9, atol=1e-12)
        assert rows[K, K] == pytest.approx(1.0)  # the mask is absorbing


def test_composed_single_steps_equal_the_closed_form(diff):
    mats = schedule_matrices(diff)
    log_eye = torch.log(torch.eye(K + 1, dtype=torch.float64).clamp_min(1e-30))
    for t in range(1, T + 1):
        composed = cumulative(mats, 0, t)
        closed = diff.transition(log_eye, 0, t).exp()
        torch.testing.assert_close(closed, composed, rtol=1e-9, atol=1e-12)
        # and any skip s -> t equals the product of the steps in between
        for s in range(t):
            torch.testing.assert_close(diff.transition(log_eye, s, t).exp(), cumulative(mats, s, t),
                                       rtol=1e-9, atol=1e-12)


def test_all_mass_is_on_the_mask_at_the_last_step():
    diff = DiscreteDiffusion(16, 100)  # the paper's default schedule, gbar_T = 0.99999
    log_x0 = diff.log_onehot(torch.arange(16), 17)
    q_T = diff.transition(log_x0.double(), 0, 100).exp()
    assert (q_T[:, -1] > 1 - 2e-5).all()
    assert (q_T[:, -1] < 1).all() and (q_T[:, :-1].sum(-1) < 2e-5).all()


@pytest.mark.parametrize("skip", [1, 2, 4])
def test_posterior_equals_bayes_rule_by_brute_force(diff, skip):
    mats = schedule_matrices(diff)
    g = torch.Generator().manual_seed(0)
    for t in range(1, T + 1):
        s = max(0, t - skip)
        for x_t in range(K + 1):
            p_x0 = torch.rand(K, generator=g, dtype=torch.float64).softmax(-1)
            want = brute_posterior(mats, p_x0, x_t, t, s)
            got = diff.posterior(p_x0.log()[None], torch.tensor([x_t]), t, s)[0].exp()
            torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-12)
            assert got.sum().item() == pytest.approx(1.0, abs=1e-10)
            # a one-hot p(x_0) gives the true posterior q(x_s | x_t, x_0)
            for x0 in range(K):
                onehot = diff.log_onehot(torch.tensor([x0])).double()
                true = diff.posterior(onehot, torch.tensor([x_t]), t, s)[0].exp()
                expected = brute_posterior(mats, torch.eye(K, dtype=torch.float64)[x0], x_t, t, s)
                torch.testing.assert_close(true, expected, rtol=1e-8, atol=1e-12)


def test_posterior_matches_diffusers_vq_diffusion_scheduler():
    sched_mod = pytest.importorskip("diffusers.schedulers.scheduling_vq_diffusion")
    k, steps = 7, 20
    ours = DiscreteDiffusion(k, steps)
    theirs = sched_mod.VQDiffusionScheduler(num_vec_classes=k + 1, num_train_timesteps=steps)
    g = torch.Generator().manual_seed(1)
    log_p_x0 = torch.randn(2, 5, k, generator=g).log_softmax(-1)
    x_t = torch.randint(0, k + 1, (2, 5), generator=g)
    x_t[:, 0] = k  # make sure both masked and unmasked tokens are compared
    for t in range(1, steps + 1):
        got = ours.posterior(log_p_x0, x_t, t).exp()
        want = theirs.q_posterior(log_p_x0.transpose(1, 2), x_t, t - 1).exp().transpose(1, 2)  # 0-based t
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_q_sample_draws_from_the_closed_form():
    diff = DiscreteDiffusion(4, 10)
    n = 200_000
    x0 = torch.full((n,), 2)
    for t in (1, 4, 10):
        g = torch.Generator().manual_seed(t)
        xt = diff.q_sample(x0, torch.full((n,), t), generator=g)
        freq = torch.bincount(xt, minlength=5).double() / n
        want = diff.transition(diff.log_onehot(torch.tensor([2]), 5).double(), 0, t).exp()[0]
        torch.testing.assert_close(freq, want, rtol=0, atol=4e-3)


def _brute_vlb(mats, logits: torch.Tensor, x0: torch.Tensor, x_t: torch.Tensor, t: int) -> torch.Tensor:
    """The paper's L_{t-1} = KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t)) (t >= 2) or -log p(x_0|x_1) (t = 1),
    per token, from explicit matrices; differentiable in ``logits``."""
    p_x0 = logits.double().softmax(-1)
    terms = []
    for i in range(x0.shape[0]):
        model = brute_posterior(mats, p_x0[i], int(x_t[i]), t, t - 1)
        if t == 1:
            terms.append(-torch.log(model[int(x0[i])]))
            continue
        true = brute_posterior(mats, torch.eye(K, dtype=torch.float64)[int(x0[i])], int(x_t[i]), t, t - 1)
        keep = true > 0
        terms.append((true[keep] * (true[keep].log() - model[keep].log())).sum())
    return torch.stack(terms)


@pytest.mark.parametrize("t", [1, 2, 4, T])
def test_vlb_terms_and_gradients_match_the_formula_on_explicit_matrices(diff, t):
    mats = schedule_matrices(diff)
    g = torch.Generator().manual_seed(t)
    x0 = torch.tensor([0, 1, 2, 0, 1, 2, 1, 0])
    x_t = torch.tensor([0, 1, 2, 3, 3, 3, 0, 2])  # kept, masked and replaced tokens
    logits = torch.randn(8, K, generator=g, dtype=torch.float64, requires_grad=True)
    ours = diff.vlb_terms(logits.log_softmax(-1)[None], x0[None], x_t[None], torch.tensor([t]))[0]
    want = _brute_vlb(mats, logits, x0, x_t, t)
    torch.testing.assert_close(ours, want, rtol=1e-7, atol=1e-10)
    assert torch.isfinite(ours).all() and (ours >= -1e-12).all()
    (g_ours,) = torch.autograd.grad(ours.sum(), logits)
    (g_want,) = torch.autograd.grad(want.sum(), logits)
    torch.testing.assert_close(g_ours, g_want, rtol=1e-6, atol=1e-9)


def test_vlb_is_finite_at_every_step_in_float32():
    diff = DiscreteDiffusion(16, 100)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randint(0, 16, (100, 12), generator=g)
    t = torch.arange(1, 101)
    x_t = diff.q_sample(x0, t, generator=g)
    logits = torch.randn(100, 12, 16, generator=g, requires_grad=True)
    terms = diff.vlb_terms(logits.log_softmax(-1), x0, x_t, t)
    assert torch.isfinite(terms).all() and (terms > -1e-4).all()
    terms.sum().backward()
    assert torch.isfinite(logits.grad).all()


def test_a_perfect_x0_prediction_has_zero_kl():
    diff = DiscreteDiffusion(5, 10)
    x0 = torch.tensor([[0, 1, 2, 3, 4]])
    for t in range(2, 11):
        x_t = diff.q_sample(x0, torch.tensor([t]), generator=torch.Generator().manual_seed(t))
        perfect = diff.log_onehot(x0)
        assert diff.vlb_terms(perfect, x0, x_t, torch.tensor([t])).abs().max() < 1e-5


def test_truncation_keeps_the_top_mass_and_renormalises():
    log_p = torch.tensor([0.5, 0.3, 0.15, 0.05]).log()
    kept = truncate(log_p, 0.7).exp()
    torch.testing.assert_close(kept[:2], torch.tensor([0.625, 0.375]))
    assert kept[2:].sum() < 1e-20
    assert truncate(log_p, None) is log_p
    assert truncate(log_p, 0.1).exp()[0] == pytest.approx(1.0)  # the top code always survives


def test_guidance_scale_zero_is_the_conditional_distribution():
    cond, uncond = torch.randn(4, 5).log_softmax(-1), torch.randn(4, 5).log_softmax(-1)
    assert guided_log_p_x0(cond, uncond, 0.0) is cond
    guided = guided_log_p_x0(cond, uncond, 2.0)
    torch.testing.assert_close(guided.exp().sum(-1), torch.ones(4))
    torch.testing.assert_close(guided, (3 * cond - 2 * uncond).log_softmax(-1))


def test_importance_sampler_is_uniform_until_warm_then_follows_sqrt_mean_square():
    sampler = ImportanceStepSampler(4, importance=True, min_count=2)
    torch.testing.assert_close(sampler.probabilities(), torch.full((4,), 0.25, dtype=torch.float64))
    for _ in range(60):
        sampler.update(torch.tensor([1, 2, 3, 4]), torch.tensor([9.0, 1.0, 2.0, 4.0]))
    p = sampler.probabilities()
    want = torch.tensor([1.0, 1.0, 2.0, 4.0], dtype=torch.float64)  # sqrt(E[L^2]) = L; t=1 copies t=2
    torch.testing.assert_close(p, want / want.sum(), rtol=1e-3, atol=1e-4)
    t, pt = sampler.sample(1000, torch.device("cpu"), generator=torch.Generator().manual_seed(0))
    assert t.min() >= 1 and t.max() <= 4
    torch.testing.assert_close(pt, p.float()[t - 1])
    assert math.isclose((t == 4).float().mean().item(), p[3].item(), abs_tol=0.05)


def test_adaptive_norm_starts_as_the_plain_norm_and_modulates_per_sample():
    from layers.norms import AdaptiveNorm
    from layers.transformer import Transformer

    torch.manual_seed(0)
    norm = AdaptiveNorm("layernorm", 8, 4)
    x, c = torch.randn(2, 5, 8), torch.randn(2, 4)
    torch.testing.assert_close(norm(x, c), torch.nn.functional.layer_norm(x, (8,), eps=1e-6))
    torch.nn.init.normal_(norm.modulation[1].weight)
    y = norm(x, c)
    scale, shift = norm.modulation(c).chunk(2, -1)
    plain = torch.nn.functional.layer_norm(x, (8,), eps=1e-6)
    torch.testing.assert_close(y, plain * (1 + scale[:, None]) + shift[:, None])

    net = Transformer(8, 2, 2, causal=False, positions="none", max_len=5, cond_dim=4)
    with pytest.raises(ValueError, match="needs cond"):
        net(x)
    for block in net.blocks:
        torch.nn.init.normal_(block.norm1.modulation[1].weight)
    assert not torch.allclose(net(x, cond=c)[0], net(x, cond=c.flip(0))[0])


# ---------------------------------------------------------------- the prior: network, loss, samplers

SPEC = {"grid": [3, 3], "depth": None, "codebook_size": 12, "continuous_dim": None}
TINY = {"dim": 32, "depth": 2, "heads": 4, "diffusion_steps": 10}


def _prior(**kw):
    from stage2.vq_diffusion import VQDiffusionPrior

    return VQDiffusionPrior(code_spec=SPEC, num_classes=kw.pop("num_classes", 3), **{**TINY, **kw})


def _sample(model, seed: int = 7, n: int = 5, **kw) -> torch.Tensor:
    return model.sample(n, generator=torch.Generator().manual_seed(seed), **kw)


def test_reverse_times_skip_evenly_from_T_to_zero():
    from stage2.vq_diffusion import reverse_times

    assert reverse_times(100, 100) == list(range(100, -1, -1))
    assert reverse_times(100, 25) == list(range(100, -1, -4))
    assert reverse_times(10, 3) == [10, 7, 3, 0]
    with pytest.raises(ValueError):
        reverse_times(10, 11)


@pytest.mark.parametrize("steps", [10, 4, 1])
def test_a_certain_model_is_reproduced_exactly_by_both_samplers(steps):
    from stage2.vq_diffusion import diffusion_decode, purity_decode

    diff = DiscreteDiffusion(12, 10)
    target = torch.randint(0, 12, (3, 9))
    calls = []

    def certain(x_t, t):  # p(x_0 | x_t) = delta(target): every posterior draw must lead to it
        calls.append(int(t[0]))
        return diff.log_onehot(target)

    g = torch.Generator().manual_seed(0)
    assert torch.equal(diffusion_decode(certain, diff, 3, 9, steps, generator=g), target)
    assert len(calls) == steps and calls[0] == 10
    calls.clear()
    assert torch.equal(purity_decode(certain, diff, 3, 9, steps, purity_weight=1.0, generator=g), target)


def test_purity_decode_unmasks_on_schedule_most_confident_first_and_never_changes_a_token():
    from stage2.vq_diffusion import purity_decode

    diff = DiscreteDiffusion(12, 10)
    n, length = 64, 9
    confident = torch.zeros(length, dtype=torch.bool)
    confident[[1, 4]] = True  # two positions are near-certain, the rest near-uniform
    seen: list[torch.Tensor] = []

    def model(x_t, t):
        seen.append(x_t.clone())
        logits = torch.zeros(x_t.shape[0], length, 12)
        logits[:, confident, 3] = 12.0
        return logits.log_softmax(-1)

    out = purity_decode(model, diff, n, length, steps=10, generator=torch.Generator().manual_seed(0))
    assert (out < 12).all()
    masks = [int((x == 12).sum(1)[0]) for x in seen] + [0]
    for x in seen:  # every row follows the same count
        assert ((x == 12).sum(1) == (x[0] == 12).sum()).all()
    want = [length] + [round(length * float(diff.gbar[s])) for s in range(9, 0, -1)] + [0]
    # steps that unmask nothing skip the network, so the observed counts are the distinct scheduled ones
    assert masks == sorted(set(want), reverse=True) or masks == list(dict.fromkeys(want))
    for before, after in zip(seen, seen[1:] + [out]):  # an unmasked token never changes
        kept = before != 12
        assert torch.equal(after[kept], before[kept])
    # the first step unmasks one position, drawn in proportion to purity (max p, normalised by the row's
    # max): 1 at the two confident positions, 1/12 at the seven others, so P(confident) = 2 / (2 + 7/12)
    first = seen[1]
    assert ((first != 12).sum(1) == 1).all()
    assert (first[:, confident] != 12).any(1).float().mean().item() == pytest.approx(2 / (2 + 7 / 12), abs=0.12)


def test_forward_shapes_and_time_and_class_conditioning():
    model = _prior()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.3)
    x_t = torch.randint(0, 13, (4, 9))
    logits, aux = model(x_t, torch.tensor([1, 2, 3, 4]), torch.tensor([0, 1, 2, 3]))
    assert logits.shape == (4, 9, 12) and "aux_loss" in aux
    # the step and the class (3 = the learned null class) both change the prediction
    other_t, _ = model(x_t, torch.tensor([5, 6, 7, 8]), torch.tensor([0, 1, 2, 3]))
    other_y, _ = model(x_t, torch.tensor([1, 2, 3, 4]), torch.tensor([1, 2, 3, 0]))
    assert not torch.allclose(logits, other_t) and not torch.allclose(logits, other_y)


def test_training_loss_is_the_weighted_bound_plus_aux_cross_entropy():
    model = _prior(aux_weight=0.1, cond_drop_prob=0.0).eval()  # eval: uniform t, as in validation
    batch = {"codes": torch.randint(0, 12, (6, 3, 3)), "label": torch.tensor([0, 1, 2, 0, 1, 2])}
    g = torch.Generator().manual_seed(3)
    out = model.loss(batch["codes"], batch["label"], generator=g)
    # recompute with the same draws: uniform t, q_sample, the explicit KL/decoder terms and CE
    g = torch.Generator().manual_seed(3)
    x0 = batch["codes"].reshape(6, 9)
    t = stratified_steps(6, 10, g)
    x_t = model.diffusion.q_sample(x0, t, g)
    log_p = model(x_t, t, batch["label"])[0].log_softmax(-1)
    vlb = model.diffusion.vlb_terms(log_p, x0, x_t, t).sum(1)
    ce = -log_p.gather(-1, x0[..., None])[..., 0].sum(1)
    torch.testing.assert_close(out.loss, ((vlb + 0.1 * ce) * 10 / 9).mean())  # divided by p(t) = 1/10
    torch.testing.assert_close(out.nll, (vlb * 10 / 9).mean())
    torch.testing.assert_close(out.stats["x0_nll"], (ce / 9).mean())
    out.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    # the official adaptive weight 2 - (t - 1) / T on the auxiliary term
    model.adaptive_aux = True
    adaptive = model.loss(batch["codes"], batch["label"], generator=torch.Generator().manual_seed(3)).loss
    weight = 2 - (t - 1).float() / 10
    torch.testing.assert_close(adaptive, ((vlb + 0.1 * weight * ce) * 10 / 9).mean())


def test_training_reduces_the_bound_and_sampling_gives_valid_codes():
    torch.manual_seed(0)
    model = _prior(cond_drop_prob=0.1)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    labels = torch.arange(64) % 3
    codes = ((torch.arange(9)[None] * (labels[:, None] + 1)) % 12).view(64, 3, 3)

    def val() -> float:
        model.eval()
        return model.loss(codes, labels, generator=torch.Generator().manual_seed(0)).nll.item()

    before = val()
    model.train()
    for _ in range(60):
        loss = model.loss(codes, model.drop_labels(labels)).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert val() < 0.6 * before
    model.eval()
    for kw in ({}, {"steps": 4}, {"purity": True, "purity_weight": 1.0}, {"truncation": 0.9, "cfg_scale": 1.0},
               {"steps": 3, "purity": True}):
        out = _sample(model, cond=torch.tensor([0, 1, 2, 0, 1]), **kw)
        assert out.shape == (5, 3, 3) and out.dtype == torch.long
        assert out.min() >= 0 and out.max() < 12, kw  # no [MASK] left, only valid codes
    pattern = (torch.arange(9)[None] * (torch.arange(3)[:, None] + 1)) % 12
    greedy = _sample(model, n=3, cond=torch.arange(3), truncation=0.01)  # top-1: the mode of p(x_0)
    assert (greedy.reshape(3, 9) == pattern).float().mean() > 0.6


def test_cfg_scale_zero_equals_unguided_sampling_and_guidance_changes_it():
    torch.manual_seed(1)
    model = _prior().eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.3)
    cond = torch.tensor([0, 1, 2, 1, 0])
    plain = _sample(model, cond=cond)
    assert torch.equal(_sample(model, cond=cond, cfg_scale=0.0), plain)
    assert torch.equal(_sample(model, cond=cond, cfg_scale=0.0, purity=True), _sample(model, cond=cond, purity=True))
    assert not torch.equal(_sample(model, cond=cond, cfg_scale=3.0), plain)
    assert not torch.equal(_sample(model, seed=8, cond=cond), plain)


def test_unconditional_and_residual_priors_and_moe_ffn():
    model = _prior(num_classes=None)
    assert model.classes.table.num_embeddings == 1
    assert _sample(model, steps=3).shape == (5, 3, 3)
    with pytest.raises(ValueError, match="unconditional"):
        model.sample(2, cond=1)
    from stage2.vq_diffusion import VQDiffusionPrior

    residual = VQDiffusionPrior(code_spec={**SPEC, "grid": [2, 3], "depth": 2}, num_classes=None, **TINY)
    assert residual.seq_len == 12 and _sample(residual, steps=2).shape == (5, 2, 3, 2)
    moe = {"target": "layers.moe.MoE", "params": {"num_experts": 4, "top_k": 2, "hidden_dim": 32}}
    m = _prior(ffn=moe).train()
    batch = {"codes": torch.randint(0, 12, (4, 3, 3)), "label": torch.tensor([0, 1, 2, 0])}
    out = m.loss(batch["codes"], batch["label"])
    assert out.aux["aux_loss"] > 0 and torch.isfinite(out.loss)


def test_importance_sampling_trains_and_its_history_is_checkpointed():
    model = _prior(importance_sampling=True).train()
    for _ in range(3):
        model.loss(torch.randint(0, 12, (8, 3, 3)), torch.arange(8) % 3)
    assert model.step_sampler.count.sum() == 24
    state = model.state_dict()
    assert "step_sampler.loss_sq" in state and not any(k.startswith("diffusion.") for k in state)


# ---------------------------------------------------------------- end to end through the front door


def test_codes_train_sample_round_trip_through_the_commands(tmp_path):
    import csv

    from helpers import write_synthetic_code_folder
    from stage2.prior import load_prior
    from stage2.vq_diffusion import VQDiffusionPrior
    from tokenforge.train import main

    codes = tmp_path / "codes"
    write_synthetic_code_folder(codes)
    trainer = main(["configs/smoke/vq_diffusion.yaml", f"data.params.codes={codes}", "trainer.max_steps=40",
                    "--runs", str(tmp_path / "runs")])
    assert trainer.global_step == 40
    rows = list(csv.DictReader(open(tmp_path / "runs" / "vq_diffusion" / "logs" / "csv" / "metrics.csv")))
    val = [float(r["val/loss"]) for r in rows if r.get("val/loss")]
    assert len(val) >= 2 and val[-1] < val[0], val
    path = tmp_path / "runs" / "vq_diffusion" / "checkpoints" / "last.ckpt"
    loaded = load_prior(path)
    assert isinstance(loaded, VQDiffusionPrior) and loaded.num_classes == 3 and loaded.code_spec == SPEC
    model = trainer.lightning_module.eval()
    x_t, t, y = torch.randint(0, 13, (4, 9)), torch.tensor([1, 5, 10, 20]), torch.tensor([0, 1, 2, 0])
    with torch.no_grad():
        torch.testing.assert_close(loaded(x_t, t, y)[0], model(x_t, t, y)[0])
    out = _sample(loaded, cond=2, n=4, steps=5)
    assert torch.equal(out, _sample(model, cond=2, n=4, steps=5))
    assert out.shape == (4, 3, 3) and out.min() >= 0 and out.max() < 12

    # `scripts/sample.py CKPT` builds its flags from the declared sampling options
    from tokenforge.sample import parse_args
    from tokenforge.sampling_args import sampling_kwargs

    args = parse_args([str(path), "-n", "4", "--steps", "5", "--cfg", "1.5", "--truncation", "0.9", "--purity",
                       "--purity-weight", "1.0"])
    kwargs = sampling_kwargs(loaded, args)
    assert kwargs == {"steps": 5, "cfg_scale": 1.5, "truncation": 0.9, "purity": True, "purity_weight": 1.0}
    guided = _sample(loaded, cond=1, n=4, **kwargs)
    assert guided.shape == (4, 3, 3) and guided.min() >= 0 and guided.max() < 12
    with pytest.raises(SystemExit):  # a token-sampler flag the prior does not declare is refused
        parse_args([str(path), "--top-k", "3"])


def test_uniform_steps_are_stratified_over_the_batch_and_uniform_marginally():
    sampler = ImportanceStepSampler(10)
    g = torch.Generator().manual_seed(0)
    t, pt = sampler.sample(20, torch.device("cpu"), generator=g)
    assert torch.equal(torch.bincount(t, minlength=11)[1:], torch.full((10,), 2))  # every step twice
    assert torch.equal(pt, torch.full((20,), 0.1))
    firsts = torch.stack([sampler.sample(3, torch.device("cpu"), generator=g)[0][0] for _ in range(3000)])
    freq = torch.bincount(firsts, minlength=11)[1:].double() / 3000  # one sample's t is uniform over 1..10
    assert (freq - 0.1).abs().max() < 0.02
