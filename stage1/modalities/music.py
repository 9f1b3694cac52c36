"""The ``music`` modality: windows of symbolic music as one-hot tokens ``(B, voices * classes, steps)``
(``data.music``: rest / hold / note-onset per voice and 16th-note step).

- Loss: none extra; tokenizers use ``rec_loss: cross_entropy`` over the token classes (the decoder
  emits logits, ``decode`` returns per-voice probabilities); every tensor here is read by its argmax.
- Files: one ``.mid`` and one ``.musicxml`` per sample (music21; MIDI cannot hold a silent voice or
  trailing rests, MusicXML keeps every voice and bar), ``piano_roll.png`` (voices in colours, bar lines), and
  a ``.wav`` per sample rendered by ``fluidsynth`` with the General MIDI soundfont when both are
  installed (otherwise ``NO_AUDIO.txt`` says what to install).
- Metrics: reconstruction token and note accuracy; for samples, against the real split: the
  pitch-class histogram distance, note density, voice-range violations and the fraction of
  parallel fifths/octaves between voice pairs (each also reported for the real data).
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from torch import Tensor

from data.atomic import atomic_write_text
from data.music import NUM_CLASSES, ONSET, decode_tokens, tokens_to_grid, write_midi, write_musicxml
from metrics.music import (  # noqa: F401  (re-exported: the modality's sample metrics live in metrics.music)
    note_density,
    parallel_fraction,
    pitch_class_histogram,
    range_violations,
    sample_statistics,
)
from stage1.modalities.base import Evaluator, Modality, save_figure_png

MAX_SHOWN = 8
MAX_RENDERED = 8
SOUNDFONT = Path("/usr/share/sounds/sf2/FluidR3_GM.sf2")
INSTALL_AUDIO = "apt-get install fluidsynth fluid-soundfont-gm"
VOICE_COLOURS = np.array([[0.85, 0.2, 0.2], [0.2, 0.6, 0.2], [0.2, 0.35, 0.85], [0.6, 0.3, 0.7],
                          [0.9, 0.6, 0.1], [0.1, 0.6, 0.7]])


def grids_of(x: Tensor, voices: int) -> list[np.ndarray]:
    """One-hot / probabilities / logits ``(B, voices * K, T)`` -> event grids ``(T, voices)``."""
    return [tokens_to_grid(t) for t in decode_tokens(x.detach().float().cpu(), voices).numpy()]


def plot_piano_rolls(grids: list[np.ndarray], path: str | Path, steps_per_bar: int = 16,
                     titles: list[str] | None = None) -> Path:
    """One piano roll per grid (pitch up, time right), each voice in its colour, onsets darker."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(grids)
    fig, axes = plt.subplots(n, 1, figsize=(8, 1.8 * n), squeeze=False)
    for i, (ax, grid) in enumerate(zip(axes[:, 0], grids)):
        pitch = grid % ONSET
        sounding = pitch[pitch > 0]
        lo, hi = (int(sounding.min()) - 2, int(sounding.max()) + 2) if sounding.size else (55, 75)
        image = np.ones((hi - lo + 1, len(grid), 3))
        for v in range(grid.shape[1]):
            t = np.nonzero(pitch[:, v])[0]
            colour = VOICE_COLOURS[v % len(VOICE_COLOURS)]
            shade = np.where(grid[t, v] >= ONSET, 0.7, 1.0)[:, None]  # onsets darker: repeated notes show
            image[pitch[t, v] - lo, t] = colour * shade
        ax.imshow(image, origin="lower", aspect="auto", interpolation="nearest", extent=(0, len(grid), lo, hi + 1))
        for bar in range(0, len(grid) + 1, steps_per_bar):
            ax.axvline(bar, color="0.7", lw=0.5)
        ax.set_yticks([])
        ax.set_xticks([])
        if titles:
            ax.set_title(titles[i], fontsize=7)
    return save_figure_png(fig, path)


def audio_renderer() -> tuple[str | None, str]:
    """The fluidsynth binary when it and the GM soundfont are installed, and a sentence saying so."""
    binary = shutil.which("fluidsynth")
    if binary and SOUNDFONT.is_file():
        return binary, f"WAVs rendered by fluidsynth with {SOUNDFONT}"
    return None, f"no WAVs: fluidsynth or {SOUNDFONT} is missing; install them with `{INSTALL_AUDIO}`"


def render_wav(midi: Path, wav: Path, binary: str, sample_rate: int = 22050) -> Path:
    tmp = wav.with_name(f".{wav.name}.tmp.wav")
    subprocess.run([binary, "-ni", "-g", "0.6", "-r", str(sample_rate), "-F", str(tmp), str(SOUNDFONT), str(midi)],
                   check=True, capture_output=True, timeout=120)
    tmp.replace(wav)
    return wav


