"""Train the spoken-digit classifier whose features and accuracy score generated audio.

    python scripts/train_audio_classifier.py --out runs/audio_classifier/spoken_digits.pt --epochs 5

Trains on the train voices of ``spoken_digits``, prints the accuracy on the held-out voices and writes the
checkpoint atomically; ``python scripts/evaluate.py PRIOR.ckpt --classifier PATH`` then reports
"digit classifier FD" and per-class accuracy of the samples (see ``metrics.audio_classifier``).
"""

from __future__ import annotations

import argparse

import _checkout  # noqa: F401  (first: this checkout's packages)
import torch

from data.audio import AudioDataModule
from metrics.audio_classifier import accuracy, train_digit_classifier


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--num-voices", type=int, default=48)
    p.add_argument("--num-val-voices", type=int, default=6)
    p.add_argument("--sample-rate", type=int, default=16000)
    args = p.parse_args()
    dm = AudioDataModule(sample_rate=args.sample_rate, num_voices=args.num_voices, num_val_voices=args.num_val_voices,
                         speeds=(140, 175, 210), pitches=(35, 50, 65))
    dm.setup()
    splits = {s: dm.split_dataset(s)[list(range(len(dm.split_dataset(s))))] for s in ("train", "val")}
    model = train_digit_classifier(splits["train"]["x"], splits["train"]["label"], args.sample_rate, args.epochs)
    acc = accuracy(model, splits["val"]["x"], splits["val"]["label"])
    print(f"held-out-voice accuracy: {acc:.3f}")
    print(f"wrote {model.save(args.out, val_accuracy=acc)}")


if __name__ == "__main__":
    torch.set_num_threads(max(1, torch.get_num_threads()))
    main()
