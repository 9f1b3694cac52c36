"""Our SEANet + RVQ codec against the EnCodec architecture (``encodec`` package, built untrained) in one process.

1. Parameter counts and training-step throughput (clips/s) of the generator step (forward, L1 + MR-STFT
   + multi-scale mel losses, backward, Adam) at equal size (SEANet 32 filters, ratios 8-5-4-2, 2-layer
   LSTM, 128-d latent, 8 x 1024 RVQ), batch of 0.5 s crops at 16 kHz; ours also with its discriminator step.
2. Reconstruction at matched bitrate and training budget: the same loss and optimiser for ``--steps``
   steps on spoken_digits crops (random 1..8 levels per step for both: quantizer dropout / EnCodec's
   random bandwidth), then on the held-out voices a bitrate table (0.5 kbps per level at 50 frames/s
   x 10 bits) of mel distance, MR-STFT distance and SI-SNR for 1..8 levels. Variants of ours: EnCodec-like
   (EMA VQ, k-means init) and DAC-like (factorised 8-d codes with cosine / l2-normalised lookup).

3. ``--profile N``: torch.profiler over N generator steps of each model and one discriminator-on step of
   ours (what ``AudioCodec.training_step`` computes): the top ops by self CPU time and the wall time
   per step that no op accounts for (Python overhead).

    OMP_NUM_THREADS=1 python bench/audio_codec.py --steps 150 --out bench/results/audio_codec.json
    OMP_NUM_THREADS=1 python bench/audio_codec.py --synthetic --profile 2 --out bench/results/audio_profile.json
    # a CPU-sized matched-budget run: both architectures at 8 filters, no LSTM
    OMP_NUM_THREADS=1 python bench/audio_codec.py --steps 60 --batch-size 4 --channels 8 --lstm 0 \
        --models encodec package --throughput-steps 1 --out bench/results/audio_matched_tiny.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data.audio import AudioDataModule  # noqa: E402
from stage1.audio_codec import AudioCodec  # noqa: E402
from stage1.modalities import get_modality  # noqa: E402

RATIOS = [8, 5, 4, 2]
FRAME_RATE = 50


def our_codec(channels: int, lstm: int, variant: str) -> AudioCodec:
    net = {"dims": 1, "channels": channels, "z_channels": 128, "ratios": RATIOS, "lstm_layers": lstm}
    vq = {"codebook_size": 1024, "codebook": "ema", "kmeans_init": True, "restart_dead": True, "beta": 1.0}
    if variant == "dac":  # DAC: factorised low-dim codes, l2-normalised lookup, gradient-trained codebook
        vq = {"codebook_size": 1024, "codebook_dim": 8, "distance": "cosine", "codebook": "gradient", "beta": 0.25}
    level = {"target": "stage1.quantizers.vq.VectorQuantizer", "params": vq}
    quantizer = {"target": "stage1.quantizers.residual.ResidualQuantizer",
                 "params": {"depth": 8, "dropout_prob": 1.0, "quantizer": level}}
    return AudioCodec(encoder={"target": "stage1.seanet.SEANetEncoder", "params": {"in_channels": 1, **net}},
                      decoder={"target": "stage1.seanet.SEANetDecoder", "params": {"out_channels": 1, **net}},
                      quantizer=quantizer, resolution=16000, embed_dim=128)


class EncodecNet(torch.nn.Module):
    """The ``encodec`` package's SEANet encoder/decoder and RVQ (untrained), trained with our losses."""

    def __init__(self, channels: int, lstm: int):
        super().__init__()
        from encodec.modules import SEANetDecoder, SEANetEncoder
        from encodec.quantization import ResidualVectorQuantizer

        self.encoder = SEANetEncoder(channels=1, dimension=128, n_filters=channels, ratios=RATIOS, lstm=lstm)
        self.decoder = SEANetDecoder(channels=1, dimension=128, n_filters=channels, ratios=RATIOS, lstm=lstm)
        self.quantizer = ResidualVectorQuantizer(dimension=128, n_q=8, bins=1024)

    def forward(self, x: torch.Tensor, levels: int) -> tuple[torch.Tensor, torch.Tensor]:
        q = self.quantizer(self.encoder(x), FRAME_RATE, bandwidth=levels * FRAME_RATE * 10 / 1000)
        return self.decoder(q.quantized), q.penalty

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor, levels: int) -> torch.Tensor:
        bw = levels * FRAME_RATE * 10 / 1000
        codes = self.quantizer.encode(self.encoder(x), FRAME_RATE, bandwidth=bw)
        return self.decoder(self.quantizer.decode(codes))


def build_models(args: argparse.Namespace) -> dict[str, torch.nn.Module]:
    makers = {"encodec": ("ours (EnCodec-like EMA RVQ)", lambda: our_codec(args.channels, args.lstm, "encodec")),
              "dac": ("ours (DAC-like factorised cosine RVQ)", lambda: our_codec(args.channels, args.lstm, "dac")),
              "package": ("encodec package", lambda: EncodecNet(args.channels, args.lstm))}
    return {makers[k][0]: makers[k][1]() for k in args.models}


