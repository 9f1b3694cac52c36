"""VQGAN/VQ-VAE internals: offline LPIPS handling, GAN pieces, EMA weights, the tokenizer contract."""

from __future__ import annotations

import pytest
import torch

from metrics.weights import MissingWeightsError
from stage1.conv_encoder_decoder import Decoder, Encoder
from stage1.ema import ParameterEMA
from stage1.losses.discriminator import PatchDiscriminator, adaptive_weight_from_grads, hinge_d_loss
from stage1.vqgan import VQGAN
from stage1.vqvae import VQVAE

ENC = {"in_channels": 3, "z_channels": 8, "channels": 8, "ch_mult": [1, 2], "num_res_blocks": 1, "groups": 4}
VQ = {"target": "stage1.quantizers.vq.VectorQuantizer", "params": {"codebook_size": 16}}


@pytest.fixture()
def empty_hub(tmp_path):
    old = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path / "hub"))
    yield
    torch.hub.set_dir(old)


def test_vqgan_without_vgg_weights_warns_and_records_it(empty_hub):
    model = VQGAN(encoder=ENC, quantizer=VQ, resolution=16, embed_dim=4, perceptual={"net": "vgg"})
    with pytest.warns(UserWarning, match="vgg16-397923af.pth"):
        model.setup("fit")
    assert model.hparams.perceptual_active is False
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    assert model.perceptual_loss(x, x.flip(0)).item() == 0.0


def test_vqgan_with_required_perceptual_refuses_to_start_without_weights(empty_hub):
    model = VQGAN(encoder=ENC, quantizer=VQ, resolution=16, embed_dim=4,
                  perceptual={"net": "vgg", "required": True})
    with pytest.raises(MissingWeightsError, match="vgg16-397923af.pth"):
        model.setup("fit")


def test_vqgan_lpips_path_with_random_weights_gives_a_positive_distance():
    model = VQGAN(encoder=ENC, quantizer=VQ, resolution=32, embed_dim=4,
                  perceptual={"net": "alex", "random_weights": True})
    model.setup("fit")
    assert model.hparams.perceptual_active is True
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    assert model.perceptual_loss(x, x).item() == pytest.approx(0.0, abs=1e-6)
    assert model.perceptual_loss(x, x.flip(0)).item() > 0
    frozen = [k for k in model.state_dict() if "lpips" in k or "perceptual" in k]
    assert not frozen, "frozen LPIPS must not bloat checkpoints"


def test_adaptive_weight_balances_gradient_norms():
    last = torch.nn.Parameter(torch.randn(4, 4))
    nll = (last * 3.0).sum()          # gradient norm 3 * 4 = 12
    g = (last * 0.5).sum()            # gradient norm 0.5 * 4 = 2
    nll_grad, g_grad = (torch.autograd.grad(loss, last)[0] for loss in (nll, g))
    assert adaptive_weight_from_grads(nll_grad, g_grad).item() == pytest.approx(12 / (2 + 1e-4), rel=1e-4)


def test_hinge_loss_is_zero_for_a_confident_discriminator():
    assert hinge_d_loss(torch.full((4,), 2.0), torch.full((4,), -2.0)).item() == 0.0
    assert hinge_d_loss(torch.zeros(4), torch.zeros(4)).item() == pytest.approx(1.0)
    logits = PatchDiscriminator(3, 8, 2)(torch.randn(2, 3, 32, 32))
    assert logits.shape[0] == 2 and logits.shape[1] == 1 and logits.shape[-1] > 1  # a map of patch logits


def test_ema_swaps_in_averaged_weights_and_restores_trained_ones():
    net = torch.nn.Linear(3, 3)
    ema = ParameterEMA(net, decay=0.5)
    before = net.weight.detach().clone()
    with torch.no_grad():
        net.weight.add_(1.0)
    ema.update(net)
    trained = net.weight.detach().clone()
    with ema.swapped(net):
        averaged = net.weight.detach().clone()
    assert torch.equal(net.weight, trained)
    assert not torch.equal(averaged, trained) and not torch.equal(averaged, before)


@pytest.mark.parametrize("dims,shape", [(1, (2, 3, 32)), (2, (2, 3, 16, 16))])
def test_encoder_decoder_invert_shapes_in_1d_and_2d(dims, shape):
    enc = Encoder(**ENC, dims=dims)
    kw = {k: v for k, v in ENC.items() if k != "in_channels"}
    dec = Decoder(out_channels=3, dims=dims, **kw)
    x = torch.randn(*shape)
    z = enc(x)
    assert z.shape[2:] == tuple(s // 2 for s in shape[2:])
    assert dec(z).shape == x.shape


def test_vqvae_code_spec_and_resolution_check():
    model = VQVAE(encoder=ENC, quantizer=VQ, resolution=16, embed_dim=4)
    assert model.code_spec == {
        "modality": "image", "layout": {"channels": 3, "shape": [16, 16]}, "grid": [8, 8], "depth": None,
        "codebook_size": 16, "continuous_dim": None,
        "decoder_output": {"channels": 3, "shape": [16, 16], "range": [-1.0, 1.0]}}
    with pytest.raises(ValueError, match="divisible"):
        VQVAE(encoder=ENC, quantizer=VQ, resolution=15, embed_dim=4)


def _norm_input_layouts(net: torch.nn.Module) -> list[bool]:
    """Run-time record: is each GroupNorm's input channels-last (and not also channels-first)?"""
    seen: list[bool] = []
    for m in net.modules():
        if isinstance(m, torch.nn.GroupNorm):
            m.register_forward_hook(lambda mod, inp, out: seen.append(
                inp[0].is_contiguous(memory_format=torch.channels_last) and not inp[0].is_contiguous()))
    return seen


def test_decoder_runs_channels_first_on_a_channels_last_latent_with_the_same_result():
    # Quantizers return z_q as a channels-last view; the decoder (whose weights are channels-first) used
    # to run channels-last all the way, where CPU GroupNorm's backward is ~10x slower (issue 22).
    torch.manual_seed(0)
    kw = {k: v for k, v in ENC.items() if k != "in_channels"}
    dec = Decoder(out_channels=3, **kw)
    z = torch.randn(2, 8, 8, 8)
    outs, grads = [], []
    for layout in (torch.contiguous_format, torch.channels_last):
        seen = _norm_input_layouts(dec)
        leaf = z.clone().contiguous(memory_format=layout).requires_grad_(True)
        out = dec(leaf)
        assert seen and not any(seen), "a GroupNorm ran on a channels-last input"
        assert out.is_contiguous()
        dec.zero_grad(set_to_none=True)
        out.pow(2).sum().backward()
        outs.append(out.detach())
        grads.append([leaf.grad] + [p.grad.clone() for p in dec.parameters()])
        for m in dec.modules():
            m._forward_hooks.clear()
    torch.testing.assert_close(outs[1], outs[0])
    for a, b in zip(grads[1], grads[0]):
        torch.testing.assert_close(a, b)


def test_channels_last_weights_keep_the_network_channels_last():
    # model.params.channels_last converts the weights; the layout then follows them, as asked.
    kw = {k: v for k, v in ENC.items() if k != "in_channels"}
    dec = Decoder(out_channels=3, **kw).to(memory_format=torch.channels_last)
    seen = _norm_input_layouts(dec)
    dec(torch.randn(2, 8, 8, 8))
    assert seen and all(seen)
