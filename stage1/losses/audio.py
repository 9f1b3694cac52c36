"""Audio codec losses: spectral reconstruction, EnCodec's multi-scale STFT discriminator with hinge and
relative feature-matching losses, and EnCodec's loss balancer.

- ``multi_resolution_stft_loss``: auraloss's ``MultiResolutionSTFTLoss`` (spectral convergence + log-
  magnitude L1 averaged over FFT sizes; Yamamoto et al. 2020, Parallel WaveGAN).
- :class:`MultiScaleMelLoss`: EnCodec's frequency loss (Défossez et al. 2022, eq. 1) on torchaudio mel
  spectrograms: for windows ``2**i`` (hop ``2**i / 4``, 64 mels) ``mean|S - S'| + alpha * mean(S - S')**2``,
  averaged over scales (means, not sums, so the weight does not depend on clip length).
- :class:`MultiScaleSTFTDiscriminator`: EnCodec's MS-STFT-D: per FFT size, the complex STFT (real and
  imaginary parts as two channels) through a 2-D conv stack dilated in time and strided in frequency,
  weight-normalised, LeakyReLU(0.2); returns per-scale logits and every layer's feature map.
- ``generator_hinge_loss`` / ``discriminator_hinge_loss`` / ``feature_matching_loss``: EnCodec's
  ``l_g = 1/K sum_k mean(relu(1 - D_k(x̂)))``, ``l_d = 1/K sum_k mean(relu(1 - D_k(x))) + mean(relu(1 + D_k(x̂)))``
  and ``l_feat = 1/(KL) sum_{k,l} mean|D_k^l(x) - D_k^l(x̂)| / mean|D_k^l(x)|``.
- :class:`LossBalancer`: EnCodec's balancer: each loss's gradient w.r.t. the decoder output is rescaled
  to ``R * lambda_i / sum(lambda)`` divided by an EMA (decay ``beta``, bias-corrected) of its norm, so a
  loss's weight is its share of the gradient, whatever its scale.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
import torchaudio
from torch import Tensor, nn
from torch.nn.utils.parametrizations import weight_norm


def multi_resolution_stft_loss(fft_sizes: Sequence[int] = (1024, 512, 256, 128),
                               overlap: int = 4) -> nn.Module:
    """auraloss's MR-STFT loss (SC + log-magnitude L1) at ``fft_sizes``, hop ``n / overlap``, window ``n``."""
    import auraloss

    sizes = [int(n) for n in fft_sizes]
    return auraloss.freq.MultiResolutionSTFTLoss(fft_sizes=sizes, hop_sizes=[n // overlap for n in sizes],
                                                 win_lengths=sizes)


class MultiScaleMelLoss(nn.Module):
    """EnCodec's multi-scale mel loss: ``1/|scales| sum_i mean|S_i(x) - S_i(x̂)| + alpha mean(S_i(x) - S_i(x̂))^2``."""

    def __init__(self, sample_rate: int, scales: Sequence[int] = (5, 6, 7, 8, 9, 10, 11), n_mels: int = 64,
                 alpha: float = 1.0):
        super().__init__()
        self.alpha = alpha
        self.mels = nn.ModuleList(
            torchaudio.transforms.MelSpectrogram(sample_rate, n_fft=2**i, win_length=2**i, hop_length=2**i // 4,
                                                 n_mels=min(n_mels, 2**i // 8), normalized=False, power=1.0)
            for i in scales)

    def forward(self, xrec: Tensor, x: Tensor) -> Tensor:
        total = xrec.new_zeros(())
        for mel in self.mels:
            a, b = mel(xrec.float()), mel(x.float())
            total = total + F.l1_loss(a, b) + self.alpha * F.mse_loss(a, b)
        return total / len(self.mels)


class STFTDiscriminator(nn.Module):
    """One scale of EnCodec's MS-STFT-D on the complex spectrogram ``(B, 2C, frames, bins)``."""

    def __init__(self, n_fft: int, in_channels: int = 1, filters: int = 32, dilations: Sequence[int] = (1, 2, 4),
                 kernel: tuple[int, int] = (3, 9)):
        super().__init__()
        self.spec = torchaudio.transforms.Spectrogram(n_fft=n_fft, win_length=n_fft, hop_length=n_fft // 4,
                                                      normalized=True, center=False, power=None)
        pad = (kernel[0] // 2, kernel[1] // 2)
        convs = [weight_norm(nn.Conv2d(2 * in_channels, filters, kernel, padding=pad))]
        for d in dilations:  # dilated in time, strided by 2 in frequency
            convs.append(weight_norm(nn.Conv2d(filters, filters, kernel, stride=(1, 2), dilation=(d, 1),
                                               padding=(d * (kernel[0] // 2), kernel[1] // 2))))
        convs.append(weight_norm(nn.Conv2d(filters, filters, (3, 3), padding=(1, 1))))
        self.convs = nn.ModuleList(convs)
        self.post = weight_norm(nn.Conv2d(filters, 1, (3, 3), padding=(1, 1)))

    def forward(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        z = self.spec(x.float())  # (B, C, bins, frames) complex
        z = torch.cat([z.real, z.imag], dim=1).transpose(-1, -2)  # (B, 2C, frames, bins)
        features = []
        for conv in self.convs:
            z = F.leaky_relu(conv(z), 0.2)
            features.append(z)
        return self.post(z), features


class MultiScaleSTFTDiscriminator(nn.Module):
    """EnCodec's MS-STFT-D: :class:`STFTDiscriminator` at several FFT sizes."""

    def __init__(self, n_ffts: Sequence[int] = (1024, 512, 256, 128, 64), in_channels: int = 1, filters: int = 32):
        super().__init__()
        self.discriminators = nn.ModuleList(STFTDiscriminator(int(n), in_channels, filters) for n in n_ffts)

    def forward(self, x: Tensor) -> tuple[list[Tensor], list[list[Tensor]]]:
        outs = [d(x) for d in self.discriminators]
        return [o[0] for o in outs], [o[1] for o in outs]


def generator_hinge_loss(logits_fake: Sequence[Tensor]) -> Tensor:
    return torch.stack([F.relu(1 - lf).mean() for lf in logits_fake]).mean()


def discriminator_hinge_loss(logits_real: Sequence[Tensor], logits_fake: Sequence[Tensor]) -> Tensor:
    return torch.stack([F.relu(1 - lr).mean() + F.relu(1 + lf).mean()
                        for lr, lf in zip(logits_real, logits_fake)]).mean()


def feature_matching_loss(features_real: Sequence[Sequence[Tensor]], features_fake: Sequence[Sequence[Tensor]],
                          eps: float = 1e-8) -> Tensor:
    """EnCodec's relative feature matching; real features are detached (they are targets)."""
    terms = [(fr.detach() - ff).abs().mean() / (fr.detach().abs().mean() + eps)
             for per_real, per_fake in zip(features_real, features_fake) for fr, ff in zip(per_real, per_fake)]
    return torch.stack(terms).mean()


class LossBalancer(nn.Module):
    """EnCodec's gradient balancer over losses that depend on one tensor (the decoder output).

    ``backward_gradient(losses, x)`` returns ``sum_i R * (w_i / sum w) * g_i / (eps + EMA ||g_i||)``, where
    ``g_i = d loss_i / d x`` and ``||g_i||`` is the per-item L2 norm averaged over the batch; the
    caller back-propagates it with ``x.backward(gradient)`` (or ``(x * gradient).sum()``). The EMA is
    bias-corrected (``sum beta^t n_t / sum beta^t``), as in EnCodec's reference. ``stats`` holds each
    loss's raw gradient norm for logging.
    """

    def __init__(self, weights: Mapping[str, float], total_norm: float = 1.0, beta: float = 0.999,
                 eps: float = 1e-12):
        super().__init__()
        self.weights = {k: float(v) for k, v in weights.items()}
        self.total_norm, self.beta, self.eps = total_norm, beta, eps
        self.ema_sum: dict[str, float] = {}
        self.ema_weight: dict[str, float] = {}
        self.stats: dict[str, float] = {}

    def _average(self, name: str, value: float) -> float:
        self.ema_sum[name] = self.beta * self.ema_sum.get(name, 0.0) + value
        self.ema_weight[name] = self.beta * self.ema_weight.get(name, 0.0) + 1.0
        return self.ema_sum[name] / self.ema_weight[name]

    def backward_gradient(self, losses: Mapping[str, Tensor], x: Tensor) -> Tensor:
        unknown = set(losses) - set(self.weights)
        if unknown:
            raise KeyError(f"the balancer has no weight for {sorted(unknown)}; weights: {sorted(self.weights)}")
        total_weight = sum(self.weights[k] for k in losses)
        out = torch.zeros_like(x)
        for name, loss in losses.items():
            (grad,) = torch.autograd.grad(loss, x, retain_graph=True)
            norm = float(grad.flatten(1).norm(dim=1).mean())
            self.stats[name] = norm
            scale = self.total_norm * self.weights[name] / total_weight / (self.eps + self._average(name, norm))
            out = out + scale * grad
        return out