def lightning_like_step(codec: AudioCodec, opt_g, opt_d, x: torch.Tensor) -> None:
    """What ``AudioCodec.training_step`` computes with the adversarial terms on (generator step, then the
    discriminator step), without the Trainer: the part of a step that is ours to optimise."""
    from stage1.losses.audio import discriminator_hinge_loss

    codec.train()
    logits_real, feats_real = codec.discriminator(x)  # once per step, as training_step does
    xrec, q, aux = codec(x)
    for p in codec.discriminator.parameters():  # toggle_optimizer(opt_g)
        p.requires_grad_(False)
    losses = codec.generator_losses(x, xrec, adversarial=True, feats_real=feats_real)
    loss = sum(codec.weights[k] * v for k, v in losses.items()) + q.loss
    opt_g.zero_grad(set_to_none=True)
    loss.backward()
    opt_g.step()
    for p in codec.discriminator.parameters():
        p.requires_grad_(True)
    d = discriminator_hinge_loss(logits_real, codec.discriminator(xrec.detach())[0])
    opt_d.zero_grad(set_to_none=True)
    d.backward()
    opt_d.step()


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def losses_of(codec: AudioCodec, x: torch.Tensor, xrec: torch.Tensor) -> torch.Tensor:
    return codec.reconstruction_loss(x, xrec)  # 0.1 L1 + MR-STFT + multi-scale mel (the same for every model)


def step_ours(codec: AudioCodec, opt, x: torch.Tensor, levels: int) -> float:
    qo = _partial_rvq(codec, codec.quant_conv(codec.encoder(x)), levels)
    xrec = codec.decode_latent(qo.z_q)
    loss = losses_of(codec, x, xrec) + qo.loss
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return float(loss)


def _partial_rvq(codec: AudioCodec, z: torch.Tensor, levels: int):
    """The RVQ with exactly ``levels`` active levels (what quantizer dropout draws at random)."""
    rvq = codec.quantizer
    rvq._active_levels = lambda: levels  # an instance attribute shadows the random draw for this call
    try:
        return rvq(z)
    finally:
        del rvq._active_levels


def step_encodec(net: EncodecNet, ref: AudioCodec, opt, x: torch.Tensor, levels: int) -> float:
    xrec, penalty = net(x, levels)
    loss = losses_of(ref, x, xrec) + penalty
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return float(loss)


def throughput(fn, batch: torch.Tensor, steps: int) -> float:
    fn(batch)  # warm-up (k-means init, allocations)
    start = time.perf_counter()
    for _ in range(steps):
        fn(batch)
    return steps * len(batch) / (time.perf_counter() - start)


def profile_step(fn, batch: torch.Tensor, steps: int, top: int = 15) -> dict:
    """torch.profiler over ``steps`` calls (after one warm-up): the ``top`` ops by self CPU time, and how
    much of the wall time no op accounts for (Python overhead between ops)."""
    from torch.profiler import ProfilerActivity, profile

    fn(batch)
    start = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            fn(batch)
    wall = (time.perf_counter() - start) / steps
    events = prof.key_averages()
    total_self = sum(e.self_cpu_time_total for e in events) / 1e6 / steps
    ops = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
    return {"wall_s_per_step": wall, "op_self_cpu_s_per_step": total_self,
            "top_ops": [{"op": e.key, "self_cpu_s_per_step": e.self_cpu_time_total / 1e6 / steps,
                         "calls_per_step": e.count / steps} for e in ops]}


