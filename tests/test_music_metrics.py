"""metrics/music.py on hand-made grids: parallel fifths/octaves, range violations, pitch-class distance."""

from __future__ import annotations

import numpy as np
import pytest

from metrics.music import (
    ONSET,
    SATB_RANGES,
    note_density,
    parallel_fraction,
    pitch_class_distance,
    pitch_class_histogram,
    range_violations,
    voice_range_violations,
)


def voices(*parts: list[int], step: int = 4) -> np.ndarray:
    """Voices of equal-length notes (``step`` 16ths each, 0 = rest), top voice first; onsets marked."""
    grid = np.zeros((len(parts[0]) * step, len(parts)), dtype=np.int16)
    for v, notes in enumerate(parts):
        for i, pitch in enumerate(notes):
            if pitch:
                grid[i * step:(i + 1) * step, v] = pitch
                grid[i * step, v] = pitch + ONSET
    return grid


def test_onset_marker_is_the_data_packages():
    from data.music import ONSET as DATA_ONSET

    assert ONSET == DATA_ONSET


def test_parallel_fifths_and_octaves_are_found():
    # G4/C4 -> A4/D4 -> B4/E4: two parallel fifths in a row
    assert parallel_fraction([voices([67, 69, 71], [60, 62, 64])]) == (1.0, 2)
    # C5/C4 -> D5/D4: parallel octaves; a twelfth (G5/C4 -> A5/D4) is a compound fifth
    assert parallel_fraction([voices([72, 74], [60, 62])]) == (1.0, 1)
    assert parallel_fraction([voices([79, 81], [60, 62])]) == (1.0, 1)
    # outer voices of three: S-B parallel fifths, S-A and A-B thirds moving in parallel (not perfect)
    three = voices([67, 69], [64, 65], [60, 62])
    assert parallel_fraction([three]) == pytest.approx((1 / 3, 3))


def test_good_voice_leading_has_no_parallels():
    # E4/C4 -> D4/B3 (similar, third to third), -> G4/C4 (similar, third into a fifth), then two
    # oblique moves (G4/C4 -> G4/E4 -> C5/E4): two similar motions, no parallel
    clean = voices([64, 62, 67, 67, 72], [60, 59, 60, 64, 64])
    assert parallel_fraction([clean]) == (0.0, 2)
    # "contrary fifths": D4/G3 -> G4/C3, a fifth to a twelfth with the voices moving apart
    assert parallel_fraction([voices([62, 67], [55, 48])]) == (0.0, 0)
    # a hidden (direct) fifth: similar motion from a sixth into a fifth is not a parallel fifth
    assert parallel_fraction([voices([69, 74], [60, 67])]) == (0.0, 1)
    # G4/C4 -> C5/F3: a fifth to a twelfth by contrary motion again
    assert parallel_fraction([voices([67, 72], [60, 53])]) == (0.0, 0)
    # a rest in one voice breaks the motion: nothing to count
    assert parallel_fraction([voices([67, 69], [60, 0])]) == (0.0, 0)
    # repeated notes (a new onset, same pitch) are not motion
    assert parallel_fraction([voices([67, 67], [60, 60])]) == (0.0, 0)


def test_range_violations_per_voice_and_overall():
    lows, highs = np.array([r[0] for r in SATB_RANGES]), np.array([r[1] for r in SATB_RANGES])
    # soprano A5 (81) out of C4-G5, alto inside, tenor B2 (47) out of C3-G4, bass inside (two notes)
    grid = voices([72, 81], [60, 62], [47, 55], [48, 43])
    assert voice_range_violations([grid], lows, highs).tolist() == [0.5, 0.0, 0.5, 0.0]
    assert range_violations([grid], lows, highs) == pytest.approx(2 / 8)
    held = voices([81, 0], [60, 0], [55, 0], [48, 0], step=8)  # one long note per voice: one onset each
    assert voice_range_violations([held], lows, highs).tolist() == [1.0, 0.0, 0.0, 0.0]
    silent = np.zeros((16, 4), np.int16)
    assert voice_range_violations([silent], lows, highs).tolist() == [0.0] * 4


def test_pitch_class_distance_is_zero_for_identical_sets_and_one_for_disjoint_ones():
    a = [voices([60, 62, 64, 65]), voices([67, 69])]
    assert pitch_class_distance(a, [g.copy() for g in a]) == 0.0
    octave_up = [np.where(g % ONSET > 0, g + 12, g) for g in a]  # same pitch classes
    assert pitch_class_distance(a, octave_up) == 0.0
    assert pitch_class_distance([voices([60])], [voices([61])]) == 1.0
    half = pitch_class_distance([voices([60, 62])], [voices([60, 64])])
    assert half == pytest.approx(0.5)
    assert pitch_class_histogram(a).sum() == pytest.approx(1.0)


def test_note_density_counts_onsets_per_voice_and_bar():
    grid = voices([60, 62, 64, 65], [48, 0, 0, 0])  # one bar of 16 steps: 4 + 1 onsets over 2 voices
    assert note_density([grid], 16) == pytest.approx(5 / 2)
