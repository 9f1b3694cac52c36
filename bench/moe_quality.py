"""MoE quality check (not a test): does swapping dense FFNs for MoE FFNs help at equal active size?

1. AR prior over a fashion_mnist code folder (``--codes``, made by ``scripts/tokenize.py`` from a
   configs/vqvae.yaml tokenizer): configs/ar.yaml (dense SwiGLU FFN) vs configs/ar_moe.yaml (8
   experts top-2 of half the hidden width: same active parameters), same seed, same steps.
   Reports validation NLL (nats/token) and, for the MoE, the expert load balance per layer as the
   coefficient of variation of the load over experts (0 = perfectly balanced).
2. VQ-VAE (configs/vqvae.yaml) on fashion_mnist with a token-wise FFN slot in the decoder's middle
   block: none, a dense FFN (a 1-expert ConvMoE of hidden 2h: exactly a dense SwiGLU FFN), and an
   MoE (ConvMoE, 8 experts top-2 of hidden h). Reports validation reconstruction MSE.

Run (CPU, tens of minutes at the defaults):
    python bench/moe_quality.py --codes codes/fmnist [--ar-steps 1500] [--vq-steps 1500]
``--skip-ar`` / ``--skip-vq`` run one half. Runs go to ``--runs`` (default runs/moe_quality).
"""

from __future__ import annotations

import argparse
import math
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

torch.set_num_threads(2)

from layers.moe import MoE  # noqa: E402
from tokenforge.config import load_config, to_plain  # noqa: E402
from tokenforge.train import main as train_main  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _train(cfg: dict, runs: Path, name: str):
    """Train a config dict through the project's own train command; returns the Trainer."""
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        f.write(OmegaConf.to_yaml(OmegaConf.create(cfg)))
    t0 = time.perf_counter()
    trainer = train_main([f.name, "--runs", str(runs), "--name", name, "--fresh"])
    print(f"  {name}: trained {trainer.global_step} steps in {time.perf_counter() - t0:.0f} s")
    return trainer


@torch.no_grad()
def eval_prior(trainer) -> tuple[float, list[float]]:
    """Validation NLL (nats/token) and the per-layer coefficient of variation of expert load."""
    model, dm = trainer.lightning_module.eval(), trainer.datamodule
    counts: dict[str, torch.Tensor] = {}

    def hook(name):
        def fn(mod, args, out):
            load = out[1]["load"].double() * args[0].shape[0] * args[0].shape[1]
            counts[name] = counts.get(name, 0) + load
        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules() if isinstance(m, MoE)]
    total, n = 0.0, 0
    for batch in dm.val_dataloader():
        logits, _ = model(batch["codes"], model.batch_labels(batch))
        target = model.flatten_codes(batch["codes"])
        total += F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), target.reshape(-1),
                                 reduction="sum").item()
        n += target.numel()
    for h in handles:
        h.remove()
    cvs = [(c.std(unbiased=False) / c.mean()).item() for c in counts.values()]
    return total / n, cvs


@torch.no_grad()
def eval_recon(trainer) -> float:
    model, dm = trainer.lightning_module.eval(), trainer.datamodule
    se, n = 0.0, 0
    for batch in dm.val_dataloader():
        x = batch["x"]
        xrec = model(x)[0]
        se += F.mse_loss(xrec, x, reduction="sum").item()
        n += x.numel()
    return se / n


def run_ar(args) -> None:
    print(f"AR prior on {args.codes}, {args.ar_steps} steps each")
    rows = []
    for config in ("ar", "ar_moe"):
        cfg = to_plain(load_config(ROOT / "configs" / f"{config}.yaml",
                                   [f"data.params.codes={args.codes}", f"trainer.max_steps={args.ar_steps}",
                                    f"trainer.val_check_interval={args.ar_steps}"]))
        trainer = _train(cfg, args.runs, config)
        params = sum(p.numel() for p in trainer.lightning_module.parameters())
        nll, cvs = eval_prior(trainer)
        rows.append((config, params, nll, cvs))
    print(f"{'model':8s} {'params':>10s} {'val NLL':>9s} {'bits/tok':>9s}  load CV per MoE layer")
    for config, params, nll, cvs in rows:
        cv = " ".join(f"{c:.3f}" for c in cvs) if cvs else "-"
        mean_cv = f" (mean {statistics.mean(cvs):.3f})" if cvs else ""
        print(f"{config:8s} {params:10d} {nll:9.4f} {nll / math.log(2):9.4f}  {cv}{mean_cv}")


def run_vq(args) -> None:
    print(f"VQ-VAE on fashion_mnist, {args.vq_steps} steps each")
    h = args.vq_hidden
    slots = {
        "none": None,
        "dense": {"target": "layers.moe.ConvMoE", "params": {"num_experts": 1, "top_k": 1, "hidden_dim": 2 * h}},
        "moe": {"target": "layers.moe.ConvMoE", "params": {"num_experts": 8, "top_k": 2, "hidden_dim": h}},
    }
    rows = []
    for name, slot in slots.items():
        steps = [f"trainer.max_steps={args.vq_steps}", f"trainer.val_check_interval={args.vq_steps}"]
        cfg = to_plain(load_config(ROOT / "configs" / "vqvae.yaml", steps))
        decoder = dict(cfg["model"]["params"]["encoder"])
        decoder.pop("in_channels")
        decoder["out_channels"] = cfg["model"]["params"]["encoder"]["in_channels"]
        decoder["mid_ffn"] = slot
        cfg["model"]["params"]["decoder"] = decoder
        cfg["data"]["params"]["limit_val"] = args.vq_val
        cfg.pop("callbacks", None)
        trainer = _train(cfg, args.runs, f"vqvae_{name}")
        rows.append((name, sum(p.numel() for p in trainer.lightning_module.parameters()), eval_recon(trainer)))
    print(f"{'decoder slot':12s} {'params':>9s} {'val MSE':>10s}")
    for name, params, mse in rows:
        print(f"{name:12s} {params:9d} {mse:10.5f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--codes", help="fashion_mnist code folder for the AR comparison")
    ap.add_argument("--ar-steps", type=int, default=1500)
    ap.add_argument("--vq-steps", type=int, default=1500)
    ap.add_argument("--vq-hidden", type=int, default=128, help="expert hidden width h of the decoder MoE")
    ap.add_argument("--vq-val", type=int, default=2000, help="validation images for the MSE")
    ap.add_argument("--runs", type=Path, default=Path("runs/moe_quality"))
    ap.add_argument("--skip-ar", action="store_true")
    ap.add_argument("--skip-vq", action="store_true")
    args = ap.parse_args()
    if not args.skip_ar:
        if not args.codes:
            ap.error("--codes is needed for the AR comparison (or pass --skip-ar)")
        run_ar(args)
    if not args.skip_vq:
        run_vq(args)


if __name__ == "__main__":
    main()
