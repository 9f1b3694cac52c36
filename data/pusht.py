"""PushT (gym-pusht 0.1.8, ``gym_pusht/PushT-v0`` with ``obs_type="state"``) as the actions modality sees it.

The env's state observation is ``[agent_x, agent_y, block_x, block_y, block_angle]`` with the angle
wrapped to ``[0, 2*pi)``: a jump from 6.28 to 0 for a tiny rotation, which a regressor would have
to learn around. :func:`make_env` therefore wraps the env so observations are
``[agent_x, agent_y, block_x, block_y, sin(angle), cos(angle)]`` (``OBS_DIM = 6``); actions are the
agent's target position ``[x, y]`` in ``[0, 512]`` (the env's PD controller tracks it).
``block_x, block_y`` is the T's body origin (the middle of the top edge of its bar), not its centre
of gravity. An episode ends at 95% goal coverage (success) or after 300 steps.

Modes: which way the agent travels around the block. :func:`classify_mode` sums the agent's
signed angle increments around the block's centre of gravity over the episode, in the env's
``(x, y)`` coordinates; gym-pusht draws them with y pointing down (no flip), so an increasing angle
is *clockwise on screen*: negative is ``ccw`` (0), positive ``cw`` (1), less than a quarter turn
either way is neither (-1). The names are as seen in the rendered frames and GIFs. The scripted
expert (``data/pusht_expert.py``) orbits one way per episode.
"""

from __future__ import annotations

import gymnasium as gym
import numpy as np

from data.pusht_expert import EXPERT_VERSION, PushTExpert  # noqa: F401  (EXPERT_VERSION keys the cache)

GYM_ID = "gym_pusht/PushT-v0"
OBS_DIM, ACT_DIM = 6, 2
MAX_STEPS = 300  # gym-pusht's registered time limit
MODE_NAMES = ("ccw", "cw")  # as seen on screen (y down): 0 = angle decreasing, 1 = increasing
COG_LOCAL = np.array([0.0, 45.0])  # the T's centre of gravity in its body frame (mean of bar and stem centres)
GIF_SIZE = 192  # rendered frame side for rollout GIFs (the env's default is 680)

Expert = PushTExpert  # the name data/action_envs.py looks up


class StateFeatures(gym.ObservationWrapper):
    """``[ax, ay, bx, by, angle] -> [ax, ay, bx, by, sin(angle), cos(angle)]`` (float32)."""

    def __init__(self, env: gym.Env) -> None:
        super().__init__(env)
        lo = np.array([0, 0, 0, 0, -1, -1], dtype=np.float32)
        hi = np.array([512, 512, 512, 512, 1, 1], dtype=np.float32)
        self.observation_space = gym.spaces.Box(lo, hi, dtype=np.float32)

    def observation(self, obs: np.ndarray) -> np.ndarray:
        return state_to_features(obs)


def state_to_features(state: np.ndarray) -> np.ndarray:
    state = np.asarray(state, dtype=np.float64)
    return np.concatenate([state[..., :4], np.sin(state[..., 4:5]), np.cos(state[..., 4:5])], -1).astype(np.float32)


def features_to_pose(features: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """Agent position, block origin and block angle from one feature vector."""
    f = np.asarray(features, dtype=np.float64)
    return f[:2], f[2:4], float(np.arctan2(f[4], f[5]))


def make_env(seed: int | None = None, render: bool = False) -> gym.Env:
    import gym_pusht  # noqa: F401  (registers gym_pusht/PushT-v0)

    size = {"visualization_width": GIF_SIZE, "visualization_height": GIF_SIZE} if render else {}
    env = StateFeatures(gym.make(GYM_ID, obs_type="state", render_mode="rgb_array", **size))
    if seed is not None:
        env.action_space.seed(int(seed))
    return env


def block_cog(features: np.ndarray) -> np.ndarray:
    """World position of the T's centre of gravity, ``(..., 2)``, from feature vectors ``(..., 6)``."""
    f = np.asarray(features, dtype=np.float64)
    s, c = f[..., 4], f[..., 5]
    x, y = COG_LOCAL
    return f[..., 2:4] + np.stack([c * x - s * y, s * x + c * y], -1)


def winding(observations: np.ndarray) -> float:
    """Total signed angle (radians) the agent travels around the block's centre of gravity."""
    rel = np.asarray(observations, dtype=np.float64)[:, :2] - block_cog(observations)
    angles = np.arctan2(rel[:, 1], rel[:, 0])
    return float(np.sum((np.diff(angles) + np.pi) % (2 * np.pi) - np.pi))


def classify_mode(observations: np.ndarray, actions: np.ndarray, min_turn: float = np.pi / 2) -> int:
    turn = winding(observations)
    return -1 if abs(turn) < min_turn else int(turn > 0)
