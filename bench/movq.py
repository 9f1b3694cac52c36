"""MoVQ against VQGAN at the same code grid, codebook and training budget (issue 14).

Trains, from the same seed and data order on the built-in ``emoji`` set:

* ``vqgan``: ``configs/vqgan.yaml`` (our conv encoder/decoder, GroupNorm decoder, one code per cell);
* ``movq-spatial``: ``configs/movq.yaml`` with one group: diffusers' blocks and the spatially
  conditional decoder norm, the SAME code grid as VQGAN (16x16 codes of 1024 at 64 px);
* ``movq``: ``configs/movq.yaml`` as shipped: spatial norm + multichannel quantization (4 groups in
  one shared codebook: 4 codes per cell, 4x the codes per image).

and reports validation PSNR / SSIM (mean over images), codebook usage and the ratio to VQGAN. The GAN
starts after the budget and LPIPS is off for all three (its VGG weights cannot be downloaded here),
so this compares the architectures under the reconstruction + quantizer losses alone.

    python bench/movq.py --steps 400 --size 32            # CPU-sized (state the budget with the numbers)
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from data.atomic import atomic_write_text  # noqa: E402
from metrics.codebook import CodebookUsage  # noqa: E402
from metrics.reconstruction import ReconstructionMetrics  # noqa: E402
from stage1 import load_tokenizer  # noqa: E402
from tokenforge.train import main as train  # noqa: E402

VARIANTS = {
    "vqgan": ("configs/vqgan.yaml", []),
    "movq-spatial": ("configs/movq.yaml", ["model.params.quantizer.params.groups=1"]),
    "movq": ("configs/movq.yaml", []),
}


def evaluate(ckpt: Path, size: int, limit: int) -> dict[str, float]:
    from data.images import ImageDataModule

    tok = load_tokenizer(ckpt)
    dm = ImageDataModule(dataset="emoji", size=size, batch_size=64, val_fraction=0.05)
    dm.setup("fit")
    recon = ReconstructionMetrics()
    spec = tok.code_spec
    usage = CodebookUsage(spec["codebook_size"])
    seen = 0
    with torch.no_grad():
        for batch in dm.val_dataloader():
            x = batch["x"]
            codes = tok.encode(x)
            recon.update(tok.decode(codes).clamp(-1, 1), x)
            usage.update(codes)
            seen += x.shape[0]
            if seen >= limit:
                break
    out = {k: float(v) for k, v in recon.compute().items()}
    out.update({f"usage_{k}": float(v) for k, v in usage.compute().items() if torch.is_tensor(v) and v.numel() == 1})
    out["codes_per_image"] = float(torch.tensor(codes.shape[1:]).prod())
    out["params_M"] = sum(p.numel() for n, p in tok.named_parameters() if not n.startswith("discriminator")) / 1e6
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--runs", default="runs/bench_movq")
    p.add_argument("--limit", type=int, default=512, help="validation images scored")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "movq.md"))
    p.add_argument("--only", nargs="*", default=list(VARIANTS))
    args = p.parse_args()
    torch.set_num_threads(1)
    rows = {}
    for name in args.only:
        config, extra = VARIANTS[name]
        overrides = [f"data.params.size={args.size}", f"trainer.max_steps={args.steps}",
                     f"trainer.val_check_interval={args.steps}", f"model.params.disc_start={10 * args.steps}",
                     "model.params.perceptual_weight=0.0", "trainer.enable_progress_bar=false",
                     f"checkpoint_every_n_steps={args.steps}", "callbacks=[]", *extra]
        start = time.perf_counter()
        train([str(ROOT / config), "--runs", args.runs, "--name", name, "--fresh", *overrides])
        seconds = time.perf_counter() - start
        rows[name] = evaluate(Path(args.runs) / name / "checkpoints" / "last.ckpt", args.size, args.limit)
        rows[name]["train_s"] = seconds
        print(name, rows[name], flush=True)
    base = rows.get("vqgan")
    lines = [f"# MoVQ vs VQGAN on emoji ({args.size} px, {args.steps} steps, batch 16, seed 0, 1 thread)", "",
             "Same data order, optimiser and budget; GAN after the budget and LPIPS off for all (no VGG weights).",
             f"PSNR/SSIM over the first {args.limit} validation images; usage = fraction of codes used.", "",
             "| model | codes/image | params (M) | PSNR (dB) | SSIM | usage | perplexity | PSNR - VQGAN | train s |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, r in rows.items():
        delta = f"{r['psnr'] - base['psnr']:+.2f}" if base else "n/a"
        lines.append(f"| {name} | {r['codes_per_image']:.0f} | {r['params_M']:.2f} | {r['psnr']:.2f} | "
                     f"{r['ssim']:.3f} | {r.get('usage_usage', float('nan')):.3f} | "
                     f"{r.get('usage_perplexity', float('nan')):.0f} | {delta} | {r['train_s']:.0f} |")
    atomic_write_text(args.out, "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
