"""Robot-action demonstrations: scripted-expert episodes, action chunks and their DataModule.

``load_demonstrations(env, N, seed)`` runs the task's scripted stochastic expert (see
``data/mountain_car.py`` and ``data/pusht.py``) for ``N`` episodes — episode ``i`` starts from the
env seed ``seed * 100_000 + i`` — and caches the result as one ``.npz`` under the dataset cache
(``data/cache.py``: keyed by env, seed, N and the expert's version; written atomically).

Policies see the last ``h`` observations and predict the next ``n`` actions (a chunk), as VQ-BeT
and ACT do: :func:`history_windows` and :func:`chunk_actions` cut those out of an episode, and
:class:`ActionChunkDataModule` serves ``{"obs": (h, O), "actions": (n, A)}`` pairs, normalised by
statistics of the training episodes (:class:`Normalizer`, which a policy keeps to un-normalise its
output). Train and val are split by episode, so no val step shares an episode with training.

Environments and rollouts live in ``data/action_envs.py`` and are re-exported here.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset

from data.action_envs import (  # noqa: F401  (re-exported: the one import policies need)
    ENV_NAMES,
    EnvInfo,
    RolloutResult,
    TemporalEnsemble,
    env_info,
    env_module,
    heldout_seeds,
    make_env,
    make_expert,
    rollout,
    summarize,
    write_rollout_gif,
)
from data.atomic import atomic_write
from data.cache import cache_key, cache_root

EPISODE_SEED_STRIDE = 100_000  # demonstration episode i of seed s starts from env seed s * stride + i


def chunk_actions(actions: np.ndarray, n: int) -> np.ndarray:
    """``(T, A) -> (T, n, A)``: the ``n`` actions from each step on, the last action repeated past the end."""
    actions = np.asarray(actions)
    if n < 1 or len(actions) == 0:
        raise ValueError(f"need n >= 1 and at least one action, got n={n}, {len(actions)} actions")
    idx = np.minimum(np.arange(len(actions))[:, None] + np.arange(n)[None], len(actions) - 1)
    return actions[idx]


def unchunk(chunks: np.ndarray, stride: int = 1, length: int | None = None) -> np.ndarray:
    """The action sequence that chunks taken every ``stride`` steps describe: the first ``stride``
    actions of each chunk, then the whole last chunk, cut to ``length`` (default ``len(chunks) * stride``).

    ``unchunk(chunk_actions(a, n)) == a`` (stride 1), and so does ``unchunk(chunk_actions(a, n)[::n],
    stride=n, length=len(a))`` for non-overlapping chunks.
    """
    chunks = np.asarray(chunks)
    if chunks.ndim != 3 or not 1 <= stride <= chunks.shape[1]:
        raise ValueError(f"chunks must be (T, n, A) with 1 <= stride <= n, got {chunks.shape}, stride {stride}")
    seq = np.concatenate([chunks[:-1, :stride].reshape(-1, chunks.shape[2]), chunks[-1]])
    return seq[: len(chunks) * stride if length is None else length]


def history_windows(observations: np.ndarray, h: int) -> np.ndarray:
    """``(T, O) -> (T, h, O)``: the ``h`` observations up to each step, oldest first; the first
    observation is repeated before the episode's start (as a rollout's history is)."""
    observations = np.asarray(observations)
    if h < 1 or len(observations) == 0:
        raise ValueError(f"need h >= 1 and at least one observation, got h={h}, {len(observations)}")
    idx = np.maximum(np.arange(len(observations))[:, None] - np.arange(h - 1, -1, -1)[None], 0)
    return observations[idx]


@dataclass
class Demonstrations:
    env_name: str
    observations: list[np.ndarray]  # per episode (T_i, obs_dim) float32
    actions: list[np.ndarray]  # per episode (T_i, act_dim) float32
    success: np.ndarray  # (N,) bool
    modes: np.ndarray  # (N,) int: the mode the expert drew (index into mode_names)
    mode_names: tuple[str, ...]
    seeds: np.ndarray  # (N,) the env seed of each episode
    final_coverage: np.ndarray  # (N,) PushT's final goal coverage; NaN for tasks without one

    @property
    def obs_dim(self) -> int:
        return int(self.observations[0].shape[1])

    @property
    def act_dim(self) -> int:
        return int(self.actions[0].shape[1])

    @property
    def lengths(self) -> np.ndarray:
        return np.array([len(a) for a in self.actions])

    def __len__(self) -> int:
        return len(self.actions)


def _generate(env_name: str, num_episodes: int, seed: int, progress: bool) -> dict[str, np.ndarray]:
    expert = make_expert(env_name)
    seeds = [seed * EPISODE_SEED_STRIDE + i for i in range(num_episodes)]
    results = rollout(expert, env_name, seeds, history=1, progress=progress)
    modes = []
    for s in seeds:  # the expert's own draw (rollout's classify_mode reads it back from the trajectory)
        expert.reset(s)
        modes.append(expert.mode)
    return {
        "observations": np.concatenate([r.observations for r in results]).astype(np.float32),
        "actions": np.concatenate([r.actions for r in results]).astype(np.float32),
        "lengths": np.array([r.steps for r in results], dtype=np.int64),
        "success": np.array([r.success for r in results], dtype=bool),
        "modes": np.array(modes, dtype=np.int64),
        "seeds": np.array(seeds, dtype=np.int64),
        "final_coverage": np.array([np.nan if r.final_coverage is None else r.final_coverage for r in results]),
    }


def demonstrations_path(env_name: str, num_episodes: int, seed: int, cache_dir: str | os.PathLike | None = None):
    module = env_module(env_name)
    key = cache_key({"env": env_name, "num_episodes": num_episodes, "seed": seed,
                     "expert_version": getattr(module, "EXPERT_VERSION", 1)})
    return cache_root(cache_dir) / f"actions-{env_name}-n{num_episodes}-s{seed}-{key}.npz"


def load_demonstrations(env: str, num_episodes: int, seed: int = 0, cache_dir: str | os.PathLike | None = None,
                        progress: bool = True) -> Demonstrations:
    """``num_episodes`` expert episodes of ``env`` (``mountain_car`` or ``pusht``), cached on first use."""
    if num_episodes < 1:
        raise ValueError(f"num_episodes must be >= 1, got {num_episodes}")
    path = demonstrations_path(env, num_episodes, seed, cache_dir)
    arrays = None
    if path.exists():
        try:
            with np.load(path, allow_pickle=False) as f:
                arrays = {k: f[k] for k in f.files}
        except (ValueError, OSError, EOFError):  # a damaged file is rebuilt, never trusted
            arrays = None
    if arrays is None:
        arrays = _generate(env, num_episodes, seed, progress)
        try:
            atomic_write(path, lambda f: np.savez(f, **arrays))
        except OSError as err:
            import warnings

            warnings.warn(f"could not write the demonstrations cache {path}: {err}", stacklevel=2)
    bounds = np.cumsum(arrays["lengths"])[:-1]
    return Demonstrations(
        env_name=env, observations=np.split(arrays["observations"], bounds),
        actions=np.split(arrays["actions"], bounds), success=arrays["success"], modes=arrays["modes"],
        mode_names=env_info(env).mode_names, seeds=arrays["seeds"], final_coverage=arrays["final_coverage"])


class Normalizer:
    """Per-dimension affine maps of observations and actions to about [-1, 1].

    ``minmax`` maps the training range to [-1, 1] (VQ-BeT, Diffusion Policy); ``standard`` to zero
    mean and unit variance. Dimensions that never vary keep their offset and a scale of 1.
    Works on numpy arrays and torch tensors; ``state()`` gives the tensors a policy stores as buffers.
    """

    def __init__(self, obs_shift, obs_scale, action_shift, action_scale) -> None:
        self.obs_shift, self.obs_scale = np.asarray(obs_shift, np.float32), np.asarray(obs_scale, np.float32)
        self.action_shift = np.asarray(action_shift, np.float32)
        self.action_scale = np.asarray(action_scale, np.float32)

    @classmethod
    def fit(cls, observations: np.ndarray, actions: np.ndarray, kind: str = "minmax") -> Normalizer:
        def stats(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            if kind == "minmax":
                lo, hi = x.min(0), x.max(0)
                shift, scale = (hi + lo) / 2, (hi - lo) / 2
            elif kind == "standard":
                shift, scale = x.mean(0), x.std(0)
            else:
                raise ValueError(f"normalize must be 'minmax' or 'standard', got {kind!r}")
            return shift, np.where(scale > 1e-6, scale, 1.0)

        return cls(*stats(observations), *stats(actions))

    @classmethod
    def from_state(cls, state: dict) -> Normalizer:
        return cls(*(np.asarray(torch.as_tensor(state[k]).cpu()) for k in
                     ("obs_shift", "obs_scale", "action_shift", "action_scale")))

    def state(self) -> dict[str, torch.Tensor]:
        return {k: torch.from_numpy(getattr(self, k).copy()) for k in
                ("obs_shift", "obs_scale", "action_shift", "action_scale")}

    @staticmethod
    def _as(ref, x):
        return torch.as_tensor(x, dtype=ref.dtype, device=ref.device) if torch.is_tensor(ref) else x

    def normalize_obs(self, x):
        return (x - self._as(x, self.obs_shift)) / self._as(x, self.obs_scale)

    def normalize_actions(self, a):
        return (a - self._as(a, self.action_shift)) / self._as(a, self.action_scale)

    def unnormalize_actions(self, a):
        return a * self._as(a, self.action_scale) + self._as(a, self.action_shift)


class ActionChunkDataset(Dataset):
    """Every step of some episodes as ``{"obs": (h, O), "actions": (n, A), "x": (n, A)}`` float32 tensors.

    ``"x"`` is the same chunk as ``"actions"``: the tokenizer's input under the key every modality's
    batches use, which the generic commands (``scripts/evaluate.py``) read. With ``with_index`` (the
    unshuffled loaders of ``split_dataloader``, for tokenizing) batches also carry ``"index"``, each
    item's position in its split, so code writers can place codes when ranks interleave.
    """

    def __init__(self, obs: torch.Tensor, actions: torch.Tensor, with_index: bool = False) -> None:
        self.obs, self.actions, self.with_index = obs, actions, with_index

    def __len__(self) -> int:
        return len(self.obs)

    def __getitems__(self, positions: list[int]) -> dict[str, torch.Tensor]:
        idx = torch.as_tensor(positions, dtype=torch.long)
        actions = self.actions[idx]
        batch = {"obs": self.obs[idx], "actions": actions, "x": actions}
        if self.with_index:
            batch["index"] = idx
        return batch

    def __getitem__(self, position: int) -> dict[str, torch.Tensor]:
        return {k: v[0] for k, v in self.__getitems__([position]).items()}

    def view(self, with_index: bool) -> ActionChunkDataset:
        return ActionChunkDataset(self.obs, self.actions, with_index)


def _whole_batch(batch):
    return batch if isinstance(batch, dict) else {k: torch.stack([b[k] for b in batch]) for k in batch[0]}


class ActionChunkDataModule(pl.LightningDataModule):
    """Observation histories and action chunks of scripted-expert demonstrations.

    ``val_fraction`` of the episodes (at least one when there are two or more) is held out by a
    seeded permutation; the :attr:`normalizer` is fitted on the training episodes only.
    ``obs_dim``, ``act_dim``, ``history``, ``chunk`` and ``mode_names`` are known at construction.
    """

    def __init__(self, env: str = "mountain_car", num_episodes: int = 100, seed: int = 0, history: int = 1,
                 chunk: int = 5, batch_size: int = 256, val_fraction: float = 0.1, normalize: str = "minmax",
                 num_workers: int = 0, cache_dir: str | None = None, progress: bool = True) -> None:
        super().__init__()
        info = env_info(env)  # fails early on an unknown env
        if history < 1 or chunk < 1:
            raise ValueError(f"history and chunk must be >= 1, got {history}, {chunk}")
        self.save_hyperparameters()
        self.env, self.num_episodes, self.seed = env, num_episodes, seed
        self.history, self.chunk, self.batch_size, self.num_workers = history, chunk, batch_size, num_workers
        self.val_fraction, self.normalize, self.cache_dir, self.progress = val_fraction, normalize, cache_dir, progress
        self.obs_dim, self.act_dim, self.mode_names = info.obs_dim, info.act_dim, info.mode_names
        self.demos: Demonstrations | None = None
        self.normalizer: Normalizer | None = None
        self.episodes: dict[str, np.ndarray] = {}
        self._splits: dict[str, ActionChunkDataset] = {}

    def _split_episodes(self, n: int) -> dict[str, np.ndarray]:
        n_val = 0 if n < 2 or self.val_fraction <= 0 else min(max(round(n * self.val_fraction), 1), n - 1)
        perm = np.random.default_rng(self.seed).permutation(n)
        return {"train": np.sort(perm[n_val:]), "val": np.sort(perm[:n_val])}

    def setup(self, stage: str | None = None) -> None:
        if self._splits:
            return
        self.demos = load_demonstrations(self.env, self.num_episodes, self.seed, self.cache_dir, self.progress)
        self.episodes = self._split_episodes(len(self.demos))
        train = self.episodes["train"]
        self.normalizer = Normalizer.fit(np.concatenate([self.demos.observations[i] for i in train]),
                                         np.concatenate([self.demos.actions[i] for i in train]), self.normalize)
        for split, eps in self.episodes.items():
            norm = self.normalizer
            obs = [history_windows(norm.normalize_obs(self.demos.observations[i]), self.history) for i in eps]
            act = [chunk_actions(norm.normalize_actions(self.demos.actions[i]), self.chunk) for i in eps]
            empty_o, empty_a = np.zeros((0, self.history, self.obs_dim)), np.zeros((0, self.chunk, self.act_dim))
            self._splits[split] = ActionChunkDataset(
                torch.from_numpy(np.concatenate(obs) if obs else empty_o).float(),
                torch.from_numpy(np.concatenate(act) if act else empty_a).float())

    @property
    def stats(self) -> dict[str, dict[str, np.ndarray]]:
        """The normalisation as ``{"obs"|"actions": {"mean", "std"}}``: batches hold ``(x - mean) / std``
        (for ``minmax`` "mean" is the range's midpoint and "std" its half-width)."""
        if self.normalizer is None:
            self.setup()
        n = self.normalizer
        return {"obs": {"mean": n.obs_shift, "std": n.obs_scale},
                "actions": {"mean": n.action_shift, "std": n.action_scale}}

    def split_dataset(self, split: str, with_index: bool = False) -> ActionChunkDataset:
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        if not self._splits:
            self.setup()
        return self._splits[split].view(with_index)

    def _loader(self, split: str, shuffle: bool, with_index: bool = False) -> DataLoader:
        generator = torch.Generator().manual_seed(self.seed) if shuffle else None
        return DataLoader(self.split_dataset(split, with_index), batch_size=self.batch_size, shuffle=shuffle,
                          num_workers=self.num_workers, collate_fn=_whole_batch, generator=generator,
                          persistent_workers=self.num_workers > 0)

    def split_dataloader(self, split: str) -> DataLoader:
        """Unshuffled iteration over one split (for ``scripts/tokenize.py``); batches carry ``"index"``."""
        return self._loader(split, shuffle=False, with_index=True)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader | list:
        return self._loader("val", shuffle=False) if len(self.split_dataset("val")) else []
