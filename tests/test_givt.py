"""GIVT prior: causality, cached vs uncached sampling, DB-CFG, latent normalisation and bits/dim,
MoE FFN, and the end-to-end path KL-VAE -> latent code files -> GIVT -> samples -> decoded images."""

from __future__ import annotations

import math

import pytest
import torch

from stage2.givt import GIVT

SPEC = {"grid": [3, 3], "depth": None, "codebook_size": None, "continuous": {"dim": 4}}


def _givt(**kw) -> GIVT:
    torch.manual_seed(0)
    model = GIVT(code_spec=SPEC, num_classes=kw.pop("num_classes", 3), dim=32, depth=2, heads=2,
                 num_components=kw.pop("num_components", 4), **kw)
    # a non-trivial head: the zero init would make every position the same standard normal
    torch.nn.init.normal_(model.head.proj.weight, std=0.3)
    return model.eval()


def test_teacher_forced_mixtures_are_causal():
    model = _givt()
    codes = torch.randn(2, 3, 3, 4)
    labels = torch.tensor([0, 2])
    gmm, _, _ = model(codes, labels)
    changed = codes.clone()
    changed.view(2, 9, 4)[:, 4] += 5.0  # perturb position 4
    gmm2, _, _ = model(changed, labels)
    same = torch.isclose(gmm.loc, gmm2.loc, atol=1e-6).flatten(2).all(-1)  # (B, N)
    assert same[:, :5].all(), "positions 0..4 must not see latent 4"
    assert not same[:, 5:].any(), "positions after 4 must see it"


def test_loss_is_the_exact_mixture_nll_and_bits_per_dim_adds_the_normalisation_back():
    model = _givt()
    model.latent_mean.copy_(torch.tensor([0.5, -1.0, 0.0, 2.0]))
    model.latent_std.copy_(torch.tensor([2.0, 0.5, 1.0, 3.0]))
    codes, labels = torch.randn(5, 3, 3, 4), torch.tensor([0, 1, 2, 0, 1])
    out = model.loss(codes, labels)
    gmm, z, _ = model(codes, labels)
    nll_token = -gmm.to_torch().log_prob(z).mean()
    torch.testing.assert_close(out.nll, nll_token)
    torch.testing.assert_close(out.loss, nll_token / 4)
    # density of the raw latents = density of normalised ones / prod(std)
    raw_bits = (nll_token + torch.log(model.latent_std).sum()) / (4 * math.log(2))
    torch.testing.assert_close(out.stats["bits_per_dim"], raw_bits)


def test_fit_normalization_measures_per_channel_statistics():
    model = _givt()
    g = torch.Generator().manual_seed(0)
    scale, shift = torch.tensor([1.0, 3.0, 0.2, 5.0]), torch.tensor([0.0, -2.0, 1.0, 4.0])
    batches = [{"codes": torch.randn(50, 3, 3, 4, generator=g) * scale + shift} for _ in range(8)]
    model.fit_normalization(batches, max_items=300)
    assert int(model.norm_items_seen) == 300  # stopped after the batch that reached 300 items
    seen = torch.cat([b["codes"] for b in batches[:6]]).reshape(-1, 4).double()
    torch.testing.assert_close(model.latent_mean, seen.mean(0).float())
    torch.testing.assert_close(model.latent_std, seen.std(0, correction=0).float())
    assert torch.allclose(model.latent_std, scale, rtol=0.1)
    assert {"latent_mean", "latent_std", "norm_items_seen"} <= set(model.state_dict())
    z = torch.randn(2, 9, 4)
    torch.testing.assert_close(model.normalize(model.denormalize(z)), z)


