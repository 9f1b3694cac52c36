"""MountainCarContinuous-v0 and its bimodal scripted expert: the fast action dataset for tests.

The expert pumps energy with ``a = k * sign(v)``: ``k`` is drawn per episode from ``[K_MIN, K_MAX]``
and the very first push (when ``v = 0``) goes left or right with equal probability. Both directions
solve the task, so the demonstrations hold two distinct behaviours from the same start states: a
unimodal regressor averages them (a first push near 0 that stalls), a multimodal policy keeps both.

Observations are gymnasium's ``[position, velocity]``; actions ``[force]`` in ``[-1, 1]``.
"""

from __future__ import annotations

import gymnasium as gym
import numpy as np

GYM_ID = "MountainCarContinuous-v0"
OBS_DIM, ACT_DIM = 2, 1
MAX_STEPS = 999  # gymnasium's time limit for this task
MODE_NAMES = ("left", "right")  # the first push's direction
K_MIN, K_MAX = 0.5, 1.0  # every k in this range reaches the flag from every start (tests check it)


def make_env(seed: int | None = None, render: bool = False) -> gym.Env:
    env = gym.make(GYM_ID, render_mode="rgb_array" if render else None)
    if seed is not None:
        env.action_space.seed(int(seed))
    return env


class MountainCarExpert:
    """``a = k * sign(v)`` with ``k`` and the first push's direction drawn at :meth:`reset`."""

    def __init__(self) -> None:
        self.k, self.mode, self._push = 1.0, 1, 1.0

    def reset(self, seed: int) -> None:
        rng = np.random.default_rng(seed)
        self.k = float(rng.uniform(K_MIN, K_MAX))
        self.mode = int(rng.integers(2))  # 0: first push left, 1: right
        self._push = 1.0 if self.mode == 1 else -1.0

    def __call__(self, obs_history: np.ndarray) -> np.ndarray:
        velocity = float(obs_history[-1, 1])
        if velocity != 0.0:  # keep the last direction while the car is at rest (the first step)
            self._push = float(np.sign(velocity))
        return np.array([[self.k * self._push]], dtype=np.float32)


def classify_mode(observations: np.ndarray, actions: np.ndarray, min_push: float = 0.1) -> int:
    """The first push's direction: 0 left, 1 right, -1 when no action reaches ``min_push`` in
    magnitude (a policy that averaged the two modes into a push of about 0)."""
    pushing = np.flatnonzero(np.abs(actions[:, 0]) >= min_push)
    return int(actions[pushing[0], 0] > 0) if len(pushing) else -1


Expert = MountainCarExpert  # the name data/action_envs.py looks up
