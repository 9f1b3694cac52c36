"""Symbolic music: chorale grids, MIDI round trips, transposition, the cache, the ``music`` modality's
writers and metrics, the cross-entropy tokenizer and the bar-code priors end to end.

Parsing chorales is slow (about a second each), so the module parses the first four corpus files
once (three are 4/4 four-part chorales; the first, in 3/4, is filtered out) into a shared cache."""

from __future__ import annotations

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
