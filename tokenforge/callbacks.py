"""Callbacks the train command adds: run metadata, safe interruption, image grids, usage histograms,
the MoE load history."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_info, rank_zero_only

from stage1.modalities import modality_of
from stage1.tokenizer import CHECKPOINT_KEY
from tokenforge.usage_plot import save_usage_histogram


class RunMetadata(pl.Callback):
    """Stores the resolved config in every checkpoint, so ``evaluate``/``sample`` need nothing else.

    For a prior it also records its tokenizer as ``{"path", "sha256"}`` with the path relative to
    ``checkpoint_dir``, so the run loader resolves it next to the checkpoint (and checks the hash)
    instead of trusting a path that was relative to some earlier working directory.
    """

    def __init__(self, config: dict[str, Any], checkpoint_dir: str | Path | None = None):
        self.config = config
        self.checkpoint_dir = checkpoint_dir
        self.tokenizer: dict[str, Any] | None = None

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.checkpoint_dir is None or getattr(pl_module, "kind", None) != "prior":
            return
        from data.codes import sha256_file
        from tokenforge.runs import relative_tokenizer_record

        dm = trainer.datamodule
        path = getattr(dm, "tokenizer_path", None) or getattr(pl_module, "tokenizer_path", None)
        sha = getattr(dm, "tokenizer_sha256", None)
        if path and not sha and Path(path).is_file():
            sha = sha256_file(path)  # once per run: a tokenizer named in the config, not a code folder
        self.tokenizer = relative_tokenizer_record(path, sha, self.checkpoint_dir)

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        meta = checkpoint.setdefault(CHECKPOINT_KEY, {})
        meta["config"] = self.config
        if self.tokenizer is not None:
            meta["tokenizer"] = self.tokenizer


class SaveOnInterrupt(pl.Callback):
    """On SIGINT/SIGTERM, finish the current batch, write ``last.ckpt`` and stop cleanly.

    Lightning's own handling of Ctrl-C stops without saving, which loses everything since the last
    periodic checkpoint; this makes interrupted training resume exactly where it stopped.
    """

    def __init__(self, ckpt_path: str | Path):
        self.ckpt_path = str(ckpt_path)
        self.requested: int | None = None
        self._previous: dict[int, Any] = {}

    def _handler(self, signum: int, frame: Any) -> None:
        if self.requested is not None:  # a second Ctrl-C: give up waiting
            raise KeyboardInterrupt
        self.requested = signum
        rank_zero_info(f"\nreceived {signal.Signals(signum).name}: saving {self.ckpt_path} after this batch")

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.requested = None
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handler)
            except ValueError:  # not the main thread (e.g. inside some launchers): leave defaults
                pass

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        flag = torch.tensor(float(self.requested is not None), device=pl_module.device)
        if trainer.world_size > 1:  # every rank must agree to stop, or DDP deadlocks
            flag = trainer.strategy.reduce(flag, reduce_op="max")
        if flag.item() > 0:
            trainer.save_checkpoint(self.ckpt_path, weights_only=False)
            trainer.should_stop = True

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


class ReconstructionGrid(pl.Callback):
    """Every ``every_n_steps`` training steps, save an input | reconstruction PNG grid of a fixed val batch."""

    def __init__(self, every_n_steps: int = 100, num_images: int = 16, out_dir: str | None = None):
        self.every_n_steps = every_n_steps
        self.num_images = num_images
        self.out_dir = out_dir
        self._batch: torch.Tensor | None = None

    def _fixed_batch(self, trainer: pl.Trainer) -> torch.Tensor | None:
        if self._batch is None:
            dm = trainer.datamodule
            if dm is None:
                return None
            loader = dm.val_dataloader()
            xs = []
            for batch in loader:
                xs.append(batch["x"])
                if sum(len(x) for x in xs) >= self.num_images:
                    break
            self._batch = torch.cat(xs)[: self.num_images]
        return self._batch

    @rank_zero_only
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        step = trainer.global_step
        if step % self.every_n_steps != 0 or not hasattr(pl_module, "encode"):
            return
        x = self._fixed_batch(trainer)
        if x is None:
            return
        was_training = pl_module.training
        pl_module.eval()
        with torch.no_grad():
            x = x.to(pl_module.device)
            xrec = pl_module.decode(pl_module.encode(x)).clamp(-1, 1)
        pl_module.train(was_training)
        out = Path(self.out_dir or Path(trainer.default_root_dir) / "images")
        path = modality_of(pl_module.code_spec).save_reconstructions(x.cpu(), xrec.cpu(),
                                                                     out / f"recon_step{step:07d}.png")
        _log_image(trainer, "reconstructions", path, step)


class CodebookHistogram(pl.Callback):
    """After each validation epoch, save the sorted code-usage histogram as a PNG."""

    def __init__(self, out_dir: str | None = None):
        self.out_dir = out_dir

    @rank_zero_only
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        counts = getattr(pl_module, "last_val_code_counts", None)
        if counts is None or trainer.sanity_checking:
            return
        out = Path(self.out_dir or Path(trainer.default_root_dir) / "images")
        save_usage_histogram(counts, out / f"usage_step{trainer.global_step:07d}.png",
                             title=f"codebook usage, step {trainer.global_step}")


def _log_image(trainer: pl.Trainer, tag: str, path: Path, step: int) -> None:
    """Also send the grid to TensorBoard when that logger is active."""
    for logger in trainer.loggers:
        exp = getattr(logger, "experiment", None)
        if exp is not None and hasattr(exp, "add_image"):
            import numpy as np
            from PIL import Image

            img = np.asarray(Image.open(path).convert("RGB"))
            exp.add_image(tag, img, step, dataformats="HWC")


__all__ = ["RunMetadata", "SaveOnInterrupt", "ReconstructionGrid", "CodebookHistogram"]


class MoELoadHistory(pl.Callback):
    """Per-expert load of every MoE layer over training, kept in the checkpoint for ``evaluate``.

    Forward hooks on the MoE layers (and mixture-of-attention-heads layers) read the ``load``,
    ``router_entropy`` and ``dropped_fraction`` each forward reports, on every ``every_n_steps``-th
    training step only (the other steps pay one flag check per layer), and the means over that step's
    forwards are appended. The history is this callback's state, so
    it lives in every checkpoint (``checkpoint["callbacks"]``), survives a resume, and loads with
    ``weights_only=True`` (lists of floats).
    """

    def __init__(self, every_n_steps: int = 50):
        self.every_n_steps = max(int(every_n_steps), 1)
        self.history: dict[str, Any] = {"steps": [], "layers": {}}
        self._handles: list[Any] = []
        self._seen: dict[str, list[dict[str, torch.Tensor]]] = {}
        self._recording = False

    @staticmethod
    def moe_layers(module: torch.nn.Module) -> dict[str, torch.nn.Module]:
        from layers.moe import MixtureOfAttentionHeads, MoE

        return {n: m for n, m in module.named_modules() if isinstance(m, (MoE, MixtureOfAttentionHeads))}

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for name, layer in self.moe_layers(pl_module).items():
            self._handles.append(layer.register_forward_hook(self._hook(name)))

    def _hook(self, name: str):
        def hook(module: torch.nn.Module, args: Any, output: Any) -> None:
            if not self._recording or not module.training or not isinstance(output, tuple):
                return
            aux = output[1]
            self._seen.setdefault(name, []).append(
                {k: aux[k].detach().float() for k in ("load", "router_entropy", "dropped_fraction") if k in aux})

        return hook

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        # the step that ends at global_step 1, 1 + n, 1 + 2n, ... starts at 0, n, 2n, ...
        self._recording = bool(self._handles) and trainer.global_step % self.every_n_steps == 0

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        seen, self._seen, self._recording = self._seen, {}, False
        if not seen:
            return
        self.history["steps"].append(int(trainer.global_step))
        for name, records in seen.items():
            layer = self.history["layers"].setdefault(name, {"load": [], "router_entropy": [],
                                                             "dropped_fraction": []})
            for key in layer:
                values = [r[key] for r in records if key in r]
                mean = torch.stack(values).mean(0).cpu() if values else torch.tensor(float("nan"))
                layer[key].append(mean.tolist())

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def state_dict(self) -> dict[str, Any]:
        return {"every_n_steps": self.every_n_steps, "history": self.history}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = state_dict.get("history", self.history)
