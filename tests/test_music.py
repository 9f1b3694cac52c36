"""Symbolic music: chorale grids, MIDI round trips, transposition, the cache, the ``music`` modality's
writers and metrics, the cross-entropy tokenizer and the bar-code priors end to end.

Parsing chorales is slow (about a second each), so the module parses the first four corpus files
once (three are 4/4 four-part chorales; the first, in 3/4, is filtered out) into a shared cache."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("music21")

from data import music  # noqa: E402
from data.music import (  # noqa: E402
    HOLD,
    NUM_CLASSES,
    ONSET,
    REST,
    MusicDataModule,
    decode_tokens,
    grid_notes,
    grid_to_tokens,
    load_pieces,
    one_hot,
    parse_file,
    tokens_to_grid,
    write_midi,
)

PIECES = 4  # corpus files parsed: bwv269 (3/4, dropped), bwv347, bwv153.1, bwv86.6


@pytest.fixture(scope="module")
def music_cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("music_cache"))


@pytest.fixture(scope="module")
def chorales(music_cache):
    return load_pieces("chorales", limit_pieces=PIECES, cache_dir=music_cache)


def test_chorales_parse_to_bar_aligned_four_voice_grids(chorales):
    assert len(chorales) == 3, "the 3/4 chorale must be filtered out"
    for grid in chorales:
        assert grid.ndim == 2 and grid.shape[1] == 4 and len(grid) % 16 == 0 and grid.dtype == np.int16
        pitch = grid % ONSET
        assert pitch[pitch > 0].min() >= 36 and pitch.max() <= 84  # SATB
        soprano, bass = pitch[:, 0], pitch[:, 3]
        both = (soprano > 0) & (bass > 0)
        assert (soprano[both] > bass[both]).all()
        assert (grid[:, 0] >= ONSET).sum() > 20  # onsets marked


def test_grid_midi_round_trip_keeps_pitches_onsets_and_durations(chorales, tmp_path):
    for i, grid in enumerate(chorales):
        path = write_midi(grid, tmp_path / f"{i}.mid")
        back = parse_file(path, steps_per_bar=16)
        assert np.array_equal(back, grid)
        for v in range(4):  # the same notes: start, length, pitch
            assert grid_notes(back[:, v]) == grid_notes(grid[:, v])


def test_repeated_notes_survive_the_midi_round_trip(tmp_path):
    grid = np.zeros((16, 1), dtype=np.int16)
    grid[0:4, 0] = 60
    grid[4:8, 0] = 60  # the same pitch again: a new note, not a longer one
    grid[0, 0] = grid[4, 0] = 60 + ONSET
    grid[10:12, 0] = 67
    grid[10, 0] = 67 + ONSET
    assert grid_notes(grid[:, 0]) == [(0, 4, 60), (4, 4, 60), (10, 2, 67)]
    assert np.array_equal(parse_file(write_midi(grid, tmp_path / "r.mid"), steps_per_bar=16), grid)


def test_tokens_round_trip_and_one_hot_decodes_back(chorales):
    grid = chorales[0]
    tokens = grid_to_tokens(grid)
    assert tokens.shape == (4, len(grid)) and set(np.unique(tokens)) >= {HOLD}
    assert np.array_equal(tokens_to_grid(tokens), grid)
    t = torch.from_numpy(tokens[None, :, :64])
    x = one_hot(t)
    assert x.shape == (1, 4 * NUM_CLASSES, 64) and torch.equal(x.sum(1), torch.full((1, 64), 4.0))
    assert torch.equal(decode_tokens(x, 4), t.long())
    assert tokens_to_grid(np.array([[HOLD, REST]]))[:, 0].tolist() == [0, 0]  # a hold after nothing is a rest


def test_the_cache_is_reused_without_parsing(chorales, music_cache, monkeypatch):
    monkeypatch.setattr(music, "_parse_chorale", lambda *a: pytest.fail("parsed again despite the cache"))
    again = load_pieces("chorales", limit_pieces=PIECES, cache_dir=music_cache)
    assert all(np.array_equal(a, b) for a, b in zip(again, chorales, strict=True))


def test_missing_music21_names_the_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "music21", None)
    with pytest.raises(ImportError, match="pip install music21"):
        music.chorale_sources()


def test_datamodule_splits_by_piece_and_transposes_within_voice_ranges(chorales, music_cache):
    dm = MusicDataModule(limit_pieces=PIECES, bars=2, hop_bars=2, batch_size=8, cache_dir=music_cache)
    dm.setup()
    assert len(dm.pieces["train"]) == 2 and len(dm.pieces["val"]) == 1
    lows, highs = dm.ranges
    untransposed = sum(len(music.windows(p, 2, 16, 2)) for p in dm.pieces["train"])
    train = dm.split_dataset("train").items
    assert len(train) > 2 * untransposed, "most windows fit several keys"
    for tokens in train.numpy():
        pitch = tokens_to_grid(tokens) % ONSET
        for v in range(4):
            sounding = pitch[:, v][pitch[:, v] > 0]
            assert sounding.size == 0 or (sounding.min() >= lows[v] and sounding.max() <= highs[v])
    val = dm.split_dataset("val").items
    assert len(val) == len(music.windows(dm.pieces["val"][0], 2, 16, 2))  # validation stays in its key
    batch = next(iter(dm.train_dataloader()))
    assert batch["x"].shape == (8, 4 * NUM_CLASSES, 32) and batch["x"].dtype == torch.float32


# ------------------------------------------------------------------------------------ folk and labels
FOLK = 8  # the first Essen tunes in 4/4


@pytest.fixture(scope="module")
def folk(music_cache):
    return load_pieces("folk", voices=1, limit_pieces=FOLK, cache_dir=music_cache)


def test_folk_tunes_parse_to_bar_aligned_melodies_and_are_cached(folk, music_cache, monkeypatch):
    sources = music.folk_sources("4/4")
    assert len(sources) == 2022 and all("essenFolksong" in s for s in sources)  # of the corpus' 8,514 tunes
    assert len(folk) == FOLK
    for grid in folk:
        assert grid.shape[1] == 1 and len(grid) % 16 == 0 and (grid >= ONSET).sum() > 8
        pitch = grid[:, 0] % ONSET
        assert 50 <= pitch[pitch > 0].min() and pitch.max() <= 90
    assert (folk[0][:, 0] == 0).any(), "the pickup bar starts with rests"
    monkeypatch.setattr(music, "_parse_folk", lambda *a: pytest.fail("parsed again despite the cache"))
    again = load_pieces("folk", voices=1, limit_pieces=FOLK, cache_dir=music_cache)
    assert all(np.array_equal(a, b) for a, b in zip(again, folk, strict=True))
    with pytest.raises(ValueError, match="monophonic"):
        load_pieces("folk", voices=4, limit_pieces=FOLK, cache_dir=music_cache)


def test_key_estimate_is_music21s_key_analysis_and_moves_with_transposition(folk):
    import music21

    profiles = music.key_profiles()
    for source, grid in zip(music.folk_sources("4/4")[:4], folk):
        path, index = source.rsplit("#", 1)
        key = music21.converter.parse(music._abc_tunes(path)[int(index)], format="abc").analyze("key")
        assert music.estimate_key(grid, profiles) == (key.tonic.pitchClass, music.MODES.index(key.mode))
    tonic, mode = music.estimate_key(folk[0], profiles)
    for s in (-5, 1, 3):
        assert music.estimate_key(music.transposed(folk[0], s), profiles) == ((tonic + s) % 12, mode)
    assert music.estimate_key(np.zeros((16, 1), np.int16)) == (0, 0)


def test_key_labels_follow_each_transposed_window(music_cache, folk):
    dm = MusicDataModule("folk", voices=1, bars=2, hop_bars=2, label="key", limit_pieces=FOLK,
                         batch_size=4, cache_dir=music_cache)
    dm.setup()
    assert dm.num_classes == 24 and dm.class_names[0] == "C major" and dm.class_names[21] == "A minor"
    profiles = music.key_profiles()
    expected: dict[bytes, set[int]] = {}  # window tokens -> the key of its piece transposed the same way
    for piece in dm.pieces["train"]:
        for s in range(-6, 6):
            tonic, mode = music.estimate_key(music.transposed(piece, s), profiles)
            for w in music.windows(music.transposed(piece, s), 2, 16, 2):
                expected.setdefault(grid_to_tokens(w).tobytes(), set()).add(12 * mode + tonic)
    train = dm.split_dataset("train")
    assert len(train) > 2 * len(dm.pieces["train"])
    assert len(set(train.labels.tolist())) > 6, "transposition spreads the keys"
    for tokens, label in zip(train.items.numpy(), train.labels.tolist()):
        assert label in expected[tokens.tobytes()]
    batch = next(iter(dm.train_dataloader()))
    assert batch["label"].dtype == torch.int64 and batch["x"].shape == (4, NUM_CLASSES, 32)


def test_mode_and_corpus_labels(music_cache, folk, chorales):
    mode = MusicDataModule("folk", voices=1, bars=2, label="mode", limit_pieces=FOLK, cache_dir=music_cache)
    mode.setup()
    assert mode.class_names == ["major", "minor"] and set(mode.split_dataset("train").labels.tolist()) <= {0, 1}
    both = MusicDataModule(["chorales", "folk"], voices=1, bars=2, label="corpus", val_fraction=0.3,
                           limit_pieces=PIECES, cache_dir=music_cache)
    both.setup()
    assert both.class_names == ["chorales", "folk"] and both.num_classes == 2
    melodies = {p.tobytes() for p in (g[:, :1] for g in chorales)}  # chorales at one voice: their sopranos
    for split in ("train", "val"):
        for piece, label in zip(both.pieces[split], both.piece_labels[split]):
            assert label == (0 if piece.tobytes() in melodies else 1)
    assert set(both.split_dataset("train").labels.tolist()) == {0, 1}
    unlabelled = MusicDataModule("folk", voices=1, bars=2, limit_pieces=FOLK, cache_dir=music_cache)
    unlabelled.setup()
    assert unlabelled.num_classes is None and "label" not in next(iter(unlabelled.train_dataloader()))
    with pytest.raises(ValueError, match="several datasets"):
        MusicDataModule("folk", voices=1, label="corpus")
    with pytest.raises(ValueError, match="unknown label"):
        MusicDataModule("folk", voices=1, label="tempo")


# ---------------------------------------------------------------------------------------- modality
def _two_voice(upper: list[int], lower: list[int], step: int = 4) -> np.ndarray:
    """Two voices of equal-length notes (``step`` 16ths each); every note has its onset."""
    grid = np.zeros((len(upper) * step, 2), dtype=np.int16)
    for v, notes in enumerate((upper, lower)):
        for i, p in enumerate(notes):
            grid[i * step:(i + 1) * step, v] = p
            grid[i * step, v] = p + ONSET
    return grid


def test_voice_leading_and_histogram_metrics_match_hand_counts():
    from stage1.modalities.music import note_density, parallel_fraction, pitch_class_histogram, range_violations

    # C5/C4 -> D5/D4: parallel octave; D5/D4 -> E5/A3: contrary; E5/A3 -> F5/Bb3 parallel fifth (E-A, F-Bb)
    grid = _two_voice([72, 74, 76, 77], [60, 62, 57, 58])
    fraction, moves = parallel_fraction([grid])
    assert moves == 2 and fraction == pytest.approx(1.0)  # the contrary step is not a similar motion
    oblique = _two_voice([72, 72, 74], [60, 65, 69])  # oblique motion, then a fifth to a fourth
    assert parallel_fraction([oblique]) == (0.0, 1)
    hist = pitch_class_histogram([grid])
    assert hist[0] == pytest.approx(8 / 32) and hist.sum() == pytest.approx(1.0)
    assert note_density([grid], 16) == pytest.approx(8 / 2)  # 8 onsets over 2 voices x 1 bar
    assert range_violations([grid], np.array([72, 58]), np.array([76, 62])) == pytest.approx(2 / 8)  # 77 and 57


def test_music_reconstruction_accuracy_counts_cells_and_sounding_cells():
    from stage1.modalities.music import MusicReconstruction

    tokens = torch.tensor([[[2, 1, 1, 0], [5, 0, 0, 0]]])  # 2 voices x 4 steps, 3 + 1 sounding cells
    wrong = tokens.clone()
    wrong[0, 0, 2] = 0  # a sounding cell lost
    wrong[0, 1, 3] = 7  # a rest turned into a note
    ev = MusicReconstruction(voices=2)
    ev.update(real=one_hot(tokens), fake=one_hot(wrong) * 3.0 - 1.0)  # logits work as well as one-hot
    out = ev.compute()
    assert out["token_accuracy"] == pytest.approx(6 / 8) and out["note_accuracy"] == pytest.approx(3 / 4)


def test_music_samples_score_real_data_as_perfect(chorales):
    from stage1.modalities.music import sample_statistics

    stats = sample_statistics(chorales, chorales)
    assert stats["pitch_class_tv"] == 0 and stats["range_violations"] == 0
    assert stats["note_density"] == stats["real_note_density"] > 1
    assert stats["parallel_fraction"] < 0.05  # Bach avoids them
    assert sample_statistics(chorales, [music.transposed(g, 1) for g in chorales])["pitch_class_tv"] > 0.2


def test_writer_makes_midi_piano_roll_and_wav_or_says_what_to_install(chorales, tmp_path, monkeypatch):
    from stage1.modalities import get_modality

    modality = get_modality("music").for_spec({"layout": {"channels": 4 * NUM_CLASSES, "classes": NUM_CLASSES,
                                                          "steps_per_bar": 16}})
    assert modality.voices == 4
    x = one_hot(torch.from_numpy(np.stack([grid_to_tokens(g[:32]) for g in chorales[:2]])))
    files = modality.write_samples(x, tmp_path / "s")
    names = {p.name for p in files}
    assert {"piano_roll.png", "sample_000.mid", "sample_001.mid"} <= names
    assert np.array_equal(parse_file(tmp_path / "s" / "sample_001.mid", 16), chorales[1][:32])
    from stage1.modalities.music import audio_renderer

    if audio_renderer()[0]:
        import soundfile

        data, rate = soundfile.read(tmp_path / "s" / "sample_000.wav")
        assert rate == 22050 and len(data) > rate and np.abs(data).max() > 0.01  # two bars at 120 bpm: 4 s
    monkeypatch.setattr("shutil.which", lambda name: None)
    files = modality.write_samples(x[:1], tmp_path / "quiet")
    assert "fluidsynth fluid-soundfont-gm" in (tmp_path / "quiet" / "NO_AUDIO.txt").read_text()
    assert not list((tmp_path / "quiet").glob("*.wav"))


# --------------------------------------------------------------------------------------- tokenizer
def test_grouped_cross_entropy_and_its_gradient_match_the_formula():
    from stage1.losses.categorical import grouped_cross_entropy, grouped_softmax

    torch.manual_seed(0)
    groups, classes, steps = 2, 5, 3
    logits = torch.randn(2, groups * classes, steps, dtype=torch.float64, requires_grad=True)
    target_tokens = torch.randint(0, classes, (2, groups, steps))
    target = torch.nn.functional.one_hot(target_tokens, classes).permute(0, 1, 3, 2).reshape(2, -1, steps).double()
    loss = grouped_cross_entropy(logits, target, classes)
    per_group = logits.detach().view(2, groups, classes, steps)
    log_p = per_group - per_group.logsumexp(2, keepdim=True)
    expected = -log_p.gather(2, target_tokens[:, :, None]).mean()  # mean of -log p(target) over cells
    assert loss.item() == pytest.approx(expected.item(), rel=1e-12)
    (grad,) = torch.autograd.grad(loss, logits)
    cells = 2 * groups * steps
    probs = log_p.exp()
    expected_grad = (probs - target.view(2, groups, classes, steps)) / cells  # d(-log softmax)/d logits
    torch.testing.assert_close(grad.view(2, groups, classes, steps), expected_grad)
    p = grouped_softmax(logits.detach(), classes).view(2, groups, classes, steps)
    torch.testing.assert_close(p, probs)


def test_a_cross_entropy_tokenizer_decodes_probabilities_and_needs_its_classes():
    from stage1.vqvae import VQVAE

    enc = {"dims": 1, "in_channels": 2 * NUM_CLASSES, "z_channels": 8, "channels": 8, "ch_mult": [1, 2],
           "num_res_blocks": 1, "groups": 4, "mid_attn": False}
    quantizer = {"target": "stage1.quantizers.vq.VectorQuantizer", "params": {"codebook_size": 16}}
    with pytest.raises(ValueError, match="layout.classes"):
        VQVAE(encoder=enc, quantizer=quantizer, resolution=16, embed_dim=4, modality="music", rec_loss="cross_entropy")
    model = VQVAE(encoder=enc, quantizer=quantizer, resolution=16, embed_dim=4, modality="music",
                  rec_loss="cross_entropy", layout={"classes": NUM_CLASSES, "voices": 2})
    x = one_hot(torch.randint(0, NUM_CLASSES, (3, 2, 16)))
    probs = model.decode(model.encode(x))
    assert probs.shape == x.shape and probs.min() >= 0
    torch.testing.assert_close(probs.view(3, 2, NUM_CLASSES, 16).sum(2), torch.ones(3, 2, 16))
    assert model.code_spec["decoder_output"]["range"] == [0.0, 1.0] and model.code_spec["modality"] == "music"
    xrec, _, _ = model(x)
    from stage1.losses.categorical import grouped_cross_entropy

    assert model.reconstruction_loss(x, xrec).item() == pytest.approx(
        grouped_cross_entropy(xrec, x, NUM_CLASSES).item())


# ------------------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def music_tokenizer_and_codes(tmp_path_factory, chorales):
    from helpers import train_and_tokenize

    return train_and_tokenize(tmp_path_factory.mktemp("music"), "music_vq", ["trainer.max_steps=10"],
                              shard_size=256, batch_size=64)


def test_tiny_tokenizer_to_prior_to_midi_that_music21_reads_back(music_tokenizer_and_codes, tmp_path):
    import music21

    from helpers import CONFIGS, train
    from stage1 import load_tokenizer
    from tokenforge.sample import main as sample

    ckpt, codes = music_tokenizer_and_codes
    spec = load_tokenizer(ckpt).code_spec
    assert spec["modality"] == "music" and spec["grid"] == [8]  # 2 bars x 4 codes
    train(CONFIGS / "smoke" / "music_prior.yaml", tmp_path, [f"data.params.codes={codes}", "trainer.max_steps=6",
                                                           "trainer.val_check_interval=6"])
    out = sample([str(tmp_path / "music_prior" / "checkpoints" / "last.ckpt"), "-n", "2", "--top-k", "8",
                  "--out", str(tmp_path / "samples")])
    assert (out / "piano_roll.png").is_file()
    tokenizer = load_tokenizer(ckpt)
    decoded = tokenizer.decode(torch.from_numpy(np.load(out / "codes.npy")).long())
    for i, grid in enumerate(tokens_to_grid(t) for t in decode_tokens(decoded, 4).numpy()):
        score = music21.converter.parse(str(out / f"sample_{i:03d}.musicxml"))
        assert len(score.parts) == 4  # every voice, even a silent one of this barely trained tokenizer
        assert all(len(p.getElementsByClass("Measure")) == 2 for p in score.parts)  # two bars
        assert np.array_equal(music.score_to_grid(score), grid)
        sounding = [v for v in range(4) if (grid[:, v] > 0).any()]
        back = parse_file(out / f"sample_{i:03d}.mid", steps_per_bar=16)  # MIDI: the sounding voices
        assert back.shape[1] == len(sounding) and np.array_equal(back, grid[:len(back), sounding])


@pytest.fixture(scope="module")
def music_maskgit(music_tokenizer_and_codes, tmp_path_factory):
    from helpers import CONFIGS, train

    _, codes = music_tokenizer_and_codes
    root = tmp_path_factory.mktemp("maskgit")
    train(CONFIGS / "smoke" / "music_maskgit.yaml", root, [f"data.params.codes={codes}", "trainer.max_steps=6",
                                                         "trainer.val_check_interval=6"])
    return root / "music_maskgit" / "checkpoints" / "last.ckpt"


def test_maskgit_infilling_never_changes_the_fixed_bars(music_tokenizer_and_codes, music_maskgit):
    from stage2.prior import load_prior

    _, codes = music_tokenizer_and_codes
    prior = load_prior(music_maskgit)
    real = torch.from_numpy(np.load(codes / "train-00000.npy")[:3]).long()
    init = real.clone()
    init[:, 4:] = prior.mask_id  # keep bar 1 (codes 0..3), fill bar 2
    filled = prior.sample(3, init=init, steps=4, generator=torch.Generator().manual_seed(0))
    assert torch.equal(filled[:, :4], real[:, :4]) and (filled[:, 4:] < prior.codebook_size).all()
    init = real.clone()
    init[:, :4] = prior.mask_id  # and the other way round
    filled = prior.sample(3, init=init, steps=4, generator=torch.Generator().manual_seed(1))
    assert torch.equal(filled[:, 4:], real[:, 4:])


def test_sample_infill_keeps_the_chosen_bars_and_writes_midi(music_tokenizer_and_codes, music_maskgit, tmp_path):
    import argparse

    from stage2.maskgit import keep_rows
    from tokenforge.sample import main as sample

    _, codes = music_tokenizer_and_codes
    ckpt = str(music_maskgit)
    real = np.load(codes / "val-00000.npy")[:2]
    out = sample([ckpt, "-n", "3", "--steps", "3", "--infill", str(codes / "val-00000.npy"), "--keep", "4:8",
                  "--out", str(tmp_path / "filled")])  # keep bar 2 (codes 4..7), fill bar 1
    filled = np.load(out / "codes.npy")
    source = np.load(codes / "val-00000.npy")
    assert np.array_equal(filled[:, 4:8], source[np.arange(3) % len(source), 4:8])
    assert (filled[:, :4] != source[np.arange(3) % len(source), :4]).any(), "bar 1 was sampled, not copied"
    assert (out / "sample_002.mid").is_file()
    record = json.loads((out / "samples.json").read_text())
    assert record["sampling"]["keep"] == "4:8" and record["sampling"]["infill"].endswith("val-00000.npy")
    both = sample([ckpt, "-n", "2", "--steps", "2", "--infill", str(codes / "val-00000.npy"), "--keep", "0:2,6:8"])
    kept = np.load(both / "codes.npy")
    assert np.array_equal(kept[:, [0, 1, 6, 7]], real[:, [0, 1, 6, 7]]) and "infillval-00000.npy" in both.name
    for bad in ("3:1", "a:b", "-1:2"):
        with pytest.raises(argparse.ArgumentTypeError):
            keep_rows(bad)
    with pytest.raises(ValueError, match="leaves the code grid"):
        sample([ckpt, "-n", "1", "--infill", str(codes / "val-00000.npy"), "--keep", "0:9", "--out", str(tmp_path)])
    with pytest.raises(ValueError, match="both infill"):
        sample([ckpt, "-n", "1", "--keep", "0:4", "--out", str(tmp_path / "x")])


def test_key_labelled_folk_codes_train_a_conditional_prior_sampled_by_class(tmp_path):
    from helpers import CONFIGS, train
    from stage2.prior import load_prior
    from tokenforge.sample import main as sample
    from tokenforge.tokenize import main as tokenize

    train(CONFIGS / "smoke" / "folk_vq.yaml", tmp_path / "runs", ["trainer.max_steps=4"], name="folk")
    codes = tmp_path / "codes"
    tokenize([str(tmp_path / "runs" / "folk" / "checkpoints" / "last.ckpt"), "--out", str(codes),
              "--batch-size", "64"])  # the smoke config's label: key travels with the codes
    labels = np.load(codes / "train-00000.labels.npy")
    assert labels.min() >= 0 and labels.max() < 24 and len(set(labels.tolist())) > 6
    manifest = json.loads((codes / "manifest.json").read_text())
    assert manifest["class_names"] == list(music.KEY_NAMES) and manifest["num_classes"] == 24  # even unseen keys
    train(CONFIGS / "smoke" / "music_prior.yaml", tmp_path / "runs", [f"data.params.codes={codes}",
                                                                      "trainer.max_steps=2"], name="prior")
    ckpt = tmp_path / "runs" / "prior" / "checkpoints" / "last.ckpt"
    prior = load_prior(ckpt)  # rebuilt from the checkpoint alone: the names travel with it
    assert prior.num_classes == 24 and prior.class_names == list(music.KEY_NAMES)
    out = sample([str(ckpt), "-n", "3", "--class", "0", "A minor", "Bb major", "--out", str(tmp_path / "s")])
    assert json.loads((out / "samples.json").read_text())["classes"] == [0, 21, 10]
    assert (out / "sample_002.mid").is_file()
    with pytest.raises(ValueError, match="C major"):
        sample([str(ckpt), "-n", "1", "--class", "H major", "--out", str(tmp_path / "t")])


def test_evaluate_a_music_tokenizer_reports_note_accuracy_usage_and_perplexity(music_tokenizer_and_codes, tmp_path):
    from tokenforge.evaluate import main as evaluate

    ckpt, _ = music_tokenizer_and_codes
    res = evaluate([str(ckpt), "--out", str(tmp_path / "ev")])
    for field in ("token_accuracy", "note_accuracy", "usage", "perplexity"):
        assert field in res, field
    assert 0 <= res["note_accuracy"] <= res["token_accuracy"] + 1 and "psnr" not in res
    assert (tmp_path / "ev" / "reconstructions.png").is_file()
