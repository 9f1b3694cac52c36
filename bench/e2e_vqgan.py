"""A VQGAN training step against taming-transformers' ``VQModel.training_step`` (issue 22).

``python bench/e2e_vqgan.py [--steps 12] [--warmup 3] [--threads 1 2] [--profile]``

Both sides: batch 8 of 64 px RGB, encoder/decoder ``ch 32, ch_mult (1,2,4), 1 res block, mid
attention, no level attention, z 32``, a 1024 x 32 codebook with gradient (not EMA) updates and
beta 0.25, PatchGAN discriminator (ndf 64, 3 layers, BatchNorm), hinge loss with the adaptive GAN
weight on from step 0, L1 reconstruction, no perceptual loss (LPIPS weights cannot be downloaded
here; taming's LPIPS is stubbed and never called at weight 0), Adam betas (0.5, 0.9).

- ``ours``: ``stage1.vqgan.VQGAN`` trained by a Lightning ``Trainer.fit`` the way
  ``scripts/train.py`` runs it (manual optimisation, our logging, Adam switched to fused by
  ``tokenforge.acceleration`` as train.py does by default); a step is timed from
  ``on_train_batch_start`` to ``on_train_batch_end``.
- ``taming``: ``VQModel.training_step(batch, i, 0)`` -> backward -> Adam step, then
  ``training_step(batch, i, 1)`` -> backward -> Adam step (the two optimizer passes Lightning 1.x ran;
  the second re-runs the autoencoder forward), with torch's default Adam (foreach on CPU) as taming
  configures it; its ``self.log`` calls find no trainer and return.

One taming step runs right after each of our steps inside the same ``fit`` (interleaved, same
process, same batch); the ratio per step pair is taming / ours.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from stage1.vqgan import VQGAN  # noqa: E402
from tokenforge.acceleration import fused_configure_optimizers  # noqa: E402

BATCH, SIZE = 8, 64
PROFILES: dict[str, str] = {}
ARCH = {"ch": 32, "ch_mult": [1, 2, 4], "num_res_blocks": 1, "z_channels": 32, "embed_dim": 32,
        "n_embed": 1024, "ndf": 64, "disc_layers": 3}


def build_ours() -> VQGAN:
    enc = {"in_channels": 3, "z_channels": ARCH["z_channels"], "channels": ARCH["ch"], "ch_mult": ARCH["ch_mult"],
           "num_res_blocks": ARCH["num_res_blocks"], "attn_levels": [], "mid_attn": True, "groups": 32}
    quant = {"target": "stage1.quantizers.vq.VectorQuantizer",
             "params": {"codebook_size": ARCH["n_embed"], "codebook": "gradient", "beta": 0.25,
                        "kmeans_init": False, "restart_dead": False}}
    model = VQGAN(encoder=enc, quantizer=quant, resolution=SIZE, embed_dim=ARCH["embed_dim"], rec_loss="l1",
                  lr=4.5e-6, betas=(0.5, 0.9), perceptual_weight=0.0, disc_start=0, disc_weight=0.8,
                  disc_channels=ARCH["ndf"], disc_layers=ARCH["disc_layers"])
    model.configure_optimizers = fused_configure_optimizers(model)  # what scripts/train.py does by default
    return model


def build_taming() -> tuple[nn.Module, list[torch.optim.Optimizer]]:
    import pytorch_lightning.utilities as pl_utilities

    # taming.main (imported by taming.models.vqgan) imports rank_zero_only from its Lightning 1.x home.
    shim = type(sys)("pytorch_lightning.utilities.distributed")
    shim.rank_zero_only = pl_utilities.rank_zero_only
    sys.modules.setdefault("pytorch_lightning.utilities.distributed", shim)
    import taming.modules.losses.vqperceptual as vqperceptual
    from taming.models.vqgan import VQModel

    class NoLPIPS(nn.Module):  # LPIPS downloads VGG weights; at perceptual_weight 0 it is never called
        def forward(self, *args):  # pragma: no cover
            raise AssertionError("perceptual loss is off")

    vqperceptual.LPIPS = NoLPIPS
    ddconfig = {"double_z": False, "z_channels": ARCH["z_channels"], "resolution": SIZE, "in_channels": 3,
                "out_ch": 3, "ch": ARCH["ch"], "ch_mult": ARCH["ch_mult"], "num_res_blocks": ARCH["num_res_blocks"],
                "attn_resolutions": [], "dropout": 0.0}
    loss = {"target": "taming.modules.losses.vqperceptual.VQLPIPSWithDiscriminator",
            "params": {"disc_start": 0, "disc_weight": 0.8, "codebook_weight": 1.0, "perceptual_weight": 0.0,
                       "disc_ndf": ARCH["ndf"], "disc_num_layers": ARCH["disc_layers"], "disc_in_channels": 3}}
    model = VQModel(ddconfig=ddconfig, lossconfig=loss, n_embed=ARCH["n_embed"], embed_dim=ARCH["embed_dim"])
    model.learning_rate = 4.5e-6
    opt_ae, opt_d = model.configure_optimizers()[0]
    return model, [opt_ae, opt_d]


def taming_step(model: nn.Module, opts: list[torch.optim.Optimizer], batch: dict) -> None:
    for idx, opt in enumerate(opts):
        loss = model.training_step(batch, 0, idx)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


def count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


class Interleave(pl.Callback):
    """Times each of our steps and runs one timed taming step after it."""

    def __init__(self, taming: nn.Module, opts: list, batch: dict, warmup: int, profile_at: int | None) -> None:
        self.taming, self.opts, self.batch, self.warmup, self.profile_at = taming, opts, batch, warmup, profile_at
        self.ours: list[float] = []
        self.theirs: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.prof = profile(activities=[ProfilerActivity.CPU]) if batch_idx == self.profile_at else None
        if self.prof:
            self.prof.__enter__()
        self.t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        ours = time.perf_counter() - self.t0
        if self.prof:
            self.prof.__exit__(None, None, None)
            PROFILES["ours"] = self.prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=14)
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                taming_step(self.taming, self.opts, self.batch)
            PROFILES["taming"] = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=14)
            return
        t = time.perf_counter()
        taming_step(self.taming, self.opts, self.batch)
        theirs = time.perf_counter() - t
        if batch_idx >= self.warmup:
            self.ours.append(ours)
            self.theirs.append(theirs)


def run(threads: int, steps: int, warmup: int, x: torch.Tensor,
        profile_at: int | None = None) -> tuple[list[float], list[float]]:
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    ours = build_ours()
    taming, opts = build_taming()
    batch = {"x": x}
    taming_batch = {"image": x.permute(0, 2, 3, 1).contiguous()}  # taming's get_input wants BHWC
    cb = Interleave(taming, opts, taming_batch, warmup, profile_at)
    loader = torch.utils.data.DataLoader([batch] * (steps + warmup + 1), batch_size=None)
    trainer = pl.Trainer(max_steps=steps + warmup + (profile_at is not None), accelerator="cpu", logger=False,
                         enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[cb])
    trainer.fit(ours, train_dataloaders=loader)
    return cb.ours, cb.theirs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--profile", action="store_true")
    args = p.parse_args()
    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    x = torch.rand(BATCH, 3, SIZE, SIZE) * 2 - 1
    ours, (taming, _) = build_ours(), build_taming()
    for who, enc, dec, disc, book in (
            ("ours", [ours.encoder, ours.quant_conv], [ours.decoder, ours.post_quant_conv], ours.discriminator,
             ours.quantizer.codebook_size * ARCH["embed_dim"]),
            ("taming", [taming.encoder, taming.quant_conv], [taming.decoder, taming.post_quant_conv],
             taming.loss.discriminator, count(taming.quantize))):
        print(f"parameters {who:>6}: encoder {sum(map(count, enc)):,} decoder {sum(map(count, dec)):,} "
              f"discriminator {count(disc):,} codebook {book:,}")
    for i, threads in enumerate(args.threads):
        profile_at = args.warmup if args.profile and i == 0 else None  # one extra step, not timed
        o, t = run(threads, args.steps, args.warmup, x, profile_at)
        ratios = [b / a for a, b in zip(o, t)]
        print(f"threads {threads}: step ms median ours {1e3 * statistics.median(o):.0f}  taming "
              f"{1e3 * statistics.median(t):.0f}  taming/ours {statistics.median(ratios):.3f} "
              f"(min {min(ratios):.3f}, max {max(ratios):.3f}, {len(ratios)} step pairs)")
    if args.profile:
        for who, table in PROFILES.items():
            print(f"--- torch.profiler, one {who} step ({args.threads[0]} thread(s)), by self CPU time")
            print(table)


if __name__ == "__main__":
    main()