@pytest.mark.parametrize("cfg_scale", [0.0, 1.0])
def test_cached_and_uncached_sampling_are_identical(cfg_scale):
    model = _givt()
    a = model.sample(3, cond=[0, 1, 2], cfg_scale=cfg_scale, use_cache=True, generator=torch.Generator().manual_seed(7))
    b = model.sample(3, cond=[0, 1, 2], cfg_scale=cfg_scale, use_cache=False,
                     generator=torch.Generator().manual_seed(7))
    assert a.shape == (3, 3, 3, 4)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_db_cfg_weight_zero_is_conditional_sampling_and_guidance_reports_acceptance():
    model = _givt()
    plain = model.sample(4, cond=1, generator=torch.Generator().manual_seed(3))
    zero = model.sample(4, cond=1, cfg_scale=0.0, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(plain, zero)
    assert model.last_sampling_stats == {}  # w = 0 never ran the rejection sampler
    guided = model.sample(4, cond=1, cfg_scale=2.0, generator=torch.Generator().manual_seed(3))
    assert not torch.allclose(guided, plain)
    stats = model.last_sampling_stats
    assert 0.0 < stats["dbcfg_acceptance"] <= 1.0 and stats["dbcfg_success"] > 0.9


def test_temperature_scales_the_spread_of_samples():
    model = _givt(num_components=1)
    torch.nn.init.zeros_(model.head.proj.weight)  # every position N(0, 1) in normalised space
    cold = model.sample(400, temperature=0.5, generator=torch.Generator().manual_seed(0))
    warm = model.sample(400, temperature=1.0, generator=torch.Generator().manual_seed(0))
    assert abs(cold.std().item() - 0.5) < 0.03 and abs(warm.std().item() - 1.0) < 0.05


def test_moe_ffn_runs_and_returns_its_aux_loss():
    model = _givt(ffn={"target": "layers.moe.MoE", "params": {"num_experts": 4, "top_k": 2, "hidden_dim": 32}})
    out = model.loss(torch.randn(4, 3, 3, 4), torch.tensor([0, 1, 2, 0]))
    assert out.aux["aux_loss"] > 0 and torch.isfinite(out.loss)


def test_a_discrete_code_spec_is_refused():
    from layers.instantiate import ConfigError

    with pytest.raises(ConfigError, match="continuous"):
        GIVT(code_spec={"grid": [3, 3], "depth": None, "codebook_size": 16}, dim=16, depth=1, heads=1)


def test_code_files_store_continuous_latents_as_float16(tmp_path):
    from data.codes import CodeDataset, CodeFileError, CodeWriter, read_manifest

    writer = CodeWriter(tmp_path / "c", SPEC, tokenizer_path="kl.ckpt", tokenizer_sha256="0" * 64, shard_size=4)
    latents = torch.randn(6, 3, 3, 4) * 3
    writer.write_shard("train", 0, latents[:4], torch.tensor([0, 1, 2, 0]))
    writer.write_shard("train", 1, latents[4:], torch.tensor([1, 2]))
    with pytest.raises(CodeFileError, match="finite"):
        writer.write_shard("val", 0, torch.full((1, 3, 3, 4), float("nan")))
    with pytest.raises(CodeFileError, match="float16"):
        writer.write_shard("val", 0, torch.full((1, 3, 3, 4), 1e6))
    manifest = writer.finalize()
    assert manifest["dtype"] == "float16" and manifest["sample_shape"] == [3, 3, 4]
    assert read_manifest(tmp_path / "c")["code_spec"]["continuous"] == {"dim": 4}
    ds = CodeDataset(tmp_path / "c", "train")
    batch = ds.__getitems__(list(range(6)))
    assert batch["codes"].dtype == torch.float32 and batch["label"].tolist() == [0, 1, 2, 0, 1, 2]
    torch.testing.assert_close(batch["codes"], latents.half().float())  # exactly the float16 values


def test_klvae_latents_to_code_files_to_givt_to_decoded_images(klvae_and_latents, tmp_path):
    """Tiny KL-VAE -> tokenize (float16 latent means + manifest) -> GIVT trains with falling NLL ->
    samples decode to images through the tokenizer, on the command-line sample path with DB-CFG."""
    from data.codes import read_manifest
    from helpers import CONFIGS, assert_finite_and_falling, logged_series, train
    from stage1 import load_tokenizer
    from stage2.prior import load_prior
    from tokenforge.sample import main as sample_main

    ckpt, codes = klvae_and_latents
    manifest = read_manifest(codes)
    assert manifest["code_spec"]["continuous"] == {"dim": 4} and manifest["dtype"] == "float16"
    assert manifest["sample_shape"] == [7, 7, 4] and manifest["num_classes"] == 10
    runs = tmp_path / "runs"
    train(CONFIGS / "smoke" / "givt.yaml", runs, [f"data.params.codes={codes}"], name="givt")
    key, values = logged_series(runs / "givt")
    assert_finite_and_falling(values, f"givt {key}")
    header = (runs / "givt" / "logs" / "csv" / "metrics.csv").read_text().splitlines()[0]
    assert "val/bits_per_dim" in header
    prior_ckpt = runs / "givt" / "checkpoints" / "last.ckpt"
    prior = load_prior(prior_ckpt)
    assert int(prior.norm_items_seen) > 0 and prior.latent_std.min() > 0
    latents = prior.sample(3, cond=[0, 1, 2], cfg_scale=0.5, generator=torch.Generator().manual_seed(0))
    images = load_tokenizer(ckpt).decode(latents)
    assert images.shape == (3, 1, 28, 28) and torch.isfinite(images).all()
    out = sample_main([str(prior_ckpt), "-n", "4", "--class", "1", "--cfg", "0.5", "--temperature", "0.9",
                       "--out", str(tmp_path / "samples")])
    assert any(p.suffix == ".png" for p in out.iterdir())


def test_givt_on_a_frozen_klvae_encodes_images_to_the_same_latents_as_the_code_files(klvae_and_latents):
    """A prior trained through a frozen tokenizer (no code folder) sees the latents tokenize writes."""
    from data.codes import CodeDataset

    ckpt, codes = klvae_and_latents
    prior = GIVT(tokenizer=str(ckpt), num_classes=10, dim=16, depth=1, heads=2, num_components=2)
    assert prior.code_shape == (7, 7, 4)
    from stage1 import load_tokenizer

    x = torch.rand(3, 1, 28, 28) * 2 - 1
    got, labels, _ = prior.unpack_batch({"x": x, "label": torch.tensor([0, 1, 2])})
    torch.testing.assert_close(got, load_tokenizer(ckpt).encode(x))
    assert got.shape == (3, 7, 7, 4) and labels.tolist() == [0, 1, 2]
    stored = CodeDataset(codes, "train")[0]["codes"]
    assert stored.shape == got.shape[1:]
    assert torch.isfinite(prior.loss(got, labels).loss)


def test_evaluate_reports_latent_statistics_for_a_klvae_and_samples_a_givt(klvae_and_latents, tmp_path):
    from helpers import CONFIGS, train
    from tokenforge.evaluate import main as evaluate

    ckpt, codes = klvae_and_latents
    res = evaluate([str(ckpt), "--limit", "64", "--fid", "none", "--lpips", "none", "--out", str(tmp_path / "e1")])
    assert len(res["latent_mean"]) == 4 and len(res["latent_std"]) == 4 and len(res["kl_per_dim"]) == 4
    assert res["kl_per_element"] > 0 and res["codebook_size"] is None and "mse" in res
    train(CONFIGS / "smoke" / "givt.yaml", tmp_path / "runs", [f"data.params.codes={codes}", "trainer.max_steps=4"],
          name="g")
    res = evaluate([str(tmp_path / "runs" / "g" / "checkpoints" / "last.ckpt"), "--num-samples", "8", "--limit", "16",
                    "--fid", "none", "--out", str(tmp_path / "e2")])
    assert res["num_samples"] == 8 and "sample_code_usage" not in res
