"""Codebook collapse: one small conv VQ-VAE on Fashion-MNIST, trained with each quantizer.

    python bench/codebook_collapse.py --jobs 2         # default: 3 seeds x 1000 steps x batch 32, K=1024 and 16384
    python bench/codebook_collapse.py --quick          # a fast check: 1 seed, 25 steps, K=1024 only
    python bench/codebook_collapse.py --sizes 16384 --steps 500 --jobs 2 --out bench/results/collapse_16384.md

Sizing (one thread per run, quiet machine): a step at batch 32 takes ~0.01-0.05 s for most methods at
K=1024, 0.05-0.3 s at K=16384, and ~1.4 s for OptVQ (Sinkhorn over the N x K plan) and Gumbel
(N x K logits) at K=16384, which dominate. 200 steps is too short for the methods that work by
moving the whole codebook (SimVQ at 200 steps: 33% usage, at 1000: 93%), hence the 1000-step default.
``--jobs N`` runs N (method, seed) trainings at once, one thread each. ``--out`` is rewritten after
each row so a long run leaves a table.

Every method gets the same encoder/decoder (28x28 -> 7x7 grid of ``--dim`` channels -> 28x28), the
same optimiser (Adam, ``--lr``), batch, number of steps, data order and initialisation per seed; only
the quantizer differs, built from its class defaults plus the one feature the row is named for:

- ``vq``: plain VQ-VAE (van den Oord 2017): gradient codebook loss + beta commitment, random init;
- ``vq+kmeans+restart``, ``vq+rotation``, ``vq+entropy``: the same gradient VQ plus that feature alone
  (``+entropy``: the MAGVIT-v2 codebook entropy penalty at weight 0.1, class default temperature);
- ``ibq+entropy``: IBQ plus the same penalty (its reference code base ships it as ``use_entropy_loss``);
  with ``vq+entropy`` beside it, the table separates what index backpropagation adds from what the
  penalty adds;
- ``cvq``, ``simvq``, ``ibq``, ``optvq``, ``gumbel``: their classes' defaults;
- ``fsq``: levels [8,5,5,5] (1000 codes) for K=1024, [8,8,8,6,5] (15360) for K=16384;
- ``lfq``: 10 bits (1024) and 14 bits (16384), class defaults (MAGVIT-v2 entropy loss);
- ``residual``: 2 levels of plain VQ with K codes each (usage/perplexity: mean over the levels).

Reported on the full 10k test split, in eval mode: codebook usage (fraction of the K codes that
occur at least once), perplexity (exp of the entropy of the test code histogram) and reconstruction
MSE in [0, 1] pixel units; mean ± std over seeds, plus usage relative to plain VQ at the same K
measured in this same process. A quantizer whose module is missing is reported as skipped.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

torch.set_num_threads(2)

from data.fashion_mnist import DEFAULT_ROOT, read_idx  # noqa: E402
from layers.instantiate import ConfigError, instantiate  # noqa: E402
from stage1.quantizers.base import Quantizer  # noqa: E402

FSQ_LEVELS = {1024: [8, 5, 5, 5], 16384: [8, 8, 8, 6, 5]}
LFQ_BITS = {1024: 10, 16384: 14}
ENTROPY_WEIGHT = 0.1  # the same penalty weight for every "+entropy" row
Q = "stage1.quantizers."


def method_specs(k: int) -> dict[str, dict]:
    """Quantizer spec per method at (nearest) codebook size ``k``; ``dim`` is added by the model."""
    vq = Q + "vq.VectorQuantizer"
    plain = {"codebook_size": k, "codebook": "gradient"}
    return {
        "vq": {"target": vq, "params": plain},
        "vq+kmeans+restart": {"target": vq, "params": {**plain, "kmeans_init": True, "restart_dead": True}},
        "cvq": {"target": Q + "cvq.ClusteredVQ", "params": {"codebook_size": k}},
        "simvq": {"target": Q + "simvq.SimVQ", "params": {"codebook_size": k}},
        "vq+rotation": {"target": vq, "params": {**plain, "rotation_trick": True}},
        "vq+entropy": {"target": vq, "params": {**plain, "entropy_weight": ENTROPY_WEIGHT}},
        "ibq": {"target": Q + "ibq.IndexBackpropQuantizer", "params": {"codebook_size": k}},
        "ibq+entropy": {
            "target": Q + "ibq.IndexBackpropQuantizer",
            "params": {"codebook_size": k, "entropy_weight": ENTROPY_WEIGHT},
        },
        "optvq": {"target": Q + "optvq.OptVQ", "params": {"codebook_size": k}},
        "fsq": {"target": Q + "fsq.FSQ", "params": {"levels": FSQ_LEVELS[k]}},
        "lfq": {"target": Q + "lfq.LFQ", "params": {"bits": LFQ_BITS[k]}},
        "gumbel": {"target": Q + "gumbel.GumbelQuantizer", "params": {"codebook_size": k}},
        "residual": {
            "target": Q + "residual.ResidualQuantizer",
            "params": {"depth": 2, "quantizer": {"target": vq, "params": plain}},
        },
    }


class TinyVQVAE(nn.Module):
    """28x28x1 -> (dim, 7, 7) -> quantizer -> 28x28x1; small enough for CPU benchmarking."""

    def __init__(self, quantizer: dict, dim: int, width: int = 64) -> None:
        super().__init__()
        self.encoder = nn.Sequential(
            nn.Conv2d(1, width // 2, 4, 2, 1), nn.ReLU(),
            nn.Conv2d(width // 2, width, 4, 2, 1), nn.ReLU(),
            nn.Conv2d(width, width, 3, 1, 1), nn.ReLU(),
            nn.Conv2d(width, dim, 1),
        )  # fmt: skip
        self.quantizer: Quantizer = instantiate(quantizer, where="bench.quantizer", base=Quantizer, dim=dim)
        self.decoder = nn.Sequential(
            nn.Conv2d(dim, width, 3, 1, 1), nn.ReLU(),
            nn.ConvTranspose2d(width, width // 2, 4, 2, 1), nn.ReLU(),
            nn.ConvTranspose2d(width // 2, 1, 4, 2, 1),
        )  # fmt: skip

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        out = self.quantizer(self.encoder(x))
        return self.decoder(out.z_q), out.loss


def load_split(split: str) -> Tensor:
    prefix = {"train": "train", "test": "t10k"}[split]
    images = read_idx(Path(DEFAULT_ROOT) / f"{prefix}-images-idx3-ubyte.gz")
    return torch.from_numpy(images.astype(np.float32) / 127.5 - 1.0).unsqueeze(1)  # [-1, 1]


def code_histograms(codes: Tensor, k: int) -> list[Tensor]:
    """One histogram per level (depth axis) or a single one for ``(B, *grid)`` codes."""
    levels = codes.unsqueeze(-1) if codes.dim() == 3 else codes
    return [torch.bincount(levels[..., i].reshape(-1), minlength=k) for i in range(levels.shape[-1])]


@torch.no_grad()
def evaluate(model: TinyVQVAE, test: Tensor, batch: int = 500) -> dict[str, float]:
    model.eval()
    k = model.quantizer.codebook_size
    hists: list[Tensor] | None = None
    sq_err = 0.0
    for x in test.split(batch):
        codes = model.quantizer.encode(model.encoder(x))
        xrec = model.decoder(model.quantizer.decode(codes).float())
        sq_err += F.mse_loss((xrec.clamp(-1, 1) + 1) / 2, (x + 1) / 2, reduction="sum").item()
        h = code_histograms(codes, k)
        hists = h if hists is None else [a + b for a, b in zip(hists, h)]
    usage, perplexity = [], []
    for h in hists:
        p = h.double() / h.sum()
        usage.append((h > 0).double().mean().item())
        perplexity.append(math.exp(-(p * p.clamp_min(1e-30).log()).sum().item()))
    model.train()
    return {
        "usage": statistics.fmean(usage),
        "perplexity": statistics.fmean(perplexity),
        "mse": sq_err / test.numel(),
        "k": k,
    }


def train_one(spec: dict, train: Tensor, test: Tensor, args: argparse.Namespace, seed: int) -> dict[str, float]:
    torch.manual_seed(seed)
    model = TinyVQVAE(spec, dim=args.dim)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    order = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    for _ in range(args.steps):
        x = train[torch.randint(0, train.shape[0], (args.batch,), generator=order)]
        xrec, q_loss = model(x)
        loss = F.mse_loss(xrec, x) + q_loss
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite loss {loss.item()}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    train_s = time.perf_counter() - start
    result = evaluate(model, test)
    result["train_s"] = train_s
    return result


def _train_task(task: tuple, train: Tensor, test: Tensor, args: argparse.Namespace) -> dict[str, float] | str:
    """One (size, method, seed) training; a failure comes back as its message, so one row is skipped, not all."""
    _, _, spec, seed = task
    try:
        return train_one(spec, train, test, args, seed)
    except (ConfigError, ImportError, FloatingPointError) as err:  # module missing, or diverged
        return str(err).splitlines()[0]


_WORKER: dict = {}


def _worker_init(train: Tensor, test: Tensor, args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    _WORKER.update(train=train, test=test, args=args)


def _worker_run(task: tuple) -> dict[str, float] | str:
    return _train_task(task, _WORKER["train"], _WORKER["test"], _WORKER["args"])


def _run_all(tasks: list[tuple], train: Tensor, test: Tensor, args: argparse.Namespace):
    """Results in task order: in this process, or from ``args.jobs`` forked workers (one thread each)."""
    if args.jobs <= 1:
        return (_train_task(t, train, test, args) for t in tasks)
    import multiprocessing as mp

    pool = mp.get_context("fork").Pool(args.jobs, initializer=_worker_init, initargs=(train, test, args))
    return pool.imap(_worker_run, tasks)


def mean_std(values: list[float], fmt: str) -> str:
    if len(values) == 1:
        return format(values[0], fmt)
    return f"{format(statistics.fmean(values), fmt)} ± {format(statistics.stdev(values), fmt)}"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--dim", type=int, default=16, help="latent channels at the 7x7 grid")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--sizes", type=int, nargs="+", default=[1024, 16384], choices=[1024, 16384])
    p.add_argument("--methods", nargs="+", default=None, help="subset of methods (default: all)")
    p.add_argument("--test-images", type=int, default=10000, help="test images evaluated (default: all 10k)")
    p.add_argument("--quick", action="store_true", help="1 seed, 25 steps, K=1024, 1k test images")
    p.add_argument(
        "--threads",
        type=int,
        default=2,
        help="torch intra-op threads (default 2); on a CPU shared with other jobs, 1 avoids OpenMP barrier stalls",
    )
    p.add_argument("--jobs", type=int, default=1, help="trainings run at once, one thread each (default 1)")
    p.add_argument("--out", type=Path, default=None, help="also write the markdown table here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.quick:
        args.seeds, args.steps, args.sizes, args.test_images = 1, 25, [1024], 1000

    train, test = load_split("train"), load_split("test")[: args.test_images]
    header = (
        f"Codebook collapse: Fashion-MNIST, tiny conv VQ-VAE (7x7x{args.dim} latent), {args.steps} steps x "
        f"batch {args.batch}, Adam lr {args.lr}, seeds {args.seeds}, test images {test.shape[0]}, "
        + (f"{args.jobs} runs at once, 1 torch thread each" if args.jobs > 1 else f"torch threads {args.threads}")
    )
    lines = [
        header,
        "",
        "| method | K | usage | usage ×vq | perplexity | test MSE | train s/run |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    print("\n".join(lines), flush=True)
    bench_start = time.perf_counter()

    def emit(line: str) -> None:
        print(line, flush=True)
        lines.append(line)
        if args.out:  # rewritten after every row, so a long run leaves a usable partial table
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text("\n".join(lines) + "\n")

    tasks = [
        (k, name, spec, seed)
        for k in args.sizes
        for name, spec in method_specs(k).items()
        if not args.methods or name in args.methods
        for seed in range(args.seeds)
    ]
    results = _run_all(tasks, train, test, args)
    plain_usage: dict[int, float] = {}
    for k, name, _, _ in tasks[:: args.seeds]:
        runs = [next(results) for _ in range(args.seeds)]
        failed = [r for r in runs if isinstance(r, str)]
        if failed:
            emit(f"| {name} | {k} | skipped: {failed[0][:80]} | | | | |")
            continue
        usage = [r["usage"] for r in runs]
        if name == "vq":
            plain_usage[k] = statistics.fmean(usage)
        ratio = f"{statistics.fmean(usage) / plain_usage[k]:.2f}" if k in plain_usage else "n/a"
        line = (
            f"| {name} | {int(runs[0]['k'])} | {mean_std([100 * u for u in usage], '.1f')}% | {ratio} | "
            f"{mean_std([r['perplexity'] for r in runs], '.0f')} | "
            f"{mean_std([r['mse'] for r in runs], '.4f')} | {statistics.fmean(r['train_s'] for r in runs):.1f} |"
        )
        emit(line)
    emit("")
    emit(f"total wall time {time.perf_counter() - bench_start:.0f} s")


if __name__ == "__main__":
    sys.exit(main())
