"""GIVT on Fashion-MNIST: the β trade-off, GMM vs single-Gaussian bits/dim, and GIVT vs a discrete AR prior.

    OMP_NUM_THREADS=1 nice -n 10 python bench/givt.py --out runs/bench_givt > givt.log
    ... --stages beta --betas 1e-4      # one part only (stages: beta single compare dbcfg)

A run folder is reused only when its checkpoint was trained exactly the asked number of steps (and a
code folder only when its tokenizer is the checkpoint beside it); anything else stops the bench with
a request for a clean ``--out``.

Everything trains through ``tokenforge.train`` from the project configs, on a small CPU budget (the
step counts below; raise them with the flags). What it measures:

1. **β trade-off**: a KL-VAE (``configs/klvae.yaml``) per β in ``--betas``, ``--tok-steps`` steps each;
   its validation reconstruction (MSE on [0, 1], PSNR), KL per latent element, and the exact NLL of a
   GIVT (``configs/givt.yaml``, k = 16) trained ``--prior-steps`` steps on its latents, in bits per
   latent dimension (in the VAE's own latent units, so priors of the same latents compare).
2. **GMM vs single Gaussian**: at ``--ref-beta``, the same GIVT with ``num_components=1`` whose MLP is
   widened until the parameter counts match (the k = 16 head has ~k times the output layer).
3. **GIVT vs discrete AR**: a VQ-VAE (``configs/vqvae.yaml``, 512 codes) trained as many steps as the
   KL-VAE, and an AR prior (``configs/ar.yaml``) of the same width and depth trained as many steps as
   GIVT; class-balanced samples of both are scored with FID on the features of a Fashion-MNIST domain
   classifier (NOT Inception: those numbers compare only with each other) and by that classifier's
   accuracy on the requested classes. GIVT is also sampled with DB-CFG, and its rejection sampler's
   acceptance rate is reported.
4. **masked**: GIVT's MaskGIT-style variant (``configs/givt_maskgit.yaml``) on the same latents and a
   discrete MaskGIT (``configs/maskgit.yaml``) on the VQ-VAE codes, same shape and steps as step 3,
   sampled with ``--masked-steps`` parallel steps each, scored as in step 3.
5. **DB-CFG sweep**: the GIVT of step 3 sampled at each ``--cfg-sweep`` weight ``w``: the rejection
   sampler's acceptance rate (accepted / proposals) and success rate (elements accepted within the
   proposal budget), domain FID and class accuracy.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

import pytorch_lightning as pl
import torch

torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))

from data.codes import CodesDataModule, sha256_file  # noqa: E402
from metrics.domain_classifier import DomainClassifier, train_domain_classifier  # noqa: E402
from metrics.fid import domain_fid  # noqa: E402
from metrics.latent import LatentStatistics  # noqa: E402
from metrics.reconstruction import ReconstructionMetrics  # noqa: E402
from stage1.tokenizer import load_tokenizer  # noqa: E402
from stage2.prior import load_prior  # noqa: E402
from tokenforge.tokenize import main as tokenize_main  # noqa: E402
from tokenforge.train import main as train_main  # noqa: E402

PRIOR_SHAPE = ["model.params.dim=128", "model.params.depth=4", "model.params.heads=4", "model.params.dropout=0.0"]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def real_split(split: str, limit: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Fashion-MNIST images in [-1, 1] ``(N, 1, 28, 28)`` and labels (``train`` or ``test``)."""
    import numpy as np

    from data.fashion_mnist import FashionMNIST

    ds = FashionMNIST(split=split)
    x = torch.from_numpy(np.ascontiguousarray(ds.images[:limit])).permute(0, 3, 1, 2).float() / 127.5 - 1
    return x, torch.from_numpy(np.asarray(ds.labels[:limit], dtype=np.int64))


def domain_classifier(path: Path) -> DomainClassifier:
    if not path.is_file():
        log(f"training the domain classifier -> {path}")
        import numpy as np

        from data.fashion_mnist import FashionMNIST

        def split(name: str) -> tuple[torch.Tensor, torch.Tensor]:
            ds = FashionMNIST(split=name)
            images = torch.from_numpy(np.ascontiguousarray(ds.images)).permute(0, 3, 1, 2).contiguous()
            return images, torch.from_numpy(np.asarray(ds.labels, dtype=np.int64))

        (tx, ty), (vx, vy) = split("train"), split("test")
        model, acc = train_domain_classifier(tx, ty, vx, vy, epochs=1, dataset="fashion_mnist", log=log)
        model.save(path, test_accuracy=acc)
    return DomainClassifier.load(path)


class StaleRunError(SystemExit):
    """A run folder holds a checkpoint of another budget (or codes of another tokenizer)."""


