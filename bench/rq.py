"""RQ-VAE / RQ-Transformer measurements (issue 13), everything in one process.

    python bench/rq.py speed  [--out /tmp/rq_bench] [--tok-steps 400] [--prior-steps 600]
    python bench/rq.py timing [--out /tmp/rq_bench]
    python bench/rq.py depth  [--out /tmp/rq_bench] [--tok-steps 400]
    python bench/rq.py fmnist-depth   [--out /tmp/rq_fmnist] [--tok-steps 300] [--classifier PT]
    python bench/rq.py fmnist-nll     [--out /tmp/rq_fmnist] [--prior-steps 300] [--seeds 0 1]
    python bench/rq.py fmnist-quality [--out /tmp/rq_fmnist] [--prior-steps 300] [--num-samples 500]
    python bench/rq.py rq-vs-vq       [--out /tmp/rq_fmnist] [--cmp-steps 250]

``speed``: an RQ-VAE (configs/rqvae.yaml: emoji 32 px -> 8x8 positions x 4 levels, one shared
codebook) is trained for ``--tok-steps`` and tokenizes emoji; on those codes an RQ-Transformer
(spatial + depth transformers) and the flat AR prior (configs/ar.yaml) over the same codes flattened
to T*D = 256 tokens are trained with the same width, the same number of blocks (so the same
parameter count to within the depth transformer's level-position table), batch, learning rate and
``--prior-steps``. Reported: validation NLL per code of both, and the sampling time of both with KV
caches for one batch, with the number of transformer steps of each and their measured per-step cost.

``timing``: the sampling part of ``speed`` alone, on freshly initialised priors (seconds, not hours).

``depth``: the depth trade-off. RQ-VAEs with the same 8x8 grid and codebook at D = 1, 2, 4, 8 and
equal training steps: PSNR/SSIM/MSE of the validation split (rFID needs a feature extractor; see the
results file), and RQ-VAE 4x4x4 (f8) against a VQ autoencoder 8x8 (f4) with the same encoder family
and the same 64 codes per image.

Fashion-MNIST (small enough for a shared CPU; the ``fmnist-*`` commands share one tokenizer under ``--out``):
one RQ-VAE (configs/rqvae_fmnist.yaml: 7x7 positions, one shared 256-entry codebook) with D = 8 levels and
SoundStream quantizer dropout, so the same model decodes at every depth d <= 8.

``fmnist-depth``: PSNR/SSIM/MSE and domain rFID (features of the project's Fashion-MNIST classifier, not
Inception) of the validation images decoded with the first d = 1, 2, 4, 8 levels, through
``tokenforge.evaluate.evaluate_tokenizer`` (the d = 8 pass also gives evaluate's per-depth PSNR, d = 1..8).

``fmnist-nll``: the first 4 levels of that RQ-VAE's codes (7x7x4, the model's d = 4 operating point) feed a
class-conditional RQ-Transformer and the flat AR prior over the same codes flattened to 196 tokens, with
the same width, block count (RQ: spatial + depth blocks = AR blocks), batch, learning rate and steps, for
each ``--seeds``; reported: validation NLL per code (nats) of both and their ratio.

``fmnist-quality``: those priors (seed = first of ``--seeds``) and a MaskGIT prior of the same size and
budget sample ``--num-samples`` class-balanced images each, scored as in bench/vq_diffusion_quality.py:
domain FID and domain-classifier accuracy against Fashion-MNIST test images.

``rq-vs-vq``: Fashion-MNIST resized to 32 px; RQ-VAE 4x4x4 (f8) against a VQ autoencoder 8x8 (f4), same
encoder family, same 256-entry codebook, so both spend 64 codes = 512 bits per image; PSNR/SSIM/MSE.

Budgets are small (shared 2-core CPU, 1 thread): the GAN and LPIPS terms are off (``disc_start`` past
the end, ``perceptual_weight=0``) so that every step is an autoencoder step; this changes the absolute
numbers, not the comparisons, which all use the same recipe.
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

CONFIGS = REPO / "configs"
FAST_TOKENIZER = ["model.params.disc_start=1000000000", "model.params.perceptual_weight=0.0",
                  "checkpoint_every_n_steps=100000"]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def train(config: Path, runs: Path, name: str, overrides: list[str]) -> Path:
    """Train through the project's train command; returns the last checkpoint."""
    from tokenforge.train import main

    ckpt = runs / name / "checkpoints" / "last.ckpt"
    steps = next(int(o.split("=")[1]) for o in overrides if o.startswith("trainer.max_steps="))
    fresh = []
    if ckpt.is_file():
        done = torch.load(ckpt, map_location="cpu", weights_only=True).get("global_step")
        if done == steps:  # a finished run of this budget (an interrupted one is trained again)
            log(f"reusing {ckpt}")
            return ckpt
        fresh = ["--fresh"]
    start = time.perf_counter()
    main([str(config), "--runs", str(runs), "--name", name, *fresh, "trainer.enable_progress_bar=false", *overrides])
    log(f"trained {name} in {time.perf_counter() - start:.0f} s")
    return ckpt


