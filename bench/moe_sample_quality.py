"""Sample quality of the router study's priors (issue 21): MoE against dense, by NLL, domain FID and accuracy.

    OMP_NUM_THREADS=1 nice -n 10 python bench/moe_sample_quality.py --codes CODES --prior maskgit \
        --steps 500 --seeds 0 1 2 --classifier CLF --out bench/results/moe_sample_quality.json

Each variant of bench/moe_study.py (dense, token_choice, expert_choice, soft, dense_total: the same
FFN specs, model building and training loop, imported from there) is trained on the Fashion-MNIST
code folder CODES as a class-conditional ``--prior`` (``maskgit`` or ``ar``); then, per trained
prior, ``--num-samples`` class-balanced samples (the same labels, sampler settings and sampling seed
for every variant) are decoded by the folder's tokenizer and scored by
``bench/vq_diffusion_quality.score_variant``: FID on the features of the project's Fashion-MNIST
domain classifier (``metrics.domain_classifier``; comparable only with FIDs of the same checkpoint,
never with Inception FIDs) against ``--real`` test images, and that classifier's accuracy on the
requested classes. Also recorded: the validation NLL (for ``ar`` the exact NLL; for ``maskgit`` the
masked-token cross-entropy with fixed masks, see moe_study.validation_nll).

The AR prior is causal: expert choice and soft MoE mix the tokens of a sequence (they would leak the
future), and ``layers.transformer.Transformer`` refuses them; those variants are recorded as refused.

A reference row scores the tokenizer's reconstructions of training codes (``replay``: the codes of the
requested classes, decoded the same way): what a prior that reproduced its training data would get,
so the gap between a prior and this row is the prior's share.

Results are merged into ``--out`` under the prior's name (a run of ``maskgit`` and one of ``ar`` share
one file) and rewritten after every variant, so an interrupted run keeps what it measured.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the working tree's packages

from bench.moe_study import VARIANTS, load_split, train_variant  # noqa: E402
from bench.vq_diffusion_quality import domain_classifier, real_test_images, score_variant  # noqa: E402
from data.codes import code_folder_info  # noqa: E402

METRICS = ("val_nll", "fid", "classifier_accuracy")
OBJECTIVE = "nll + router aux loss"  # what moe_study.train_variant optimises (token choice: balance + z-loss)


class ReplayPrior:
    """Stands in for a prior in ``score_variant``: "samples" are stored codes of the requested classes,
    taken in order (wrapping round), so the tokenizer's reconstructions are scored like samples."""

    def __init__(self, codes: torch.Tensor, labels: torch.Tensor, num_classes: int) -> None:
        self.num_classes = num_classes
        self.by_class = [codes[labels == c] for c in range(num_classes)]
        self.taken = [0] * num_classes

    def sample(self, n: int, cond: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        out = []
        for c in cond.tolist():
            pool = self.by_class[c]
            out.append(pool[self.taken[c] % len(pool)])
            self.taken[c] += 1
        return torch.stack(out)


def sampler_kwargs(prior: str, cfg: float) -> dict[str, Any]:
    """The sampler settings, the same for every variant: the prior's defaults (MaskGIT: its default
    steps, temperature 1, choice temperature 4.5; AR: temperature 1, no top-k), guidance ``cfg``."""
    return {"cfg_scale": cfg} if cfg else {}


def paired(runs: list[dict[str, Any]], variant: str, metric: str) -> list[float]:
    """Per-seed differences ``variant - dense`` (the variants of a seed share data order and init seed)."""
    dense = {r["seed"]: r[metric] for r in runs if r["variant"] == "dense" and metric in r}
    return [r[metric] - dense[r["seed"]] for r in runs
            if r["variant"] == variant and metric in r and r["seed"] in dense]


def mean_std(values: Sequence[float]) -> dict[str, float]:
    return {"mean": statistics.mean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "n": len(values)}


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for variant in dict.fromkeys(r["variant"] for r in runs):
        rs = [r for r in runs if r["variant"] == variant]
        if "refused" in rs[0]:
            summary[variant] = {"refused": rs[0]["refused"]}
            continue
        summary[variant] = {"parameters": rs[0]["parameters"],
                            **{m: mean_std([r[m] for r in rs]) for m in METRICS},
                            **{f"{m}_minus_dense": mean_std(d) for m in METRICS if (d := paired(runs, variant, m))}}
    return summary


def markdown_rows(summary: dict[str, Any]) -> list[str]:
    rows = ["| variant | parameters | val NLL | domain FID | classifier acc. | ΔNLL vs dense | ΔFID vs dense | "
            "Δacc vs dense |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for variant, s in summary.items():
        if "refused" in s:
            rows.append(f"| {variant} | refused: causal model | | | | | | |")
            continue
        cells = [f"{s['val_nll']['mean']:.3f} ± {s['val_nll']['std']:.3f}",
                 f"{s['fid']['mean']:.2f} ± {s['fid']['std']:.2f}",
                 f"{s['classifier_accuracy']['mean']:.1%} ± {s['classifier_accuracy']['std']:.1%}"]
        for m, fmt in (("val_nll", "{:+.3f} ± {:.3f}"), ("fid", "{:+.2f} ± {:.2f}"), ("classifier_accuracy",
                                                                                       "{:+.1%} ± {:.1%}")):
            d = s.get(f"{m}_minus_dense")
            cells.append(fmt.format(d["mean"], d["std"]) if d and variant != "dense" else "")
        rows.append(f"| {variant} | {s['parameters']:,} | " + " | ".join(cells) + " |")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--codes", type=Path, required=True, help="Fashion-MNIST code folder (labels included)")
    ap.add_argument("--tokenizer", type=Path, help="tokenizer checkpoint (default: the one the manifest names)")
    ap.add_argument("--classifier", help="Fashion-MNIST domain classifier (default: trained into --work)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/moe_sample_quality"), help="scratch folder")
    ap.add_argument("--prior", choices=("maskgit", "ar"), default="maskgit")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--eval-every", type=int, default=250)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--depth", type=int, default=2)
    ap.add_argument("--limit-val", type=int, default=1024)
    ap.add_argument("--num-samples", type=int, default=1000, help="class-balanced samples per trained prior")
    ap.add_argument("--sample-batch", type=int, default=100, help="samples per sample() call (expert choice "
                    "routes within a batch, so this is part of the sampler settings)")
    ap.add_argument("--real", type=int, default=1000, help="Fashion-MNIST test images for the FID")
    ap.add_argument("--cfg", type=float, default=0.0, help="guidance scale (0: plain conditional sampling)")
    ap.add_argument("--out", type=Path, default=Path("bench/results/moe_sample_quality.json"))
    args = ap.parse_args()
    torch.set_num_threads(1)

    from stage1.tokenizer import load_tokenizer

    info = code_folder_info(args.codes)
    tokenizer = load_tokenizer(args.tokenizer or info["tokenizer_path"], map_location="cpu").eval()
    classifier = domain_classifier(argparse.Namespace(classifier=args.classifier), args.work)
    real = real_test_images(args.real)
    xv, yv = load_split(args.codes, "val")
    data = {"spec": info["code_spec"], "num_classes": info["num_classes"], "train": load_split(args.codes, "train"),
            "val": (xv[:args.limit_val], yv[:args.limit_val])}
    score_args = argparse.Namespace(num_samples=args.num_samples, batch=args.sample_batch)
    kwargs = sampler_kwargs(args.prior, args.cfg)
    print(f"{args.prior}: train {len(data['train'][0])} / val {len(data['val'][0])} items, {args.steps} steps x "
          f"batch {args.batch_size}, {args.num_samples} samples vs {args.real} test images", flush=True)

    settings = {k: getattr(args, k) for k in ("steps", "batch_size", "dim", "depth", "limit_val", "num_samples",
                                               "sample_batch", "real", "cfg")}
    everything = json.loads(args.out.read_text()) if args.out.is_file() else {}
    redo = {(v, s) for v in args.variants for s in args.seeds}  # earlier runs of other variants/seeds are kept
    kept = [r for r in everything.get(args.prior, {}).get("runs", [])
            if r.get("settings") == settings and (r["variant"], r["seed"]) not in redo]
    replay = ReplayPrior(*data["train"], data["num_classes"])
    reference = {k: v for k, v in score_variant(replay, tokenizer, {}, real, classifier, score_args).items()
                 if k != "ms_per_image"}
    print(f"  tokenizer reconstructions of train codes: FID {reference['fid']:.2f} "
          f"acc {reference['classifier_accuracy']:.3f}", flush=True)
    record: dict[str, Any] = {"args": {k: str(v) for k, v in vars(args).items()}, "sampler": kwargs,
                              "reference_reconstructions": reference, "runs": kept}
    for seed in args.seeds:  # seeds outermost: a cut-short run has every variant of the first seeds
        for variant in args.variants:
            try:
                prior, run = train_variant(variant, seed, data, args, args.prior)
            except ValueError as err:  # the causal AR transformer refuses sequence-mixing routers
                if "causal" not in str(err):
                    raise
                run = {"variant": variant, "seed": seed, "refused": str(err)}
                print(f"  {variant:14s} refused: {err}", flush=True)
            else:
                run["val_nll"] = run["final"]
                run.update(score_variant(prior, tokenizer, kwargs, real, classifier, score_args))
                print(f"  {variant:14s} seed {seed}: FID {run['fid']:.2f} acc {run['classifier_accuracy']:.3f} "
                      f"({run['ms_per_image']:.1f} ms/image)", flush=True)
            record["runs"].append(run | {"settings": settings, "objective": OBJECTIVE})
            record["summary"] = summarise(record["runs"])
            everything[args.prior] = record
            args.out.parent.mkdir(parents=True, exist_ok=True)
            tmp = args.out.with_suffix(".tmp")
            tmp.write_text(json.dumps(everything, indent=1))
            tmp.replace(args.out)
    print("\n".join(markdown_rows(record["summary"])))


if __name__ == "__main__":
    main()
