"""Symbolic music as (time, voice) grids of MIDI pitches on a 16th-note grid, for the ``music`` modality.

A piece is an ``int16`` grid ``(T, V)`` of *events*: ``0`` is a rest, ``pitch`` (1..127) a held note and
``pitch + ONSET`` a note starting on that step, so two repeated notes stay two notes. The grid is
padded with rests in front so that bar lines fall on multiples of ``steps_per_bar`` (a chorale's
pickup bar), and at the end to a whole number of bars.

Models see *tokens* ``(V, T)`` per window: ``REST`` (0), ``HOLD`` (1: the previous note continues) or
``2 + pitch - LOW`` (a note starts), one categorical per cell, so the tokenizer's reconstruction is
a cross-entropy over this vocabulary; batches carry them one-hot as ``x`` float ``(B, V * K, T)``.

Sources (parsed with music21 once, then cached as arrays keyed by every parameter, see
``data.cache``): ``chorales`` (music21's Bach chorales with exactly ``voices`` parts in
``time_signature``; ``voices: 1`` keeps the soprano, the chorale melody), ``folk`` (the Essen folk
songs of music21's ``essenFolksong`` corpus whose ``M:`` header is ``time_signature``: monophonic,
``voices: 1``) or ``folder`` (any ``.mid``/``.musicxml``/``.mxl``/``.xml`` files). Train and val
split by piece; training windows are augmented by every transposition in -6..+5 semitones that
keeps each voice inside the range that voice spans over the whole training split.

Labels (``label``): ``none``, ``key`` (24 classes, the piece's key by music21's default key-profile
method, see :func:`estimate_key`; transposed windows carry the transposed key), ``mode`` (major /
minor) or ``corpus`` (which of several ``dataset`` names the piece came from, e.g. chorale
melodies vs folk tunes). The DataModule's ``class_names`` name the classes.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from data.cache import cache_key, cached_array, source_stamp
from data.split import SplitDataModule, SplitDataset, seeded_subset

ONSET = 128
REST, HOLD = 0, 1
LOW, HIGH = 28, 96  # the MIDI pitches a token can name (E1..C7)
NUM_CLASSES = 2 + HIGH - LOW + 1
STEPS_PER_QUARTER = 4
DATASETS = ("chorales", "folk", "folder")
LABELS = ("none", "key", "mode", "corpus")
PITCH_CLASS_NAMES = ("C", "C#", "D", "Eb", "E", "F", "F#", "G", "Ab", "A", "Bb", "B")
MODES = ("major", "minor")
KEY_NAMES = tuple(f"{tonic} {mode}" for mode in MODES for tonic in PITCH_CLASS_NAMES)  # class = 12 * mode + tonic
MUSIC_SUFFIXES = (".mid", ".midi", ".musicxml", ".mxl", ".xml")


def _music21():
    try:
        import music21
    except ImportError as err:  # the corpus and the parser both come with it
        raise ImportError("symbolic music needs music21: `pip install music21` (scripts/setup.sh installs it)") from err
    return music21


# ---------------------------------------------------------------------------------------------- parsing
def score_to_grid(score: Any, steps_per_bar: int | None = None) -> np.ndarray:
    """A music21 score -> event grid ``(T, V)`` (one column per part, top part first), bars aligned.

    Tied notes are merged; a part's chords keep their top note. ``steps_per_bar`` defaults to the
    first time signature's bar (4/4 -> 16).
    """
    if steps_per_bar is None:
        signatures = list(score.recurse().getElementsByClass("TimeSignature"))
        steps_per_bar = round(signatures[0].barDuration.quarterLength * STEPS_PER_QUARTER) if signatures else 16
    parts = list(score.parts) or [score]
    events: list[list[tuple[int, int, int]]] = []
    shift = 0
    measures = list(parts[0].getElementsByClass("Measure"))
    if len(measures) > 1:  # a pickup bar: the second bar's start must land on a bar line
        shift = (-round(float(measures[1].offset) * STEPS_PER_QUARTER)) % steps_per_bar
    end = 0
    for part in parts:
        notes = []
        for n in part.stripTies().flatten().notes:
            start, length = round(float(n.offset) * STEPS_PER_QUARTER) + shift, round(float(n.quarterLength) * 4)
            if length <= 0:  # grace notes
                continue
            pitch = max(p.midi for p in n.pitches)
            notes.append((start, length, pitch))
            end = max(end, start + length)
        events.append(notes)
    total = -(-end // steps_per_bar) * steps_per_bar
    grid = np.zeros((total, len(parts)), dtype=np.int16)
    for v, notes in enumerate(events):
        for start, length, pitch in notes:
            grid[start:start + length, v] = pitch
            grid[start, v] = pitch + ONSET
    return grid


def grid_to_score(grid: np.ndarray, steps_per_bar: int = 16) -> Any:
    """An event grid ``(T, V)`` -> a music21 score with one part per voice (piano), in 4/4 for 16 steps."""
    m21 = _music21()
    score = m21.stream.Score()
    quarters = steps_per_bar / STEPS_PER_QUARTER
    for v in range(grid.shape[1]):
        part = m21.stream.Part()
        part.insert(0, m21.meter.TimeSignature(f"{round(quarters)}/4" if quarters == int(quarters)
                                               else f"{steps_per_bar}/16"))
        at = 0  # explicit rests keep every voice (even an empty one) the grid's length in MusicXML
        for start, length, pitch in [*grid_notes(grid[:, v]), (len(grid), 0, 0)]:
            if start > at:
                part.insert(at / STEPS_PER_QUARTER, m21.note.Rest(quarterLength=(start - at) / STEPS_PER_QUARTER))
            if length:
                part.insert(start / STEPS_PER_QUARTER,
                            m21.note.Note(midi=pitch, quarterLength=length / STEPS_PER_QUARTER))
            at = start + length
        score.insert(0, part)
    return score


def grid_notes(column: np.ndarray) -> list[tuple[int, int, int]]:
    """One voice's events -> ``(start, length, pitch)`` notes; a held pitch without an onset starts a note too."""
    notes: list[tuple[int, int, int]] = []
    for t, event in enumerate(int(e) for e in column):
        pitch = event % ONSET
        if pitch == 0:
            continue
        if event >= ONSET or not notes or notes[-1][0] + notes[-1][1] != t or notes[-1][2] != pitch:
            notes.append((t, 1, pitch))
        else:
            notes[-1] = (notes[-1][0], notes[-1][1] + 1, pitch)
    return notes


