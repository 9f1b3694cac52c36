"""``python scripts/evaluate.py CHECKPOINT [--json out.json] [--fid auto|domain|inception|none] ...``.

A tokenizer checkpoint: its modality's reconstruction metrics (images: MSE, PSNR, SSIM, LPIPS, rFID;
sequences: MSE, MAE, SNR, spectrum distance) and codebook usage (fraction used, perplexity, dead
codes; per level for residual quantizers) over a whole split.
A prior checkpoint: N generated samples (class-balanced when conditional) against the real split,
scored by the modality (images: FID, precision and recall on the same features, the domain
classifier's accuracy on class-conditional samples; sequences: spectral Fréchet distance and
class accuracy), plus the code usage of the samples.
Both print a table, write JSON with ``--json``, and write ``report.md`` with plots into ``--out``.
A model with MoE layers also gets what its experts learned (:mod:`tokenforge.moe_report`): load
balance, router entropy, drop rate and expert x class / code value / position routing, measured on
the evaluated data (a prior: teacher-forced on its own samples), and the load history of training.
Every FID is labelled with its feature extractor, sample counts and resolution.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from data.atomic import atomic_write_text
from layers.moe.recording import RoutingRecorder
from metrics.codebook import CodebookUsage
from metrics.latent import LatentStatistics
from stage1.audio_bitrate import bitrate_table_for
from stage1.depth_eval import DepthReconstruction, residual_depth
from stage1.modalities import Evaluator, modality_of
from tokenforge.cli import positive_int
from tokenforge.moe_report import load_history, routing_plots, routing_results
from tokenforge.report import is_rows, rows_table, write_report
from tokenforge.runs import open_run
from tokenforge.sampling_args import add_sampling_flags, sampling_kwargs
from tokenforge.usage_plot import save_usage_histogram


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="evaluate.py", description=__doc__,
                                formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("checkpoint", help="a tokenizer or prior checkpoint, e.g. runs/vqgan/checkpoints/last.ckpt")
    p.add_argument("overrides", nargs="*", help="overrides of the stored data config, e.g. data.params.root=/my/images")
    p.add_argument("--json", dest="json_path", help="also write the results to this JSON file")
    p.add_argument("--out", help="folder for report.md and plots (default: <run>/eval)")
    p.add_argument("--split", default="val", choices=["train", "val"], help="real split to compare with (default val)")
    p.add_argument("--batch-size", type=positive_int, default=64)
    p.add_argument("--limit", type=positive_int, default=None,
                   help="use only the first N real examples (quick checks)")
    p.add_argument("--fid", default="auto", choices=["auto", "domain", "inception", "none"],
                   help="FID features: auto = Inception if its weights are present, else the domain classifier "
                        "(--classifier or runs/domain/<dataset>.pt), else none")
    p.add_argument("--classifier", help="domain classifier checkpoint (scripts/train_domain_classifier.py)")
    p.add_argument("--inception-weights", help="path of weights-inception-2015-12-05-6726825d.pth")
    p.add_argument("--lpips", default="auto", choices=["auto", "vgg", "alex", "none"],
                   help="LPIPS backbone; auto = vgg when its torchvision weights are cached, else skipped")
    p.add_argument("--num-samples", type=positive_int, default=1000,
                   help="samples to generate for a prior (default 1000)")
    p.add_argument("--tokenizer", help="tokenizer checkpoint for a prior (default: the one it records)")
    add_sampling_flags(p, argv)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p.parse_intermixed_args(argv)


def split_loader(dm: Any, split: str) -> Any:
    dm.setup("validate")
    if split == "train":
        dm.setup("fit")
        return dm.split_dataloader("train") if hasattr(dm, "split_dataloader") else dm.train_dataloader()
    return dm.val_dataloader()


def _limited(loader: Any, limit: int | None):
    seen = 0
    for batch in loader:
        x, labels = batch["x"], batch.get("label")
        if limit is not None:
            keep = max(0, limit - seen)
            x, labels = x[:keep], None if labels is None else labels[:keep]
            if len(x) == 0:
                return
        seen += len(x)
        yield x, labels


@torch.no_grad()
def evaluate_tokenizer(model: Any, loader: Any, device: str, evaluator: Evaluator, limit: int | None = None,
                       recorder: RoutingRecorder | None = None,
                       ) -> tuple[dict[str, Any], torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
    """The modality's reconstruction metrics and codebook usage over a split; returns (results, code
    counts, the first inputs and their reconstructions). ``recorder`` (entered by the caller) tallies
    the routing of one encode + decode per batch against the batch's labels."""
    spec = model.code_spec
    levels = spec.get("levels") or {None: spec}  # hierarchical codes (VQ-VAE-2): usage per level, "<level>/<stat>"
    usages = {name: CodebookUsage(lv["codebook_size"], depth=lv.get("depth")).to(device) for name, lv in levels.items()
              if lv.get("codebook_size")}  # continuous latents (KL-VAE) have no codebook: latent statistics instead
    latents = LatentStatistics(model.latent_dim).to(device) if hasattr(model, "posterior") else None
    depth = residual_depth(model)  # residual codes: also decode with the first d levels, d = 1..D
    per_depth = DepthReconstruction(depth) if depth else None
    bitrates = bitrate_table_for(model, {"device": device})  # residual audio codecs: kbps vs quality per depth
    seen, first = 0, None
    for x, labels in _limited(loader, limit):
        x = x.to(device)
        codes = model.encode(x)
        xrec = model.decode(codes).clamp(-1, 1)
        if recorder is not None:
            recorder.commit(labels=labels)
        for name, usage in usages.items():
            usage.update(codes if name is None else codes[name])
        if latents is not None:
            q = model.posterior(x)
            latents.update(q.mean, q.logvar)
        if per_depth is not None:
            per_depth.update(model, x, codes)
        if bitrates is not None:
            bitrates.update(model, x, codes)
        if recorder is not None:
            recorder.discard()  # the posterior and the partial-depth decodes are not counted twice
        evaluator.update(real=x, fake=xrec, labels=labels)
        if first is None:
            first = (x[:8].cpu(), xrec[:8].cpu())
        seen += len(x)
    results = evaluator.compute()
    for name, usage in usages.items():
        results |= {k if name is None else f"{name}/{k}": _num(v) for k, v in usage.compute().items()}
    if per_depth is not None:
        results |= per_depth.compute()
    if bitrates is not None:
        results["bitrate_table"] = bitrates.compute()
    if latents is not None:  # per-channel mean/std of the posterior means, KL per dim (nats per element)
        results |= {k: v.tolist() if v.dim() else _num(v) for k, v in latents.compute().items()}
    results["codebook_size"] = spec.get("codebook_size")
    results["num_examples"] = seen
    counts = [u.counts().cpu() for u in usages.values()]
    if not counts:
        return results, None, first
    return results, counts[0] if len(counts) == 1 else torch.cat([c.reshape(-1) for c in counts]), first


