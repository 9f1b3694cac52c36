"""The generator step of VQGAN and KL-VAE back-propagates once (issue 22): same parameter gradients and
adaptive GAN weight as taming's two-pass computation, one pass through the discriminator."""

from __future__ import annotations

import copy

import pytest
import torch

from helpers import taming_adaptive_weight
from stage1.klvae import KLVAE
from stage1.losses.discriminator import hinge_d_loss
from stage1.vqgan import VQGAN

ENC = {"in_channels": 3, "z_channels": 8, "channels": 8, "ch_mult": [1, 2], "num_res_blocks": 1, "groups": 4}
VQ = {"target": "stage1.quantizers.vq.VectorQuantizer", "params": {"codebook_size": 16, "codebook": "gradient"}}


def _vqgan(adaptive: bool = True, lpips: bool = False) -> VQGAN:
    kw = {"perceptual": {"net": "alex", "random_weights": True}} if lpips else {"perceptual_weight": 0.0}
    model = VQGAN(encoder=ENC, quantizer=VQ, resolution=32 if lpips else 16, embed_dim=4, disc_start=0,
                  disc_channels=8, disc_layers=2, adaptive_disc_weight=adaptive, **kw)
    model.setup("fit")
    return model


def _klvae(adaptive: bool = True) -> KLVAE:
    return KLVAE(encoder=ENC, resolution=16, latent_dim=4, kl_weight=0.1, disc_start=0, disc_channels=8,
                 disc_layers=2, adaptive_disc_weight=adaptive)


def _plain_backward(model) -> None:
    # Outside a Trainer, manual_backward has no strategy: a plain backward is what it does on CPU fp32.
    model.manual_backward = lambda loss, *args, **kwargs: loss.backward()


def _taming_two_pass(model, x: torch.Tensor, disc_on: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The old step: adaptive weight by back-propagating nll and g_loss to the last layer, then the
    whole loss again. Returns (d_weight times disc_weight, the reconstruction)."""
    if isinstance(model, VQGAN):
        xrec, q, aux = model(x)
        nll = model.nll(x, xrec)[2]
        loss = nll + q.loss + aux.get("aux_loss", 0.0)
    else:
        xrec, q, aux = model(x)
        nll = model.reconstruction_nll(x, xrec)
        loss = nll + model.hparams.kl_weight * q.kl().mean() + aux.get("aux_loss", 0.0)
    d_weight = torch.zeros(())
    if disc_on:
        g_loss = -model.discriminator(xrec).mean()
        if model.hparams.adaptive_disc_weight:
            last = model.decoder.last_layer
            # taming: ||d nll / d last|| / (||d g / d last|| + 1e-4), clamped to [0, 1e4], detached
            g_nll = torch.autograd.grad(nll, last, retain_graph=True)[0]
            g_gan = torch.autograd.grad(g_loss, last, retain_graph=True)[0]
            d_weight = (g_nll.norm() / (g_gan.norm() + 1e-4)).clamp(0, 1e4).detach() * model.hparams.disc_weight
        else:
            d_weight = torch.tensor(model.hparams.disc_weight)
        loss = loss + d_weight * g_loss
    loss.backward()
    return d_weight, xrec.detach()


def _ae_grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters()
            if not n.startswith("discriminator.") and p.grad is not None}


CASES = [("vqgan", lambda: _vqgan()), ("vqgan_lpips", lambda: _vqgan(lpips=True)),
         ("vqgan_fixed_weight", lambda: _vqgan(adaptive=False)), ("klvae", lambda: _klvae()),
         ("klvae_fixed_weight", lambda: _klvae(adaptive=False))]


@pytest.mark.parametrize("disc_on", [True, False])
@pytest.mark.parametrize("name,build", CASES, ids=[c[0] for c in CASES])
def test_one_pass_generator_step_has_the_two_pass_gradients(name, build, disc_on):
    torch.manual_seed(0)
    model = build().train()
    reference = copy.deepcopy(model)
    _plain_backward(model)
    x = torch.rand(2, 3, *model.resolution) * 2 - 1

    torch.manual_seed(1)  # the KL-VAE samples its posterior: both sides draw the same noise
    _, _, *rest = model.generator_backward(x, disc_on)
    terms = rest[-1]
    torch.manual_seed(1)
    expected_weight, xrec = _taming_two_pass(reference, x, disc_on)

    got, want = _ae_grads(model), _ae_grads(reference)
    assert got.keys() == want.keys() and len(got) == sum(1 for n, _ in model.named_parameters()
                                                         if not n.startswith("discriminator."))
    for n in want:  # float32 rounding differs between the two orders of summation: tolerance on the scale
        torch.testing.assert_close(got[n], want[n], rtol=1e-4, atol=1e-5 * want[n].abs().max().item(),
                                   msg=f"{name}: {n}")
    torch.testing.assert_close(terms["d_weight"], expected_weight)
    assert not terms["d_weight"].requires_grad
    if disc_on and model.hparams.adaptive_disc_weight:
        assert 0 < terms["d_weight"].item() < 1e4 * model.hparams.disc_weight
    # The generator step leaves the discriminator's gradients unset (its optimiser zeroes them anyway).
    assert all(p.grad is None for p in model.discriminator.parameters())
    if disc_on:
        # The discriminator step reuses the generator step's logits on the reconstruction: the same
        # loss and gradients as running the discriminator on it again (its weights have not changed).
        assert "logits_fake" in terms and terms["logits_fake"].requires_grad
        d_loss = hinge_d_loss(model.discriminator(x), terms["logits_fake"])
        d_loss.backward()
        reference.discriminator.zero_grad(set_to_none=True)
        d_ref = hinge_d_loss(reference.discriminator(x), reference.discriminator(xrec))
        d_ref.backward()
        torch.testing.assert_close(d_loss, d_ref)
        for (n, p), q in zip(model.discriminator.named_parameters(), reference.discriminator.parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5 * q.grad.abs().max().item(), msg=n)
    else:
        assert "logits_fake" not in terms


def test_generator_step_back_propagates_through_the_discriminator_once():
    torch.manual_seed(0)
    model = _vqgan()
    reference = copy.deepcopy(model)
    _plain_backward(model)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    passes = {"new": 0, "old": 0}

    def counting(disc, key):
        forward = disc.forward

        def wrapped(inp):
            out = forward(inp)
            if out.requires_grad:
                out.register_hook(lambda g: passes.__setitem__(key, passes[key] + 1))
            return out
        disc.forward = wrapped

    counting(model.discriminator, "new")
    counting(reference.discriminator, "old")
    model.generator_backward(x, disc_on=True)
    xrec, q, _ = reference(x)
    nll = reference.nll(x, xrec)[2]
    g_loss = -reference.discriminator(xrec).mean()
    (nll + q.loss + taming_adaptive_weight(nll, g_loss, reference.decoder.last_layer) * g_loss).backward()
    assert passes == {"new": 1, "old": 2}