def write_midi(grid: np.ndarray, path: str | os.PathLike, steps_per_bar: int = 16) -> Path:
    """The grid as a Standard MIDI file (one track per voice), written atomically."""
    from data.atomic import atomic_write

    data = _music21().midi.translate.streamToMidiFile(grid_to_score(grid, steps_per_bar)).writestr()
    return atomic_write(path, lambda f: f.write(data))


def write_musicxml(grid: np.ndarray, path: str | os.PathLike, steps_per_bar: int = 16) -> Path:
    """The grid as MusicXML, atomically: unlike MIDI it keeps empty voices and trailing rests (whole bars)."""
    from data.atomic import atomic_write

    exporter = _music21().musicxml.m21ToXml.GeneralObjectExporter(grid_to_score(grid, steps_per_bar))
    data = exporter.parse()
    return atomic_write(path, lambda f: f.write(data))


def parse_file(path: str | os.PathLike, steps_per_bar: int | None = None) -> np.ndarray:
    """Any file music21 reads (``.mid``, ``.musicxml``, ...) -> event grid."""
    return score_to_grid(_music21().converter.parse(str(path)), steps_per_bar)


# ------------------------------------------------------------------------------------------- tokens
def grid_to_tokens(grid: np.ndarray) -> np.ndarray:
    """Event grid ``(T, V)`` -> tokens ``(V, T)`` uint8 (pitches outside LOW..HIGH are an error)."""
    pitch, onset = grid % ONSET, grid >= ONSET
    sounding = pitch > 0
    if sounding.any() and (pitch[sounding].min() < LOW or pitch[sounding].max() > HIGH):
        raise ValueError(f"pitches {pitch[sounding].min()}..{pitch[sounding].max()} leave the range {LOW}..{HIGH}")
    tokens = np.where(onset, 2 + pitch - LOW, np.where(sounding, HOLD, REST))
    return tokens.T.astype(np.uint8)


