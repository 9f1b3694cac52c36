"""VQ-VAE-2 measurements on emoji at 32 px (issue 14), everything in one process.

    nice -n 10 python bench/vqvae2.py [--out /tmp/vqvae2_bench] [--tok-steps 300] [--prior-steps 300]

1. Reconstruction: VQ-VAE-2 (configs/vqvae2.yaml: 4x4 top over 8x8 bottom, 256 codes each: 16*8 + 64*8 =
   640 bits an image) against a one-level VQ-VAE with the same encoder family and the same bits an image
   (8x8 grid of 1024 codes: 64*10 = 640 bits), same steps, batch and learning rate. Reported on the
   validation split: MSE, PSNR, SSIM and a Frechet distance of the reconstructions (see "features").
2. Priors at matched parameters: a top AR prior + a bottom AR prior conditioned on the top (each
   ``--prior-depth`` blocks) against one AR prior of twice the depth over the one-level codes, same
   width, steps, batch and learning rate. Reported: validation NLL in bits per IMAGE (top + bottom|top
   against the one-level sum: both are code lengths of an image under their tokenizer) and the Frechet
   distance of ``--samples`` decoded samples to the validation images.

Features: this machine has no Inception weights and emoji has no labels for a domain classifier, so
the Frechet distances are computed on 8x8 average-pooled RGB pixels (192-d) and labelled so; they
rank colour/layout statistics, not Inception FID, and are comparable only with each other.
Budgets are small (shared 2-core CPU, 1 thread); every result is written to ``results.json`` as soon
as it is measured, so an interrupted run keeps what it finished.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # shared machine: see bench/sampling.py
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the working tree's packages, whatever the installed copy holds

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

CONFIGS = REPO / "configs"
PIXEL_FEATURES = "8x8 average-pooled RGB pixels (192-d; not Inception)"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def train(config: Path, runs: Path, name: str, overrides: list[str]) -> Path:
    from tokenforge.train import main

    ckpt = runs / name / "checkpoints" / "last.ckpt"
    if ckpt.is_file():
        log(f"reusing {ckpt}")
        return ckpt
    start = time.perf_counter()
    main([str(config), "--runs", str(runs), "--name", name, "trainer.enable_progress_bar=false",
          "checkpoint_every_n_steps=100000", *overrides])
    log(f"trained {name} in {time.perf_counter() - start:.0f} s")
    return ckpt


def tokenize(ckpt: Path, out: Path, limit: int) -> Path:
    from tokenforge.tokenize import main

    if not (out / "manifest.json").is_file():
        main([str(ckpt), "--out", str(out), "--batch-size", "128", f"data.params.limit_train={limit}",
              "trainer.enable_progress_bar=false"])
    return out


class PixelFeatures(nn.Module):
    """Images in [-1, 1] -> 8x8 average-pooled RGB, flattened (a crude, honest Frechet feature)."""

    num_features = 192

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.adaptive_avg_pool2d(x.float(), 8).flatten(1)


def pixel_fd() -> Any:
    from metrics.fid import FID

    return FID(PixelFeatures(), PIXEL_FEATURES, uint8_inputs=False)


def val_images(ckpt: Path) -> torch.Tensor:
    from tokenforge.runs import open_run

    dm = open_run(ckpt, expect="tokenizer", log=lambda _: None).datamodule([], 128)
    dm.setup("fit")
    return torch.cat([b["x"] for b in dm.val_dataloader()])


@torch.no_grad()
def reconstruction(ckpt: Path, real: torch.Tensor) -> dict[str, Any]:
    from metrics.reconstruction import ReconstructionMetrics
    from stage1.tokenizer import load_tokenizer

    tok = load_tokenizer(ckpt)
    metrics, fd = ReconstructionMetrics(), pixel_fd()
    for x in real.split(128):
        xrec = tok.decode(tok.encode(x)).clamp(-1, 1)
        metrics.update(xrec, x)
        fd.update(x, real=True)
        fd.update(xrec, real=False)
    out = {k: float(v) for k, v in metrics.compute().items()}
    out["pixel_fd"] = fd.result().value
    out["params"] = sum(p.numel() for p in tok.parameters())
    return out


@torch.no_grad()
def val_bits_per_image(prior: Any, codes: Path) -> float:
    """Validation NLL of a prior, summed over an image's tokens, in bits."""
    from data.codes import CodesDataModule

    dm = CodesDataModule(str(codes), batch_size=64)
    dm.setup("fit")
    total, images = 0.0, 0
    prior.eval()
    for i, batch in enumerate(dm.val_dataloader()):
        codes_b, labels, context = prior.unpack_batch(batch)
        g = torch.Generator().manual_seed(i)
        total += float(prior.loss(codes_b, labels, context, generator=g).nll) * prior.seq_len * codes_b.shape[0]
        images += codes_b.shape[0]
    return total / images / math.log(2)


