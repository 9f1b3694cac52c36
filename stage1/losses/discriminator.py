"""PatchGAN discriminator (Isola et al., 2017, as used by taming's VQGAN) and GAN losses."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class PatchDiscriminator(nn.Module):
    """Strided conv stack ending in a map of real/fake logits, one per receptive-field patch."""

    def __init__(self, in_channels: int = 3, channels: int = 64, num_layers: int = 3, dims: int = 2):
        super().__init__()
        conv = {1: nn.Conv1d, 2: nn.Conv2d}[dims]
        norm = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d}[dims]
        layers: list[nn.Module] = [conv(in_channels, channels, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, num_layers + 1):
            prev, mult = mult, min(2**n, 8)
            stride = 2 if n < num_layers else 1
            layers += [conv(channels * prev, channels * mult, 4, stride, 1, bias=False),
                       norm(channels * mult), nn.LeakyReLU(0.2, True)]
        layers.append(conv(channels * mult, 1, 4, 1, 1))
        self.net = nn.Sequential(*layers)
        self.apply(_init_weights)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


def _init_weights(m: nn.Module) -> None:
    # DCGAN initialisation, as in pix2pix and taming.
    if isinstance(m, (nn.Conv1d, nn.Conv2d)):
        nn.init.normal_(m.weight, 0.0, 0.02)
    elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
        nn.init.normal_(m.weight, 1.0, 0.02)
        nn.init.zeros_(m.bias)


def hinge_d_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def vanilla_d_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    return 0.5 * (F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean())


D_LOSSES = {"hinge": hinge_d_loss, "vanilla": vanilla_d_loss}


def adaptive_weight_from_grads(nll_grad: Tensor, g_grad: Tensor, max_weight: float = 1e4) -> Tensor:
    """``||grad nll|| / (||grad g|| + 1e-4)`` clamped to ``[0, max_weight]`` and detached (Esser et al., 2021),
    from the two gradients at the decoder's last layer."""
    return (nll_grad.norm() / (g_grad.norm() + 1e-4)).clamp(0.0, max_weight).detach()


def generator_objective(recon: Tensor, nll: Tensor, g_loss: Tensor, last_layer: Tensor | None, disc_weight: float,
                        rest: Tensor | float, max_weight: float = 1e4,
                        gan_input: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """A scalar to back-propagate once for ``nll + rest + d_weight * g_loss``, and ``d_weight``.

    ``nll`` (reconstruction + perceptual) and ``g_loss`` must reach the parameters only through
    ``recon`` and share no graph above it; ``rest`` holds the terms that do not (codebook and
    commitment, KL, auxiliary losses). Each loss's gradient at ``recon`` is taken once -- for
    ``g_loss`` an input-gradient pass through the discriminator, without its weight gradients,
    which the generator step never uses -- and the adaptive weight's last-layer gradients are
    vector-Jacobian products of ``recon`` through the last layer alone. (Back-propagating both
    losses to the last layer and then the total loss again, taming's way, runs the discriminator
    and perceptual backward twice; ``tests/helpers.py`` keeps that way as the reference.)
    Returns ``(sum(recon * sg(g_nll + d_weight * g_gan)) + rest,
    d_weight)`` with ``d_weight`` already times ``disc_weight``: the first has the total loss's
    parameter gradients, not its value. ``last_layer=None``: a fixed ``d_weight = disc_weight``.

    ``gan_input``: the detached leaf copy of ``recon`` the discriminator was run on, when its graph
    is kept for the discriminator's own step (the same logits, so one forward less); the gradient
    of ``g_loss`` is taken there, with the graph retained.
    """
    # No retain_graph on recon: these free only the nodes above it (loss, perceptual net, discriminator).
    if gan_input is None:
        g_gan = torch.autograd.grad(g_loss, recon)[0]
    else:
        g_gan = torch.autograd.grad(g_loss, gan_input, retain_graph=True)[0]
    if last_layer is None:
        d_weight = torch.full((), float(disc_weight), device=recon.device)  # a fill, no host-to-device copy
        return nll + (recon * (d_weight * g_gan)).sum() + rest, d_weight
    g_nll = torch.autograd.grad(nll, recon)[0]
    nll_last = torch.autograd.grad(recon, last_layer, g_nll, retain_graph=True)[0]
    gan_last = torch.autograd.grad(recon, last_layer, g_gan, retain_graph=True)[0]
    d_weight = adaptive_weight_from_grads(nll_last, gan_last, max_weight) * disc_weight
    return (recon * (g_nll + d_weight * g_gan)).sum() + rest, d_weight


def adversarial_objective(discriminator: nn.Module | None, recon: Tensor, nll: Tensor, rest: Tensor | float,
                          last_layer: Tensor | None, disc_weight: float
                          ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor | None]:
    """The generator step's objective: ``(objective, loss, g_loss, d_weight, logits_fake)``.

    ``discriminator=None`` (not started yet): ``objective = nll + rest``. Otherwise the discriminator
    runs on a detached leaf copy of ``recon``: the generator's gradient is taken at the copy
    (:func:`generator_objective`), and ``logits_fake`` keeps its graph so that the discriminator's
    own step reuses it (its weights have not changed in between: one forward less). ``loss`` is the
    detached value ``nll + rest + d_weight * g_loss`` (the objective has its gradients, not its value).
    """
    g_loss = d_weight = torch.zeros((), device=recon.device)
    objective, logits_fake = nll + rest, None
    if discriminator is not None:
        fake = recon.detach().requires_grad_(True)
        logits_fake = discriminator(fake)
        g_loss = -logits_fake.mean()
        objective, d_weight = generator_objective(recon, nll, g_loss, last_layer, disc_weight, rest, gan_input=fake)
    loss = nll.detach() + torch.as_tensor(rest).detach() + d_weight * g_loss.detach()
    return objective, loss, g_loss.detach(), d_weight, logits_fake
