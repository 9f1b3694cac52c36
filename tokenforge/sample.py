"""``python scripts/sample.py PRIOR_CKPT -n 64 [--class 3] [--cfg 2.0] [--top-k 100] ...``.

Samples codes from a prior, decodes them with the tokenizer the prior was trained on (recorded in
its checkpoint; ``--tokenizer`` overrides), and writes the samples as the tokenizer's modality
writes them (images: ``grid.png`` and one PNG per sample; sequences: ``curves.png`` and
``samples.npz``), the codes (``codes.npy``) and ``samples.json`` holding every sampling setting,
into ``--out``.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from data.atomic import atomic_write, atomic_write_text
from modalities import modality_of
from tokenforge.cli import positive_int
from tokenforge.runs import open_run
from tokenforge.sampling_args import add_sampling_flags, sampling_kwargs


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="sample.py", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("checkpoint", help="a prior checkpoint, e.g. runs/ar/checkpoints/last.ckpt")
    p.add_argument("-n", "--num", type=positive_int, default=16, help="number of samples (default 16)")
    p.add_argument("--class", dest="classes", type=int, nargs="+", default=None,
                   help="class label(s) for a class-conditional prior; several are cycled over the samples")
    add_sampling_flags(p, argv)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=positive_int, default=64, help="samples drawn per forward pass")
    p.add_argument("--tokenizer", help="tokenizer checkpoint (default: the one recorded in the prior)")
    p.add_argument("--out", help="output folder (default: <run>/samples/<settings>)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p.parse_intermixed_args(argv)


def default_out(args: argparse.Namespace, kwargs: dict[str, Any]) -> Path:
    parts = [f"n{args.num}"]
    if args.classes is not None:
        parts.append("class" + "-".join(map(str, args.classes)))
    parts += [f"{k}{v}" for k, v in sorted(kwargs.items())]
    parts.append(f"seed{args.seed}")
    return Path(args.checkpoint).resolve().parent.parent / "samples" / "_".join(parts)


def main(argv: Sequence[str] | None = None) -> Path:
    args = parse_args(argv)
    run = open_run(args.checkpoint, map_location=args.device, expect="prior", tokenizer=args.tokenizer)
    prior, tokenizer, tok_path = run.model, run.tokenizer, run.tokenizer_path
    kwargs = sampling_kwargs(prior, args)
    labels = None
    if args.classes is not None:
        if prior.num_classes is None:
            raise ValueError(f"{args.checkpoint} is an unconditional prior; drop --class")
        labels = torch.tensor([args.classes[i % len(args.classes)] for i in range(args.num)], device=args.device)
    gen = torch.Generator(device=args.device).manual_seed(args.seed)
    codes, decoded = [], []
    for start in range(0, args.num, args.batch_size):
        n = min(args.batch_size, args.num - start)
        cond = labels[start:start + n] if labels is not None else None
        c = prior.sample(n, cond=cond, generator=gen, **kwargs)
        codes.append(c.cpu())
        decoded.append(tokenizer.decode(c.to(args.device)).clamp(-1, 1).cpu())
    all_codes, all_decoded = torch.cat(codes), torch.cat(decoded)

    out = Path(args.out) if args.out else default_out(args, kwargs)
    out.mkdir(parents=True, exist_ok=True)
    # The tokenizer's modality turns decoded tensors into files (PNG grid, curves + .npz, ...).
    files = modality_of(tokenizer.code_spec).write_samples(all_decoded, out, None if labels is None else labels.cpu())
    atomic_write(out / "codes.npy", lambda f: np.save(f, all_codes.numpy(), allow_pickle=False))
    record = {"checkpoint": str(args.checkpoint), "tokenizer": str(tok_path), "num": args.num,
              "classes": None if labels is None else labels.tolist(), "seed": args.seed,
              "sampling": kwargs, "prior": type(prior).__name__, "code_shape": list(all_codes.shape)}
    atomic_write_text(out / "samples.json", json.dumps(record, indent=2))
    print(f"wrote {args.num} samples to {out} ({files[0].name}, ..., codes.npy, samples.json)")
    return out


if __name__ == "__main__":  # pragma: no cover
    main()
