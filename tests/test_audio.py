"""The audio modality (issue 17): spoken_digits from espeak-ng, the SEANet codec's lengths and bitrates,
its losses against their formulas, and spoken digits -> codec -> codes -> AR prior -> WAV end to end."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchaudio

from data.audio import AudioDataModule, find_espeak, random_crops, spoken_digit_clips
from data.chorales_audio import DEFAULT_SOUNDFONT, chorale_audio_clips, find_fluidsynth, find_soundfont
from data.errors import MissingDataError
from helpers import CONFIGS, train
from stage1.losses.audio import (
    LossBalancer,
    MultiScaleMelLoss,
    discriminator_hinge_loss,
    feature_matching_loss,
    generator_hinge_loss,
    multi_resolution_stft_loss,
)
from stage1.modalities import get_modality
from stage1.seanet import SEANetDecoder, SEANetEncoder

needs_espeak = pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng is not installed")
needs_fluidsynth = pytest.mark.skipif(shutil.which("fluidsynth") is None or not Path(DEFAULT_SOUNDFONT).is_file(),
                                      reason="fluidsynth or fluid-soundfont-gm is not installed")
TINY = {"num_voices": 2, "speeds": (180,), "pitches": (50,), "sample_rate": 16000, "clip_seconds": 0.64}


def tiny_codec(depth: int = 3, dropout: float = 0.0):
    from stage1.audio_codec import AudioCodec

    net = {"dims": 1, "channels": 4, "z_channels": 8, "ratios": [4, 4], "lstm_layers": 0}
    quantizer = {"target": "stage1.quantizers.residual.ResidualQuantizer",
                 "params": {"depth": depth, "dropout_prob": dropout,
                            "quantizer": {"target": "stage1.quantizers.vq.VectorQuantizer",
                                          "params": {"codebook_size": 16}}}}
    return AudioCodec(encoder={"target": "stage1.seanet.SEANetEncoder", "params": {"in_channels": 1, **net}},
                      decoder={"target": "stage1.seanet.SEANetDecoder", "params": {"out_channels": 1, **net}},
                      quantizer=quantizer, resolution=256, embed_dim=8, stft_fft_sizes=[64, 32],
                      mel_scales=[6, 7], disc_n_ffts=[64], disc_filters=4)


# ----------------------------------------------------------------------------------------------- data
@needs_espeak
def test_spoken_digits_are_cached_padded_and_labelled(tmp_path, monkeypatch):
    audio, lengths, labels, voices = spoken_digit_clips(**TINY, cache_dir=str(tmp_path))
    assert audio.shape == (20, 10240) and audio.dtype == np.float32
    assert sorted(labels.tolist()) == sorted(list(range(10)) * 2) and set(voices.tolist()) == {0, 1}
    assert (lengths > 1600).all() and (lengths <= 10240).all()  # a spoken digit lasts > 0.1 s
    for x, n in zip(audio, lengths):
        assert np.abs(x[:n]).max() == pytest.approx(0.9, abs=1e-4) and not x[n:].any()
    assert len(list(tmp_path.glob("spoken_digits-*.npy"))) == 1
    # The second call reads the cache: espeak-ng is never run again.
    monkeypatch.setattr("data.audio.speak", lambda *a: pytest.fail("espeak-ng ran although the cache exists"))
    again = spoken_digit_clips(**TINY, cache_dir=str(tmp_path))
    assert np.array_equal(again[0], audio) and np.array_equal(again[1], lengths)


@needs_espeak
def test_the_datamodule_holds_out_voices_and_crops_inside_the_voiced_part(tmp_path):
    dm = AudioDataModule(num_voices=3, num_val_voices=1, speeds=[180], pitches=[50], clip_seconds=0.64, crop=3200,
                         batch_size=8, cache_dir=str(tmp_path))
    dm.setup()
    assert len(dm.split_dataset("train")) == 20 and len(dm.split_dataset("val")) == 10
    batch = next(iter(dm.train_dataloader()))
    assert batch["x"].shape == (8, 1, 3200) and set(batch) == {"x", "label", "length"}
    val = next(iter(dm.split_dataloader("val")))
    assert val["x"].shape == (8, 1, 10240) and val["index"].tolist() == list(range(8))


def test_random_crops_stay_inside_each_clip():
    x = torch.arange(2 * 100, dtype=torch.float).view(2, 1, 100)
    lengths = torch.tensor([60, 10])
    for seed in range(20):
        w, n = random_crops(x, lengths, 20, torch.Generator().manual_seed(seed))
        start = int(w[0, 0, 0])
        assert 0 <= start <= 40 and n[0] == 20 and torch.equal(w[0, 0], torch.arange(start, start + 20.0))
        assert int(w[1, 0, 0]) == 100 and n[1] == 10  # shorter than the crop: starts at 0, keeps its padding


def test_missing_packages_name_their_apt_command(tmp_path, monkeypatch):
    with pytest.raises(MissingDataError, match=r"apt-get install -y espeak-ng"):
        find_espeak(str(tmp_path))
    monkeypatch.setattr("data.audio.shutil.which", lambda name: None)
    with pytest.raises(MissingDataError, match=r"apt-get install -y espeak-ng"):
        find_espeak()


@needs_fluidsynth
def test_chorales_audio_renders_cached_clips_split_by_piece(tmp_path, monkeypatch):
    audio, lengths, pieces = chorale_audio_clips(num_pieces=3, clip_seconds=0.5, cache_dir=str(tmp_path),
                                                 progress=False)
    assert audio.dtype == np.float32 and audio.shape[1] == 8000 and len(audio) > 40  # > 20 s of music
    assert len(set(pieces.tolist())) >= 2 and (np.diff(pieces) >= 0).all()  # clips in piece order
    assert (lengths >= 4000).all() and (lengths <= 8000).all() and (lengths < 8000).sum() <= len(set(pieces.tolist()))
    for x, n in zip(audio, lengths):
        assert not x[n:].any()  # padding is silent
    assert np.abs(audio).max() == pytest.approx(0.9, abs=1e-4)  # peak-normalised per piece
    assert np.sqrt((audio[:, :4000] ** 2).mean(1)).min() > 1e-3  # real sound: no silent clip
    assert len(list(tmp_path.glob("chorales_audio-*.npy"))) == 1
    monkeypatch.setattr("data.chorales_audio.render_midi", lambda *a: pytest.fail("rendered although cached"))
    again = chorale_audio_clips(num_pieces=3, clip_seconds=0.5, cache_dir=str(tmp_path), progress=False)
    assert np.array_equal(again[0], audio) and np.array_equal(again[2], pieces)
    dm = AudioDataModule(dataset="chorales_audio", num_pieces=3, num_val_pieces=1, clip_seconds=0.5, crop=3200,
                         batch_size=4, cache_dir=str(tmp_path))
    dm.setup()
    val_pieces = set(pieces[dm.split_dataset("val").indices.numpy()].tolist())
    train_pieces = set(pieces[dm.split_dataset("train").indices.numpy()].tolist())
    assert val_pieces == {int(pieces.max())} and not val_pieces & train_pieces and dm.num_classes is None
    batch = next(iter(dm.train_dataloader()))
    assert batch["x"].shape == (4, 1, 3200) and set(batch) == {"x", "length"}


def test_missing_fluidsynth_or_soundfont_names_the_apt_command(tmp_path, monkeypatch):
    with pytest.raises(MissingDataError, match=r"apt-get install -y fluidsynth fluid-soundfont-gm"):
        find_fluidsynth(str(tmp_path))  # a folder without the binary
    monkeypatch.setattr("data.chorales_audio.shutil.which", lambda name: None)
    with pytest.raises(MissingDataError, match=r"apt-get install -y fluidsynth fluid-soundfont-gm"):
        find_fluidsynth()
    with pytest.raises(MissingDataError, match=r"soundfont.*apt-get install -y fluidsynth fluid-soundfont-gm"):
        find_soundfont(str(tmp_path / "missing.sf2"))
    # the DataModule reaches the same error before rendering anything
    dm = AudioDataModule(dataset="chorales_audio", num_pieces=2, num_val_pieces=1,
                         soundfont=str(tmp_path / "missing.sf2"), root=str(tmp_path), cache_dir=str(tmp_path))
    with pytest.raises(MissingDataError, match=r"fluidsynth fluid-soundfont-gm"):
        dm.setup()


# -------------------------------------------------------------------------------------- codec shapes
def test_seanet_frames_and_round_trip_length():
    enc, dec = SEANetEncoder(channels=4, z_channels=8, ratios=[8, 5, 4, 2]), SEANetDecoder(channels=4, z_channels=8,
                                                                                          ratios=[8, 5, 4, 2])
    z = enc(torch.randn(2, 1, 3200))
    assert z.shape == (2, 8, 10) and enc.downsample_factor == 320
    assert dec(z).shape == (2, 1, 3200)


def test_codec_pads_whole_clips_and_decode_restores_each_length():
    torch.manual_seed(0)
    model = tiny_codec().eval()
    x = torch.randn(2, 1, 250).clamp(-1, 1)  # not a multiple of the hop (16)
    out = model.tokenize_clips(x, torch.tensor([250, 100]))
    assert out["codes"].shape == (2, 16, 3)  # ceil(250 / 16) frames x 3 levels
    y = model.decode(out["codes"], length=out["length"])
    assert y.shape == (2, 1, 250) and not y[1, :, 100:].any() and y[1, :, :100].abs().sum() > 0
    assert model.decode(out["codes"], length=250).shape == (2, 1, 250)


def test_quantizer_dropout_gives_decodable_output_at_every_level_count():
    torch.manual_seed(0)
    model = tiny_codec(depth=3, dropout=1.0)
    model.train()
    _, q, _ = model(torch.randn(4, 1, 256))
    assert (q.codes == -1).any() or int(q.stats["active_levels"]) == 3  # dropout did act (or drew all levels)
    model.eval()
    codes = model.encode(torch.randn(2, 1, 256))
    outs = [model.decode(codes, levels=d) for d in (1, 2, 3)]
    for y in outs:
        assert y.shape == (2, 1, 256) and torch.isfinite(y).all()
    assert not torch.allclose(outs[0], outs[2]) and torch.allclose(outs[2], model.decode(codes))


def _fit_codec(model, steps: int = 3):
    """A few Lightning training steps of a tiny codec on fixed noise clips (same data, same seed)."""
    import pytorch_lightning as pl
    from torch.utils.data import DataLoader

    clips = [{"x": torch.randn(1, 256, generator=torch.Generator().manual_seed(i)).clamp(-1, 1)} for i in range(8)]
    torch.manual_seed(0)
    trainer = pl.Trainer(max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, accelerator="cpu", num_sanity_val_steps=0)
    trainer.fit(model, DataLoader(clips, batch_size=4))
    return model


def test_training_step_reuses_the_real_discriminator_pass_with_unchanged_updates():
    """D(x) is computed once per step (the generator's feature targets and the discriminator's real
    logits); the updates equal the reference that ran D(x) in both the generator and discriminator step."""
    from stage1.audio_codec import AudioCodec
    from stage1.losses.audio import discriminator_hinge_loss

    class Reference(AudioCodec):  # the step as it was: D(x) in generator_losses and again for the D loss
        def training_step(self, batch, batch_idx):
            opt_g, opt_d = self.optimizers()
            sched_g, sched_d = self.lr_schedulers()
            x = self.pad_to_hop(batch["x"])
            self.toggle_optimizer(opt_g)
            xrec, q, aux = self(x)
            losses = self.generator_losses(x, xrec, adversarial=True)
            opt_g.zero_grad(set_to_none=True)
            self.manual_backward(sum(self.weights[k] * v for k, v in losses.items()) + q.loss)
            opt_g.step()
            sched_g.step()
            self.untoggle_optimizer(opt_g)
            self.toggle_optimizer(opt_d)
            d_loss = discriminator_hinge_loss(self.discriminator(x.detach())[0], self.discriminator(xrec.detach())[0])
            opt_d.zero_grad(set_to_none=True)
            self.manual_backward(d_loss)
            opt_d.optimizer.step()
            sched_d.step()
            self.untoggle_optimizer(opt_d)

    def build(cls):
        torch.manual_seed(0)
        model = tiny_codec(depth=2, dropout=0.0)
        ref = cls(**model.hparams)
        ref.load_state_dict(model.state_dict())
        calls = []
        ref.discriminator.register_forward_hook(lambda *a: calls.append(1))
        return ref, calls

    new, new_calls = build(AudioCodec)
    old, old_calls = build(Reference)
    _fit_codec(new), _fit_codec(old)
    assert len(old_calls) == 4 * 3 and len(new_calls) == 3 * 3  # one discriminator pass fewer per step
    for (name, a), b in zip(new.state_dict().items(), old.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    assert not torch.equal(new.discriminator.state_dict()["discriminators.0.post.parametrizations.weight.original1"],
                           build(AudioCodec)[0].discriminator.state_dict()[
                               "discriminators.0.post.parametrizations.weight.original1"])  # D did train


# ------------------------------------------------------------------------------ losses vs formulas
# ------------------------------------------------------------------------------ losses vs formulas
def _direct_mr_stft(a: torch.Tensor, b: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """Spectral convergence + mean |log|S_a| - log|S_b||| per resolution, averaged (Yamamoto et al. 2020)."""
    def mag(x, n):
        s = torch.stft(x.reshape(-1, x.shape[-1]), n, n // 4, n, torch.hann_window(n), return_complex=True)
        return s.abs().pow(2).clamp_min(1e-8).sqrt()

    total = 0.0
    for n in sizes:
        ma, mb = mag(a, n), mag(b, n)
        sc = (mb - ma).flatten().norm() / mb.flatten().norm()
        total = total + sc + (torch.log(mb) - torch.log(ma)).abs().mean()
    return total / len(sizes)


def test_multi_resolution_stft_loss_matches_its_formula_with_gradients():
    torch.manual_seed(0)
    target = torch.randn(2, 1, 512)
    x = (target + 0.3 * torch.randn_like(target)).requires_grad_(True)
    loss_fn = multi_resolution_stft_loss([128, 64], overlap=4)
    assert loss_fn(target, target).item() == pytest.approx(0.0, abs=1e-6)
    loss = loss_fn(x, target)
    direct = _direct_mr_stft(x, target, [128, 64])
    assert loss.item() > 0.01 and loss.item() == pytest.approx(direct.item(), rel=1e-4)
    (g1,) = torch.autograd.grad(loss, x)
    (g2,) = torch.autograd.grad(_direct_mr_stft(x, target, [128, 64]), x)
    torch.testing.assert_close(g1, g2, rtol=1e-3, atol=1e-7)


def test_multi_scale_mel_loss_matches_encodecs_formula_with_gradients():
    torch.manual_seed(0)
    target = torch.randn(2, 1, 1024)
    x = (target + 0.3 * torch.randn_like(target)).requires_grad_(True)
    loss_fn = MultiScaleMelLoss(16000, scales=[6, 7], n_mels=64, alpha=0.5)
    assert loss_fn(target, target).item() == 0.0

    def direct(a):
        total = 0.0
        for i in (6, 7):
            mel = torchaudio.transforms.MelSpectrogram(16000, n_fft=2**i, hop_length=2**i // 4, n_mels=2**i // 8,
                                                       power=1.0)
            d = mel(a) - mel(target)
            total = total + d.abs().mean() + 0.5 * d.pow(2).mean()
        return total / 2

    loss = loss_fn(x, target)
    assert loss.item() > 0 and loss.item() == pytest.approx(direct(x).item(), rel=1e-5)
    (g1,) = torch.autograd.grad(loss, x)
    (g2,) = torch.autograd.grad(direct(x), x)
    torch.testing.assert_close(g1, g2)


def test_hinge_and_feature_matching_losses_match_encodec():
    real = [torch.tensor([0.5, 2.0]), torch.tensor([-1.0])]
    fake = [torch.tensor([-2.0, 0.0]), torch.tensor([0.5])]
    # generator: mean over discriminators of mean(relu(1 - D(x̂))) = ((3 + 1) / 2 + 0.5) / 2
    assert generator_hinge_loss(fake).item() == pytest.approx(1.25)
    # discriminator: (relu(1 - D(x)) + relu(1 + D(x̂))) means: ((0.5 + 0)/2 + (0 + 1)/2, 2 + 1.5) / 2
    assert discriminator_hinge_loss(real, fake).item() == pytest.approx((0.75 + 3.5) / 2)
    fr = [[torch.tensor([1.0, -3.0])], [torch.tensor([2.0]), torch.tensor([4.0])]]
    ff = [[torch.tensor([2.0, -1.0]), ], [torch.tensor([2.0]), torch.tensor([2.0])]]
    ff = [[t.clone().requires_grad_(True) for t in per] for per in ff]
    loss = feature_matching_loss(fr, ff)
    # |diff| means / |real| means: 1.5 / 2, 0 / 2, 2 / 4 -> mean over the 3 layers
    assert loss.item() == pytest.approx((0.75 + 0.0 + 0.5) / 3)
    loss.backward()
    torch.testing.assert_close(ff[0][0].grad, torch.tensor([1.0, 1.0]) / 2 / 2 / 3)


def test_loss_balancer_rescales_each_gradient_to_its_share():
    x = torch.tensor([[1.0, 2.0], [3.0, -1.0]], requires_grad=True)
    losses = {"a": (x**2).sum(), "b": 10 * x.sum()}
    balancer = LossBalancer({"a": 1.0, "b": 3.0}, total_norm=2.0, beta=0.5)
    grad = balancer.backward_gradient(losses, x)
    ga, gb = 2 * x.detach(), torch.full_like(x, 10.0)
    na, nb = ga.norm(dim=1).mean(), gb.norm(dim=1).mean()  # per-item norms, batch mean
    torch.testing.assert_close(grad, 2.0 * (0.25 * ga / na + 0.75 * gb / nb))
    # The second call averages norms with the bias-corrected EMA: (0.5 n1 + n2) / 1.5.
    losses = {"a": (2 * x**2).sum(), "b": 10 * x.sum()}
    grad = balancer.backward_gradient(losses, x)
    torch.testing.assert_close(grad, 2.0 * (0.25 * 2 * ga / ((0.5 * na + 2 * na) / 1.5) + 0.75 * gb / nb))


# ------------------------------------------------------------------------------------------ end to end
@pytest.fixture(scope="module")
def audio_run(tmp_path_factory):
    from tokenforge.tokenize import main as tokenize

    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed")
    root = tmp_path_factory.mktemp("audio")
    train(CONFIGS / "smoke" / "audio_codec.yaml", root / "runs", ["trainer.max_steps=12"], name="tok")
    ckpt = root / "runs" / "tok" / "checkpoints" / "last.ckpt"
    codes = root / "codes"
    tokenize([str(ckpt), "--out", str(codes), "--batch-size", "10"])
    return ckpt, codes


@pytest.fixture(scope="module")
def audio_prior(audio_run, tmp_path_factory):
    root = tmp_path_factory.mktemp("audio_prior")
    train(CONFIGS / "smoke" / "audio_ar.yaml", root, [f"data.params.codes={audio_run[1]}", "trainer.max_steps=6",
                                                    "trainer.val_check_interval=6"])
    return root / "audio_ar" / "checkpoints" / "last.ckpt"


def test_codec_to_prior_to_wav_end_to_end(audio_run, audio_prior, tmp_path):
    import soundfile

    from stage1 import load_tokenizer
    from tokenforge.sample import main as sample

    ckpt, codes = audio_run
    spec = load_tokenizer(ckpt).code_spec
    assert spec["modality"] == "audio" and spec["grid"] == [32] and spec["depth"] == 3
    assert spec["layout"]["sample_rate"] == 16000
    assert list((ckpt.parents[1] / "images").glob("recon_step*_0_reconstruction.wav"))
    out = sample([str(audio_prior), "-n", "3", "--class", "7", "--out", str(tmp_path / "samples")])
    wavs = sorted(out.glob("sample_*_class7.wav"))
    assert len(wavs) == 3 and (out / "spectrograms.png").is_file()
    data, rate = soundfile.read(wavs[0])
    assert rate == 16000 and data.shape == (10240,) and np.abs(data).max() <= 1.0


def test_code_files_store_each_items_original_length(tmp_path):
    from data.codes import CodeDataset, CodeFileError, CodesDataModule, CodeWriter

    spec = {"modality": "audio", "grid": [4], "depth": 2, "codebook_size": 8}
    writer = CodeWriter(tmp_path / "codes", spec, tokenizer_path="t.ckpt", tokenizer_sha256="0", shard_size=2)
    codes = torch.randint(0, 8, (3, 4, 2))
    writer.write_shard("train", 0, codes[:2], lengths=torch.tensor([1001, 64]))
    writer.write_shard("train", 1, codes[2:], lengths=torch.tensor([7]))
    with pytest.raises(CodeFileError, match="lengths must be"):
        writer.write_shard("val", 0, codes[:2], lengths=torch.tensor([3]))
    manifest = writer.finalize()
    assert [e["lengths"] for e in manifest["splits"]["train"]["shards"]] == ["train-00000.lengths.npy",
                                                                           "train-00001.lengths.npy"]
    ds = CodeDataset(tmp_path / "codes", "train")
    assert ds[2]["length"] == 7 and torch.equal(ds[0]["codes"], codes[0])
    batch = next(iter(CodesDataModule(str(tmp_path / "codes"), batch_size=3).train_dataloader()))
    assert sorted(batch["length"].tolist()) == [7, 64, 1001]


def test_tokenize_records_clip_lengths_and_decode_restores_an_odd_length(audio_run):
    """scripts/tokenize.py writes each clip's unpadded length; decoding with it gives exactly that length."""
    from data.codes import CodeDataset
    from stage1 import load_tokenizer

    ckpt, codes = audio_run
    codec = load_tokenizer(ckpt).eval()
    dm = AudioDataModule(**{k: v for k, v in TINY.items() if k != "num_voices"}, num_voices=3, num_val_voices=1)
    for split in ("train", "val"):
        ds, real = CodeDataset(codes, split), dm.split_dataset(split)
        items, clips = ds.__getitems__(list(range(len(ds)))), real.__getitems__(list(range(len(real))))
        assert torch.equal(items["length"], clips["length"])  # the voiced length, not the padded 10240
    odd = int(torch.nonzero(items["length"] % 2 == 1)[0])
    n = int(items["length"][odd])
    assert n % 2 == 1 and n < 10240 and n % codec.hop != 0
    (clip,) = codec.decode_clips(items["codes"][odd: odd + 1], items["length"][odd: odd + 1])
    assert clip.shape == (1, n)
    torch.testing.assert_close(clip, codec.decode(items["codes"][odd: odd + 1], length=n)[0])
    # the unpadded clip alone round-trips tokenize_clips -> decode to its length too
    alone = clips["x"][odd: odd + 1, :, :n]
    out = codec.tokenize_clips(alone)
    assert codec.decode(out["codes"], length=out["length"]).shape == (1, 1, n)


