"""SEANet-style 1-D convolutional encoder/decoder (SoundStream, Zeghidour et al. 2021; EnCodec,
Défossez et al. 2022) for waveforms.

Encoder: a 7-tap conv, then per stride ``r`` in ``ratios`` a few residual units (ELU, dilated 3-tap
conv to half the channels, ELU, 1-tap conv back; dilations ``dilation_base**j``) followed by ELU and a
strided conv of kernel ``2r`` that doubles the channels; optionally a 2-layer LSTM with a skip (as
EnCodec); ELU and a 7-tap conv to ``z_channels``. The decoder mirrors it with transposed convs.
Total stride = prod(ratios) (e.g. [8, 5, 4, 2] -> 320: 50 frames/s at 16 kHz).

Padding is non-causal and exact: for an input whose length is a multiple of the total stride the
encoder returns ``length / stride`` frames and the decoder returns the original length (reflect
padding as in EnCodec; the transposed convs trim ``kernel - stride`` samples split over both ends).
Weight normalisation on every conv (``weight_norm: true``), as in both papers.
"""

from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.parametrizations import weight_norm as _weight_norm


def _wn(module: nn.Module, enabled: bool) -> nn.Module:
    return _weight_norm(module) if enabled else module


class PaddedConv1d(nn.Module):
    """Conv1d with EnCodec's non-causal reflect padding: output length = ceil(length / stride)."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, dilation: int = 1, wn: bool = True):
        super().__init__()
        self.conv = _wn(nn.Conv1d(cin, cout, kernel, stride, dilation=dilation), wn)
        self.pad = (kernel - 1) * dilation + 1 - stride  # total padding that keeps length/stride frames
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        extra = (-x.shape[-1]) % self.stride  # right-pad a length that is not a multiple of the stride
        left = self.pad // 2
        right = self.pad - left + extra
        mode = "reflect" if x.shape[-1] > max(left, right) else "constant"
        return self.conv(F.pad(x, (left, right), mode=mode))


class PaddedConvTranspose1d(nn.Module):
    """ConvTranspose1d trimmed so that ``length`` frames become ``length * stride`` samples."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, wn: bool = True):
        super().__init__()
        self.conv = _wn(nn.ConvTranspose1d(cin, cout, kernel, stride), wn)
        self.trim = kernel - stride

    def forward(self, x: Tensor) -> Tensor:
        y = self.conv(x)
        left = self.trim // 2
        return y[..., left: y.shape[-1] - (self.trim - left)]


class ResidualUnit(nn.Module):
    """ELU -> dilated 3-tap conv to ``channels // compress`` -> ELU -> 1-tap conv, plus identity skip."""

    def __init__(self, channels: int, dilation: int, compress: int = 2, wn: bool = True):
        super().__init__()
        hidden = max(channels // compress, 1)
        self.block = nn.Sequential(nn.ELU(), PaddedConv1d(channels, hidden, 3, dilation=dilation, wn=wn),
                                   nn.ELU(), PaddedConv1d(hidden, channels, 1, wn=wn))

    def forward(self, x: Tensor) -> Tensor:
        return x + self.block(x)


class SkipLSTM(nn.Module):
    """EnCodec's LSTM over frames with a residual connection (channel-first in and out)."""

    def __init__(self, channels: int, layers: int):
        super().__init__()
        self.lstm = nn.LSTM(channels, channels, layers)

    def forward(self, x: Tensor) -> Tensor:
        y = x.permute(2, 0, 1)
        return (self.lstm(y)[0] + y).permute(1, 2, 0)


class SEANetEncoder(nn.Module):
    """Waveform ``(B, in_channels, L)`` -> latent ``(B, z_channels, L / prod(ratios))``.

    ``ratios`` are listed in the decoder's order (largest first, as EnCodec), applied reversed here.
    ``dims`` exists so configs can say ``dims: 1``; only 1 is accepted.
    """

    def __init__(self, in_channels: int = 1, channels: int = 32, z_channels: int = 128,
                 ratios: list[int] | tuple[int, ...] = (8, 5, 4, 2), residual_layers: int = 1,
                 dilation_base: int = 2, lstm_layers: int = 0, weight_norm: bool = True, dims: int = 1):
        super().__init__()
        if dims != 1:
            raise ValueError(f"SEANet is a 1-D network (dims: 1), got dims={dims}")
        wn = weight_norm
        layers: list[nn.Module] = [PaddedConv1d(in_channels, channels, 7, wn=wn)]
        ch = channels
        for r in reversed(list(ratios)):
            layers += [ResidualUnit(ch, dilation_base**j, wn=wn) for j in range(residual_layers)]
            layers += [nn.ELU(), PaddedConv1d(ch, ch * 2, 2 * r, stride=r, wn=wn)]
            ch *= 2
        if lstm_layers:
            layers.append(SkipLSTM(ch, lstm_layers))
        layers += [nn.ELU(), PaddedConv1d(ch, z_channels, 7, wn=wn)]
        self.net = nn.Sequential(*layers)
        self.downsample_factor = math.prod(ratios)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class SEANetDecoder(nn.Module):
    """Latent ``(B, z_channels, T)`` -> waveform ``(B, out_channels, T * prod(ratios))`` (no output
    non-linearity, as EnCodec: the losses see the raw waveform; clamp when writing files)."""

    def __init__(self, out_channels: int = 1, channels: int = 32, z_channels: int = 128,
                 ratios: list[int] | tuple[int, ...] = (8, 5, 4, 2), residual_layers: int = 1,
                 dilation_base: int = 2, lstm_layers: int = 0, weight_norm: bool = True, dims: int = 1):
        super().__init__()
        if dims != 1:
            raise ValueError(f"SEANet is a 1-D network (dims: 1), got dims={dims}")
        wn = weight_norm
        ch = channels * 2 ** len(ratios)
        layers: list[nn.Module] = [PaddedConv1d(z_channels, ch, 7, wn=wn)]
        if lstm_layers:
            layers.append(SkipLSTM(ch, lstm_layers))
        for r in ratios:
            layers += [nn.ELU(), PaddedConvTranspose1d(ch, ch // 2, 2 * r, r, wn=wn)]
            ch //= 2
            layers += [ResidualUnit(ch, dilation_base**j, wn=wn) for j in range(residual_layers)]
        self.conv_out = PaddedConv1d(ch, out_channels, 7, wn=wn)
        layers += [nn.ELU(), self.conv_out]
        self.net = nn.Sequential(*layers)
        self.upsample_factor = math.prod(ratios)

    @property
    def last_layer(self) -> Tensor:
        """The last conv's weight (its direction ``v`` under weight norm), for gradient balancing."""
        conv = self.conv_out.conv
        if hasattr(conv, "parametrizations"):
            return conv.parametrizations.weight.original1
        return conv.weight

    def forward(self, z: Tensor) -> Tensor:
        return self.net(z)
