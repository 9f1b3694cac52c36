"""Train the domain classifier whose features give FID where Inception weights are absent.

    python scripts/train_domain_classifier.py --dataset fashion_mnist --out runs/domain/fashion_mnist.pt --epochs 2

Prints the test accuracy and writes the checkpoint atomically; ``metrics.fid.domain_fid(path)``
(or ``make_fid("domain", checkpoint=path)``) then reports FID as "domain classifier <dataset> (<path>)".
"""

from __future__ import annotations

import argparse
import time

import _checkout  # noqa: F401  (first: this checkout's packages, the stdlib's tokenize)
import numpy as np
import torch

from metrics.domain_classifier import train_domain_classifier


def load_split(dataset: str, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images ``(N, C, H, W)`` and int64 labels ``(N,)`` of a labelled built-in dataset."""
    if dataset == "fashion_mnist":
        from data.fashion_mnist import FashionMNIST

        ds = FashionMNIST(split=split)
    else:
        raise SystemExit(f"unknown dataset {dataset!r}; supported: fashion_mnist")
    images = torch.from_numpy(np.ascontiguousarray(ds.images)).permute(0, 3, 1, 2).contiguous()
    return images, torch.from_numpy(np.asarray(ds.labels, dtype=np.int64))


def main(argv: list[str] | None = None) -> float:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="fashion_mnist")
    parser.add_argument("--out", required=True, help="checkpoint path (.pt)")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)

    train_x, train_y = load_split(args.dataset, "train")
    test_x, test_y = load_split(args.dataset, "test")
    start = time.perf_counter()
    model, acc = train_domain_classifier(
        train_x, train_y, test_x, test_y,
        width=args.width, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
        seed=args.seed, dataset=args.dataset, device=args.device, log=print,
    )
    path = model.cpu().save(args.out, test_accuracy=acc)
    print(f"{args.dataset}: test accuracy {acc:.4f} in {time.perf_counter() - start:.1f} s -> {path}")
    return acc


if __name__ == "__main__":
    main()