def test_rq_transformer_over_audio_codes_trains_and_samples_wavs(audio_run, tmp_path):
    """configs/smoke/audio_rq_transformer.yaml on the tiny codec's codes: loss falls, sample.py writes WAVs."""
    import soundfile

    from helpers import assert_finite_and_falling, logged_series
    from tokenforge.runs import open_run
    from tokenforge.sample import main as sample

    _, codes = audio_run
    train(CONFIGS / "smoke" / "audio_rq_transformer.yaml", tmp_path / "runs", [f"data.params.codes={codes}"])
    run_dir = tmp_path / "runs" / "audio_rq_transformer"
    assert_finite_and_falling(logged_series(run_dir)[1], "audio RQ-Transformer loss")
    prior = open_run(str(run_dir / "checkpoints" / "last.ckpt")).model
    assert prior.levels == 3 and prior.tok_emb.num_embeddings == 3 * 32  # an embedding table per RVQ level
    out = sample([str(run_dir / "checkpoints" / "last.ckpt"), "-n", "2", "--class", "3",
                  "--out", str(tmp_path / "samples")])
    wavs = sorted(out.glob("sample_*_class3.wav"))
    assert len(wavs) == 2 and (out / "spectrograms.png").is_file()
    data, rate = soundfile.read(wavs[0])
    assert rate == 16000 and data.shape == (10240,) and np.isfinite(data).all() and np.abs(data).max() > 0


