"""diffusers' maintained VAE encoder/decoder (the taming-transformers / LDM architecture) behind our
network contract, so a tokenizer built on them loads diffusers ``VQModel`` folders (aMUSEd's VQGAN,
Kandinsky's MoVQ) and taming VQGAN checkpoints by key map alone.

The contract the autoencoder needs from a network: ``forward``, ``downsample_factor`` and, for a
decoder, ``out_channels``; a decoder whose normalisation is conditioned on the quantized map
(MoVQ's spatially conditional normalisation, diffusers' ``SpatialNorm``) says so with
``conditions_on_quantized = True`` and receives the quantized map as its second argument.
"""

from __future__ import annotations

from collections.abc import Sequence

from diffusers.models.autoencoders.vae import Decoder as _DiffusersDecoder
from diffusers.models.autoencoders.vae import Encoder as _DiffusersEncoder
from torch import Tensor, nn


def _blocks(kind: str, levels: int, attn_levels: Sequence[int]) -> tuple[str, ...]:
    """diffusers block names per resolution level (level 0 = full resolution); ``Attn`` where asked."""
    bad = [a for a in attn_levels if not 0 <= int(a) < levels]
    if bad:
        raise ValueError(f"attn_levels {list(attn_levels)} must lie in [0, {levels}) (one per resolution level)")
    return tuple(("Attn" + kind) if i in set(int(a) for a in attn_levels) else kind for i in range(levels))


class DiffusersEncoder(nn.Module):
    """``diffusers.models.autoencoders.vae.Encoder`` with ``double_z=False`` (a VQ encoder).

    Args:
        in_channels: image channels.
        z_channels: output channels (diffusers' ``latent_channels``).
        block_out_channels: channels per resolution level; ``len - 1`` stride-2 downsamplings.
        layers_per_block: ResNet blocks per level (VQModel's default is 1; taming's ``num_res_blocks``).
        norm_num_groups: GroupNorm groups.
        mid_attention: single-head self-attention in the middle block (taming's ``attn_1``).
        attn_levels: resolution levels (0 = full resolution) whose blocks also attend (taming's
            ``attn_resolutions``, diffusers' ``AttnDownEncoderBlock2D``).
    """

    def __init__(
        self,
        in_channels: int = 3,
        z_channels: int = 4,
        block_out_channels: Sequence[int] = (64, 128),
        layers_per_block: int = 1,
        norm_num_groups: int = 32,
        mid_attention: bool = True,
        attn_levels: Sequence[int] = (),
    ) -> None:
        super().__init__()
        channels = tuple(int(c) for c in block_out_channels)
        self.net = _DiffusersEncoder(
            in_channels=in_channels, out_channels=z_channels,
            down_block_types=_blocks("DownEncoderBlock2D", len(channels), attn_levels), block_out_channels=channels,
            layers_per_block=layers_per_block, norm_num_groups=norm_num_groups, double_z=False,
            mid_block_add_attention=mid_attention,
        )
        self.downsample_factor = 2 ** (len(channels) - 1)
        self.out_channels = int(z_channels)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class DiffusersDecoder(nn.Module):
    """``diffusers.models.autoencoders.vae.Decoder``; ``norm_type='spatial'`` is MoVQ's decoder.

    With ``norm_type='spatial'`` every normalisation layer is diffusers' ``SpatialNorm``: GroupNorm
    followed by a per-pixel scale and shift computed (1x1 convs) from the quantized map, upsampled to
    the feature resolution (Zheng et al. 2022). The quantized map must then have ``z_channels``
    channels (diffusers ties ``SpatialNorm``'s condition width to the latent width).
    ``block_out_channels`` and ``attn_levels`` are given from full resolution down, as for the encoder.
    """

    def __init__(
        self,
        out_channels: int = 3,
        z_channels: int = 4,
        block_out_channels: Sequence[int] = (64, 128),
        layers_per_block: int = 1,
        norm_num_groups: int = 32,
        mid_attention: bool = True,
        norm_type: str = "group",
        attn_levels: Sequence[int] = (),
    ) -> None:
        super().__init__()
        if norm_type not in ("group", "spatial"):
            raise ValueError(f"norm_type must be 'group' or 'spatial' (MoVQ), got {norm_type!r}")
        channels = tuple(int(c) for c in block_out_channels)
        if norm_type == "spatial" and any(c % 32 for c in channels):
            # diffusers' SpatialNorm fixes its GroupNorm at 32 groups, whatever norm_num_groups says.
            raise ValueError(f"norm_type='spatial' needs every block_out_channels entry divisible by 32 "
                             f"(diffusers' SpatialNorm uses 32 groups), got {list(channels)}")
        self.net = _DiffusersDecoder(
            in_channels=z_channels, out_channels=out_channels,
            # diffusers lists up blocks from the lowest resolution up: reverse our level order.
            up_block_types=_blocks("UpDecoderBlock2D", len(channels), attn_levels)[::-1], block_out_channels=channels,
            layers_per_block=layers_per_block, norm_num_groups=norm_num_groups, norm_type=norm_type,
            mid_block_add_attention=mid_attention,
        )
        self.conditions_on_quantized = norm_type == "spatial"
        self.downsample_factor = 2 ** (len(channels) - 1)
        self.out_channels = int(out_channels)

    @property
    def conv_out(self) -> nn.Conv2d:
        return self.net.conv_out

    @property
    def last_layer(self) -> Tensor:
        """The last layer's weight: VQGAN's adaptive GAN weight compares gradients there."""
        return self.net.conv_out.weight

    def forward(self, z: Tensor, quantized: Tensor | None = None) -> Tensor:
        if self.conditions_on_quantized and quantized is None:
            raise ValueError("this decoder's spatial norms condition on the quantized map: pass it as `quantized`")
        return self.net(z, quantized if self.conditions_on_quantized else None)