def tokenize(ckpt: Path, out: Path) -> Path:
    from tokenforge.tokenize import main

    if not (out / "manifest.json").is_file():
        main([str(ckpt), "--out", str(out), "--batch-size", "128"])
    return out


def tokenizer_run(args: argparse.Namespace, name: str, extra: list[str]) -> Path:
    steps = args.tok_steps
    return train(CONFIGS / "rqvae.yaml", args.out / "runs", name,
                 [f"trainer.max_steps={steps}", f"trainer.val_check_interval={steps}", *FAST_TOKENIZER, *extra])


def params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def val_nll(prior: Any, codes: Path) -> float:
    """Mean NLL per code (nats) over the whole validation split."""
    from data.codes import CodesDataModule

    dm = CodesDataModule(str(codes), batch_size=64)
    dm.setup("fit")
    total, count = 0.0, 0
    prior.eval()
    for batch in dm.val_dataloader():
        codes_b, labels, context = prior.unpack_batch(batch)
        n = codes_b.numel()
        total += float(prior.loss(codes_b, labels, context).nll) * n
        count += n
    return total / count


@torch.no_grad()
def val_nll_per_level(prior: Any, codes: Path) -> list[float]:
    """Mean NLL per code (nats) of each depth level over the validation split, for an RQ-Transformer
    (its ``nll_level{d}`` stats) or a flat AR prior (depth-minor flattening: token ``t`` is level ``t % D``)."""
    import torch.nn.functional as F

    from data.codes import CodesDataModule

    dm = CodesDataModule(str(codes), batch_size=64)
    dm.setup("fit")
    prior.eval()
    sums, count = None, 0
    for batch in dm.val_dataloader():
        codes_b, labels, context = prior.unpack_batch(batch)
        depth = codes_b.shape[-1]
        if hasattr(prior, "depth_transformer"):
            stats = prior.loss(codes_b, labels, context).stats
            per = torch.stack([stats[f"nll_level{d}"] for d in range(depth)]) * len(codes_b)
        else:
            logits, _ = prior(codes_b, labels, context)
            target = prior.flatten_codes(codes_b)
            nll = F.cross_entropy(logits.float().transpose(1, 2), target, reduction="none")  # (B, N)
            per = nll.view(len(codes_b), -1, depth).mean(1).sum(0)
        sums = per if sums is None else sums + per
        count += len(codes_b)
    return [float(v) / count for v in sums]