def test_evaluate_an_audio_codec_reports_audio_metrics(audio_run, tmp_path):
    from tokenforge.evaluate import main as evaluate

    ckpt, _ = audio_run
    res = evaluate([str(ckpt), "--out", str(tmp_path / "ev")])
    for field in ("mel_distance", "stft_distance", "si_snr_db", "usage", "usage_level0", "perplexity"):
        assert field in res, field
    assert res["mel_distance"] > 0 and res["stft_distance"] > 0
    assert (tmp_path / "ev" / "reconstructions.png").is_file()
    # bitrate table: one row per active level count, kbps = frames/s x levels x log2(K) / 1000
    table = res["bitrate_table"]
    assert [r["levels"] for r in table] == [1, 2, 3]  # the smoke codec has 3 residual levels of 32 codes
    for r in table:
        assert r["kbps"] == pytest.approx(16000 / 320 * r["levels"] * 5 / 1000)
        assert {"mel_distance", "stft_distance", "si_snr_db"} <= set(r)
    # all levels = the full decode the headline metrics score
    assert table[-1]["mel_distance"] == pytest.approx(res["mel_distance"], rel=1e-5)
    assert table[-1]["si_snr_db"] == pytest.approx(res["si_snr_db"], rel=1e-4)
    report = (tmp_path / "ev" / "report.md").read_text()
    assert "## bitrate_table" in report and "| levels | kbps | mel_distance |" in report


