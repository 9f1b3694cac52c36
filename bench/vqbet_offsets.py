"""VQ-BeT on MountainCar (issue 20): where the offsets are trained, and what that does to the modes.

Trains the behaviour tokenizer (``configs/action_vq.yaml``) once on MountainCar demonstrations, then
VQ-BeT (``configs/vqbet.yaml``) once per ``--offset-codes`` value: ``sampled`` (the official code:
the offset loss is taken at codes sampled from the predicted distributions) and ``target`` (at the
tokenizer's codes of the true chunk). Each policy then runs closed-loop on held-out seeds (success,
steps to goal, mode shares) and ``--mode-rollouts`` times from ONE start state with different policy
seeds (the expert pushes first left or right at random there, so a multimodal policy shows both).
It also reports, at that start state, the probability mass of primary codes whose decoded chunk
pushes left, and the share of sampled chunks whose sign the offset flips.

    PYTHONPATH=. OMP_NUM_THREADS=1 nice -n 10 python bench/vqbet_offsets.py --steps 1000
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from data.actions import env_info, heldout_seeds, make_env, rollout, summarize  # noqa: E402
from stage2.prior import load_prior  # noqa: E402
from tokenforge.train import main as train  # noqa: E402

ENV = "mountain_car"


def start_state_modes(model, start: int, draws: int = 256) -> dict[str, float]:
    """At the start state: mass of primary codes decoding to a left push, and how often offsets flip a chunk."""
    obs, _ = make_env(ENV).reset(seed=start)
    history = torch.tensor(np.stack([obs] * model.history), dtype=torch.float32)[None]
    with torch.no_grad():
        f, _ = model.features(model.observations.normalize(history))
        probs = model.code_logits(f, 0, torch.zeros(1, model.levels, dtype=torch.long)).softmax(-1)[0]
        f = f.expand(draws, -1)
        codes = model.draw_codes(f, 1.0, torch.Generator().manual_seed(0))
        decoded = model.frozen_tokenizer.unnormalize_actions(model._decode(codes))[..., 0].mean(1)
        predicted = model.frozen_tokenizer.unnormalize_actions(model._decode(codes) + model.offsets(f, codes))
        predicted = predicted[..., 0].mean(1)
        left_mass = 0.0
        for c in range(model.codebook_size):  # a primary code's direction: its decoding with the likeliest secondary
            second = model.code_logits(f[:1], 1, torch.tensor([[c] + [0] * (model.levels - 1)])).argmax(-1)
            chunk = model.frozen_tokenizer.decode(torch.tensor([[[c, int(second)]]]))
            left_mass += float(probs[c]) * float(model.frozen_tokenizer.unnormalize_actions(chunk)[..., 0].mean() < 0)
    return {"primary_mass_left": round(left_mass, 3),
            "sampled_decoded_left": round(float((decoded < 0).float().mean()), 3),
            "sampled_predicted_left": round(float((predicted < 0).float().mean()), 3),
            "offset_flips_sign": round(float((torch.sign(decoded) != torch.sign(predicted)).float().mean()), 3)}


class Seeded:
    def __init__(self, model) -> None:
        self.model, self.generator = model, torch.Generator()

    def reset(self, seed: int) -> None:
        self.generator.manual_seed(int(seed))

    def __call__(self, obs_history):
        return self.model.policy(obs_history, generator=self.generator)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", default="runs/bench_vqbet_offsets")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--episodes", type=int, default=200)
    p.add_argument("--eval", type=int, default=10)
    p.add_argument("--mode-rollouts", type=int, default=8)
    p.add_argument("--offset-codes", nargs="+", default=["sampled", "target"])
    args = p.parse_args()
    torch.set_num_threads(1)
    data = [f"data.params.env={ENV}", f"data.params.num_episodes={args.episodes}", "data.params.history=2",
            "data.params.chunk=5", "data.params.progress=false"]
    quiet = ["trainer.accelerator=cpu", "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
             f"trainer.max_steps={args.steps}", f"trainer.val_check_interval={args.steps}"]
    tok = Path(args.runs) / "tok" / "checkpoints" / "last.ckpt"
    if not tok.is_file():
        train([str(ROOT / "configs/action_vq.yaml"), "--runs", args.runs, "--name", "tok", *quiet, *data])
    seeds, start = heldout_seeds(args.eval), heldout_seeds(1, offset=10_000)[0]
    modes = env_info(ENV).mode_names
    results = {}
    for offset_codes in args.offset_codes:
        t0 = time.time()
        name = f"vqbet_{offset_codes}"
        train([str(ROOT / "configs/vqbet.yaml"), "--runs", args.runs, "--name", name, *quiet, *data,
               f"model.params.tokenizer={tok}", f"model.params.lr={args.lr}",
               f"model.params.offset_codes={offset_codes}"])
        model = load_prior(Path(args.runs) / name / "checkpoints" / "last.ckpt")
        row = summarize(rollout(Seeded(model), ENV, seeds, history=2), modes)
        one = summarize(rollout(Seeded(model), ENV, [start] * args.mode_rollouts, history=2,
                                policy_seeds=list(range(args.mode_rollouts))), modes)
        row.update(one_start_modes=one["modes"], one_start_success_rate=one["success_rate"],
                   start_state=start_state_modes(model, start), seconds=round(time.time() - t0))
        results[offset_codes] = row
        print(offset_codes, json.dumps(row, default=float), flush=True)
    print(json.dumps(results, default=float, indent=1))


if __name__ == "__main__":
    main()
