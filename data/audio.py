"""Audio: the built-in ``spoken_digits`` dataset, synthesised locally by Debian's ``espeak-ng``, and
``chorales_audio`` (Bach chorales rendered by ``fluidsynth``, see ``data.chorales_audio``).

Each clip is one word "zero".."nine" (its class) spoken by ``espeak-ng`` with an English voice and
one of its voice variants (``en-us+VARIANT``; ~100 ship with the package) at a speed and pitch from
small grids. espeak writes 22.05 kHz 16-bit WAV; clips are resampled to ``sample_rate`` with a
polyphase filter, trimmed of leading/trailing silence, peak-normalised to 0.9 and padded (or cut) to
``clip_seconds``. The whole set is one float32 array (audio, lengths and labels), cached under the cache
folder (``data.params.cache_dir``) keyed by every parameter and the espeak-ng version, written atomically.

Variable length: every item carries its true ``length`` in samples. Training batches are random
crops of ``crop`` samples taken inside each clip's voiced part (``crop: null`` keeps whole clips);
validation and tokenizing see whole padded clips with their lengths, so a decoder can cut its output
back to the original duration.

Splits are by voice: the validation voices are never heard in training, so reconstruction numbers
measure a codec on unseen speakers. ``chorales_audio`` splits by piece (the last ``num_val_pieces``
rendered chorales are validation) and has no labels.

Batches: ``{"x": float (B, 1, L) in [-1, 1], "label": long (B,), "length": long (B,)}``.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable
from math import gcd
from pathlib import Path

import numpy as np
import torch

from data.cache import cache_root, cached_array
from data.errors import missing_data
from data.split import SplitDataModule, SplitDataset, seeded_subset

DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
ESPEAK_RATE = 22050
DATASETS = ("spoken_digits", "chorales_audio")
ESPEAK_INSTALL = "apt-get install -y espeak-ng"


def find_espeak(root: str | None = None) -> str:
    """The ``espeak-ng`` executable: in ``root`` if given, else on ``PATH``; a clear error otherwise."""
    if root is not None:
        exe = Path(root).expanduser() / "espeak-ng"
        if exe.is_file():
            return str(exe)
        raise missing_data("the espeak-ng speech synthesizer (spoken_digits is generated with it)", exe,
                           ESPEAK_INSTALL)
    exe = shutil.which("espeak-ng")
    if exe is None:
        raise missing_data("the espeak-ng speech synthesizer (spoken_digits is generated with it)",
                           "PATH", ESPEAK_INSTALL)
    return exe


def espeak_variants(exe: str) -> list[str]:
    """The voice variants the installed espeak-ng ships (``!v/NAME`` files), sorted for stable seeds."""
    out = subprocess.run([exe, "--voices=variant"], capture_output=True, text=True, check=True).stdout
    names = [line.split()[4].split("/", 1)[1] for line in out.splitlines()[1:] if len(line.split()) >= 5
             and line.split()[4].startswith("!v/")]
    return sorted(set(names), key=str.lower)


def wav_bytes_to_array(data: bytes) -> np.ndarray:
    """Mono 16-bit PCM from espeak's streamed WAV (its header's sizes are placeholders, so read to the end)."""
    at = data.find(b"data")
    if data[:4] != b"RIFF" or at < 0:
        raise ValueError("espeak-ng did not return a WAV stream")
    pcm = data[at + 8:]
    return np.frombuffer(pcm[: len(pcm) // 2 * 2], dtype="<i2").astype(np.float32) / 32768.0


def speak(exe: str, word: str, variant: str, speed: int, pitch: int) -> np.ndarray:
    """One utterance at espeak's 22.05 kHz."""
    cmd = [exe, "--stdout", "-v", f"en-us+{variant}", "-s", str(speed), "-p", str(pitch), word]
    return wav_bytes_to_array(subprocess.run(cmd, capture_output=True, check=True).stdout)


def trim_silence(x: np.ndarray, threshold: float = 0.01) -> np.ndarray:
    """Cut leading and trailing samples whose magnitude stays below ``threshold`` of the peak."""
    loud = np.flatnonzero(np.abs(x) > threshold * max(np.abs(x).max(), 1e-8))
    return x[loud[0]: loud[-1] + 1] if len(loud) else x[:0]