@torch.no_grad()
def evaluate_prior(prior: Any, tokenizer: Any, loader: Any, args: argparse.Namespace, evaluator: Evaluator,
                   recorder: RoutingRecorder | None = None,
                   ) -> tuple[dict[str, Any], torch.Tensor | None, torch.Tensor | None]:
    """Generate samples and compare them with the real split; returns (results, first samples, their classes).
    ``recorder`` (entered by the caller) tallies the routing of the training forward on each batch of
    samples (their classes; their codes as the token values), not the sampling loop's."""
    device = args.device
    kwargs = sampling_kwargs(prior, args)
    n = args.num_samples
    labels = torch.arange(n, device=device) % prior.num_classes if prior.num_classes else None
    gen = torch.Generator(device=device).manual_seed(args.seed)
    real_count, shown = 0, None
    for x, real_labels in _limited(loader, args.limit):
        evaluator.update(real=x.to(device), labels=None if real_labels is None else real_labels.to(device))
        real_count += len(x)
    discrete = not prior.layout.continuous  # GIVT samples real-valued latents: no code usage to count
    code_counts = CodebookUsage(prior.codebook_size, depth=prior.code_depth).to(device) if discrete else None
    for start in range(0, n, args.batch_size):
        m = min(args.batch_size, n - start)
        cond = labels[start:start + m] if labels is not None else None
        codes = prior.sample(m, cond=cond, generator=gen, **kwargs)
        if code_counts is not None:
            code_counts.update(codes)
        if recorder is not None:
            recorder.discard()
            prior.loss(codes, cond)
            recorder.commit(labels=cond, values=prior.flatten_codes(codes) if discrete else None)
        fake = tokenizer.decode(codes.to(device)).clamp(-1, 1)
        evaluator.update(fake=fake, labels=cond)
        if shown is None:
            shown = fake[:64].cpu()
    results: dict[str, Any] = {"num_samples": n, "num_real": real_count, "sampling": kwargs,
                               "class_balanced": labels is not None}
    if code_counts is not None:
        usage = code_counts.compute()
        results["sample_code_usage"] = _num(usage["usage"])
        results["sample_code_perplexity"] = _num(usage["perplexity"])
    results |= evaluator.compute()
    shown_labels = labels[:64].cpu() if labels is not None else None
    return results, shown, shown_labels


