"""Listen-free statistics of symbolic music, on event grids ``(T, V)`` (top voice first) as
``data.music`` makes them: ``0`` a rest, ``pitch`` a held note, ``pitch + ONSET`` a note onset, one
row per 16th-note step.

- :func:`pitch_class_histogram` / :func:`pitch_class_distance`: sounding steps per pitch class and the
  total-variation distance between two sets' histograms (0 for identical sets, 1 for disjoint ones).
- :func:`note_density`: onsets per voice per bar.
- :func:`range_violations` / :func:`voice_range_violations`: notes outside each voice's range, e.g.
  :data:`SATB_RANGES`, the textbook choir ranges.
- :func:`parallel_fraction`: parallel fifths and octaves per similar motion of a voice pair (Bach's
  chorales avoid them, so the data's rate is the reference a model should match, not zero).
"""

from __future__ import annotations

import numpy as np

ONSET = 128  # data.music.ONSET (metrics never import data): an event >= ONSET starts a note
# Soprano C4-G5, alto G3-D5, tenor C3-G4, bass E2-C4 as MIDI pitches (the common harmony-textbook
# ranges, e.g. Kostka & Payne); Bach's own voices step outside them now and then.
SATB_RANGES = ((60, 79), (55, 74), (48, 67), (40, 60))


def pitch_class_histogram(grids: list[np.ndarray]) -> np.ndarray:
    """Sounding steps per pitch class (C..B), normalised (durations weigh, as in key finding)."""
    counts = np.zeros(12)
    for g in grids:
        p = g % ONSET
        counts += np.bincount(p[p > 0] % 12, minlength=12)
    return counts / max(counts.sum(), 1)


def pitch_class_distance(real: list[np.ndarray], fake: list[np.ndarray]) -> float:
    """Total variation between the two sets' pitch-class histograms, in [0, 1]."""
    return 0.5 * float(np.abs(pitch_class_histogram(real) - pitch_class_histogram(fake)).sum())


def note_density(grids: list[np.ndarray], steps_per_bar: int) -> float:
    """Note onsets per voice per bar."""
    onsets = sum(int((g >= ONSET).sum()) for g in grids)
    bars_voices = sum(len(g) * g.shape[1] for g in grids) / steps_per_bar
    return onsets / max(bars_voices, 1)


def voice_range_violations(grids: list[np.ndarray], lows: np.ndarray, highs: np.ndarray) -> np.ndarray:
    """Per voice, the fraction of its notes (onsets) outside ``lows[v]..highs[v]`` (0 for a silent voice)."""
    lows, highs = np.asarray(lows), np.asarray(highs)
    outside, total = np.zeros(len(lows)), np.zeros(len(lows))
    for g in grids:
        for v in range(g.shape[1]):
            notes = g[:, v][g[:, v] >= ONSET] - ONSET
            outside[v] += int(((notes < lows[v]) | (notes > highs[v])).sum())
            total[v] += len(notes)
    return outside / np.maximum(total, 1)


def range_violations(grids: list[np.ndarray], lows: np.ndarray, highs: np.ndarray) -> float:
    """The fraction of all notes outside their voice's range (``lows[v]..highs[v]``)."""
    outside = total = 0
    for g in grids:
        for v in range(g.shape[1]):
            notes = g[:, v][g[:, v] >= ONSET] - ONSET
            outside += int(((notes < lows[v]) | (notes > highs[v])).sum())
            total += len(notes)
    return outside / max(total, 1)


def parallel_fraction(grids: list[np.ndarray]) -> tuple[float, int]:
    """Of the steps where two sounding voices both move in the same direction, the fraction that
    move from a perfect fifth or octave (interval mod 12 of 7 or 0) to the same interval class: the
    parallel fifths and octaves of voice-leading rules. Returns ``(fraction, similar-motion count)``.

    Motion into a fifth from another interval (a "hidden" fifth), contrary and oblique motion are
    not parallels; compound intervals count as their class (a twelfth is a fifth)."""
    parallels = moves = 0
    for g in grids:
        p = (g % ONSET).astype(np.int64)
        prev, cur = p[:-1], p[1:]
        for a in range(p.shape[1]):
            for b in range(a + 1, p.shape[1]):
                sounding = (prev[:, a] > 0) & (prev[:, b] > 0) & (cur[:, a] > 0) & (cur[:, b] > 0)
                da, db = cur[:, a] - prev[:, a], cur[:, b] - prev[:, b]
                similar = sounding & (da != 0) & (db != 0) & (np.sign(da) == np.sign(db))
                before, after = (prev[:, a] - prev[:, b]) % 12, (cur[:, a] - cur[:, b]) % 12
                perfect = similar & (before == after) & ((after == 7) | (after == 0))
                parallels += int(perfect.sum())
                moves += int(similar.sum())
    return parallels / max(moves, 1), moves


def sample_statistics(real: list[np.ndarray], fake: list[np.ndarray], steps_per_bar: int = 16) -> dict[str, float]:
    """Samples against real grids: pitch-class distance, note density (both), the fraction of sample
    notes outside the real data's per-voice range, and the parallel rate (both)."""
    if not real or not fake:
        return {}
    pitch = np.concatenate(real) % ONSET
    lows = np.array([pitch[:, v][pitch[:, v] > 0].min(initial=127) for v in range(pitch.shape[1])])
    highs = np.array([pitch[:, v][pitch[:, v] > 0].max(initial=0) for v in range(pitch.shape[1])])
    return {"pitch_class_tv": pitch_class_distance(real, fake),
            "note_density": note_density(fake, steps_per_bar), "real_note_density": note_density(real, steps_per_bar),
            "range_violations": range_violations(fake, lows, highs),
            "parallel_fraction": parallel_fraction(fake)[0], "real_parallel_fraction": parallel_fraction(real)[0]}
