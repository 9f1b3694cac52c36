"""VQ-Diffusion against AR and MaskGIT on Fashion-MNIST codes: domain FID, classifier accuracy, time per image.

    nice -n 10 python bench/vq_diffusion_quality.py --out runs/vqd_bench --threads 1
    # reuse artefacts: --codes codes/fmnist --classifier runs/domain/fashion_mnist.pt

Pipeline (each stage skipped when its artefact is given or already in ``--out``):

1. a VQ-VAE tokenizer (``configs/vqvae.yaml``, ``--tokenizer-steps``) and its code folder (7x7 codes of 512);
2. the Fashion-MNIST domain classifier (``metrics.domain_classifier``) whose features give the FID;
3. three class-conditional priors with the same width/depth, matched parameter counts (VQ-Diffusion's
   AdaLN modulation is paid for with a narrower FFN: ``mlp_ratio`` 2 instead of 4) and the same
   number of training steps and batch size;
4. for each sampling variant, ``--num-samples`` class-balanced samples decoded by the tokenizer and
   scored against ``--real`` test images: FID on the domain classifier's features (comparable only
   with FIDs from the same classifier, never with Inception FIDs), the classifier's accuracy on the
   requested classes, and the wall-clock sampling time per image (codes only, batch ``--batch``,
   ``--threads`` threads).

Every finished variant is appended to ``--results`` (markdown) and ``<out>/results.json``, so an
interrupted run keeps what it measured.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

PRIORS = {  # name -> (config, overrides beyond the shared ones)
    "ar": ("configs/ar.yaml", []),
    "maskgit": ("configs/maskgit.yaml", []),
    "vq_diffusion": ("configs/vq_diffusion.yaml", ["model.params.mlp=swiglu", "model.params.norm=rmsnorm",
                                                   "model.params.mlp_ratio=2.0"]),
}
VARIANTS = [  # (label, prior, sampling keywords), cheapest and most important first (results are incremental)
    ("AR", "ar", {}),
    ("MaskGIT 8 steps", "maskgit", {}),
    ("VQ-Diffusion 25 steps (skip-step)", "vq_diffusion", {"steps": 25}),
    ("VQ-Diffusion 100 steps", "vq_diffusion", {"steps": 100}),
    ("AR + CFG 1.0", "ar", {"cfg_scale": 1.0}),
    ("MaskGIT 8 steps + CFG 1.0", "maskgit", {"cfg_scale": 1.0}),
    ("VQ-Diffusion 25 steps + CFG 1.0", "vq_diffusion", {"steps": 25, "cfg_scale": 1.0}),
    ("VQ-Diffusion 25 steps, purity", "vq_diffusion", {"steps": 25, "purity": True}),
    ("VQ-Diffusion 25 steps, purity + CFG 1.0", "vq_diffusion", {"steps": 25, "purity": True, "cfg_scale": 1.0}),
    ("VQ-Diffusion 100 steps + CFG 1.0", "vq_diffusion", {"steps": 100, "cfg_scale": 1.0}),
    ("VQ-Diffusion 100 steps, purity", "vq_diffusion", {"steps": 100, "purity": True}),
]


def tokenizer_and_codes(args: argparse.Namespace, out: Path) -> tuple[Path, Path]:
    from tokenforge.tokenize import main as tokenize
    from tokenforge.train import main as train

    if args.codes:
        from data.codes import code_folder_info

        return Path(code_folder_info(args.codes)["tokenizer_path"]), Path(args.codes)
    ckpt = out / "runs" / "vqvae" / "checkpoints" / "last.ckpt"
    codes = out / "codes"
    if not (codes / "manifest.json").is_file():  # (an interrupted run resumes from last.ckpt)
        train(["configs/vqvae.yaml", f"trainer.max_steps={args.tokenizer_steps}", "trainer.limit_val_batches=5",
               "--runs", str(out / "runs"), "--name", "vqvae"])
    if not (codes / "manifest.json").is_file() or not json.loads((codes / "manifest.json").read_text())["complete"]:
        tokenize([str(ckpt), "--out", str(codes), "--batch-size", "500"])
    return ckpt, codes


def domain_classifier(args: argparse.Namespace, out: Path) -> Path:
    if args.classifier:
        return Path(args.classifier)
    path = out / "domain_fashion_mnist.pt"
    if not path.is_file():  # as scripts/train_domain_classifier.py, one epoch
        from data.fashion_mnist import FashionMNIST
        from metrics.domain_classifier import train_domain_classifier

        def split(name: str) -> tuple[torch.Tensor, torch.Tensor]:
            ds = FashionMNIST(split=name)
            x = torch.from_numpy(np.ascontiguousarray(ds.images)).permute(0, 3, 1, 2).contiguous()
            return x, torch.from_numpy(np.asarray(ds.labels, dtype=np.int64))

        model, acc = train_domain_classifier(*split("train"), *split("test"), width=16, epochs=1, batch_size=256,
                                             lr=2e-3, seed=0, dataset="fashion_mnist", device="cpu", log=print)
        model.cpu().save(path, test_accuracy=acc)
        print(f"domain classifier: test accuracy {acc:.4f}")
    return path


def train_prior(name: str, args: argparse.Namespace, codes: Path, out: Path) -> Any:
    from stage2.prior import load_prior
    from tokenforge.train import main as train

    config, extra = PRIORS[name]
    ckpt = out / "runs" / name / "checkpoints" / "last.ckpt"
    seconds = None
    if not ckpt.is_file():
        start = time.perf_counter()
        train([config, f"data.params.codes={codes}", f"trainer.max_steps={args.prior_steps}",
               f"model.params.dim={args.dim}", f"model.params.depth={args.depth}", "model.params.heads=4",
               "model.params.warmup_steps=50", "trainer.limit_val_batches=5", *extra,
               "--runs", str(out / "runs"), "--name", name])
        seconds = time.perf_counter() - start
    prior = load_prior(ckpt)
    prior.bench_train_s = seconds
    return prior


def real_test_images(n: int) -> torch.Tensor:
    from data.fashion_mnist import FashionMNIST

    ds = FashionMNIST(split="test")
    x = torch.from_numpy(np.ascontiguousarray(ds.images[:n])).permute(0, 3, 1, 2).float()
    return x / 127.5 - 1.0


def score_variant(prior: Any, tokenizer: Any, kwargs: dict[str, Any], real: torch.Tensor, classifier: Path,
                  args: argparse.Namespace) -> dict[str, Any]:
    from stage1.modalities import modality_of

    evaluator = modality_of(tokenizer.code_spec).sample_evaluator(
        {"fid": "domain", "classifier": str(classifier), "device": "cpu", "dataset": "fashion_mnist"})
    for chunk in real.split(500):
        evaluator.update(real=chunk)
    labels = torch.arange(args.num_samples) % prior.num_classes
    g = torch.Generator().manual_seed(0)
    sample_s = 0.0
    for start in range(0, args.num_samples, args.batch):
        cond = labels[start:start + args.batch]
        t0 = time.perf_counter()
        codes = prior.sample(len(cond), cond=cond, generator=g, **kwargs)
        sample_s += time.perf_counter() - t0
        with torch.no_grad():
            fake = tokenizer.decode(codes).clamp(-1, 1)
        evaluator.update(fake=fake, labels=cond)
    result = evaluator.compute()
    return {"fid": float(result["fid"]), "classifier_accuracy": float(result["classifier_accuracy"]),
            "precision": float(result.get("precision", math.nan)), "recall": float(result.get("recall", math.nan)),
            "ms_per_image": 1000 * sample_s / args.num_samples, "fid_features": result["fid_features"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", default="runs/vqd_bench")
    p.add_argument("--codes", help="an existing Fashion-MNIST code folder (its manifest names the tokenizer)")
    p.add_argument("--classifier", help="an existing domain classifier checkpoint")
    p.add_argument("--tokenizer-steps", type=int, default=150)
    p.add_argument("--prior-steps", type=int, default=300, help="training steps of every prior (batch 64)")
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--num-samples", type=int, default=200, help="class-balanced samples per variant")
    p.add_argument("--batch", type=int, default=100, help="samples per sample() call")
    p.add_argument("--real", type=int, default=1000, help="real test images for the FID")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--only", nargs="*", help="run only variants whose label contains one of these strings")
    p.add_argument("--results", default="bench/results/vq_diffusion_quality.md")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    from stage1.tokenizer import load_tokenizer

    tok_path, codes = tokenizer_and_codes(args, out)
    classifier = domain_classifier(args, out)
    tokenizer = load_tokenizer(tok_path).eval()
    real = real_test_images(args.real)
    priors: dict[str, Any] = {}
    for name in PRIORS:
        priors[name] = train_prior(name, args, codes, out)
    params = {name: sum(p.numel() for p in prior.parameters()) for name, prior in priors.items()}
    header = [
        "# VQ-Diffusion vs AR vs MaskGIT on Fashion-MNIST codes "
        f"({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})",
        "",
        f"Command: `python bench/vq_diffusion_quality.py --out {args.out} --prior-steps {args.prior_steps} "
        f"--num-samples {args.num_samples} --threads {args.threads}` (under `nice -n 10`, shared 2-core CPU).",
        f"Tokenizer: configs/vqvae.yaml, {args.tokenizer_steps} steps (7x7 codes of 512). Priors: dim {args.dim}, "
        f"depth {args.depth}, 4 heads, {args.prior_steps} steps at batch 64, class-conditional (label dropout 0.1); "
        "parameters: " + ", ".join(f"{k} {v / 1e6:.3f} M" for k, v in params.items()) + ".",
        f"Scores: {args.num_samples} class-balanced samples against {args.real} Fashion-MNIST test images. FID on "
        "the features of the project's Fashion-MNIST domain classifier (not Inception: compare only within this "
        "table); accuracy = the domain classifier agrees with the requested class. Time = wall-clock "
        f"`sample()` per image (codes only), batch {args.batch}, {args.threads} thread(s), on a shared machine.",
        "",
        "| variant | FID (domain) | classifier acc. | precision | recall | ms / image |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    rows: list[str] = []
    records: list[dict[str, Any]] = []
    for label, name, kwargs in VARIANTS:
        if args.only and not any(s in label for s in args.only):
            continue
        r = score_variant(priors[name], tokenizer, kwargs, real, classifier, args)
        records.append({"variant": label, "prior": name, "sampling": kwargs, **r})
        rows.append(f"| {label} | {r['fid']:.2f} | {r['classifier_accuracy']:.1%} | {r['precision']:.3f} | "
                    f"{r['recall']:.3f} | {r['ms_per_image']:.1f} |")
        print(rows[-1], flush=True)
        Path(args.results).write_text("\n".join(header + rows) + "\n")
        (out / "results.json").write_text(json.dumps({"params": params, "results": records}, indent=2))


if __name__ == "__main__":
    main()