def test_bitrate_formula():
    from stage1.audio_bitrate import kbps

    assert kbps(50, 8, 1024) == pytest.approx(4.0)  # EnCodec 24 kHz-style: 75 x 8 x 10 = 6 kbps; 50 f/s -> 4
    assert kbps(75, 8, 1024) == pytest.approx(6.0)
    assert kbps(50, 1, 16) == pytest.approx(0.2)


def test_the_audio_modality_binds_the_code_specs_sample_rate():
    from stage1.modalities import modality_of

    assert get_modality("audio").datamodule == "data.audio.AudioDataModule"
    assert modality_of({"modality": "audio", "layout": {"sample_rate": 8000}}).sample_rate == 8000
    assert get_modality("audio").sample_rate == 16000


def test_si_snr_and_mel_distance_are_zero_error_on_identical_clips():
    ev = get_modality("audio").reconstruction_evaluator({})
    x = torch.sin(torch.arange(4000) / 5.0).view(1, 1, -1).repeat(2, 1, 1)
    ev.update(real=x, fake=x)
    out = ev.compute()
    assert out["mel_distance"] == 0.0 and out["stft_distance"] == pytest.approx(0.0, abs=1e-6)
    assert out["si_snr_db"] > 40
    noisy = get_modality("audio").reconstruction_evaluator({})
    noisy.update(real=x, fake=x + 0.1 * torch.randn_like(x))
    assert noisy.compute()["si_snr_db"] < out["si_snr_db"]


