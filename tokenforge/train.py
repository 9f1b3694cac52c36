"""``python scripts/train.py CONFIG [key=value ...] [--name NAME] [--fresh]``.

Builds the DataModule and model from the config, a Lightning Trainer from its ``trainer:`` section,
and writes everything under ``runs/NAME/`` (``config.yaml``, ``checkpoints/last.ckpt``, CSV and
TensorBoard logs under ``logs/``, image grids under ``images/``). A run folder that already holds
``last.ckpt`` is resumed at the same global step with the same optimiser state.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
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
from stage1.tokenizer import CorruptCheckpointError, load_checkpoint_file
from tokenforge.acceleration import apply_runtime_options, fused_configure_optimizers, set_tf32, split_runtime_params
from tokenforge.callbacks import MoELoadHistory, RunMetadata, SaveOnInterrupt
from tokenforge.checkpoint_io import AtomicCheckpointIO
from tokenforge.config import confine_paths, load_config, section_bases, to_plain
from tokenforge.run_lock import RunLock, lock_holder


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


def ddp_strategy_for(strategy: Any, model: pl.LightningModule | None) -> Any:
    """``trainer.strategy=ddp`` made to search for unused parameters where a backward leaves some out.

    A GAN tokenizer (manual optimization: the generator's backward never reaches the discriminator,
    the discriminator's never the autoencoder) and an MoE layer (an expert can receive no token in a
    step) both leave parameters without a gradient, which plain DDP refuses at the next backward
    ("parameters that were not used in producing the loss"). Every other strategy is left as given.
    """
    if strategy != "ddp" or model is None:
        return strategy
    routed = any(type(m).__module__.startswith("layers.moe.") for m in model.modules())  # any expert layer
    if not model.automatic_optimization or routed:
        return "ddp_find_unused_parameters_true"
    return strategy


def build_trainer(cfg: dict[str, Any], run_dir: Path, extra_callbacks: Sequence[pl.Callback] = (),
                  model: pl.LightningModule | None = None) -> pl.Trainer:
    ckpt_dir = run_dir / "checkpoints"
    every = int(cfg.get("checkpoint_every_n_steps") or 200)
    callbacks: list[pl.Callback] = [
        # No version counter: "last" is one file that every save (periodic, interrupt, final)
        # overwrites, never a second last-v1.ckpt next to it.
        ModelCheckpoint(dirpath=ckpt_dir, save_last=True, save_top_k=0, every_n_train_steps=every,
                        save_on_train_epoch_end=True, enable_version_counter=False),
        RunMetadata(cfg, checkpoint_dir=ckpt_dir),
        SaveOnInterrupt(ckpt_dir / "last.ckpt"),
        MoELoadHistory(),  # does nothing for a model without MoE layers
        *extra_callbacks,
    ]
    for i, spec in enumerate(cfg.get("callbacks") or []):
        where = f"callbacks[{i}]"
        params = confine_paths(spec.get("params") or {}, run_dir, where)
        callbacks.append(instantiate({**spec, "params": params}, where=where, base=section_bases()["callbacks"]))
    # Lightning's CSV logger deletes an existing metrics.csv, so a resumed run writes logs/csv-resumeN/.
    csv_version, n = "csv", 0
    while (run_dir / "logs" / csv_version / "metrics.csv").exists():
        n += 1
        csv_version = f"csv-resume{n}"
    loggers = [CSVLogger(run_dir, name="logs", version=csv_version),
               TensorBoardLogger(run_dir, name="logs", version="tb")]
    kwargs = dict(cfg.get("trainer") or {})
    kwargs.setdefault("log_every_n_steps", 10)
    if "strategy" in kwargs:
        kwargs["strategy"] = ddp_strategy_for(kwargs["strategy"], model)
    plugins = kwargs.pop("plugins", None)
    plugins = [] if plugins is None else (list(plugins) if isinstance(plugins, list) else [plugins])
    return pl.Trainer(default_root_dir=str(run_dir), callbacks=callbacks, logger=loggers,
                      plugins=[*plugins, AtomicCheckpointIO()], **kwargs)


def check_resumable(saved: dict[str, Any], last: Path, model: pl.LightningModule) -> None:
    """Refuse, with the fix, to resume a run whose checkpoint belongs to a differently shaped model."""
    state = saved.get("state_dict", {})
    current = model.state_dict()
    wrong = [f"{k} {tuple(v.shape)} in the checkpoint vs {tuple(current[k].shape)} now"
             for k, v in state.items() if k in current and tuple(v.shape) != tuple(current[k].shape)]
    missing = sorted(set(current) ^ set(state))
    if wrong or missing:
        detail = wrong[0] if wrong else f"parameter {missing[0]!r} exists in only one of them"
        raise ConfigError(f"{last} was trained with a different model config ({detail}); "
                          "pass --fresh to start over (the old run is moved aside) or --name NEW for a separate run")


def check_data_fits_model(datamodule: Any, model: Any) -> None:
    """Refuse data whose values the model cannot represent, before the first step.

    A code folder's labels must lie below the prior's ``num_classes`` (a label equal to it would be
    read as the classifier-free-guidance null class) and its codes inside the prior's codebook (a
    code equal to ``codebook_size`` is MaskGIT's mask token).
    """
    data_classes, model_classes = getattr(datamodule, "num_classes", None), getattr(model, "num_classes", None)
    if isinstance(data_classes, int) and isinstance(model_classes, int) and data_classes > model_classes:
        raise ConfigError(f"the data has labels up to {data_classes - 1} but the model has "
                          f"num_classes={model_classes}; set model.params.num_classes={data_classes} "
                          "(or leave it unset to read it from the data)")
    spec = getattr(datamodule, "code_spec", None)
    if isinstance(spec, dict) and spec.get("levels") and getattr(model, "level", None) in spec["levels"]:
        spec = spec["levels"][model.level]  # hierarchical codes (VQ-VAE-2): the level this prior models
    data_size = spec.get("codebook_size") if isinstance(spec, dict) else None
    model_size = getattr(model, "codebook_size", None)
    if isinstance(data_size, int) and isinstance(model_size, int) and data_size > model_size:
        raise ConfigError(f"the code folder's codebook has {data_size} codes but the model's has {model_size}")


def resume_checkpoint(ckpt_dir: Path) -> tuple[Path, dict[str, Any]] | None:
    """The checkpoint to resume from: ``last.ckpt``, or when that is damaged the newest intact one.

    Returns None for a run without checkpoints; raises :class:`CorruptCheckpointError` naming
    ``--fresh`` when there are checkpoints but none can be read.
    """
    last = ckpt_dir / "last.ckpt"
    if not last.is_file():
        return None
    try:
        return last, load_checkpoint_file(last, mmap=True)
    except CorruptCheckpointError as err:
        problem = str(err)
    others = sorted((p for p in ckpt_dir.glob("*.ckpt") if p != last and p.is_file()),
                    key=lambda p: p.stat().st_mtime, reverse=True)
    for other in others:
        try:
            saved = load_checkpoint_file(other, mmap=True)
        except CorruptCheckpointError:
            continue
        if "state_dict" in saved and "global_step" in saved:
            rank_zero_warn(f"{problem}; resuming from the newest intact checkpoint {other} instead")
            return other, saved
    raise CorruptCheckpointError(f"cannot resume: {problem}, and there is no other intact checkpoint in {ckpt_dir}. "
                                 "Pass --fresh to start over (the old run folder is moved aside, never deleted)")


def _is_global_zero_process() -> bool:
    """Before a Trainer exists: False in the processes Lightning or torchrun start for ranks > 0."""
    return all(os.environ.get(k, "0") == "0" for k in ("RANK", "LOCAL_RANK", "NODE_RANK"))


def _holds_checkpoints(run_dir: Path) -> bool:
    return any(run_dir.glob("checkpoints/*.ckpt"))


def main(argv: Sequence[str] | None = None) -> pl.Trainer:
    args = parse_args(argv)
    quiet_lightning()
    cfg_node = load_config(args.config, args.overrides)
    cfg = to_plain(cfg_node)
    name = args.name or Path(args.config).stem
    run_dir = Path(args.runs) / name
    rank_zero = _is_global_zero_process()
    if rank_zero and args.fresh and run_dir.exists():
        holder = lock_holder(run_dir)
        if holder is not None:
            raise ConfigError(f"--fresh: {run_dir} is in use by process {holder.get('pid')} on {holder.get('host')}; "
                              "it cannot be moved aside while that run is active")
        aside = run_dir.with_name(f"{run_dir.name}.old-{time.strftime('%Y%m%d-%H%M%S')}")
        run_dir.rename(aside)
        rank_zero_info(f"--fresh: moved the previous run to {aside}")
    created = not run_dir.exists()
    lock = RunLock(run_dir)
    if rank_zero:
        lock.acquire()
    try:
        return _train(cfg, run_dir, rank_zero)
    except BaseException:
        # A start that failed before anything worth keeping was written leaves no folder behind.
        if rank_zero and created and not _holds_checkpoints(run_dir):
            lock.release()
            shutil.rmtree(run_dir, ignore_errors=True)
        raise
    finally:
        lock.release()


def _train(cfg: dict[str, Any], run_dir: Path, rank_zero: bool) -> pl.Trainer:
    ckpt_dir = run_dir / "checkpoints"
    last = ckpt_dir / "last.ckpt"
    found = resume_checkpoint(ckpt_dir)
    resumed_step = None
    saved_cfg = run_dir / "config.yaml"
    if found and saved_cfg.is_file() and OmegaConf.to_container(OmegaConf.load(saved_cfg)) != cfg:
        rank_zero_warn(f"{saved_cfg} differs from the config given now; resuming with the new one. "
                       "Use --fresh or --name to start a separate run.")

    pl.seed_everything(int(cfg.get("seed", 0)), workers=True, verbose=False)
    bases = section_bases()
    datamodule = instantiate(cfg["data"], where="data", base=bases["data"])
    model_spec, runtime = split_runtime_params(cfg["model"])  # compile / channels_last are not hyperparameters
    model = instantiate(model_spec, where="model", base=bases["model"])
    check_data_fits_model(datamodule, model)
    if found:
        resume_from, saved = found
        check_resumable(saved, resume_from, model)
        resumed_step = saved.get("global_step")
        del saved
        rank_zero_info(f"resuming from {resume_from}")
    for done in apply_runtime_options(model, runtime):
        rank_zero_info(f"model.params: {done}")
    set_tf32(cfg.get("allow_tf32", True))
    if cfg.get("fused_optimizer", True):
        model.configure_optimizers = fused_configure_optimizers(model)  # an instance attribute shadows the method
    trainer = build_trainer(cfg, run_dir, model=model)
    if rank_zero:  # only after the resume check: a refused resume leaves the run's config untouched
        atomic_write_text(saved_cfg, OmegaConf.to_yaml(OmegaConf.create(cfg)))
    trainer.fit(model, datamodule=datamodule, ckpt_path=str(found[0]) if found else None, weights_only=True)
    # A finished run started again trains nothing: its last.ckpt stays byte for byte what it was (a
    # re-save would change the file's SHA-256, and the priors that recorded it would refuse it).
    unchanged = found is not None and resumed_step == trainer.global_step and found[0] == last
    if not trainer.interrupted and not unchanged:
        trainer.save_checkpoint(last, weights_only=False)
    rank_zero_info(f"run folder: {run_dir}  (checkpoint: {last})")
    return trainer


if __name__ == "__main__":  # pragma: no cover
    main()
