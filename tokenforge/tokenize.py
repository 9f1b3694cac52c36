"""``python scripts/tokenize.py TOKENIZER_CKPT --out codes/NAME [key=value ...]``.

Encodes the train and val splits of the data the tokenizer was trained on (from the config stored
in its checkpoint; overrides such as ``data.params.root=...`` point it elsewhere) into a code folder
(see ``data/codes.py``). Every shard is written under a temporary name and renamed when complete,
so re-running after an interruption skips the finished shards and gives byte-identical files.
Several processes (``torchrun --nproc_per_node N scripts/tokenize.py ...``) split the shards
between them, each rank writing its own; rank 0 writes the final manifest.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from data.codes import CodeWriter, sha256_file
from stage1.tokenizer import load_tokenizer, read_checkpoint
from tokenforge.evaluate import build_datamodule


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="tokenize.py", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("checkpoint", help="tokenizer checkpoint, e.g. runs/vqvae/checkpoints/last.ckpt")
    p.add_argument("overrides", nargs="*", help="overrides of the stored data config, e.g. data.params.root=...")
    p.add_argument("--out", required=True, help="code folder to create or resume, e.g. codes/fmnist")
    p.add_argument("--splits", nargs="+", default=["train", "val"])
    p.add_argument("--shard-size", type=int, default=4096, help="items per shard (default 4096)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p.parse_intermixed_args(argv)


def _dist() -> tuple[int, int]:
    """(rank, world size) when launched by torchrun; initialises a process group for the barrier."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), world


@torch.no_grad()
def encode_shards(model: Any, split_loader: DataLoader, writer: CodeWriter, split: str, batch_size: int, device: str,
                  rank: int = 0, world: int = 1) -> int:
    """Encode and write this rank's missing shards of ``split``; returns how many were written.

    ``split_loader`` is the DataModule's unshuffled loader of the split: its dataset and collate
    function are reused over each shard's item range.
    """
    dataset = split_loader.dataset
    total = len(dataset)
    todo = [i for i in range(writer.num_shards(total)) if i % world == rank and not writer.has_shard(split, i)]
    written = 0
    bar = tqdm(total=sum(writer.shard_bounds(i, total)[1] - writer.shard_bounds(i, total)[0] for i in todo),
               desc=f"{split} (rank {rank})" if world > 1 else split, unit="item", disable=rank != 0 and world > 1)
    for index in todo:
        start, stop = writer.shard_bounds(index, total)
        loader = DataLoader(Subset(dataset, range(start, stop)), batch_size=batch_size, shuffle=False,
                            collate_fn=split_loader.collate_fn)
        codes, labels = [], []
        for batch in loader:
            codes.append(model.encode(batch["x"].to(device)).cpu())
            if "label" in batch:
                labels.append(batch["label"].cpu())
            bar.update(len(batch["x"]))
        writer.write_shard(split, index, torch.cat(codes), torch.cat(labels) if labels else None)
        written += 1
    bar.close()
    return written


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    ckpt = read_checkpoint(args.checkpoint, expected_kind="tokenizer")
    rank, world = _dist()
    model = load_tokenizer(args.checkpoint, map_location=args.device)
    dm = build_datamodule(ckpt, args.overrides, args.batch_size)
    dm.setup("fit")
    writer = CodeWriter(args.out, model.code_spec, tokenizer_path=str(Path(args.checkpoint)),
                        tokenizer_sha256=sha256_file(args.checkpoint), shard_size=args.shard_size)
    for split in args.splits:
        encode_shards(model, dm.split_dataloader(split), writer, split, args.batch_size, args.device, rank, world)
    if world > 1:
        torch.distributed.barrier()
    manifest: dict[str, Any] = {}
    if rank == 0:
        manifest = writer.finalize()
        counts = ", ".join(f"{s}: {v['count']}" for s, v in manifest["splits"].items())
        print(f"wrote {args.out} ({counts}; code spec {manifest['code_spec']})")
    if world > 1:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return manifest


if __name__ == "__main__":  # pragma: no cover
    main()