def test_fsq_and_residual_fsq_work_in_the_codec():
    from stage1.audio_codec import AudioCodec

    net = {"dims": 1, "channels": 4, "z_channels": 8, "ratios": [4, 4], "lstm_layers": 0}
    for quantizer in ({"target": "stage1.quantizers.fsq.FSQ", "params": {"levels": [5, 5, 5]}},
                      {"target": "stage1.quantizers.residual.ResidualQuantizer",
                       "params": {"depth": 2, "level_scale": 4.0,
                                  "quantizer": {"target": "stage1.quantizers.fsq.FSQ", "params": {"levels": [5, 5]}}}}):
        model = AudioCodec(encoder={"target": "stage1.seanet.SEANetEncoder", "params": {"in_channels": 1, **net}},
                           decoder={"target": "stage1.seanet.SEANetDecoder", "params": {"out_channels": 1, **net}},
                           quantizer=quantizer, resolution=256, embed_dim=3 if "levels" in quantizer["params"] else 2,
                           stft_fft_sizes=[64], mel_scales=[6], disc_n_ffts=[64], disc_filters=4).eval()
        x = torch.randn(2, 1, 256)
        assert model.decode(model.encode(x)).shape == x.shape
        assert F.l1_loss(model(x)[0], x).isfinite()


