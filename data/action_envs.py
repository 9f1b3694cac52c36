"""The control tasks of the actions modality, and closed-loop rollouts of any policy in them.

A *policy* is any callable ``policy(obs_history) -> action_chunk``: ``obs_history`` is a float
array ``(h, obs_dim)`` (the last ``h`` observations, oldest first, the first one repeated before
the episode's start) and the result ``(n, act_dim)`` is executed open-loop, then the policy is asked
again with the newest history (receding horizon; ``execute`` steps of each chunk, default all).
A policy with a ``reset(seed)`` method is reset at every episode start with that episode's policy
seed, so stochastic policies (the scripted experts, a sampling VQ-BeT) are reproducible and several
rollouts from ONE start state can differ — which is how multimodality is measured.

``RolloutResult.mode`` classifies what the episode did into the task's modes (``MODE_NAMES``:
first-push direction for MountainCar, the orbit direction around the block for PushT; -1 when the
trajectory shows neither), computed from the trajectory alone so every policy is scored alike.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import gymnasium as gym
import numpy as np

from data.atomic import atomic_write

# env name -> the module that defines GYM_ID, OBS_DIM, ACT_DIM, MAX_STEPS, MODE_NAMES, make_env,
# the scripted expert (Expert) and classify_mode. Imported lazily: PushT pulls in pygame and cv2.
ENV_MODULES = {"mountain_car": "data.mountain_car", "pusht": "data.pusht"}
ENV_NAMES = tuple(ENV_MODULES)

Policy = Callable[[np.ndarray], np.ndarray]


def env_module(env_name: str) -> ModuleType:
    if env_name not in ENV_MODULES:
        raise ValueError(f"unknown action environment {env_name!r}; choose one of {', '.join(ENV_NAMES)}")
    return importlib.import_module(ENV_MODULES[env_name])


@dataclass(frozen=True)
class EnvInfo:
    name: str
    obs_dim: int
    act_dim: int
    max_steps: int
    mode_names: tuple[str, ...]


def env_info(env_name: str) -> EnvInfo:
    """Dimensions, time limit and mode names of a task (what a policy needs to size itself)."""
    m = env_module(env_name)
    return EnvInfo(env_name, m.OBS_DIM, m.ACT_DIM, m.MAX_STEPS, tuple(m.MODE_NAMES))


def make_env(env_name: str, seed: int | None = None, render: bool = False) -> gym.Env:
    """The gymnasium env whose observations and actions the demonstrations of ``env_name`` hold."""
    return env_module(env_name).make_env(seed=seed, render=render)


def make_expert(env_name: str) -> Policy:
    """The task's scripted stochastic expert as a policy (one action per call, ``reset(seed)``)."""
    return env_module(env_name).Expert()


def heldout_seeds(n: int, offset: int = 0) -> list[int]:
    """Evaluation seeds far from every demonstration seed (those are ``seed * 100_000 + i``)."""
    return [2_000_000_000 + offset + i for i in range(n)]


@dataclass
class RolloutResult:
    seed: int  # the env's reset seed (its start state)
    policy_seed: int
    success: bool
    steps: int
    observations: np.ndarray  # (T, obs_dim): the observation each action was taken from
    actions: np.ndarray  # (T, act_dim)
    mode: int  # index into the task's MODE_NAMES, -1 when neither
    total_reward: float
    final_coverage: float | None = None  # PushT: goal-area coverage at the end
    steps_to_goal: int | None = None  # steps until success (None when it did not succeed)
    frames: list[np.ndarray] | None = field(default=None, repr=False)


def _window(history: list[np.ndarray], h: int) -> np.ndarray:
    recent = history[-h:]
    return np.stack([recent[0]] * (h - len(recent)) + recent)