def run(config: str, out: Path, name: str, overrides: list[str], steps: int) -> tuple[Path, float]:
    """Train ``config`` into ``out/name`` for ``steps`` steps, or reuse a finished run of exactly that budget.

    A checkpoint whose ``global_step`` differs (e.g. the one an interrupted start saves on SIGTERM, or
    one from a run with other ``--*-steps``) is refused: the caller must pick a clean ``--out``. Reusing
    it silently once put a 12-step KL-VAE into the β table; resuming it would mix budgets too.
    """
    ckpt = out / name / "checkpoints" / "last.ckpt"
    if ckpt.is_file():
        done = int(torch.load(ckpt, map_location="cpu", weights_only=True, mmap=True)["global_step"])
        if done != steps:
            raise StaleRunError(f"{ckpt} was trained {done} steps, this bench asks for {steps}: "
                                f"use a clean --out folder (or delete {out / name})")
        return ckpt, float("nan")  # reused: its training time is not measured here
    start = time.perf_counter()
    train_main([config, *overrides, "--runs", str(out), "--name", name])
    return ckpt, time.perf_counter() - start


def tokenize(ckpt: Path, folder: Path, limit_train: int, limit_val: int) -> None:
    manifest = folder / "manifest.json"
    if manifest.is_file() and json.loads(manifest.read_text())["complete"]:
        made_by = json.loads(manifest.read_text())["tokenizer"]["sha256"]
        if made_by != sha256_file(ckpt):
            raise StaleRunError(f"{folder} holds codes of another tokenizer than {ckpt}: use a clean --out folder")
        return
    tokenize_main([str(ckpt), "--out", str(folder), f"data.params.limit_train={limit_train}",
                   f"data.params.limit_val={limit_val}", "--batch-size", "256"])


@torch.no_grad()
def tokenizer_quality(ckpt: Path, x: torch.Tensor) -> dict[str, float]:
    tok = load_tokenizer(ckpt)
    recon = ReconstructionMetrics()
    stats = LatentStatistics(tok.latent_dim) if hasattr(tok, "latent_dim") else None
    for chunk in x.split(500):
        if stats is not None:
            q = tok.posterior(chunk)
            stats.update(q.mean, q.logvar)
        recon.update(tok.decode(tok.encode(chunk)).clamp(-1, 1), chunk)
    out = {k: float(v) for k, v in recon.compute().items()}
    if stats is not None:
        s = stats.compute()
        out |= {"kl_per_element": float(s["kl_per_element"]), "latent_std_mean": float(s["latent_std"].mean()),
                "inactive_channels": int((s["kl_per_dim"] < 0.01).sum())}
    return out


def val_nll(prior_ckpt: Path, codes: Path) -> dict[str, float]:
    prior = load_prior(prior_ckpt)
    trainer = pl.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
    res = trainer.validate(prior, datamodule=CodesDataModule(codes=str(codes), batch_size=256), verbose=False)[0]
    return {k.removeprefix("val/"): float(v) for k, v in res.items()}


def params(ckpt: Path) -> int:
    return sum(p.numel() for p in load_prior(ckpt).parameters())


def givt_params(mlp_ratio: float, k: int, dim: int = 128, depth: int = 4, d: int = 16, classes: int = 10) -> int:
    """Parameter count of a GIVT of the bench's shape (layernorm + GELU MLP, learned positions, 49 tokens)."""
    hidden = int(dim * mlp_ratio)
    block = 4 * dim + 3 * dim * dim + dim * dim + dim + 2 * dim * hidden + hidden + dim
    return (depth * block + 2 * dim + 49 * dim + (d + 1) * dim + (classes + 1) * dim
            + (dim + 1) * k * (1 + 2 * d))


@torch.no_grad()
def sample_quality(prior_ckpt: Path, classifier: DomainClassifier, real: torch.Tensor, n: int,
                   **sampling) -> dict[str, float]:
    prior = load_prior(prior_ckpt)
    tok = load_tokenizer(prior.tokenizer_path)
    fid = domain_fid(classifier)
    for chunk in real.split(500):
        fid.update(chunk, real=True)
    labels = torch.arange(n) % 10
    g = torch.Generator().manual_seed(0)
    correct, acc_stats, start = 0, [], time.perf_counter()
    for i in range(0, n, 100):
        cond = labels[i:i + 100]
        fake = tok.decode(prior.sample(len(cond), cond=cond, generator=g, **sampling)).clamp(-1, 1)
        fid.update(fake, real=False)
        correct += int((classifier(fake).argmax(1) == cond).sum())
        if getattr(prior, "last_sampling_stats", None):
            acc_stats.append(prior.last_sampling_stats)
    out = {"fid_domain": float(fid.result().value), "class_accuracy": correct / n,
           "sample_s": time.perf_counter() - start}
    if acc_stats:
        out["dbcfg_acceptance"] = sum(s["dbcfg_acceptance"] for s in acc_stats) / len(acc_stats)
        out["dbcfg_success"] = sum(s["dbcfg_success"] for s in acc_stats) / len(acc_stats)
    return out


