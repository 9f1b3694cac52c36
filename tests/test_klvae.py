"""KL-VAE: the Gaussian posterior's KL and its gradient against the closed form, the β-VAE objective,
the continuous code spec, latent statistics, and training on the smoke config."""

from __future__ import annotations

import math

import pytest
import torch

from metrics.latent import LatentStatistics
from stage1.gaussian import DiagonalGaussian
from stage1.klvae import KLVAE

ENC = {"in_channels": 1, "z_channels": 8, "channels": 8, "ch_mult": [1, 2], "num_res_blocks": 1,
       "mid_attn": False, "groups": 4}


def _tiny(**kw) -> KLVAE:
    return KLVAE(encoder=ENC, resolution=8, latent_dim=6, **kw)


def test_kl_and_its_gradient_match_the_closed_form():
    g = torch.Generator().manual_seed(1)
    mean = torch.randn(2, 3, 2, 2, generator=g, dtype=torch.float64, requires_grad=True)
    logvar = (0.5 * torch.randn(2, 3, 2, 2, generator=g, dtype=torch.float64)).requires_grad_(True)
    q = DiagonalGaussian(torch.cat([mean, logvar], 1))
    kl = q.kl()
    # KL(N(m, s^2) || N(0, 1)) = 0.5 (m^2 + s^2 - 1 - log s^2), summed over the latent elements
    by_hand = 0.5 * (mean**2 + logvar.exp() - 1 - logvar)
    torch.testing.assert_close(kl, by_hand.flatten(1).sum(1))
    ref = torch.distributions.kl_divergence(torch.distributions.Normal(mean, (0.5 * logvar).exp()),
                                            torch.distributions.Normal(0.0, 1.0)).flatten(1).sum(1)
    torch.testing.assert_close(kl, ref)
    kl.sum().backward()
    # d KL / d m = m ;  d KL / d logvar = 0.5 (exp(logvar) - 1)
    torch.testing.assert_close(mean.grad, mean.detach())
    torch.testing.assert_close(logvar.grad, 0.5 * (logvar.detach().exp() - 1))


def test_reparametrised_sample_has_the_posterior_moments_and_gradients():
    moments = torch.tensor([1.5, math.log(0.25)]).view(1, 2, 1).repeat(1, 1, 20000).requires_grad_(True)
    q = DiagonalGaussian(moments)
    z = q.sample(torch.Generator().manual_seed(0))
    assert abs(z.mean().item() - 1.5) < 0.02 and abs(z.std().item() - 0.5) < 0.02
    z.sum().backward()  # dz/dmean = 1, dz/dlogvar = 0.5 * std * eps
    assert torch.allclose(moments.grad[:, 0], torch.ones(1))
    eps = (z.detach() - 1.5) / 0.5
    torch.testing.assert_close(moments.grad[:, 1], 0.5 * 0.5 * eps[:, 0])


def test_logvar_is_clamped_so_exp_cannot_overflow():
    q = DiagonalGaussian(torch.tensor([[0.0, 1000.0]]).view(1, 2, 1))
    assert torch.isfinite(q.kl()).all() and q.logvar.item() == 20.0


def test_objective_is_summed_reconstruction_plus_beta_kl():
    model = _tiny(kl_weight=0.01, rec_loss="l2")
    x = torch.rand(3, 1, 8, 8) * 2 - 1
    xrec = torch.rand(3, 1, 8, 8) * 2 - 1
    assert torch.allclose(model.reconstruction_nll(x, xrec), 0.5 * ((xrec - x) ** 2).sum() / 3)
    model.hparams.rec_loss = "l1"
    assert torch.allclose(model.reconstruction_nll(x, xrec), (xrec - x).abs().sum() / 3)


def test_code_spec_encode_decode_are_continuous_and_deterministic():
    model = _tiny().eval()
    spec = model.code_spec
    assert spec["continuous"] == {"dim": 6} and spec["codebook_size"] is None and spec["grid"] == [4, 4]
    x = torch.rand(2, 1, 8, 8) * 2 - 1
    z = model.encode(x)
    assert z.shape == (2, 4, 4, 6) and z.dtype == torch.float32  # (B, H, W, d)
    torch.testing.assert_close(z, model.posterior(x).mean.movedim(1, -1))
    assert torch.equal(z, model.encode(x))  # the mean: no noise
    z1 = model.encode(x, sample=True, generator=torch.Generator().manual_seed(3))
    z2 = model.encode(x, sample=True, generator=torch.Generator().manual_seed(3))
    assert torch.equal(z1, z2) and not torch.equal(z1, z)
    assert model.decode(z).shape == x.shape
    assert model.decode(z.half()).dtype == torch.float32  # float16 latents from code files decode


def test_latent_dim_outside_the_allowed_range_is_refused():
    with pytest.raises(ValueError, match="4..32"):
        KLVAE(encoder=ENC, resolution=8, latent_dim=64)


def test_latent_statistics_per_channel():
    stats = LatentStatistics(2)
    g = torch.Generator().manual_seed(0)
    mean = torch.zeros(1000, 2, 4)
    mean[:, 0] = torch.randn(1000, 4, generator=g) * 2 + 1
    logvar = torch.zeros_like(mean)
    stats.update(mean[:500], logvar[:500])
    stats.update(mean[500:], logvar[500:])
    out = stats.compute()
    assert torch.allclose(out["latent_mean"], torch.tensor([1.0, 0.0]), atol=0.1)
    assert torch.allclose(out["latent_std"], torch.tensor([2.0, 0.0]), atol=0.1)
    # KL per element with unit posterior variance is 0.5 m^2: E = 0.5 (1 + 4) for channel 0, 0 for channel 1
    assert torch.allclose(out["kl_per_dim"], torch.tensor([2.5, 0.0]), atol=0.15)
    assert torch.allclose(out["kl_per_sample"], out["kl_per_dim"].sum() * 4, rtol=1e-5)


def test_larger_beta_gives_smaller_kl_after_training():
    x = torch.rand(16, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    kls = []
    for beta in (1e-4, 1.0):
        torch.manual_seed(0)
        model = _tiny(kl_weight=beta)
        opt = torch.optim.Adam(model.parameters(), lr=3e-3)
        for _ in range(40):
            xrec, q, _ = model(x)
            loss = model.reconstruction_nll(x, xrec) + beta * q.kl().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            kls.append(model.posterior(x).kl().mean().item())
    assert kls[1] < 0.5 * kls[0], kls


def test_smoke_config_trains_and_reloads(run_root):
    from helpers import CONFIGS, assert_finite_and_falling, logged_series, train
    from stage1 import load_tokenizer

    train(CONFIGS / "smoke" / "klvae.yaml", run_root, name="klvae")
    run = run_root / "klvae"
    key, values = logged_series(run)
    assert_finite_and_falling(values, key)
    header = (run / "logs" / "csv" / "metrics.csv").read_text().splitlines()[0]
    assert "val/kl_per_element" in header and "train/d_loss" in header  # GAN started at step 12
    tok = load_tokenizer(run / "checkpoints" / "last.ckpt")
    assert tok.code_spec["continuous"] == {"dim": 4}
    z = tok.encode(torch.zeros(2, 1, 28, 28))
    assert z.shape == (2, 7, 7, 4)  # channel-last, as the code spec lays continuous codes out
