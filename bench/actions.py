"""Robot actions (issue 20): the scripted expert, MLP behaviour cloning and VQ-BeT in closed loop.

For each task (``pusht``, ``mountain_car``):

1. demonstrations: ``N`` scripted-expert episodes (``data.actions.load_demonstrations``, cached);
   their success rate, final coverage and mode counts are the expert's figures on the training seeds;
2. policies trained on exactly those demonstrations, through the train command and the shipped
   configs with the same history/chunk: ``configs/bc_mlp.yaml`` and, when the model half exists,
   ``configs/action_vq.yaml`` then ``configs/vqbet.yaml`` (tokenizer first, frozen, then the policy) and
   ``configs/action_ar.yaml`` (the plain AR-over-codes policy over the same frozen tokenizer);
3. closed-loop rollouts on held-out seeds (``data.actions.heldout_seeds``): success rate, mean final
   coverage (PushT), mean steps to goal;
4. multimodality: ``M`` rollouts from ONE start state with different policy seeds, the share of each
   mode (PushT: orbit direction ccw/cw as seen on screen; MountainCar: first push left/right; "neither" when the
   trajectory shows neither), read from the trajectory by the same classifier for every policy;
5. one rollout GIF per policy from that start state under ``bench/results/``.

Results go to ``bench/results/actions.json`` (after every stage) and ``bench/results/actions.md``.

    nice -n 10 python bench/actions.py --envs mountain_car pusht
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from data.actions import (  # noqa: E402
    TemporalEnsemble,
    env_info,
    heldout_seeds,
    load_demonstrations,
    make_expert,
    rollout,
    summarize,
    write_rollout_gif,
)
from data.atomic import atomic_write_text  # noqa: E402
from tokenforge.train import main as train  # noqa: E402

RESULTS = ROOT / "bench" / "results"
HISTORY, CHUNK = 2, 5  # the shipped configs' observation history and action chunk


def data_overrides(env: str, episodes: int, val_fraction: float) -> list[str]:
    return [f"data.params.env={env}", f"data.params.num_episodes={episodes}", "data.params.seed=0",
            f"data.params.history={HISTORY}", f"data.params.chunk={CHUNK}", "data.params.progress=false",
            f"data.params.val_fraction={val_fraction}"]


def train_config(config: str, name: str, runs: Path, overrides: list[str]) -> Path:
    ckpt = runs / name / "checkpoints" / "last.ckpt"
    t0, c0 = time.time(), time.process_time()
    train([str(ROOT / config), "--runs", str(runs), "--name", name, "trainer.accelerator=cpu",
           "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false", *overrides])
    print(f"  trained {name} in {time.time() - t0:.0f}s wall, {time.process_time() - c0:.0f}s CPU", flush=True)
    return ckpt


def policies_for(env: str, args: argparse.Namespace, log: dict) -> dict[str, tuple[Any, int]]:
    """``name -> (policy, history)``; VQ-BeT only when its configs exist in the tree."""
    from stage2.bc_mlp import BCMLP

    runs = Path(args.runs)
    steps = args.steps[env]
    data = data_overrides(env, args.episodes[env], args.val_fraction[env])
    out: dict[str, tuple[Any, int]] = {"expert": (make_expert(env), 1)}
    bc = BCMLP.load(train_config("configs/bc_mlp.yaml", f"bc_mlp_{env}", runs,
                                 [*data, f"trainer.max_steps={steps}", f"trainer.val_check_interval={steps}"]))
    out["bc_mlp"] = (bc.policy, bc.history)
    log["training"][f"bc_mlp_{env}"] = {"steps": steps, "params": sum(p.numel() for p in bc.parameters())}
    if args.skip_vqbet or not all((ROOT / c).is_file() for c in ("configs/action_vq.yaml", "configs/vqbet.yaml")):
        log["training"][f"vqbet_{env}"] = "skipped: " + ("--skip-vqbet" if args.skip_vqbet else "configs missing")
        return out
    tok_steps = args.tokenizer_steps[env]
    try:  # the model half is developed in parallel: a failure is recorded, not fatal to the other rows
        from stage2.prior import load_prior

        tok = train_config("configs/action_vq.yaml", f"action_vq_{env}", runs,
                           [*data, f"trainer.max_steps={tok_steps}", f"trainer.val_check_interval={tok_steps}"])
        prior = train_config("configs/vqbet.yaml", f"vqbet_{env}", runs,
                             [*data, f"model.params.tokenizer={tok.resolve()}", f"trainer.max_steps={steps}",
                              f"trainer.val_check_interval={steps}"])
        model = load_prior(prior).eval()
    except Exception as err:  # noqa: BLE001
        log["training"][f"vqbet_{env}"] = f"failed: {type(err).__name__}: {err}"
        print(f"  VQ-BeT failed: {err!r}", flush=True)
        return out
    out["vqbet"] = (model.as_policy(), int(model.history))  # reproducible per rollout (reset(seed))
    log["training"][f"vqbet_{env}"] = {"tokenizer_steps": tok_steps, "steps": steps,
                                       "params": sum(p.numel() for p in model.parameters())}
    if args.skip_ar or not (ROOT / "configs/action_ar.yaml").is_file():
        return out
    try:  # the plain AR-over-codes policy over the same frozen tokenizer: no offsets, no focal loss
        ar_ckpt = train_config("configs/action_ar.yaml", f"action_ar_{env}", runs,
                               [*data, f"model.params.tokenizer={tok.resolve()}", f"trainer.max_steps={steps}",
                                f"trainer.val_check_interval={steps}"])
        ar = load_prior(ar_ckpt).eval()
    except Exception as err:  # noqa: BLE001
        log["training"][f"action_ar_{env}"] = f"failed: {type(err).__name__}: {err}"
        print(f"  AR policy failed: {err!r}", flush=True)
        return out
    out["action_ar"] = (ar.as_policy(), int(ar.history))
    log["training"][f"action_ar_{env}"] = {"steps": steps, "params": sum(p.numel() for p in ar.parameters())}
    return out


def run_env(env: str, args: argparse.Namespace, log: dict) -> None:
    info = env_info(env)
    t0 = time.time()
    demos = load_demonstrations(env, args.episodes[env], seed=0)
    log["demos"][env] = {
        "episodes": len(demos), "load_or_generate_s": round(time.time() - t0, 1), "steps": int(demos.lengths.sum()),
        "success_rate": float(demos.success.mean()), "mean_length": float(demos.lengths.mean()),
        "mean_final_coverage": None if np.isnan(demos.final_coverage).all() else float(np.mean(demos.final_coverage)),
        "modes": {name: int((demos.modes == i).sum()) for i, name in enumerate(info.mode_names)},
        "val_fraction": args.val_fraction[env], "history": HISTORY, "chunk": CHUNK,
    }
    save(log, args)
    policies = policies_for(env, args, log)
    save(log, args)
    seeds = heldout_seeds(args.eval_episodes[env])
    start = heldout_seeds(1, offset=10_000)[0]
    for name, (policy, history) in policies.items():
        t0 = time.time()
        res = rollout(policy, env, seeds, history=history, policy_seeds=[s + 1 for s in seeds])
        row = summarize(res, info.mode_names)
        row["steps_per_s"] = round(sum(r.steps for r in res) / (time.time() - t0), 1)
        multi = rollout(policy, env, [start] * args.mode_rollouts, history=history,
                        policy_seeds=list(range(args.mode_rollouts)))
        row["one_start_modes"] = summarize(multi, info.mode_names)["modes"]
        row["one_start_success_rate"] = summarize(multi, info.mode_names)["success_rate"]
        [shown] = rollout(policy, env, [start], history=history, policy_seeds=[0], record=True)
        gif = RESULTS / f"actions_{env}_{name}.gif"
        write_rollout_gif(shown.frames, gif, fps=10 // args.gif_every, every=args.gif_every, max_side=200)
        row["gif"] = str(gif.relative_to(ROOT))
        log["policies"].setdefault(env, {})[name] = row
        print(f"  {env} {name}: {json.dumps(row)}", flush=True)
        save(log, args)


def first_push_mass(runs: Path, samples: int = 200) -> None:
    """MountainCar: the share of LEFT first actions each trained policy (VQ-BeT, the AR policy when trained)
    samples at a few start states (a history of two identical start observations, v = 0) — where the
    expert is 50/50."""
    from data.actions import make_env
    from stage2.bc_mlp import BCMLP
    from stage2.prior import load_prior

    vqbet = load_prior(runs / "vqbet_mountain_car" / "checkpoints" / "last.ckpt").eval()
    bc = BCMLP.load(runs / "bc_mlp_mountain_car" / "checkpoints" / "last.ckpt")
    ar_ckpt = runs / "action_ar_mountain_car" / "checkpoints" / "last.ckpt"
    samplers = {"VQ-BeT": vqbet} | ({"AR over codes": load_prior(ar_ckpt).eval()} if ar_ckpt.is_file() else {})
    g = torch.Generator().manual_seed(0)
    for seed in heldout_seeds(1, offset=10_000) + heldout_seeds(4):
        obs, _ = make_env("mountain_car").reset(seed=seed)
        hist = np.stack([obs, obs]).astype(np.float32)
        shares = []
        for name, model in samplers.items():
            first = np.array([model.policy(hist, generator=g)[0, 0] for _ in range(samples)])
            shares.append(f"{name} first action left in {np.mean(first < 0):.2f} of {samples} samples "
                          f"(mean {first.mean():+.2f})")
        print(f"start position {obs[0]:.3f}: {'; '.join(shares)}; MLP first action {bc.policy(hist)[0, 0]:+.3f}")


class HoldStill:
    """PushT reference policy: the agent's target is where it stands, so it never touches the block and the
    final coverage is the start state's."""

    def __call__(self, obs_history: np.ndarray) -> np.ndarray:
        return np.asarray(obs_history)[-1:, :2]


