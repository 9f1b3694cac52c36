"""``python scripts/evaluate.py CHECKPOINT [--json out.json] [key=value ...]``.

For a tokenizer: reconstruction MSE, PSNR, SSIM and codebook usage (fraction of codes used,
perplexity, dead codes) over the whole validation split of the data it was trained on; prints a
table, writes JSON with ``--json`` and saves the sorted usage histogram as a PNG.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from layers.instantiate import instantiate
from metrics.codebook import CodebookUsage
from metrics.reconstruction import ReconstructionMetrics
from stage1.tokenizer import load_tokenizer, read_checkpoint
from tokenforge.checkpoints import atomic_write_text
from tokenforge.config import _merge_overrides, to_plain
from tokenforge.images import save_usage_histogram


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="evaluate.py", description=__doc__,
                                formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("checkpoint", help="a tokenforge checkpoint, e.g. runs/vqgan/checkpoints/last.ckpt")
    p.add_argument("overrides", nargs="*", help="overrides of the stored config, e.g. data.params.root=/my/images")
    p.add_argument("--json", dest="json_path", help="also write the results to this JSON file")
    p.add_argument("--out", help="folder for plots (default: <run>/eval next to the checkpoint folder)")
    p.add_argument("--split", default="val", choices=["train", "val"], help="which split to evaluate (default val)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first N examples (quick checks)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p.parse_intermixed_args(argv)


def build_datamodule(ckpt: dict[str, Any], overrides: Sequence[str], batch_size: int) -> Any:
    config = (ckpt.get("tokenforge") or {}).get("config")
    if not config or "data" not in config:
        raise ValueError("the checkpoint stores no data config; pass a checkpoint written by scripts/train.py")
    cfg = _merge_overrides(OmegaConf.create({"data": config["data"]}), list(overrides))
    data_spec = to_plain(cfg)["data"]
    params = data_spec.setdefault("params", {})
    if "batch_size" in params:
        params["batch_size"] = batch_size
    dm = instantiate(data_spec, where="data")
    dm.setup("validate")
    return dm


def split_loader(dm: Any, split: str) -> Any:
    if split == "train":
        dm.setup("fit")
        if hasattr(dm, "split_dataloader"):
            return dm.split_dataloader("train")
        return dm.train_dataloader()
    return dm.val_dataloader()


@torch.no_grad()
def evaluate_tokenizer(model: Any, loader: Any, device: str, limit: int | None = None) -> tuple[dict, torch.Tensor]:
    spec = model.code_spec
    usage = CodebookUsage(spec["codebook_size"], depth=spec.get("depth")).to(device)
    recon = ReconstructionMetrics().to(device)
    seen = 0
    for batch in loader:
        x = batch["x"].to(device)
        if limit is not None:
            x = x[: max(0, limit - seen)]
            if len(x) == 0:
                break
        codes = model.encode(x)
        xrec = model.decode(codes).clamp(-1, 1)
        usage.update(codes)
        recon.update(xrec.float(), x.float())
        seen += len(x)
    results: dict[str, Any] = {k: _num(v) for k, v in recon.compute().items()}
    results |= {k: _num(v) for k, v in usage.compute().items()}
    results["codebook_size"] = spec["codebook_size"]
    results["num_examples"] = seen
    return results, usage.counts().cpu()


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
    ckpt = read_checkpoint(args.checkpoint)
    kind = ckpt["tokenforge"]["kind"]
    if kind != "tokenizer":
        raise ValueError(f"{args.checkpoint} is a {kind!r} checkpoint; evaluate.py handles tokenizers here")
    model = load_tokenizer(args.checkpoint, map_location=args.device)
    dm = build_datamodule(ckpt, args.overrides, args.batch_size)
    results, counts = evaluate_tokenizer(model, split_loader(dm, args.split), args.device, args.limit)
    results = {"checkpoint": str(args.checkpoint), "split": args.split, **results}
    out_dir = Path(args.out) if args.out else Path(args.checkpoint).resolve().parent.parent / "eval"
    hist = save_usage_histogram(counts, out_dir / "usage_histogram.png",
                                title=f"{Path(args.checkpoint).name} ({args.split})")
    results["usage_histogram"] = str(hist)
    print(format_table({k: v for k, v in results.items() if k not in ("checkpoint",)}))
    if args.json_path:
        atomic_write_text(args.json_path, json.dumps(results, indent=2, sort_keys=True))
        print(f"wrote {args.json_path}")
    return results


if __name__ == "__main__":  # pragma: no cover
    main()
