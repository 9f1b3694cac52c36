"""Tokenizing throughput against its limit, the encoder's forward (+ quantizer argmin) alone (issue 22).

``python bench/e2e_tokenize.py [--rounds 5] [--threads 1 2] [--images 1024] [--batch-size 256]``

Trains the VQGAN of ``configs/vqgan.yaml`` (64 px emoji, f4, 1024 codes) for two steps to get a real
checkpoint, then in ONE process and in interleaved rounds (order alternating) times

- ``ours``: ``tokenforge.tokenize.main`` on that checkpoint (open the run, build the data, Lightning
  ``Trainer.predict``, shard writer, code files and manifest written), the whole command;
- ``ours_predict``: the same minus the fixed cost of opening the run and building the Trainer
  (the ``Trainer.predict`` call alone, as a throughput over many images converges to);
- ``limit``: ``model.encode`` (encoder forward + quantizer argmin) under ``no_grad`` over the same
  batches, already collated in memory.

and prints images/s and ``ours / limit`` (median, min-max over rounds), then a torch.profiler table
of one ``ours`` run. Codes of ours and of the limit are checked equal every round.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tokenforge import tokenize as tokenize_cmd  # noqa: E402
from tokenforge.runs import open_run  # noqa: E402
from tokenforge.train import main as train_main  # noqa: E402


def make_checkpoint(root: Path, images: int) -> Path:
    train_main([str(ROOT / "configs" / "vqgan.yaml"), "--runs", str(root), "--name", "tok",
                "trainer.max_steps=2", "trainer.enable_progress_bar=false", "trainer.accelerator=cpu",
                f"data.params.limit_train={images}", "data.params.limit_val=16", "model.params.perceptual_weight=0",
                "model.params.disc_start=100000", "trainer.val_check_interval=1000", "callbacks=[]"])
    return root / "tok" / "checkpoints" / "last.ckpt"


def run_ours(ckpt: Path, out: Path, batch_size: int, timings: dict) -> None:
    """The tokenize command, with the time spent inside ``Trainer.predict`` recorded on the side."""
    predict = tokenize_cmd.pl.Trainer.predict

    def timed_predict(self, *a, **k):
        t = time.perf_counter()
        try:
            return predict(self, *a, **k)
        finally:
            timings["predict"] = time.perf_counter() - t

    tokenize_cmd.pl.Trainer.predict = timed_predict
    try:
        t = time.perf_counter()
        tokenize_cmd.main([str(ckpt), "--out", str(out), "--splits", "train", "--batch-size", str(batch_size),
                           "trainer.enable_progress_bar=false", "trainer.accelerator=cpu"])
        timings["total"] = time.perf_counter() - t
    finally:
        tokenize_cmd.pl.Trainer.predict = predict


def run_limit(model, batches: list[torch.Tensor]) -> tuple[float, torch.Tensor]:
    t = time.perf_counter()
    with torch.no_grad():
        codes = [model.encode(x) for x in batches]
    return time.perf_counter() - t, torch.cat(codes)


def summary(ratios: list[float]) -> str:
    return f"{statistics.median(ratios):.3f} (min {min(ratios):.3f}, max {max(ratios):.3f})"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--images", type=int, default=1024)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--profile", action="store_true", help="print a torch.profiler table of one ours run")
    args = p.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="e2e_tokenize_"))
    ckpt = make_checkpoint(tmp / "runs", args.images)
    run = open_run(ckpt, map_location="cpu", expect="tokenizer")
    model = run.model.eval()
    dm = run.datamodule([], args.batch_size)
    dm.setup("fit")
    batches = [b["x"] for b in dm.split_dataloader("train")]
    n = sum(len(x) for x in batches)
    print(f"{n} images of {tuple(batches[0].shape[1:])}, batch {args.batch_size}, code grid "
          f"{run.model.code_spec['grid']}")

    for threads in args.threads:
        torch.set_num_threads(threads)
        run_limit(model, batches[:1])  # first-call costs (kernel selection) are paid by neither side
        run_ours(ckpt, tmp / f"codes_{threads}_warm", args.batch_size, {})
        rows = {"ours": [], "ours_predict": [], "limit": []}
        for r in range(args.rounds):
            order = ("ours", "limit") if r % 2 == 0 else ("limit", "ours")
            for who in order:
                if who == "ours":
                    timings: dict = {}
                    out = tmp / f"codes_{threads}_{r}"
                    run_ours(ckpt, out, args.batch_size, timings)
                    rows["ours"].append(timings["total"])
                    rows["ours_predict"].append(timings["predict"])
                    shards = sorted(f for f in out.glob("train-*.npy") if not f.name.endswith(".labels.npy"))
                    ours_codes = torch.from_numpy(np.concatenate([np.load(f) for f in shards])).long()
                else:
                    seconds, limit_codes = run_limit(model, batches)
                    rows["limit"].append(seconds)
            assert torch.equal(ours_codes.view(limit_codes.shape), limit_codes.long()), "codes differ"
        print(f"threads {threads}: images/s median  ours {n / statistics.median(rows['ours']):.1f}  "
              f"ours_predict {n / statistics.median(rows['ours_predict']):.1f}  "
              f"limit {n / statistics.median(rows['limit']):.1f}")
        for key in ("ours", "ours_predict"):
            ratios = [lim / o for lim, o in zip(rows["limit"], rows[key])]
            print(f"threads {threads}: {key} / limit throughput {summary(ratios)}")

    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        torch.set_num_threads(args.threads[0])
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            run_ours(ckpt, tmp / "codes_profiled", args.batch_size, {})
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            run_limit(model, batches)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=8))


if __name__ == "__main__":
    main()