STAGES = ("beta", "single", "compare", "dbcfg", "masked", "recon")


@torch.no_grad()
def reconstruction_quality(ckpt: Path, classifier: DomainClassifier, real: torch.Tensor,
                           labels: torch.Tensor) -> dict[str, float]:
    """Domain FID and class accuracy of the tokenizer's reconstructions: the ceiling of its priors' samples."""
    tok = load_tokenizer(ckpt)
    fid = domain_fid(classifier)
    correct = 0
    for chunk, y in zip(real.split(500), labels.split(500)):
        fid.update(chunk, real=True)
        recon = tok.decode(tok.encode(chunk)).clamp(-1, 1)
        fid.update(recon, real=False)
        correct += int((classifier(recon).argmax(1) == y).sum())
    return {"recon_fid_domain": float(fid.result().value), "recon_class_accuracy": correct / len(real)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", default="runs/bench_givt")
    p.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES),
                   help="beta: the β table; single: GMM vs one Gaussian; compare: GIVT vs the VQ + AR prior "
                        "(samples); dbcfg: DB-CFG acceptance and sample quality per --cfg-sweep weight; "
                        "masked: masked GIVT vs a discrete MaskGIT over the VQ-VAE (samples); recon: domain "
                        "FID / class accuracy of both tokenizers' reconstructions (the priors' ceiling)")
    p.add_argument("--betas", type=float, nargs="+", default=[1e-4, 1e-3, 1e-2])
    p.add_argument("--ref-beta", type=float, default=1e-3, help="the β of the KL-VAE the other stages use")
    p.add_argument("--tok-steps", type=int, default=600)
    p.add_argument("--prior-steps", type=int, default=800)
    p.add_argument("--limit-train", type=int, default=20000, help="training items for tokenizers and priors")
    p.add_argument("--limit-val", type=int, default=2000)
    p.add_argument("--num-samples", type=int, default=500)
    p.add_argument("--cfg", type=float, default=1.0, help="guidance weight of the guided rows of 'compare'")
    p.add_argument("--cfg-sweep", type=float, nargs="+", default=[0.0, 0.5, 1.0, 2.0], help="DB-CFG weights w")
    p.add_argument("--masked-steps", type=int, default=16, help="parallel decoding steps of both masked priors")
    p.add_argument("--classifier", default="runs/domain/fashion_mnist.pt")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results_file = out / "results.json"
    results: dict[str, dict] = json.loads(results_file.read_text()) if results_file.is_file() else {}

    def save(key: str, value: object) -> None:
        results[key] = value
        results["settings"] = vars(args)
        results_file.write_text(json.dumps(results, indent=2))
        log(f"{key}: {json.dumps(value)}")

    data_limits = [f"data.params.limit_train={args.limit_train}", f"data.params.limit_val={args.limit_val}"]
    common_tok = [f"trainer.max_steps={args.tok_steps}", f"trainer.val_check_interval={args.tok_steps}",
                  "trainer.limit_val_batches=5", "checkpoint_every_n_steps=100000", *data_limits]
    common_prior = [f"trainer.max_steps={args.prior_steps}", f"trainer.val_check_interval={args.prior_steps}",
                    "trainer.limit_val_batches=2", "checkpoint_every_n_steps=100000", "model.params.warmup_steps=50"]
    val_x, val_y = real_split("test", args.limit_val)

    def klvae_and_givt(beta: float) -> tuple[Path, float, Path, Path, float]:
        tag = f"klvae_b{beta:g}"
        ckpt, secs = run("configs/klvae.yaml", out, tag, [*common_tok, f"model.params.kl_weight={beta}"],
                         args.tok_steps)
        codes = out / "codes" / tag
        tokenize(ckpt, codes, args.limit_train, args.limit_val)
        prior, psecs = run("configs/givt.yaml", out, f"givt_b{beta:g}",
                           [f"data.params.codes={codes}", *common_prior, *PRIOR_SHAPE], args.prior_steps)
        return ckpt, secs, codes, prior, psecs

    # 1. the β trade-off, and a GIVT per β
    if "beta" in args.stages:
        for beta in args.betas:
            ckpt, secs, codes, prior, psecs = klvae_and_givt(beta)
            save(f"klvae_b{beta:g}", {"beta": beta, "train_s": secs, **tokenizer_quality(ckpt, val_x),
                                      "givt": {**val_nll(prior, codes), "train_s": psecs, "params": params(prior)}})

    # 2. GMM (k=16) vs one Gaussian (k=1) at matched parameters, reference β
    if "single" in args.stages:
        _, _, codes_ref, _, _ = klvae_and_givt(args.ref_beta)
        target = givt_params(4.0, 16)
        ratio = min((r / 64 for r in range(256, 512)), key=lambda r: abs(givt_params(r, 1) - target))
        single, ssecs = run("configs/givt.yaml", out, f"givt1_b{args.ref_beta:g}",
                            [f"data.params.codes={codes_ref}", *common_prior, *PRIOR_SHAPE,
                             "model.params.num_components=1", f"model.params.mlp_ratio={ratio}"], args.prior_steps)
        save("single_gaussian", {**val_nll(single, codes_ref), "train_s": ssecs, "params": params(single),
                                 "mlp_ratio": ratio})

    if not {"compare", "dbcfg", "masked", "recon"} & set(args.stages):
        return
    classifier = domain_classifier(Path(args.classifier))
    results["classifier_test_accuracy"] = float(getattr(classifier, "test_accuracy", float("nan")) or math.nan)
    kl_ref, _, codes_ref, givt, _ = klvae_and_givt(args.ref_beta)

    if {"compare", "masked", "recon"} & set(args.stages):  # the discrete side: a VQ-VAE of the KL-VAE's budget
        vq, vsecs = run("configs/vqvae.yaml", out, "vqvae", common_tok, args.tok_steps)
        vq_codes = out / "codes" / "vqvae"
        tokenize(vq, vq_codes, args.limit_train, args.limit_val)

    if "recon" in args.stages:
        save("reconstructions", {"klvae": reconstruction_quality(kl_ref, classifier, val_x, val_y),
                                 "vqvae": reconstruction_quality(vq, classifier, val_x, val_y)})

    # 3. a discrete AR prior over a VQ-VAE of the same budgets, and sample quality of both
    if "compare" in args.stages:
        ar, asecs = run("configs/ar.yaml", out, "ar", [f"data.params.codes={vq_codes}", *common_prior, *PRIOR_SHAPE,
                                                       "model.params.positions=learned"], args.prior_steps)
        save("vqvae", {"train_s": vsecs, **tokenizer_quality(vq, val_x)})
        save("ar", {**val_nll(ar, vq_codes), "train_s": asecs, "params": params(ar)})
        save("givt", {**val_nll(givt, codes_ref), "params": params(givt)})
        save("samples", {
            "ar": sample_quality(ar, classifier, val_x, args.num_samples),
            f"ar_cfg{args.cfg:g}": sample_quality(ar, classifier, val_x, args.num_samples, cfg_scale=args.cfg),
            "givt": sample_quality(givt, classifier, val_x, args.num_samples),
            f"givt_dbcfg{args.cfg:g}": sample_quality(givt, classifier, val_x, args.num_samples,
                                                       cfg_scale=args.cfg),
        })

    # 4. masked GIVT vs a discrete MaskGIT over the VQ-VAE, same shape and steps, same decoding steps
    if "masked" in args.stages:
        mgivt, msecs = run("configs/givt_maskgit.yaml", out, f"givt_maskgit_b{args.ref_beta:g}",
                           [f"data.params.codes={codes_ref}", *common_prior, *PRIOR_SHAPE], args.prior_steps)
        mg, gsecs = run("configs/maskgit.yaml", out, "maskgit", [f"data.params.codes={vq_codes}", *common_prior,
                                                                 *PRIOR_SHAPE], args.prior_steps)
        save("givt_maskgit", {**val_nll(mgivt, codes_ref), "train_s": msecs, "params": params(mgivt)})
        save("maskgit", {**val_nll(mg, vq_codes), "train_s": gsecs, "params": params(mg)})
        steps = {"steps": args.masked_steps}
        save("masked_samples", {
            "maskgit": sample_quality(mg, classifier, val_x, args.num_samples, **steps),
            f"maskgit_cfg{args.cfg:g}": sample_quality(mg, classifier, val_x, args.num_samples, cfg_scale=args.cfg,
                                                       **steps),
            "givt_maskgit": sample_quality(mgivt, classifier, val_x, args.num_samples, **steps),
            f"givt_maskgit_dbcfg{args.cfg:g}": sample_quality(mgivt, classifier, val_x, args.num_samples,
                                                               cfg_scale=args.cfg, **steps),
        })

    # 5. DB-CFG on the trained GIVT: the rejection sampler's acceptance and sample quality per weight w
    if "dbcfg" in args.stages:
        save("dbcfg_sweep", {f"{w:g}": sample_quality(givt, classifier, val_x, args.num_samples, cfg_scale=w)
                             for w in args.cfg_sweep})


if __name__ == "__main__":
    main()
