"""VQ-VAE-2 (issue 14): hierarchical tokenizer, hierarchical code files, priors conditioned on another
code grid, and the two-level pipeline tokenizer -> codes -> top + bottom priors -> sample."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from helpers import CONFIGS, assert_finite_and_falling, logged_series, train
from stage1.vqvae2 import VQVAE2

VQ = {"target": "stage1.quantizers.vq.VectorQuantizer", "params": {"codebook_size": 16}}
SMALL = {"channels": 8, "num_res_blocks": 1, "mid_attn": False, "groups": 4}


def tiny(levels=None, resolution=16, in_channels=3, dims=2, quantizer=VQ) -> VQVAE2:
    levels = levels or [{"name": "top", "quantizer": quantizer, "ch_mult": [1, 2]},
                        {"name": "bottom", "quantizer": quantizer, "ch_mult": [1, 2]}]
    return VQVAE2(levels=levels, resolution=resolution, in_channels=in_channels, z_channels=8, embed_dim=4,
                  encoder={**SMALL, "dims": dims})


def test_top_and_bottom_shapes_and_code_spec():
    model = tiny().eval()
    codes = model.encode(torch.randn(2, 3, 16, 16))
    assert codes["top"].shape == (2, 4, 4) and codes["bottom"].shape == (2, 8, 8)
    assert model.decode(codes).shape == (2, 3, 16, 16)
    spec = model.code_spec
    assert spec["levels"] == {"top": {"grid": [4, 4], "depth": None, "codebook_size": 16},
                              "bottom": {"grid": [8, 8], "depth": None, "codebook_size": 16}}
    assert spec["level_order"] == ["top", "bottom"] and spec["codebook_size"] == 16


def test_three_levels_1d_and_a_residual_level():
    residual = {"target": "stage1.quantizers.residual.ResidualQuantizer",
                "params": {"depth": 2, "quantizer": VQ}}
    levels = [{"name": "a", "quantizer": VQ, "ch_mult": [1, 2]},
              {"name": "b", "quantizer": residual, "ch_mult": [1, 2]},
              {"name": "c", "quantizer": VQ, "ch_mult": [1, 2, 2]}]
    model = tiny(levels, resolution=64, in_channels=2, dims=1).eval()
    codes = model.encode(torch.randn(3, 2, 64))
    assert {k: tuple(v.shape) for k, v in codes.items()} == {"a": (3, 4), "b": (3, 8, 2), "c": (3, 16)}
    assert model.decode(codes).shape == (3, 2, 64)
    assert model.code_spec["levels"]["b"]["depth"] == 2


def test_changing_top_codes_changes_the_decode_and_the_bottom_codes_see_the_top():
    model = tiny().eval()
    codes = model.encode(torch.randn(2, 3, 16, 16))
    out = model.decode(codes)
    top = codes["top"].clone()
    top[:, 0, 0] = (top[:, 0, 0] + 1) % 16
    changed = model.decode({"top": top, "bottom": codes["bottom"]})
    diff = (changed - out).abs().amax(dim=1)  # (B, 16, 16)
    assert diff[:, :4, :4].min() > 0, "the pixels under the changed top cell must change"
    # the bottom quantizer's input is a function of the top codes (the conditioning decoder's output)
    model.train()
    x = torch.randn(2, 3, 16, 16)
    seen = {}
    model.quant_convs[1].register_forward_hook(lambda m, i, o: seen.__setitem__("bottom_in", i[0]))
    outs = model.quantize(x)
    top_zq = outs[0].z_q
    grad = torch.autograd.grad(seen["bottom_in"].sum(), top_zq, retain_graph=True)[0]
    assert grad.abs().sum() > 0


def test_loss_and_gradients_match_the_vqvae2_objective():
    """rec + sum over levels of ||sg[z_e] - e||^2 + beta ||z_e - sg[e]||^2, straight-through decode."""
    beta = 0.3
    q = {"target": "stage1.quantizers.vq.VectorQuantizer",
         "params": {"codebook_size": 16, "codebook": "gradient", "beta": beta}}
    model = tiny(quantizer=q).train()
    x = torch.randn(2, 3, 16, 16)
    z_e = {}
    for i, conv in enumerate(model.quant_convs):
        conv.register_forward_hook(lambda m, inp, out, i=i: z_e.__setitem__(i, out))
    loss = model.training_step({"x": x}, 0)
    params = [p for p in model.parameters() if p.requires_grad]
    got = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)

    codes = [qz.encode(z_e[i]) for i, qz in enumerate(model.quantizers)]
    e = [qz.embed[c].movedim(-1, 1) for qz, c in zip(model.quantizers, codes)]
    st = [z_e[i] + (e[i] - z_e[i]).detach() for i in range(2)]
    manual = F.mse_loss(model.decode_latents(st), x)
    for i in range(2):
        manual = manual + F.mse_loss(z_e[i].detach(), e[i]) + beta * F.mse_loss(z_e[i], e[i].detach())
    want = torch.autograd.grad(manual, params, allow_unused=True)
    torch.testing.assert_close(loss, manual)
    for g, w in zip(got, want):
        if w is None:
            assert g is None or g.abs().max() == 0
        else:
            torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)


def test_hierarchical_code_files_round_trip(tmp_path):
    from data.codes import CodeDataset, CodeFileError, CodeWriter

    spec = tiny().code_spec
    writer = CodeWriter(tmp_path / "c", spec, "tok.ckpt", "0" * 64, shard_size=4)
    codes = {"top": torch.randint(0, 16, (6, 4, 4)), "bottom": torch.randint(0, 16, (6, 8, 8))}
    labels = torch.arange(6) % 2
    writer.write_shard("train", 0, {k: v[:4] for k, v in codes.items()}, labels[:4])
    writer.write_shard("train", 1, {k: v[4:] for k, v in codes.items()}, labels[4:])
    manifest = writer.finalize()
    assert manifest["levels"] == {"bottom": {"shape": [8, 8], "offset": 0}, "top": {"shape": [4, 4], "offset": 64}}
    ds = CodeDataset(tmp_path / "c", "train")
    batch = ds.__getitems__([0, 5])
    assert torch.equal(batch["codes"]["top"], codes["top"][[0, 5]])
    assert torch.equal(batch["codes"]["bottom"], codes["bottom"][[0, 5]])
    assert torch.equal(ds[5]["codes"]["top"], codes["top"][5])
    bad = {"top": torch.full((1, 4, 4), 16), "bottom": torch.zeros(1, 8, 8, dtype=torch.long)}
    with pytest.raises(CodeFileError, match="level 'top'"):
        writer.write_shard("val", 0, bad)


SPEC = {"levels": {"top": {"grid": [2, 2], "codebook_size": 8}, "bottom": {"grid": [4, 4], "codebook_size": 16}},
        "level_order": ["top", "bottom"], "codebook_size": 16, "depth": None}


@pytest.mark.parametrize("target", ["stage2.ar.ARPrior", "stage2.maskgit.MaskGITPrior"])
def test_a_conditional_prior_ignores_no_top_cell(target):
    from layers.instantiate import resolve_target

    prior = resolve_target(target)(code_spec=SPEC, level="bottom", context_level="top", num_classes=3,
                                   dim=32, depth=2, heads=4).eval()
    top, bottom, labels = torch.randint(0, 8, (2, 2, 2)), torch.randint(0, 16, (2, 4, 4)), torch.tensor([0, 2])
    base = prior(bottom, labels, top)[0].reshape(2, 4, 4, -1)
    for i in range(2):
        for j in range(2):
            other = top.clone()
            other[:, i, j] = (other[:, i, j] + 1) % 8
            diff = (prior(bottom, labels, other)[0].reshape(2, 4, 4, -1) - base).abs().amax(-1)
            assert diff[:, 2 * i:2 * i + 2, 2 * j:2 * j + 2].min() > 0, "every child cell sees its top cell"
    assert (prior(bottom, torch.tensor([1, 1]), top)[0].reshape(2, 4, 4, -1) - base).abs().amax() > 0
    with pytest.raises(ValueError, match="context"):
        prior.sample(2)
    g = torch.Generator().manual_seed(0)
    assert prior.sample(2, cond=[0, 1], context=top, cfg_scale=1.5, generator=g).shape == (2, 4, 4)


def test_ar_cached_sampling_equals_uncached_with_context():
    from stage2.ar import ARPrior

    prior = ARPrior(code_spec=SPEC, level="bottom", context_level="top", dim=32, depth=2, heads=4)
    top = torch.randint(0, 8, (3, 2, 2))
    a = prior.sample(3, context=top, generator=torch.Generator().manual_seed(1))
    b = prior.sample(3, context=top, generator=torch.Generator().manual_seed(1), use_cache=False)
    assert torch.equal(a, b)


def test_a_prior_without_context_refuses_a_context_level():
    from layers.instantiate import ConfigError
    from stage2.vq_diffusion import VQDiffusionPrior

    with pytest.raises(ConfigError, match="conditioning code grid"):
        VQDiffusionPrior(code_spec=SPEC, level="bottom", context_level="top")


def test_vqvae2_to_codes_to_top_and_bottom_priors_to_samples(vqvae2_and_codes, run_root):
    from tokenforge.sample import main as sample

    tok_ckpt, codes = vqvae2_and_codes
    manifest = json.loads((codes / "manifest.json").read_text())
    assert manifest["levels"]["top"]["shape"] == [4, 4] and manifest["levels"]["bottom"]["shape"] == [8, 8]
    for level in ("top", "bottom"):
        train(CONFIGS / "smoke" / f"vqvae2_{level}.yaml", run_root, [f"data.params.codes={codes}",
                                                                     "trainer.max_steps=30"], name=level)
        key, values = logged_series(run_root / level)
        assert_finite_and_falling(values, f"vqvae2 {level} prior {key}")
    top, bottom = (str(run_root / lv / "checkpoints" / "last.ckpt") for lv in ("top", "bottom"))
    out = sample([bottom, top, "-n", "3", "--class", "1", "--temperature", "0.9", "--out", str(run_root / "s")])
    record = json.loads((out / "samples.json").read_text())
    assert [p["level"] for p in record["priors"]] == ["top", "bottom"]  # top first, whatever the argument order
    assert record["priors"][1]["context_level"] == "top"
    assert all(p["sampling"] == {"temperature": 0.9} for p in record["priors"])
    arrays = np.load(out / "codes.npz")
    assert arrays["top"].shape == (3, 4, 4) and arrays["bottom"].shape == (3, 8, 8)
    assert (out / "grid.png").is_file()
    with pytest.raises(ValueError, match="context"):  # the bottom prior alone has no top codes to read
        sample([bottom, "-n", "1", "--out", str(run_root / "s2")])


def test_evaluate_reports_each_levels_codebook_usage(vqvae2_and_codes, tmp_path):
    from tokenforge.evaluate import main as evaluate

    tok_ckpt, _ = vqvae2_and_codes
    results = evaluate([str(tok_ckpt), "--limit", "32", "--fid", "none", "--lpips", "none",
                        "--out", str(tmp_path / "ev")])
    assert "psnr" in results and 0 < results["top/usage"] <= 1 and 0 < results["bottom/usage"] <= 1
