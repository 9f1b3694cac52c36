"""Tokenizers trained by diffusers and taming-transformers load into ours with identical codes and
decodes (issue 14): each test builds the other library's model, randomly initialised, saves it in
that library's own format, loads it into our VQGAN and compares encode codes and decode outputs."""

from __future__ import annotations

from pathlib import PurePosixPath

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from stage1.interop import ForeignCheckpointError, load_diffusers_vqmodel, load_taming_vqgan


def _spread_codebook(codebook: torch.Tensor, latents: torch.Tensor) -> None:
    """Seed the codebook from encoder outputs so random images use many codes (not a handful)."""
    rows = latents.movedim(1, -1).reshape(-1, latents.shape[1])
    g = torch.Generator().manual_seed(1)
    codebook.copy_(rows[torch.randperm(rows.shape[0], generator=g)[: codebook.shape[0]]])


@pytest.mark.parametrize("norm_type", ["group", "spatial"])
def test_diffusers_vqmodel_folder_loads_with_identical_codes_and_decodes(tmp_path, norm_type):
    from diffusers import VQModel

    torch.manual_seed(0)
    ref = VQModel(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D", "AttnDownEncoderBlock2D"),
                  up_block_types=("AttnUpDecoderBlock2D", "UpDecoderBlock2D"), latent_channels=8,
                  num_vq_embeddings=48, norm_num_groups=8, norm_type=norm_type, layers_per_block=1,
                  sample_size=16).eval()
    x = torch.rand(4, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        _spread_codebook(ref.quantize.embedding.weight, ref.encode(x).latents)
        latents = ref.encode(x).latents
        _, _, (_, _, ref_codes) = ref.quantize(latents)
        ref_out = ref.decode(latents).sample
    ref.save_pretrained(tmp_path / "vq")  # config.json + diffusion_pytorch_model.safetensors

    ours = load_diffusers_vqmodel(tmp_path / "vq")
    codes = ours.encode(x)
    assert codes.shape == (4, 8, 8)
    assert ref_codes.unique().numel() > 20  # a real test of the argmin, not one code everywhere
    assert torch.equal(codes.flatten(), ref_codes.flatten())
    out = ours.decode(codes)
    assert (out - ref_out).abs().max().item() <= 1e-5
    assert ours.code_spec["codebook_size"] == 48 and ours.code_spec["grid"] == [8, 8]
    assert ours.decoder.conditions_on_quantized is (norm_type == "spatial")


def _taming_model(dd: dict, n_embed: int, embed_dim: int) -> nn.Module:
    from taming.modules.diffusionmodules.model import Decoder, Encoder
    from taming.modules.vqvae.quantize import VectorQuantizer

    class TamingVQ(nn.Module):  # the tokenizer half of taming.models.vqgan.VQModel, same keys
        def __init__(self) -> None:
            super().__init__()
            self.encoder, self.decoder = Encoder(**dd), Decoder(**dd)
            self.quantize = VectorQuantizer(n_embed, embed_dim, beta=0.25)
            self.quant_conv = nn.Conv2d(dd["z_channels"], embed_dim, 1)
            self.post_quant_conv = nn.Conv2d(embed_dim, dd["z_channels"], 1)

    return TamingVQ().eval()


def test_taming_vqgan_checkpoint_loads_with_identical_codes_and_decodes(tmp_path):
    torch.manual_seed(0)
    dd = {"double_z": False, "z_channels": 8, "resolution": 32, "in_channels": 3, "out_ch": 3, "ch": 32,
          "ch_mult": [1, 2, 2], "num_res_blocks": 1, "attn_resolutions": [8], "dropout": 0.0}
    ref = _taming_model(dd, n_embed=64, embed_dim=4)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        _spread_codebook(ref.quantize.embedding.weight, ref.quant_conv(ref.encoder(x)))
        quant, _, (_, _, ref_codes) = ref.quantize(ref.quant_conv(ref.encoder(x)))
        ref_out = ref.decoder(ref.post_quant_conv(quant))
    state = ref.state_dict()
    state["loss.discriminator.main.0.weight"] = torch.zeros(1)  # taming checkpoints carry their GAN loss
    torch.save({"state_dict": state, "global_step": 10}, tmp_path / "last.ckpt")
    OmegaConf.save({"model": {"target": "taming.models.vqgan.VQModel",
                              "params": {"embed_dim": 4, "n_embed": 64, "ddconfig": dd,
                                         "lossconfig": {"target": "taming.modules.losses.DummyLoss"}}}},
                   tmp_path / "model.yaml")

    ours = load_taming_vqgan(tmp_path / "last.ckpt", tmp_path / "model.yaml")
    codes = ours.encode(x)
    assert ref_codes.unique().numel() > 20
    assert torch.equal(codes.flatten(), ref_codes.flatten())
    assert (ours.decode(codes) - ref_out).abs().max().item() <= 1e-5


def test_foreign_checkpoint_errors_name_the_problem(tmp_path):
    with pytest.raises(ForeignCheckpointError, match="config.json"):
        load_diffusers_vqmodel(tmp_path)
    dd = {"double_z": False, "z_channels": 8, "resolution": 32, "in_channels": 3, "out_ch": 3, "ch": 32,
          "ch_mult": [1, 2], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0}
    ref = _taming_model(dd, n_embed=16, embed_dim=4)
    torch.save({"state_dict": ref.state_dict()}, tmp_path / "last.ckpt")
    wrong = dict(dd, ch_mult=[1, 2, 2])  # a config that does not describe these weights
    OmegaConf.save({"model": {"params": {"embed_dim": 4, "n_embed": 16, "ddconfig": wrong}}}, tmp_path / "m.yaml")
    with pytest.raises(ForeignCheckpointError, match="does not match"):
        load_taming_vqgan(tmp_path / "last.ckpt", tmp_path / "m.yaml")
    torch.save({"state_dict": ref.state_dict(), "evil": PurePosixPath("x")}, tmp_path / "p.ckpt")
    OmegaConf.save({"model": {"params": {"embed_dim": 4, "n_embed": 16, "ddconfig": dd}}}, tmp_path / "ok.yaml")
    with pytest.raises(ForeignCheckpointError, match="weights_only"):
        load_taming_vqgan(tmp_path / "p.ckpt", tmp_path / "ok.yaml")


def test_imported_diffusers_tokenizer_works_with_tokenize_and_evaluate(tmp_path, shapes_folder):
    """After import, our commands treat the foreign tokenizer like one of ours."""
    from diffusers import VQModel

    from data.codes import code_folder_info
    from tokenforge.cli import run

    torch.manual_seed(0)
    VQModel(block_out_channels=(32, 32), down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, num_vq_embeddings=32,
            norm_num_groups=8, norm_type="spatial", layers_per_block=1, sample_size=16).save_pretrained(tmp_path / "vq")
    ckpt = tmp_path / "imported" / "last.ckpt"
    assert run("import_tokenizer", ["--diffusers", str(tmp_path / "vq"), "--out", str(ckpt),
                                    "--root", str(shapes_folder), "--size", "16"]) == 0
    codes = tmp_path / "codes"
    assert run("tokenize", [str(ckpt), "--out", str(codes), "--batch-size", "8"]) == 0
    spec = code_folder_info(codes)["code_spec"]
    assert spec["grid"] == [8, 8] and spec["codebook_size"] == 32
    assert run("evaluate", [str(ckpt), "--out", str(tmp_path / "eval"), "--fid", "none", "--lpips", "none",
                            "--json", str(tmp_path / "eval.json")]) == 0
    import json

    report = json.loads((tmp_path / "eval.json").read_text())
    assert "psnr" in json.dumps(report).lower()