def rollout(policy: Policy, env_name: str, seeds: Sequence[int], max_steps: int | None = None, history: int = 1,
            record: bool = False, execute: int | None = None, policy_seeds: Sequence[int] | None = None,
            progress: bool = False) -> list[RolloutResult]:
    """Run ``policy`` closed-loop for one episode per seed (see the module docstring).

    ``max_steps`` caps the episode below the task's own limit; ``record`` keeps rendered frames;
    ``policy_seeds`` (default: ``seeds``) reset a policy that has ``reset`` — pass one start seed
    repeated with different policy seeds to see the modes a policy keeps from one start state.
    """
    from tqdm.auto import tqdm

    module = env_module(env_name)
    limit = min(max_steps or module.MAX_STEPS, module.MAX_STEPS)
    policy_seeds = list(seeds) if policy_seeds is None else list(policy_seeds)
    if len(policy_seeds) != len(seeds):
        raise ValueError(f"{len(seeds)} seeds but {len(policy_seeds)} policy seeds")
    results = []
    for seed, policy_seed in tqdm(list(zip(seeds, policy_seeds)), desc=f"{env_name} rollouts", disable=not progress):
        env = make_env(env_name, seed=int(seed), render=record)
        obs, info = env.reset(seed=int(seed))
        if hasattr(policy, "reset"):
            policy.reset(int(policy_seed))
        seen, taken, frames, total, success, done = [], [], [], 0.0, False, False
        frames = [env.render()] if record else None
        while not done and len(taken) < limit:
            seen.append(np.asarray(obs, dtype=np.float32))
            chunk = np.asarray(policy(_window(seen, history)), dtype=np.float32).reshape(-1, module.ACT_DIM)
            for i, action in enumerate(chunk[:execute]):
                if i:
                    seen.append(np.asarray(obs, dtype=np.float32))
                obs, reward, terminated, truncated, info = env.step(action)
                taken.append(action)
                total += float(reward)
                if record:
                    frames.append(env.render())
                success = success or bool(info.get("is_success", terminated))
                done = terminated or truncated or len(taken) >= limit
                if done:
                    break
        env.close()
        observations, actions = np.stack(seen), np.stack(taken)
        results.append(RolloutResult(
            seed=int(seed), policy_seed=int(policy_seed), success=success, steps=len(taken),
            observations=observations, actions=actions, mode=int(module.classify_mode(observations, actions)),
            total_reward=total, final_coverage=float(info["coverage"]) if "coverage" in info else None,
            steps_to_goal=len(taken) if success else None, frames=frames))
    return results


class TemporalEnsemble:
    """Execution by temporal ensembling, as the official VQ-BeT evaluation runs PushT: the policy is asked
    at EVERY step and the action taken is the mean of what the last ``k`` chunks predicted for this step
    (uniform weights; ``k`` at most the chunk length). Wrap a policy and roll the wrapper out (it returns
    one action per call); the default execution is the receding horizon of :func:`rollout` instead."""

    def __init__(self, policy: Policy, k: int) -> None:
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        self.policy, self.k = policy, k
        self.chunks: list[np.ndarray] = []  # the last k chunks, oldest first

    def reset(self, seed: int) -> None:
        self.chunks = []
        if hasattr(self.policy, "reset"):
            self.policy.reset(seed)

    def __call__(self, obs_history: np.ndarray) -> np.ndarray:
        chunk = np.asarray(self.policy(obs_history), dtype=np.float32)
        if len(chunk) < self.k:
            raise ValueError(f"a temporal ensemble of {self.k} needs chunks of at least {self.k} actions, "
                             f"got {len(chunk)}")
        self.chunks = [*self.chunks, chunk][-self.k:]
        last = len(self.chunks) - 1  # the chunk made i calls ago predicted this step at its index i
        return np.mean([c[last - j] for j, c in enumerate(self.chunks)], axis=0, dtype=np.float32)[None]


def write_rollout_gif(frames: Sequence[np.ndarray], path: str | Path, fps: int = 10, every: int = 1,
                      max_side: int = 192) -> Path:
    """Write RGB frames as a looping GIF, atomically; frames are subsampled in time (``every``)
    and shrunk by an integer stride so the longer side is at most ``max_side`` pixels (small files)."""
    import imageio.v2 as imageio

    chosen = [np.asarray(f) for f in list(frames)[::max(1, every)]]
    if not chosen:
        raise ValueError("no frames to write")
    stride = max(1, int(np.ceil(max(chosen[0].shape[:2]) / max_side)))
    chosen = [np.ascontiguousarray(f[::stride, ::stride, :3]).astype(np.uint8) for f in chosen]
    return atomic_write(path, lambda f: imageio.mimsave(f, chosen, format="GIF", duration=1000 / fps, loop=0))


def summarize(results: Sequence[RolloutResult], mode_names: Sequence[str]) -> dict[str, Any]:
    """Success rate, mean final coverage, mean steps to goal and the share of each mode."""
    n = len(results)
    coverage = [r.final_coverage for r in results if r.final_coverage is not None]
    steps = [r.steps_to_goal for r in results if r.steps_to_goal is not None]
    modes = {name: sum(r.mode == i for r in results) / n for i, name in enumerate(mode_names)}
    modes["neither"] = sum(r.mode < 0 for r in results) / n
    return {"episodes": n, "success_rate": sum(r.success for r in results) / n,
            "mean_final_coverage": float(np.mean(coverage)) if coverage else None,
            "mean_steps_to_goal": float(np.mean(steps)) if steps else None, "modes": modes}