@torch.no_grad()
def bitrate_table(reconstruct, loader, max_batches: int) -> list[dict[str, float]]:
    rows = []
    for levels in range(1, 9):
        ev = get_modality("audio").reconstruction_evaluator({})
        for i, batch in enumerate(loader):
            if i >= max_batches:
                break
            x = batch["x"]
            ev.update(real=x, fake=reconstruct(x, levels).clamp(-1, 1))
        rows.append({"levels": levels, "kbps": levels * FRAME_RATE * 10 / 1000, **ev.compute()})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=150, help="training steps per model for the quality table")
    p.add_argument("--throughput-steps", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--channels", type=int, default=32, help="SEANet filters (32 = EnCodec's)")
    p.add_argument("--lstm", type=int, default=2)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--synthetic", action="store_true", help="throughput and sizes only, on a random batch")
    p.add_argument("--profile", type=int, default=0, help="profile N generator steps of each model (torch.profiler)")
    p.add_argument("--models", nargs="+", default=["encodec", "dac", "package"],
                   help="which of ours-EnCodec-like (encodec), ours-DAC-like (dac), the encodec package (package)")
    p.add_argument("--voices", type=int, default=8, help="espeak voices (2 held out); x 3 pitches x 10 digits")
    p.add_argument("--out", default="bench/results/audio_codec.json")
    args = p.parse_args()
    torch.manual_seed(0)
    if args.synthetic:  # sizes and step throughput only, on a random batch (no dataset to generate)
        args.steps = 0
    dm = None
    if not args.synthetic:
        dm = AudioDataModule(num_voices=args.voices, num_val_voices=2, speeds=(180,), pitches=(35, 50, 65),
                             crop=8000, batch_size=args.batch_size)
    if dm is not None:
        dm.setup()
    results: dict = {"args": vars(args), "torch_threads": torch.get_num_threads()}

    models = build_models(args)
    ref = models.get("ours (EnCodec-like EMA RVQ)") or our_codec(args.channels, args.lstm, "encodec")
    results["parameters"] = {
        name: {"encoder": count(m.encoder), "decoder": count(m.decoder), "quantizer": count(m.quantizer)}
        for name, m in models.items()}
    results["parameters"]["ours: MS-STFT discriminator"] = count(ref.discriminator)

    batch = (torch.rand(args.batch_size, 1, 8000) * 2 - 1 if dm is None else next(iter(dm.train_dataloader()))["x"])
    opts = {name: torch.optim.Adam([q for n, q in m.named_parameters() if not n.startswith("discriminator.")],
                                   lr=args.lr, betas=(0.5, 0.9)) for name, m in models.items()}

    def step(name: str, x: torch.Tensor, levels: int) -> float:
        m = models[name]
        if isinstance(m, EncodecNet):
            return step_encodec(m, ref, opts[name], x, levels)
        return step_ours(m, opts[name], x, levels)

    if args.profile:
        results["profile"] = {}
        for name in models:  # written after each model: a run cut short keeps what it measured
            results["profile"][name] = profile_step(lambda x, n=name: step(n, x, 8), batch, args.profile)
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(results, indent=1))
        d_opt = torch.optim.Adam(ref.discriminator.parameters(), lr=args.lr)
        results["profile"]["ours, one Lightning training_step with the discriminator"] = profile_step(
            lambda x: lightning_like_step(ref, opts.get("ours (EnCodec-like EMA RVQ)") or torch.optim.Adam(
                [q for n, q in ref.named_parameters() if not n.startswith("discriminator.")], lr=args.lr),
                d_opt, x), batch, args.profile)
        print(json.dumps(results["profile"], indent=1), flush=True)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=1))
        return
    results["throughput_clips_per_s"] = {
        name: throughput(lambda x, n=name: step(n, x, 8), batch, args.throughput_steps) for name in models}
    # Ours with the adversarial part on (generator + discriminator forward/backward), as trained.
    codec = ref
    d_opt = torch.optim.Adam(codec.discriminator.parameters(), lr=args.lr)

    def adversarial_step(x: torch.Tensor) -> None:
        xrec, q, _ = codec(x)
        losses = codec.generator_losses(x, xrec, adversarial=True)
        loss = sum(codec.weights[k] * v for k, v in losses.items()) + q.loss
        opts["ours (EnCodec-like EMA RVQ)"].zero_grad(set_to_none=True)
        loss.backward()
        opts["ours (EnCodec-like EMA RVQ)"].step()
        from stage1.losses.audio import discriminator_hinge_loss

        d = discriminator_hinge_loss(codec.discriminator(x)[0], codec.discriminator(xrec.detach())[0])
        d_opt.zero_grad(set_to_none=True)
        d.backward()
        d_opt.step()

    codec.train()
    results["throughput_clips_per_s"]["ours with MS-STFT discriminator"] = throughput(adversarial_step, batch,
                                                                                        args.throughput_steps)
    print(json.dumps(results, indent=1), flush=True)

    if args.steps <= 0:  # throughput and sizes only
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=1))
        print(f"wrote {args.out}")
        return
    # Matched training budget: fresh models, same data order, same random level counts.
    torch.manual_seed(0)
    models = build_models(args)
    ref = models.get("ours (EnCodec-like EMA RVQ)") or our_codec(args.channels, args.lstm, "encodec")
    opts = {name: torch.optim.Adam(m.parameters(), lr=args.lr, betas=(0.5, 0.9)) for name, m in models.items()}
    gen = torch.Generator().manual_seed(0)
    losses: dict[str, list[float]] = {name: [] for name in models}
    done, start = 0, time.perf_counter()
    while done < args.steps:
        for b in dm.train_dataloader():
            levels = int(torch.randint(1, 9, (), generator=gen))
            for name in models:
                models[name].train()
                losses[name].append(step(name, b["x"], levels))
            done += 1
            if done >= args.steps:
                break
    results["train_seconds"] = time.perf_counter() - start
    results["final_train_loss (mean of last 20)"] = {n: sum(v[-20:]) / len(v[-20:]) for n, v in losses.items()}
    val = dm.val_dataloader()
    tables = {}
    for name, m in models.items():
        m.eval()
        if isinstance(m, EncodecNet):
            tables[name] = bitrate_table(m.reconstruct, val, max_batches=3)
        else:
            tables[name] = bitrate_table(
                lambda x, k, c=m: c.decode(c.encode(x), levels=k), val, max_batches=3)
    results["bitrate_tables"] = tables
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1))
    print(json.dumps({"bitrate_tables": tables}, indent=1))
    print(f"wrote {args.out}; {math.fsum(len(v) for v in losses.values())} steps in {results['train_seconds']:.0f} s")


if __name__ == "__main__":
    main()