def tokens_to_grid(tokens: np.ndarray) -> np.ndarray:
    """Tokens ``(V, T)`` -> event grid ``(T, V)``; a HOLD after a rest is read as a rest."""
    tokens = np.asarray(tokens).T
    grid = np.zeros(tokens.shape, dtype=np.int16)
    current = np.zeros(tokens.shape[1], dtype=np.int16)
    for t, row in enumerate(tokens):
        onset = row >= 2
        current = np.where(onset, row.astype(np.int16) - 2 + LOW, np.where(row == HOLD, current, 0))
        grid[t] = np.where(onset, current + ONSET, current)
    return grid


def transposed(grid: np.ndarray, semitones: int) -> np.ndarray:
    pitch = grid % ONSET
    return np.where(pitch > 0, grid + semitones, grid).astype(np.int16)


def allowed_transpositions(grid: np.ndarray, lows: np.ndarray, highs: np.ndarray) -> list[int]:
    """The shifts in -6..+5 that keep every voice's notes within ``lows[v]..highs[v]``."""
    pitch = grid % ONSET
    keep = []
    for s in range(-6, 6):
        ok = all(not (pitch[:, v] > 0).any() or (pitch[:, v][pitch[:, v] > 0].min() + s >= lows[v]
                                                  and pitch[:, v][pitch[:, v] > 0].max() + s <= highs[v])
                 for v in range(grid.shape[1]))
        if ok:
            keep.append(s)
    return keep