def pusht_dev_check(runs: Path, out: Path, episodes: int = 10) -> None:
    """PushT: how each trained policy under ``runs`` does when its chunks are executed three ways — the
    bench's receding horizon (the whole chunk, then re-query), the first action of each chunk only, and
    the official VQ-BeT temporal ensemble (:class:`data.actions.TemporalEnsemble`) — on DEV start states
    ``heldout_seeds(episodes, offset=50_000)``, which are neither the held-out evaluation seeds nor the
    one-start state, so nothing is chosen on the seeds the results table reports; with a hold-still reference."""
    from stage2.bc_mlp import BCMLP
    from stage2.prior import load_prior

    seeds = heldout_seeds(episodes, offset=50_000)
    policies: dict[str, tuple[Any, int]] = {"hold still": (HoldStill(), 1)}
    for name in ("bc_mlp", "vqbet", "action_ar"):
        ckpt = runs / f"{name}_pusht" / "checkpoints" / "last.ckpt"
        if ckpt.is_file():
            model = BCMLP.load(ckpt) if name == "bc_mlp" else load_prior(ckpt).eval()
            policies[name] = (model.policy if name == "bc_mlp" else model.as_policy(), int(model.history))
    report: dict[str, Any] = {"seeds": f"heldout_seeds({episodes}, offset=50_000)", "policies": {}}
    for name, (policy, history) in policies.items():
        ways = {"receding chunk": (policy, None)}
        if name != "hold still":
            ways |= {"first action": (policy, 1), "temporal ensemble": (TemporalEnsemble(policy, CHUNK), None)}
        for way, (acting, execute) in ways.items():
            t0 = time.process_time()
            res = rollout(acting, "pusht", seeds, history=history, execute=execute,
                          policy_seeds=[s + 1 for s in seeds])
            row = summarize(res, env_info("pusht").mode_names)
            row["final_coverages"] = [round(float(r.final_coverage), 3) for r in res]
            row["cpu_s"] = round(time.process_time() - t0, 1)
            report["policies"].setdefault(name, {})[way] = row
            print(f"{name:10s} {way:17s} success {row['success_rate']:.2f}  mean final coverage "
                  f"{row['mean_final_coverage']:.3f}  {row['final_coverages']}", flush=True)
            atomic_write_text(out, json.dumps(report, indent=1))