def test_continuation_keeps_the_prompt_and_continues_it(audio_run, audio_prior):
    """Prompted sampling: the first frames of a held-out clip's codes are kept, the rest sampled."""
    from tokenforge.runs import open_run

    run = open_run(str(audio_prior))
    prior, codec = run.model, run.tokenizer
    dm = AudioDataModule(**{k: v for k, v in TINY.items() if k != "num_voices"}, num_voices=3, num_val_voices=1)
    clip = dm.split_dataset("val")[0]["x"].unsqueeze(0)
    prompt = codec.encode(clip[..., : 12 * 320])  # the first 12 frames (0.24 s)
    assert prompt.shape == (1, 12, 3)
    gen = torch.Generator().manual_seed(0)
    codes = prior.sample(2, cond=int(dm.split_dataset("val")[0]["label"]), prompt=prompt.repeat(2, 1, 1),
                         generator=gen)
    assert codes.shape == (2, 32, 3) and torch.equal(codes[:, :12], prompt.repeat(2, 1, 1))
    audio = codec.decode(codes)
    assert audio.shape == (2, 1, 10240) and torch.isfinite(audio).all()


@needs_espeak
def test_digit_classifier_learns_round_trips_and_scores_samples(tmp_path):
    from metrics.audio_classifier import DigitClassifier, accuracy, train_digit_classifier

    dm = AudioDataModule(**{k: v for k, v in TINY.items() if k != "num_voices"}, num_voices=3, num_val_voices=1)
    train_set = dm.split_dataset("train")[list(range(20))]
    x, y = train_set["x"], train_set["label"]
    model = train_digit_classifier(x, y, epochs=40, batch_size=10, width=8)
    assert accuracy(model, x, y) >= 0.8
    path = model.save(tmp_path / "digits.pt", val_accuracy=0.5)
    again = DigitClassifier.load(path)
    torch.testing.assert_close(again(x[:4]), model(x[:4]))
    ev = get_modality("audio").sample_evaluator({"classifier": str(path)})
    ev.update(real=x, labels=y)
    ev.update(fake=x, labels=y)
    out = ev.compute()
    assert out["digit_classifier_fd"] == pytest.approx(0.0, abs=1e-3)  # identical sets
    assert out["digit_classifier_accuracy"] == pytest.approx(accuracy(model, x, y))
    assert {f"digit_classifier_accuracy_class{c}" for c in range(10)} <= set(out)