class StepTimer:
    """Counts the calls of a module's forward and the wall time spent in them."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.calls, self.seconds = 0, 0.0
        real = module.forward

        def timed(*a: Any, **k: Any) -> Any:
            start = time.perf_counter()
            out = real(*a, **k)
            self.seconds += time.perf_counter() - start
            self.calls += 1
            return out

        module.forward = timed

    @property
    def per_step_ms(self) -> float:
        return 1e3 * self.seconds / max(1, self.calls)


def time_sampling(prior: Any, modules: dict[str, torch.nn.Module], batch: int, repeats: int) -> dict[str, Any]:
    """Best wall time of ``sample(batch)`` over ``repeats`` runs, with per-module step counts/costs of the best run."""
    prior.sample(2, generator=torch.Generator().manual_seed(0))  # warm-up
    best: dict[str, Any] = {"seconds": math.inf}
    for r in range(repeats):
        timers = {k: StepTimer(m) for k, m in modules.items()}
        start = time.perf_counter()
        prior.sample(batch, generator=torch.Generator().manual_seed(r))
        wall = time.perf_counter() - start
        for m in modules.values():  # unwrap
            del m.forward
        if wall < best["seconds"]:
            best = {"seconds": wall, **{f"{k}_steps": t.calls for k, t in timers.items()},
                    **{f"{k}_ms_per_step": t.per_step_ms for k, t in timers.items()},
                    **{f"{k}_seconds": t.seconds for k, t in timers.items()}}
    return best


def speed(args: argparse.Namespace) -> dict[str, Any]:
    from stage2.prior import load_prior

    tok = tokenizer_run(args, "rqvae_d4", [])
    codes = tokenize(tok, args.out / "codes_d4")
    runs, steps = args.out / "runs", args.prior_steps
    common = [f"trainer.max_steps={steps}", f"trainer.val_check_interval={steps}", "trainer.limit_val_batches=1.0",
              f"data.params.codes={codes}", f"data.params.batch_size={args.batch}", "model.params.dropout=0.0",
              f"model.params.dim={args.dim}", "model.params.heads=8", "model.params.warmup_steps=100",
              "model.params.lr=1.0e-3", "checkpoint_every_n_steps=100000"]
    rq_ckpt = train(CONFIGS / "rq_transformer.yaml", runs, "rq_transformer",
                    [*common, f"model.params.spatial_layers={args.spatial_layers}",
                     f"model.params.depth_layers={args.depth_layers}"])
    ar_ckpt = train(CONFIGS / "ar.yaml", runs, "ar_flat",
                    [*common, f"model.params.depth={args.spatial_layers + args.depth_layers}"])
    rq, ar = load_prior(rq_ckpt), load_prior(ar_ckpt)
    result: dict[str, Any] = {"code_spec": rq.code_spec, "tokenizer_steps": args.tok_steps, "prior_steps": steps,
                              "batch": args.batch, "threads": torch.get_num_threads(),
                              "rq_params": params(rq), "ar_params": params(ar),
                              "rq_arch": f"dim {args.dim}, spatial {args.spatial_layers} + depth "
                                         f"{args.depth_layers} blocks",
                              "ar_arch": f"dim {args.dim}, {args.spatial_layers + args.depth_layers} blocks"}
    log("validation NLL ...")
    result["rq_val_nll"] = val_nll(rq, codes)
    result["ar_val_nll"] = val_nll(ar, codes)
    log(f"val NLL per code: RQ {result['rq_val_nll']:.4f}, AR {result['ar_val_nll']:.4f}")
    log("sampling ...")
    result["rq_sampling"] = time_sampling(rq, {"spatial": rq.spatial, "depth": rq.depth_transformer},
                                          args.sample_batch, args.repeats)
    result["ar_sampling"] = time_sampling(ar, {"transformer": ar.transformer}, args.sample_batch, args.repeats)
    result["sample_batch"] = args.sample_batch
    result["speedup"] = result["ar_sampling"]["seconds"] / result["rq_sampling"]["seconds"]
    result["nll_ratio"] = result["rq_val_nll"] / result["ar_val_nll"]
    log(f"sampling {args.sample_batch}: RQ {result['rq_sampling']['seconds']:.2f} s, "
        f"AR {result['ar_sampling']['seconds']:.2f} s -> {result['speedup']:.2f}x")
    return result


def timing(args: argparse.Namespace) -> dict[str, Any]:
    """Sampling speed alone, on freshly initialised priors of the speed setting (the work per step does
    not depend on the weights' values), plus the validation NLL of whatever prior checkpoints exist
    under ``--out`` (with the steps they were trained for, which need not be equal)."""
    from stage2.ar import ARPrior
    from stage2.prior import load_prior
    from stage2.rq_transformer import RQTransformer

    spec = {"grid": [8, 8], "depth": 4, "codebook_size": 512, "continuous_dim": None}
    torch.manual_seed(0)
    rq = RQTransformer(code_spec=spec, dim=args.dim, spatial_layers=args.spatial_layers,
                       depth_layers=args.depth_layers, heads=8).eval()
    ar = ARPrior(code_spec=spec, dim=args.dim, depth=args.spatial_layers + args.depth_layers, heads=8).eval()
    result: dict[str, Any] = {"code_spec": spec, "rq_params": params(rq), "ar_params": params(ar),
                              "sample_batch": args.sample_batch, "threads": torch.get_num_threads()}
    result["rq_sampling"] = time_sampling(rq, {"spatial": rq.spatial, "depth": rq.depth_transformer},
                                          args.sample_batch, args.repeats)
    result["ar_sampling"] = time_sampling(ar, {"transformer": ar.transformer}, args.sample_batch, args.repeats)
    result["speedup"] = result["ar_sampling"]["seconds"] / result["rq_sampling"]["seconds"]
    log(f"sampling {args.sample_batch}: RQ {result['rq_sampling']['seconds']:.2f} s, "
        f"AR {result['ar_sampling']['seconds']:.2f} s -> {result['speedup']:.2f}x")
    codes = args.out / "codes_d4"
    for name in ("rq_transformer", "ar_flat"):
        ckpt = args.out / "runs" / name / "checkpoints" / "last.ckpt"
        if ckpt.is_file() and codes.is_dir():
            step = torch.load(ckpt, map_location="cpu", weights_only=True).get("global_step")
            result[f"{name}_val_nll"] = {"steps": step, "nll": val_nll(load_prior(ckpt), codes)}
            log(f"{name}: {result[f'{name}_val_nll']}")
    return result


@torch.no_grad()
def reconstruction(ckpt: Path, limit: int | None = None) -> dict[str, float]:
    """MSE/PSNR/SSIM (and per-depth PSNR for residual codes) over the validation split."""
    from metrics.reconstruction import ReconstructionMetrics
    from stage1.depth_eval import DepthReconstruction, residual_depth
    from tokenforge.runs import open_run

    run = open_run(ckpt, expect="tokenizer")
    tok, dm = run.model, run.datamodule(batch_size=128)
    dm.setup("validate")
    metric = ReconstructionMetrics()
    depth = residual_depth(tok)
    per_depth = DepthReconstruction(depth) if depth else None
    n = 0
    for batch in dm.val_dataloader():
        x = batch["x"]
        codes = tok.encode(x)
        xrec = tok.decode(codes).clamp(-1, 1)
        metric.update(xrec, x)
        n += len(x)
        if per_depth is not None:
            per_depth.update(tok, x, codes)
    out = {k: float(v) for k, v in metric.compute().items()} | {"num_images": n}
    if per_depth is not None:
        out |= per_depth.compute()
    return out


def depth(args: argparse.Namespace) -> dict[str, Any]:
    result: dict[str, Any] = {"tokenizer_steps": args.tok_steps}
    for d in (1, 2, 4, 8):
        ckpt = tokenizer_run(args, f"rqvae_d{d}", [f"model.params.quantizer.params.depth={d}"])
        result[f"rq_8x8x{d}"] = reconstruction(ckpt)
        log(f"D={d}: {result[f'rq_8x8x{d}']}")
    vq = ("model.params.quantizer={target: stage1.quantizers.vq.VectorQuantizer, params: {codebook_size: 512, "
          "codebook: ema, decay: 0.99, beta: 0.25, kmeans_init: true, restart_dead: true}}")
    result["vq_8x8"] = reconstruction(tokenizer_run(args, "vq_8x8", [vq]))
    f8 = "model.params.encoder.ch_mult=[1,2,4,4]"
    result["rq_4x4x4"] = reconstruction(tokenizer_run(args, "rqvae_4x4x4", [f8]))
    log(f"VQ 8x8: {result['vq_8x8']}\nRQ 4x4x4: {result['rq_4x4x4']}")
    return result


# -- Fashion-MNIST: depth trade-off, NLL vs flat AR, sample quality, RQ 4x4x4 vs VQ 8x8 --------------------
FMNIST_TOKENIZER = CONFIGS / "rqvae_fmnist.yaml"
FMNIST_DEPTH = 8  # levels of the one quantizer-dropout RQ-VAE; the priors model its first PRIOR_LEVELS
PRIOR_LEVELS = 4
DEPTHS = (1, 2, 4, 8)


class FirstLevels:
    """A residual tokenizer seen through its first ``levels`` levels (the bitrate-``levels`` operating
    point of a quantizer-dropout model): ``encode`` keeps those levels, ``decode`` pads the missing ones
    with ``-1``, which the residual quantizer skips (as :func:`stage1.depth_eval.decode_first_levels`)."""

    def __init__(self, tokenizer: Any, levels: int) -> None:
        self.tokenizer, self.levels = tokenizer, int(levels)
        self.full_depth = int(tokenizer.code_spec["depth"])
        if not 1 <= self.levels <= self.full_depth:
            raise ValueError(f"levels must lie in [1, {self.full_depth}], got {levels}")
        self.code_spec = {**tokenizer.code_spec, "depth": self.levels}

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.tokenizer.encode(x)[..., : self.levels]

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        pad = codes.new_full((*codes.shape[:-1], self.full_depth - codes.shape[-1]), -1)
        return self.tokenizer.decode(torch.cat([codes.long(), pad.long()], dim=-1))


def fmnist_rqvae(args: argparse.Namespace) -> Path:
    steps = args.tok_steps
    return train(FMNIST_TOKENIZER, args.out / "runs", f"rqvae_fmnist_d{FMNIST_DEPTH}_dropout", [
        f"trainer.max_steps={steps}", f"trainer.val_check_interval={steps}", "trainer.limit_val_batches=2",
        f"model.params.quantizer.params.depth={FMNIST_DEPTH}",
        f"model.params.quantizer.params.dropout_prob={args.quantizer_dropout}", *FAST_TOKENIZER])


def load_tokenizer_eval(ckpt: Path) -> Any:
    from stage1.tokenizer import load_tokenizer

    return load_tokenizer(ckpt, map_location="cpu").eval()


def classifier_path(args: argparse.Namespace) -> Path:
    """The Fashion-MNIST domain classifier: ``--classifier`` or one trained as bench/vq_diffusion_quality.py does."""
    from bench.vq_diffusion_quality import domain_classifier

    return domain_classifier(argparse.Namespace(classifier=args.classifier), args.out)


def evaluate_levels(tokenizer: Any, loader_of: Any, options: dict[str, Any], limit: int) -> dict[str, Any]:
    """``tokenforge.evaluate.evaluate_tokenizer`` on ``limit`` validation images (the project's metrics)."""
    from stage1.modalities import modality_of
    from tokenforge.evaluate import evaluate_tokenizer

    evaluator = modality_of(tokenizer.code_spec).reconstruction_evaluator(options)
    results, _, _ = evaluate_tokenizer(tokenizer, loader_of(), "cpu", evaluator, limit)
    keep = {k: v for k, v in results.items() if isinstance(v, (int, float, str)) or v is None}
    return keep | {"notes": evaluator.notes}


def fmnist_depth(args: argparse.Namespace) -> dict[str, Any]:
    from tokenforge.runs import open_run

    ckpt = fmnist_rqvae(args)
    tok = load_tokenizer_eval(ckpt)
    dm = open_run(ckpt, expect="tokenizer").datamodule(batch_size=250)
    dm.setup("validate")
    options = {"fid": "domain", "classifier": str(classifier_path(args)), "lpips": "auto", "device": "cpu",
               "dataset": "fashion_mnist"}
    result: dict[str, Any] = {"tokenizer": str(ckpt), "tokenizer_steps": args.tok_steps, "depth": FMNIST_DEPTH,
                              "quantizer_dropout": args.quantizer_dropout, "val_images": args.val_images,
                              "tokenizer_params": params(tok)}
    for d in DEPTHS:
        view = tok if d == FMNIST_DEPTH else FirstLevels(tok, d)  # the full model also gives psnr_levels1..8
        result[f"d{d}"] = evaluate_levels(view, dm.val_dataloader, options, args.val_images)
        r = result[f"d{d}"]
        log(f"d={d}: PSNR {r['psnr']:.2f} SSIM {r['ssim']:.4f} rFID(domain) {r.get('rfid', float('nan')):.2f}")
    return result


@torch.no_grad()
def prefix_code_folder(ckpt: Path, out: Path, levels: int, limit_train: int, limit_val: int) -> Path:
    """Codes of the first ``levels`` levels of a residual tokenizer, with labels, as a code folder.

    The manifest names the tokenizer, whose ``decode`` wants all its levels: decode these codes through
    :class:`FirstLevels` (as this bench does), not through ``scripts/sample.py``.
    """
    from data.codes import CodeWriter, sha256_file
    from tokenforge.runs import open_run

    if (out / "manifest.json").is_file() and json.loads((out / "manifest.json").read_text())["complete"]:
        return out
    view = FirstLevels(load_tokenizer_eval(ckpt), levels)
    dm = open_run(ckpt, expect="tokenizer").datamodule(
        [f"data.params.limit_train={limit_train}", f"data.params.limit_val={limit_val}"], batch_size=500)
    dm.setup("fit")
    writer = CodeWriter(out, view.code_spec, ckpt, sha256_file(ckpt), shard_size=max(limit_train, limit_val))
    for split, loader in (("train", dm.split_dataloader("train")), ("val", dm.val_dataloader())):
        codes, labels = [], []
        for batch in loader:
            codes.append(view.encode(batch["x"]).to(torch.int64))
            labels.append(batch["label"])
        writer.write_shard(split, 0, torch.cat(codes), torch.cat(labels))
    writer.finalize()
    log(f"wrote {out}")
    return out


def fmnist_codes(args: argparse.Namespace) -> Path:
    return prefix_code_folder(fmnist_rqvae(args), args.out / f"codes_fmnist_first{PRIOR_LEVELS}",
                              PRIOR_LEVELS, args.train_codes, args.val_images)


def fmnist_prior(args: argparse.Namespace, kind: str, codes: Path, seed: int) -> Any:
    """Train (or reuse) a small class-conditional prior of one kind on ``codes``; all kinds share width,
    heads, block count, batch, learning rate, schedule and steps."""
    from stage2.prior import load_prior

    steps, blocks = args.prior_steps, args.spatial_layers + args.depth_layers
    common = [f"seed={seed}", f"trainer.max_steps={steps}", f"trainer.val_check_interval={steps}",
              "trainer.limit_val_batches=2", f"data.params.codes={codes}", f"data.params.batch_size={args.batch}",
              "model.params.dropout=0.0", f"model.params.dim={args.dim}", f"model.params.heads={args.heads}",
              "model.params.warmup_steps=50", "model.params.lr=1.0e-3", "checkpoint_every_n_steps=100000"]
    config, extra = {
        "rq": ("rq_transformer.yaml", [f"model.params.spatial_layers={args.spatial_layers}",
                                       f"model.params.depth_layers={args.depth_layers}"]),
        "ar": ("ar.yaml", [f"model.params.depth={blocks}"]),
        "maskgit": ("maskgit.yaml", [f"model.params.depth={blocks}"]),
    }[kind]
    ckpt = train(CONFIGS / config, args.out / "runs", f"{kind}_s{seed}", [*common, *extra])
    return load_prior(ckpt).eval()


def fmnist_nll(args: argparse.Namespace) -> dict[str, Any]:
    codes = fmnist_codes(args)
    result: dict[str, Any] = {"codes": str(codes), "prior_steps": args.prior_steps, "batch": args.batch,
                              "threads": torch.get_num_threads(), "seeds": {}}
    for seed in args.seeds:
        row: dict[str, Any] = {}
        for kind in ("rq", "ar"):
            prior = fmnist_prior(args, kind, codes, seed)
            row[f"{kind}_params"], row[f"{kind}_val_nll"] = params(prior), val_nll(prior, codes)
            row[f"{kind}_val_nll_per_level"] = val_nll_per_level(prior, codes)
        row["ratio"] = row["rq_val_nll"] / row["ar_val_nll"]
        result["seeds"][str(seed)] = row
        log(f"seed {seed}: {row}")
        (args.out / "fmnist-nll.partial.json").write_text(json.dumps(result, indent=2))
    ratios = [r["ratio"] for r in result["seeds"].values()]
    result["mean_ratio"] = sum(ratios) / len(ratios)
    return result


def fmnist_quality(args: argparse.Namespace) -> dict[str, Any]:
    from bench.vq_diffusion_quality import real_test_images, score_variant

    codes, seed = fmnist_codes(args), args.seeds[0]
    decoder = FirstLevels(load_tokenizer_eval(fmnist_rqvae(args)), PRIOR_LEVELS)
    classifier, real = classifier_path(args), real_test_images(args.real)
    priors = {kind: fmnist_prior(args, kind, codes, seed) for kind in ("rq", "ar", "maskgit")}
    score_args = argparse.Namespace(num_samples=args.num_samples, batch=args.sample_batch)
    result: dict[str, Any] = {"codes": str(codes), "seed": seed, "prior_steps": args.prior_steps,
                              "params": {k: params(p) for k, p in priors.items()}, "rows": []}
    for cfg in args.cfg:
        for kind, prior in priors.items():
            kwargs = {"cfg_scale": cfg} if cfg else {}
            row = {"prior": kind, "cfg_scale": cfg,
                   **score_variant(prior, decoder, kwargs, real, classifier, score_args)}
            result["rows"].append(row)
            log(f"{kind} cfg {cfg}: FID {row['fid']:.2f} acc {row['classifier_accuracy']:.3f} "
                f"{row['ms_per_image']:.1f} ms/image")
            (args.out / "fmnist-quality.partial.json").write_text(json.dumps(result, indent=2))
    return result


def rq_vs_vq(args: argparse.Namespace) -> dict[str, Any]:
    """RQ-VAE 4x4x4 (f8) vs VQ 8x8 (f4) on Fashion-MNIST at 32 px: 64 codes of 256 = 512 bits per image each."""
    from tokenforge.runs import open_run

    steps = args.cmp_steps
    common = [f"trainer.max_steps={steps}", f"trainer.val_check_interval={steps}", "trainer.limit_val_batches=2",
              "data.params.size=32", *FAST_TOKENIZER]
    vq = ("model.params.quantizer={target: stage1.quantizers.vq.VectorQuantizer, params: {codebook_size: 256, "
          "codebook: ema, decay: 0.99, beta: 0.25, kmeans_init: true, restart_dead: true}}")
    runs = {"rq_4x4x4": [*common, "model.params.encoder.ch_mult=[1,2,4,4]"], "vq_8x8": [*common, vq]}
    options = {"fid": "none", "lpips": "auto", "device": "cpu"}
    result: dict[str, Any] = {"steps": steps, "val_images": args.val_images}
    for name, overrides in runs.items():
        ckpt = train(FMNIST_TOKENIZER, args.out / "runs", name, overrides)
        tok = load_tokenizer_eval(ckpt)
        dm = open_run(ckpt, expect="tokenizer").datamodule(batch_size=250)
        dm.setup("validate")
        spec = tok.code_spec
        codes = math.prod(spec["grid"]) * (spec.get("depth") or 1)
        result[name] = {"grid": spec["grid"], "depth": spec.get("depth"), "codes_per_image": codes,
                        "bits_per_image": codes * math.log2(spec["codebook_size"]), "params": params(tok),
                        **evaluate_levels(tok, dm.val_dataloader, options, args.val_images)}
        log(f"{name}: {result[name]}")
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("what", choices=["speed", "timing", "depth", "fmnist-depth", "fmnist-nll", "fmnist-quality",
                                    "rq-vs-vq"])
    p.add_argument("--out", type=Path, default=Path("/tmp/rq_bench"))
    p.add_argument("--tok-steps", type=int, default=400)
    p.add_argument("--prior-steps", type=int, default=600)
    p.add_argument("--batch", type=int, default=32, help="prior training batch")
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--spatial-layers", type=int, default=6)
    p.add_argument("--depth-layers", type=int, default=2)
    p.add_argument("--sample-batch", type=int, default=16)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--heads", type=int, default=8, help="attention heads of the priors")
    p.add_argument("--quantizer-dropout", type=float, default=0.5, help="fmnist RQ-VAE: P(a batch uses a prefix)")
    p.add_argument("--classifier", help="Fashion-MNIST domain classifier checkpoint (else one is trained)")
    p.add_argument("--val-images", type=int, default=2000, help="fmnist validation (test-split) images used")
    p.add_argument("--train-codes", type=int, default=20000, help="fmnist training images tokenized for the priors")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="prior seeds (fmnist-nll)")
    p.add_argument("--num-samples", type=int, default=500, help="class-balanced samples per prior (fmnist-quality)")
    p.add_argument("--real", type=int, default=1000, help="real test images for the domain FID")
    p.add_argument("--cfg", type=float, nargs="+", default=[0.0, 1.0], help="guidance scales (fmnist-quality)")
    p.add_argument("--cmp-steps", type=int, default=250, help="training steps of each rq-vs-vq tokenizer")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    args.out.mkdir(parents=True, exist_ok=True)
    commands = {"speed": speed, "timing": timing, "depth": depth, "fmnist-depth": fmnist_depth,
                "fmnist-nll": fmnist_nll, "fmnist-quality": fmnist_quality, "rq-vs-vq": rq_vs_vq}
    result = commands[args.what](args)
    path = args.out / f"{args.what}.json"
    path.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    log(f"wrote {path}")


if __name__ == "__main__":
    main()
