"""Prior quality on a code folder: validation NLL per token against a unigram baseline, and samples.

    python bench/prior_quality.py --codes codes/fmnist --steps 2000 [--configs configs/ar.yaml ...]

Trains each prior config (default: configs/ar.yaml, plus configs/maskgit.yaml when present) for
``--steps`` steps through ``tokenforge.train`` (run folders under ``--out``), then reports:

* ``val NLL``: the prior's ``val/loss`` over the whole validation split, in nats per token (and bits).
  For the AR prior this is the exact autoregressive NLL. For MaskGIT it is the cross-entropy on the
  masked tokens at randomly drawn mask ratios: a training loss, NOT a likelihood of the sequence, so it
  is printed but must not be compared with the AR figure or the baseline as if it were one.
* ``unigram baseline``: cross-entropy of the validation codes under the empirical code distribution
  of the train split (add-0.5 smoothing so unseen codes have finite cost): what a model that ignores
  every dependency between tokens scores. A useful prior is well below it.
* a sample grid per prior: one row per class (or one block for an unconditional prior), decoded by
  the tokenizer named in the manifest when that checkpoint exists (``stage1.load_tokenizer``); else
  the codes are saved as ``.npy`` only.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch

torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))  # 1 on a shared machine
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the working tree's packages (modalities, ...)

from data.codes import CodesDataModule  # noqa: E402
from stage2.prior import load_prior  # noqa: E402
from tokenforge.train import main as train_main  # noqa: E402


def unigram_cross_entropy(dm: CodesDataModule, vocab: int) -> tuple[float, float]:
    """(cross-entropy of val under the train unigram, entropy of the train unigram), nats per token."""
    counts = np.zeros(vocab, dtype=np.float64)
    for batch in dm.train_dataloader():
        counts += np.bincount(batch["codes"].reshape(-1).numpy(), minlength=vocab)
    probs = (counts + 0.5) / (counts.sum() + 0.5 * vocab)
    logp = np.log(probs)
    entropy = float(-(probs * logp).sum())
    total, n = 0.0, 0
    for batch in dm.val_dataloader():
        flat = batch["codes"].reshape(-1).numpy()
        total += float(-logp[flat].sum())
        n += flat.size
    return total / max(n, 1), entropy


def save_samples(prior, out: Path, per_class: int, cfg_scale: float, device: str) -> str:
    prior.to(device)
    classes = list(range(prior.num_classes)) if prior.num_classes else [None]
    g = torch.Generator(device=device).manual_seed(0)
    kwargs = {"cfg_scale": cfg_scale} if prior.num_classes else {}
    codes = torch.cat([prior.sample(per_class, cond=c, generator=g, **kwargs) for c in classes])
    out.mkdir(parents=True, exist_ok=True)
    np.save(out / "codes.npy", codes.cpu().numpy())
    path = prior.tokenizer_path
    if not path or not Path(path).is_file():
        return f"codes only ({out / 'codes.npy'}): tokenizer checkpoint {path!r} not found"
    from stage1.modalities.image import save_grid
    from stage1.tokenizer import load_tokenizer

    tok = load_tokenizer(path, map_location=device)
    with torch.no_grad():
        images = torch.cat([tok.decode(chunk) for chunk in codes.split(64)])
    if images.dim() != 4:
        return f"codes only ({out / 'codes.npy'}): the tokenizer decodes to {tuple(images.shape)}, not images"
    grid = save_grid(images.cpu(), out / "samples.png", nrow=per_class)
    return str(grid)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--codes", required=True, help="code folder (with manifest.json)")
    p.add_argument("--steps", type=int, default=2000, help="training steps per prior (the budget)")
    p.add_argument("--configs", nargs="+", default=None, help="prior configs (default: ar, and maskgit if present)")
    p.add_argument("--out", default="runs/prior_quality", help="parent folder of the run folders")
    p.add_argument("--per-class", type=int, default=8, help="samples per class in the grid")
    p.add_argument("--cfg", type=float, default=1.0, help="guidance scale for the sample grids")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("overrides", nargs="*", help="extra dotlist overrides for every config")
    args = p.parse_args()

    configs = args.configs or [c for c in ("configs/ar.yaml", "configs/maskgit.yaml") if Path(c).is_file()]
    dm = CodesDataModule(codes=args.codes, batch_size=512)
    dm.setup("fit")
    vocab = int(dm.code_spec["codebook_size"])
    baseline, entropy = unigram_cross_entropy(dm, vocab)
    print(f"codes: {args.codes}  code_spec: {dm.code_spec}  classes: {dm.num_classes}")
    print(f"unigram baseline (train unigram on val): {baseline:.4f} nats/token = {baseline / math.log(2):.4f} "
          f"bits/token  (train unigram entropy {entropy:.4f} nats; uniform {math.log(vocab):.4f})")

    results = []
    for config in configs:
        name = f"{Path(config).stem}_{args.steps}"
        start = time.perf_counter()
        train_main([config, f"data.params.codes={args.codes}", f"trainer.max_steps={args.steps}",
                    *args.overrides, "--runs", args.out, "--name", name])
        train_s = time.perf_counter() - start
        prior = load_prior(Path(args.out) / name / "checkpoints" / "last.ckpt")
        trainer = pl.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False,
                             accelerator="gpu" if args.device.startswith("cuda") else "cpu", devices=1)
        torch.manual_seed(0)  # MaskGIT's validation masks are random: fix them
        val = trainer.validate(prior, datamodule=CodesDataModule(codes=args.codes, batch_size=256),
                               verbose=False)[0]["val/loss"]
        kind = "exact AR NLL" if type(prior).__name__ == "ARPrior" else "masked-token CE, not a likelihood"
        samples = save_samples(prior, Path(args.out) / name / "quality_samples", args.per_class, args.cfg,
                               args.device)
        results.append((Path(config).stem, val, kind, train_s, samples))

    print(f"\n{'prior':<10} {'val nats/tok':>12} {'bits/tok':>9} {'vs unigram':>11} {'train s':>8}  what")
    for stem, val, kind, train_s, _ in results:
        print(f"{stem:<10} {val:12.4f} {val / math.log(2):9.4f} {val - baseline:+11.4f} {train_s:8.1f}  {kind}")
    print(f"{'unigram':<10} {baseline:12.4f} {baseline / math.log(2):9.4f} {0.0:+11.4f}")
    for stem, *_, samples in results:
        print(f"samples {stem}: {samples}")


if __name__ == "__main__":
    main()
