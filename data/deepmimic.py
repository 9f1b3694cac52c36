"""``deepmimic``: windows of humanoid motion generated from the 15 DeepMimic clips in the pybullet wheel.

The clips (``pybullet_data/data/motions/humanoid3d_*.txt``, JSON ``Frames`` of 44 numbers: duration,
root position, root quaternion wxyz, then chest, neck, right hip, knee (angle), ankle, shoulder,
elbow (angle) and the same for the left side) are far too few to train on, so each window is
synthesised from them: the clip named by its label is resampled to 30 Hz with slerp at a random
speed (time warp 0.8-1.25x, log-uniform), mirrored left/right half of the time, started at a random
phase, cycled (looping clips) or surrounded by other clips, joined with slerp transitions, and
turned to a random heading. Windows therefore keep the clips' real joint statistics and come in any
number; each is labelled by its source clip (``CLASS_NAMES``), which fills at least
``min_label_fraction`` of it (or all of the clip when the clip is shorter).

A window is ``FEATURE_DIM`` channels by ``window`` frames (see :mod:`data.motion_features`:
heading-relative root velocities, root height and 6-D rotations), cached as one float32 array per
split keyed by every parameter and the clip files. Val windows come from another seed: the same 15
performances under other augmentations, so val measures fit, not generalisation to new motions.

The interface the renderers and metrics use: :func:`features_to_positions`, ``JOINT_NAMES``,
``PARENTS``, ``FOOT_JOINTS``, ``UP_AXIS`` and ``CLASS_NAMES``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from data.cache import cached_array, source_stamp
from data.errors import MissingDataError
from data.humanoid import (
    FOOT_JOINTS,
    JOINT_NAMES,
    PARENTS,
    UP_AXIS,
    forward_kinematics,
    load_skeleton,
    mirror_pose,
    pybullet_data_root,
    revolute_quats,
)
from data.motion_features import (
    FEATURE_DIM,
    FPS,
    features_to_motion,
    features_to_positions,
    heading_angles,
    motion_to_features,
)
from data.rotations import quat_conjugate, quat_multiply, quat_rotate, quat_slerp, quat_to_matrix, yaw_quat
from data.split import SplitDataModule, SplitDataset, seeded_subset

MOTIONS_RELPATH = "data/motions"
CLASS_NAMES: tuple[str, ...] = (
    "backflip", "cartwheel", "crawl", "dance_a", "dance_b", "getup_facedown", "getup_faceup", "jump", "kick",
    "punch", "roll", "run", "spin", "spinkick", "walk",
)
FRAME_NUMBERS = 44
# Where each rotated joint sits in a frame (after duration 1 + root position 3 + root rotation 4):
# a quaternion (4 numbers) or, for knees and elbows, one angle.
_LAYOUT = (("chest", 4), ("neck", 4), ("right_hip", 4), ("right_knee", 1), ("right_ankle", 4),
           ("right_shoulder", 4), ("right_elbow", 1), ("left_hip", 4), ("left_knee", 1), ("left_ankle", 4),
           ("left_shoulder", 4), ("left_elbow", 1))
VERSION = 1  # bump when the generator changes what it writes (part of the cache key)

__all__ = ["CLASS_NAMES", "FEATURE_DIM", "FOOT_JOINTS", "FPS", "JOINT_NAMES", "PARENTS", "UP_AXIS", "Motion",
           "MotionDataModule", "features_to_motion", "features_to_positions", "forward_kinematics", "load_clip",
           "motion_to_features", "synthesize_windows"]


@dataclass
class Motion:
    """A pose sequence: root positions ``(N, 3)``, root quaternions ``(N, 4)`` and local joint
    quaternions ``(N, 12, 4)`` (``ROTATED_JOINTS`` order), wxyz, float64, metres, y up."""

    root_pos: Tensor
    root_quat: Tensor
    joint_quats: Tensor

    def __len__(self) -> int:
        return self.root_pos.shape[0]

    def slice(self, start: int, stop: int | None = None) -> Motion:
        return Motion(self.root_pos[start:stop], self.root_quat[start:stop], self.joint_quats[start:stop])

    def mirrored(self) -> Motion:
        return Motion(*mirror_pose(self.root_pos, self.root_quat, self.joint_quats))

    def turned(self, angle: float) -> Motion:
        """Turned about the vertical axis through the origin by ``angle`` radians."""
        q = yaw_quat(torch.tensor(angle, dtype=self.root_pos.dtype))
        return Motion(quat_rotate(q.expand(len(self), 4), self.root_pos), quat_multiply(q, self.root_quat),
                      self.joint_quats)

    def positions(self) -> Tensor:
        """Joint positions ``(N, J, 3)`` by forward kinematics."""
        return forward_kinematics(quat_to_matrix(self.joint_quats), quat_to_matrix(self.root_quat), self.root_pos)


@dataclass
class Clip:
    name: str
    times: np.ndarray  # (N,) seconds of each key frame
    motion: Motion
    loops: bool


def motions_folder(root: str | None = None) -> Path:
    folder = Path(root or pybullet_data_root()) / MOTIONS_RELPATH
    if not folder.is_dir():
        raise MissingDataError(f"DeepMimic clips not found at {folder}: they ship in the pybullet wheel "
                               "(pip install pybullet) or set data.params.root to a copy of pybullet_data")
    return folder


def clip_path(name: str, root: str | None = None) -> Path:
    if name not in CLASS_NAMES:
        raise ValueError(f"unknown DeepMimic clip {name!r}; choose from {', '.join(CLASS_NAMES)}")
    return motions_folder(root) / f"humanoid3d_{name}.txt"


def load_clip(name: str, root: str | None = None) -> Clip:
    """One clip as key-frame times and poses (knee/elbow angles turned into quaternions about their axes)."""
    path = clip_path(name, root)
    data = json.loads(path.read_text())
    frames = torch.tensor(data["Frames"], dtype=torch.float64)
    if frames.dim() != 2 or frames.shape[1] != FRAME_NUMBERS:
        raise ValueError(f"{path}: frames must have {FRAME_NUMBERS} numbers, got shape {tuple(frames.shape)}")
    col, quats = 8, []
    for joint, width in _LAYOUT:
        value = frames[:, col:col + width]
        quats.append(value if width == 4 else revolute_quats(value, (joint,), root)[:, 0])
        col += width
    times = np.concatenate(([0.0], np.cumsum(frames[:-1, 0].numpy())))
    motion = Motion(frames[:, 1:4].clone(), frames[:, 4:8].clone(), torch.stack(quats, 1))
    return Clip(name, times, motion, data.get("Loop", "none") == "wrap")


def resample(clip: Clip, speed: float = 1.0, fps: int = FPS) -> Motion:
    """The clip played at ``speed`` and sampled at ``fps``: positions interpolated linearly, rotations by slerp."""
    duration = float(clip.times[-1])
    t = np.arange(int(math.floor(duration * fps / speed + 1e-9)) + 1) * speed / fps
    idx = np.clip(np.searchsorted(clip.times, t, side="right") - 1, 0, len(clip.times) - 2)
    span = np.maximum(clip.times[idx + 1] - clip.times[idx], 1e-9)
    frac = torch.from_numpy(np.clip((t - clip.times[idx]) / span, 0.0, 1.0))
    i0, i1, m = torch.from_numpy(idx), torch.from_numpy(idx + 1), clip.motion
    pos = m.root_pos[i0] + frac[:, None] * (m.root_pos[i1] - m.root_pos[i0])
    return Motion(pos, quat_slerp(m.root_quat[i0], m.root_quat[i1], frac),
                  quat_slerp(m.joint_quats[i0], m.joint_quats[i1], frac[:, None]))


def join(a: Motion, b: Motion, transition: int) -> Motion:
    """``a`` then ``b`` with a slerp transition: ``b`` is placed where ``a``'s last step leads (position and
    heading extrapolated one frame) and its first ``transition`` frames are pulled towards ``a``'s last
    pose by an offset that decays to zero (rotations by slerp from identity, height linearly)."""
    psi_a = heading_angles(a.root_quat[-2:]) if len(a) > 1 else heading_angles(a.root_quat[-1:]).repeat(2)
    psi_b = heading_angles(b.root_quat[:1])[0]
    turn = float(2 * psi_a[-1] - psi_a[0] - psi_b)
    b = b.turned(turn)
    step = a.root_pos[-1] - (a.root_pos[-2] if len(a) > 1 else a.root_pos[-1])
    shift = a.root_pos[-1] + step - b.root_pos[0]
    shift[1] = 0.0
    pos = b.root_pos + shift
    k = min(transition, len(b))
    w = torch.zeros(len(b), dtype=pos.dtype)
    w[:k] = 1 - torch.arange(1, k + 1, dtype=pos.dtype) / (k + 1)
    pos = pos.clone()
    pos[:, 1] += w * (a.root_pos[-1, 1] - b.root_pos[0, 1])
    identity = torch.tensor([1.0, 0.0, 0.0, 0.0], dtype=pos.dtype)

    def pulled(q: Tensor, target: Tensor, weight: Tensor) -> Tensor:
        head = q[:k]  # only the transition frames move
        offset = quat_multiply(target, quat_conjugate(q[0])).expand_as(head)
        return torch.cat((quat_multiply(quat_slerp(identity.expand_as(head), offset, weight[:k]), head), q[k:]))

    root_quat = pulled(b.root_quat, a.root_quat[-1], w)
    joint_quats = pulled(b.joint_quats, a.joint_quats[-1], w[:, None].expand(len(b), b.joint_quats.shape[1]))
    return Motion(torch.cat((a.root_pos, pos)), torch.cat((a.root_quat, root_quat)),
                  torch.cat((a.joint_quats, joint_quats)))


class WindowSynthesizer:
    """Makes labelled windows of ``window + 1`` frames from the clips (see the module docstring)."""

    def __init__(self, window: int = 64, clips: tuple[str, ...] | list[str] | None = None, root: str | None = None,
                 mirror: bool = True, time_warp: tuple[float, float] = (0.8, 1.25), transition_frames: int = 10,
                 min_label_fraction: float = 0.6, switch_prob: float = 0.25) -> None:
        self.window, self.mirror, self.time_warp = int(window), bool(mirror), tuple(float(s) for s in time_warp)
        self.transition, self.min_label_fraction, self.switch_prob = int(transition_frames), min_label_fraction, \
            switch_prob
        self.names = tuple(clips or CLASS_NAMES)
        self.clips = [load_clip(n, root) for n in self.names]

    def prepared(self, c: int, rng: np.random.Generator) -> Motion:
        """Clip ``c`` at a random speed, mirrored half of the time."""
        lo, hi = self.time_warp
        motion = resample(self.clips[c], float(np.exp(rng.uniform(np.log(lo), np.log(hi)))))
        return motion.mirrored() if self.mirror and rng.random() < 0.5 else motion

    def _other(self, c: int, rng: np.random.Generator) -> int:
        others = [i for i in range(len(self.clips)) if i != c] or [c]
        return int(rng.choice(others))

    def window_of(self, c: int, rng: np.random.Generator) -> Motion:
        frames = self.window + 1
        need = math.ceil(self.min_label_fraction * frames)
        base = self.prepared(c, rng)
        loops = self.clips[c].loops
        if loops:
            seq = base.slice(int(rng.integers(0, len(base) - 1)))
        elif len(base) >= frames:
            start = int(rng.integers(0, len(base) - frames + 1))
            seq = base.slice(start, start + frames)
        else:  # a one-off shorter than the window: context before (random length) and after it
            seq, lead = base, int(rng.integers(0, frames - len(base) + 1))
            if lead:
                pre = self.prepared(self._other(c, rng), rng)
                while len(pre) < lead:
                    pre = join(pre, self.prepared(self._other(c, rng), rng), self.transition)
                seq = join(pre.slice(len(pre) - lead), base, self.transition)
        covered = len(seq)
        while len(seq) < frames:
            if loops and (covered < need or rng.random() >= self.switch_prob):
                seq = join(seq, base.slice(1), self.transition)  # the next cycle (its first frame repeats the last)
                covered += len(base) - 1
            else:
                seq = join(seq, self.prepared(self._other(c, rng), rng), self.transition)
        return seq.slice(0, frames).turned(float(rng.uniform(-np.pi, np.pi)))


def synthesize_windows(n: int, window: int = 64, seed: int = 0, clips: tuple[str, ...] | None = None,
                       root: str | None = None, **options) -> tuple[np.ndarray, np.ndarray]:
    """``n`` windows ``(n, window, FEATURE_DIM)`` float32 and their clip labels ``(n,)`` int64 (balanced,
    shuffled by ``seed``; window ``i`` draws its augmentations from ``default_rng([seed, i])``)."""
    synth = WindowSynthesizer(window, clips, root, **options)
    labels = synthesize_labels(n, len(synth.clips), seed)
    motions = [synth.window_of(int(c), np.random.default_rng([seed, i])) for i, c in enumerate(labels)]
    if not motions:
        return np.zeros((0, window, FEATURE_DIM), np.float32), labels
    stacked = [torch.stack([getattr(m, k) for m in motions]) for k in ("root_pos", "root_quat", "joint_quats")]
    return motion_to_features(*stacked).float().numpy(), labels


def synthesize_labels(n: int, num_classes: int, seed: int) -> np.ndarray:
    labels = np.arange(n, dtype=np.int64) % num_classes
    np.random.default_rng(seed).shuffle(labels)
    return labels


class MotionDataModule(SplitDataModule):
    """Motion windows for the ``motion`` modality: batches ``{"x": (B, FEATURE_DIM, window), "label": (B,)}``.

    ``deepmimic``: ``num_train`` + ``num_val`` windows synthesised from ``clips`` (default all 15; labels
    index ``clips``), train and val from different seeds, cached under ``cache_dir``.
    """

    def __init__(self, dataset: str = "deepmimic", root: str | None = None, window: int = 64,
                 clips: list[str] | None = None, num_train: int = 4096, num_val: int = 512, mirror: bool = True,
                 time_warp: list[float] | tuple[float, float] = (0.8, 1.25), transition_frames: int = 10,
                 batch_size: int = 64, num_workers: int = 0, seed: int = 0, cache_dir: str | None = None,
                 limit_train: int | None = None, limit_val: int | None = None) -> None:
        super().__init__()
        if dataset != "deepmimic":
            raise ValueError(f"unknown motion dataset {dataset!r}; choose deepmimic")
        self.save_hyperparameters()
        self.root, self.window, self.seed = root, int(window), seed
        self.class_names: tuple[str, ...] = tuple(clips or CLASS_NAMES)
        for name in self.class_names:
            clip_path(name, root)  # fail early on unknown names
        self.num_classes = len(self.class_names)
        self.channels, self.length = FEATURE_DIM, self.window
        self.counts = {"train": num_train, "val": num_val}
        self.options = {"mirror": bool(mirror), "time_warp": [float(s) for s in time_warp],
                        "transition_frames": int(transition_frames)}
        self.batch_size, self.num_workers, self.cache_dir = batch_size, num_workers, cache_dir
        self.limits = {"train": limit_train, "val": limit_val}

    def _split_arrays(self, split: str, seed: int) -> tuple[np.ndarray, np.ndarray]:
        n = self.counts[split]
        params = {"version": VERSION, "n": n, "window": self.window, "seed": seed, "clips": self.class_names,
                  "sources": [source_stamp(clip_path(c, self.root)) for c in self.class_names],
                  "skeleton": load_skeleton(self.root).offsets.tolist(), **self.options}
        features = cached_array("deepmimic", params, lambda: synthesize_windows(
            n, self.window, seed, self.class_names, self.root, mirror=self.options["mirror"],
            time_warp=tuple(self.options["time_warp"]), transition_frames=self.options["transition_frames"])[0],
            self.cache_dir)
        return features, synthesize_labels(n, self.num_classes, seed)

    def setup(self, stage: str | None = None) -> None:
        if self._splits:
            return
        for salt, split in enumerate(("train", "val"), start=1):
            x, labels = self._split_arrays(split, self.seed * 2 + salt - 1)
            items = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 2, 1)))
            keep = seeded_subset(torch.arange(len(items)), self.limits[split], self.seed * 1_000_003 + salt)
            self._splits[split] = SplitDataset(items, torch.from_numpy(labels), keep)

