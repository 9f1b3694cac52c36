"""MoVQ (issue 14): spatially conditional decoder norms and multichannel quantization with one
shared codebook."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import SpatialNorm

from helpers import CONFIGS
from layers.instantiate import instantiate
from stage1.diffusers_blocks import DiffusersDecoder
from stage1.quantizers.grouped import GroupedQuantizer

VQ = {"target": "stage1.quantizers.vq.VectorQuantizer", "params": {"codebook_size": 16, "codebook": "gradient"}}


def test_spatial_norm_decoder_conditions_on_the_quantized_map():
    torch.manual_seed(0)
    dec = DiffusersDecoder(out_channels=3, z_channels=8, block_out_channels=(32, 32), norm_num_groups=8,
                           norm_type="spatial").eval()
    norms = [m for m in dec.modules() if isinstance(m, SpatialNorm)]
    assert len(norms) >= 5  # every resnet norm, the attention norm and the output norm
    with torch.no_grad():  # make the conditioning convs clearly non-trivial
        for m in norms:
            m.conv_y.weight.normal_(0, 0.3)
            m.conv_b.weight.normal_(0, 0.3)
    h, zq = torch.randn(2, 8, 4, 4), torch.randn(2, 8, 4, 4)
    out = dec(h, zq)
    # same decoder input, another quantized map -> another image: the norms read z_q
    assert (dec(h, zq + 1.0) - out).abs().max() > 1e-3
    # the norm is GroupNorm(f) * conv_y(up(z_q)) + conv_b(up(z_q)), the paper's spatially conditional norm
    norm = norms[0]
    f = torch.randn(2, norm.norm_layer.num_channels, 8, 8)
    up = F.interpolate(zq, size=(8, 8), mode="nearest")
    expected = norm.norm_layer(f) * norm.conv_y(up) + norm.conv_b(up)
    assert torch.allclose(norm(f, zq), expected, atol=1e-6)


def test_group_norm_decoder_ignores_the_quantized_map():
    dec = DiffusersDecoder(out_channels=3, z_channels=8, block_out_channels=(32, 32), norm_num_groups=8).eval()
    h = torch.randn(1, 8, 4, 4)
    assert torch.equal(dec(h, torch.zeros(1, 8, 4, 4)), dec(h, torch.ones(1, 8, 4, 4)))


def test_multichannel_quantization_uses_one_shared_codebook():
    torch.manual_seed(0)
    q = GroupedQuantizer(dim=8, groups=4, quantizer=VQ, shared_codebook=True).eval()
    assert len(q.quantizers) == 1  # one codebook tensor for every group
    z = torch.randn(2, 8, 3, 5)
    out = q(z)
    assert out.codes.shape == (2, 3, 5, 4)
    book = q.quantizers[0].codebook
    for g in range(4):  # each group's codes are its own nearest neighbours in the shared book
        rows = z[:, 2 * g:2 * g + 2].movedim(1, -1)
        nearest = torch.cdist(rows.reshape(-1, 2), book).argmin(-1).reshape(2, 3, 5)
        assert torch.equal(out.codes[..., g], nearest)
        assert torch.allclose(out.z_q[:, 2 * g:2 * g + 2], book[nearest].movedim(-1, 1))
    assert torch.equal(q.encode(z), out.codes)
    assert torch.allclose(q.decode(out.codes), out.z_q)


def test_movq_config_builds_a_spatially_conditioned_tokenizer():
    from omegaconf import OmegaConf

    cfg = OmegaConf.to_container(OmegaConf.load(CONFIGS / "smoke" / "movq.yaml"), resolve=False)
    params = dict(cfg["model"]["params"], resolution=32)
    model = instantiate({"target": cfg["model"]["target"], "params": params}).eval()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    codes = model.encode(x)
    assert codes.shape == (2, 16, 16, 2)
    other = codes.clone()
    other[:, :8] = (other[:, :8] + 1) % 64  # change the top half's codes only
    diff = (model.decode(other) - model.decode(codes)).abs()
    assert diff.max() > 0