def _num(v: Any) -> float | int:
    v = v.item() if torch.is_tensor(v) else v
    return int(v) if isinstance(v, int) else float(v)


def format_table(results: dict[str, Any]) -> str:
    width = max(len(k) for k in results)
    lines = [f"{'metric':<{width}}  value", f"{'-' * width}  {'-' * 12}"]
    for k, v in results.items():
        if isinstance(v, float):
            shown = f"{v:.4%}" if k.startswith("usage") else (f"{v:.6g}" if math.isfinite(v) else str(v))
        else:
            shown = str(v)
        lines.append(f"{k:<{width}}  {shown}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    run = open_run(args.checkpoint, map_location=args.device, tokenizer=args.tokenizer)
    kind, tokenizer, prior = run.kind, run.tokenizer, run.model
    out_dir = Path(args.out) if args.out else Path(args.checkpoint).resolve().parent.parent / "eval"
    plots: dict[str, Path] = {}
    dm = run.datamodule(args.overrides, args.batch_size)
    modality = modality_of(tokenizer.code_spec)
    options = {"fid": args.fid, "classifier": args.classifier, "lpips": args.lpips, "device": args.device,
               "inception_weights": args.inception_weights,
               "dataset": (run.data_config().get("params") or {}).get("dataset")}
    loader = split_loader(dm, args.split)
    recorder = RoutingRecorder(run.model)
    if kind == "tokenizer":
        evaluator = modality.reconstruction_evaluator(options)
        with recorder:
            results, counts, first = evaluate_tokenizer(tokenizer, loader, args.device, evaluator, args.limit,
                                                        recorder if recorder else None)
        if counts is not None:
            plots["usage histogram (codes sorted by frequency)"] = save_usage_histogram(
                counts, out_dir / "usage_histogram.png", title=f"{Path(args.checkpoint).name} ({args.split})")
        if first is not None:
            plots["reconstructions (inputs and their reconstructions)"] = modality.save_reconstructions(
                *first, out_dir / "reconstructions.png")
    else:
        evaluator = modality.sample_evaluator(options)
        with recorder:
            results, shown, shown_labels = evaluate_prior(prior, tokenizer, loader, args, evaluator,
                                                          recorder if recorder else None)
        if shown is not None:
            plots["samples"] = modality.save_preview(shown, out_dir / "samples.png", shown_labels)
    if recorder:
        results |= routing_results(recorder)
        plots |= routing_plots(recorder, load_history(run.checkpoint), out_dir, getattr(dm, "class_names", None))
    notes = evaluator.notes
    results = {"checkpoint": str(args.checkpoint), "kind": kind, "split": args.split, **results, "notes": notes}
    results["plots"] = {k: str(v) for k, v in plots.items()}
    report = write_report(out_dir / "report.md", results, plots)
    print(format_table({k: v for k, v in results.items() if k not in ("checkpoint", "plots", "notes")
                        and not is_rows(v)}))
    for k, v in results.items():
        if is_rows(v):
            print(f"\n{k}:\n{rows_table(v)}")
    for note in notes:
        print(f"note: {note}")
    print(f"report: {report}")
    if args.json_path:
        atomic_write_text(args.json_path, json.dumps(results, indent=2, sort_keys=True))
        print(f"wrote {args.json_path}")
    return results


if __name__ == "__main__":  # pragma: no cover
    main()
