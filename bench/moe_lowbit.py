"""Low-bit experts (MoQE / QMoE): validation NLL of trained AR priors against bits per expert weight.

    OMP_NUM_THREADS=1 nice -n 10 python bench/moe_lowbit.py --codes CODES --runs /tmp/moe_upcycle --seeds 0 1 \
        --out bench/results/moe_lowbit.json

RUNS holds the models ``bench/moe_upcycle.py --save-dir`` saved: the MoE priors (``scratch``: 8 experts
of hidden H, top-2, trained from scratch; ``upcycled``) and ``dense_active``, the dense prior whose FFN
has the MoE's active width 2H (the contrast). Only the FFN weights are quantized
(:mod:`layers.moe.lowbit`: the experts' stacked ``w_in``/``w_out``, or the dense MLP's two linears);
router, attention, embeddings and head stay in full precision. Settings:

- ``fp16``: weights rounded to float16 (16 bits per weight);
- ``fsq-L``: FSQ grid of L levels per weight (group 1) on a per-row absmax scale: ceil(log2 L) bits
  per weight + one fp16 scale per row;
- ``vq-gG-kK``: a K-entry VQ codebook over groups of G weights along each row (k-means), one
  codebook per weight tensor (shared by its experts): ceil(log2 K) / G bits per weight + the codebook.

Reported per model and seed: the exact bits per weight (codes + scales/codebook) and the
validation NLL (exact AR NLL, nats/token, the first ``--limit-val`` items), and its increase over
the model's full-precision NLL.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench.moe_upcycle import load_data, load_saved, validation_nll  # noqa: E402
from layers.mlp import MLP  # noqa: E402
from layers.moe import MoE  # noqa: E402
from layers.moe.lowbit import LowBitSpec, QuantizedMatrix, bits_per_weight, quantize_experts_, quantize_linear_  # noqa: E402

SETTINGS: dict[str, LowBitSpec | None] = {
    "fp16": None,
    "fsq-255": LowBitSpec("fsq", group=1, levels=255),
    "fsq-15": LowBitSpec("fsq", group=1, levels=15),
    "fsq-7": LowBitSpec("fsq", group=1, levels=7),
    "fsq-3": LowBitSpec("fsq", group=1, levels=3),
    "vq-g2-k64": LowBitSpec("vq", group=2, codebook_size=64),
    "vq-g4-k256": LowBitSpec("vq", group=4, codebook_size=256),
    "vq-g8-k256": LowBitSpec("vq", group=8, codebook_size=256),
}


@torch.no_grad()
def quantize_ffns_(model: torch.nn.Module, spec: LowBitSpec | None) -> float:
    """Quantize every FFN's weights of ``model`` in place; returns the bits per FFN weight."""
    ffns = [m for m in model.modules() if isinstance(m, MoE | MLP)]
    if spec is None:  # fp16 round trip
        for f in ffns:
            for p in f.parameters():
                if p.dim() >= 2 and not (isinstance(f, MoE) and any(p is q for q in f.router.parameters())):
                    p.copy_(p.half().float())
        return 16.0
    quantized: list[QuantizedMatrix] = []
    for f in ffns:
        if isinstance(f, MoE):
            quantized += quantize_experts_(f.experts, spec)
        else:
            quantized += [quantize_linear_(f.w_in, spec), quantize_linear_(f.w_out, spec)]
    return bits_per_weight(quantized)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--codes", type=Path, required=True)
    ap.add_argument("--runs", type=Path, required=True)
    ap.add_argument("--models", nargs="+", default=["scratch", "upcycled", "dense_active"])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    ap.add_argument("--limit-val", type=int, default=512)
    ap.add_argument("--out", type=Path, default=Path("bench/results/moe_lowbit.json"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    xv, yv = (t[:args.limit_val] for t in load_data(args.codes)["val"])
    rows = []
    for seed in args.seeds:
        for name in args.models:
            path = args.runs / f"{name}_seed{seed}.pt"
            full = validation_nll(load_saved(path), xv, yv)
            rows.append({"model": name, "seed": seed, "setting": "fp32", "bits": 32.0, "nll": full, "delta": 0.0})
            for setting in args.settings:
                torch.manual_seed(seed)  # k-means seeds
                model = load_saved(path)
                bits = quantize_ffns_(model, SETTINGS[setting])
                nll = validation_nll(model, xv, yv)
                rows.append({"model": name, "seed": seed, "setting": setting, "bits": bits, "nll": nll,
                             "delta": nll - full})
                print(f"seed {seed} {name:12s} {setting:11s} {bits:6.3f} bits/w  NLL {nll:.4f} "
                      f"(+{nll - full:.4f})", flush=True)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows},
                                           indent=1))
    print("\nmodel        setting      bits/w   NLL (mean over seeds)   increase")
    for name in args.models:
        for setting in ["fp32", *args.settings]:
            rs = [r for r in rows if r["model"] == name and r["setting"] == setting]
            d = [r["delta"] for r in rs]
            print(f"{name:12s} {setting:11s} {rs[0]['bits']:6.3f}  {statistics.mean(r['nll'] for r in rs):.4f}  "
                  f"+{statistics.mean(d):.4f} ± {statistics.stdev(d) if len(d) > 1 else 0.0:.4f}")


if __name__ == "__main__":
    main()
