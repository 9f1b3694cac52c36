"""GIVT's Gaussian-mixture head: exact NLL and its gradients against torch.distributions, the
1-component case, the squareplus parameterisation, temperature, and DB-CFG's rejection sampler."""

from __future__ import annotations

import math

import torch

from stage2.gmm import GaussianMixture, GMMHead, db_cfg_sample, squareplus


def _random_mixture(shape=(3, 5), k=4, d=6, seed=0) -> GaussianMixture:
    g = torch.Generator().manual_seed(seed)
    return GaussianMixture(torch.randn(*shape, k, generator=g, dtype=torch.float64),
                           torch.randn(*shape, k, d, generator=g, dtype=torch.float64),
                           torch.rand(*shape, k, d, generator=g, dtype=torch.float64) + 0.2)


def test_log_likelihood_and_gradients_equal_mixture_same_family():
    gmm = _random_mixture()
    for t in (gmm.logits, gmm.loc, gmm.scale):
        t.requires_grad_(True)
    x = torch.randn(3, 5, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    ours = gmm.log_prob(x)
    D = torch.distributions
    ref = D.MixtureSameFamily(D.Categorical(logits=gmm.logits),
                              D.Independent(D.Normal(gmm.loc, gmm.scale), 1)).log_prob(x)
    torch.testing.assert_close(ours, ref)
    grads = torch.autograd.grad(ours.sum(), (gmm.logits, gmm.loc, gmm.scale))
    ref_grads = torch.autograd.grad(ref.sum(), (gmm.logits, gmm.loc, gmm.scale))
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(gmm.to_torch().log_prob(x), ref)


def test_one_component_head_is_a_diagonal_gaussian():
    torch.manual_seed(0)
    head = GMMHead(dim=8, latent_dim=3, num_components=1)
    torch.nn.init.normal_(head.proj.weight)
    h, x = torch.randn(4, 8), torch.randn(4, 3)
    gmm = head(h)
    expected = torch.distributions.Normal(gmm.loc[:, 0], gmm.scale[:, 0]).log_prob(x).sum(-1)
    torch.testing.assert_close(gmm.log_prob(x), expected)
    # sampling: the only component, loc + scale * eps with the generator's normals
    s = gmm.sample(torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)
    torch.multinomial(torch.ones(4, 1), 1, generator=g)  # the component draw consumes the same numbers
    eps = torch.randn(4, 3, generator=g)
    torch.testing.assert_close(s, gmm.loc[:, 0] + gmm.scale[:, 0] * eps)


def test_head_layout_squareplus_and_zero_init():
    head = GMMHead(dim=5, latent_dim=2, num_components=3, scale_tol=1e-3)
    gmm = head(torch.randn(7, 5))
    # zero init: uniform weights, zero means, squareplus(0) = 1 -> standard normal
    assert torch.equal(gmm.logits, torch.zeros(7, 3)) and torch.equal(gmm.loc, torch.zeros(7, 3, 2))
    assert torch.equal(gmm.scale, torch.ones(7, 3, 2))
    x = torch.randn(7, 2)
    torch.testing.assert_close(gmm.log_prob(x), torch.distributions.Normal(0.0, 1.0).log_prob(x).sum(-1))
    with torch.no_grad():  # bias pattern: [k logits | per component (loc d, raw scale d)]
        head.proj.bias.copy_(torch.arange(3 + 3 * 2 * 2, dtype=torch.float32))
    gmm = head(torch.zeros(1, 5))
    assert gmm.logits.tolist() == [[0.0, 1.0, 2.0]]
    assert gmm.loc[0, 1].tolist() == [7.0, 8.0]
    torch.testing.assert_close(gmm.scale[0, 1], squareplus(torch.tensor([9.0, 10.0])))
    assert torch.allclose(squareplus(torch.tensor([-1e4])), torch.tensor([1e-4]), rtol=1e-2)
    with torch.no_grad():
        head.proj.bias.fill_(-1e6)
    assert head(torch.zeros(1, 5)).scale.min() >= 1e-3  # floored at scale_tol


def test_sampling_matches_the_mixture_and_temperature_scales_the_std():
    gmm = GaussianMixture(torch.log(torch.tensor([[0.25, 0.75]])).expand(40000, 2),
                          torch.tensor([[[-2.0], [3.0]]]).expand(40000, 2, 1),
                          torch.tensor([[[0.5], [1.0]]]).expand(40000, 2, 1))
    x = gmm.sample(torch.Generator().manual_seed(0))[:, 0]
    mean = 0.25 * -2 + 0.75 * 3
    var = 0.25 * (0.25 + 4) + 0.75 * (1 + 9) - mean**2
    assert abs(x.mean() - mean) < 0.05 and abs(x.var() - var) < 0.15
    single = GaussianMixture(torch.zeros(40000, 1), torch.ones(40000, 1, 1), torch.full((40000, 1, 1), 2.0))
    xt = single.with_temperature(0.5).sample(torch.Generator().manual_seed(1))
    assert abs(xt.std() - 1.0) < 0.02 and abs(xt.mean() - 1.0) < 0.02


def _one_gaussian(n, loc, scale, d=1):
    return GaussianMixture(torch.zeros(n, 1), torch.full((n, 1, d), float(loc)), torch.full((n, 1, d), float(scale)))


def test_db_cfg_with_zero_weight_samples_the_conditional():
    n = 20000
    x, stats = db_cfg_sample(_one_gaussian(n, 1.0, 0.7), _one_gaussian(n, -1.0, 1.5), w=0.0,
                             generator=torch.Generator().manual_seed(0))
    assert abs(x.mean() - 1.0) < 0.03 and abs(x.std() - 0.7) < 0.03
    assert stats.success == 1.0 and 0.0 < stats.acceptance <= 1.0


def test_db_cfg_targets_the_guided_gaussian_in_closed_form():
    # p_c^(1+w) / p_u^w of two Gaussians is Gaussian: precision (1+w)/sc^2 - w/su^2, mean by precisions
    n, w, (mc, sc), (mu, su) = 20000, 1.5, (0.5, 0.8), (-0.5, 1.2)
    prec = (1 + w) / sc**2 - w / su**2
    mean = ((1 + w) * mc / sc**2 - w * mu / su**2) / prec
    x, stats = db_cfg_sample(_one_gaussian(n, mc, sc), _one_gaussian(n, mu, su), w=w,
                             generator=torch.Generator().manual_seed(0))
    assert abs(x.mean() - mean) < 0.03, (x.mean(), mean)
    assert abs(x.std() - 1 / math.sqrt(prec)) < 0.03
    assert stats.success == 1.0 and 0.05 < stats.acceptance < 1.0


def test_db_cfg_picks_components_from_the_conditional_weights():
    n = 20000
    cond = GaussianMixture(torch.log(torch.tensor([0.9, 0.1])).expand(n, 2),
                           torch.tensor([[-3.0], [3.0]]).expand(n, 2, 1), torch.full((n, 2, 1), 0.3))
    uncond = GaussianMixture(torch.zeros(n, 2), torch.tensor([[-3.2], [3.2]]).expand(n, 2, 1),
                             torch.full((n, 2, 1), 0.3))
    x, _ = db_cfg_sample(cond, uncond, w=1.0, generator=torch.Generator().manual_seed(0))
    assert abs((x < 0).float().mean() - 0.9) < 0.01
    # guidance pushes each component away from the unconditional one (means -2.8 and 2.8)
    assert abs(x[x < 0].mean() + 2.8) < 0.02 and abs(x[x > 0].mean() - 2.8) < 0.05
