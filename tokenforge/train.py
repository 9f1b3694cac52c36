"""``python scripts/train.py CONFIG [key=value ...] [--name NAME] [--fresh]``.

Builds the DataModule and model from the config, a Lightning Trainer from its ``trainer:`` section,
and writes everything under ``runs/NAME/`` (``config.yaml``, ``checkpoints/last.ckpt``, CSV and
TensorBoard logs under ``logs/``, image grids under ``images/``). A run folder that already holds
``last.ckpt`` is resumed at the same global step with the same optimiser state.
"""

from __future__ import annotations

import argparse
import logging
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from omegaconf import OmegaConf
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger
from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn

from data.atomic import atomic_write_text
from layers.instantiate import ConfigError, instantiate
from tokenforge.callbacks import RunMetadata, SaveOnInterrupt
from tokenforge.config import load_config, to_plain


class _DropTips(logging.Filter):
    """Lightning advertises cloud services at every start; keep the console for our own messages."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Tip:" not in str(record.msg)


def quiet_lightning() -> None:
    logging.getLogger("pytorch_lightning.utilities.rank_zero").addFilter(_DropTips())
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
    # VQGAN's manual optimisation: checkpoints hold the post-step state, which is what resuming needs.
    warnings.filterwarnings("ignore", message=r".*ModelCheckpoint with manual optimization.*")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="train.py", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("config", help="YAML config, e.g. configs/vqgan.yaml")
    p.add_argument("overrides", nargs="*", help="dotlist overrides, e.g. trainer.max_steps=1000")
    p.add_argument("--name", help="run folder name under --runs (default: the config's file name)")
    p.add_argument("--runs", default="runs", help="parent folder of run folders (default: runs)")
    p.add_argument("--fresh", action="store_true",
                   help="start over: an existing run folder is moved aside to NAME.old-TIMESTAMP, never deleted")
    return p.parse_intermixed_args(argv)


def build_trainer(cfg: dict[str, Any], run_dir: Path, extra_callbacks: Sequence[pl.Callback] = ()) -> pl.Trainer:
    ckpt_dir = run_dir / "checkpoints"
    every = int(cfg.get("checkpoint_every_n_steps") or 200)
    callbacks: list[pl.Callback] = [
        ModelCheckpoint(dirpath=ckpt_dir, save_last=True, save_top_k=0, every_n_train_steps=every,
                        save_on_train_epoch_end=True),
        RunMetadata(cfg),
        SaveOnInterrupt(ckpt_dir / "last.ckpt"),
        *extra_callbacks,
    ]
    for i, spec in enumerate(cfg.get("callbacks") or []):
        callbacks.append(instantiate(spec, where=f"callbacks[{i}]"))
    # Lightning's CSV logger deletes an existing metrics.csv, so a resumed run writes logs/csv-resumeN/.
    csv_version, n = "csv", 0
    while (run_dir / "logs" / csv_version / "metrics.csv").exists():
        n += 1
        csv_version = f"csv-resume{n}"
    loggers = [CSVLogger(run_dir, name="logs", version=csv_version),
               TensorBoardLogger(run_dir, name="logs", version="tb")]
    kwargs = dict(cfg.get("trainer") or {})
    kwargs.setdefault("log_every_n_steps", 10)
    return pl.Trainer(default_root_dir=str(run_dir), callbacks=callbacks, logger=loggers, **kwargs)


def check_resumable(last: Path, model: pl.LightningModule) -> None:
    """Refuse, with the fix, to resume a run whose checkpoint belongs to a differently shaped model."""
    import torch

    saved = torch.load(last, map_location="cpu", weights_only=True, mmap=True).get("state_dict", {})
    current = model.state_dict()
    wrong = [f"{k} {tuple(v.shape)} in the checkpoint vs {tuple(current[k].shape)} now"
             for k, v in saved.items() if k in current and tuple(v.shape) != tuple(current[k].shape)]
    missing = sorted(set(current) ^ set(saved))
    if wrong or missing:
        detail = wrong[0] if wrong else f"parameter {missing[0]!r} exists in only one of them"
        raise ConfigError(f"{last} was trained with a different model config ({detail}); "
                          "pass --fresh to start over (the old run is moved aside) or --name NEW for a separate run")


def main(argv: Sequence[str] | None = None) -> pl.Trainer:
    args = parse_args(argv)
    quiet_lightning()
    cfg_node = load_config(args.config, args.overrides)
    cfg = to_plain(cfg_node)
    name = args.name or Path(args.config).stem
    run_dir = Path(args.runs) / name
    last = run_dir / "checkpoints" / "last.ckpt"
    if args.fresh and run_dir.exists():
        aside = run_dir.with_name(f"{run_dir.name}.old-{time.strftime('%Y%m%d-%H%M%S')}")
        run_dir.rename(aside)
        rank_zero_info(f"--fresh: moved the previous run to {aside}")
    resume = last.is_file()
    saved = run_dir / "config.yaml"
    if resume and saved.is_file() and OmegaConf.to_container(OmegaConf.load(saved)) != cfg:
        rank_zero_warn(f"{saved} differs from the config given now; resuming with the new one. "
                       "Use --fresh or --name to start a separate run.")

    pl.seed_everything(int(cfg.get("seed", 0)), workers=True, verbose=False)
    datamodule = instantiate(cfg["data"], where="data")
    model = instantiate(cfg["model"], where="model")
    trainer = build_trainer(cfg, run_dir)
    if trainer.is_global_zero:
        atomic_write_text(saved, OmegaConf.to_yaml(OmegaConf.create(cfg)))
    if resume:
        check_resumable(last, model)
        rank_zero_info(f"resuming from {last}")
    trainer.fit(model, datamodule=datamodule, ckpt_path=str(last) if resume else None, weights_only=True)
    if not trainer.interrupted:
        trainer.save_checkpoint(last, weights_only=False)
    rank_zero_info(f"run folder: {run_dir}  (checkpoint: {last})")
    return trainer


if __name__ == "__main__":  # pragma: no cover
    main()