def resample(x: np.ndarray, rate_in: int, rate_out: int) -> np.ndarray:
    if rate_in == rate_out:
        return x
    from scipy.signal import resample_poly

    g = gcd(rate_in, rate_out)
    return resample_poly(x, rate_out // g, rate_in // g).astype(np.float32)


def spoken_digit_clips(num_voices: int = 24, speeds: tuple[int, ...] = (150, 180, 210),
                       pitches: tuple[int, ...] = (35, 50, 65), sample_rate: int = 16000,
                       clip_seconds: float = 1.0, root: str | None = None,
                       cache_dir: str | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(audio (N, L) float32, lengths (N,), labels (N,), voice index (N,))`` for every voice x speed x
    pitch x digit, with the first ``num_voices`` variants (sorted by name); cached as arrays."""
    exe = find_espeak(root)
    variants = espeak_variants(exe)[:num_voices]
    if not variants:
        raise RuntimeError(f"{exe} lists no voice variants (--voices=variant); is espeak-ng-data installed?")
    version = subprocess.run([exe, "--version"], capture_output=True, text=True).stdout.strip()
    clip = int(round(clip_seconds * sample_rate))
    params = {"variants": variants, "speeds": list(speeds), "pitches": list(pitches), "rate": sample_rate,
              "clip": clip, "espeak": version, "format": 1}
    grid = [(v, s, p, d) for v in range(len(variants)) for s in speeds for p in pitches for d in range(10)]

    def build() -> np.ndarray:
        # One packed float32 array: columns [length, label, voice, audio...] (one cache file, one rename).
        rows = np.zeros((len(grid), 3 + clip), dtype=np.float32)
        for i, (v, s, p, d) in enumerate(grid):
            x = trim_silence(resample(speak(exe, DIGITS[d], variants[v], s, p), ESPEAK_RATE, sample_rate))[:clip]
            x = 0.9 * x / max(float(np.abs(x).max()), 1e-8)
            rows[i, :3] = (len(x), d, v)
            rows[i, 3: 3 + len(x)] = x
        return rows

    rows = cached_array("spoken_digits", params, build, cache_dir)
    meta = rows[:, :3].astype(np.int64)
    return rows[:, 3:], meta[:, 0], meta[:, 1], meta[:, 2]


class AudioSplitDataset(SplitDataset):
    """A split of mono clips ``(N, 1, L)`` that also hands out each clip's true ``length``."""

    def __init__(self, items: torch.Tensor, labels: torch.Tensor | None, lengths: torch.Tensor,
                 indices: torch.Tensor, with_index: bool = False) -> None:
        super().__init__(items, labels, indices, with_index)
        self.lengths = lengths

    def __getitems__(self, positions: list[int]) -> dict[str, torch.Tensor]:
        batch = super().__getitems__(positions)
        batch["length"] = self.lengths[self.indices[torch.as_tensor(positions, dtype=torch.long)]]
        return batch

    def view(self, with_index: bool) -> AudioSplitDataset:
        return AudioSplitDataset(self.items, self.labels, self.lengths, self.indices, with_index)


def random_crops(x: torch.Tensor, lengths: torch.Tensor, crop: int,
                 generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One ``crop``-sample window per clip, placed uniformly inside its voiced part (a clip shorter
    than ``crop`` starts at 0 and keeps its padding); returns the windows and their voiced lengths."""
    spare = (lengths - crop).clamp_min(0)
    start = (torch.rand(len(x), generator=generator) * (spare + 1).float()).long().clamp_max(spare)
    idx = start[:, None] + torch.arange(crop)
    windows = torch.gather(x, -1, idx[:, None].expand(-1, x.shape[1], -1))
    return windows, (lengths - start).clamp(0, crop)


class AudioDataModule(SplitDataModule):
    """Mono audio for the ``audio`` modality (``spoken_digits`` or ``chorales_audio``).

    ``spoken_digits``: ``num_val_voices`` of the ``num_voices`` variants are held out for validation.
    ``chorales_audio``: the first ``num_pieces`` music21 chorale files (``null``: all 371; those with
    4 parts in 4/4 are kept), the last ``num_val_pieces`` rendered pieces held out; ``soundfont`` is the
    GM soundfont (default: fluid-soundfont-gm's) and ``gain`` fluidsynth's output gain. ``crop``
    (samples) sets the training window; ``limit_train``/``limit_val`` keep seeded random subsets.
    ``root`` is the folder holding the ``espeak-ng`` / ``fluidsynth`` executable (default: found on
    ``PATH``), ``cache_dir`` the cache folder.
    """

    def __init__(self, dataset: str = "spoken_digits", sample_rate: int = 16000, clip_seconds: float = 1.0,
                 crop: int | None = 8000, num_voices: int = 24, num_val_voices: int = 4,
                 speeds: list[int] | tuple[int, ...] = (150, 180, 210),
                 pitches: list[int] | tuple[int, ...] = (35, 50, 65), root: str | None = None,
                 cache_dir: str | None = None, batch_size: int = 16, num_workers: int = 0, seed: int = 0,
                 limit_train: int | None = None, limit_val: int | None = None, num_pieces: int | None = None,
                 num_val_pieces: int = 2, soundfont: str | None = None, gain: float = 0.6) -> None:
        super().__init__()
        if dataset not in DATASETS:
            raise ValueError(f"unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)}")
        if dataset == "spoken_digits" and not 0 < num_val_voices < num_voices:
            raise ValueError(f"num_val_voices must be in 1..num_voices-1, got {num_val_voices} of {num_voices}")
        self.save_hyperparameters()
        self.dataset, self.sample_rate, self.clip_seconds, self.crop = dataset, sample_rate, clip_seconds, crop
        self.num_voices, self.num_val_voices = num_voices, num_val_voices
        self.speeds, self.pitches = tuple(int(s) for s in speeds), tuple(int(p) for p in pitches)
        self.root, self.cache_dir = root, cache_dir
        self.batch_size, self.num_workers, self.seed = batch_size, num_workers, seed
        self.limits = {"train": limit_train, "val": limit_val}
        self.num_pieces, self.num_val_pieces, self.soundfont, self.gain = num_pieces, num_val_pieces, soundfont, gain
        self.num_classes: int | None = len(DIGITS) if dataset == "spoken_digits" else None
        self.channels, self.length = 1, int(round(clip_seconds * sample_rate))

    @property
    def cache_folder(self) -> Path:
        return cache_root(self.cache_dir)

    def setup(self, stage: str | None = None) -> None:
        if self._splits:
            return
        if self.dataset == "chorales_audio":
            from data.chorales_audio import chorale_audio_clips

            audio, lengths, groups = chorale_audio_clips(self.num_pieces, self.sample_rate, self.clip_seconds,
                                                         self.gain, root=self.root, soundfont=self.soundfont,
                                                         cache_dir=self.cache_dir)
            labels_t, held_out = None, self.num_val_pieces
            if not 0 < held_out < len(np.unique(groups)):
                raise ValueError(f"num_val_pieces must be in 1..pieces-1, got {held_out} of "
                                 f"{len(np.unique(groups))} rendered pieces")
        else:
            audio, lengths, labels, groups = spoken_digit_clips(self.num_voices, self.speeds, self.pitches,
                                                                self.sample_rate, self.clip_seconds, self.root,
                                                                self.cache_dir)
            labels_t, held_out = torch.from_numpy(labels), self.num_val_voices
        items = torch.from_numpy(audio).unsqueeze(1)
        lengths_t = torch.from_numpy(lengths)
        # the last voices / pieces are held out: validation never hears a training speaker or piece
        last = np.unique(groups)[-held_out:]
        is_val = torch.from_numpy(np.isin(groups, last))
        for salt, (split, mask) in enumerate((("train", ~is_val), ("val", is_val)), start=1):
            keep = seeded_subset(torch.nonzero(mask).flatten(), self.limits[split], self.seed * 1_000_003 + salt)
            self._splits[split] = AudioSplitDataset(items, labels_t, lengths_t, keep)

    def collate(self, augment: bool) -> Callable:
        crop = self.crop if augment else None

        def convert(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            if isinstance(batch, list):
                batch = {k: torch.stack([b[k] for b in batch]) for k in batch[0]}
            if crop is not None and crop < batch["x"].shape[-1]:
                batch["x"], batch["length"] = random_crops(batch["x"], batch["length"], crop)
            return batch

        return convert