class MusicReconstruction(Evaluator):
    """``token_accuracy`` over every (voice, step) cell and ``note_accuracy`` over the cells where the
    original sounds (the exact token: pitch onset or hold); the rest of the grid is easy to get right."""

    def __init__(self, voices: int) -> None:
        super().__init__()
        self.voices = voices
        self.correct = self.cells = self.note_correct = self.note_cells = 0
        self.notes = ["music: accuracies of the argmax token (rest / hold / pitch onset) per voice and 16th step"]

    def update(self, real: Tensor | None = None, fake: Tensor | None = None, labels: Tensor | None = None) -> None:
        r, f = decode_tokens(real.float().cpu(), self.voices), decode_tokens(fake.float().cpu(), self.voices)
        self.correct += int((r == f).sum())
        self.cells += r.numel()
        sounding = r != 0
        self.note_correct += int((r == f)[sounding].sum())
        self.note_cells += int(sounding.sum())

    def compute(self) -> dict[str, Any]:
        return {"token_accuracy": self.correct / max(self.cells, 1),
                "note_accuracy": self.note_correct / max(self.note_cells, 1)}


class MusicSamples(Evaluator):
    """Listen-free sample statistics against the real split (real ones reported beside as ``real_*``)."""

    def __init__(self, voices: int, steps_per_bar: int) -> None:
        super().__init__()
        self.voices, self.steps_per_bar = voices, steps_per_bar
        self.real: list[np.ndarray] = []
        self.fake: list[np.ndarray] = []
        self.notes = ["pitch_class_tv: total variation between sounding-step pitch-class histograms of samples and "
                      "real windows; note_density: onsets per voice per bar; range_violations: fraction of sample "
                      "notes outside the real data's per-voice range; parallel_fraction: parallel fifths/octaves "
                      "per similar motion of a voice pair"]

    def update(self, real: Tensor | None = None, fake: Tensor | None = None, labels: Tensor | None = None) -> None:
        if real is not None:
            self.real += grids_of(real, self.voices)
        if fake is not None:
            self.fake += grids_of(fake, self.voices)

    def compute(self) -> dict[str, Any]:
        return sample_statistics(self.real, self.fake, self.steps_per_bar)


class MusicModality(Modality):
    name = "music"
    datamodule = "data.music.MusicDataModule"

    def __init__(self, voices: int = 4, steps_per_bar: int = 16) -> None:
        self.voices, self.steps_per_bar = voices, steps_per_bar

    def for_spec(self, code_spec: Mapping[str, Any]) -> MusicModality:
        """Voices from the layout (``channels / classes``) and the bar length the layout records."""
        layout = code_spec.get("layout") or {}
        classes = int(layout.get("classes", NUM_CLASSES))
        voices = int(layout.get("voices", int(layout.get("channels", self.voices * classes)) // classes))
        return MusicModality(voices, int(layout.get("steps_per_bar", self.steps_per_bar)))

    def save_reconstructions(self, x: Tensor, xrec: Tensor, path: str | Path) -> Path:
        """Each input above its reconstruction."""
        real, fake = grids_of(x[:MAX_SHOWN // 2], self.voices), grids_of(xrec[:MAX_SHOWN // 2], self.voices)
        grids = [g for pair in zip(real, fake) for g in pair]
        titles = [t for i in range(len(real)) for t in (f"input {i}", f"reconstruction {i}")]
        return plot_piano_rolls(grids, path, self.steps_per_bar, titles)

    def save_preview(self, x: Tensor, path: str | Path, labels: Tensor | None = None) -> Path:
        titles = [f"class {int(c)}" for c in labels[:MAX_SHOWN]] if labels is not None else None
        return plot_piano_rolls(grids_of(x[:MAX_SHOWN], self.voices), path, self.steps_per_bar, titles)

    def write_samples(self, x: Tensor, out: Path, labels: Tensor | None = None) -> list[Path]:
        """``piano_roll.png`` (the first 8), ``sample_NNN.mid`` and ``.musicxml`` for all, ``sample_NNN.wav``
        for the first 8 when fluidsynth and the GM soundfont are installed (else ``NO_AUDIO.txt`` says
        what to install)."""
        out = Path(out)
        grids = grids_of(x, self.voices)
        files = [self.save_preview(x, out / "piano_roll.png", labels)]
        midis = [write_midi(g, out / f"sample_{i:03d}.mid", self.steps_per_bar) for i, g in enumerate(grids)]
        # MIDI drops silent voices and trailing rests; MusicXML keeps every voice and bar
        xmls = [write_musicxml(g, out / f"sample_{i:03d}.musicxml", self.steps_per_bar) for i, g in enumerate(grids)]
        binary, note = audio_renderer()
        if binary:
            files += [render_wav(m, m.with_suffix(".wav"), binary) for m in midis[:MAX_RENDERED]]
        else:
            files.append(atomic_write_text(out / "NO_AUDIO.txt", note + "\n"))
        return files + midis + xmls

    def reconstruction_evaluator(self, options: Mapping[str, Any]) -> MusicReconstruction:
        return MusicReconstruction(self.voices)

    def sample_evaluator(self, options: Mapping[str, Any]) -> MusicSamples:
        return MusicSamples(self.voices, self.steps_per_bar)


MODALITY = MusicModality()
