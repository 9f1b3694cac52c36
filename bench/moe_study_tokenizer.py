"""The router study of "Routers in Vision Mixture of Experts" (Liu et al. 2024) on a tokenizer's decoder.

    OMP_NUM_THREADS=1 nice -n 10 python bench/moe_study_tokenizer.py --steps 500 --seeds 0 1 2 \
        --out bench/results/moe_study_tokenizer.json [--plot bench/results/moe_study_tokenizer.png]

The third workload of issue 21 ("the VQGAN decoder with MoE in its mid blocks: patch-level routing in
CNNs"), beside the MaskGIT study of ``bench/moe_study.py``. The tokenizer is ``configs/vqvae.yaml``'s
VQ-VAE (a VQGAN without its discriminator and perceptual loss: L2 reconstruction + VQ, EMA codebook of
512) made small (``--channels 8 --ch-mult 1 2 8 --res-blocks 0``: 28x28 Fashion-MNIST -> 7x7 codes, 64
channels in the middle blocks). Every variant is that tokenizer with a different token-wise module in
the decoder's middle block (``stage1.conv_encoder_decoder.TokenwiseSlot``: pre-norm, residual; one
token = one of the 7x7 positions of one image), at width C = 64 and SwiGLU hidden H = 176:

- ``none``: no slot (the plain decoder);
- ``dense``: a dense SwiGLU FFN of hidden H (a 1-expert ``layers.moe.ConvMoE``, gate exactly 1);
- ``token_choice``: 8 experts of hidden H/2, top-2 (TopKRouter, balance 0.01): H units per position;
- ``expert_choice``: the same experts; each takes its top ``2 N / 8`` positions of the batch's
  N = B x 49 positions (capacity factor 2: on average 2 experts per position, the same FLOPs);
- ``soft``: Soft MoE, 8 experts of hidden H, 6 slots each: 48 slots for the 49 positions of an image;
- ``dense_total``: a dense SwiGLU FFN of hidden 4H = the 8 experts' total (4x the FLOPs).

Expert choice picks positions across all images of the batch and Soft MoE mixes the positions of an
image: both fine for a non-causal decoder. One seed = one initialisation of the shared parts (copied
from the slot-less model built with that seed), one data order, and one RNG stream for the quantizer
(k-means init, dead-code restarts), shared by every variant. Reported: reconstruction MSE (the L2
training loss, [-1, 1] scale) and PSNR ([0, 1] scale, clamped, mean over images) of the first
``--limit-val`` Fashion-MNIST test images at every ``--eval-every`` steps, mean ± std over seeds;
expert usage at the end (load per expert, expert x spatial position and expert x class, the mutual
information of each with the chosen expert, experts per position; Soft MoE: each position's combine
weight per expert), and ``--plot``: the validation curves and expert x position maps.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from bench.moe_study import count_parameters, summarise, swiglu_hidden
from data.fashion_mnist import CLASSES, FashionMNIST
from data.image_array import to_unit_range
from layers.moe import ConvMoE, RoutingRecorder, mutual_information_bits
from stage1.autoencoder import warmup_cosine
from stage1.conv_encoder_decoder import TokenwiseSlot
from stage1.vqvae import VQVAE
from tokenforge.config import load_config, to_plain

ROOT = Path(__file__).resolve().parents[1]
EXPERTS = 8
SLOT_KEY = "decoder.mid.1."  # the slot's place in the decoder's middle block: ResBlock, slot, ResBlock


def _conv_moe(experts: int, hidden: int, router: dict[str, Any], top_k: int = 2) -> dict[str, Any]:
    return {"target": "layers.moe.ConvMoE", "params": {"num_experts": experts, "top_k": top_k, "hidden_dim": hidden,
                                                       "router": router}}


def variants(channels: int, positions: int) -> dict[str, dict[str, Any] | None]:
    """Decoder mid-block slots at width ``channels`` for ``positions`` positions per image."""
    h = swiglu_hidden(channels)
    dense_router = {"target": "layers.moe.TopKRouter", "params": {"balance_weight": 0.0, "z_loss_weight": 0.0}}
    slots = max(1, positions // EXPERTS)  # 6 slots x 8 experts = 48 for the 49 positions of a 7x7 map
    return {
        "none": None,
        "dense": _conv_moe(1, h, dense_router, top_k=1),  # one expert, softmax gate = 1: a dense SwiGLU FFN
        "token_choice": _conv_moe(EXPERTS, h // 2, {"target": "layers.moe.TopKRouter",
                                                    "params": {"balance_weight": 0.01}}),
        "expert_choice": _conv_moe(EXPERTS, h // 2, {"target": "layers.moe.ExpertChoiceRouter",
                                                     "params": {"capacity_factor": 2.0}}),
        "soft": _conv_moe(EXPERTS, h, {"target": "layers.moe.SoftMoERouter",
                                       "params": {"slots_per_expert": slots}}),
        "dense_total": _conv_moe(1, EXPERTS * (h // 2), dense_router, top_k=1),
    }


VARIANTS = tuple(variants(64, 49))


def model_params(args: argparse.Namespace) -> dict[str, Any]:
    """configs/vqvae.yaml's model, made small by the command line (no slot yet)."""
    params = to_plain(load_config(ROOT / "configs" / "vqvae.yaml"))["model"]["params"]
    params["encoder"] |= {"channels": args.channels, "ch_mult": list(args.ch_mult), "num_res_blocks": args.res_blocks,
                          "groups": min(args.channels, 8)}
    params["warmup_steps"] = min(params["warmup_steps"], args.steps // 10)
    return params


def build(slot: dict[str, Any] | None, params: dict[str, Any]) -> VQVAE:
    encoder = params["encoder"]
    decoder = {k: v for k, v in encoder.items() if k != "in_channels"}  # the mirrored decoder ...
    decoder |= {"out_channels": encoder["in_channels"], "mid_ffn": slot}  # ... with the slot
    return VQVAE(**(params | {"decoder": decoder}))


def copy_shared_init(model: VQVAE, reference: VQVAE) -> int:
    """Copy the slot-less ``reference``'s tensors into ``model`` (its second mid ResBlock moves from
    ``mid.1`` to ``mid.2``), so every variant of a seed starts from the same shared weights."""
    ref, has_slot = reference.state_dict(), isinstance(model.decoder.mid[1], TokenwiseSlot)
    state, copied = model.state_dict(), 0
    for key, value in state.items():
        if has_slot and key.startswith(SLOT_KEY):
            continue
        src = key.replace("decoder.mid.2.", SLOT_KEY) if has_slot else key
        if src in ref and ref[src].shape == value.shape:
            value.copy_(ref[src])
            copied += 1
    return copied


def load_images(split: str, limit: int | None = None) -> tuple[Tensor, Tensor]:
    ds = FashionMNIST(split=split)
    n = len(ds) if limit is None else limit
    x = to_unit_range(torch.from_numpy(ds.images[:n]).permute(0, 3, 1, 2))
    return x, torch.from_numpy(ds.labels[:n])


def training_loss(model: VQVAE, x: Tensor) -> Tensor:
    """What ``VQVAE.training_step`` minimises: reconstruction + quantizer loss + the MoE aux loss."""
    xrec, q, aux = model(x)
    return model.nll(x, xrec)[2] + q.loss + aux.get("aux_loss", 0.0)


@torch.no_grad()
def validate(model: VQVAE, x: Tensor, batch: int) -> tuple[float, float]:
    """(MSE on the [-1, 1] scale, mean per-image PSNR in dB on the [0, 1] scale, outputs clamped)."""
    model.eval()
    se, psnr = 0.0, 0.0
    for i in range(0, len(x), batch):  # batches of the training size: expert choice picks within a batch
        xb = x[i:i + batch]
        xrec = model(xb)[0]
        se += F.mse_loss(xrec, xb, reduction="sum").item()
        per_image = ((xrec.clamp(-1, 1) - xb) / 2).square().flatten(1).mean(1)
        psnr += (-10 * per_image.clamp_min(1e-10).log10()).sum().item()
    model.train()
    return se / x.numel(), psnr / len(x)


@torch.no_grad()
def expert_usage(model: VQVAE, x: Tensor, y: Tensor, batch: int) -> dict[str, Any] | None:
    """Routing of the decoder's MoE on the validation images: tallies of ``layers.moe.RoutingRecorder``
    (what ``evaluate``'s MoE report reads) and, per position, how many experts took it (sparse) or its
    combine weight per expert (Soft MoE)."""
    conv = next((m for m in model.modules() if isinstance(m, ConvMoE)), None)
    if conv is None or conv.moe.num_experts == 1:
        return None
    e, soft = conv.moe.num_experts, getattr(conv.moe.router, "soft", False)
    extra: dict[str, Any] = {"experts_per_position": torch.zeros(e + 1, dtype=torch.long), "combine": None}

    def hook(module: ConvMoE, args: tuple[Tensor, ...], out: Any) -> None:
        tokens = args[0].flatten(2).transpose(1, 2)  # (B, T, C), as ConvMoE routes them
        if soft:  # each position's output weight per expert: its combine weights summed over the expert's slots
            combine = module.moe.router.weights(tokens)[1].view(*tokens.shape[:2], e, -1).sum(-1)
            total = combine.sum(0).double()
            extra["combine"] = total if extra["combine"] is None else extra["combine"] + total
        else:
            r = module.moe.router(tokens)  # the router alone: not seen (and not counted twice) by the recorder
            per_token = torch.bincount(r.token_idx, minlength=tokens.shape[0] * tokens.shape[1])
            extra["experts_per_position"] += torch.bincount(per_token.clamp(max=e), minlength=e + 1)

    model.eval()
    handle = conv.register_forward_hook(hook)
    with RoutingRecorder(model) as rec:
        for i in range(0, len(x), batch):
            model(x[i:i + batch])
            rec.commit(labels=y[i:i + batch])
    handle.remove()
    model.train()
    if soft:
        combine = extra["combine"]
        load = combine.sum(0) / combine.sum()
        return {"router": conv.moe.router_name, "load": load.tolist(), "position": combine.tolist(),
                "position_mi_bits": None, "class_mi_bits": None}
    tally = next(t for _, t in rec.items())
    positions = math.prod(model.grid)  # the decoder's middle block works at the code grid
    position = torch.cat([tally.position, tally.position.new_zeros(positions - len(tally.position), e)])
    load = tally.load.double() / tally.load.sum()
    return {"router": conv.moe.router_name, "load": load.tolist(),
            "load_max_over_mean": float(load.max() / load.mean()),
            "router_entropy": tally.mean_entropy, "position": position.tolist(),
            "by_class": tally.by_class.tolist(),
            "position_mi_bits": mutual_information_bits(position),
            "class_mi_bits": mutual_information_bits(tally.by_class),
            "experts_per_position": extra["experts_per_position"].tolist()}


def ffn_macs_per_position(slot: dict[str, Any] | None, channels: int, positions: int) -> float:
    """Multiply-adds per position of the slot's experts and router (SwiGLU: 3 C x hidden per expert use)."""
    if slot is None:
        return 0.0
    p = slot["params"]
    e, h, k = p["num_experts"], p["hidden_dim"], p["top_k"]
    expert = 3 * channels * h
    router = p["router"]["target"].rsplit(".", 1)[-1]
    if router == "SoftMoERouter":
        s = p["router"]["params"]["slots_per_expert"]
        # slots per position x expert cost, plus logits, dispatch and combine (each T x E*S x C per image)
        return e * s / positions * expert + 3 * e * s * channels
    if router == "ExpertChoiceRouter":
        k = p["router"]["params"]["capacity_factor"]  # assignments per position on average
    return k * expert + (e * channels if e > 1 else 0)


def run(variant: str, seed: int, data: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    params = model_params(args)
    torch.manual_seed(seed)
    reference = build(None, params)
    torch.manual_seed(seed)
    slot = variants(args.mid_channels, args.positions)[variant]
    model = build(slot, params)
    copy_shared_init(model, reference)
    del reference
    torch.manual_seed(10_000 + seed)  # the quantizer's k-means and restarts draw from the same stream
    opt = torch.optim.AdamW(model.parameters(), lr=params["lr"], betas=tuple(model.hparams.betas))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine(s, params["warmup_steps"], args.steps))
    xt = data["train"][0]
    order = torch.Generator().manual_seed(seed)
    curve, train_s, cpu_s = [], 0.0, 0.0
    for step in range(1, args.steps + 1):
        idx = torch.randint(0, len(xt), (args.batch_size,), generator=order)
        t0, c0 = time.perf_counter(), time.process_time()
        loss = training_loss(model, xt[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        train_s += time.perf_counter() - t0
        cpu_s += time.process_time() - c0
        if step % args.eval_every == 0 or step == args.steps:
            curve.append((step, *validate(model, data["val"][0], args.batch_size)))
    usage = expert_usage(model, *data["val"], args.batch_size)
    print(f"  {variant:14s} seed {seed}: val MSE {curve[-1][1]:.5f}  PSNR {curve[-1][2]:.2f} dB  "
          f"({train_s:.0f} s, {cpu_s:.0f} CPU-s)", flush=True)
    return {"variant": variant, "seed": seed, "curve": curve, "final": curve[-1][1], "final_psnr": curve[-1][2],
            "train_s": train_s, "train_cpu_s": cpu_s, "parameters": count_parameters(model),
            "slot_parameters": 0 if slot is None else sum(p.numel() for n, p in model.named_parameters()
                                                          if n.startswith(SLOT_KEY)),
            "ffn_macs_per_position": ffn_macs_per_position(slot, args.mid_channels, args.positions),
            "usage": usage}


def plot(results: list[dict[str, Any]], path: Path, grid: int) -> None:
    """Validation MSE curves (mean ± std over seeds) and, for the first seed, expert x position maps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by: dict[str, list[dict[str, Any]]] = {}
    for r in results:
        by.setdefault(r["variant"], []).append(r)
    routed = [r for r in results if r["usage"] and r["seed"] == results[0]["seed"]]
    experts = max((len(r["usage"]["load"]) for r in routed), default=0)
    fig = plt.figure(figsize=(max(10, 1.3 * experts + 1), 4 + 1.5 * len(routed)))
    gs = fig.add_gridspec(1 + len(routed), max(experts, 2), height_ratios=[3] + [1.2] * len(routed))
    ax = fig.add_subplot(gs[0, :])
    for variant, rs in by.items():
        steps = [s for s, *_ in rs[0]["curve"]]
        vals = torch.tensor([[m for _, m, _ in r["curve"]] for r in rs])
        mean, std = vals.mean(0), vals.std(0) if len(rs) > 1 else torch.zeros(len(steps))
        ax.plot(steps, mean, marker="o", ms=3, label=variant)
        ax.fill_between(steps, mean - std, mean + std, alpha=0.2)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("val reconstruction MSE ([-1, 1] scale)")
    ax.set_title(f"decoder mid-block slot, {len(by[next(iter(by))])} seeds (mean ± std)", fontsize=9)
    ax.legend(fontsize=8)
    for row, r in enumerate(routed, start=1):
        table = torch.tensor(r["usage"]["position"], dtype=torch.float64)  # (positions, E)
        share = table / table.sum(1, keepdim=True).clamp_min(1e-12)  # each position's split over experts
        for e in range(experts):
            a = fig.add_subplot(gs[row, e])
            a.imshow(share[:, e].view(grid, grid).numpy(), vmin=0, vmax=float(share.max()), cmap="viridis")
            a.set_xticks([])
            a.set_yticks([])
            if e == 0:
                a.set_ylabel(r["variant"], fontsize=8)
            a.set_title(f"expert {e}: {r['usage']['load'][e]:.2f}", fontsize=7)
    fig.suptitle("expert x spatial position (seed 0): share of each 7x7 position's routing weight per expert; "
                 "title: the expert's load", fontsize=8, y=0.01)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--channels", type=int, default=8)
    ap.add_argument("--ch-mult", type=int, nargs="+", default=[1, 2, 8])
    ap.add_argument("--res-blocks", type=int, default=0)
    ap.add_argument("--limit-val", type=int, default=512)
    ap.add_argument("--out", type=Path, default=Path("bench/results/moe_study_tokenizer.json"))
    ap.add_argument("--plot", type=Path, help="write the curves and expert x position maps here (png)")
    ap.add_argument("--merge", type=Path, nargs="+", help="only merge these result files (one per seed) into --out")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.merge:
        parts = [json.loads(p.read_text()) for p in args.merge]
        results = [r for part in parts for r in part["runs"]]
        write(args.out, parts[0]["args"], results)
    else:
        args.mid_channels = args.channels * args.ch_mult[-1]
        side = 28 // 2 ** (len(args.ch_mult) - 1)
        args.positions = side * side
        data = {"train": load_images("train"), "val": load_images("test", args.limit_val)}
        print(f"train {len(data['train'][0])} / val {len(data['val'][0])} images, {side}x{side} positions of "
              f"{args.mid_channels} channels, {args.steps} steps x batch {args.batch_size}", flush=True)
        results = []
        for seed in args.seeds:  # seeds outermost: a cut-short run still has every variant of the first seeds
            for variant in args.variants:
                results.append(run(variant, seed, data, args))
                write(args.out, {k: str(v) for k, v in vars(args).items()}, results)
    if args.plot:
        plot(results, args.plot, int(math.isqrt(len(next(r for r in results if r["usage"])["usage"]["position"]))))
    for variant, s in summarise(results).items():
        psnr = [r["final_psnr"] for r in results if r["variant"] == variant]
        print(f"{variant:14s} MSE {s['mean']:.5f} ± {s['std']:.5f}, PSNR {statistics.mean(psnr):.2f} dB over "
              f"{s['seeds']} seeds, {s['parameters']:,} parameters, {s['time_vs_dense']:.2f}x dense time")  # wall time


def write(out: Path, args: dict[str, str], results: list[dict[str, Any]]) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    summary = summarise(results)  # its time_vs_dense is wall time; CPU time is steadier on a shared machine
    cpu = {v: statistics.mean(r["train_cpu_s"] for r in results if r["variant"] == v) for v in summary}
    for variant, s in summary.items():
        s["cpu_time_vs_dense"] = cpu[variant] / cpu["dense"] if "dense" in cpu else math.nan
    tmp.write_text(json.dumps({"args": args, "classes": list(CLASSES), "runs": results, "summary": summary},
                              indent=1))
    tmp.replace(out)


if __name__ == "__main__":
    main()
