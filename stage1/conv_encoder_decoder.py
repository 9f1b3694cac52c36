"""Convolutional encoder/decoder for 1-D and 2-D signals (taming/LDM style).

ResNet blocks with GroupNorm + SiLU, stride-2 downsampling, nearest-neighbour upsampling, and
single-head self-attention at the lowest resolution(s). ``dims=2`` serves images, ``dims=1``
serves audio, motion and action sequences with the same code. An optional token-wise module
(``mid_ffn``: e.g. an MoE layer) can be placed in the middle block, where it sees every spatial
position as a token.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from layers.instantiate import instantiate


def _conv(dims: int) -> type[nn.Module]:
    if dims not in (1, 2, 3):
        raise ValueError(f"dims must be 1, 2 or 3, got {dims}")
    return {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims]


def _weight_layout(x: Tensor, weight: Tensor) -> Tensor:
    """``x`` in the memory layout of the network's weights: channels-last only when the weights are
    (``model.params.channels_last``), else channels-first.

    Quantizers hand back ``z_q`` as a channels-last view of their rows, and a convolution keeps its
    input's layout, so without this the whole decoder (and the discriminator after it) ran
    channels-last, where CPU GroupNorm's backward is ~10x slower than channels-first (issue 22).
    """
    channels_last = torch.channels_last
    if x.dim() == 4 and weight.dim() == 4 and weight.is_contiguous(memory_format=channels_last) \
            and not weight.is_contiguous():  # a weight with one input channel is both: channels-first then
        return x.contiguous(memory_format=channels_last)
    return x.contiguous()


def _norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(groups, channels), channels, eps=1e-6)


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, dims: int, groups: int, dropout: float = 0.0):
        super().__init__()
        conv = _conv(dims)
        self.norm1 = _norm(cin, groups)
        self.conv1 = conv(cin, cout, 3, padding=1)
        self.norm2 = _norm(cout, groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = conv(cout, cout, 3, padding=1)
        self.skip = conv(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all positions (through SDPA)."""

    def __init__(self, channels: int, dims: int, groups: int):
        super().__init__()
        conv = _conv(dims)
        self.norm = _norm(channels, groups)
        self.qkv = conv(channels, 3 * channels, 1)
        self.proj = conv(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        b, c, *grid = x.shape
        # (B, 3, N, C) made contiguous once: strided q/k/v views send CPU SDPA to its slower math path
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, c, -1).transpose(-1, -2).contiguous().unbind(1)
        h = F.scaled_dot_product_attention(q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1)).squeeze(1)
        return x + self.proj(h.transpose(-1, -2).reshape(b, c, *grid))


class TokenwiseSlot(nn.Module):
    """Residual, pre-norm wrapper that runs a token-wise module (e.g. ``layers.moe.ConvMoE``)."""

    def __init__(self, channels: int, spec: dict[str, Any], groups: int):
        super().__init__()
        self.norm = _norm(channels, groups)
        self.inner = instantiate(spec, where="mid_ffn", channels=channels)
        self.aux: dict[str, Tensor] = {}

    def forward(self, x: Tensor) -> Tensor:
        out = self.inner(self.norm(x))
        if isinstance(out, tuple):
            out, self.aux = out
        return x + out


def _mid(ch: int, dims: int, groups: int, dropout: float, attn: bool, mid_ffn: dict | None) -> nn.Sequential:
    layers: list[nn.Module] = [ResBlock(ch, ch, dims, groups, dropout)]
    if attn:
        layers.append(AttnBlock(ch, dims, groups))
    if mid_ffn is not None:
        layers.append(TokenwiseSlot(ch, mid_ffn, groups))
    layers.append(ResBlock(ch, ch, dims, groups, dropout))
    return nn.Sequential(*layers)


