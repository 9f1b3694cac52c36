"""``chorales_audio``: music21's Bach chorales rendered to real instrument audio by Debian's ``fluidsynth``.

Each chorale's event grid (``data.music.load_pieces("chorales")``, parsed once and cached) is written
to MIDI by music21 at its default 120 quarter notes per minute (a 16th-note step lasts 0.125 s) and
rendered by ``fluidsynth -ni -g GAIN -r RATE -F out.wav SOUNDFONT in.mid`` with the General MIDI
soundfont of ``fluid-soundfont-gm`` (program 0: acoustic grand piano). To load the 140 MB soundfont
once per batch rather than once per piece, ``pieces_per_render`` chorales are concatenated into one
MIDI file with a bar of rests between them and cut apart again at the known step offsets (the bar of
rests holds each piece's release tail). Each piece is mixed to mono, trimmed of leading/trailing
silence, peak-normalised to 0.9 and cut into ``clip_seconds`` clips; a last clip of at least half
that length is kept and padded, its true length recorded.

The clips are one float32 array ``[length, piece, audio...]`` per row, cached under the cache folder
keyed by every parameter, the fluidsynth version and the soundfont's path/size/mtime, written
atomically. Clips carry no class (``num_classes`` is None): a prior over them is unconditional.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from data.cache import cached_array, source_stamp
from data.errors import missing_data

FLUIDSYNTH_INSTALL = "apt-get install -y fluidsynth fluid-soundfont-gm"
DEFAULT_SOUNDFONT = "/usr/share/sounds/sf2/FluidR3_GM.sf2"
STEP_SECONDS = 0.125  # a 16th note at music21's default tempo (120 quarter notes per minute)
GAP_STEPS = 16  # one 4/4 bar of rests between concatenated pieces: room for the release tail


def find_fluidsynth(root: str | None = None) -> str:
    """The ``fluidsynth`` executable: in folder ``root`` if given, else on ``PATH``; a clear error otherwise."""
    what = "the fluidsynth MIDI synthesizer (chorales_audio is rendered with it)"
    if root is not None:
        exe = Path(root).expanduser() / "fluidsynth"
        if exe.is_file():
            return str(exe)
        raise missing_data(what, exe, FLUIDSYNTH_INSTALL)
    exe = shutil.which("fluidsynth")
    if exe is None:
        raise missing_data(what, "PATH", FLUIDSYNTH_INSTALL)
    return exe


def find_soundfont(path: str | None = None) -> str:
    """The General MIDI soundfont file (default: fluid-soundfont-gm's FluidR3_GM.sf2); a clear error if absent."""
    sf2 = Path(path or DEFAULT_SOUNDFONT).expanduser()
    if not sf2.is_file():
        raise missing_data("the General MIDI soundfont (FluidR3_GM.sf2, chorales_audio is rendered with it)", sf2,
                           FLUIDSYNTH_INSTALL, root_param="data.params.soundfont")
    return str(sf2)


def render_midi(exe: str, soundfont: str, midi: Path, sample_rate: int, gain: float) -> np.ndarray:
    """One MIDI file -> mono float32 at ``sample_rate`` (fluidsynth writes stereo 16-bit WAV)."""
    import soundfile

    wav = midi.with_suffix(".wav")
    cmd = [exe, "-ni", "-q", "-g", str(gain), "-r", str(sample_rate), "-F", str(wav), soundfont, str(midi)]
    subprocess.run(cmd, capture_output=True, check=True, timeout=1800)
    audio, rate = soundfile.read(wav, dtype="float32", always_2d=True)
    if rate != sample_rate:
        raise RuntimeError(f"{exe} wrote {rate} Hz audio although -r {sample_rate} was asked for")
    return audio.mean(axis=1)


def chorale_audio_clips(num_pieces: int | None = None, sample_rate: int = 16000, clip_seconds: float = 1.0,
                        gain: float = 0.6, pieces_per_render: int = 16, root: str | None = None,
                        soundfont: str | None = None, cache_dir: str | None = None,
                        progress: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(audio (N, L) float32, lengths (N,), piece index (N,))``: the first ``num_pieces`` 4-part 4/4
    chorales rendered and cut into clips of ``clip_seconds`` (see the module docstring)."""
    from data.audio import trim_silence
    from data.music import load_pieces, write_midi

    exe, sf2 = find_fluidsynth(root), find_soundfont(soundfont)
    version = subprocess.run([exe, "--version"], capture_output=True, text=True).stdout.strip().splitlines()[:1]
    grids = load_pieces("chorales", limit_pieces=num_pieces, cache_dir=cache_dir)
    clip = int(round(clip_seconds * sample_rate))
    params = {"pieces": [len(g) for g in grids], "num_pieces": num_pieces, "rate": sample_rate, "clip": clip,
              "gain": gain, "fluidsynth": version, "soundfont": source_stamp(sf2), "step": STEP_SECONDS,
              "gap": GAP_STEPS, "format": 1}

    def build() -> np.ndarray:
        from tqdm import tqdm

        rows: list[np.ndarray] = []
        batches = [list(range(i, min(i + pieces_per_render, len(grids)))) for i in range(0, len(grids),
                                                                                          pieces_per_render)]
        for batch in tqdm(batches, desc=f"rendering {len(grids)} chorales with fluidsynth", unit="batch",
                          disable=not progress):
            voices = grids[batch[0]].shape[1]
            gap = np.zeros((GAP_STEPS, voices), dtype=grids[batch[0]].dtype)
            starts = np.cumsum([0] + [len(grids[i]) + GAP_STEPS for i in batch])
            with tempfile.TemporaryDirectory(prefix="chorales_audio-") as tmp:
                midi = write_midi(np.concatenate([part for i in batch for part in (grids[i], gap)]),
                                  Path(tmp) / "batch.mid")
                audio = render_midi(exe, sf2, midi, sample_rate, gain)
            step = STEP_SECONDS * sample_rate
            for k, piece in enumerate(batch):
                x = trim_silence(audio[int(starts[k] * step): int(starts[k + 1] * step)])
                if not len(x):
                    continue
                x = 0.9 * x / max(float(np.abs(x).max()), 1e-8)
                for at in range(0, len(x), clip):
                    part = x[at: at + clip]
                    if len(part) < clip // 2:  # a short tail: mostly padding, dropped
                        break
                    row = np.zeros(2 + clip, dtype=np.float32)
                    row[:2] = (len(part), piece)
                    row[2: 2 + len(part)] = part
                    rows.append(row)
        return np.stack(rows) if rows else np.zeros((0, 2 + clip), dtype=np.float32)

    rows = cached_array("chorales_audio", params, build, cache_dir)
    meta = rows[:, :2].astype(np.int64)
    return rows[:, 2:], meta[:, 0], meta[:, 1]
