"""Masked GIVT: the loss is the exact mixture NLL on the masked positions only (value and gradients
against the formula), masked inputs are replaced by the mask embedding, training masks follow the
schedule, the parallel decoder never re-draws a fixed position, infilling keeps the given latents,
DB-CFG, and the end-to-end path KL-VAE latents -> masked GIVT -> samples -> decoded images."""

from __future__ import annotations

import math

import pytest
import torch

from stage2.givt_maskgit import GIVTMaskGIT, masked_gmm_decode
from stage2.gmm import GaussianMixture
from stage2.maskgit import mask_counts, remask_counts

SPEC = {"grid": [3, 3], "depth": None, "codebook_size": None, "continuous": {"dim": 4}}


def _model(**kw) -> GIVTMaskGIT:
    torch.manual_seed(0)
    model = GIVTMaskGIT(code_spec=SPEC, num_classes=3, dim=32, depth=2, heads=2,
                        num_components=kw.pop("num_components", 3), **kw)
    torch.nn.init.normal_(model.head.proj.weight, std=0.3)  # the zero init would make every position N(0, I)
    model.latent_mean.copy_(torch.tensor([0.5, -1.0, 0.0, 2.0]))
    model.latent_std.copy_(torch.tensor([2.0, 0.5, 1.0, 3.0]))
    return model


def _mixture_log_density(logits, loc, scale, x):
    """log sum_k pi_k prod_j N(x_j; mu_kj, s_kj^2), written out from the formula."""
    x = x.unsqueeze(-2)
    log_normal = -0.5 * ((x - loc) / scale) ** 2 - torch.log(scale) - 0.5 * math.log(2 * math.pi)
    return torch.logsumexp(torch.log_softmax(logits, -1) + log_normal.sum(-1), dim=-1)


def test_loss_is_the_mixture_nll_of_the_masked_positions_and_its_gradient_matches_the_formula():
    model = _model().train()
    codes, labels = torch.randn(6, 3, 3, 4) * 2, torch.tensor([0, 1, 2, 0, 1, 2])
    captured = {}
    model.head.proj.register_forward_hook(lambda m, i, o: captured.update(out=o) or o.retain_grad())
    out = model.loss(codes, labels, generator=torch.Generator().manual_seed(5))
    mask = model.training_mask(6, torch.Generator().manual_seed(5))  # the same draw as inside the loss
    assert mask.any(1).all() and not mask.all()

    head_out = captured["out"]
    out.loss.backward()
    params = [p for p in model.parameters()]
    got_grads = [p.grad.clone() for p in params]
    # only the masked positions' mixture parameters receive gradient
    per_position = head_out.grad.abs().sum(-1)
    assert (per_position[~mask] == 0).all() and (per_position[mask] > 0).all()

    model.zero_grad()
    gmm, z, _ = model(codes, labels, mask)
    z_direct = (codes.reshape(6, 9, 4) - model.latent_mean) / model.latent_std
    torch.testing.assert_close(z, z_direct)
    logp = _mixture_log_density(gmm.logits, gmm.loc, gmm.scale, z_direct)
    direct = -(logp * mask).sum() / mask.sum() / 4
    torch.testing.assert_close(out.loss, direct)
    torch.testing.assert_close(out.nll, direct * 4)
    direct.backward()
    for p, g in zip(params, got_grads):
        torch.testing.assert_close(p.grad, g)
    bits = (direct + torch.log(model.latent_std).sum() / 4) / math.log(2)
    torch.testing.assert_close(out.stats["bits_per_dim_masked"], bits.detach())


def test_masked_inputs_are_replaced_by_the_mask_embedding_and_attention_is_bidirectional():
    model = _model().eval()
    codes, labels = torch.randn(2, 3, 3, 4), torch.tensor([0, 2])
    mask = torch.zeros(2, 9, dtype=torch.bool)
    mask[:, [1, 4, 7]] = True
    gmm = model(codes, labels, mask)[0]
    changed = codes.clone()
    changed.view(2, 9, 4)[:, 4] += 5.0  # a masked position: its value is never read
    torch.testing.assert_close(model(changed, labels, mask)[0].loc, gmm.loc)
    changed = codes.clone()
    changed.view(2, 9, 4)[:, 5] += 5.0  # an unmasked one: every position sees it, earlier ones too
    moved = ~torch.isclose(model(changed, labels, mask)[0].loc, gmm.loc, atol=1e-6).flatten(2).all(-1)
    assert moved[:, :5].all() and moved[:, 6:].all()


def test_training_masks_follow_the_cosine_schedule_on_the_big_vision_range():
    model = _model(min_masking_rate=0.3)
    g = torch.Generator().manual_seed(1)
    mask = model.training_mask(200, g)
    r = torch.rand(200, generator=torch.Generator().manual_seed(1)) * 0.7  # the progress drawn inside
    torch.testing.assert_close(mask.sum(1), mask_counts(r, 9, "cosine"))
    assert mask.sum(1).min() >= math.ceil(math.cos(math.pi / 2 * 0.7) * 9)