def save(log: dict, args: argparse.Namespace) -> None:
    atomic_write_text(Path(args.out), json.dumps(log, indent=1, default=float))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--envs", nargs="+", default=["mountain_car", "pusht"])
    p.add_argument("--runs", default="runs/bench_actions")
    p.add_argument("--out", default=str(RESULTS / "actions.json"))
    p.add_argument("--mode-rollouts", type=int, default=16)
    p.add_argument("--skip-vqbet", action="store_true")
    p.add_argument("--skip-ar", action="store_true",
                   help="skip the plain AR-over-codes policy (configs/action_ar.yaml)")
    p.add_argument("--first-push-mass", action="store_true",
                   help="only: MountainCar first-action mode mass of the policies already trained under --runs")
    p.add_argument("--pusht-dev-check", metavar="JSON",
                   help="only: PushT execution check of the policies already trained under --runs on dev seeds "
                        "(receding chunk / first action / temporal ensemble, hold-still reference), into JSON")
    p.add_argument("--pusht-episodes", type=int, default=100)
    p.add_argument("--pusht-eval", type=int, default=20)
    p.add_argument("--pusht-steps", type=int, default=2500)
    p.add_argument("--pusht-val-fraction", type=float, default=0.0,
                   help="PushT demonstrations held out of training (default 0: policies learn from every "
                        "demonstration and are judged by rollouts; MountainCar keeps the configs' 0.1)")
    p.add_argument("--mc-steps", type=int, default=1000)
    args = p.parse_args()
    args.episodes = {"pusht": args.pusht_episodes, "mountain_car": 200}
    args.eval_episodes = {"pusht": args.pusht_eval, "mountain_car": 50}
    args.steps = {"pusht": args.pusht_steps, "mountain_car": args.mc_steps}
    args.tokenizer_steps = {"pusht": args.pusht_steps, "mountain_car": args.mc_steps}
    args.val_fraction = {"pusht": args.pusht_val_fraction, "mountain_car": 0.1}
    args.gif_every = 3
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    if args.first_push_mass:
        return first_push_mass(Path(args.runs))
    if args.pusht_dev_check:
        return pusht_dev_check(Path(args.runs), Path(args.pusht_dev_check))
    log: dict[str, Any] = {"command": " ".join(sys.argv), "torch_threads": torch.get_num_threads(),
                           "demos": {}, "training": {}, "policies": {}}
    for env in args.envs:
        print(f"== {env}", flush=True)
        run_env(env, args, log)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
