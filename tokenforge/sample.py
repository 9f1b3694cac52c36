"""``python scripts/sample.py PRIOR_CKPT -n 64 [--class 3] [--cfg 2.0] [--top-k 100] ...``.

Samples codes from a prior, decodes them with the tokenizer the prior was trained on (recorded in
its checkpoint; ``--tokenizer`` overrides), and writes the samples as the tokenizer's modality
writes them (images: ``grid.png`` and one PNG per sample; sequences: ``curves.png`` and
``samples.npz``), the codes (``codes.npy``) and ``samples.json`` holding every sampling setting,
into ``--out``.

Hierarchical codes (VQ-VAE-2): name one prior per level, e.g. ``sample.py TOP.ckpt BOTTOM.ckpt``. Each
prior is sampled after the prior of its ``context_level`` and receives those codes as context (top,
then bottom); the tokenizer decodes all levels together. The sampling flags of every named prior are
offered, each prior takes the ones it declares, and ``samples.json`` records every prior's settings
(``priors``); the codes go to ``codes.npz``, one array per level.

A policy checkpoint (VQ-BeT, the AR-over-codes policy, the MLP baseline of the actions modality) is
sampled by rolling it out in its environment: ``-n`` episodes from held-out start states, one GIF each
and ``rollouts.json`` (``stage2/observation_rollouts.py``).
"""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from data.atomic import atomic_write, atomic_write_text
from stage1.modalities import modality_of
from stage2.observation_rollouts import policy_target, sample_rollouts
from stage2.options import sampling_kwargs as option_kwargs
from stage2.prior import sampling_options_of
from tokenforge.cli import positive_int
from tokenforge.runs import open_run
from tokenforge.sampling_args import add_sampling_flags, sampling_kwargs


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="sample.py", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("checkpoint", nargs="+",
                   help="a prior checkpoint, e.g. runs/ar/checkpoints/last.ckpt; for hierarchical codes one per "
                        "level (e.g. TOP.ckpt BOTTOM.ckpt), each sampled after the prior of its context level")
    p.add_argument("-n", "--num", type=positive_int, default=16, help="number of samples (default 16)")
    p.add_argument("--class", dest="classes", nargs="+", default=None,
                   help="class label(s) for a class-conditional prior, as indices or as the class names the "
                        "tokenizer's modality knows (e.g. --class backflip for motion); several are cycled over "
                        "the samples")
    add_sampling_flags(p, argv)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=positive_int, default=64, help="samples drawn per forward pass")
    p.add_argument("--tokenizer", help="tokenizer checkpoint (default: the one recorded in the prior)")
    p.add_argument("--out", help="output folder (default: <run>/samples/<settings>)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--max-steps", type=positive_int, help="policies only: cap each rolled-out episode (default: "
                                                             "the task's time limit)")
    return p.parse_intermixed_args(argv)


def default_out(args: argparse.Namespace, kwargs: dict[str, Any]) -> Path:
    parts = [f"n{args.num}"]
    if args.classes is not None:
        parts.append("class" + "-".join(map(str, args.classes)))
    # a value may be a path (MaskGIT's --infill): its file name, not its folders, goes into the folder name
    parts += [f"{k}{Path(v).name if isinstance(v, str) and '/' in v else v}" for k, v in sorted(kwargs.items())]
    parts.append(f"seed{args.seed}")
    return Path(args.checkpoint[-1]).resolve().parent.parent / "samples" / "_".join(parts)


def class_indices(values: Sequence[str], code_spec: Mapping[str, Any],
                  prior_names: Sequence[str] | None = None) -> list[int]:
    """``--class`` values as label indices: integers as given, names through the prior's ``class_names``
    (its code folder's, e.g. the keys of key-labelled music) or else those of the tokenizer's modality
    (e.g. the DeepMimic clips for motion)."""
    names = list(prior_names or getattr(modality_of(code_spec), "class_names", None) or ())
    indices = []
    for value in values:
        if re.fullmatch(r"-?\d+", str(value)):
            indices.append(int(value))
        elif value in names:
            indices.append(names.index(value))
        else:
            known = f"one of {', '.join(names)} or an index" if names else "an index (this modality names no classes)"
            raise ValueError(f"unknown class {value!r}: give {known}")
    return indices


def sampling_order(runs: Sequence[Any]) -> list[Any]:
    """The priors in the order they are sampled: each after the prior of its ``context_level``.

    One prior is sampled alone. Several must model the levels of one hierarchical code spec, each level
    once, and every context level must be one of them."""
    if len(runs) == 1:
        return list(runs)
    spec = runs[0].model.code_spec
    levels = [r.model.level for r in runs]
    if not spec.get("levels") or any(r.model.code_spec != spec for r in runs):
        raise ValueError("several priors are sampled together only for the levels of one hierarchical tokenizer "
                         f"(VQ-VAE-2); these model {[str(r.path) for r in runs]} with different code specs")
    if sorted(levels) != sorted(spec["levels"]):
        raise ValueError(f"the priors model levels {levels}; the tokenizer needs each of {sorted(spec['levels'])} once")
    order, done = [], set()
    while len(order) < len(runs):
        ready = [r for r in runs if r.model.level not in done and (r.model.context_level in done
                                                                      or r.model.context_level is None)]
        if not ready:
            pairs = [(r.model.level, r.model.context_level) for r in runs]
            raise ValueError(f"the priors' (level, context level) pairs form a cycle or miss a level: {pairs}")
        order += ready
        done |= {r.model.level for r in ready}
    return order