def prior_overrides(args: argparse.Namespace, codes: Path, depth: int) -> list[str]:
    steps = args.prior_steps
    return [f"data.params.codes={codes}", f"trainer.max_steps={steps}", f"trainer.val_check_interval={steps}",
            f"model.params.dim={args.prior_dim}", f"model.params.depth={depth}", "model.params.heads=4",
            "model.params.warmup_steps=50", "model.params.dropout=0.0", f"data.params.batch_size={args.prior_batch}"]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("/tmp/vqvae2_bench"))
    p.add_argument("--tok-steps", type=int, default=300)
    p.add_argument("--prior-steps", type=int, default=300)
    p.add_argument("--prior-dim", type=int, default=96)
    p.add_argument("--prior-depth", type=int, default=3, help="blocks of each two-level prior (one-level: twice)")
    p.add_argument("--samples", type=int, default=256)
    p.add_argument("--tok-batch", type=int, default=32)
    p.add_argument("--prior-batch", type=int, default=64)
    p.add_argument("--prior-train-images", type=int, default=4096, help="train images tokenized for the priors")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    runs, out = args.out / "runs", args.out
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"settings": {k: str(v) for k, v in vars(args).items()}, "features": PIXEL_FEATURES}

    def save() -> None:
        (out / "results.json").write_text(json.dumps(results, indent=2))

    steps = args.tok_steps
    common = [f"trainer.max_steps={steps}", f"trainer.val_check_interval={steps}", "trainer.limit_val_batches=2",
              f"data.params.batch_size={args.tok_batch}", "callbacks=[]"]
    vq2 = train(CONFIGS / "vqvae2.yaml", runs, "vqvae2", [
        *common, "model.params.levels.0.quantizer.params.codebook_size=256",
        "model.params.levels.1.quantizer.params.codebook_size=256"])
    # one level, same encoder family (channels 32, ch_mult [1, 2, 2]: 8x8), 1024 codes: the same 640 bits
    vq1 = train(CONFIGS / "vqvae.yaml", runs, "vqvae_1level", [
        *common, "data.params.dataset=emoji", "data.params.size=32",
        "model.params.encoder.in_channels=3", "model.params.encoder.z_channels=64",
        "model.params.encoder.channels=32", "model.params.encoder.ch_mult=[1,2,2]",
        "model.params.encoder.groups=16", "model.params.quantizer.params.codebook_size=1024",
        "model.params.rec_loss=l2", "model.params.warmup_steps=100"])
    real = val_images(vq2)
    for name, ckpt in (("vqvae2_top4x4_bottom8x8_K256", vq2), ("vqvae_8x8_K1024", vq1)):
        results.setdefault("reconstruction", {})[name] = reconstruction(ckpt, real)
        log(f"{name}: {results['reconstruction'][name]}")
        save()

    codes2 = tokenize(vq2, out / "codes_vqvae2", args.prior_train_images)
    codes1 = tokenize(vq1, out / "codes_1level", args.prior_train_images)
    from stage2.prior import load_prior
    from tokenforge.sample import main as sample

    top = train(CONFIGS / "vqvae2_top.yaml", runs, "top", prior_overrides(args, codes2, args.prior_depth))
    bottom = train(CONFIGS / "vqvae2_bottom.yaml", runs, "bottom", prior_overrides(args, codes2, args.prior_depth))
    flat = train(CONFIGS / "ar.yaml", runs, "one_level", prior_overrides(args, codes1, 2 * args.prior_depth))
    priors = {name: load_prior(ck) for name, ck in (("top", top), ("bottom", bottom), ("one_level", flat))}
    bits = {name: val_bits_per_image(pr, codes2 if name != "one_level" else codes1) for name, pr in priors.items()}
    params = {name: sum(q.numel() for q in pr.parameters()) for name, pr in priors.items()}
    results["priors"] = {
        "two_level": {"params": params["top"] + params["bottom"], "bits_per_image": bits["top"] + bits["bottom"],
                      "top_bits": bits["top"], "bottom_given_top_bits": bits["bottom"]},
        "one_level": {"params": params["one_level"], "bits_per_image": bits["one_level"]}}
    save()
    for name, ckpts in (("two_level", [top, bottom]), ("one_level", [flat])):
        folder = sample([*map(str, ckpts), "-n", str(args.samples), "--seed", "0", "--out", str(out / f"s_{name}")])
        import numpy as np
        from PIL import Image

        files = sorted(p for p in folder.glob("*.png") if p.name != "grid.png")
        fake = torch.stack([torch.from_numpy(np.asarray(Image.open(f).convert("RGB"))).permute(2, 0, 1)
                            for f in files]).float() / 127.5 - 1
        fd = pixel_fd()
        fd.update(real, real=True)
        fd.update(fake, real=False)
        results["priors"][name]["sample_pixel_fd"] = fd.result().value
        results["priors"][name]["samples"] = len(files)
        log(f"{name}: {results['priors'][name]}")
        save()
    return results


if __name__ == "__main__":
    print(json.dumps(main(), indent=2))
