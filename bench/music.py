"""Music priors against baselines and the data (issue 18): validation bits per token and listen-free
sample statistics, on Bach chorales, in one process on a small CPU budget.

    OMP_NUM_THREADS=1 nice -n 10 python bench/music.py --out /tmp/music_bench [--tok-steps 600 --prior-steps 800]

1. A small music VQ tokenizer (configs/music_vq.yaml, narrowed by overrides) on 4-bar chorale windows
   (transposed to every key within the voices' ranges for training), tokenized with scripts' tokenize.
2. An AR prior (configs/music_prior.yaml) and a MaskGIT prior (configs/music_maskgit.yaml), narrowed
   to the same width, depth and steps, on those codes.
3. Validation bits per token on the held-out pieces' codes (untransposed windows):
   * unigram: the train codes' frequencies (add-0.5);
   * n-gram: interpolated Witten-Bell bigram and trigram over each window's code sequence;
   * AR: its exact next-token NLL;
   * MaskGIT, left to right: each code predicted with every later code masked, so the product of
     these conditionals is a normalised likelihood of the sequence (the AR model MaskGIT's own
     conditionals define in raster order). MaskGIT is trained for all mask patterns, not this chain,
     so the figure is a fair upper bound on what its conditionals can do, not its training loss.
4. Sample statistics (metrics/music.py) of 64 samples per source, decoded by the tokenizer, against
   the held-out windows: pitch-class distance (TV) to the held-out windows as they are and to the
   held-out windows in every allowed transposition (the priors learnt transposed data, so many keys),
   note density, SATB range violations per voice and the parallel fifths/octaves rate. The tokenizer's
   reconstructions of the held-out windows show what decoding alone does to the statistics.
Results go to ``OUT/results.json`` (and stdout).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the working tree's packages

from data.codes import CodeDataset  # noqa: E402
from data.music import (  # noqa: E402
    MusicDataModule,
    allowed_transpositions,
    decode_tokens,
    grid_to_tokens,
    tokens_to_grid,
    transposed,
    windows,
)
from metrics.music import (  # noqa: E402
    SATB_RANGES,
    note_density,
    parallel_fraction,
    pitch_class_distance,
    voice_range_violations,
)
from stage1 import load_tokenizer  # noqa: E402
from stage2.prior import load_prior  # noqa: E402
from tokenforge.tokenize import main as tokenize_main  # noqa: E402
from tokenforge.train import main as train_main  # noqa: E402

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
BARS = 4


# ------------------------------------------------------------------------------------ baselines
def unigram_logprobs(train: np.ndarray, vocab: int) -> np.ndarray:
    counts = np.bincount(train.reshape(-1), minlength=vocab).astype(np.float64)
    return np.log((counts + 0.5) / (counts.sum() + 0.5 * vocab))


class WittenBell:
    """Interpolated Witten-Bell n-gram over each sequence (start padded), down to the add-0.5 unigram:
    ``P(w | h) = (c(h, w) + T(h) P(w | h')) / (c(h) + T(h))`` with ``T(h)`` the distinct successors of ``h``."""

    def __init__(self, train: np.ndarray, vocab: int, order: int) -> None:
        self.vocab, self.order = vocab, order
        self.unigram = np.exp(unigram_logprobs(train, vocab))
        self.counts: list[dict[tuple[int, ...], np.ndarray]] = [{} for _ in range(order)]
        for seq in train:
            padded = [vocab] * (order - 1) + [int(c) for c in seq]
            for i in range(order - 1, len(padded)):
                for k in range(1, order):  # contexts of length k
                    h = tuple(padded[i - k:i])
                    self.counts[k].setdefault(h, np.zeros(vocab))[padded[i]] += 1

    def probs(self, history: list[int]) -> np.ndarray:
        p = self.unigram
        for k in range(1, self.order):
            c = self.counts[k].get(tuple(history[-k:]))
            if c is None:
                continue
            distinct = float((c > 0).sum())
            p = (c + distinct * p) / (c.sum() + distinct)
        return p

    def nll(self, seqs: np.ndarray) -> float:
        total = 0.0
        for seq in seqs:
            history = [self.vocab] * (self.order - 1)
            for c in seq:
                total -= math.log(self.probs(history)[int(c)])
                history.append(int(c))
        return total / seqs.size

    def sample(self, n: int, length: int, rng: np.random.Generator) -> np.ndarray:
        out = np.zeros((n, length), dtype=np.int64)
        for i in range(n):
            history = [self.vocab] * (self.order - 1)
            for t in range(length):
                out[i, t] = rng.choice(self.vocab, p=self.probs(history))
                history.append(int(out[i, t]))
        return out


# ------------------------------------------------------------------------------------ priors
@torch.no_grad()
def ar_nll(prior, codes: torch.Tensor) -> float:
    prior.eval()
    total = 0.0
    for batch in codes.split(256):
        total += float(prior.loss(batch, None).nll) * batch.numel()
    return total / codes.numel()


@torch.no_grad()
def maskgit_left_to_right_nll(prior, codes: torch.Tensor) -> float:
    """``-sum_i log p(x_i | x_<i, x_>=i masked)`` per token: a normalised chain over raster order."""
    prior.eval()
    flat = prior.flatten_codes(codes)
    total = 0.0
    for batch in flat.split(256):
        for i in range(batch.shape[1]):
            tokens = batch.clone()
            tokens[:, i:] = prior.mask_id
            logits = prior(tokens, None)[0][:, i].float()
            total -= float(torch.log_softmax(logits, -1).gather(1, batch[:, i:i + 1]).sum())
    return total / flat.numel()


# ------------------------------------------------------------------------------------ statistics
def statistics(grids: list[np.ndarray], val: list[np.ndarray], val_keys: list[np.ndarray]) -> dict[str, float]:
    lows, highs = np.array([r[0] for r in SATB_RANGES]), np.array([r[1] for r in SATB_RANGES])
    fraction, moves = parallel_fraction(grids)
    per_voice = voice_range_violations(grids, lows, highs)
    return {"pc_tv_val": pitch_class_distance(val, grids), "pc_tv_val_all_keys": pitch_class_distance(val_keys, grids),
            "note_density": note_density(grids, 16),
            **{f"range_{v}": float(x) for v, x in zip("SATB", per_voice)},
            "parallel_rate": fraction, "similar_motions": moves}


def decode(tokenizer, codes: torch.Tensor) -> list[np.ndarray]:
    with torch.no_grad():
        x = torch.cat([tokenizer.decode(c) for c in codes.long().split(64)])
    return [tokens_to_grid(t) for t in decode_tokens(x, 4).numpy()]


def all_codes(dataset: CodeDataset) -> torch.Tensor:
    return dataset.__getitems__(list(range(len(dataset))))["codes"].long()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="/tmp/music_bench")
    p.add_argument("--limit-pieces", type=int, default=None, help="chorale files parsed (default all 371)")
    p.add_argument("--tok-steps", type=int, default=600)
    p.add_argument("--prior-steps", type=int, default=800)
    p.add_argument("--samples", type=int, default=64)
    args = p.parse_args()
    out = Path(args.out)
    runs, codes_dir = out / "runs", out / "codes"
    limit = [] if args.limit_pieces is None else [f"data.params.limit_pieces={args.limit_pieces}"]
    timings, t0 = {}, time.process_time()
    tok_ckpt = runs / "tok" / "checkpoints" / "last.ckpt"
    if not tok_ckpt.is_file():
        train_main([str(CONFIGS / "music_vq.yaml"), "--runs", str(runs), "--name", "tok", *limit,
                    f"data.params.bars={BARS}", "data.params.hop_bars=2", "data.params.batch_size=32",
                    f"model.params.resolution={BARS * 16}", "model.params.embed_dim=16",
                    "model.params.encoder.channels=32", "model.params.encoder.z_channels=32",
                    "model.params.encoder.num_res_blocks=1", "model.params.encoder.mid_attn=false",
                    "model.params.quantizer.params.codebook_size=128", "model.params.warmup_steps=50",
                    f"trainer.max_steps={args.tok_steps}", f"trainer.val_check_interval={args.tok_steps}",
                    "trainer.limit_val_batches=4", "trainer.accelerator=cpu", "trainer.enable_progress_bar=false",
                    "checkpoint_every_n_steps=100000", "callbacks=[]"])
    timings["tokenizer_cpu_s"] = time.process_time() - t0
    if not (codes_dir / "manifest.json").is_file():
        tokenize_main([str(tok_ckpt), "--out", str(codes_dir), "--batch-size", "256"])
    timings["tokenize_cpu_s"] = time.process_time() - t0 - sum(timings.values())
    train_codes, val_codes = (all_codes(CodeDataset(codes_dir, split)) for split in ("train", "val"))
    vocab = 128
    results: dict[str, dict] = {"setup": {"train_windows": len(train_codes), "val_windows": len(val_codes),
                                          "codes_per_window": int(train_codes[0].numel()), "vocab": vocab}}
    bits = 1 / math.log(2)
    tr, va = train_codes.reshape(len(train_codes), -1).numpy(), val_codes.reshape(len(val_codes), -1).numpy()
    uni = unigram_logprobs(tr, vocab)
    nll = {"unigram": float(-uni[va].mean()) * bits}
    ngrams = {k: WittenBell(tr, vocab, k) for k in (2, 3)}
    for k, model in ngrams.items():
        nll[f"{k}-gram (Witten-Bell)"] = model.nll(va) * bits
    priors = {}
    for name, config in (("AR", "music_prior.yaml"), ("MaskGIT", "music_maskgit.yaml")):
        ckpt = runs / name / "checkpoints" / "last.ckpt"
        if not ckpt.is_file():
            train_main([str(CONFIGS / config), "--runs", str(runs), "--name", name, f"data.params.codes={codes_dir}",
                        "model.params.dim=64", "model.params.depth=2", "model.params.warmup_steps=50",
                        f"trainer.max_steps={args.prior_steps}", f"trainer.val_check_interval={args.prior_steps}",
                        "trainer.limit_val_batches=2", "trainer.accelerator=cpu", "trainer.enable_progress_bar=false",
                        "checkpoint_every_n_steps=100000"])
        priors[name] = load_prior(ckpt).cpu()
    nll["AR prior"] = ar_nll(priors["AR"], val_codes) * bits
    nll["MaskGIT prior (left-to-right chain)"] = maskgit_left_to_right_nll(priors["MaskGIT"], val_codes) * bits
    timings["priors_cpu_s"] = time.process_time() - t0 - sum(timings.values())
    results["val_bits_per_token"] = nll
    print(json.dumps(results, indent=2), flush=True)

    # sample statistics against the held-out windows
    tokenizer = load_tokenizer(tok_ckpt).cpu().eval()
    dm = MusicDataModule(bars=BARS, hop_bars=2, limit_pieces=args.limit_pieces)
    dm.setup()
    val = [w for piece in dm.pieces["val"] for w in windows(piece, BARS, 16, 2)]
    val_keys = [transposed(w, s) for w in val for s in allowed_transpositions(w, *dm.ranges)]
    gen, rng = torch.Generator().manual_seed(0), np.random.default_rng(0)
    n, length = args.samples, tr.shape[1]
    shape = tuple(train_codes.shape[1:])
    sources = {
        "held-out data": val,
        "tokenizer reconstructions (held-out)": decode(tokenizer, val_codes),
        "unigram samples": decode(tokenizer, torch.from_numpy(rng.choice(vocab, (n, length), p=np.exp(uni)))
                                  .reshape(n, *shape)),
        "3-gram samples": decode(tokenizer, torch.from_numpy(ngrams[3].sample(n, length, rng)).reshape(n, *shape)),
        "AR samples": decode(tokenizer, priors["AR"].sample(n, generator=gen)),
        "MaskGIT samples (8 steps)": decode(tokenizer, priors["MaskGIT"].sample(n, steps=8, generator=gen)),
    }
    recon = np.stack([grid_to_tokens(g) for g in sources["tokenizer reconstructions (held-out)"]])
    real = np.stack([grid_to_tokens(g) for g in val])  # the codes' val split holds these windows, in order
    results["tokenizer_heldout"] = {"token_accuracy": float((recon == real).mean()),
                                    "note_accuracy": float((recon == real)[real != 0].mean())}
    results["sample_statistics"] = {k: statistics(g, val, val_keys) for k, g in sources.items()}
    timings["samples_cpu_s"] = time.process_time() - t0 - sum(timings.values())
    results["cpu_seconds"] = timings
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