class Encoder(nn.Module):
    """``(B, in_channels, *grid) -> (B, z_channels, *grid / 2**(len(ch_mult)-1))``."""

    def __init__(
        self,
        in_channels: int = 3,
        z_channels: int = 64,
        channels: int = 64,
        ch_mult: list[int] | tuple[int, ...] = (1, 2, 2, 4),
        num_res_blocks: int = 2,
        attn_levels: list[int] | tuple[int, ...] = (),
        mid_attn: bool = True,
        dims: int = 2,
        groups: int = 32,
        dropout: float = 0.0,
        mid_ffn: dict | None = None,
    ):
        super().__init__()
        conv = _conv(dims)
        self.conv_in = conv(in_channels, channels, 3, padding=1)
        blocks: list[nn.Module] = []
        cin = channels
        for level, mult in enumerate(ch_mult):
            cout = channels * mult
            for _ in range(num_res_blocks):
                blocks.append(ResBlock(cin, cout, dims, groups, dropout))
                cin = cout
                if level in attn_levels:
                    blocks.append(AttnBlock(cin, dims, groups))
            if level != len(ch_mult) - 1:
                blocks.append(conv(cin, cin, 3, stride=2, padding=1))
        self.down = nn.Sequential(*blocks)
        self.mid = _mid(cin, dims, groups, dropout, mid_attn, mid_ffn)
        self.norm_out = _norm(cin, groups)
        self.conv_out = conv(cin, z_channels, 3, padding=1)
        self.downsample_factor = 2 ** (len(ch_mult) - 1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.mid(self.down(self.conv_in(_weight_layout(x, self.conv_in.weight))))
        return self.conv_out(F.silu(self.norm_out(h)))


class Upsample(nn.Module):
    def __init__(self, channels: int, dims: int):
        super().__init__()
        self.conv = _conv(dims)(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Decoder(nn.Module):
    """Mirror of :class:`Encoder`: ``(B, z_channels, *grid) -> (B, out_channels, *grid * factor)``."""

    def __init__(
        self,
        out_channels: int = 3,
        z_channels: int = 64,
        channels: int = 64,
        ch_mult: list[int] | tuple[int, ...] = (1, 2, 2, 4),
        num_res_blocks: int = 2,
        attn_levels: list[int] | tuple[int, ...] = (),
        mid_attn: bool = True,
        dims: int = 2,
        groups: int = 32,
        dropout: float = 0.0,
        mid_ffn: dict | None = None,
    ):
        super().__init__()
        conv = _conv(dims)
        cin = channels * ch_mult[-1]
        self.conv_in = conv(z_channels, cin, 3, padding=1)
        self.mid = _mid(cin, dims, groups, dropout, mid_attn, mid_ffn)
        blocks: list[nn.Module] = []
        for level in reversed(range(len(ch_mult))):
            cout = channels * ch_mult[level]
            for _ in range(num_res_blocks + 1):
                blocks.append(ResBlock(cin, cout, dims, groups, dropout))
                cin = cout
                if level in attn_levels:
                    blocks.append(AttnBlock(cin, dims, groups))
            if level != 0:
                blocks.append(Upsample(cin, dims))
        self.up = nn.Sequential(*blocks)
        self.norm_out = _norm(cin, groups)
        self.conv_out = conv(cin, out_channels, 3, padding=1)

    @property
    def last_layer(self) -> Tensor:
        """The output convolution's weight: the adaptive GAN weight balances gradients here."""
        return self.conv_out.weight

    def forward(self, z: Tensor) -> Tensor:
        h = self.up(self.mid(self.conv_in(_weight_layout(z, self.conv_in.weight))))
        return self.conv_out(F.silu(self.norm_out(h)))


def collect_aux(module: nn.Module) -> dict[str, Tensor]:
    """Gather auxiliary outputs (e.g. MoE losses) of the :class:`TokenwiseSlot` in an Encoder/Decoder.

    Slots live only in the middle block, so only its few children are looked at (this runs on
    every training step).
    """
    aux: dict[str, Tensor] = {}
    total = None
    mid = getattr(module, "mid", None)  # networks of other libraries (diffusers' blocks) have no slots
    if mid is None:
        return aux
    for name, sub in mid.named_children():
        if isinstance(sub, TokenwiseSlot) and sub.aux:
            name = f"mid.{name}"
            for k, v in sub.aux.items():
                if k == "loss":
                    total = v if total is None else total + v
                else:
                    aux[f"{name}/{k}"] = v
    if total is not None:
        aux["aux_loss"] = total
    return aux


__all__ = ["Encoder", "Decoder", "ResBlock", "AttnBlock", "collect_aux"]