def voice_ranges(grids: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Per voice, the lowest and highest pitch over all ``grids``."""
    pitch = np.concatenate(grids) % ONSET
    lows = np.array([pitch[:, v][pitch[:, v] > 0].min() for v in range(pitch.shape[1])])
    highs = np.array([pitch[:, v][pitch[:, v] > 0].max() for v in range(pitch.shape[1])])
    return lows, highs


def one_hot(tokens: torch.Tensor) -> torch.Tensor:
    """``(B, V, T)`` tokens -> ``(B, V * K, T)`` float one-hot (the tokenizer's input)."""
    b, v, t = tokens.shape
    x = torch.nn.functional.one_hot(tokens.long(), NUM_CLASSES).permute(0, 1, 3, 2)
    return x.reshape(b, v * NUM_CLASSES, t).float()


def decode_tokens(x: torch.Tensor, voices: int) -> torch.Tensor:
    """``(B, V * K, T)`` one-hot or logits -> ``(B, V, T)`` tokens (the argmax per voice and step)."""
    b, _, t = x.shape
    return x.reshape(b, voices, -1, t).argmax(2)


# ---------------------------------------------------------------------------------------------- keys
def key_profiles() -> np.ndarray:
    """``(2, 12)`` major and minor key profiles of music21's default key analysis (``analyze('key')``)."""
    analysis = _music21().analysis.discrete
    method = analysis.analysisClassFromMethodName("key")()
    return np.array([method.getWeights(mode) for mode in MODES], dtype=np.float64)


def estimate_key(grid: np.ndarray, profiles: np.ndarray | None = None) -> tuple[int, int]:
    """``(tonic pitch class, mode)`` (mode 0 major, 1 minor) of a grid, as music21 finds a key: the
    Pearson correlation of the duration-weighted pitch-class histogram (sounding 16th steps here)
    with each of the 24 rotated key profiles, the best one wins. A grid without notes is C major."""
    profiles = key_profiles() if profiles is None else profiles
    pitch = grid % ONSET
    histogram = np.bincount(pitch[pitch > 0] % 12, minlength=12).astype(np.float64)
    if not histogram.any():
        return 0, 0
    best, choice = -np.inf, (0, 0)
    h = histogram - histogram.mean()
    for mode, profile in enumerate(profiles):
        for tonic in range(12):
            w = np.roll(profile, tonic) - profile.mean()  # the profile's tonic on pitch class `tonic`
            r = float(h @ w / np.sqrt((h @ h) * (w @ w)))
            if r > best:
                best, choice = r, (tonic, mode)
    return choice


# -------------------------------------------------------------------------------------------- corpus
def folk_sources(time_signature: str = "4/4") -> list[str]:
    """The Essen tunes in ``time_signature`` as ``"<abc file>#<index in file>"`` (read from the
    ``M:`` headers of music21's ``essenFolksong`` corpus, without parsing a tune)."""
    files = sorted(str(p) for p in _music21().corpus.getCorePaths(fileExtensions=("abc",))
                   if "essenFolksong" in Path(p).parts)
    sources = []
    for path in files:
        for i, tune in enumerate(_abc_tunes(path)):
            metre = next((line[2:].strip() for line in tune.splitlines() if line.startswith("M:")), None)
            if metre == time_signature:
                sources.append(f"{path}#{i}")
    return sources


def _abc_tunes(path: str) -> list[str]:
    """The tunes of an ``.abc`` file (each starts at an ``X:`` line)."""
    text = Path(path).read_text(encoding="utf-8")
    return [chunk for chunk in re.split(r"(?m)^(?=X:)", text) if chunk.startswith("X:")]


def _parse_folk(source: str, time_signature: str, tunes: dict[str, list[str]]) -> np.ndarray | None:
    path, index = source.rsplit("#", 1)
    if path not in tunes:
        tunes[path] = _abc_tunes(path)
    score = _music21().converter.parse(tunes[path][int(index)], format="abc")
    signatures = {ts.ratioString for ts in score.recurse().getElementsByClass("TimeSignature")}
    if signatures != {time_signature} or len(score.parts) > 1:
        return None
    return score_to_grid(score)


def chorale_sources() -> list[str]:
    """music21's chorale files (all of them; the filter on parts and metre happens when parsing)."""
    return [str(p) for p in _music21().corpus.chorales.Iterator(returnType="filename")]


def _parse_chorale(name: str, voices: int, time_signature: str) -> np.ndarray | None:
    m21 = _music21()
    score = m21.corpus.parse(name)
    signatures = {ts.ratioString for ts in score.recurse().getElementsByClass("TimeSignature")}
    if len(score.parts) != voices or signatures != {time_signature}:
        return None
    return score_to_grid(score)


def load_pieces(dataset: str, root: str | None = None, voices: int = 4, time_signature: str = "4/4",
                limit_pieces: int | None = None, cache_dir: str | None = None) -> list[np.ndarray]:
    """The event grids of a corpus, parsed once and cached as two arrays (events stacked, lengths)."""
    if dataset == "chorales" and voices == 1:  # the melodies: the soprano of the four-part chorales' cache
        return [g[:, :1] for g in load_pieces(dataset, root, 4, time_signature, limit_pieces, cache_dir)]
    if dataset == "chorales":
        sources = chorale_sources()[:limit_pieces]
        stamp: Any = {"music21": _music21().__version__}
        parse = lambda s: _parse_chorale(s, voices, time_signature)  # noqa: E731
    elif dataset == "folk":
        if voices != 1:
            raise ValueError(f"the Essen folk songs are monophonic: use voices: 1, not {voices}")
        sources = folk_sources(time_signature)[:limit_pieces]
        stamp = {"music21": _music21().__version__}
        tunes: dict[str, list[str]] = {}
        parse = lambda s: _parse_folk(s, time_signature, tunes)  # noqa: E731
    elif dataset == "folder":
        if root is None or not Path(root).is_dir():
            raise FileNotFoundError(f"music folder {root!r} does not exist (dataset 'folder' needs data.params.root)")
        sources = sorted(str(p) for p in Path(root).rglob("*") if p.suffix.lower() in MUSIC_SUFFIXES)[:limit_pieces]
        if not sources:
            raise FileNotFoundError(f"no {'/'.join(MUSIC_SUFFIXES)} files under {root}")
        stamp = [source_stamp(s) for s in sources]
        parse = lambda s: parse_file(s)  # noqa: E731
    else:
        raise ValueError(f"unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)}")
    params = {"dataset": dataset, "sources": sources, "stamp": stamp, "voices": voices,
              "time_signature": time_signature, "format": 1}
    parsed: dict[str, list[np.ndarray]] = {}

    def build() -> list[np.ndarray]:
        if "grids" not in parsed:
            from tqdm import tqdm

            grids = [parse(s) for s in tqdm(sources, desc=f"parsing {dataset}", unit="piece", disable=None)]
            parsed["grids"] = [g for g in grids if g is not None and g.shape[1] == voices and len(g)
                               and _in_token_range(g)]
        return parsed["grids"]

    key = cache_key(params)
    lengths = cached_array(f"music-lengths-{key}", params,
                           lambda: np.array([len(g) for g in build()] or [0], dtype=np.int64), cache_dir)
    events = cached_array(f"music-events-{key}", params,
                          lambda: np.concatenate(build()) if build() else np.zeros((0, voices), np.int16), cache_dir)
    bounds = np.cumsum(np.concatenate([[0], lengths]))
    return [events[a:b] for a, b in zip(bounds[:-1], bounds[1:]) if b > a]


def _in_token_range(grid: np.ndarray) -> bool:
    pitch = grid % ONSET
    return not (pitch > 0).any() or (pitch[pitch > 0].min() >= LOW and pitch.max() <= HIGH)


def windows(grid: np.ndarray, bars: int, steps_per_bar: int, hop_bars: int) -> list[np.ndarray]:
    """Windows of ``bars`` whole bars every ``hop_bars`` bars (a piece shorter than one window is dropped)."""
    size, hop = bars * steps_per_bar, hop_bars * steps_per_bar
    return [grid[s:s + size] for s in range(0, len(grid) - size + 1, hop)]


class MusicDataModule(SplitDataModule):
    """Windows of ``bars`` bars (``steps_per_bar`` 16th-note steps each) of ``voices``-voice pieces.

    Batches: ``{"x": float (B, voices * NUM_CLASSES, bars * steps_per_bar)}`` one-hot tokens, and
    ``"label"`` (int64) unless ``label: none``. ``dataset`` is one name or a list of names (their
    pieces pooled; ``label: corpus`` tells them apart). Pieces are split train/val by a seeded
    permutation (``val_fraction``); only training windows are transposed (``transpose: true``), to
    every key that keeps each voice in its training range (a ``key`` label moves with them).
    """

    def __init__(self, dataset: str | Sequence[str] = "chorales", root: str | None = None, voices: int = 4,
                 bars: int = 8, steps_per_bar: int = 16, hop_bars: int = 4, time_signature: str = "4/4",
                 transpose: bool = True, label: str = "none", val_fraction: float = 0.1,
                 limit_pieces: int | None = None, batch_size: int = 64, num_workers: int = 0, seed: int = 0,
                 limit_train: int | None = None, limit_val: int | None = None, cache_dir: str | None = None) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.datasets = [dataset] if isinstance(dataset, str) else [str(d) for d in dataset]
        unknown = [d for d in self.datasets if d not in DATASETS]
        if unknown or not self.datasets:
            raise ValueError(f"unknown dataset {unknown or dataset!r}; choose from {', '.join(DATASETS)}")
        if label not in LABELS:
            raise ValueError(f"unknown label {label!r}; choose one of {', '.join(LABELS)}")
        if label == "corpus" and len(self.datasets) < 2:
            raise ValueError("label: corpus needs several datasets, e.g. dataset: [chorales, folk]")
        self.dataset, self.root, self.voices, self.bars = dataset, root, voices, bars
        self.steps_per_bar, self.hop_bars, self.time_signature = steps_per_bar, hop_bars, time_signature
        self.transpose, self.val_fraction, self.limit_pieces = transpose, val_fraction, limit_pieces
        self.batch_size, self.num_workers, self.seed, self.cache_dir = batch_size, num_workers, seed, cache_dir
        self.label = label
        self.limits = {"train": limit_train, "val": limit_val}
        self.class_names: list[str] | None = {"none": None, "key": list(KEY_NAMES), "mode": list(MODES),
                                              "corpus": self.datasets}[label]
        self.channels, self.length = voices * NUM_CLASSES, bars * steps_per_bar
        self.num_classes = None if self.class_names is None else len(self.class_names)
        self.pieces: dict[str, list[np.ndarray]] = {}
        self.piece_labels: dict[str, list[int]] = {}

    def _label(self, piece: np.ndarray, corpus: int, profiles: np.ndarray | None) -> int:
        if self.label == "corpus":
            return corpus
        if self.label in ("key", "mode"):
            tonic, mode = estimate_key(piece, profiles)
            return mode if self.label == "mode" else 12 * mode + tonic
        return -1

    def setup(self, stage: str | None = None) -> None:
        if self._splits:
            return
        pieces, corpora = [], []
        for corpus, name in enumerate(self.datasets):
            found = load_pieces(name, self.root, self.voices, self.time_signature, self.limit_pieces, self.cache_dir)
            pieces += found
            corpora += [corpus] * len(found)
        if len(pieces) < 2:
            raise ValueError(f"{self.dataset} gave {len(pieces)} usable pieces; need at least 2 to split by piece")
        profiles = key_profiles() if self.label in ("key", "mode") else None
        labels = [self._label(p, c, profiles) for p, c in zip(pieces, corpora)]
        perm = np.random.default_rng(self.seed).permutation(len(pieces))
        n_val = min(max(round(len(pieces) * self.val_fraction), 1), len(pieces) - 1)
        chosen = {"train": sorted(perm[n_val:]), "val": sorted(perm[:n_val])}
        self.pieces = {split: [pieces[i] for i in idx] for split, idx in chosen.items()}
        self.piece_labels = {split: [labels[i] for i in idx] for split, idx in chosen.items()}
        self.ranges = voice_ranges(self.pieces["train"])
        for salt, split in enumerate(("train", "val"), start=1):
            items, item_labels = [], []
            for piece, label in zip(self.pieces[split], self.piece_labels[split]):
                for window in windows(piece, self.bars, self.steps_per_bar, self.hop_bars):
                    shifts = allowed_transpositions(window, *self.ranges) if split == "train" and self.transpose \
                        else [0]
                    for s in shifts or [0]:
                        items.append(grid_to_tokens(transposed(window, s)))
                        # a key moves with the notes; its mode, and the corpus, do not
                        item_labels.append(12 * (label // 12) + (label + s) % 12 if self.label == "key" else label)
            tokens = torch.from_numpy(np.stack(items)) if items else torch.zeros(0, self.voices, self.length,
                                                                                  dtype=torch.uint8)
            targets = None if self.class_names is None else torch.tensor(item_labels, dtype=torch.int64)
            keep = seeded_subset(torch.arange(len(tokens)), self.limits[split], self.seed * 1_000_003 + salt)
            self._splits[split] = SplitDataset(tokens, targets, keep)

    def collate(self, augment: bool):
        def to_one_hot(batch):
            from data.split import stack_items

            batch = dict(stack_items(batch))
            batch["x"] = one_hot(batch["x"])
            return batch

        return to_one_hot
