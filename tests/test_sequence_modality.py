"""The modality seam, proven with the 1-D ``sequence`` modality end to end through the commands:
sines -> 1-D conv VQ-VAE -> code files -> AR and MaskGIT priors -> samples (.npz + curves) -> evaluate."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from data.sequence import SequenceDataModule, sine_mixtures
from helpers import CONFIGS, train, train_and_tokenize
from stage1 import load_tokenizer
from stage1.modalities import available, get_modality
from stage1.modalities.sequence import SequenceReconstruction, log_spectrum
from tokenforge.evaluate import main as evaluate
from tokenforge.sample import main as sample


def test_sines_are_deterministic_in_range_and_their_class_is_the_dominant_frequency():
    x, labels = sine_mixtures(400, 128, num_classes=4, seed=3)
    again, labels_again = sine_mixtures(400, 128, num_classes=4, seed=3)
    assert np.array_equal(x, again) and np.array_equal(labels, labels_again)
    assert x.shape == (400, 1, 128) and x.dtype == np.float32 and np.abs(x).max() <= 1.0
    assert np.bincount(labels).tolist() == [100] * 4
    peak = np.abs(np.fft.rfft(x[:, 0], axis=-1)).argmax(-1)
    assert np.array_equal(np.round((peak - 2) / 3), labels), "class k must peak near 2 + 3k cycles"


def test_sequence_datamodule_batches_and_an_npz_of_ones_own(tmp_path):
    dm = SequenceDataModule(length=64, channels=2, num_train=50, num_val=10, batch_size=16, limit_train=40)
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    assert batch["x"].shape == (16, 2, 64) and batch["label"].dtype == torch.long
    assert len(dm.split_dataset("train")) == 40 and dm.num_classes == 4
    assert next(iter(dm.split_dataloader("val")))["index"].tolist() == list(range(10))
    path = tmp_path / "mine.npz"
    np.savez(path, x=np.zeros((20, 32), dtype=np.float32))
    own = SequenceDataModule(dataset="npz", path=str(path), val_fraction=0.25, batch_size=8)
    own.setup()
    assert (own.channels, own.length, own.num_classes) == (1, 32, None)
    assert len(own.split_dataset("train")) == 15 and set(next(iter(own.val_dataloader()))) == {"x"}


def test_the_registry_finds_each_modality_file_and_names_what_is_missing():
    assert {"image", "sequence"} <= set(available()) and not any(n.startswith("_") for n in available())
    assert get_modality("sequence").datamodule == "data.sequence.SequenceDataModule"
    assert get_modality(None).name == "image"  # a code spec from before modalities
    from stage1.modalities.base import PLANNED

    unbuilt = [name for name in PLANNED if name not in available()]
    if unbuilt:
        with pytest.raises(ValueError, match=f"'{unbuilt[0]}' is planned but not implemented"):
            get_modality(unbuilt[0])
    with pytest.raises(ValueError, match="lower-case identifiers"):
        get_modality("../etc")


def test_sequence_reconstruction_metrics_match_their_formulas():
    t = torch.arange(64) / 64
    real = torch.sin(2 * torch.pi * 4 * t).view(1, 1, 64).repeat(2, 1, 1)
    fake = real.clone()
    fake[0] *= 0.9  # error = real / 10 -> SNR = 20 dB
    fake[1] *= 0.5  # error = real / 2 -> SNR = 10 log10(4) dB
    ev = SequenceReconstruction({})
    ev.update(real=real, fake=fake)
    out = ev.compute()
    err = (real - fake)
    assert out["mse"] == pytest.approx(float(err.pow(2).mean()), rel=1e-6)
    assert out["mae"] == pytest.approx(float(err.abs().mean()), rel=1e-6)
    assert out["snr_db"] == pytest.approx((20.0 + 10 * np.log10(4.0)) / 2, rel=1e-4)
    spec = (log_spectrum(real) - log_spectrum(fake)).abs().mean(1).mean()
    assert out["log_spectrum_l1"] == pytest.approx(float(spec), rel=1e-6)


@pytest.fixture(scope="module")
def sequence_tokenizer_and_codes(tmp_path_factory):
    return train_and_tokenize(tmp_path_factory.mktemp("seq"), "sequence_vq", ["trainer.max_steps=20"],
                              shard_size=128)


def test_the_tokenizer_records_the_sequence_modality_and_writes_1d_codes(sequence_tokenizer_and_codes):
    ckpt, codes = sequence_tokenizer_and_codes
    tok = load_tokenizer(ckpt)
    spec = tok.code_spec
    assert spec["modality"] == "sequence" and spec["grid"] == [8]
    assert spec["layout"] == {"channels": 1, "shape": [32]} and spec["decoder_output"]["shape"] == [32]
    manifest = json.loads((codes / "manifest.json").read_text())
    assert manifest["code_spec"] == spec and manifest["num_classes"] == 3
    assert manifest["splits"]["train"]["count"] == 256 and manifest["sample_shape"] == [8]
    x = torch.from_numpy(sine_mixtures(4, 32, 3)[0])
    assert tok.decode(tok.encode(x)).shape == x.shape
    assert list((ckpt.parents[1] / "images").glob("recon_step*.png")), "the modality drew no reconstructions"


@pytest.mark.parametrize("prior,flags", [("sequence_ar", ["--top-k", "16"]), ("sequence_maskgit", ["--steps", "4"])])
def test_sequence_priors_sample_and_evaluate_end_to_end(prior, flags, sequence_tokenizer_and_codes, tmp_path):
    ckpt, codes = sequence_tokenizer_and_codes
    train(CONFIGS / "smoke" / f"{prior}.yaml", tmp_path, [f"data.params.codes={codes}", "trainer.max_steps=8",
                                                          "trainer.val_check_interval=8"])
    prior_ckpt = tmp_path / prior / "checkpoints" / "last.ckpt"
    out = sample([str(prior_ckpt), "-n", "6", "--class", "0", "2", "--out", str(tmp_path / "samples"), *flags])
    with np.load(out / "samples.npz") as f:
        assert f["x"].shape == (6, 1, 32) and np.abs(f["x"]).max() <= 1.0
        assert f["labels"].tolist() == [0, 2, 0, 2, 0, 2]
    assert (out / "curves.png").is_file() and np.load(out / "codes.npy").shape == (6, 8)

    res = evaluate([str(prior_ckpt), "--num-samples", "12", "--out", str(tmp_path / "ev"), *flags])
    assert res["num_samples"] == 12 and res["spectral_fd"] >= 0 and 0 <= res["class_accuracy"] <= 1
    report = (tmp_path / "ev" / "report.md").read_text()
    assert "spectral_fd" in report and "samples.png" in report and "fid" not in res


def test_evaluate_a_sequence_tokenizer(sequence_tokenizer_and_codes, tmp_path):
    ckpt, _ = sequence_tokenizer_and_codes
    res = evaluate([str(ckpt), "--out", str(tmp_path / "ev"), "--json", str(tmp_path / "ev.json")])
    for field in ("mse", "mae", "snr_db", "log_spectrum_l1", "usage", "perplexity", "dead_codes"):
        assert field in res, field
    assert res["num_examples"] == 64 and "psnr" not in res and "rfid" not in res
    assert (tmp_path / "ev" / "reconstructions.png").is_file()


def test_a_new_modality_file_brings_its_own_tokenizer_loss(monkeypatch):
    """A modality registered as one module supplies the tokenizer's extra reconstruction loss: here a
    spectrum L1 (as an audio modality would add STFT losses), weighted by perceptual_weight."""
    import sys
    import types

    from torch import nn

    from stage1.modalities.base import Modality
    from stage1.vqvae import VQVAE

    def spectrum_l1(a, b):
        return (torch.fft.rfft(a, dim=-1).abs() - torch.fft.rfft(b, dim=-1).abs()).abs().mean()

    class SpectrumLoss(nn.Module):
        def forward(self, reconstruction, target):
            return spectrum_l1(reconstruction, target)

    class Toy(Modality):
        name = "toy"

        def perceptual_loss(self, options):
            return SpectrumLoss(), "spectrum L1"

    module = types.ModuleType("stage1.modalities.toy")
    module.MODALITY = Toy()
    monkeypatch.setitem(sys.modules, "stage1.modalities.toy", module)
    enc = {"dims": 1, "in_channels": 1, "z_channels": 8, "channels": 8, "ch_mult": [1, 2], "num_res_blocks": 1,
           "groups": 4, "mid_attn": False}
    quantizer = {"target": "stage1.quantizers.vq.VectorQuantizer", "params": {"codebook_size": 16}}
    model = VQVAE(encoder=enc, quantizer=quantizer, resolution=32, embed_dim=4, modality="toy", perceptual_weight=0.5)
    model.setup("fit")
    assert model.hparams.perceptual_active and model.code_spec["modality"] == "toy"
    x = torch.from_numpy(sine_mixtures(4, 32, 2)[0])
    xrec, _, _ = model(x)
    rec, p_loss, nll = model.nll(x, xrec)
    assert p_loss.item() == pytest.approx(spectrum_l1(xrec, x).item(), rel=1e-6)
    assert nll.item() == pytest.approx(rec.item() + 0.5 * p_loss.item(), rel=1e-6)
    (grad_nll,) = torch.autograd.grad(nll, xrec, retain_graph=True)
    (grad_rec,) = torch.autograd.grad(rec, xrec, retain_graph=True)
    (grad_p,) = torch.autograd.grad(p_loss, xrec)
    torch.testing.assert_close(grad_nll, grad_rec + 0.5 * grad_p)
    assert grad_p.abs().sum() > 0


def test_sample_metrics_score_the_real_data_as_a_perfect_generator():
    x, labels = (torch.from_numpy(a) for a in sine_mixtures(200, 64, num_classes=4, seed=1))
    modality = get_modality("sequence").for_spec({"layout": {"channels": 1, "shape": [64]}})
    ev = modality.sample_evaluator({})
    ev.update(real=x, labels=labels)
    ev.update(fake=x, labels=labels)
    out = ev.compute()
    assert out["spectral_fd"] < 1e-3 and out["class_accuracy"] >= 0.95
    wrong = modality.sample_evaluator({})
    wrong.update(real=x, labels=labels)
    wrong.update(fake=x, labels=(labels + 1) % 4)  # every sample of the wrong class
    assert wrong.compute()["class_accuracy"] <= 0.05
