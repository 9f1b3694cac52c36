"""Tokenizing throughput against its limit, the encoder's forward (+ quantizer argmin) alone (issue 22).

``python bench/e2e_tokenize.py [--rounds 5] [--threads 1 2] [--images 1024] [--batch-size 256] [--two-ranks]``

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

``--two-ranks`` (``--threads`` may then be empty) compares, in interleaved rounds, two processes of one
thread each (``--shard-size`` items per shard, rank ``r`` owning shards ``r, r + 2, ...``):

- ``ours_2``: ``scripts/tokenize.py ... trainer.devices=2 trainer.strategy=ddp`` (gloo on CPU) as a
  subprocess, the whole command (interpreter start, imports, the second rank's launch, DDP set-up);
- ``ours_2_predict``: its prediction loop, from the first rank's ``on_predict_start`` to the last rank's
  ``on_predict_end`` (recorded by the ranks into files);
- ``limit_2``: two already-started processes running ``model.encode`` under ``no_grad`` over the same
  batches of the same shards, from the first start to the last finish.

The code folder the two ranks write is read back shard by shard and checked equal to the one-process
limit's codes of the whole split (so the ranks' shards merge into the one-rank folder's codes).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import subprocess
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
from tokenforge.tokenize import ShardBatchSampler  # noqa: E402
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


def folder_codes(out: Path) -> torch.Tensor:
    shards = sorted(f for f in out.glob("train-*.npy") if not f.name.endswith(".labels.npy"))
    return torch.from_numpy(np.concatenate([np.load(f) for f in shards])).long()


def rank_batches(ckpt: Path, batch_size: int, shard_size: int, rank: int, world: int) -> list[torch.Tensor]:
    """The batches rank ``rank`` of ``world`` encodes in tokenize: its shards ``rank, rank + world, ...``."""
    dm = open_run(ckpt, map_location="cpu", expect="tokenizer").datamodule([], batch_size)
    dm.setup("fit")
    base = dm.split_dataloader("train")
    total = len(base.dataset)
    shards = [(i, min(i + shard_size, total)) for i in range(0, total, shard_size)][rank::world]
    loader = torch.utils.data.DataLoader(base.dataset, batch_sampler=ShardBatchSampler(shards, batch_size),
                                         collate_fn=base.collate_fn)
    return [b["x"] for b in loader]


def limit_worker(rank: int, world: int, ckpt: str, batch_size: int, shard_size: int, barrier, conn) -> None:
    """One process of ``limit_2``: encodes its rank's batches with one thread each time it is told to."""
    torch.set_num_threads(1)
    model = open_run(Path(ckpt), map_location="cpu", expect="tokenizer").model.eval()
    batches = rank_batches(Path(ckpt), batch_size, shard_size, rank, world)
    with torch.no_grad():
        model.encode(batches[0][:8])  # first-call costs
    while conn.recv():
        barrier.wait()
        start = time.time()
        with torch.no_grad():
            codes = [model.encode(x) for x in batches]
        conn.send((start, time.time(), codes))


def tokenize_child(timings: str, argv: list[str]) -> None:
    """``ours_2``'s process (each rank runs this, as Lightning relaunches this script for rank 1): the
    tokenize command with its prediction loop's start and end written to ``timings/rank{r}.json``."""
    span: dict = {"batches": []}
    writer = tokenize_cmd.ShardWriter
    write_batch = writer.write_on_batch_end

    def timed_write(self, *a, **k):
        write_batch(self, *a, **k)
        span["batches"].append(time.time())  # each batch's end (encoded, and its shard written when complete)

    writer.write_on_batch_end = timed_write
    writer.on_predict_start = lambda self, trainer, module: span.__setitem__("start", time.time())
    writer.on_predict_end = lambda self, trainer, module: span.__setitem__("end", time.time())
    tokenize_cmd.main(argv)
    (Path(timings) / f"rank{os.environ.get('LOCAL_RANK', '0')}.json").write_text(json.dumps(span))


