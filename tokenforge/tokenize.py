"""``python scripts/tokenize.py TOKENIZER_CKPT --out codes/NAME [data.params.K=V ...] [trainer.K=V ...]``.

Encodes the train and val splits of the data the tokenizer was trained on (from the config stored
in its checkpoint; ``data.params.*`` overrides point it elsewhere) into a code folder (see
``data/codes.py``). It runs as Lightning prediction: ``Trainer.predict`` calls the tokenizer's
``predict_step`` and a :class:`ShardWriter` (a ``BasePredictionWriter``) writes each shard once all
its items are encoded, so ``trainer.devices=N trainer.strategy=ddp`` tokenizes on N ranks, rank ``r``
encoding and writing shards ``r, r + N, ...``. Every shard is written under a temporary name and
renamed when complete, so re-running after a kill resumes at the first unwritten shard and gives
the same bytes as one uninterrupted single-process run; rank 0 then writes the manifest, which lists
every rank's shards.
"""

from __future__ import annotations

import argparse
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import BasePredictionWriter
from torch.utils.data import DataLoader, Sampler

from data.codes import CodeFileError, CodeWriter, pack_levels, sha256_file
from layers.instantiate import check_params
from tokenforge.cli import positive_int
from tokenforge.runs import open_run

# The Trainer tokenizing runs under unless ``trainer.*`` overrides say otherwise. ``encode`` runs under
# no_grad already; inference mode would mark tensors that the quantizers' reusable score buffers keep
# (an inference tensor may not be updated later outside inference mode, e.g. by a training step).
TRAINER_DEFAULTS = {"accelerator": "auto", "devices": 1, "inference_mode": False}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="tokenize.py", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("checkpoint", help="tokenizer checkpoint, e.g. runs/vqvae/checkpoints/last.ckpt")
    p.add_argument("overrides", nargs="*",
                   help="data.params.*=... overrides of the stored data config, and trainer.*=... keywords of the "
                        "Lightning Trainer (e.g. trainer.devices=2 trainer.strategy=ddp)")
    p.add_argument("--out", required=True, help="code folder to create or resume, e.g. codes/fmnist")
    p.add_argument("--splits", nargs="+", default=["train", "val"])
    p.add_argument("--shard-size", type=positive_int, default=4096, help="items per shard (default 4096)")
    p.add_argument("--batch-size", type=positive_int, default=256)
    return p.parse_intermixed_args(argv)


def split_overrides(overrides: Sequence[str]) -> tuple[list[str], dict[str, Any]]:
    """``data.*`` overrides for the stored data config, and ``trainer.*`` ones as Trainer keywords."""
    from omegaconf import OmegaConf

    data = [o for o in overrides if not o.startswith("trainer.")]
    trainer = OmegaConf.to_container(OmegaConf.from_dotlist([o for o in overrides if o.startswith("trainer.")]))
    kwargs = {**TRAINER_DEFAULTS, **(trainer.get("trainer") or {})}
    check_params(pl.Trainer.__init__, kwargs, "trainer")
    return data, kwargs


class ShardBatchSampler(Sampler[list[int]]):
    """Batches of item positions that never cross a shard boundary, over the given shards in order.

    It has no ``__len__`` on purpose: a rank may own no shard of a split (one val shard, two ranks),
    and Lightning refuses a zero-length loader on one rank while another has batches; without a
    length it just iterates.
    """

    def __init__(self, shards: Sequence[tuple[int, int]], batch_size: int) -> None:
        self.shards, self.batch_size = list(shards), batch_size

    def __iter__(self) -> Iterator[list[int]]:
        for start, stop in self.shards:
            for first in range(start, stop, self.batch_size):
                yield list(range(first, min(first + self.batch_size, stop)))


