"""``import_tokenizer``: turn a tokenizer trained by another library into a tokenforge checkpoint.

    python scripts/import_tokenizer.py --diffusers path/to/movq --out runs/movq_imported/checkpoints/last.ckpt
    python scripts/import_tokenizer.py --taming last.ckpt --taming-config model.yaml --out runs/taming/last.ckpt

The weights are mapped onto our :class:`~stage1.vqgan.VQGAN` by :mod:`stage1.interop` (weights-only,
nothing downloaded) and written as a checkpoint every command opens: ``tokenize``, ``evaluate``, and
priors trained on its codes. The data a command should read it with is recorded as the checkpoint's
data config (``--dataset``/``--root``/``--size``); ``data.params.*`` overrides change it later.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from data.atomic import atomic_write
from stage1.interop import load_diffusers_vqmodel, load_taming_vqgan
from stage1.tokenizer import CHECKPOINT_KEY
from tokenforge.cli import positive_int


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="import_tokenizer", description=__doc__.split("\n\n")[0])
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--diffusers", help="folder of a diffusers VQModel (config.json + weights)")
    source.add_argument("--taming", help="taming-transformers VQGAN checkpoint (with --taming-config)")
    p.add_argument("--taming-config", help="the taming model's YAML config (model.params.ddconfig, n_embed, ...)")
    p.add_argument("--out", required=True, help="where to write the tokenforge checkpoint (.ckpt)")
    p.add_argument("--dataset", default="folder", help="data the commands read with it (default: an image folder)")
    p.add_argument("--root", help="image folder (or dataset root) the commands read with it")
    p.add_argument("--size", type=positive_int, help="image size (default: the model's resolution)")
    p.add_argument("--batch-size", type=positive_int, default=16)
    args = p.parse_args(argv)
    if args.taming and not args.taming_config:
        p.error("--taming needs --taming-config (the YAML that came with the checkpoint)")
    return args


def tokenforge_checkpoint(model: torch.nn.Module, data: dict[str, Any], source: str) -> dict[str, Any]:
    """The dict a trained run's ``last.ckpt`` holds for the loaders: weights, constructor arguments and
    the tokenforge metadata (kind, target, code spec, a config with the data section)."""
    ckpt: dict[str, Any] = {"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams),
                            "global_step": 0, "epoch": 0}
    model.on_save_checkpoint(ckpt)
    ckpt[CHECKPOINT_KEY]["config"] = {"model": {"target": ckpt[CHECKPOINT_KEY]["target"],
                                                "params": dict(model.hparams)}, "data": data}
    ckpt[CHECKPOINT_KEY]["imported_from"] = source
    return ckpt


def main(argv: Sequence[str] | None = None) -> Path:
    args = parse_args(argv)
    if args.diffusers:
        model, source = load_diffusers_vqmodel(args.diffusers, resolution=args.size), f"diffusers:{args.diffusers}"
    else:
        model, source = load_taming_vqgan(args.taming, args.taming_config), f"taming:{args.taming}"
    size = args.size or int(model.resolution[0])
    data = {"target": "data.images.ImageDataModule",
            "params": {"dataset": args.dataset, "root": args.root, "size": size, "batch_size": args.batch_size}}
    ckpt = tokenforge_checkpoint(model, data, source)
    out = atomic_write(args.out, lambda f: torch.save(ckpt, f))
    spec = ckpt[CHECKPOINT_KEY]["code_spec"]
    print(f"wrote {out}: {type(model).__name__} with grid {spec['grid']} and {spec['codebook_size']} codes "
          f"(from {source})")
    return out