def _recording_fn(calls, guided=False):
    g = torch.Generator().manual_seed(0)

    def fn(z, unknown):
        calls.append((z.clone(), unknown.clone()))
        b, n, d = z.shape
        gmm = GaussianMixture(torch.randn(b, n, 2, generator=g), torch.randn(b, n, 2, d, generator=g),
                              torch.rand(b, n, 2, d, generator=g) + 0.5)
        return gmm, (GaussianMixture(gmm.logits, gmm.loc + 0.3, gmm.scale * 1.2) if guided else None)

    return fn


@pytest.mark.parametrize("guided", [False, True])
def test_the_decoder_never_redraws_a_fixed_position_and_fixes_by_the_schedule(guided):
    calls = []
    z, stats = masked_gmm_decode(_recording_fn(calls, guided), 3, 9, 4, steps=4, cfg_scale=1.0 if guided else 0.0,
                                 generator=torch.Generator().manual_seed(1))
    assert len(calls) == 4 and calls[0][1].all()
    for t, ((z_t, unknown_t), (z_next, unknown_next)) in enumerate(zip(calls, calls[1:] + [(z, None)])):
        assert (z_t[unknown_t] == 0).all()  # the model never sees a value at a masked position
        if unknown_next is None:
            unknown_next = torch.zeros_like(unknown_t)
        assert not (unknown_next & ~unknown_t).any()  # fixed stays fixed
        known = ~unknown_t
        torch.testing.assert_close(z_next[known], z_t[known], rtol=0, atol=0)  # and keeps its value
        assert unknown_next.sum(1).tolist() == remask_counts(t, 4, 9, unknown_t.sum(1)).tolist()
    assert (z != 0).all()
    assert (stats.elements > 0) == guided


def test_infilling_keeps_the_given_latents_and_fills_the_rest():
    model = _model().eval()
    init = torch.randn(4, 3, 3, 4)
    fill = torch.zeros(4, 3, 3, dtype=torch.bool)
    fill[:, 0] = True  # regenerate the first grid row
    fill[2, 2, 2] = True
    for cfg in (0.0, 1.5):
        out = model.sample(4, cond=[0, 1, 2, 0], init=init, fill=fill, steps=3, cfg_scale=cfg,
                           generator=torch.Generator().manual_seed(2))
        assert torch.equal(out[~fill], init[~fill])  # bit-exact
        assert not torch.isclose(out[fill], init[fill]).all(-1).any()
    with pytest.raises(ValueError, match="both"):
        model.sample(4, init=init)


def test_db_cfg_weight_zero_is_conditional_sampling_and_guidance_reports_acceptance():
    model = _model().eval()
    plain = model.sample(3, cond=1, steps=4, generator=torch.Generator().manual_seed(3))
    zero = model.sample(3, cond=1, steps=4, cfg_scale=0.0, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(plain, zero)
    assert plain.shape == (3, 3, 3, 4) and model.last_sampling_stats == {}
    guided = model.sample(3, cond=1, steps=4, cfg_scale=2.0, generator=torch.Generator().manual_seed(3))
    assert not torch.allclose(guided, plain)
    stats = model.last_sampling_stats
    assert 0.0 < stats["dbcfg_acceptance"] <= 1.0 and stats["dbcfg_success"] > 0.9


def test_klvae_latents_to_masked_givt_to_decoded_images(klvae_and_latents, tmp_path):
    """Smoke config trains with a falling masked NLL; samples (with DB-CFG, on the command line too) decode."""
    from helpers import CONFIGS, assert_finite_and_falling, logged_series, train
    from stage1 import load_tokenizer
    from stage2.prior import load_prior
    from tokenforge.sample import main as sample_main

    ckpt, codes = klvae_and_latents
    runs = tmp_path / "runs"
    train(CONFIGS / "smoke" / "givt_maskgit.yaml", runs, [f"data.params.codes={codes}"], name="mg")
    key, values = logged_series(runs / "mg")
    assert_finite_and_falling(values, f"givt_maskgit {key}")
    prior = load_prior(runs / "mg" / "checkpoints" / "last.ckpt")
    assert isinstance(prior, GIVTMaskGIT) and int(prior.norm_items_seen) > 0
    latents = prior.sample(3, cond=[0, 1, 2], steps=4, cfg_scale=0.5, generator=torch.Generator().manual_seed(0))
    images = load_tokenizer(ckpt).decode(latents)
    assert images.shape == (3, 1, 28, 28) and torch.isfinite(images).all()
    out = sample_main([str(runs / "mg" / "checkpoints" / "last.ckpt"), "-n", "4", "--class", "1", "--steps", "4",
                       "--cfg", "0.5", "--out", str(tmp_path / "samples")])
    assert any(p.suffix == ".png" for p in out.iterdir())