class ShardWriter(BasePredictionWriter):
    """Collects each shard's encoded batches and writes the shard (atomically) once it is complete."""

    def __init__(self, writer: CodeWriter, splits: Sequence[str], totals: dict[str, int]) -> None:
        super().__init__(write_interval="batch")
        self.writer, self.splits, self.totals = writer, list(splits), totals
        self.pending: dict[tuple[str, int], list[dict[str, torch.Tensor]]] = {}
        self.written = 0

    def write_on_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, prediction: Any,
                           batch_indices: Sequence[int] | None, batch: Any, batch_idx: int,
                           dataloader_idx: int = 0) -> None:
        split = self.splits[dataloader_idx]
        if isinstance(prediction["codes"], Mapping):  # hierarchical codes (VQ-VAE-2): one packed array per item
            prediction = {**prediction, "codes": pack_levels(prediction["codes"], self.writer.code_spec)}
        positions = prediction["index"]
        shard = int(positions[0]) // self.writer.shard_size
        parts = self.pending.setdefault((split, shard), [])
        parts.append({k: v.cpu() for k, v in prediction.items()})
        start, stop = self.writer.shard_bounds(shard, self.totals[split])
        if sum(len(p["index"]) for p in parts) < stop - start:
            return
        del self.pending[(split, shard)]
        merged = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
        if not torch.equal(merged["index"], torch.arange(start, stop)):
            raise RuntimeError(f"shard {shard} of {split!r} received items out of order")
        self.writer.write_shard(split, shard, merged["codes"], merged.get("label"), merged.get("length"))
        self.written += 1


class ShardedSplits(pl.LightningDataModule):
    """Prediction loaders over this rank's unwritten shards of each split of the tokenizer's data."""

    def __init__(self, datamodule: Any, writer: CodeWriter, splits: Sequence[str], batch_size: int) -> None:
        super().__init__()
        self.datamodule, self.writer, self.splits, self.batch_size = datamodule, writer, list(splits), batch_size

    def totals(self) -> dict[str, int]:
        return {s: len(self.datamodule.split_dataloader(s).dataset) for s in self.splits}

    def predict_dataloader(self) -> list[DataLoader]:
        rank, world = self.trainer.global_rank, self.trainer.world_size
        loaders = []
        for split in self.splits:
            base = self.datamodule.split_dataloader(split)  # unshuffled, items carry their position
            total = len(base.dataset)
            todo = [self.writer.shard_bounds(i, total) for i in range(self.writer.num_shards(total))
                    if i % world == rank and not self.writer.has_shard(split, i)]
            loaders.append(DataLoader(base.dataset, batch_sampler=ShardBatchSampler(todo, self.batch_size),
                                      collate_fn=base.collate_fn, num_workers=base.num_workers))
        return loaders


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    data_overrides, trainer_kwargs = split_overrides(args.overrides)
    run = open_run(args.checkpoint, map_location="cpu", expect="tokenizer")
    dm = run.datamodule(data_overrides, args.batch_size)
    dm.setup("fit")
    writer = CodeWriter(args.out, run.model.code_spec, tokenizer_path=str(Path(args.checkpoint)),
                        tokenizer_sha256=sha256_file(args.checkpoint), shard_size=args.shard_size,
                        class_names=getattr(dm, "class_names", None))
    data = ShardedSplits(dm, writer, args.splits, args.batch_size)
    totals = data.totals()
    shard_writer = ShardWriter(writer, args.splits, totals)
    # ShardBatchSampler covers every item of its shards by construction (Lightning cannot tell).
    warnings.filterwarnings("ignore", message=r".*custom batch sampler `ShardBatchSampler`.*")
    trainer = pl.Trainer(**{"logger": False, "enable_checkpointing": False, "enable_model_summary": False,
                            **trainer_kwargs, "use_distributed_sampler": False, "callbacks": [shard_writer]})
    trainer.predict(run.model, datamodule=data, return_predictions=False)
    if trainer.world_size > 1:
        trainer.strategy.barrier("tokenize: every rank's shards are written")
    if not trainer.is_global_zero:
        return {}
    manifest = writer.finalize()
    for split, total in totals.items():
        count = (manifest["splits"].get(split) or {}).get("count", 0)
        if count != total:
            raise CodeFileError(f"{args.out}: split {split!r} holds {count} of {total} items; re-run the same "
                                "tokenize command to finish it")
    counts = ", ".join(f"{s}: {v['count']}" for s, v in manifest["splits"].items())
    print(f"wrote {args.out} ({counts}; code spec {manifest['code_spec']})")
    return manifest


if __name__ == "__main__":  # pragma: no cover
    main()