def sample_codes(runs: Sequence[Any], n: int, cond: Any, gen: torch.Generator,
                 kwargs: Sequence[dict[str, Any]]) -> Any:
    """One batch of codes: a tensor for one prior; ``{level: codes}`` for a hierarchy (context first)."""
    if len(runs) == 1:
        return runs[0].model.sample(n, cond=cond, generator=gen, **kwargs[0])
    codes: dict[str, torch.Tensor] = {}
    for run, kw in zip(runs, kwargs):
        prior = run.model
        context = codes[prior.context_level] if prior.context_level else None
        codes[prior.level] = prior.sample(n, cond=cond if prior.num_classes else None, generator=gen,
                                          context=context, **kw)
    return codes


def main(argv: Sequence[str] | None = None) -> Path:
    args = parse_args(argv)
    if len(args.checkpoint) == 1 and policy_target(args.checkpoint[0]):
        # a policy (VQ-BeT, the AR policy, the MLP baseline) turns observations into actions: it is sampled
        # by rolling it out in its environment, one GIF per episode (stage2/observation_rollouts.py)
        if args.classes is not None:
            raise ValueError(f"{args.checkpoint[0]} is a policy: it acts on observations and takes no --class")
        kwargs = option_kwargs(args, sampling_options_of(args.checkpoint[0]))
        out = Path(args.out) if args.out else default_out(args, kwargs)
        return sample_rollouts(args.checkpoint[0], args.num, out, args.seed, kwargs, args.device, args.tokenizer,
                               max_steps=args.max_steps)
    if args.max_steps is not None:
        raise ValueError("--max-steps caps a policy's rollouts; these checkpoints are not policies")
    runs = sampling_order([open_run(c, map_location=args.device, expect="prior", tokenizer=args.tokenizer)
                           for c in args.checkpoint])
    prior, tokenizer, tok_path = runs[-1].model, runs[0].tokenizer, runs[0].tokenizer_path
    all_kwargs = [sampling_kwargs(r.model, args) for r in runs]
    kwargs = all_kwargs[-1] if len(runs) == 1 else {k: v for kw in all_kwargs for k, v in kw.items()}
    labels = None
    if args.classes is not None:
        if all(r.model.num_classes is None for r in runs):
            raise ValueError(f"{' '.join(args.checkpoint)}: unconditional prior(s); drop --class")
        classes = class_indices(args.classes, tokenizer.code_spec, getattr(prior, "class_names", None))
        labels = torch.tensor([classes[i % len(classes)] for i in range(args.num)], device=args.device)
    gen = torch.Generator(device=args.device).manual_seed(args.seed)
    codes, decoded = [], []
    for start in range(0, args.num, args.batch_size):
        n = min(args.batch_size, args.num - start)
        cond = labels[start:start + n] if labels is not None else None
        c = sample_codes(runs, n, cond, gen, all_kwargs)
        codes.append({k: v.cpu() for k, v in c.items()} if isinstance(c, dict) else c.cpu())
        on_device = {k: v.to(args.device) for k, v in c.items()} if isinstance(c, dict) else c.to(args.device)
        decoded.append(tokenizer.decode(on_device).clamp(-1, 1).cpu())
    if isinstance(codes[0], dict):
        all_codes = {k: torch.cat([c[k] for c in codes]) for k in codes[0]}
    else:
        all_codes = torch.cat(codes)
    all_decoded = torch.cat(decoded)

    out = Path(args.out) if args.out else default_out(args, kwargs)
    out.mkdir(parents=True, exist_ok=True)
    # The tokenizer's modality turns decoded tensors into files (PNG grid, curves + .npz, ...).
    files = modality_of(tokenizer.code_spec).write_samples(all_decoded, out, None if labels is None else labels.cpu())
    classes = None if labels is None else labels.tolist()
    if isinstance(all_codes, dict):  # a hierarchy: one array per level, every prior's settings in sampling order
        codes_file = "codes.npz"
        arrays = {k: v.numpy() for k, v in all_codes.items()}
        atomic_write(out / codes_file, lambda f: np.savez(f, **arrays))
        record: dict[str, Any] = {"tokenizer": str(tok_path), "num": args.num, "classes": classes, "seed": args.seed}
        record["priors"] = [{"checkpoint": str(r.path), "prior": type(r.model).__name__, "level": r.model.level,
                             "context_level": r.model.context_level, "sampling": kw}
                            for r, kw in zip(runs, all_kwargs)]
        record["code_shape"] = {k: list(v.shape) for k, v in all_codes.items()}
    else:
        codes_file = "codes.npy"
        atomic_write(out / codes_file, lambda f: np.save(f, all_codes.numpy(), allow_pickle=False))
        record = {"checkpoint": str(args.checkpoint[0]), "tokenizer": str(tok_path), "num": args.num,
                  "classes": classes, "seed": args.seed, "sampling": kwargs, "prior": type(prior).__name__,
                  "code_shape": list(all_codes.shape)}
    atomic_write_text(out / "samples.json", json.dumps(record, indent=2))
    print(f"wrote {args.num} samples to {out} ({files[0].name}, ..., {codes_file}, samples.json)")
    return out


if __name__ == "__main__":  # pragma: no cover
    main()