def run_ours_two_ranks(ckpt: Path, out: Path, args: argparse.Namespace) -> tuple[float, float]:
    """Whole-command wall time and prediction-loop window of the tokenize command on two DDP ranks."""
    timings = out.parent / f"{out.name}_timings"
    timings.mkdir()
    cmd = [sys.executable, str(Path(__file__).resolve()), "--tokenize-child", str(timings), str(ckpt),
           "--out", str(out), "--splits", "train", "--batch-size", str(args.batch_size), "--shard-size",
           str(args.shard_size), "trainer.enable_progress_bar=false", "trainer.accelerator=cpu",
           "trainer.devices=2", "trainer.strategy=ddp"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    t = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    total = time.perf_counter() - t
    if done.returncode:
        raise RuntimeError(done.stderr[-3000:])
    spans = [json.loads((timings / f"rank{r}.json").read_text()) for r in range(2)]
    first = min(s["start"] for s in spans)
    print("  ours_2 ranks (s from the first rank's predict start): " + "; ".join(
        f"rank {r} start {s['start'] - first:.2f} batches end "
        + " ".join(f"{t - first:.2f}" for t in s["batches"]) + f" end {s['end'] - first:.2f}"
        for r, s in enumerate(spans)) + f"; whole command {total:.1f}", flush=True)
    return total, max(s["end"] for s in spans) - first


def two_ranks(ckpt: Path, tmp: Path, reference: torch.Tensor, args: argparse.Namespace) -> None:
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(3)
    pipes = [ctx.Pipe() for _ in range(2)]
    workers = [ctx.Process(target=limit_worker, args=(r, 2, str(ckpt), args.batch_size, args.shard_size, barrier,
                                                      pipes[r][1]), daemon=True) for r in range(2)]
    for w in workers:
        w.start()

    def run_limit_two() -> tuple[float, list[list[torch.Tensor]]]:
        for parent, _ in pipes:
            parent.send(True)
        barrier.wait()
        results = [parent.recv() for parent, _ in pipes]
        first = min(r[0] for r in results)
        print("  limit_2 ranks: " + "; ".join(f"rank {i} start {r[0] - first:.2f} end {r[1] - first:.2f}"
                                              for i, r in enumerate(results)), flush=True)
        return max(r[1] for r in results) - first, [r[2] for r in results]

    run_limit_two()  # warm-up (the workers' model load is done by then); every ours_2 run starts cold anyway
    rows = {"ours_2": [], "ours_2_predict": [], "limit_2": []}
    for r in range(args.rounds):
        for who in (("ours", "limit") if r % 2 == 0 else ("limit", "ours")):
            if who == "ours":
                out = tmp / f"codes_2ranks_{r}"
                total, window = run_ours_two_ranks(ckpt, out, args)
                rows["ours_2"].append(total)
                rows["ours_2_predict"].append(window)
                assert torch.equal(folder_codes(out).view(reference.shape), reference), "two-rank codes differ"
            else:
                seconds, per_rank = run_limit_two()
                rows["limit_2"].append(seconds)
        # the limit's per-rank codes, put back in shard order, are the whole split's codes too
        shards = {i: c for rank, codes in enumerate(per_rank)
                  for i, c in zip(range(rank, 10 ** 9, 2), split_shards(codes, args))}
        assert torch.equal(torch.cat([shards[i] for i in sorted(shards)]), reference), "limit_2 codes differ"
    for parent, _ in pipes:
        parent.send(False)
    n = len(reference)
    print(f"two ranks x 1 thread: images/s median  ours_2 {n / statistics.median(rows['ours_2']):.1f}  "
          f"ours_2_predict {n / statistics.median(rows['ours_2_predict']):.1f}  "
          f"limit_2 {n / statistics.median(rows['limit_2']):.1f}")
    for key in ("ours_2", "ours_2_predict"):
        ratios = [lim / o for lim, o in zip(rows["limit_2"], rows[key])]
        print(f"two ranks: {key} / limit_2 throughput {summary(ratios)}")


def split_shards(codes: list[torch.Tensor], args: argparse.Namespace) -> list[torch.Tensor]:
    """One rank's encoded batches regrouped into its shards (batches never cross a shard boundary)."""
    flat = torch.cat(codes)
    return list(flat.split(args.shard_size))


def summary(ratios: list[float]) -> str:
    return f"{statistics.median(ratios):.3f} (min {min(ratios):.3f}, max {max(ratios):.3f})"


def main() -> None:
    if sys.argv[1:2] == ["--tokenize-child"]:
        return tokenize_child(sys.argv[2], sys.argv[3:])
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, nargs="*", default=[1, 2])
    p.add_argument("--images", type=int, default=1024)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--profile", action="store_true", help="print a torch.profiler table of one ours run")
    p.add_argument("--two-ranks", action="store_true", help="also compare two DDP ranks with two encoder processes")
    p.add_argument("--shard-size", type=int, default=128, help="items per shard in the two-rank comparison")
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
                    ours_codes = folder_codes(out)
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

    if args.two_ranks:
        torch.set_num_threads(1)
        with torch.no_grad():
            reference = torch.cat([model.encode(x) for x in batches]).long()
        two_ranks(ckpt, tmp, reference, args)

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
