"""Sampling a *policy* means rolling it out: ``scripts/sample.py POLICY.ckpt -n 4`` lands here.

A policy checkpoint (VQ-BeT ``stage2.vqbet.VQBeT``, the AR-over-codes policy
``stage2.observation_ar.ObservationARPrior``, the MLP baseline ``stage2.bc_mlp.BCMLP``) maps an
observation history to an action chunk; without an environment to produce observations there is
nothing to sample codes for. So ``sample.py`` hands such a checkpoint to :func:`sample_rollouts`,
which runs ``n`` closed-loop episodes in the policy's own task (the ``env`` it was trained on) from
the held-out start states ``data.actions.heldout_seeds(n)`` (policy seeds ``seed, seed + 1, ...``),
exactly as ``bench/actions.py`` does, and writes one GIF per episode (``rollout_<i>.gif``) plus
``rollouts.json`` (success, final coverage, steps, mode per episode and their summary).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from stage1.tokenizer import CHECKPOINT_KEY

BC_TARGET = "stage2.bc_mlp.BCMLP"


def policy_target(path: str | Path) -> str | None:
    """The class path of the policy stored at ``path``, or ``None`` when it holds no policy (a tokenizer,
    a prior over images, a missing or unreadable file: the normal commands report those). Memory-maps
    the file, so only its metadata is read."""
    if not path or not Path(path).is_file():
        return None
    try:
        meta = torch.load(path, map_location="cpu", weights_only=True, mmap=True).get(CHECKPOINT_KEY) or {}
    except Exception:  # noqa: BLE001 - not readable here; the command's own loader says why
        return None
    target = meta.get("target") or ((meta.get("config") or {}).get("model") or {}).get("target")
    if target == BC_TARGET:
        return target
    if meta.get("kind") != "prior" or not isinstance(target, str):
        return None
    from stage2.observation import ObservationPrior
    from stage2.prior import prior_class

    try:
        return target if issubclass(prior_class(target), ObservationPrior) else None
    except Exception:  # noqa: BLE001 - not an allowed prior class: open_run refuses it with its own message
        return None


@dataclass
class LoadedPolicy:
    policy: Any  # policy(obs_history) -> chunk, with reset(seed) when it samples
    history: int
    env: str
    model: Any
    tokenizer_path: Path | None = None


def load_policy(path: str | Path, map_location: str = "cpu", tokenizer: str | Path | None = None,
                sampling: dict[str, Any] | None = None) -> LoadedPolicy:
    """A rollout-ready policy from a policy checkpoint (weights only; a prior's tokenizer is found and
    SHA-checked as for every prior, ``tokenizer`` overrides it)."""
    if policy_target(path) == BC_TARGET:
        from stage2.bc_mlp import BCMLP

        if sampling:
            raise ValueError(f"{path} is the deterministic MLP baseline: it takes no sampling options "
                             f"(got {sorted(sampling)})")
        bc = BCMLP.load(path, map_location=map_location)
        return LoadedPolicy(bc.policy, bc.history, bc.hparams.env, bc)
    from tokenforge.runs import open_run

    run = open_run(path, map_location=map_location, expect="prior", tokenizer=tokenizer)
    model = run.model.eval()
    model.attach_tokenizer(run.tokenizer)
    env = model.hparams.get("env")
    if not env:
        raise ValueError(f"{path} was trained with obs_dim but no env, so the task to roll it out in is unknown; "
                         "roll it out with data.actions.rollout(model.as_policy(), ENV, seeds)")
    return LoadedPolicy(model.as_policy(**(sampling or {})), int(model.history), str(env), model, run.tokenizer_path)


def sample_rollouts(path: str | Path, num: int, out: Path, seed: int = 0, sampling: dict[str, Any] | None = None,
                    map_location: str = "cpu", tokenizer: str | Path | None = None, max_steps: int | None = None,
                    gif_every: int = 2) -> Path:
    """``num`` closed-loop episodes of the policy at ``path`` from held-out start states (each capped at
    ``max_steps``, default the task's limit), one GIF each and ``rollouts.json``, into ``out`` (see the
    module docstring)."""
    from data.actions import env_info, heldout_seeds, rollout, summarize, write_rollout_gif

    loaded = load_policy(path, map_location, tokenizer, sampling)
    seeds = heldout_seeds(num)
    results = rollout(loaded.policy, loaded.env, seeds, max_steps=max_steps, history=loaded.history, record=True,
                      policy_seeds=[seed + i for i in range(num)])
    out.mkdir(parents=True, exist_ok=True)
    names = env_info(loaded.env).mode_names
    episodes = []
    for i, r in enumerate(results):
        gif = write_rollout_gif(r.frames, out / f"rollout_{i}.gif", fps=max(1, 10 // gif_every), every=gif_every)
        episodes.append({"gif": gif.name, "env_seed": r.seed, "policy_seed": r.policy_seed, "success": r.success,
                         "steps": r.steps, "final_coverage": r.final_coverage,
                         "mode": names[r.mode] if r.mode >= 0 else "neither"})
    record = {"checkpoint": str(path), "policy": type(loaded.model).__name__, "env": loaded.env,
              "tokenizer": None if loaded.tokenizer_path is None else str(loaded.tokenizer_path),
              "history": loaded.history, "sampling": sampling or {}, "seed": seed, "max_steps": max_steps,
              "summary": summarize(results, names), "episodes": episodes}
    from data.atomic import atomic_write_text

    atomic_write_text(out / "rollouts.json", json.dumps(record, indent=2))
    s = record["summary"]
    coverage = "" if s["mean_final_coverage"] is None else f", mean final coverage {s['mean_final_coverage']:.3f}"
    print(f"rolled out {num} episodes of {loaded.env} into {out} (rollout_0.gif, ..., rollouts.json): "
          f"success {s['success_rate']:.2f}{coverage}")
    return out
